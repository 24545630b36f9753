"""DiT: diffusion transformer with adaLN-Zero blocks (Peebles & Xie, "Scalable Diffusion Models with
Transformers", ICCV 2023), faithful to the authors' released `models.py`.

Layout is channels-last: images `[B, H, W, C]`, tokens `[B, T, D]`. The model maps
`(x_t, t, y) -> model output` with `2C` channels when `learn_sigma` (the noise prediction, then the
interpolation value of the learned variance, as in improved DDPM) and `C` otherwise.

Faithful details: patch embedding by a strided linear map (xavier-uniform on the flattened kernel),
a fixed 2-D sin-cos position embedding, a 256-frequency timestep embedding (cosines first) into
Linear-SiLU-Linear (normal init 0.02), a label table with one extra "null" row used by
classifier-free guidance and by label dropout in training, blocks with LayerNorm without affine
(eps 1e-6), fused qkv with bias, tanh-GELU MLP of ratio 4, six adaLN chunks (shift, scale, gate for
attention and for the MLP), zero-initialised modulation and output layer.

diffusers' port differs in two numerical details, both config fields here (defaults = the release):
`timestep_freq_shift` (its timestep frequencies use `half - 1` in the exponent's denominator) and
`mlp_norm_eps` (its LayerNorm before the MLP uses eps 1e-5); see `jaxinf.checkpoints.dit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinf.config import check_fields
from jaxinf.models import layers
from jaxinf.parallel.rules import constrain

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Static configuration of a DiT. Defaults are DiT-XL/2 at 256x256 (latent 32x32x4)."""

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  # DiT uses 0.02; a larger value makes the class signal learnable in a one-minute CPU run.
  label_init_std: float = 0.02
  frequency_embedding_size: int = 256
  layer_norm_eps: float = 1e-6
  # The two places where diffusers' port (`DiTTransformer2DModel`) computes differently from the
  # release; the defaults are the release's, and `jaxinf.checkpoints.dit` sets diffusers' values when
  # it converts a diffusers checkpoint. `timestep_freq_shift` is diffusers' `downscale_freq_shift`:
  # frequencies exp(-log(10000) i / (half - shift)); the release uses 0, diffusers' DiT 1.
  # `mlp_norm_eps` is the eps of the LayerNorm before the MLP (None: `layer_norm_eps`, as in the
  # release); diffusers uses its `norm_eps` config there, 1e-5 by default.
  timestep_freq_shift: float = 0.0
  mlp_norm_eps: float | None = None
  # Parameters are fp32; activations run in this dtype (bf16 on GPU/TPU). Norms and softmax are fp32.
  dtype: str = "float32"

  def __post_init__(self):
    check_fields(self, positive=("mlp_ratio", "label_init_std", "layer_norm_eps", "mlp_norm_eps"))
    for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                 "num_classes", "frequency_embedding_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if self.input_size % self.patch_size:
      raise ValueError(
          f"patch_size: {self.patch_size} does not divide input_size {self.input_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")
    if self.hidden_size % 4:
      raise ValueError(f"hidden_size: expected a multiple of 4 (2-D sin-cos), got {self.hidden_size}")
    if int(self.hidden_size * self.mlp_ratio) < 1:
      raise ValueError(f"mlp_ratio: hidden_size * mlp_ratio = {self.hidden_size * self.mlp_ratio} "
                       "gives an MLP of width 0; expected a width >= 1")
    if not 0.0 <= self.class_dropout_prob < 1.0:
      raise ValueError(f"class_dropout_prob: expected in [0, 1), got {self.class_dropout_prob}")
    if not 0.0 <= self.timestep_freq_shift < self.frequency_embedding_size // 2:
      raise ValueError(
          f"timestep_freq_shift: expected in [0, {self.frequency_embedding_size // 2}), got "
          f"{self.timestep_freq_shift}")
    for name in ("layer_norm_eps", "mlp_norm_eps"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def null_class(self) -> int | None:
    """Index of the unconditional ("null") label, or None when the model was built without one."""
    return self.num_classes if self.class_dropout_prob > 0 else None

  @property
  def sample_shape(self) -> tuple[int, int, int]:
    return (self.input_size, self.input_size, self.in_channels)


# The paper's four sizes (Table 1); each comes with patch 2, 4 and 8.
_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(patch_size=patch, **dims)
    for size, dims in _SIZES.items()
    for patch in (2, 4, 8)
}
# Small models for this project's CPU machines: 8x8x1 digits, 10 classes.
DIT_CONFIGS["DiT-digits"] = DiTConfig(
    input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4,
    num_classes=10, learn_sigma=False, label_init_std=1.0)
