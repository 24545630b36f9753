"""Decode speed side by side (issue 15, "Speed where it runs"): jaxinf, transformers and llama.cpp
on the same random Llama weights, greedy, in one run, against this machine's bandwidth roofline.

    python -m experiments.bench_decode                      # -> results/bench_decode/{results.json,
                                                            #    report.md, meta.json, bench_decode.png}
    python -m experiments.bench_decode --sizes llama-12m --repeats 5
    python -m experiments.bench_decode --smoke              # tiny model, 8 new tokens, seconds

One Llama-architecture model per size, random weights at decisive scales
(`jaxinf.recipes.lm_peers`: clear argmaxes, so greedy decoding is comparable token for token),
saved by transformers (`LlamaForCausalLM.save_pretrained`) and read from that folder by

- jaxinf: `jaxinf.checkpoints.transformers_lm.load_llama` (through `build_peer`), then
  `jaxinf.decoding.generate` (greedy; prefill + one compiled `while_loop`), fp32, its KV cache in
  fp16 as llama.cpp's is (`--kv-cache-dtype`, `TransformerConfig.cache_dtype`); int8 / int4
  weights through `jaxinf.quant.ptq.quantize_params` where that module exists (rows skipped, with
  the reason, where it does not; int8 one fp32 scale per output column, int4 one fp16 scale per
  32 inputs, Q4_0's storage): rows `int8` / `int4` take the XLA path (codes converted to fp32
  inside the step, an fp32 dot), rows `int8-ffi` / `int4-ffi` the hand-written CPU kernel
  (`QuantConfig(kernel="cpu_ffi")`, `jaxinf.quant.cpu_kernel`: codes widened in AVX-512 or AVX2
  registers, whichever the CPU has, fp32 activations; compiled on first use), row `float32-ffi`
  the fp32 weights unquantized through the same kernel (`jaxinf.quant.ptq.kernel_params`), rows
  `int8-a8-ffi` / `int4-a8-ffi` the same kernel with int8 activations (`act_format="int8"`, one
  scale per token; the integer dot on AVX-512 VNNI, or AVX2's vpmaddubsw + vpmaddwd), as
  llama.cpp's own Q8_0 / Q4_0 dots quantize the activations to Q8_0 (one scale
  per 32). The tied embedding / output head is
  quantized too, per token row at int8 in every low-bit row (`QuantConfig(embeddings=...)`, a
  `QEmbedding`: the lookup decodes the looked-up rows, the head is the low-bit product), as
  llama.cpp keeps it at 8 bits in its Q8_0 file and at 6 or 8 in its Q4_0 file;
- transformers: `LlamaForCausalLM.generate(do_sample=False, use_cache=True)` on torch CPU, fp32;
- llama.cpp through `llama-cpp-python` (the `bench` extra): the same folder converted by llama.cpp's
  own `convert_hf_to_gguf.py` at f32, then `llama_model_quantize` to Q8_0 and Q4_0 (its defaults,
  as `llama-quantize` would: the output / tied embedding matrix gets Q6_K in the Q4_0 file where
  its rows allow, else Q8_0; Q8_0 in the Q8_0 file; norms stay F32), flash attention off, `threads` threads, F16 KV cache (its default). Decoding is
  this module's loop over the low-level API: one `llama_decode` of all prompts (each row its own
  sequence id), then one `llama_decode` per step of a batch holding one token of every sequence —
  llama.cpp's batched decoding, as its `batched` example does — greedy as argmax of the logits.
  Built from the sdist (`pip install <sdist>`: `-DGGML_NATIVE=ON`, the CPU's own instruction
  sets); the report lists what each side ran (`llama_print_system_info`, `cpu_kernel.isa`). On an
  AMX-capable Xeon a native build puts Q8_0 / Q4_0 weights in the AMX buffer and segfaults in the
  first decode (llama.cpp issue 20824, open): build there with `CMAKE_ARGS="-DGGML_NATIVE=OFF
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
  -DGGML_AVX_VNNI=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"`. `convert_hf_to_gguf.py`
  ships only in llama-cpp-python's sdist (`vendor/llama.cpp`), not in its
  wheel nor in the `gguf` package; `--llama-cpp-src` (or `$LLAMA_CPP_SRC`, or
  `<sys.prefix>/src/llama.cpp`) names the folder holding it, its `conversion/` and `gguf-py/`. The
  converter needs a tokenizer: a synthetic Llama-style one (`<unk> <s> </s>`, the 256 byte-fallback
  tokens, fillers up to the vocabulary) is written beside the weights; only token ids are used.

Each size x batch: prompts of `prompt_len` random ids, `new_tokens` greedy tokens per row (no
EOS), every runtime warmed up (jaxinf compiles) and then timed round robin `repeats` times (load
from other processes hits all alike); tokens/s = batch x new_tokens / the median wall time of the
whole call (prefill included: one 32-token prefill is ~1 % of it). Greedy tokens are compared with
transformers' (or jaxinf fp32's where transformers is absent): `exact` when every token agrees, and
the mean share of each row before its first disagreement.

Roofline: the machine's read bandwidth measured in the same run (the best of a threaded numpy sum
and a jitted jnp.sum over fp32 arrays of each `bandwidth_mib` size, medians; the largest is DRAM's,
smaller ones may sit in the last-level cache). A shared host's DRAM bandwidth drifts within minutes
(31 to 46 GB/s on the 2-core EPYC of 2026-12-07), so the largest probe is read again after every
size and the roofline takes the median of those samples; the report lists them. Per row tokens/s
<= batch x bandwidth / (bytes
of weights read per step + batch x bytes of the KV cache read per step, at its mean length
prompt_len + new_tokens / 2). Weight bytes: fp32 4 per parameter, a GGUF file's tensors as stored,
jaxinf's quantized trees from their arrays; the embedding table counts when it is the (tied)
output head, else one row.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxinf.decoding.generate import generate
from jaxinf.models.transformer import TransformerConfig, transformer_config

RUNTIMES = ("jaxinf", "transformers", "llama.cpp")
GGUF_TYPES = ("f32", "q8_0", "q4_0")
JAXINF_WEIGHTS = ("float32", "float32-ffi", "int8", "int4", "int8-ffi", "int4-ffi", "int8-a8-ffi",
                  "int4-a8-ffi")
# which llama.cpp row each row is compared with (same weight width)
PEER_OF = {"float32": "f32", "float32-ffi": "f32", "f32": "f32", "int8": "q8_0", "q8_0": "q8_0",
           "int4": "q4_0", "q4_0": "q4_0", "int8-ffi": "q8_0", "int4-ffi": "q4_0",
           "int8-a8-ffi": "q8_0", "int4-a8-ffi": "q4_0"}

# Named sizes. llama-110m: llama2.c's stories110M shape (dim 768, 12 layers, 12 heads, SwiGLU
# 2048, Llama's 32000 vocabulary, tied head): 109.5M parameters, 438 MB in fp32.
# llama-12m: jaxinf's transformer-12m (the speculative-decoding target: GQA 6/2 heads, byte
# vocabulary, tied). llama-tiny: the smoke size (an untied head, to cover that path too).
SIZES: dict[str, TransformerConfig] = {
    "llama-110m": TransformerConfig(vocab_size=32000, hidden_size=768, num_layers=12,
                                    num_heads=12, num_kv_heads=12, mlp_hidden=2048,
                                    tie_embeddings=True, max_len=1024, norm_eps=1e-5),
    "llama-12m": transformer_config("transformer-12m"),
    "llama-tiny": TransformerConfig(vocab_size=259, hidden_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, mlp_hidden=192, tie_embeddings=False,
                                    max_len=512),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; then <0x00>..<0xFF>; then fillers


KV_CACHE_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/bench_decode"  # where results go
  sizes: tuple[str, ...] = ("llama-110m", "llama-12m")  # named sizes (SIZES)
  batches: tuple[int, ...] = (1, 8)
  prompt_len: int = 32
  new_tokens: int = 256
  repeats: int = 3                   # timing medians (round robin over the runtimes)
  runtimes: tuple[str, ...] = RUNTIMES
  gguf_types: tuple[str, ...] = GGUF_TYPES  # llama.cpp weight formats
  jaxinf_weights: tuple[str, ...] = JAXINF_WEIGHTS  # int8 / int4 need jaxinf.quant.ptq
  threads: int = 0                   # llama.cpp and torch threads (0: every core)
  llama_cpp_src: str = ""            # folder with convert_hf_to_gguf.py ("": $LLAMA_CPP_SRC or
                                     # <sys.prefix>/src/llama.cpp)
  bandwidth_mib: tuple[int, ...] = (32, 128, 512, 1024)  # read-bandwidth probe sizes (MiB)
  kernel_rows: tuple[int, ...] = (1, 8, 64, 65, 256)  # rows of x for the kernel-or-XLA table
  kv_cache_dtype: str = "float16"    # jaxinf's KV cache (`TransformerConfig.cache_dtype`):
                                     # float16 as llama.cpp's default F16 cache, or float32

  def check(self) -> None:
    super().check()
    common.check_choices(self, "sizes", choices=tuple(SIZES))
    common.check_choices(self, "runtimes", choices=RUNTIMES)
    common.check_choices(self, "gguf_types", choices=GGUF_TYPES)
    common.check_choices(self, "jaxinf_weights", choices=JAXINF_WEIGHTS)
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      common.refuse("kv_cache_dtype", f"expected one of {KV_CACHE_DTYPES}, got "
                    f"{self.kv_cache_dtype!r}")
    common.check_ints(self, "batches", "prompt_len", "new_tokens", "repeats", "bandwidth_mib",
                      "kernel_rows")
    common.check_ints(self, "threads", low=0)
    for name in ("sizes", "runtimes", "batches"):
      if not getattr(self, name):
        common.refuse(name, "expected at least one value, got ()")
    for size in self.sizes:
      if self.prompt_len + self.new_tokens > SIZES[size].max_len:
        common.refuse("new_tokens", f"prompt_len + new_tokens = "
                      f"{self.prompt_len + self.new_tokens} exceeds {size}'s context of "
                      f"{SIZES[size].max_len}")


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, out_dir=common.smoke_dir(cfg.out_dir), sizes=("llama-tiny",), prompt_len=8,
      new_tokens=8, repeats=1, bandwidth_mib=(8,), kernel_rows=(1, 65)))


def n_threads(cfg: Config) -> int:
  return cfg.threads or os.cpu_count() or 1


# --- what is installed --------------------------------------------------------------------------

def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def convert_script(cfg: Config) -> Path | None:
  """llama.cpp's `convert_hf_to_gguf.py`: `--llama-cpp-src`, `$LLAMA_CPP_SRC` or
  `<sys.prefix>/src/llama.cpp` (the first given one is the only one looked at)."""
  given = cfg.llama_cpp_src or os.environ.get("LLAMA_CPP_SRC", "")
  folder = Path(given) if given else Path(sys.prefix) / "src" / "llama.cpp"
  script = folder / "convert_hf_to_gguf.py"
  return script if script.is_file() else None


# jaxinf's low-bit rows: int8 one fp32 scale per output channel, int4 one fp16 scale per 32
# inputs (Q4_0's block: 4-bit codes and an fp16 scale per 32); the tied embedding / head table at
# int8 with one scale per token row in both (8 bits a weight; llama.cpp: Q8_0 in its Q8_0 file,
# 8.5 bits, and Q6_K, 6.56 bits, or Q8_0 in its Q4_0 file)
_TABLE = {"embeddings": (r"embed_tokens/embedding",), "embedding_format": "int8",
          "embedding_group_size": None}
_INT8 = {"format": "int8", "group_size": None, **_TABLE}
_INT4 = {"format": "int4", "group_size": 32, "scale_dtype": "float16", **_TABLE}
JAXINF_QUANT = {"int8": _INT8,
                "int4": _INT4,
                "int8-ffi": {**_INT8, "kernel": "cpu_ffi"},
                "int4-ffi": {**_INT4, "kernel": "cpu_ffi"},
                # int8 activations (one scale per token) and the integer dot (VNNI or AVX2), as
                # llama.cpp's Q8_0 / Q4_0 dots quantize activations to Q8_0 (a scale per 32)
                "int8-a8-ffi": {**_INT8, "kernel": "cpu_ffi", "act_format": "int8"},
                "int4-a8-ffi": {**_INT4, "kernel": "cpu_ffi", "act_format": "int8"}}


def quantizer():
  """fn(params, weights name) -> quantized params through `jaxinf.quant.ptq.quantize_params`
  (its default selection, every `kernel`, plus the tied embedding table; an untied head would stay
  fp32), or None while that module does not exist."""
  if not _installed("jaxinf.quant.ptq"):
    return None
  from jaxinf.quant import ptq
  if not hasattr(ptq, "quantize_params"):
    return None

  def quantize(params, weights: str):
    if weights == "float32-ffi":  # not quantized: the fp32 weights stored for the CPU kernel
      qparams, _ = ptq.kernel_params(params, embeddings=_TABLE["embeddings"])
    else:
      qparams, _ = ptq.quantize_params(params, ptq.QuantConfig(**JAXINF_QUANT[weights]))
    return qparams
  return quantize


def available(cfg: Config) -> tuple[list[str], dict[str, str]]:
  """(runtimes that will run, {runtime or row: why it is skipped})."""
  run, skipped = [], {}
  for name in cfg.runtimes:
    if name in ("transformers", "llama.cpp") and not (_installed("torch")
                                                      and _installed("transformers")):
      # the weights come from transformers' folder, which llama.cpp's converter reads too
      skipped[name] = "torch / transformers not installed (the parity extra)"
    elif name == "llama.cpp" and not _installed("llama_cpp"):
      skipped[name] = "llama-cpp-python not installed (pip install -e '.[bench]')"
    elif name == "llama.cpp" and convert_script(cfg) is None:
      skipped[name] = ("convert_hf_to_gguf.py not found: it ships in llama-cpp-python's sdist "
                       "(vendor/llama.cpp); extract that folder to <sys.prefix>/src/llama.cpp "
                       "or pass --llama-cpp-src")
    elif name == "llama.cpp" and not _installed("sentencepiece"):
      skipped[name] = "sentencepiece not installed (convert_hf_to_gguf.py imports it)"
    else:
      run.append(name)
  if "jaxinf" in run and quantizer() is None:
    for w in cfg.jaxinf_weights:
      if w != "float32":
        skipped[f"jaxinf {w}"] = "jaxinf.quant.ptq.quantize_params does not exist yet"
  return run, skipped


# --- the machine's read bandwidth -----------------------------------------------------------------

def _median(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


KERNEL_ROW_WEIGHTS = ("float32-ffi", "int8-ffi", "int8-a8-ffi", "int4-ffi", "int4-a8-ffi")


def kernel_or_xla(cfg: Config, size: str, repeats: int = 7) -> list[dict]:
  """The hand-written CPU kernel against XLA's form of the same product, by rows of x: the
  model's MLP up-projection `[hidden, mlp_hidden]` in each kernel weight kind, x @ W timed
  through `cpu_kernel.lowbit_matmul` (the kernel layout) and through the XLA path (`kernel=None`
  QArray, or the fp32 dot), medians; `chosen` is what `QArray @` runs (`cpu_kernel.use_kernel`).
  Empty where the kernel cannot be built or quantize_params does not exist."""
  from jaxinf.quant import cpu_kernel, ptq

  try:
    cpu_kernel.load()
  except cpu_kernel.KernelUnavailableError as e:
    print(f"kernel-or-XLA table skipped: {e}", flush=True)
    return []
  c = SIZES[size]
  k, n = c.hidden_size, c.mlp_hidden
  rng = np.random.default_rng(cfg.seed)
  w = jnp.asarray(rng.normal(size=(k, n)) * k**-0.5, jnp.float32)
  rows = []
  for weights in KERNEL_ROW_WEIGHTS:
    if weights == "float32-ffi":
      fast = ptq.kernel_params({"w": {"kernel": w}})[0]["w"]["kernel"]
      xla_w, data, scale, gs, a8 = w, fast.data, jnp.ones((1, n), jnp.float32), k, False
    else:
      options = {key: v for key, v in JAXINF_QUANT[weights].items() if key not in _TABLE}
      fast = ptq.quantize_params({"w": {"kernel": w}}, ptq.QuantConfig(**options))[0]["w"]["kernel"]
      options.pop("kernel")
      xla_w = ptq.quantize_params({"w": {"kernel": w}}, ptq.QuantConfig(**options))[0]["w"]["kernel"]
      data, scale, gs = fast.data, fast.scale, fast.group_size
      a8 = fast.act_format is not None
    kernel = jax.jit(lambda x, d, s, gs=gs, a8=a8: cpu_kernel.lowbit_matmul(
        x, d, s, k=k, group_size=gs, act_int8=a8))
    xla = jax.jit(lambda x, q: x @ q)
    for m in cfg.kernel_rows:
      x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
      t_kernel = _median(lambda: kernel(x, data, scale).block_until_ready(), repeats)
      t_xla = _median(lambda: xla(x, xla_w).block_until_ready(), repeats)
      rows.append({"weights": weights, "rows": m, "shape": f"{k} x {n}",
                   "kernel_ms": t_kernel * 1e3, "xla_ms": t_xla * 1e3,
                   "xla_over_kernel": t_xla / t_kernel,
                   "chosen": "kernel" if cpu_kernel.use_kernel(m, codes=weights != "float32-ffi")
                   else "xla"})
  return rows


def read_bandwidth(mib: int, threads: int, repeats: int = 5) -> dict:
  """Bytes/s of reading an fp32 array of `mib` MiB: a numpy sum split over `threads` threads
  (numpy releases the GIL in reductions) and a jitted `jnp.sum` (XLA's own threads); the better
  of the two is the machine's."""
  n = mib * 2**20 // 4
  x = np.ones(n, np.float32)
  chunks = np.array_split(x, threads)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    numpy_s = _median(lambda: list(pool.map(np.sum, chunks)), repeats)
  xj = jnp.asarray(x)
  total = jax.jit(jnp.sum)
  jax_s = _median(lambda: total(xj).block_until_ready(), repeats)
  return {"mib": mib, "numpy_gbps": x.nbytes / numpy_s / 1e9, "jax_gbps": x.nbytes / jax_s / 1e9,
          "gbps": x.nbytes / min(numpy_s, jax_s) / 1e9}


# --- weights and their bytes per step -------------------------------------------------------------

def param_count(c: TransformerConfig) -> int:
  attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.hidden_size * c.mlp_hidden
  head = 0 if c.tie_embeddings else c.vocab_size * c.hidden_size
  return (c.num_layers * (attn + mlp + 2 * c.hidden_size) + c.vocab_size * c.hidden_size + head
          + c.hidden_size)


def fp32_bytes_per_step(c: TransformerConfig) -> int:
  """fp32 weight bytes one decode step reads: everything, but one row of an untied embedding."""
  read = param_count(c) - (0 if c.tie_embeddings else (c.vocab_size - 1) * c.hidden_size)
  return 4 * read


def kv_bytes_per_row(c: TransformerConfig, context: float, itemsize: int) -> float:
  """KV-cache bytes one step reads per row at `context` cached positions (every layer's K and V)."""
  return c.num_layers * 2 * c.num_kv_heads * c.head_dim * itemsize * context


def gguf_bytes_per_step(path: Path) -> tuple[int, dict[str, int]]:
  """(bytes of the tensors one step reads, {ggml type name: tensor count}) of a GGUF file: every
  tensor as stored, but the embedding table when an output matrix of its own exists."""
  from gguf import GGUFReader

  tensors = GGUFReader(str(path)).tensors
  names = {t.name for t in tensors}
  types: dict[str, int] = {}
  total = 0
  for t in tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if t.name == "token_embd.weight" and "output.weight" in names:
      total += int(t.n_bytes) // int(t.shape[-1])  # one row
    else:
      total += int(t.n_bytes)
  return total, types


def tree_bytes_per_step(params, c: TransformerConfig) -> int:
  """Bytes of a (possibly quantized) jaxinf parameter tree from its arrays, less the untied
  embedding table but one row."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total = 0
  for path, leaf in leaves:
    key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    if "embed_tokens" in key and not c.tie_embeddings:
      nbytes //= c.vocab_size
    total += nbytes
  return total


# --- the weights: transformers' folder, a tokenizer for llama.cpp's converter ---------------------

def write_tokenizer(folder: Path, vocab_size: int) -> None:
  """A Llama-style (SentencePiece-like BPE with byte fallback) tokenizer of `vocab_size` ids, in
  transformers' files: what `convert_hf_to_gguf.py` reads (its `LlamaHfVocab`). No merges: the
  benchmark feeds token ids, text never goes through it."""
  from tokenizers import Tokenizer, decoders, models

  if vocab_size < len(SPECIAL_TOKENS) + 256:
    raise ValueError(f"vocab_size: expected >= {len(SPECIAL_TOKENS) + 256} (specials and the "
                     f"byte-fallback tokens), got {vocab_size}")
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  vocab.update({f"<0x{b:02X}>": len(SPECIAL_TOKENS) + b for b in range(256)})
  vocab.update({f"\u2581t{i}": i for i in range(len(vocab), vocab_size)})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True,
                             fuse_unk=True))
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
      "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False}))


def convert_to_gguf(script: Path, folder: Path, out: Path) -> None:
  """llama.cpp's converter, f32, in a subprocess (it imports its own copy of `gguf`)."""
  done = subprocess.run([sys.executable, str(script), str(folder), "--outtype", "f32",
                         "--outfile", str(out)], check=False, capture_output=True,
                         text=True)
  if done.returncode != 0 or not out.is_file():
    raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-3000:]}")


