"""AdaRound learned rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization") and the recording of each matmul's calibration inputs.

Round-to-nearest minimises each weight's own error; what matters is the layer's output. For one
layer with calibration inputs `X [N, in]`, weight `W [in, out]` and scale `s` (fixed beforehand,
`jaxinf.quant.formats.channel_scale`), every scaled weight `v = W / s` lies between two adjacent
grid points `lo <= v <= hi` (integers `floor(v)`, `floor(v) + 1` for int formats; the neighbouring
values of the float grid for ExMy — the same construction, as in the low-bit FP diffusion paper),
and AdaRound learns, per weight, whether to go up or down:

    W̃(V) = s · (lo + h(V) · (hi - lo)),   h(V) = clip(σ(V) · (ζ - γ) + γ, 0, 1)     (eq. 23)

with the rectified sigmoid (ζ = 1.1, γ = -0.1), minimising (eq. 25)

    ||X W - X W̃(V)||²_F / (N · out)  +  λ Σ (1 - |2 h(V) - 1|^β)

The regulariser pushes every h(V) to 0 or 1; β anneals from 20 to 2 (the paper's schedule) after a
warm-up (20 % of the iterations) without it. `V` starts where h(V) equals the fractional position
`(v - lo) / (hi - lo)` (W̃ = W) and is trained by Adam in one jitted `lax.fori_loop`. Finally
W̃ = s · (lo if h(V) < 0.5 else hi).

Never worse than round-to-nearest, by construction: the learned rounding is kept only if its
reconstruction objective `||X W - X W̃||²` (evaluated in float32 on the calibration set) does not
exceed round-to-nearest's, else round-to-nearest is returned; `AdaRoundResult` reports both
values. (The annealed relaxation is not guaranteed to end below RTN on every layer.)

The optimizer is `optax.adam` directly rather than `jaxinf.train.step`'s: that one is the trainers'
AdamW with clipping, warm-up and fold-in randomness over a whole state dict; AdaRound's per-layer
loop is deterministic, full-batch and inside one `fori_loop`.

Calibration inputs (`record_matmul_inputs`): every selected weight leaf is wrapped by a
`MatmulRecorder` (a `QuantizedWeight`, so it passes through the model's own `x @ w`, jitted or not,
in `scan` or `while_loop`) whose product records `x` on the host through `jax.debug.callback` and
returns `x @ w` unchanged. The model code is not touched.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf.quant.base import QuantizedWeight, is_quantized
from jaxinf.quant.formats import FloatSearch, Format, channel_scale, get_format
from jaxinf.quant.qarray import (
  QArray,
  check_act_format,
  check_calibration,
  check_group_size,
  check_weight,
  from_grid,
)

ZETA, GAMMA = 1.1, -0.1


@dataclasses.dataclass(frozen=True)
class AdaRoundConfig:
  """iterations: Adam steps (the paper: 10k; a few hundred suffice for small layers);
  learning_rate: Adam's; reg_weight: λ; beta: (start, end) of the annealed exponent;
  warmup: fraction of the iterations without the regulariser."""

  iterations: int = 500
  learning_rate: float = 1e-2
  reg_weight: float = 0.01
  beta: tuple[float, float] = (20.0, 2.0)
  warmup: float = 0.2

  def __post_init__(self):
    it = self.iterations
    if isinstance(it, bool) or not isinstance(it, int) or it < 1:
      raise ValueError(f"iterations: expected a positive int, got {it!r}")
    for name in ("learning_rate", "reg_weight"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and v < np.inf):
        raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    b = self.beta
    if (not isinstance(b, tuple) or len(b) != 2
        or not all(isinstance(v, (int, float)) and v > 0 for v in b)):
      raise ValueError(f"beta: expected (start, end), two numbers > 0, got {b!r}")
    if not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup < 1:
      raise ValueError(f"warmup: expected a fraction in [0, 1), got {self.warmup!r}")


@dataclasses.dataclass(frozen=True)
class AdaRoundResult:
  """The quantized weight and the reconstruction objective `||X W - X Ŵ||² / (N · out)` of
  round-to-nearest and of the learned rounding; `learned_kept` says which the weight holds."""

  weight: QArray
  objective_nearest: float
  objective_learned: float
  learned_kept: bool


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  """h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1) (AdaRound eq. 23)."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def grid_neighbours(v: jax.Array, grid: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(lo, hi): the grid points with lo <= v <= hi, adjacent (lo < hi), for `v` within the grid's
  range (saturated first); `grid` sorted ascending."""
  g = jnp.asarray(grid, jnp.float32)
  v = jnp.clip(v, g[0], g[-1])
  i = jnp.clip(jnp.searchsorted(g, v, side="right"), 1, g.shape[0] - 1)
  return g[i - 1], g[i]


@functools.lru_cache(maxsize=32)
def _adaround_loop(cfg: AdaRoundConfig):
  opt = optax.adam(cfg.learning_rate)
  warm = int(cfg.warmup * cfg.iterations)
  b0, b1 = cfg.beta

  def recon(x, w, w_hat, y_ref=None):
    r = x @ w - x @ w_hat if y_ref is None else y_ref - x @ w_hat
    return jnp.mean(r * r)

  @jax.jit
  def run(x, w, lo, hi, scale, v0):
    y_ref = x @ w

    def loss(v, it):
      h = rectified_sigmoid(v)
      rec = recon(x, w, scale * (lo + h * (hi - lo)), y_ref)
      frac = jnp.clip((it - warm) / max(cfg.iterations - warm, 1), 0.0, 1.0)
      beta = b0 + (b1 - b0) * frac
      reg = jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)
      return rec + jnp.where(it < warm, 0.0, cfg.reg_weight * reg)

    def body(it, carry):
      v, state = carry
      g = jax.grad(loss)(v, it)
      upd, state = opt.update(g, state, v)
      return optax.apply_updates(v, upd), state

    v, _ = jax.lax.fori_loop(0, cfg.iterations, body, (v0, opt.init(v0)))
    up = rectified_sigmoid(v) >= 0.5
    return jnp.where(up, hi, lo)

  return run


@jax.jit
def reconstruction_objective(x: jax.Array, w: jax.Array, w_hat: jax.Array) -> jax.Array:
  """`||X W - X Ŵ||² / (N · out)` in float32, AdaRound's calibration objective."""
  r = x @ w - x @ w_hat
  return jnp.mean(r * r)


