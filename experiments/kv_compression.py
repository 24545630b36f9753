"""KV-cache compression on a trained byte-level code model: bits per byte and recall of a key
planted early in a long context, versus the cache budget, for StreamingLLM, H2O, SnapKV and D2O
(and int8 / fp8 KV storage).

    python -m experiments.kv_compression            # ~40 min on 2 cores (~31 of them training, once)
    python -m experiments.kv_compression --smoke    # tiny model, a few steps, about 15 s

The model is a ~0.8M-parameter transformer trained here (the checkpoint in `<out_dir>/train/` is
reused): first on copies alone (random bytes repeating with a random period, 16 x 128 bytes a step,
`copy_warmup_steps`), which forms induction heads, then on the stdlib's source in 512-byte windows
with copy data mixed in (`copy_windows`, `copy_spans`; `jaxinf.train.lm.CopyTask`). Trained on
code alone it does not learn to copy at all in this budget: recall 0 and ~7.5 bits per key digit,
worse than the 4 bits of a uniform guess over hex digits. Two measures, each through the
compressed cache
(`TransformerLM(kv_policy=KVPolicy(...))`, `jaxinf.models.kv_policies`):

* streamed bits per byte: `prefix` held-out bytes are prefilled, then `stream` more are fed one
  step at a time (teacher forcing, one compiled `lax.scan`), so decode-time eviction decides what
  every later byte sees; bits per byte of the streamed bytes;
* planted-key recall: `SECRET_KEY = 0x<key_len hex digits>` is planted before `context` bytes of
  held-out code and the prompt ends with `SECRET_KEY = 0x`; the prompt is prefilled (each policy
  compresses it once) and `generate` (greedy) continues it: exact recall of the whole key, and the
  key's bits per character under teacher forcing (a graded measure where recall is all-or-nothing).
  The key is a hex literal, not a string: planted as `SECRET_KEY = "<key>"`, this model's first
  digit after `= "` loses to the code prior of an empty string `""`, so exact recall is 0 for every
  cache, the uncompressed one included, and tells the policies apart nowhere; the report measures
  both plants on the uncompressed cache.

Writes `results/kv_compression/{results.json, report.md, meta.json, kv_compression.png}`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from jaxinf.data.stdlib_code import load_corpus
from jaxinf.decoding.generate import generate
from jaxinf.models.kv_policies import POLICIES, STORAGES, KVPolicy
from jaxinf.recipes import code_models

EVICTING = tuple(p for p in POLICIES if p != "none")


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/kv_compression"  # where results go (checkpoints in <out_dir>/train)
  hidden_size: int = 128           # the model (4 layers, 4 heads, 2 KV heads)
  num_layers: int = 4
  copy_warmup_steps: int = 4000    # copy-only warm-up (16 x 128 bytes a step) before the code
  train_steps: int = 1500          # of batch_size x seq_len bytes of code, copy data mixed in
  copy_windows: float = 0.25       # of the code windows replaced by random repeating bytes
  copy_spans: int = 2              # spans copied within each code window
  batch_size: int = 8
  seq_len: int = 512
  corpus_bytes: int | None = None  # None: the whole stdlib corpus
  budgets: tuple[int, ...] = (32, 64, 128, 256, 384)   # live KV slots per layer
  policies: tuple[str, ...] = EVICTING
  storages: tuple[str, ...] = ("int8", "float8_e4m3fn")  # no-eviction storage rows
  sinks: int = 4                   # StreamingLLM
  window: int = 16                 # SnapKV's observation window
  kernel: int = 5                  # SnapKV's pool
  rows: int = 32                   # held-out texts per measure
  prefix: int = 32                 # bytes prefilled before streaming
  stream: int = 480                # bytes streamed one step at a time
  context: int = 448               # held-out code bytes between the planted key and the query
  key_len: int = 8                 # hex digits of the planted key

  def check(self) -> None:
    super().check()
    common.check_ints(self, "hidden_size", "num_layers", "train_steps", "batch_size", "seq_len",
                      "rows", "prefix", "stream", "context", "key_len", "window", "kernel")
    common.check_ints(self, "sinks", "copy_warmup_steps", "copy_spans", low=0)
    common.check_with("copy_windows", lambda: lm_recipe(self))
    for name, values, known in (("policies", self.policies, EVICTING),
                                ("storages", self.storages, STORAGES)):
      bad = [v for v in values if v not in known]
      if bad:
        common.refuse(name, f"unknown {bad}; known: {list(known)}")
    if not self.budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                               for b in self.budgets):
      common.refuse("budgets", f"expected positive ints, got {self.budgets!r}")
    longest = max(self.prefix + self.stream, self.prompt_len + self.key_len)
    if max(self.budgets) > longest:
      common.refuse("budgets", f"{max(self.budgets)} exceeds the longest measured sequence "
                               f"({longest} bytes)")
    for policy in self.policies:   # the library's own checks of each policy's options
      for budget in self.budgets:
        common.check_with("budgets", lambda p=policy, b=budget: self.policy(p, b))

  @property
  def prompt_len(self) -> int:
    return max(len(line.format(key="0" * self.key_len)) + self.context + len(query)
               for line, query in PLANTS.values())

  def policy(self, policy: str, budget: int, storage: str = "native") -> KVPolicy:
    return KVPolicy(policy, budget=budget, sinks=self.sinks, window=self.window,
                    kernel=self.kernel, storage=storage)


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, hidden_size=32, num_layers=2, train_steps=3, batch_size=2, seq_len=64,
      copy_warmup_steps=min(cfg.copy_warmup_steps, 2),
      corpus_bytes=200_000, budgets=(24,), policies=("h2o", "d2o"), rows=2, prefix=8, stream=24,
      context=16, key_len=4, window=4, sinks=2, storages=(), out_dir=common.smoke_dir(cfg.out_dir)))


# the planted-key task's (planted line, the prompt's last bytes): "hex" is measured for every cache,
# "string" only as the uncompressed control of why it is not
PLANTS = {"hex": ("SECRET_KEY = 0x{key}\n", "\nSECRET_KEY = 0x"),
          "string": ('SECRET_KEY = "{key}"\n', '\nSECRET_KEY = "')}


def lm_recipe(cfg: Config) -> code_models.WindowLM:
  """The study's model: `code_models.copy_trained_lm` (warmed up on copies, trained on code with
  copy data mixed in, so that it can recall a planted key), long enough for every measured
  sequence; `experiments.quantization` quantizes the same recipe at the defaults."""
  return code_models.copy_trained_lm(
      hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
      max_len=max(cfg.prefix + cfg.stream, cfg.prompt_len + cfg.key_len),
      train_steps=cfg.train_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
      copy_windows=cfg.copy_windows, copy_spans=cfg.copy_spans,
      copy_warmup_steps=cfg.copy_warmup_steps)


def trained_model(cfg: Config, train: np.ndarray):
  """(model, params, records): trains (resuming) or reuses the checkpoint in `<out_dir>/train`."""
  return code_models.window_lm(lm_recipe(cfg), train, Path(cfg.out_dir) / "train",
                               progress=cfg.progress)


def recall_prompts(cfg: Config, heldout: np.ndarray, plant: str = "hex"):
  """([rows, T] prompts, [rows, key_len] keys) of the planted-key task (`PLANTS[plant]`); every
  plant gets the same keys and code."""
  line, query = PLANTS[plant]
  rng = np.random.default_rng(cfg.seed + 11)
  code = common.heldout_prompts(heldout, cfg.rows, cfg.context, cfg.seed + 5)
  prompts, keys = [], []
  for row in code:
    key = "".join(rng.choice(list("0123456789abcdef"), cfg.key_len))
    text = (line.format(key=key).encode() + bytes(row.astype(np.uint8).tolist())
            + query.encode())
    prompts.append(np.frombuffer(text, np.uint8))
    keys.append(np.frombuffer(key.encode(), np.uint8))
  return np.stack(prompts).astype(np.int32), np.stack(keys).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def teacher_forced(model, params, prompt, continuation):
  """Bits of each `continuation` [B, n] token after `prompt` [B, T] through the model's cache
  (prefill, then one step per token in a `lax.scan`), the argmax predictions, and the mean live
  KV slots per layer and KV head at the end."""
  b, t = prompt.shape
  n = continuation.shape[1]
  cache = model.init_cache(b, t + n)
  logits, cache = model.prefill(params, prompt, cache, jnp.full((b,), t, jnp.int32))

  def bits(logits, token):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0] / jnp.log(2.0)

  def body(carry, token):
    logits, cache = carry
    out = (bits(logits, token), jnp.argmax(logits, -1))
    logits, cache = model.step(params, token[:, None], cache)
    return (logits[:, 0], cache), out

  (_, cache), (b_tok, pred) = jax.lax.scan(body, (logits[:, -1], cache), continuation.T)
  if "pos" in cache:
    live = jnp.mean(jnp.sum(cache["pos"] >= 0, axis=3).astype(jnp.float32))  # [L, B, Hkv, S]
  else:
    live = jnp.mean(cache["length"].astype(jnp.float32))
  return b_tok.T, pred.T, live


def plant_control(cfg: Config, model, params, heldout) -> dict:
  """Each plant on the uncompressed cache: the share of first key digits teacher-forced argmax
  gets right, exact recall (every digit right) and bits per key digit."""
  out = {}
  for plant in PLANTS:
    prompts, keys = recall_prompts(cfg, heldout, plant)
    bits, pred, _ = teacher_forced(model, params, jnp.asarray(prompts), jnp.asarray(keys))
    pred = np.asarray(pred)
    out[plant] = {"first_digit_acc": float((pred[:, 0] == keys[:, 0]).mean()),
                  "recall": float((pred == keys).all(axis=1).mean()),
                  "key_bits_per_char": float(np.mean(bits))}
  return out


def kv_bytes(model, batch: int, max_len: int) -> int:
  """Bytes of one cache (every array `init_cache` allocates), from the arrays' shapes."""
  cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def measure(cfg: Config, model, params, stream_rows, recall, keys) -> dict:
  t0 = time.perf_counter()
  prefix, rest = stream_rows[:, :cfg.prefix], stream_rows[:, cfg.prefix:]
  s_bits, _, s_live = teacher_forced(model, params, jnp.asarray(prefix), jnp.asarray(rest))
  k_bits, k_pred, k_live = teacher_forced(model, params, jnp.asarray(recall), jnp.asarray(keys))
  out = generate(model, params, jnp.asarray(recall), jax.random.key(cfg.seed),
                 max_new_tokens=cfg.key_len)
  gen = np.asarray(out.tokens)
  exact = (gen == keys).all(axis=1)
  # greedy generation equals teacher-forced argmax exactly when every digit is right
  assert (exact == (np.asarray(k_pred) == keys).all(axis=1)).all(), "generate vs teacher forcing"
  return {"stream_bpb": float(np.mean(s_bits)), "key_bits_per_char": float(np.mean(k_bits)),
              "recall": float(exact.mean()), "key_char_acc": float((gen == keys).mean()),
              "live_slots_stream": float(s_live), "live_slots_recall": float(k_live),
              "kv_bytes": kv_bytes(model, 1, cfg.prefix + cfg.stream),
              "seconds": time.perf_counter() - t0}