# --- runtimes ------------------------------------------------------------------------------------

_LOG_CALLBACK = None


def _quiet_llama_cpp():
  """llama.cpp's log (model loading, context sizes) off; the callback must outlive the process."""
  global _LOG_CALLBACK
  import llama_cpp as lc

  if _LOG_CALLBACK is None:
    _LOG_CALLBACK = lc.llama_log_callback(lambda level, text, data: None)
    lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    lc.llama_backend_init()
  return lc


def quantize_gguf(src: Path, dst: Path, kind: str, threads: int) -> None:
  """`llama_model_quantize` with its default parameters (as `llama-quantize src dst TYPE`)."""
  lc = _quiet_llama_cpp()
  ftype = {"q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
  params = lc.llama_model_quantize_default_params()
  params.ftype = ftype
  params.nthread = threads
  if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
    raise RuntimeError(f"llama_model_quantize {kind} of {src} failed")


class LlamaCpp:
  """Greedy batched decoding over llama.cpp's low-level API: `batch` sequences in one context
  (a KV cache of `context` positions per sequence), flash attention off."""

  def __init__(self, path: Path, batch: int, prompt_len: int, context: int, threads: int):
    lc = self.lc = _quiet_llama_cpp()
    self.model = lc.llama_model_load_from_file(str(path).encode(),
                                               lc.llama_model_default_params())
    if not self.model:
      raise RuntimeError(f"llama.cpp could not load {path}")
    cp = lc.llama_context_default_params()
    cp.n_ctx = batch * context
    cp.n_batch = cp.n_ubatch = max(batch * prompt_len, 512)
    cp.n_seq_max = batch
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.no_perf = True
    self.ctx = lc.llama_init_from_model(self.model, cp)
    if not self.ctx:
      raise RuntimeError(f"llama.cpp could not make a context for {path}")
    self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
    self.batch = lc.llama_batch_init(batch * prompt_len, 0, 1)
    self.size = batch * prompt_len

  def _argmax(self, i: int) -> int:
    logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), (self.n_vocab,))
    return int(np.argmax(logits))

  def _decode(self, entries) -> None:
    """entries: (token, position, sequence, wants logits)."""
    b = self.batch
    for i, (tok, pos, seq, out) in enumerate(entries):
      b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
      b.seq_id[i][0] = seq
    b.n_tokens = len(entries)
    rc = self.lc.llama_decode(self.ctx, b)
    if rc != 0:
      raise RuntimeError(f"llama_decode returned {rc}")

  def __call__(self, prompts: np.ndarray, n: int) -> np.ndarray:
    bsz, t = prompts.shape
    if bsz * t > self.size:
      raise ValueError(f"prompts: {bsz} x {t} tokens exceed the batch of {self.size}")
    self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
    self._decode([(int(prompts[r, p]), p, r, p == t - 1) for r in range(bsz) for p in range(t)])
    out = np.empty((bsz, n), np.int32)
    out[:, 0] = [self._argmax(r * t + t - 1) for r in range(bsz)]
    for s in range(1, n):
      self._decode([(int(out[r, s - 1]), t + s - 1, r, True) for r in range(bsz)])
      out[:, s] = [self._argmax(r) for r in range(bsz)]
    return out

  def close(self) -> None:
    self.lc.llama_batch_free(self.batch)
    self.lc.llama_free(self.ctx)
    self.lc.llama_model_free(self.model)