def adaround(w: Any, calibration: Any, format: Any, *, group_size: int | None = None,
             act_format: str | None = None, compute_dtype: str = "float32",
             config: AdaRoundConfig | None = None) -> AdaRoundResult:
  """Learned rounding of `w [in, out]` on calibration inputs `[N, in]` (module docstring), at the
  absmax scale of `format` (a fixed format: int8, int4, fp8_e4m3, fp4_e2m1, ...; a searched
  "fp4"/"fp8" is resolved first by `search_float_format` on the same inputs)."""
  from jaxinf.quant.formats import search_float_format
  w = check_weight(w)
  fmt = get_format(format)
  g = check_group_size(group_size, w.shape[0])
  act_format = check_act_format(act_format)
  x = check_calibration(calibration, w.shape[0])
  if x is None:
    raise ValueError("calibration: AdaRound needs calibration inputs [N, in], got None")
  config = AdaRoundConfig() if config is None else config
  if not isinstance(config, AdaRoundConfig):
    raise TypeError(f"config: expected an AdaRoundConfig, got {type(config).__name__}")
  clip_ratio = 1.0
  if isinstance(fmt, FloatSearch):
    found = search_float_format(w, fmt, group_size=g, x=x)
    fmt, clip_ratio = found.format, found.clip_ratio
  return _adaround_fixed(w.astype(jnp.float32), x.astype(jnp.float32), fmt, g, clip_ratio,
                         act_format, compute_dtype, config)


def _adaround_fixed(w, x, fmt: Format, g: int, clip_ratio: float, act_format, compute_dtype,
                    config: AdaRoundConfig) -> AdaRoundResult:
  scale = channel_scale(w, fmt, g, clip_ratio)
  full = jnp.repeat(scale, g, axis=0)
  v = w / full
  lo, hi = grid_neighbours(v, fmt.grid())
  frac = jnp.clip((jnp.clip(v, lo, hi) - lo) / (hi - lo), 1e-4, 1 - 1e-4)
  # h(V0) = frac: σ(V0) = (frac - γ) / (ζ - γ).
  p = (frac - GAMMA) / (ZETA - GAMMA)
  v0 = jnp.log(p) - jnp.log1p(-p)
  q_learned = _adaround_loop(config)(x, w, lo, hi, full, v0)
  q_nearest = fmt.round_to_grid(v)
  obj_n = float(reconstruction_objective(x, w, q_nearest * full))
  obj_l = float(reconstruction_objective(x, w, q_learned * full))
  kept = obj_l <= obj_n
  q = q_learned if kept else q_nearest
  weight = from_grid(q, scale, fmt, group_size=g, compute_dtype=compute_dtype,
                     act_format=act_format, clip_ratio=clip_ratio)
  return AdaRoundResult(weight, obj_n, obj_l, kept)