COLUMNS = ["policy", "storage", "budget", "stream_bpb", "key_bits_per_char", "recall",
           "key_char_acc", "live_slots_stream", "live_slots_recall", "kv_bytes", "seconds"]


def claims(rows: list[dict]) -> list[str]:
  """The seed's claim "D2O beats H2O at the same budget", per budget and measure."""
  by = {(r["policy"], r["budget"]): r for r in rows if r["storage"] == "native"
        and r["budget"] is not None}
  lines = []
  for (policy, budget), d2o in sorted(by.items(), key=lambda kv: kv[0][1]):
    if policy != "d2o" or ("h2o", budget) not in by:
      continue
    h2o = by[("h2o", budget)]
    parts = []
    for name, better in (("stream_bpb", "lower"), ("key_bits_per_char", "lower"),
                         ("key_char_acc", "higher"), ("recall", "higher")):
      diff = d2o[name] - h2o[name]
      wins = diff < 0 if better == "lower" else diff > 0
      verdict = "agrees" if wins else ("ties" if diff == 0 else "disagrees")
      parts.append(f"{name} {d2o[name]:.4g} vs {h2o[name]:.4g} ({verdict}, by {abs(diff):.3g})")
    lines.append(f"- budget {budget}: " + "; ".join(parts))
  return lines


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out_dir = common.study_dir(cfg.out_dir)
  train, heldout = load_corpus(max_bytes=cfg.corpus_bytes)
  base, params, records = trained_model(cfg, train)
  stream_rows = common.heldout_prompts(heldout, cfg.rows, cfg.prefix + cfg.stream, cfg.seed + 3)
  recall, keys = recall_prompts(cfg, heldout)
  variants = [("full", "native", None, base)]
  variants += [("none", s, None, dataclasses.replace(base, kv_policy=KVPolicy(storage=s)))
               for s in cfg.storages]
  variants += [(p, "native", b, dataclasses.replace(base, kv_policy=cfg.policy(p, b)))
               for b in cfg.budgets for p in cfg.policies]
  if "int8" in cfg.storages and "h2o" in cfg.policies:   # the two options combined
    b = min(cfg.budgets)
    variants.append(("h2o", "int8", b,
                     dataclasses.replace(base, kv_policy=cfg.policy("h2o", b, "int8"))))
  rows = []
  for policy, storage, budget, model in tqdm(variants, desc="kv policies",
                                             disable=not cfg.progress):
    rows.append(dict(policy=policy, storage=storage, budget=budget,
                     **measure(cfg, model, params, stream_rows, recall, keys)))
  control = plant_control(cfg, base, params, heldout)
  hexk, string = control["hex"], control["string"]
  total = time.perf_counter() - t_start
  full = rows[0]
  worst = max(rows, key=lambda r: r["key_bits_per_char"])
  notes = "\n".join([
      (f"Model: {common.param_count(params):,}-parameter transformer ({cfg.num_layers} layers, "
      f"hidden {cfg.hidden_size}), {cfg.copy_warmup_steps} steps of 16 x 128 bytes of copies "
      f"alone, then {cfg.train_steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes of the "
      f"stdlib's source with copy data mixed in ({cfg.copy_windows:.0%} of windows random "
      f"repeats, {cfg.copy_spans} copied spans each; final train loss "
      f"{records[-1]['loss'] if records else float('nan'):.3f} nats)."),
      (f"`stream_bpb`: {cfg.rows} held-out texts, {cfg.prefix} bytes prefilled then {cfg.stream} "
      "streamed one step at a time through the compressed cache. `key_bits_per_char`, "
      f"`recall`, `key_char_acc`: {cfg.rows} prompts with a {cfg.key_len}-digit hex key planted "
      f"before {cfg.context} bytes of held-out code ({cfg.prompt_len} bytes in all), greedy "
      "`generate`. `live_slots_*`: mean live slots per layer and KV head at the end (D2O moves "
      "slots between layers). `kv_bytes`: one row's cache for the streamed length, from the "
      "arrays (D2O allocates min(2 x budget, length) physical slots per layer for its moving "
      "per-layer budgets, so about twice the bytes of the others at the same live budget). "
      f"Uncompressed: {full['stream_bpb']:.4f} bits/byte streamed, recall "
      f"{full['recall']:.2f}, {full['key_bits_per_char']:.3f} bits per key digit "
      "(log2 16 = 4 bits is a uniform guess over hex digits). The key's bits under teacher "
      "forcing are the graded measure of copying where exact recall of all "
      f"{cfg.key_len} digits is all-or-nothing: a cache that keeps the key's slots spends about "
      "the uncompressed bits on it, one that evicts them about those of a model that never "
      f"copies ({worst['key_bits_per_char']:.3f} for {worst['policy']} at budget "
      f"{worst['budget']}, the most). `key_char_acc`: the share of key digits greedy decoding "
      "gets right (a first wrong digit usually derails the rest)."),
      (f"Why a hex literal: on the uncompressed cache the first key digit after "
       f"`SECRET_KEY = 0x` is right in {hexk['first_digit_acc']:.0%} of the prompts (recall "
       f"{hexk['recall']:.2f}, {hexk['key_bits_per_char']:.3f} bits per digit); the same keys "
       f"and code planted as `SECRET_KEY = \"<key>\"` get {string['first_digit_acc']:.0%} of first "
       f"digits after `= \"` right (recall {string['recall']:.2f}, "
       f"{string['key_bits_per_char']:.3f} bits per digit): the code prior of an empty string "
       "wins there."),
      "", "Seed claim \"D2O beats H2O at the same budget\":", *claims(rows),
      "", f"Whole run {total:.0f} s on {jax.default_backend()}."])
  common.write_report(out_dir, rows, title="KV-cache compression: quality versus cache budget",
                      notes=notes, columns=COLUMNS,
                      extra={"config": dataclasses.asdict(cfg), "total_seconds": total,
                             "plant_control": control})
  plot(out_dir / "kv_compression.png", cfg, rows)
  common.print_report(out_dir, total)
  return rows


def plot(path: Path, cfg: Config, rows: list[dict]) -> None:
  """Streamed bits per byte and key bits per digit versus budget, a line per policy; the
  uncompressed model dotted."""
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(13, 4))
  full = rows[0]
  for ax, name, label in zip(axes, ("stream_bpb", "key_bits_per_char", "recall"),
                             ("streamed bits per byte", "key bits per digit", "exact recall")):
    for policy, color in zip(cfg.policies, plt.cm.tab10.colors):
      pts = sorted((r["budget"], r[name]) for r in rows
                   if r["policy"] == policy and r["storage"] == "native")
      if pts:
        ax.plot(*zip(*pts), "o-", color=color, label=policy)
    ax.axhline(full[name], color="k", ls=":", lw=1, label="uncompressed")
    ax.set(xscale="log", xlabel="KV budget (slots per layer)", ylabel=label)
    ax.minorticks_off()
    ax.set_xticks(list(cfg.budgets), [str(b) for b in cfg.budgets])
  axes[0].legend(fontsize=8)
  fig.suptitle("KV-cache compression on a byte-level code model")
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.cli(run, Config)