def jaxinf_runner(model, params, seed: int):
  key = jax.random.key(seed)

  def run(prompts: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(generate(model, params, jnp.asarray(prompts), key,
                               max_new_tokens=n).tokens)
  return run


# --- the study -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
  runtime: str
  weights: str
  fn: object            # fn(prompts [B, T], n) -> tokens [B, n]
  weight_bytes: int     # read per decode step
  kv_itemsize: int
  note: str = ""
  warm_full: bool = False  # the warm-up must decode every token (a compiled length)
  path: Path | None = None  # llama.cpp: the GGUF file (a context is made per batch)
  close: object = None


def build_entries(cfg: Config, size: str, runtimes: list[str], folder: Path,
                  skipped: dict[str, str]) -> list[Entry]:
  from jaxinf.recipes.lm_peers import build_peer  # torch: only with the parity extra

  c = SIZES[size]
  threads = n_threads(cfg)
  entries: list[Entry] = []
  if "transformers" in runtimes or "llama.cpp" in runtimes:
    import torch

    torch.set_num_threads(threads)
    peer, (model, params), _ = build_peer("llama", c, folder, cfg.seed)
  else:  # jaxinf alone: the same initialisation, without the torch round trip
    from jaxinf.models.transformer import TransformerLM
    model = TransformerLM(c)
    params = model.init_params(cfg.seed)
    peer = None
  if "jaxinf" in runtimes:
    quantize = quantizer()
    kv_size = np.dtype(cfg.kv_cache_dtype).itemsize
    model = dataclasses.replace(model, config=dataclasses.replace(
        model.config, cache_dtype=cfg.kv_cache_dtype))
    for w in cfg.jaxinf_weights:
      if w == "float32":
        entries.append(Entry("jaxinf", w, jaxinf_runner(model, params, cfg.seed),
                             fp32_bytes_per_step(c), kv_size, warm_full=True))
      elif quantize is not None:
        try:
          qparams = quantize(params, w)
        except Exception as e:  # noqa: BLE001 - a library in progress: say why, time the rest
          skipped[f"jaxinf {w}"] = f"quantize_params failed: {type(e).__name__}: {e}"
          print(f"skipped jaxinf {w}: {skipped[f'jaxinf {w}']}", flush=True)
          continue
        entries.append(Entry("jaxinf", w, jaxinf_runner(model, qparams, cfg.seed),
                             tree_bytes_per_step(qparams, c), kv_size, warm_full=True))
  if "transformers" in runtimes:
    entries.append(Entry("transformers", "float32", peer, fp32_bytes_per_step(c), 4))
  if "llama.cpp" in runtimes:
    write_tokenizer(folder, c.vocab_size)
    f32 = folder / "model-f32.gguf"
    convert_to_gguf(convert_script(cfg), folder, f32)
    for kind in cfg.gguf_types:
      path = f32 if kind == "f32" else folder / f"model-{kind}.gguf"
      if kind != "f32":
        quantize_gguf(f32, path, kind, threads)
      nbytes, types = gguf_bytes_per_step(path)
      entries.append(Entry("llama.cpp", kind, None, nbytes, 2, path=path,
                           note=", ".join(f"{n} {k}" for k, n in sorted(types.items()))))
  return entries


def agreement(tokens: np.ndarray, ref: np.ndarray) -> tuple[bool, float]:
  """(every token equal, mean share of each row before its first disagreement)."""
  same = tokens == ref
  first = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
  return bool(same.all()), float(np.mean(first / same.shape[1]))


def time_round_robin(fns: dict[str, object], warm: dict[str, int], prompts: np.ndarray, n: int,
                     repeats: int) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
  """Warm-up call of each (`warm[name]` tokens), then `repeats` rounds timing each in turn;
  returns every time and the tokens of the first timed call."""
  for name, fn in fns.items():
    fn(prompts, warm[name])
  times: dict[str, list[float]] = {k: [] for k in fns}
  tokens: dict[str, np.ndarray] = {}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      out = fn(prompts, n)
      times[name].append(time.perf_counter() - t0)
      tokens.setdefault(name, np.asarray(out))
  return times, tokens


def load_note() -> str:
  """The 1-minute load average and the busiest other processes (the 2 cores are shared)."""
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  try:
    top = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], check=False,
                         capture_output=True, text=True, timeout=10).stdout.splitlines()[1:6]
  except (OSError, subprocess.SubprocessError):
    top = []
  me = str(os.getpid())
  busy = [" ".join(line.split()[2:])[:80] + f" ({line.split()[1]}% CPU)" for line in top
          if line.split() and line.split()[0] != me and float(line.split()[1]) > 5.0]
  return f"load average {load:.2f}" + (f"; other processes: {'; '.join(busy)}" if busy else "")


