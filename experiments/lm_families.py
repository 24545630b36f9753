"""Four language-model families at matched size: quality, speed, memory, and peers.

    python -m experiments.lm_families            # ~12 minutes on a 2-core CPU, compilation included
    python -m experiments.lm_families --smoke    # tiny models, well under a minute

It trains the softmax transformer, TransNormerLLM, RWKV-7 and Mamba (~1M parameters each, byte
vocabulary) on the Python standard library's own source for one fixed budget (same steps, batch and
window: `jaxinf.recipes.code_models.FamilyTraining`), or reuses the finished checkpoints in
`results/lm_families/train/<family>/` (which the decoding studies and `experiments.mirostat` reuse
too), and reports:

- held-out bits per byte (files held out whole, `jaxinf.data.stdlib_code`);
- prefill seconds against prompt length, and `generate` tokens/s at batch 1 and 8 (greedy);
- memory per sequence against context length, from `init_cache` shapes: the state decoding needs
  (a KV cache grows with the context, recurrent states don't) and the whole cache, which also holds
  the per-position states `step` keeps for exact rollback (speculative decoding);
- peers, side by side on the same converted weights (`jaxinf.recipes.lm_peers`: random, decisive
  scales; converted by `jaxinf.checkpoints`): jaxinf `generate` against transformers' `generate`
  (Llama, Mamba; greedy, `use_cache=True`) and the `rwkv` package's RWKV-7 (`cpu fp32`, its forward
  with state, token by token), greedy outputs compared token for token, tokens/s as ratios of
  medians.

Everything goes to `results/lm_families/`: `results.json` (every row, with its `study`),
`report.md` (a table per study), `meta.json`, and `loss.png`, `prefill.png`, `memory.png`,
`decode.png`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from jaxinf.data.stdlib_code import load_corpus
from jaxinf.decoding.generate import generate
from jaxinf.recipes import code_models, lm_peers
from jaxinf.train.lm import LMTrainConfig, bits_per_byte

_TRAINING = code_models.FamilyTraining()


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/lm_families"  # where results go
  families: tuple[str, ...] = code_models.FAMILIES
  # the family models' budget: `code_models.FamilyTraining` (other studies reuse the checkpoints)
  train: LMTrainConfig = _TRAINING.train
  mamba_train_impl: str = _TRAINING.mamba_train_impl  # the selective scan Mamba trains with
  corpus_bytes: int | None = None  # None: the whole stdlib corpus
  eval_windows: int = 128          # held-out windows of seq_len bytes for bits per byte
  prefill_lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  decode_prompt: int = 64
  decode_tokens: int = 256
  decode_batches: tuple[int, ...] = (1, 8)
  memory_contexts: tuple[int, ...] = (256, 1024, 4096, 16384, 65536)
  repeats: int = 3                 # timed repeats after a warm-up; medians are reported
  peers: tuple[str, ...] = lm_peers.PEERS
  peer_prompt: int = 32
  peer_tokens: int = 128
  peer_batches: tuple[int, ...] = (1, 8)

  def check(self) -> None:
    super().check()
    if not self.families:
      common.refuse("families", f"expected some of {list(code_models.FAMILIES)}, got ()")
    common.check_choices(self, "families", choices=code_models.FAMILIES)
    common.check_choices(self, "peers", choices=lm_peers.PEERS)
    common.check_choices(self, "mamba_train_impl", choices=code_models.KERNEL_IMPLS)
    common.check_ints(self, "corpus_bytes", "eval_windows", "prefill_lengths", "decode_prompt",
                      "decode_tokens", "decode_batches", "memory_contexts", "repeats",
                      "peer_prompt", "peer_tokens")
    if self.peers:
      common.check_ints(self, "peer_batches")


def training(cfg: Config) -> code_models.FamilyTraining:
  """The family models' training as `cfg` sets it; checkpoints in `<out_dir>/train/<family>/`."""
  return code_models.FamilyTraining(train=cfg.train, mamba_train_impl=cfg.mamba_train_impl,
                                    corpus_bytes=cfg.corpus_bytes, seed=cfg.seed,
                                    out_dir=cfg.out_dir, tiny=cfg.smoke)


