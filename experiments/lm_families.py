"""Four language-model families at matched size: quality, speed, memory, peers, and Mirostat.

    python -m experiments.lm_families            # ~12 minutes on a 2-core CPU, compilation included
    python -m experiments.lm_families --smoke    # tiny models, well under a minute

It trains the softmax transformer, TransNormerLLM, RWKV-7 and Mamba (~1M parameters each, byte
vocabulary) on the Python standard library's own source for one fixed budget (same steps, batch and
window), or reuses the finished checkpoints in `results/lm_families/train/<family>/`, and reports:

- held-out bits per byte (files held out whole, `jaxinf.data.stdlib_code`);
- prefill seconds against prompt length, and `generate` tokens/s at batch 1 and 8 (greedy);
- memory per sequence against context length, from `init_cache` shapes: the state decoding needs
  (a KV cache grows with the context, recurrent states don't) and the whole cache, which also holds
  the per-position states `step` keeps for exact rollback (speculative decoding);
- peers, side by side on the same converted weights (random, decisive scales; converted by
  `jaxinf.checkpoints`): jaxinf `generate` against transformers' `generate` (Llama, Mamba;
  greedy, `use_cache=True`) and the `rwkv` package's RWKV-7 (`cpu fp32`, its forward with state,
  token by token), greedy outputs compared token for token, tokens/s as ratios of medians;
- Mirostat (Basu et al. 2021): long generations with Mirostat v2 (and v1) at several tau, top-k and
  top-p; the running observed surprise (-log2 p of each drawn token under the untruncated model)
  and how far it sits from tau.

Everything goes to `results/lm_families/`: `results.json` (every row, with its `study`),
`report.md` (a table per study), `meta.json`, and `loss.png`, `prefill.png`, `memory.png`,
`decode.png`, `mirostat.png`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm.auto import tqdm

from experiments.reporting import markdown_table, results_dir, write_report
from jaxinf.checkpoints.native import CheckpointStore
from jaxinf.data.stdlib_code import load_corpus
from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.models import mamba as mamba_lib
from jaxinf.models import rwkv as rwkv_lib
from jaxinf.models import transformer as transformer_lib
from jaxinf.models import transnormer as transnormer_lib
from jaxinf.train.lm import LMTrainConfig, bits_per_byte, train_lm

FAMILIES = ("transformer", "transnormer", "rwkv7", "mamba")
PEERS = ("llama", "mamba", "rwkv7")
# cache entries that only exist for rollback (the per-position states `step` keeps)
ROLLBACK_KEYS = ("history", "conv_window", "ssm_history", "last_k")


@dataclasses.dataclass(frozen=True)
class Config:
  families: tuple[str, ...] = FAMILIES
  train: LMTrainConfig = LMTrainConfig(steps=500, batch_size=8, seq_len=128, warmup_steps=50,
                                       checkpoint_every=100)
  # Mamba trains with the sequential selective scan: on this 2-core CPU it ran 371 ms/step against
  # 992 ms/step for the chunked XLA form at batch 8 x 128 (the same math, held equal by the tests).
  # Benchmarks below use every family's default ("auto").
  mamba_train_impl: str = "reference"
  corpus_bytes: int | None = None  # None: the whole stdlib corpus
  eval_windows: int = 128          # held-out windows of seq_len bytes for bits per byte
  prefill_lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  decode_prompt: int = 64
  decode_tokens: int = 256
  decode_batches: tuple[int, ...] = (1, 8)
  memory_contexts: tuple[int, ...] = (256, 1024, 4096, 16384, 65536)
  repeats: int = 3                 # timed repeats after a warm-up; medians are reported
  peers: tuple[str, ...] = PEERS
  peer_prompt: int = 32
  peer_tokens: int = 128
  peer_batches: tuple[int, ...] = (1, 8)
  mirostat_family: str = "rwkv7"
  mirostat_tokens: int = 1024
  mirostat_batch: int = 8
  mirostat_taus: tuple[float, ...] = (2.0, 3.0, 4.0)
  mirostat_v1_tau: float = 3.0
  top_k: int = 20
  top_p: float = 0.9
  window: int = 64                 # moving-average window of the surprise plots and drift
  seed: int = 0
  out_dir: str = "results/lm_families"
  smoke: bool = False
  progress: bool = True


def smoke_config(cfg: Config) -> Config:
  return dataclasses.replace(
      cfg, train=dataclasses.replace(cfg.train, steps=6, batch_size=2, seq_len=32,
                                     warmup_steps=2, checkpoint_every=3),
      corpus_bytes=200_000, eval_windows=4, prefill_lengths=(32,), decode_prompt=8,
      decode_tokens=8, decode_batches=(2,), memory_contexts=(64, 256), repeats=1,
      peer_prompt=8, peer_tokens=8, peer_batches=(1, 2), mirostat_tokens=32, mirostat_batch=2,
      mirostat_taus=(3.0,), window=8,
      out_dir=str(Path(cfg.out_dir).parent / "lm_families_smoke"))


# --- the four families at matched size ---------------------------------------------------------

def family_config(name: str, smoke: bool, max_len: int):
  """Each family's ~1M-parameter byte-vocab config (tiny ones for --smoke)."""
  if name == "transformer":
    # RoPE has no parameter tied to the context: max_len only sizes the longest cache
    base = "transformer-tiny" if smoke else "transformer-1m"
    return transformer_lib.transformer_config(base, vocab_size=259, max_len=max_len)
  if name == "mamba":
    return mamba_lib.mamba_config("mamba-tiny" if smoke else "mamba-1m", vocab_size=259)
  if name == "rwkv7":
    if smoke:
      return rwkv_lib.RWKV7Config(vocab_size=259, d_model=32, n_layers=2, head_size=16,
                                  decay_lora=4, a_lora=4, v_lora=4, gate_lora=8)
    return rwkv_lib.RWKV7_1M
  if name == "transnormer":
    if smoke:
      return transnormer_lib.TransNormerConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2,
                                               glu_dim=64, lrpe=(True, False))
    return transnormer_lib.TRANSNORMER_1M
  raise ValueError(f"families: unknown family {name!r}; known: {list(FAMILIES)}")