def run_size(cfg: Config, size: str, runtimes: list[str], skipped: dict[str, str],
             bw_curve: list[dict], progress: bool) -> list[dict]:
  c = SIZES[size]
  rows: list[dict] = []
  rng = np.random.default_rng(cfg.seed)
  all_prompts = rng.integers(len(SPECIAL_TOKENS), c.vocab_size,
                             (max(cfg.batches), cfg.prompt_len)).astype(np.int32)
  context = cfg.prompt_len + cfg.new_tokens
  mean_ctx = cfg.prompt_len + cfg.new_tokens / 2
  with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
    entries = build_entries(cfg, size, runtimes, Path(tmp), skipped)
    for batch in cfg.batches:
      prompts = all_prompts[:batch]
      fns, warm, by_name = {}, {}, {}
      for e in entries:
        name = f"{e.runtime} {e.weights}"
        fn = e.fn
        if e.runtime == "llama.cpp":
          fn = LlamaCpp(e.path, batch, cfg.prompt_len, context, n_threads(cfg))
          e.close = fn.close
        fns[name], by_name[name] = fn, e
        warm[name] = cfg.new_tokens if e.warm_full else min(cfg.new_tokens, 8)
      if progress:
        print(f"{size} batch {batch}: timing {', '.join(fns)} ({cfg.repeats} rounds; "
              f"{load_note()})", flush=True)
      times, tokens = time_round_robin(fns, warm, prompts, cfg.new_tokens, cfg.repeats)
      for e in entries:
        if e.close is not None:
          e.close()
          e.close = None
      ref_name = "transformers float32" if "transformers float32" in tokens else (
          "jaxinf float32" if "jaxinf float32" in tokens else None)
      secs = {k: statistics.median(v) for k, v in times.items()}
      tps = {k: batch * cfg.new_tokens / s for k, s in secs.items()}
      for name, e in by_name.items():
        kv = kv_bytes_per_row(c, mean_ctx, e.kv_itemsize)
        step_bytes = e.weight_bytes + batch * kv
        cache_bw = _bandwidth_at(bw_curve, step_bytes)
        peer = f"llama.cpp {PEER_OF[e.weights]}"
        exact, share = (None, None) if ref_name in (None, name) else agreement(tokens[name],
                                                                               tokens[ref_name])
        rows.append({
            "size": size, "params_m": param_count(c) / 1e6, "batch": batch,
            "runtime": e.runtime, "weights": e.weights, "tokens_per_s": tps[name],
            "seconds": secs[name], "times": times[name],
            "vs_llama_cpp": tps[name] / tps[peer] if peer in tps else None,
            "weight_mb": e.weight_bytes / 1e6, "kv_mb_per_row": kv / 1e6,
            "step_bytes": step_bytes, "roofline_tok_s": None, "of_roofline": None,  # set by run
            "cache_roofline_tok_s": batch * cache_bw / step_bytes if cache_bw else None,
            "agrees_with": ref_name if ref_name not in (None, name) else None,
            "exact": exact, "agree_prefix": share, "note": e.note,
        })
  return rows