def smoke_config(cfg: Config) -> Config:
  out_dir = common.smoke_dir(cfg.out_dir)
  smoke = code_models.smoke_training(training(cfg), out_dir)
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, train=smoke.train, corpus_bytes=smoke.corpus_bytes, eval_windows=4,
      prefill_lengths=(32,), decode_prompt=8, decode_tokens=8, decode_batches=(2,),
      memory_contexts=(64, 256), repeats=1, peer_prompt=8, peer_tokens=8, peer_batches=(1, 2),
      out_dir=out_dir))


def cache_bytes(model, batch: int, context: int) -> tuple[int, int]:
  """(state bytes, whole-cache bytes) of `init_cache(batch, context)`, from shapes alone; the
  state leaves out the entries that only serve rollback (`model.rollback_keys`)."""
  shapes = jax.eval_shape(lambda: model.init_cache(batch, context))
  nbytes = lambda tree: int(sum(math.prod(x.shape) * x.dtype.itemsize
                                for x in jax.tree.leaves(tree)))
  state = {k: v for k, v in shapes.items() if k not in model.rollback_keys + ("length",)}
  return nbytes(state), nbytes(shapes)


# --- peers: the same (converted) weights in jaxinf and in the original library ------------------

def peer_study(cfg: Config, max_len: int, out: Path, heldout: np.ndarray) -> list[dict]:
  rows = []
  for name in cfg.peers:
    family_cfg = code_models.family_config(lm_peers.PEER_FAMILY[name], cfg.smoke, max_len)
    peer, (model, params), batches = lm_peers.build_peer(name, family_cfg, out / "peers" / name,
                                                         cfg.seed + 1)
    library = lm_peers.PEER_LIBRARY[name]
    for b in cfg.peer_batches:
      if batches is not None and b not in batches:
        rows.append(dict(study="peer", peer=f"{library} {name}", batch=b,
                         note=f"{library} has no batched forward; not run"))
        continue
      prompts = common.heldout_prompts(heldout, b, cfg.peer_prompt, cfg.seed + b)
      key = jax.random.key(cfg.seed)
      ours_fn = lambda: np.asarray(generate(model, params, prompts, key,
                                            max_new_tokens=cfg.peer_tokens).tokens)
      peer_fn = lambda: peer(prompts, cfg.peer_tokens)
      mine, theirs = ours_fn(), peer_fn()
      secs = common.side_by_side({"jaxinf": ours_fn, "peer": peer_fn}, cfg.repeats)
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


# --- the run -----------------------------------------------------------------------------------