DIT_CONFIGS["DiT-digits-sigma"] = dataclasses.replace(DIT_CONFIGS["DiT-digits"], learn_sigma=True)
DIT_CONFIGS["DiT-tiny"] = DiTConfig(
    input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
    num_classes=10, learn_sigma=False)


# Logical axis names of every DiT parameter ('/'-joined path regex, names), for the sharding rules
# of `jaxinf.parallel` (the mechanism of `jaxinf.models.families.param_axes_from_rules`):
# Megatron-style, attention's fused qkv and the MLP's fc1 are column-parallel ("qkv", "mlp"),
# their output projections row-parallel; embeddings, modulations and the final layer replicate.
DIT_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"x_embedder/kernel", ("patch", "embed")),
    (r"(x_embedder|t_embedder/linear_[12]|blocks/\d+/attn/proj|blocks/\d+/mlp/fc2)/bias",
     ("embed",)),
    (r"t_embedder/linear_1/kernel", ("frequency", "embed")),
    (r"t_embedder/linear_2/kernel", ("embed", "embed")),
    (r"y_embedder/embedding", ("classes", "embed")),
    (r"blocks/\d+/attn/qkv/kernel", ("embed", "qkv")),
    (r"blocks/\d+/attn/qkv/bias", ("qkv",)),
    (r"blocks/\d+/attn/proj/kernel", ("heads", "embed")),
    (r"blocks/\d+/mlp/fc1/kernel", ("embed", "mlp")),
    (r"blocks/\d+/mlp/fc1/bias", ("mlp",)),
    (r"blocks/\d+/mlp/fc2/kernel", ("mlp", "embed")),
    (r"(blocks/\d+|final_layer)/adaLN_modulation/kernel", ("embed", "modulation")),
    (r"(blocks/\d+|final_layer)/adaLN_modulation/bias", ("modulation",)),
    (r"final_layer/linear/kernel", ("embed", "patch")),
    (r"final_layer/linear/bias", ("patch",)),
)

# The DiT's `[in, out]` matmul weights (every `layers.Linear` kernel): the leaves a low-bit weight
# (`jaxinf.quant.base.QuantizedWeight`) may replace; the label table and biases stay floating.
DIT_MATMUL_WEIGHTS = r".*/kernel"