def apply_roofline(rows: list[dict], bandwidth: float) -> None:
  """`roofline_tok_s` = batch x `bandwidth` / the row's bytes per step, and `of_roofline`."""
  for r in rows:
    r["roofline_tok_s"] = r["batch"] * bandwidth / r["step_bytes"]
    r["of_roofline"] = r["tokens_per_s"] / r["roofline_tok_s"]


def _bandwidth_at(curve: list[dict], nbytes: float) -> float | None:
  """The read bandwidth measured at the smallest probe size >= `nbytes` (else the largest)."""
  if not curve:
    return None
  fits = [p for p in curve if p["mib"] * 2**20 >= nbytes]
  return (min(fits, key=lambda p: p["mib"]) if fits else max(curve, key=lambda p: p["mib"])
          )["gbps"] * 1e9


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out = common.study_dir(cfg.out_dir)
  runtimes, skipped = available(cfg)
  for name, why in skipped.items():
    print(f"skipped {name}: {why}", flush=True)
  threads = n_threads(cfg)
  before = load_note()
  bw_curve = [read_bandwidth(m, threads) for m in sorted(cfg.bandwidth_mib)]
  dram = max(bw_curve, key=lambda p: p["mib"])  # the largest probe: DRAM's
  if cfg.progress:
    print("read bandwidth: " + ", ".join(f"{p['mib']} MiB {p['gbps']:.1f} GB/s"
                                         for p in bw_curve), flush=True)
  samples = [dram["gbps"]]  # DRAM bandwidth drifts on a shared host: sampled again after each size
  rows = []
  for size in cfg.sizes:
    rows += run_size(cfg, size, runtimes, skipped, bw_curve, cfg.progress)
    samples.append(read_bandwidth(dram["mib"], threads)["gbps"])
  bandwidth = statistics.median(samples) * 1e9
  apply_roofline(rows, bandwidth)
  kernel_rows = (kernel_or_xla(cfg, cfg.sizes[0])
                 if "jaxinf" in runtimes and quantizer() is not None else [])
  after = load_note()
  meta = {"config": dataclasses.asdict(cfg), "runtimes": runtimes, "skipped": skipped,
          "kernel_or_xla": kernel_rows,
          "bandwidth_gbps": bandwidth / 1e9, "bandwidth_curve": bw_curve,
          "dram_samples_gbps": samples, "threads": threads,
          "load_before": before, "load_after": after, "versions": versions(runtimes),
          "cpu": cpu_name(), "isa": isa_note(runtimes), "seconds": time.perf_counter() - t_start}
  write_outputs(out, cfg, rows, meta)
  common.print_report(out, time.perf_counter() - t_start)
  return rows