def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out = common.study_dir(cfg.out_dir)
  train, heldout = load_corpus(max_bytes=cfg.corpus_bytes)
  max_len = max(max(cfg.prefill_lengths), cfg.decode_prompt + cfg.decode_tokens,
                cfg.peer_prompt + cfg.peer_tokens, cfg.train.seq_len)
  rows, models, losses = [], {}, {}

  # 1. training and held-out bits per byte
  family_training = training(cfg)
  for name in cfg.families:
    reused = family_training.finished(name)
    t0 = time.perf_counter()
    model, params, records = code_models.family_model(name, family_training, train,
                                                      max_len=max_len, progress=cfg.progress)
    train_s = time.perf_counter() - t0
    bpb = bits_per_byte(model, params, heldout, seq_len=cfg.train.seq_len,
                        max_windows=cfg.eval_windows)
    models[name] = (model, params)
    losses[name] = [r["loss"] for r in records]
    rows.append(dict(study="train", family=name, params=common.param_count(params),
                     steps=cfg.train.steps, train_seconds=float("nan") if reused else train_s,
                     final_train_loss_bits=float(np.mean(losses[name][-20:])) / math.log(2),
                     heldout_bpb=bpb))
    print(f"{name}: {rows[-1]['params']:,} params, held-out {bpb:.3f} bits/byte "
          f"({'reused checkpoint' if reused else f'{train_s:.0f} s training'})", flush=True)

  # 2. prefill time, decode tokens/s, memory per sequence
  for name in tqdm(cfg.families, desc="speed", disable=not cfg.progress):
    model, params = models[name]
    for length in cfg.prefill_lengths:
      toks = jnp.asarray(common.heldout_prompts(heldout, 1, length, cfg.seed))
      lengths = jnp.full((1,), length, jnp.int32)
      fn = jax.jit(lambda p, t, lens: model.prefill(p, t, model.init_cache(1, t.shape[1]),
                                                    lens)[0][:, -1])
      secs = common.median_seconds(lambda: fn(params, toks, lengths), cfg.repeats)
      rows.append(dict(study="prefill", family=name, prompt=length, seconds=secs,
                       tok_s=length / secs))
    for b in cfg.decode_batches:
      prompts = common.heldout_prompts(heldout, b, cfg.decode_prompt, cfg.seed + b)
      key = jax.random.key(cfg.seed)
      secs = common.median_seconds(lambda: generate(model, params, prompts, key,
                                                    max_new_tokens=cfg.decode_tokens).tokens,
                                   cfg.repeats)
      rows.append(dict(study="decode", family=name, batch=b, prompt=cfg.decode_prompt,
                       new_tokens=cfg.decode_tokens, seconds=secs,
                       tok_s=b * cfg.decode_tokens / secs))
    for ctx in cfg.memory_contexts:
      shape_model = model
      if model.max_len is not None:  # only to read shapes: a cache this long is never allocated
        shape_model = dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                                            max_len=ctx))
      state_b, total_b = cache_bytes(shape_model, 1, ctx)
      rows.append(dict(study="memory", family=name, context=ctx, state_bytes=state_b,
                       cache_bytes=total_b))

  # 3. peers on the same converted weights
  rows += peer_study(cfg, max_len, out, heldout)

  total = time.perf_counter() - t_start
  meta = dict(config=dataclasses.asdict(cfg), total_seconds=total,
              backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
              cpu_count=os.cpu_count(), jax_version=jax.__version__,
              train_bytes=int(len(train)), heldout_bytes=int(len(heldout)))
  common.write_report(out, rows, title="Language-model families at matched size", extra=meta,
                      notes=_notes(cfg, total))
  (out / "report.md").write_text(_report(cfg, rows, total))
  plot_all(out, cfg, rows, losses)
  common.print_report(out, total)
  return rows


def _notes(cfg: Config, total: float) -> str:
  t = cfg.train
  return (f"Families: {', '.join(cfg.families)}; each trained {t.steps} steps of batch "
          f"{t.batch_size} x {t.seq_len} bytes on the stdlib corpus "
          f"(AdamW, lr {t.optimizer.learning_rate}). "
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
}


def _report(cfg: Config, rows: list[dict], total: float) -> str:
  text = "# Language-model families at matched size\n\n" + _notes(cfg, total) + "\n\n"
  for study, cols in STUDY_COLUMNS.items():
    sub = [r for r in rows if r["study"] == study]
    if sub:
      text += f"## {study}\n\n{STUDY_TEXT[study]}\n\n{common.markdown_table(sub, cols)}\n"
  return text


def plot_all(out: Path, cfg: Config, rows: list[dict], losses: dict) -> None:
  plt = common.pyplot()

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, ls in losses.items():
    ax.plot(np.arange(1, len(ls) + 1), np.asarray(ls) / math.log(2), label=name, lw=1)
  ax.set(xlabel="step", ylabel="train loss (bits/byte)", title="Training")
  ax.legend()
  common.save_figure(fig, out / "loss.png")

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
  common.save_figure(fig, out / "prefill.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in cfg.families:
    mem = [r for r in rows if r["study"] == "memory" and r["family"] == name]
    ax.plot([r["context"] for r in mem], [r["cache_bytes"] for r in mem], "o-", label=name)
  ax.set(xscale="log", yscale="log", xlabel="context length", ylabel="init_cache bytes / sequence",
         title="Whole cache (with rollback history)")
  ax.legend()
  common.save_figure(fig, out / "memory.png")

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
  common.save_figure(fig, out / "decode.png")


if __name__ == "__main__":
  common.cli(run, Config)