def build_model(name: str, cfg, impl: str = "auto", seed: int = 0):
  """(model, random params) of family `name` with kernel implementation `impl`."""
  key = jax.random.key(seed)
  if name == "transformer":
    model = transformer_lib.TransformerLM(cfg, impl=impl)
    return model, model.init_params(seed)
  if name == "mamba":
    model = mamba_lib.MambaLM(cfg, impl=impl)
    return model, model.init_params(seed)
  if name == "rwkv7":
    return rwkv_lib.rwkv7_model(dataclasses.replace(cfg, impl=impl), key)
  return transnormer_lib.transnormer_model(dataclasses.replace(cfg, impl=impl), key)


def with_impl(name: str, model, impl: str):
  """The same model (same params tree) with another kernel implementation."""
  if name in ("transformer", "mamba"):
    return dataclasses.replace(model, impl=impl)
  return dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, impl=impl))


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def cache_bytes(model, batch: int, context: int) -> tuple[int, int]:
  """(state bytes, whole-cache bytes) of `init_cache(batch, context)`, from shapes alone."""
  shapes = jax.eval_shape(lambda: model.init_cache(batch, context))
  nbytes = lambda tree: int(sum(math.prod(x.shape) * x.dtype.itemsize
                                for x in jax.tree.leaves(tree)))
  state = {k: v for k, v in shapes.items() if k not in ROLLBACK_KEYS + ("length",)}
  return nbytes(state), nbytes(shapes)


# --- timing ------------------------------------------------------------------------------------

def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up (compilation)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def side_by_side(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each function, warmed up first, then timed interleaved (round robin), so
  load from other processes hits all of them alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())  # async dispatch: wait for the result, not the launch
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def heldout_prompts(heldout: np.ndarray, batch: int, length: int, seed: int) -> np.ndarray:
  """`batch` windows of `length` held-out bytes (EOS-free) as int32 [B, T]."""
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < batch:
    s = int(rng.integers(0, len(heldout) - length))
    window = heldout[s:s + length]
    if (window < 256).all():
      out.append(window)
  return np.stack(out).astype(np.int32)


# --- peers: the same (converted) weights in jaxinf and in the original library ------------------