def write_outputs(out: Path, cfg: Config, rows: list[dict], meta: dict) -> None:
  """results.json, meta.json, report.md (the side-by-side summary, then every row) and the plot."""
  side = summary(rows)
  common.write_report(out, rows, title="Decode speed: jaxinf, transformers, llama.cpp",
                      notes=report_notes(cfg, rows, meta) + "\n\n## Side by side (tokens/s)\n\n"
                      + common.markdown_table(side, list(dict.fromkeys(k for r in side for k in r)))
                      + kernel_section(meta["kernel_or_xla"])
                      + "\n## Every row",
                      columns=COLUMNS, extra=meta)
  plot(rows, out / "bench_decode.png")


def kernel_section(rows: list[dict]) -> str:
  if not rows:
    return ""
  return ("\n## Kernel or XLA, by rows of x (ms per product)\n\n"
          f"The MLP up-projection ({rows[0]['shape']}) through the hand-written kernel and "
          "through XLA's form of the same product (the `kernel=None` QArray path: codes converted "
          "inside the step, grouped or integer dots; the fp32 dot for fp32 weights), medians of 7 "
          "after a warm-up. `chosen`: what `QArray @` runs at that many rows "
          "(`jaxinf.quant.cpu_kernel.use_kernel`; prefill passes batch x prompt rows).\n\n"
          + common.markdown_table(rows, ["weights", "rows", "kernel_ms", "xla_ms",
                                         "xla_over_kernel", "chosen"]))


