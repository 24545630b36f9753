"""Roofline (idealised runtime) of jaxinf's models, the LLM-Viewer method (Yuan et al. 2024,
"LLM Inference Unveiled: Survey and Roofline Model Insights").

For every layer of a model's forward this module counts, from the config alone,

- `flops`: floating-point operations, matmuls as 2 m k n plus the elementwise arithmetic the
  jaxinf code performs (norm statistics, activations, masks, residual adds), counted the way
  XLA's `HloCostAnalysis` counts them (one per output element of an add, multiply, select,
  compare or per reduced element);
- `transcendentals`: exp / log / tanh / logistic / rsqrt / sin / cos evaluations (XLA counts them
  apart from `flops`, and so do we);
- `bytes`: bytes moved to and from memory if each layer reads its weights, its inputs, the KV cache
  or recurrent state once and writes its outputs once (weights and activations at the workload's
  dtype; recurrent states and the residual stream are fp32 in jaxinf, so 4 bytes whatever the
  dtype).

A layer's predicted time on a device is max(flops / peak FLOP/s, bytes / bandwidth); it is
"compute"-bound when its arithmetic intensity (flops / bytes) exceeds the device's ridge point
(peak / bandwidth), "memory"-bound otherwise. Transcendentals are reported but not timed (they run
on the same units on GPUs/TPUs at a rate the data sheets do not give).

What is counted is what jaxinf's forward does on its XLA (CPU) path, read from the model files:
attention scores every key slot of the buffer, masked (the XLA form's dense T x T, not the causal
half a flash kernel computes), Mamba's and RWKV-7's recurrences run token by token, TransNormer's
lightning attention in chunks of 64 positions (the XLA form's blocks). The workloads:

- prefill: `batch` prompts of `seq` tokens through the parallel form (`model.prefill`);
- decode: one new token per row against a cache of `seq` slots (`model.step` with k = 1); for the
  transformer the XLA form scores all `seq` slots of the KV buffer; the recurrent families carry a
  fixed-size state.

The DiT's forward (`dit_forward`) is one denoiser call on `batch` latents.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxinf.models import mamba as mamba_lib
from jaxinf.models import rwkv as rwkv_lib
from jaxinf.models import transformer as transformer_lib
from jaxinf.models import transnormer as transnormer_lib
from jaxinf.models.dit import DiTConfig

# Bytes per parameter / activation element.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
MODES = ("prefill", "decode")
KINDS = ("embedding", "norm", "attn_proj", "attn_core", "mixer_proj", "mixer_core", "mlp",
         "adaln", "head")
_FP32 = 4  # residual stream, norm statistics and recurrent states: fp32 in every family
_LIGHTNING_CHUNK = 64  # pallas_kernels.lightning.LightningBlocks().xla_chunk


# --- devices ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Device:
  """A device's roofline: dense peak FLOP/s at the workload's dtype and memory bandwidth (B/s)."""
  name: str
  peak_flops: float
  bandwidth: float
  source: str = ""

  @property
  def ridge(self) -> float:
    """Arithmetic intensity (FLOP/byte) above which a layer is compute-bound."""
    return self.peak_flops / self.bandwidth


# Data-sheet numbers: bf16 dense (no sparsity) tensor FLOP/s and HBM bandwidth.
DEVICES: dict[str, Device] = {
    # NVIDIA H100 SXM5 data sheet: BF16 Tensor Core 1,979 TFLOPS *with sparsity* -> 989.5 dense;
    # HBM3 3.35 TB/s.
    "h100-sxm": Device("h100-sxm", 989.5e12, 3.35e12, "NVIDIA H100 data sheet (SXM)"),
    # NVIDIA H200 SXM data sheet: BF16 1,979 TFLOPS with sparsity -> 989.5 dense; HBM3e 4.8 TB/s.
    "h200": Device("h200", 989.5e12, 4.8e12, "NVIDIA H200 data sheet (SXM)"),
    # Google Cloud TPU v5e: 197 TFLOP/s bf16, 819 GB/s HBM2 (cloud.google.com/tpu/docs/v5e).
    "tpu-v5e": Device("tpu-v5e", 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    # TPU v5p: 459 TFLOP/s bf16, 2,765 GB/s HBM2e (cloud.google.com/tpu/docs/v5p).
    "tpu-v5p": Device("tpu-v5p", 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    # TPU v6e (Trillium): 918 TFLOP/s bf16, 1,640 GB/s HBM (cloud.google.com/tpu/docs/v6e).
    "tpu-v6e": Device("tpu-v6e", 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
}


def get_device(name: str | Device) -> Device:
  """A `Device`, or the data-sheet device named `name` (one of `DEVICES`)."""
  if isinstance(name, Device):
    return name
  if not isinstance(name, str) or name not in DEVICES:
    raise ValueError(f"device: unknown device {name!r}; known: {sorted(DEVICES)} "
                     "(or measure_host() for this machine)")
  return DEVICES[name]


def _median_seconds(fn, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure_host(*, matmul_size: int = 2048, copy_mib: int = 256, repeats: int = 7) -> Device:
  """This machine's roofline, measured: fp32 FLOP/s of an n x n x n matmul (2 n^3 flops) and the
  memory bandwidth of a large fp32 array (`copy_mib` MiB, far larger than the caches, so DRAM's),
  the better of its copy-and-scale (read + write: 2 x its bytes) and its sum (a read: its bytes,
  what a decode step mostly does with its weights), each the median of `repeats` jitted runs
  after a warm-up."""
  for name, value, low in (("matmul_size", matmul_size, 64), ("copy_mib", copy_mib, 1),
                           ("repeats", repeats, 1)):
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < low:
      raise ValueError(f"{name}: expected >= {low}, got {value}")
  import jax
  import jax.numpy as jnp

  n = matmul_size
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  flops = 2.0 * n**3 / _median_seconds(lambda: matmul(a, b), repeats)
  x = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0001)  # one read, one write, no reuse
  reduce = jax.jit(jnp.sum)             # one read
  bandwidth = max(2.0 * x.nbytes / _median_seconds(lambda: copy(x), repeats),
                  x.nbytes / _median_seconds(lambda: reduce(x), repeats))
  return Device("host-cpu", flops, bandwidth,
                f"measured: {n}^3 fp32 matmul, {copy_mib} MiB fp32 copy-and-scale / sum, "
                f"median of {repeats}")


# --- counting -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Op:
  """One layer's work: `kind` one of KINDS, `layer` its block index (-1 outside the blocks)."""
  name: str
  kind: str
  layer: int
  flops: float
  transcendentals: float
  bytes: float

  @property
  def intensity(self) -> float:
    return self.flops / self.bytes if self.bytes else math.inf


@dataclasses.dataclass(frozen=True)
class Workload:
  """`mode` "prefill" (batch x seq tokens) or "decode" (batch x 1 token against seq cached)."""
  mode: str
  batch: int
  seq: int
  dtype: str = "bfloat16"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
    for name in ("batch", "seq"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
      if value < 1:
        raise ValueError(f"{name}: expected >= 1, got {value}")
    if self.dtype not in DTYPE_BYTES:
      raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

  @property
  def tq(self) -> int:
    """Positions computed per row: seq for prefill, 1 for decode."""
    return self.seq if self.mode == "prefill" else 1

  @property
  def tokens(self) -> int:
    return self.batch * self.tq

  @property
  def nbytes(self) -> int:
    return DTYPE_BYTES[self.dtype]


class _Ops:
  """Accumulates `Op`s; `matmul` / `ew` helpers keep each count next to the code it mirrors."""

  def __init__(self, w: Workload):
    self.w, self.ops = w, []

  def add(self, name, kind, layer, flops=0.0, trans=0.0, weights=0.0, acts=0.0, fp32=0.0):
    """weights / acts: elements at the workload dtype; fp32: elements at 4 bytes."""
    nb = self.w.nbytes
    self.ops.append(Op(name, kind, layer, float(flops), float(trans),
                       float(weights * nb + acts * nb + fp32 * _FP32)))


def _mm(m, k, n) -> float:
  return 2.0 * m * k * n


def _rms_norm(n, c):
  """layers.rms_norm over n rows of c: square, sum, mean, +eps, x*rsqrt, *weight."""
  return n * (4 * c + 2), n


def _layer_norm(n, c):
  """Affine LayerNorm as RWKV's: mean (sum, div), x-mean (twice), square, var (sum, div), +eps,
  *rsqrt, *w, +b."""
  return n * (8 * c + 3), n


def _transformer(cfg: transformer_lib.TransformerConfig, w: Workload) -> list[Op]:
  o = _Ops(w)
  b, tq, n, s = w.batch, w.tq, w.tokens, w.seq
  c, hq, hkv, d, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.mlp_hidden, cfg.vocab_size)
  o.add("embed", "embedding", -1, acts=n * c)
  for i in range(cfg.num_layers):
    fl, tr = _rms_norm(n, c)
    o.add(f"{i}.input_norm", "norm", i, fl, tr, weights=c, acts=n * c, fp32=n * c)
    qkv = hq + 2 * hkv
    # q, k, v, o projections; RoPE on q and k (angles: convert + scale, D/2 each; cos, sin of D;
    # per element -x2 (half), x cos, rot sin, add: 3.5); the fp32 residual add.
    rope = 2 * n * d + 3.5 * n * (hq + hkv) * d
    o.add(f"{i}.qkvo_proj", "attn_proj", i,
          _mm(n, c, qkv * d) + _mm(n, hq * d, c) + rope + n * c, 4 * n * d,
          weights=c * qkv * d + hq * d * c, acts=n * c + n * qkv * d + n * hq * d, fp32=2 * n * c)
    # XLA form: every (query, key slot) pair scored, masked (compare once per kv group), softmax
    # (scale, select, max, sub, exp, select, sum), PV; per query row: the isfinite guard of the
    # max, the division by the sum and its zero guard (the log-sum-exp is not returned: dead).
    pairs = b * hq * tq * s
    core = pairs * (4 * d + 6) + b * tq * s + b * hq * tq * (d + 4)
    cache_rw = 2 * b * s * hkv * d
    write = 2 * n * hkv * d if w.mode == "prefill" else 0  # prefill's where(keep_new, ...)
    o.add(f"{i}.attention", "attn_core", i, core + write, pairs,
          acts=n * hq * d * 2 + cache_rw + 2 * n * hkv * d)
    fl, tr = _rms_norm(n, c)
    o.add(f"{i}.post_attention_norm", "norm", i, fl, tr, weights=c, acts=n * c, fp32=n * c)
    # gate, up, down; silu(gate) * up = x * logistic(x) * up; the residual add.
    o.add(f"{i}.mlp", "mlp", i, _mm(n, c, 2 * f) + _mm(n, f, c) + 2 * n * f + n * c, n * f,
          weights=3 * c * f, acts=n * c + 3 * n * f, fp32=2 * n * c)
  fl, tr = _rms_norm(n, c)
  o.add("norm", "norm", -1, fl, tr, weights=c, acts=n * c, fp32=n * c)
  o.add("lm_head", "head", -1, _mm(n, c, v), weights=c * v, acts=n * c, fp32=n * v)
  return o.ops


def _mamba(cfg: mamba_lib.MambaConfig, w: Workload) -> list[Op]:
  o = _Ops(w)
  b, n = w.batch, w.tokens
  c, di, ns, r, k, v = (cfg.hidden_size, cfg.inner_size, cfg.state_size, cfg.dt_rank,
                        cfg.conv_kernel, cfg.vocab_size)
  bias = cfg.use_bias
  o.add("embed", "embedding", -1, acts=n * c)
  for i in range(cfg.num_layers):
    fl, tr = _rms_norm(n, c)
    o.add(f"{i}.norm", "norm", i, fl, tr, weights=c, acts=n * c, fp32=n * c)
    proj = (_mm(n, c, 2 * di) + _mm(n, di, r + 2 * ns) + _mm(n, r, di) + _mm(n, di, c)
            + (n * (2 * di + c) if bias else 0) + n * c)  # + biases, + the residual add
    o.add(f"{i}.in_x_dt_out_proj", "mixer_proj", i, proj,
          weights=c * 2 * di + di * (r + 2 * ns) + r * di + di * c,
          acts=n * c + n * 2 * di + 2 * n * di + n * (r + 2 * ns) + n * di, fp32=2 * n * c)
    # conv: W products and the W adds of Python's sum (from 0), + bias, silu (mul, logistic);
    # A = -exp(A_log); dt = softplus(delta + bias) = where(x > 20, x, log1p(exp(min(x, 20))));
    # per (channel, state): exp(dt A) (mul, exp), (dt u) B, decay x, + drive, sum(x C) (mul, add):
    # 6 flops (the dt u product once per channel);
    # finish: y + u D, * silu(z).
    conv = n * di * (2 * k + (2 if cfg.use_conv_bias else 1))
    mask = (n * di + b * w.tq) if w.mode == "prefill" else 0  # where(valid, delta, -inf)
    scan = n * di * (1 + 3) + n * di * (1 + 6 * ns) + n * di * 4 + di * ns
    trans = n * di + 2 * n * di + n * di * ns + n * di + di * ns
    state = 2 * b * di * ns
    o.add(f"{i}.conv_selective_scan", "mixer_core", i, conv + mask + scan, trans,
          weights=k * di + 3 * di + di * ns,
          acts=n * di * 4 + n * 2 * ns + 2 * b * (k - 1) * di, fp32=state)
  fl, tr = _rms_norm(n, c)
  o.add("norm_f", "norm", -1, fl, tr, weights=c, acts=n * c, fp32=n * c)
  o.add("lm_head", "head", -1, _mm(n, c, v), weights=c * v, acts=n * c, fp32=n * v)
  return o.ops


def _rwkv7(cfg: rwkv_lib.RWKV7Config, w: Workload) -> list[Op]:
  o = _Ops(w)
  b, n = w.batch, w.tokens
  c, h, hs, f, v = cfg.d_model, cfg.n_heads, cfg.head_size, cfg.ffn_dim, cfg.vocab_size
  dw, da, dv, dg = cfg.decay_lora, cfg.a_lora, cfg.v_lora, cfg.gate_lora
  fl, tr = _layer_norm(n, c)
  o.add("embed+ln0", "embedding", -1, fl, tr, weights=2 * c, acts=2 * n * c)
  for i in range(cfg.n_layers):
    fl, tr = _layer_norm(n, c)
    o.add(f"{i}.ln1", "norm", i, fl, tr, weights=2 * c, acts=2 * n * c)
    vres = i > 0
    mats = (_mm(n, c, 3 * c) + _mm(n, c, dw) + _mm(n, dw, c) + _mm(n, c, da) + _mm(n, da, c)
            + _mm(n, c, dg) + _mm(n, dg, c) + _mm(n, c, c)
            + ((_mm(n, c, dv) + _mm(n, dv, c)) if vres else 0))
    # token shift x_prev - x and six lerps (13 C); a = sigmoid(a0 + .) (add); kk = l2norm(k k_k)
    # (mul, square, sum, div + per head max); k *= 1 + (a - 1) k_a (4); v residual (add + 3);
    # w = exp(-e^-.5 sigmoid(w0 + .)) (add, mul); aa, bb = -kk, kk a (2); the output gate y * g
    # and residual add (2).
    ew = n * (13 * c + c + 4 * c + 4 * c + (4 * c if vres else 0) + 2 * c + 2 * c + 2 * c) + n * h
    trans = n * (dw + c + dg + h + 2 * c + (c if vres else 0))
    weights = (4 * c * c + c * dw + dw * c + c * da + da * c + c * dg + dg * c
               + ((c * dv + dv * c) if vres else 0) + 10 * c)
    o.add(f"{i}.att_proj", "mixer_proj", i, mats + ew, trans, weights=weights,
          acts=n * c * 12, fp32=2 * n * c)
    # WKV per token and head: S a (2 N^2), S w, (S a) b, v k (3 N^2), two adds, S r (2 N^2);
    # prefill masks w, k, b where invalid; ln_x group norm; the bonus sum(r k r_k) v (4 C); + y.
    mask = (3 * n * c + b * w.tq) if w.mode == "prefill" else 0
    core = 9 * n * h * hs * hs + mask + n * (8 * c + 3 * h) + 5 * n * c
    o.add(f"{i}.wkv", "mixer_core", i, core, n * h, weights=3 * c,
          acts=7 * n * c, fp32=2 * b * h * hs * hs)
    fl, tr = _layer_norm(n, c)
    o.add(f"{i}.ln2", "norm", i, fl, tr, weights=2 * c, acts=2 * n * c)
    # lerp (3 C), key, relu (max) and square, value, residual add.
    o.add(f"{i}.ffn", "mlp", i, _mm(n, c, f) + _mm(n, f, c) + 3 * n * c + 2 * n * f + n * c,
          weights=2 * c * f + c, acts=2 * n * c + 2 * n * f, fp32=2 * n * c)
  fl, tr = _layer_norm(n, c)
  o.add("ln_out", "norm", -1, fl, tr, weights=2 * c, acts=2 * n * c)
  o.add("head", "head", -1, _mm(n, c, v), weights=c * v, acts=n * c, fp32=n * v)
  return o.ops


def _srms(n, c):
  """SimpleRMSNorm: square, sum, mean, +eps, x*rsqrt."""
  return n * (3 * c + 2), n


def _transnormer(cfg: transnormer_lib.TransNormerConfig, w: Workload) -> list[Op]:
  o = _Ops(w)
  b, tq, n = w.batch, w.tq, w.tokens
  d, hid, h, hd, g, v = cfg.d_model, cfg.hidden, cfg.n_heads, cfg.head_dim, cfg.glu, cfg.vocab_size
  o.add("embed", "embedding", -1, n * d if cfg.scale_embedding else 0, acts=n * d)
  for i in range(cfg.n_layers):
    lrpe = cfg.use_lrpe(i)
    dk = 2 * hd if lrpe else hd
    fl, tr = _srms(n, d)
    o.add(f"{i}.norm1", "norm", i, fl, tr, acts=2 * n * d)
    # qkvu, silu on q and k (mul + logistic); LRPE: angles (convert, mul) and x cos, x sin for
    # q and k; out: srms_norm(o) * u, out_proj, residual add.
    lrpe_fl, lrpe_tr = ((2 * (n + n * hid) + 4 * n * hid, 4 * n * hid) if lrpe else (0, 0))
    fl_norm, tr_norm = _srms(n, hid)
    proj = (_mm(n, d, 4 * hid) + 2 * n * hid + lrpe_fl + fl_norm + n * hid + _mm(n, hid, d)
            + n * d)
    o.add(f"{i}.qkvu_out_proj", "mixer_proj", i, proj, 2 * n * hid + lrpe_tr + tr_norm,
          weights=d * 4 * hid + hid * d, acts=n * d + 4 * n * hid + 2 * n * hid + n * d)
    state = b * h * dk * hd
    if w.mode == "decode":
      # state = lambda S + k v^T (mul, add, and the outer product as a dot: XLA counts 2 per
      # output element), o = q S (2 per element)
      core, trans = 6 * state, 0
      o.add(f"{i}.lightning", "mixer_core", i, core, trans, acts=n * h * (2 * dk + 2 * hd),
            fp32=2 * state)
    else:
      core, trans = _lightning_prefill(b, w.seq, h, dk, hd)
      o.add(f"{i}.lightning", "mixer_core", i, core, trans, acts=n * h * (2 * dk + 2 * hd),
            fp32=2 * state)
    fl, tr = _srms(n, d)
    o.add(f"{i}.norm2", "norm", i, fl, tr, acts=2 * n * d)
    o.add(f"{i}.sglu", "mlp", i, _mm(n, d, 2 * g) + n * g + _mm(n, g, d) + n * d,
          weights=3 * d * g, acts=2 * n * d + 3 * n * g)
  fl, tr = _srms(n, d)
  o.add("norm", "norm", -1, fl, tr, acts=2 * n * d)
  o.add("lm_head", "head", -1, _mm(n, d, v), weights=d * v, acts=n * d, fp32=n * v)
  return o.ops


def _lightning_prefill(b, t, h, dk, dv):
  """`_lightning_xla` in blocks of 64 positions, then `lightning_prefill`'s state at each row's
  length (flops, transcendentals). The kernel's own final state is unused (prefill takes each
  row's state at its length in closed form), so the last block's state update is dead code."""
  c = min(_LIGHTNING_CHUNK, t)
  blocks = -(-t // c)
  per_block = (b * h * (_mm(c, dk, c) + c * c + _mm(c, c, dv) + c * dk + _mm(c, dk, dv) + c * dv
                        + dk * dv + c * dk + _mm(c, dk, dv) + dk * dv)
               + h * (3 * c * c + 2 * c) + 3 * c * c + 4 * c)
  trans_block = h * (c * c + 2 * c + 1)
  dead = b * h * (2 * dk * dv + c * dk + _mm(c, dk, dv)) + h * c, h * (c + 1)
  # age, weight = where(age >= 0, exp(max(age, 0) log lambda), 0), (weight k) v summed over t,
  # lambda^L S + kv.
  at_length = (3 * b * t + 3 * b * t * h + b * t * h * dk + b * h * _mm(t, dk, dv) + 2 * b * h
               + 2 * b * h * dk * dv)
  return (blocks * per_block - dead[0] + at_length,
          blocks * trans_block - dead[1] + b * t * h + b * h + h)


def _dit(cfg: DiTConfig, w: Workload) -> list[Op]:
  o = _Ops(w)
  b = w.batch
  d, hh, tn, p = cfg.hidden_size, cfg.num_heads, cfg.num_tokens, cfg.patch_size
  m, fq = int(d * cfg.mlp_ratio), cfg.frequency_embedding_size
  dh, n = d // hh, b * tn
  pin, pout = p * p * cfg.in_channels, p * p * cfg.out_channels
  # patch embedding + bias + position; timestep features (mul; cos, sin), MLP with bias and silu;
  # + the label embedding.
  emb = (_mm(n, pin, d) + 2 * n * d + b * fq // 2 + _mm(b, fq, d) + 2 * b * d + _mm(b, d, d)
         + b * d + b * d)
  o.add("embed", "embedding", -1, emb, b * fq + b * d + fq // 2,
        weights=pin * d + fq * d + d * d + 3 * d + tn * d, acts=n * pin + n * d)
  for i in range(cfg.depth):
    # adaLN: silu(c) (mul + logistic), the [d, 6d] map with bias; (1 + scale) twice.
    o.add(f"{i}.adaLN", "adaln", i, 2 * b * d + _mm(b, d, 6 * d) + 6 * b * d + 2 * b * d, b * d,
          weights=6 * d * d + 6 * d, acts=7 * b * d)
    for name in ("norm1", "norm2"):
      # layer_norm: mean, x - mean (twice), square, var, +eps, * rsqrt; modulate: x * s + shift.
      o.add(f"{i}.{name}", "norm", i, n * (6 * d + 3) + 2 * n * d, n, acts=2 * n * d)
    # fused qkv and proj with biases; gate * attn and the residual add.
    o.add(f"{i}.qkv_proj", "attn_proj", i, _mm(n, d, 3 * d) + 3 * n * d + _mm(n, d, d) + 3 * n * d,
          weights=4 * d * d + 4 * d, acts=n * d * 6)
    pairs = b * hh * tn * tn
    # jax.nn.dot_product_attention (XLA): scale, max, sub, exp, sum, div; QK and PV.
    o.add(f"{i}.attention", "attn_core", i, pairs * (4 * dh + 4) + b * hh * tn * dh, pairs,
          acts=4 * n * d)
    # fc1 + bias, tanh GELU (x^3, *c, +x, *sqrt(2/pi), +1, *x, *0.5), fc2 + bias, gate, residual.
    o.add(f"{i}.mlp", "mlp", i, _mm(n, d, m) + n * m + 8 * n * m + _mm(n, m, d) + 3 * n * d,
          n * m, weights=2 * d * m + m + d, acts=2 * n * d + 2 * n * m)
  o.add("final_layer", "head", -1,
        2 * b * d + _mm(b, d, 2 * d) + 2 * b * d + n * (6 * d + 3) + 2 * n * d
        + _mm(n, d, pout) + n * pout, b * d + n,
        weights=2 * d * d + 2 * d + d * pout + pout, acts=2 * n * d + n * pout)
  return o.ops


_COUNTERS = {
    transformer_lib.TransformerConfig: ("transformer", _transformer),
    mamba_lib.MambaConfig: ("mamba", _mamba),
    rwkv_lib.RWKV7Config: ("rwkv7", _rwkv7),
    transnormer_lib.TransNormerConfig: ("transnormer", _transnormer),
}


def _config_of(model: Any):
  """A config from a config, a FamilyLM, or a registered size name / DiT config name."""
  if isinstance(model, str):
    from jaxinf.models import families
    from jaxinf.models.dit import DIT_CONFIGS
    if model in DIT_CONFIGS:
      return DIT_CONFIGS[model]
    try:
      return families.named_config(model)
    except ValueError:
      raise ValueError(f"model: unknown model {model!r}; known: {families.sizes()} and the DiT "
                       f"configs {sorted(DIT_CONFIGS)}") from None
  return getattr(model, "config", model)


def count(model: Any, mode: str = "decode", batch: int = 1, seq: int = 1024,
          dtype: str = "bfloat16") -> list[Op]:
  """Every layer's `Op` for `model` (a config, a FamilyLM, a registered size name or a DiT config
  name) on the workload (`mode` prefill / decode; a DiT has one forward, `mode` and `seq` ignored
  beyond their checks). Raises before counting on a bad argument."""
  workload = Workload(mode, batch, seq, dtype)
  cfg = _config_of(model)
  if isinstance(cfg, DiTConfig):
    return _dit(cfg, workload)
  for config_type, (_, counter) in _COUNTERS.items():
    if isinstance(cfg, config_type):
      return counter(cfg, workload)
  raise TypeError(f"model: expected a registered family's config or model, a DiTConfig or a "
                  f"size name, got {type(cfg).__name__}")


def family_name(model: Any) -> str:
  """"transformer", "mamba", "rwkv7", "transnormer" or "dit"."""
  cfg = _config_of(model)
  if isinstance(cfg, DiTConfig):
    return "dit"
  for config_type, (name, _) in _COUNTERS.items():
    if isinstance(cfg, config_type):
      return name
  raise TypeError(f"model: expected a registered family's config or model, a DiTConfig or a "
                  f"size name, got {type(cfg).__name__}")


# --- predictions --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prediction:
  """An op (or a total) on a device: ideal seconds and what bounds it."""
  name: str
  kind: str
  flops: float
  bytes: float
  seconds: float
  bound: str
  intensity: float


def predict_op(op: Op, device: Device | str) -> Prediction:
  """max(flops / peak, bytes / bandwidth) and the bound ("compute" above the ridge point)."""
  dev = get_device(device)
  compute, memory = op.flops / dev.peak_flops, op.bytes / dev.bandwidth
  bound = "compute" if op.intensity > dev.ridge else "memory"
  return Prediction(op.name, op.kind, op.flops, op.bytes, max(compute, memory), bound,
                    op.intensity)


def predict(ops: Sequence[Op], device: Device | str) -> list[Prediction]:
  dev = get_device(device)  # checked even for no ops
  return [predict_op(op, dev) for op in ops]


def total(ops: Sequence[Op], device: Device | str) -> Prediction:
  """The model's total: the sum of the per-layer times (layers run one after another); the bound
  is the one holding most of that time, the intensity the whole model's."""
  if not ops:
    raise ValueError("ops: expected at least one op, got none")
  preds = predict(ops, device)
  secs = sum(p.seconds for p in preds)
  mem = sum(p.seconds for p in preds if p.bound == "memory")
  flops, nbytes = sum(o.flops for o in ops), sum(o.bytes for o in ops)
  return Prediction("total", "total", flops, nbytes, secs,
                    "memory" if mem >= secs / 2 else "compute", flops / nbytes)


def by_kind(ops: Sequence[Op]) -> dict[str, dict[str, float]]:
  """flops, transcendentals and bytes summed per kind of layer."""
  out: dict[str, dict[str, float]] = {}
  for op in ops:
    agg = out.setdefault(op.kind, {"flops": 0.0, "transcendentals": 0.0, "bytes": 0.0})
    agg["flops"] += op.flops
    agg["transcendentals"] += op.transcendentals
    agg["bytes"] += op.bytes
  return out


def totals(ops: Sequence[Op]) -> dict[str, float]:
  return {"flops": float(sum(o.flops for o in ops)),
          "transcendentals": float(sum(o.transcendentals for o in ops)),
          "bytes": float(sum(o.bytes for o in ops))}