def _randomize(module, seed: int) -> None:
  """Random weights at decisive scales (clear argmaxes, so greedy decoding is comparable)."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if name.endswith("A_log"):
        p.copy_(r.clamp(-2, 2))
      elif name.endswith("dt_proj.bias"):
        p.copy_(-2.0 + r)
      elif "norm" in name and p.ndim == 1:
        p.copy_(1.0 + 0.2 * r)
      elif "embed" in name:
        p.copy_(r)
      elif p.ndim == 1:
        p.copy_(0.3 * r)
      else:
        p.copy_(r / math.sqrt(p[0].numel()))


def build_peer(name: str, family_cfg, folder: Path, seed: int):
  """(peer generate(prompts [B, T] np, n) -> new tokens [B, n], jaxinf (model, params), batch
  sizes the peer supports or None for any). Weights travel the real converter path."""
  import torch

  from jaxinf.checkpoints import transformers_lm
  folder.mkdir(parents=True, exist_ok=True)
  if name in ("llama", "mamba"):
    import transformers
    c = family_cfg
    if name == "llama":
      hf_cfg = transformers.LlamaConfig(
          vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_hidden,
          num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
          num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
          tie_word_embeddings=c.tie_embeddings, max_position_embeddings=c.max_len,
          rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
      hf = transformers.LlamaForCausalLM(hf_cfg)
    else:
      hf_cfg = transformers.MambaConfig(
          vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
          state_size=c.state_size, expand=c.expand, conv_kernel=c.conv_kernel,
          time_step_rank=c.dt_rank, layer_norm_epsilon=c.norm_eps, use_bias=c.use_bias,
          use_conv_bias=c.use_conv_bias, tie_word_embeddings=c.tie_embeddings)
      hf = transformers.MambaForCausalLM(hf_cfg)
    hf.eval()
    _randomize(hf, seed)
    hf.save_pretrained(folder)
    load = transformers_lm.load_llama if name == "llama" else transformers_lm.load_mamba
    ours = load(folder)

    def peer(prompts: np.ndarray, n: int) -> np.ndarray:
      ids = torch.from_numpy(prompts.astype(np.int64))
      with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                          eos_token_id=None)
      return out[:, prompts.shape[1]:].numpy()

    return peer, ours, None

  # the rwkv package: BlinkDL's own x070 inference code; it reads .pth only, jaxinf safetensors
  os.environ["RWKV_V7_ON"] = "1"
  os.environ.setdefault("RWKV_JIT_ON", "1")
  os.environ["RWKV_CUDA_ON"] = "0"
  import safetensors.torch
  from rwkv.model import RWKV

  from jaxinf.checkpoints.rwkv import load_rwkv7
  sd = rwkv_state_dict(family_cfg, seed)
  torch.save(sd, folder / "model.pth")
  safetensors.torch.save_file(sd, str(folder / "model.safetensors"))
  ref = RWKV(model=str(folder / "model"), strategy="cpu fp32")
  ours = load_rwkv7(folder / "model.safetensors")

  def peer(prompts: np.ndarray, n: int) -> np.ndarray:
    (prompt,) = prompts  # batch 1 only: the package's forward carries one sequence's state
    out, state = ref.forward([int(t) for t in prompt], None)
    toks = []
    for _ in range(n):
      toks.append(int(torch.argmax(out)))
      out, state = ref.forward([toks[-1]], state)
    return np.asarray([toks])

  return peer, ours, (1,)


def rwkv_state_dict(cfg, seed: int) -> dict:
  """An RWKV-LM x070 state dict of `cfg`'s shapes with random weights of realistic scale."""
  import torch

  g = torch.Generator().manual_seed(seed)
  rn = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std
  ru = lambda *shape, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*shape, generator=g)
  v, c, h, n, f = cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.head_size, cfg.ffn_dim
  sd = {"emb.weight": rn(v, c), "blocks.0.ln0.weight": ru(c, lo=0.5, hi=1.5),
        "blocks.0.ln0.bias": rn(c, std=0.1), "ln_out.weight": ru(c, lo=0.5, hi=1.5),
        "ln_out.bias": rn(c, std=0.1), "head.weight": rn(v, c, std=c ** -0.5)}
  lora = dict(w=cfg.decay_lora, a=cfg.a_lora, v=cfg.v_lora, g=cfg.gate_lora)
  for i in range(cfg.n_layers):
    p = f"blocks.{i}."
    for ln in ("ln1", "ln2"):
      sd[p + ln + ".weight"] = ru(c, lo=0.5, hi=1.5)
      sd[p + ln + ".bias"] = rn(c, std=0.1)
    for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
      sd[p + "att." + m] = ru(1, 1, c)
    sd[p + "att.w0"] = ru(1, 1, c, lo=-3.0, hi=1.0)
    sd[p + "att.a0"] = rn(1, 1, c, std=0.5)
    sd[p + "att.v0"] = rn(1, 1, c, std=0.5)
    for name, r in lora.items():
      sd[p + f"att.{name}1"] = rn(c, r, std=0.3)
      sd[p + f"att.{name}2"] = rn(r, c, std=0.3)
    sd[p + "att.k_k"] = ru(1, 1, c, lo=0.5, hi=1.5)
    sd[p + "att.k_a"] = ru(1, 1, c, lo=0.5, hi=1.5)
    sd[p + "att.r_k"] = rn(h, n, std=0.3)
    for lin in ("receptance", "key", "value", "output"):
      sd[p + f"att.{lin}.weight"] = rn(c, c, std=c ** -0.5)
    sd[p + "att.ln_x.weight"] = ru(c, lo=0.5, hi=1.5)
    sd[p + "att.ln_x.bias"] = rn(c, std=0.1)
    sd[p + "ffn.x_k"] = ru(1, 1, c)
    sd[p + "ffn.key.weight"] = rn(f, c, std=c ** -0.5)
    sd[p + "ffn.value.weight"] = rn(c, f, std=f ** -0.5)
  return sd