def summary(rows: list[dict]) -> list[dict]:
  """One line per size and batch: tokens/s of every runtime and width, jaxinf / llama.cpp at
  each width, and the fp32 DRAM roofline."""
  table = []
  for size, batch in sorted({(r["size"], r["batch"]) for r in rows},
                            key=lambda p: (-SIZES[p[0]].hidden_size, p[1])):
    sel = {f"{r['runtime']} {r['weights']}": r for r in rows
           if r["size"] == size and r["batch"] == batch}
    line = {"size": size, "batch": batch}
    for name in ("jaxinf float32", "jaxinf float32-ffi", "transformers float32", "llama.cpp f32",
                 "jaxinf int8",
                 "jaxinf int8-ffi", "jaxinf int8-a8-ffi", "llama.cpp q8_0", "jaxinf int4",
                 "jaxinf int4-ffi", "jaxinf int4-a8-ffi", "llama.cpp q4_0"):
      if name in sel:
        line[name] = sel[name]["tokens_per_s"]
    for ours in ("jaxinf float32", "jaxinf float32-ffi", "jaxinf int8", "jaxinf int4",
                 "jaxinf int8-ffi",
                 "jaxinf int4-ffi", "jaxinf int8-a8-ffi", "jaxinf int4-a8-ffi"):
      if ours in sel and sel[ours]["vs_llama_cpp"] is not None:
        line[f"{ours.split()[1]}: jaxinf / llama.cpp"] = sel[ours]["vs_llama_cpp"]
    fp32 = sel.get("jaxinf float32") or sel.get("transformers float32")
    if fp32 is not None:
      line["fp32 roofline"] = fp32["roofline_tok_s"]
    table.append(line)
  return table