# ---------------------------------------------------------------------------------------------
# Recording each matmul's inputs.


class _Store:
  """Host-side buffers of recorded inputs, by weight path (hashed by identity: static metadata)."""

  def __init__(self, max_rows: int):
    self.max_rows = max_rows
    self.rows: dict[str, list[np.ndarray]] = {}
    self.lock = threading.Lock()

  def add(self, name: str, x: np.ndarray) -> None:
    x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    with self.lock:
      have = sum(len(r) for r in self.rows.get(name, []))
      if have < self.max_rows:
        self.rows.setdefault(name, []).append(x[: self.max_rows - have])


@dataclasses.dataclass(frozen=True, eq=False)
class MatmulRecorder(QuantizedWeight):
  """A floating weight that records the inputs of `x @ w` (module docstring); not a low-bit
  weight: `nbytes` is the float weight's."""

  weight: jax.Array
  name: str
  store: _Store

  __array_ufunc__ = None

  @property
  def shape(self):
    return tuple(self.weight.shape)

  @property
  def dtype(self):
    return np.dtype(self.weight.dtype)

  def astype(self, dtype):
    return dataclasses.replace(self, weight=self.weight.astype(dtype))

  def dequantize(self):
    return self.weight

  def __rmatmul__(self, x):
    jax.debug.callback(functools.partial(self.store.add, self.name), x)
    return x @ self.weight


jax.tree_util.register_dataclass(MatmulRecorder, data_fields=["weight"],
                                 meta_fields=["name", "store"])


def path_name(path) -> str:
  """The '/'-joined name of a pytree key path (dict keys, sequence indices, attributes)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def select_paths(params: Any, include: Sequence[str], exclude: Sequence[str]) -> list[str]:
  """The '/'-joined paths of 2-D floating leaves fully matching an `include` regex and no
  `exclude` regex (quantized leaves are not selected again)."""
  inc = [re.compile(p) for p in include]
  exc = [re.compile(p) for p in exclude]
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  out = []
  for path, leaf in flat:
    name = path_name(path)
    if is_quantized(leaf) or not hasattr(leaf, "ndim") or leaf.ndim != 2:
      continue
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      continue
    if any(p.fullmatch(name) for p in inc) and not any(p.fullmatch(name) for p in exc):
      out.append(name)
  return out


def record_matmul_inputs(run: Callable[[Any], Any], params: Any, *,
                         include: Sequence[str] = (r"(.*/)?kernel",), exclude: Sequence[str] = (),
                         max_rows: int = 4096) -> dict[str, np.ndarray]:
  """The inputs `x` of every `x @ w` whose weight `w` is a selected leaf of `params` (paths as in
  `select_paths`), each `[N, in]` float32 (leading dims flattened, at most `max_rows` rows, first
  come first kept), from one call `run(wrapped_params)` (e.g. `lambda p: model(p, tokens)`, jitted
  or not). Weights never multiplied are absent from the result."""
  if not callable(run):
    raise TypeError(f"run: expected a callable run(params), got {type(run).__name__}")
  if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
    raise ValueError(f"max_rows: expected a positive int, got {max_rows!r}")
  names = set(select_paths(params, include, exclude))
  if not names:
    raise ValueError(f"params: no 2-D floating leaf matches include={tuple(include)} "
                     f"(exclude={tuple(exclude)})")
  store = _Store(max_rows)

  def wrap(path, leaf):
    name = path_name(path)
    return MatmulRecorder(leaf, name, store) if name in names else leaf

  wrapped = jax.tree_util.tree_map_with_path(wrap, params, is_leaf=is_quantized)
  jax.block_until_ready(run(wrapped))
  jax.effects_barrier()
  return {k: np.concatenate(v) for k, v in store.rows.items()}