def dit_config(name: str, **overrides: Any) -> DiTConfig:
  """A named configuration (`DiT-XL/2`, ..., `DiT-digits`), optionally with fields replaced."""
  if name not in DIT_CONFIGS:
    raise ValueError(f"name: unknown DiT config {name!r}; known: {sorted(DIT_CONFIGS)}")
  return dataclasses.replace(DIT_CONFIGS[name], **overrides)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (timm's `Attention`, qkv_bias=True)."""

  def __init__(self, dim: int, num_heads: int, dtype, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.qkv = layers.Linear(dim, 3 * dim, kernel_init=_xavier, dtype=dtype, rngs=rngs)
    self.proj = layers.Linear(dim, dim, kernel_init=_xavier, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
    # Megatron (Shoeybi et al. 2019, §3): whole heads per tensor shard (a no-op without a mesh)
    q, k, v = (constrain(a, ("batch", None, "head_count", None)) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v)
    return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
  """fc1 -> tanh-GELU -> fc2 (timm's `Mlp` with `GELU(approximate="tanh")`)."""

  def __init__(self, dim: int, hidden: int, dtype, *, rngs: nnx.Rngs):
    self.fc1 = layers.Linear(dim, hidden, kernel_init=_xavier, dtype=dtype, rngs=rngs)
    self.fc2 = layers.Linear(hidden, dim, kernel_init=_xavier, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
  """adaLN-Zero block (DiT Fig. 3): gated residual attention and MLP, modulated by the condition."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    d = cfg.hidden_size
    self.eps = cfg.layer_norm_eps
    self.mlp_eps = cfg.layer_norm_eps if cfg.mlp_norm_eps is None else cfg.mlp_norm_eps
    self.attn = Attention(d, cfg.num_heads, dtype, rngs=rngs)
    self.mlp = Mlp(d, int(d * cfg.mlp_ratio), dtype, rngs=rngs)
    self.adaLN_modulation = layers.Linear(
        d, 6 * d, kernel_init=_zeros, bias_init=_zeros, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    return self.forward_with_features(x, c)[0]

  def forward_with_features(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The block, also returning its attention and MLP outputs before gating `[2, B, T, D]` —
    what feature caching (FORA) reuses at later steps."""
    x = layers.materialize_cotangent(x)  # training speed on CPU; see its docstring
    mod = self.adaLN_modulation(jax.nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = layers.modulate(layers.layer_norm(x, self.eps), shift_msa, scale_msa)
    attn = self.attn(h)
    x = layers.materialize_cotangent(x + gate_msa[:, None] * attn)
    h = layers.modulate(layers.layer_norm(x, self.mlp_eps), shift_mlp, scale_mlp)
    mlp = self.mlp(h)
    return x + gate_mlp[:, None] * mlp, jnp.stack([attn, mlp])

  def forward_from_features(self, x: jax.Array, c: jax.Array, features: jax.Array) -> jax.Array:
    """The block with its attention and MLP outputs taken from `features` (computed at an
    earlier step): only the modulation, which depends on this step's t, is recomputed."""
    mod = self.adaLN_modulation(jax.nn.silu(c))
    _, _, gate_msa, _, _, gate_mlp = jnp.split(mod, 6, axis=-1)
    x = x + gate_msa[:, None] * features[0].astype(x.dtype)
    return x + gate_mlp[:, None] * features[1].astype(x.dtype)


class FinalLayer(nnx.Module):
  """Modulated LayerNorm and a zero-initialised linear map to `p*p*out_channels` per token."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    d = cfg.hidden_size
    self.eps = cfg.layer_norm_eps
    self.linear = layers.Linear(
        d, cfg.patch_size**2 * cfg.out_channels, kernel_init=_zeros, bias_init=_zeros,
        dtype=dtype, rngs=rngs)
    self.adaLN_modulation = layers.Linear(
        d, 2 * d, kernel_init=_zeros, bias_init=_zeros, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
    return self.linear(layers.modulate(layers.layer_norm(x, self.eps), shift, scale))


class TimestepEmbedder(nnx.Module):
  """Sinusoidal features of t into Linear-SiLU-Linear (DiT's `TimestepEmbedder`)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    dtype = jnp.dtype(cfg.dtype)
    self.frequency_embedding_size = cfg.frequency_embedding_size
    self.freq_shift = cfg.timestep_freq_shift
    self.linear_1 = layers.Linear(cfg.frequency_embedding_size, cfg.hidden_size, kernel_init=init,
                                  dtype=dtype, rngs=rngs)
    self.linear_2 = layers.Linear(cfg.hidden_size, cfg.hidden_size, kernel_init=init, dtype=dtype,
                                  rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    freq = layers.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
    return self.linear_2(jax.nn.silu(self.linear_1(freq)))


class DiT(nnx.Module):
  """Class-conditional DiT. Call as `model(x [B,H,W,C], t [B], y [B] int) -> [B,H,W,out_channels]`.

  `y == cfg.null_class` selects the unconditional embedding (classifier-free guidance); use
  `drop_labels` in training to replace labels by it with probability `class_dropout_prob`.
  """

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    dtype = jnp.dtype(cfg.dtype)
    self.x_embedder = layers.Linear(cfg.patch_size**2 * cfg.in_channels, d, kernel_init=_xavier,
                                    dtype=dtype, rngs=rngs)
    self.t_embedder = TimestepEmbedder(cfg, rngs=rngs)
    num_rows = cfg.num_classes + (1 if cfg.null_class is not None else 0)
    self.y_embedder = nnx.Embed(num_rows, d, embedding_init=nnx.initializers.normal(
        cfg.label_init_std), dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_layer = FinalLayer(cfg, rngs=rngs)

  def check_inputs(self, x, t, y) -> None:
    """Raises ValueError for shapes or (concrete) labels the model was not built for."""
    check_dit_inputs(self.cfg, x, t, y)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    h, c = self._embed(x, t, y)
    for block in self.blocks:
      h = block(h, c)
    return self._head(h, c)

  def forward_with_features(self, x, t, y) -> tuple[jax.Array, jax.Array]:
    """(output, every block's attention/MLP outputs `[depth, 2, B, T, D]`) for feature caching."""
    h, c = self._embed(x, t, y)
    features = []
    for block in self.blocks:
      h, f = block.forward_with_features(h, c)
      features.append(f)
    return self._head(h, c), jnp.stack(features)

  def forward_from_features(self, x, t, y, features: jax.Array) -> jax.Array:
    """The output with every block's attention and MLP taken from `features` (FORA, Selvaraju et
    al. 2024): embeddings, modulations and the final layer run; attention and MLPs are skipped."""
    h, c = self._embed(x, t, y)
    for i, block in enumerate(self.blocks):
      h = block.forward_from_features(h, c, features[i])
    return self._head(h, c)

  def _embed(self, x, t, y):
    cfg = self.cfg
    self.check_inputs(x, t, y)
    dtype = jnp.dtype(cfg.dtype)
    pos = jnp.asarray(layers.sincos_2d(cfg.hidden_size, cfg.grid_size), dtype)
    h = self.x_embedder(layers.patchify(x.astype(dtype), cfg.patch_size)) + pos[None]
    h = constrain(h, ("batch", None, None))  # data parallel on a mesh; a no-op without one
    return h, self.t_embedder(t) + self.y_embedder(y)

  def _head(self, h, c):
    cfg = self.cfg
    out = layers.unpatchify(self.final_layer(h, c), cfg.patch_size, cfg.grid_size,
                            cfg.out_channels)
    return out.astype(jnp.float32)

  def drop_labels(self, y: jax.Array, key: jax.Array) -> jax.Array:
    """Label dropout for classifier-free guidance training (DiT's `LabelEmbedder.token_drop`)."""
    return drop_labels(self.cfg, y, key)


def jitter_params(params, seed: int, scale: float = 0.05):
  """`params` with `scale * N(0, 1)` added to every leaf (noise from `seed`), each leaf keeping its
  sharding: one jitted program with the leaves' shardings as its output shardings, so it runs
  on arrays sharded over a mesh and over processes alike.

  A freshly initialised DiT outputs exactly zero (adaLN-Zero: the modulation and output layers
  start at zero), so comparing two ways of running an untrained DiT (sharded against one device,
  restored against saved) compares only the noise and solver arithmetic. Jittered weights make
  every token's output depend on every weight and on the other tokens; the tests and the
  scale-out studies use them for random-weight comparisons."""
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise TypeError(f"seed: expected an int, got {seed!r}")

  def jitter(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + jnp.asarray(scale, x.dtype) * jax.random.normal(
        k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

  leaves = jax.tree.leaves(params)
  if leaves and all(isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
                    for x in leaves):
    return jax.jit(jitter, out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)
  return jax.jit(jitter)(params)


def drop_labels(cfg: DiTConfig, y: jax.Array, key: jax.Array) -> jax.Array:
  """Replaces each label by the null class with probability `cfg.class_dropout_prob`."""
  if cfg.null_class is None:
    return y
  drop = jax.random.uniform(key, y.shape) < cfg.class_dropout_prob
  return jnp.where(drop, cfg.null_class, y)


def check_dit_inputs(cfg: DiTConfig, x, t, y) -> None:
  """Shape checks always; label-range checks when `y` holds concrete values (outside jit)."""
  if x.ndim != 4 or tuple(x.shape[1:]) != cfg.sample_shape:
    raise ValueError(
        f"x: expected [B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}] for this DiT, "
        f"got {tuple(x.shape)}")
  b = x.shape[0]
  if tuple(jnp.shape(t)) != (b,):
    raise ValueError(f"t: expected shape [{b}], got {tuple(jnp.shape(t))}")
  if tuple(jnp.shape(y)) != (b,):
    raise ValueError(f"y: expected shape [{b}], got {tuple(jnp.shape(y))}")
  if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
    raise TypeError(f"y: expected integer class labels, got dtype {jnp.result_type(y)}")
  check_labels(cfg, y)


def check_labels(cfg: DiTConfig, y, *, allow_null: bool = True) -> None:
  """Raises ValueError if concrete labels fall outside [0, num_classes) (plus the null class)."""
  if isinstance(y, jax.core.Tracer):
    return
  y = np.asarray(y)
  if y.size == 0:
    return
  hi = cfg.num_classes + (1 if allow_null and cfg.null_class is not None else 0)
  lo_val, hi_val = int(y.min()), int(y.max())
  if lo_val < 0 or hi_val >= hi:
    raise ValueError(
        f"y: class labels must lie in [0, {hi}) for this DiT "
        f"({cfg.num_classes} classes{', null class ' + str(cfg.null_class) if hi > cfg.num_classes else ''}), "
        f"got values in [{lo_val}, {hi_val}]")