COLUMNS = ["size", "batch", "runtime", "weights", "tokens_per_s", "vs_llama_cpp", "weight_mb",
           "roofline_tok_s", "of_roofline", "cache_roofline_tok_s", "exact", "agree_prefix",
           "note"]


def versions(runtimes: list[str]) -> dict[str, str]:
  from importlib import metadata

  found = {"jax": jax.__version__}
  for dist in ("torch", "transformers", "llama_cpp_python", "gguf"):
    try:
      found[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      pass
  return found


def isa_note(runtimes: list[str]) -> str:
  """The instruction sets each side ran: jaxinf's CPU kernel path (`cpu_kernel.isa`) and
  llama.cpp's build (`llama_print_system_info`, its CPU features that are on)."""
  notes = []
  if "jaxinf" in runtimes and jax.default_backend() == "cpu":
    from jaxinf.quant import cpu_kernel

    try:
      notes.append(f"jaxinf CPU kernel: {cpu_kernel.isa()} (fp32 activations), "
                   f"{cpu_kernel.isa(True)} (int8 activations)")
    except cpu_kernel.KernelUnavailableError as e:
      notes.append(f"jaxinf CPU kernel: unavailable ({e})")
  if "llama.cpp" in runtimes:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    # "CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 |"
    on = sorted({part.split("=")[0].split(":")[-1].strip() for part in info.split("|")
                 if part.strip().endswith("= 1")})
    notes.append(f"llama.cpp CPU features on: {', '.join(on) or info.strip()}")
  return "; ".join(notes)


def cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
  except OSError:
    pass
  return f"{os.cpu_count()} cores"


def report_notes(cfg: Config, rows: list[dict], meta: dict) -> str:
  curve = ", ".join(f"{p['mib']} MiB: {p['gbps']:.1f}" for p in meta["bandwidth_curve"])
  skipped = "".join(f"\n- skipped {k}: {v}" for k, v in meta["skipped"].items())
  return (
      f"`python -m experiments.bench_decode` — {', '.join(cfg.sizes)}; prompt {cfg.prompt_len} "
      f"tokens + {cfg.new_tokens} new tokens, greedy, batches {list(cfg.batches)}; tokens/s = "
      f"batch x new tokens / median wall time of the whole call (prefill included) over "
      f"{cfg.repeats} round-robin repeats. {meta['cpu']}"
      f"{'; ' + meta['isa'] if meta.get('isa') else ''}; {meta['threads']} threads for "
      f"llama.cpp and torch, XLA's own pool for jaxinf. Machine load — before: "
      f"{meta['load_before']}; after: {meta['load_after']}.\n\n"
      f"Read bandwidth (GB/s, best of threaded numpy sum and jitted jnp.sum): {curve}. "
      f"DRAM ({max(cfg.bandwidth_mib)} MiB) sampled at the start and after each size: "
      f"{', '.join(f'{g:.1f}' for g in meta['dram_samples_gbps'])} GB/s. "
      f"`roofline_tok_s` = batch x {meta['bandwidth_gbps']:.1f} GB/s (their median) / "
      f"(weight bytes + batch x KV bytes at the mean context {cfg.prompt_len + cfg.new_tokens / 2:g}"
      f"); `cache_roofline_tok_s` uses the bandwidth measured at the probe size that holds one "
      f"step's bytes (above DRAM's where they fit the last-level cache). `vs_llama_cpp`: tokens/s "
      f"over llama.cpp's at the same weight width (f32 / Q8_0 / Q4_0). `exact` / `agree_prefix`: "
      f"greedy tokens against transformers' (jaxinf fp32's without it): all equal / mean share "
      f"of each row before its first disagreement. jaxinf: KV cache {cfg.kv_cache_dtype} "
      f"(`--kv-cache-dtype`). llama.cpp: KV cache F16, flash attention off, "
      f"its quantizer's default tensor types (listed in `note`)."
      f"{skipped}")


def plot(rows: list[dict], path: Path) -> None:
  plt = common.pyplot()
  panels = sorted({(r["size"], r["batch"]) for r in rows},
                  key=lambda p: (-SIZES[p[0]].hidden_size, p[1]))
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
  for ax, (size, batch) in zip(axes[0], panels):
    sel = [r for r in rows if r["size"] == size and r["batch"] == batch]
    labels = [f"{r['runtime']}\n{r['weights']}" for r in sel]
    colors = [{"jaxinf": "C0", "transformers": "C2", "llama.cpp": "C3"}[r["runtime"]] for r in sel]
    x = np.arange(len(sel))
    ax.bar(x, [r["tokens_per_s"] for r in sel], color=colors)
    ax.scatter(x, [r["roofline_tok_s"] for r in sel], marker="_", s=400, color="k",
               label="DRAM roofline", zorder=3)
    ax.set_xticks(x, labels, rotation=60, fontsize=7)
    ax.set_title(f"{size}, batch {batch}", fontsize=9)
    ax.set_ylabel("tokens / s")
    ax.legend(fontsize=7)
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.cli(run, Config)