def peer_study(cfg: Config, family_cfgs: dict, out: Path, heldout: np.ndarray) -> list[dict]:
  rows = []
  for name in cfg.peers:
    family = {"llama": "transformer", "mamba": "mamba", "rwkv7": "rwkv7"}[name]
    peer, (model, params), batches = build_peer(name, family_cfgs[family], out / "peers" / name,
                                                cfg.seed + 1)
    library = "rwkv package" if name == "rwkv7" else "transformers"
    for b in cfg.peer_batches:
      if batches is not None and b not in batches:
        rows.append(dict(study="peer", peer=f"{library} {name}", batch=b,
                         note=f"{library} has no batched forward; not run"))
        continue
      prompts = heldout_prompts(heldout, b, cfg.peer_prompt, cfg.seed + b)
      key = jax.random.key(cfg.seed)
      ours_fn = lambda: np.asarray(generate(model, params, prompts, key,
                                            max_new_tokens=cfg.peer_tokens).tokens)
      peer_fn = lambda: peer(prompts, cfg.peer_tokens)
      mine, theirs = ours_fn(), peer_fn()
      secs = side_by_side({"jaxinf": ours_fn, "peer": peer_fn}, cfg.repeats)
      agree = mine == theirs
      first = [int(np.argmin(r)) if not r.all() else -1 for r in agree]
      tps = {k: b * cfg.peer_tokens / s for k, s in secs.items()}
      rows.append(dict(study="peer", peer=f"{library} {name}", batch=b,
                       new_tokens=cfg.peer_tokens, jaxinf_tok_s=tps["jaxinf"],
                       peer_tok_s=tps["peer"], speedup=tps["jaxinf"] / tps["peer"],
                       greedy_agree=float(agree.mean()),
                       first_divergence=",".join(map(str, first)),
                       note="identical" if agree.all() else "diverges (see first_divergence)"))
      print(f"peer {library} {name} b={b}: jaxinf {tps['jaxinf']:.0f} tok/s, peer "
            f"{tps['peer']:.0f} tok/s, x{rows[-1]['speedup']:.2f}, greedy agree "
            f"{agree.mean():.3f}", flush=True)
  return rows


# --- Mirostat ----------------------------------------------------------------------------------

def moving_average(x: np.ndarray, w: int) -> np.ndarray:
  c = np.cumsum(np.insert(x, 0, 0.0))
  return (c[w:] - c[:-w]) / w


def mirostat_study(cfg: Config, model, params, heldout: np.ndarray):
  samplers = [(f"mirostat v2 tau={t:g}", t, SamplerConfig(mirostat=2, mirostat_tau=t))
              for t in cfg.mirostat_taus]
  samplers.append((f"mirostat v1 tau={cfg.mirostat_v1_tau:g}", cfg.mirostat_v1_tau,
                   SamplerConfig(mirostat=1, mirostat_tau=cfg.mirostat_v1_tau)))
  samplers += [(f"top-k k={cfg.top_k}", None, SamplerConfig(top_k=cfg.top_k)),
               (f"top-p p={cfg.top_p:g}", None, SamplerConfig(top_p=cfg.top_p)),
               ("pure sampling (T=1)", None, SamplerConfig())]
  prompts = heldout_prompts(heldout, cfg.mirostat_batch, cfg.decode_prompt, cfg.seed + 7)
  rows, curves = [], {}
  n, q = cfg.mirostat_tokens, max(cfg.mirostat_tokens // 4, 1)
  for label, tau, sampler in tqdm(samplers, desc="mirostat", disable=not cfg.progress):
    out = generate(model, params, prompts, jax.random.key(cfg.seed), max_new_tokens=n,
                   sampler=sampler)
    s = np.asarray(out.surprise, np.float64)           # [B, n] bits
    mean_curve = s.mean(0)
    curves[label] = (tau, mean_curve)
    windowed = np.stack([moving_average(r, cfg.window) for r in s])   # [B, n - w + 1]
    toks = np.asarray(out.tokens)
    rows.append(dict(
        study="mirostat", sampler=label, tau=float("nan") if tau is None else tau,
        surprise_mean=float(s.mean()), first_quarter=float(s[:, :q].mean()),
        last_quarter=float(s[:, -q:].mean()),
        drift=float(s[:, -q:].mean() - s[:, :q].mean()),
        abs_err_to_tau=float("nan") if tau is None else float(abs(s[:, n // 2:].mean() - tau)),
        window_sd=float(windowed.std()),
        distinct_8grams=distinct_ngrams(toks, 8)))
  return rows, curves


def distinct_ngrams(tokens: np.ndarray, n: int) -> float:
  """Fraction of distinct n-grams per row, averaged (1: no repetition; low: loops)."""
  fracs = []
  for row in tokens:
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    fracs.append(len(set(grams)) / max(len(grams), 1))
  return float(np.mean(fracs))


# --- the run -----------------------------------------------------------------------------------

def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  for name in cfg.families:
    family_config(name, cfg.smoke, 8)  # validates the names before any work
  unknown = sorted(set(cfg.peers) - set(PEERS))
  if unknown:
    raise ValueError(f"peers: unknown peer(s) {unknown}; known: {list(PEERS)}")
  if cfg.mirostat_family not in cfg.families:
    raise ValueError(f"mirostat_family: {cfg.mirostat_family!r} is not among families "
                     f"{cfg.families}")
  t_start = time.perf_counter()
  out = results_dir(Path(cfg.out_dir).name, Path(cfg.out_dir).parent)
  train, heldout = load_corpus(max_bytes=cfg.corpus_bytes)
  max_len = max(max(cfg.prefill_lengths), cfg.decode_prompt + cfg.decode_tokens,
                cfg.peer_prompt + cfg.peer_tokens, cfg.decode_prompt + cfg.mirostat_tokens,
                cfg.train.seq_len)
  family_cfgs = {name: family_config(name, cfg.smoke, max_len) for name in cfg.families}
  rows, models, losses = [], {}, {}

  # 1. training and held-out bits per byte
  for name in cfg.families:
    impl = cfg.mamba_train_impl if name == "mamba" else "auto"
    model, params = build_model(name, family_cfgs[name], impl=impl, seed=cfg.seed)
    train_dir = out / "train" / name
    ckpts = train_dir / "checkpoints"
    reused = ckpts.exists() and CheckpointStore(ckpts).latest_step() == cfg.train.steps
    t0 = time.perf_counter()
    state, records = train_lm(model, params, train, cfg=cfg.train, out_dir=train_dir,
                              progress=cfg.progress)
    train_s = time.perf_counter() - t0
    model = with_impl(name, model, "auto")
    params = state["params"]
    bpb = bits_per_byte(model, params, heldout, seq_len=cfg.train.seq_len,
                        max_windows=cfg.eval_windows)
    models[name] = (model, params)
    losses[name] = [r["loss"] for r in records]
    rows.append(dict(study="train", family=name, params=param_count(params),
                     steps=cfg.train.steps, train_seconds=float("nan") if reused else train_s,
                     final_train_loss_bits=float(np.mean(losses[name][-20:])) / math.log(2),
                     heldout_bpb=bpb))
    print(f"{name}: {rows[-1]['params']:,} params, held-out {bpb:.3f} bits/byte "
          f"({'reused checkpoint' if reused else f'{train_s:.0f} s training'})", flush=True)

  # 2. prefill time, decode tokens/s, memory per sequence
  for name in tqdm(cfg.families, desc="speed", disable=not cfg.progress):
    model, params = models[name]
    for length in cfg.prefill_lengths:
      toks = jnp.asarray(heldout_prompts(heldout, 1, length, cfg.seed))
      lengths = jnp.full((1,), length, jnp.int32)
      fn = jax.jit(lambda p, t, lens: model.prefill(p, t, model.init_cache(1, t.shape[1]),
                                                    lens)[0][:, -1])
      secs = median_seconds(lambda: fn(params, toks, lengths), cfg.repeats)
      rows.append(dict(study="prefill", family=name, prompt=length, seconds=secs,
                       tok_s=length / secs))
    for b in cfg.decode_batches:
      prompts = heldout_prompts(heldout, b, cfg.decode_prompt, cfg.seed + b)
      key = jax.random.key(cfg.seed)
      secs = median_seconds(lambda: generate(model, params, prompts, key,
                                             max_new_tokens=cfg.decode_tokens).tokens,
                            cfg.repeats)
      rows.append(dict(study="decode", family=name, batch=b, prompt=cfg.decode_prompt,
                       new_tokens=cfg.decode_tokens, seconds=secs,
                       tok_s=b * cfg.decode_tokens / secs))
    for ctx in cfg.memory_contexts:
      shape_model = model
      if name == "transformer":  # only to read shapes: a cache this long is never allocated
        shape_model = dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                                            max_len=ctx))
      state_b, total_b = cache_bytes(shape_model, 1, ctx)
      rows.append(dict(study="memory", family=name, context=ctx, state_bytes=state_b,
                       cache_bytes=total_b))

  # 3. peers on the same converted weights
  rows += peer_study(cfg, family_cfgs, out, heldout)

  # 4. Mirostat with a trained model
  miro_rows, curves = mirostat_study(cfg, *models[cfg.mirostat_family], heldout)
  rows += miro_rows

  total = time.perf_counter() - t_start
  meta = dict(config=dataclasses.asdict(cfg), total_seconds=total,
              backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
              cpu_count=os.cpu_count(), jax_version=jax.__version__,
              train_bytes=int(len(train)), heldout_bytes=int(len(heldout)))
  write_report(out, rows, title="Language-model families at matched size", extra=meta,
               notes=_notes(cfg, total))
  (out / "report.md").write_text(_report(cfg, rows, total))
  plot_all(out, cfg, rows, losses, curves)
  print(f"\n{(out / 'report.md').read_text()}\nwrote {out}/ in {total:.0f} s")
  return rows


def _notes(cfg: Config, total: float) -> str:
  t = cfg.train
  return (f"Families: {', '.join(cfg.families)}; each trained {t.steps} steps of batch "
          f"{t.batch_size} x {t.seq_len} bytes on the stdlib corpus (AdamW, lr {t.learning_rate}). "
          f"Held-out bits per byte over {cfg.eval_windows} windows of {t.seq_len}. Timings are "
          f"medians of {cfg.repeats} repeats after a warm-up (compilation excluded). Whole run "
          f"{total:.0f} s on {jax.default_backend()} ({os.cpu_count()} CPU cores, shared).")


STUDY_COLUMNS = {
    "train": ["family", "params", "steps", "train_seconds", "final_train_loss_bits",
              "heldout_bpb"],
    "prefill": ["family", "prompt", "seconds", "tok_s"],
    "decode": ["family", "batch", "prompt", "new_tokens", "seconds", "tok_s"],
    "memory": ["family", "context", "state_bytes", "cache_bytes"],
    "peer": ["peer", "batch", "new_tokens", "jaxinf_tok_s", "peer_tok_s", "speedup",
             "greedy_agree", "first_divergence", "note"],
    "mirostat": ["sampler", "tau", "surprise_mean", "first_quarter", "last_quarter", "drift",
                 "abs_err_to_tau", "window_sd", "distinct_8grams"],
}

STUDY_TEXT = {
    "train": "Training (`train_seconds` nan: the finished checkpoint was reused) and held-out bits "
             "per byte (files held out whole).",
    "prefill": "Prefill (parallel form, batch 1, fresh cache), seconds per prompt.",
    "decode": "`generate` (greedy, one compiled while_loop), prefill of the prompt included; "
              "tok_s = batch x new_tokens / seconds.",
    "memory": "Bytes per sequence from `init_cache(1, context)` shapes: `state_bytes` is what "
              "decoding carries (KV cache or recurrent state); `cache_bytes` adds the per-position "
              "states kept for exact rollback of a k-token `step` (max_step = 8).",
    "peer": "Same converted weights (random, decisive scales), greedy, same prompts (held-out "
            "bytes), same number of new tokens, timed interleaved. transformers: `generate(..., "
            "do_sample=False, use_cache=True)`; rwkv package: `RWKV(..., 'cpu fp32')`, its "
            "`forward` with state, one token at a time, argmax in torch. `speedup` = jaxinf tok/s "
            "/ peer tok/s. `first_divergence`: per row, the first differing new token (-1: none).",
    "mirostat": "Observed surprise = -log2 p(token) under the model's untruncated distribution, "
                "averaged over rows; `first_quarter`/`last_quarter` of the generation; `drift` = "
                "last - first; `abs_err_to_tau` over the second half; `window_sd`: spread of the "
                "moving average; `distinct_8grams` near 1 means no loops.",
}


def _report(cfg: Config, rows: list[dict], total: float) -> str:
  text = "# Language-model families at matched size\n\n" + _notes(cfg, total) + "\n\n"
  for study, cols in STUDY_COLUMNS.items():
    sub = [r for r in rows if r["study"] == study]
    if sub:
      text += f"## {study}\n\n{STUDY_TEXT[study]}\n\n{markdown_table(sub, cols)}\n"
  return text


def plot_all(out: Path, cfg: Config, rows: list[dict], losses: dict, curves: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, ls in losses.items():
    ax.plot(np.arange(1, len(ls) + 1), np.asarray(ls) / math.log(2), label=name, lw=1)
  ax.set(xlabel="step", ylabel="train loss (bits/byte)", title="Training")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "loss.png", dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name in cfg.families:
    pre = [r for r in rows if r["study"] == "prefill" and r["family"] == name]
    axes[0].plot([r["prompt"] for r in pre], [r["seconds"] * 1e3 for r in pre], "o-", label=name)
    mem = [r for r in rows if r["study"] == "memory" and r["family"] == name]
    axes[1].plot([r["context"] for r in mem], [r["state_bytes"] for r in mem], "o-", label=name)
  axes[0].set(xscale="log", yscale="log", xlabel="prompt length", ylabel="prefill ms (batch 1)",
              title="Prefill time")
  axes[1].set(xscale="log", yscale="log", xlabel="context length",
              ylabel="decoding state bytes / sequence", title="Memory per sequence")
  for a in axes:
    a.legend()
  fig.tight_layout()
  fig.savefig(out / "prefill.png", dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in cfg.families:
    mem = [r for r in rows if r["study"] == "memory" and r["family"] == name]
    ax.plot([r["context"] for r in mem], [r["cache_bytes"] for r in mem], "o-", label=name)
  ax.set(xscale="log", yscale="log", xlabel="context length", ylabel="init_cache bytes / sequence",
         title="Whole cache (with rollback history)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "memory.png", dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  dec = [r for r in rows if r["study"] == "decode"]
  width = 0.8 / max(len(cfg.decode_batches), 1)
  for j, b in enumerate(cfg.decode_batches):
    vals = [next(r["tok_s"] for r in dec if r["family"] == n and r["batch"] == b)
            for n in cfg.families]
    ax.bar(np.arange(len(cfg.families)) + j * width, vals, width, label=f"batch {b}")
  ax.set_xticks(np.arange(len(cfg.families)) + width * (len(cfg.decode_batches) - 1) / 2,
                cfg.families)
  ax.set(ylabel="tokens / s", title="generate (greedy)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "decode.png", dpi=120)
  plt.close(fig)

  plot_mirostat(out / "mirostat.png", cfg, curves)


def plot_mirostat(path: Path, cfg: Config, curves: dict) -> None:
  """Moving average of the observed surprise per sampler, tau dotted in the same colour."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4.5))
  for (label, (tau, curve)), color in zip(curves.items(), plt.cm.tab10.colors):
    w = min(cfg.window, len(curve))
    ax.plot(np.arange(w, len(curve) + 1), moving_average(curve, w), color=color, label=label,
            lw=1)
    if tau is not None:
      ax.axhline(tau, color=color, ls=":", lw=0.8)
  ax.set(xlabel="generated token", ylabel=f"observed surprise, bits ({cfg.window}-token mean)",
         title=f"Mirostat vs top-k/top-p ({cfg.mirostat_family}, dotted: tau)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  run(tyro.cli(Config))


if __name__ == "__main__":
  main()
