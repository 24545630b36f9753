"""DiT checkpoints from the two places they are published, into `jaxinf.models.dit.DiT` params.

Sources (both read from safetensors; see `jaxinf.checkpoints.torch_weights`):

- **The original release** (facebookresearch/DiT `models.py`, e.g. `DiT-XL-2-256x256.pt` re-saved
  as safetensors): `x_embedder.proj` (a strided Conv2d), `pos_embed` (the fixed sin-cos table),
  `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`, `blocks.N.attn.{qkv,proj}`,
  `blocks.N.mlp.{fc1,fc2}`, `blocks.N.adaLN_modulation.1`, `final_layer.linear`,
  `final_layer.adaLN_modulation.1`.
- **diffusers** (`DiTTransformer2DModel`, e.g. `facebook/DiT-XL-2-256/transformer/`):
  `pos_embed.proj`, `transformer_blocks.N.norm1.emb.{timestep_embedder.linear_{1,2},
  class_embedder.embedding_table}`, `transformer_blocks.N.norm1.linear`,
  `transformer_blocks.N.attn1.{to_q,to_k,to_v,to_out.0}`, `transformer_blocks.N.ff.net.{0.proj,2}`,
  `proj_out_1`, `proj_out_2`. This is the renaming of diffusers' `scripts/convert_dit_to_diffusers.py`.

How diffusers' DiT differs from the release (read from diffusers' `dit_transformer_2d.py`,
`attention.py` `BasicTransformerBlock(norm_type="ada_norm_zero")`, `normalization.py`
`AdaLayerNormZero` and `embeddings.py` `CombinedTimestepLabelEmbeddings`):

1. Timestep frequencies. The release uses `exp(-log(10000) i / 128)`; diffusers'
   `CombinedTimestepLabelEmbeddings` uses `Timesteps(256, flip_sin_to_cos=True,
   downscale_freq_shift=1)`, i.e. `exp(-log(10000) i / 127)`. Same weights, different features:
   `DiTConfig.timestep_freq_shift = 1`.
2. The LayerNorm before the MLP. The release uses eps 1e-6 everywhere; diffusers' block uses
   `norm3 = nn.LayerNorm(dim, norm_eps)` with `norm_eps = 1e-5` by default (the attention norm
   inside `AdaLayerNormZero` and the final `norm_out` keep 1e-6): `DiTConfig.mlp_norm_eps = 1e-5`.
3. Structure, not arithmetic: every diffusers block owns a copy of the timestep and class embedders
   (`norm1.emb`), and the output layer uses block 0's. The release has one shared embedder. A
   converted checkpoint holds identical copies; the converter takes block 0's and refuses a
   checkpoint whose copies differ, since no single shared embedder would reproduce it.
4. Layout only: q, k, v are three Linears (the release fuses them into `qkv`), and the patch
   embedding is a Conv2d in both (jaxinf's is a Linear on patches flattened in (p, q, c) order).

So `dit_config_from_diffusers` sets `timestep_freq_shift=1` and `mlp_norm_eps=norm_eps`; the same
weights under the release's config reproduce the release's model. Both are tested against diffusers
on small random weights in `tests/parity/test_dit_vs_diffusers.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxinf.checkpoints import arrays
from jaxinf.checkpoints.torch_weights import (StateDict, check_source_keys, checkpoint_files,
                                              linear_kernel, read_safetensors)
from jaxinf.checkpoints.validate import check_state_dict
from jaxinf.models import layers
from jaxinf.models.dit import DiT, DiTConfig

SOURCES = ("diffusers", "original")
# diffusers hard-codes these in `CombinedTimestepLabelEmbeddings` and `FeedForward`.
_DIFFUSERS_CLASS_DROPOUT = 0.1
_DIFFUSERS_MLP_RATIO = 4.0


# ----------------------------------------------------------------------------------------------
# Configs


def dit_config_from_diffusers(config: Mapping[str, Any] | str | os.PathLike, **overrides: Any
                              ) -> DiTConfig:
  """The `DiTConfig` of a diffusers `DiTTransformer2DModel` config (a dict or a `config.json`).

  Missing entries take `DiTTransformer2DModel`'s defaults (as diffusers does when it loads), and
  options jaxinf's DiT does not implement are refused by name.
  """
  if isinstance(config, (str, os.PathLike)):
    path = Path(config)
    if not path.is_file():
      raise FileNotFoundError(f"config: no such file {str(path)!r}")
    config = json.loads(path.read_text())
  if not isinstance(config, Mapping):
    raise TypeError(f"config: expected a mapping or a path to config.json, got {type(config)}")
  get = lambda k, d: d if config.get(k) is None else config[k]  # noqa: E731
  required = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
              "norm_elementwise_affine": False, "attention_bias": True}
  for key, want in required.items():
    if get(key, want) != want:
      raise ValueError(f"config: {key}={config[key]!r} is not a DiT; jaxinf's DiT needs {want!r}")
  for key in ("num_vector_embeds", "cross_attention_dim", "caption_channels"):
    if config.get(key) is not None:
      raise ValueError(f"config: {key}={config[key]!r} is not supported by jaxinf's DiT")
  if get("patch_size", 2) is None:
    raise ValueError("config: patch_size is None (not a patch transformer)")
  in_channels = get("in_channels", 4)
  out_channels = get("out_channels", in_channels)
  if out_channels not in (in_channels, 2 * in_channels):
    raise ValueError(f"config: out_channels={out_channels} must be in_channels ({in_channels}) or "
                     f"2 * in_channels (learned sigma)")
  heads, head_dim = get("num_attention_heads", 16), get("attention_head_dim", 72)
  fields = dict(
      input_size=get("sample_size", 32), patch_size=get("patch_size", 2), in_channels=in_channels,
      hidden_size=heads * head_dim, depth=get("num_layers", 28), num_heads=heads,
      mlp_ratio=_DIFFUSERS_MLP_RATIO, class_dropout_prob=_DIFFUSERS_CLASS_DROPOUT,
      num_classes=get("num_embeds_ada_norm", 1000), learn_sigma=out_channels == 2 * in_channels,
      timestep_freq_shift=1.0, mlp_norm_eps=float(get("norm_eps", 1e-5)))
  fields.update(overrides)
  return DiTConfig(**fields)


def infer_dit_config(state_dict: Mapping[str, np.ndarray], source: str, *, num_heads: int,
                     **overrides: Any) -> DiTConfig:
  """A `DiTConfig` read off the shapes of a state dict (`num_heads` is not in any shape).

  For `source="original"` the result is the release's model; for `"diffusers"` it carries
  diffusers' timestep shift and its default `norm_eps` of 1e-5 (pass `mlp_norm_eps=` to override, or
  use `dit_config_from_diffusers` with the checkpoint's `config.json`, which is exact).
  """
  _check_source(source)
  names = _SOURCE_NAMES[source]
  for key in (names["patch"], names["labels"], names["out"]):
    if key not in state_dict:
      raise ValueError(f"state_dict: cannot infer the config of a {source} DiT without {key!r}")
  patch_w = state_dict[names["patch"]]
  hidden, in_channels, p, _ = patch_w.shape
  depth = _count_blocks(state_dict, names["block_prefix"])
  out_per_token = state_dict[names["out"]].shape[0]
  out_channels = out_per_token // (p * p)
  rows = state_dict[names["labels"]].shape[0]
  if source == "original":
    if "pos_embed" not in state_dict:
      raise ValueError("state_dict: cannot infer input_size without 'pos_embed'")
    tokens = state_dict["pos_embed"].shape[1]
  else:
    tokens = None
  if out_channels not in (in_channels, 2 * in_channels):
    raise ValueError(f"state_dict: {names['out']} gives {out_channels} output channels for "
                     f"{in_channels} input channels")
  fields: dict[str, Any] = dict(
      patch_size=int(p), in_channels=int(in_channels), hidden_size=int(hidden), depth=depth,
      num_heads=num_heads, num_classes=int(rows) - 1, class_dropout_prob=0.1,
      learn_sigma=out_channels == 2 * in_channels)
  if tokens is not None:
    fields["input_size"] = int(round(tokens**0.5)) * int(p)
  if source == "diffusers":
    fields.update(timestep_freq_shift=1.0, mlp_norm_eps=1e-5, mlp_ratio=_DIFFUSERS_MLP_RATIO)
    if "input_size" not in overrides:
      raise ValueError("input_size: a diffusers DiT state dict does not record the latent size "
                       "(sample_size); pass input_size=, or use dit_config_from_diffusers")
  fields.update(overrides)
  return DiTConfig(**fields)


def _count_blocks(state_dict, prefix: str) -> int:
  ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
  if not ids or ids != set(range(len(ids))):
    raise ValueError(f"state_dict: blocks {sorted(ids)} under {prefix!r} are not 0..N-1")
  return len(ids)


# ----------------------------------------------------------------------------------------------
# Name maps. Each entry: source name -> (jaxinf name, transform).

_Transform = Callable[[np.ndarray], np.ndarray]
_identity: _Transform = lambda w: w  # noqa: E731

_SOURCE_NAMES = {
    "original": dict(patch="x_embedder.proj.weight", labels="y_embedder.embedding_table.weight",
                     out="final_layer.linear.weight", block_prefix="blocks."),
    "diffusers": dict(patch="pos_embed.proj.weight",
                      labels="transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
                      out="proj_out_2.weight", block_prefix="transformer_blocks."),
}


def _patch_kernel(weight: np.ndarray) -> np.ndarray:
  """Conv2d `[D, C, p, q]` with stride p -> a Linear on patches flattened in (p, q, c) order."""
  d = weight.shape[0]
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, d))


def _linear(src: str, dst: str) -> list[tuple[str, str, _Transform]]:
  return [(f"{src}.weight", f"{dst}/kernel", linear_kernel), (f"{src}.bias", f"{dst}/bias", _identity)]


def _original_map(cfg: DiTConfig) -> list[tuple[str, str, _Transform]]:
  m = [("x_embedder.proj.weight", "x_embedder/kernel", _patch_kernel),
       ("x_embedder.proj.bias", "x_embedder/bias", _identity),
       *_linear("t_embedder.mlp.0", "t_embedder/linear_1"),
       *_linear("t_embedder.mlp.2", "t_embedder/linear_2"),
       ("y_embedder.embedding_table.weight", "y_embedder/embedding", _identity),
       *_linear("final_layer.linear", "final_layer/linear"),
       *_linear("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation")]
  for i in range(cfg.depth):
    s, d = f"blocks.{i}", f"blocks/{i}"
    m += [*_linear(f"{s}.attn.qkv", f"{d}/attn/qkv"), *_linear(f"{s}.attn.proj", f"{d}/attn/proj"),
          *_linear(f"{s}.mlp.fc1", f"{d}/mlp/fc1"), *_linear(f"{s}.mlp.fc2", f"{d}/mlp/fc2"),
          *_linear(f"{s}.adaLN_modulation.1", f"{d}/adaLN_modulation")]
  return m


_EMB = "norm1.emb"
# The per-block copies of the shared embedders in diffusers (difference 3 above).
_DIFFUSERS_EMBEDDER_KEYS = (
    f"{_EMB}.timestep_embedder.linear_1.weight", f"{_EMB}.timestep_embedder.linear_1.bias",
    f"{_EMB}.timestep_embedder.linear_2.weight", f"{_EMB}.timestep_embedder.linear_2.bias",
    f"{_EMB}.class_embedder.embedding_table.weight")


def _diffusers_map(cfg: DiTConfig) -> list[tuple[str, str, _Transform]]:
  b0 = "transformer_blocks.0"
  m = [("pos_embed.proj.weight", "x_embedder/kernel", _patch_kernel),
       ("pos_embed.proj.bias", "x_embedder/bias", _identity),
       *_linear(f"{b0}.{_EMB}.timestep_embedder.linear_1", "t_embedder/linear_1"),
       *_linear(f"{b0}.{_EMB}.timestep_embedder.linear_2", "t_embedder/linear_2"),
       (f"{b0}.{_EMB}.class_embedder.embedding_table.weight", "y_embedder/embedding", _identity),
       *_linear("proj_out_2", "final_layer/linear"),
       *_linear("proj_out_1", "final_layer/adaLN_modulation")]
  for i in range(cfg.depth):
    s, d = f"transformer_blocks.{i}", f"blocks/{i}"
    m += [*_linear(f"{s}.attn1.to_out.0", f"{d}/attn/proj"),
          *_linear(f"{s}.ff.net.0.proj", f"{d}/mlp/fc1"), *_linear(f"{s}.ff.net.2", f"{d}/mlp/fc2"),
          *_linear(f"{s}.norm1.linear", f"{d}/adaLN_modulation")]
  return m


def _diffusers_qkv(state_dict: StateDict, i: int) -> dict[str, np.ndarray]:
  """to_q, to_k, to_v -> the fused qkv Linear; outputs ordered (q, k, v), then heads, as in timm."""
  s = f"transformer_blocks.{i}.attn1"
  w = np.concatenate([state_dict[f"{s}.to_{n}.weight"] for n in "qkv"], axis=0)
  b = np.concatenate([state_dict[f"{s}.to_{n}.bias"] for n in "qkv"], axis=0)
  return {f"blocks/{i}/attn/qkv/kernel": linear_kernel(w), f"blocks/{i}/attn/qkv/bias": b}


# ----------------------------------------------------------------------------------------------
# Conversion


def dit_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig,
                               source: str) -> dict:
  """jaxinf DiT params (the nested dict of `to_functional(DiT(cfg))`) from a foreign state dict.

  Every name is mapped explicitly; a missing or unexpected name, a shape that does not fit `cfg`,
  a stored position table that differs from the fixed sin-cos one, or (diffusers) per-block
  embedder copies that differ raise ValueError with the list.
  """
  _check_source(source)
  if not isinstance(cfg, DiTConfig):
    raise TypeError(f"cfg: expected a DiTConfig, got {type(cfg).__name__}")
  what = f"{source} DiT state dict"
  check_state_dict(state_dict, where=what)
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  if source == "original":
    name_map = _original_map(cfg)
    expected = [src for src, _, _ in name_map] + ["pos_embed"]
    check_source_keys(state_dict, expected, what)
    pos_key: str | None = "pos_embed"
  else:
    name_map = _diffusers_map(cfg)
    copies = [f"transformer_blocks.{i}.{k}" for i in range(1, cfg.depth)
              for k in _DIFFUSERS_EMBEDDER_KEYS]
    qkv = [f"transformer_blocks.{i}.attn1.to_{n}.{p}" for i in range(cfg.depth) for n in "qkv"
           for p in ("weight", "bias")]
    # Older diffusers stored the fixed position table as a buffer; newer ones do not.
    check_source_keys(state_dict, [src for src, _, _ in name_map] + copies + qkv, what,
                      optional=["pos_embed.pos_embed"])
    pos_key = "pos_embed.pos_embed" if "pos_embed.pos_embed" in state_dict else None
    _check_embedder_copies(state_dict, cfg.depth)

  flat: dict[str, np.ndarray] = {}
  for src, dst, transform in name_map:
    flat[dst] = np.asarray(transform(state_dict[src]), np.float32)
  if source == "diffusers":
    for i in range(cfg.depth):
      flat.update(_diffusers_qkv(state_dict, i))
  arrays.check_keys(flat, dit_param_shapes(cfg), what=f"{what} converted for {cfg}")
  if pos_key is not None:
    _check_pos_embed(state_dict[pos_key], cfg, f"{what}: {pos_key!r}")
  return arrays.unflatten_params(flat)


def _check_embedder_copies(state_dict: StateDict, depth: int) -> None:
  differ = [f"transformer_blocks.{i}.{k}" for i in range(1, depth) for k in _DIFFUSERS_EMBEDDER_KEYS
            if not np.array_equal(state_dict[f"transformer_blocks.{i}.{k}"],
                                  state_dict[f"transformer_blocks.0.{k}"])]
  if differ:
    raise ValueError(
        "state_dict: these per-block timestep/class embedder copies differ from block 0's, so no "
        f"single shared embedder (the release's DiT, and jaxinf's) reproduces the model: {differ}")


def _check_pos_embed(stored: np.ndarray, cfg: DiTConfig, what: str) -> None:
  want = layers.sincos_2d(cfg.hidden_size, cfg.grid_size)
  if stored.size != want.size:
    raise ValueError(f"{what}: shape {stored.shape} does not fit a {cfg.grid_size}x{cfg.grid_size}"
                     f" grid of width {cfg.hidden_size} ({want.shape})")
  # The table is fixed (computed in float64, stored in float32), so it must agree to fp32 rounding.
  err = float(np.max(np.abs(np.asarray(stored, np.float32).reshape(want.shape) - want)))
  if err > 1e-6:
    raise ValueError(f"{what}: differs from the fixed 2-D sin-cos table by {err:.3g}; jaxinf "
                     "computes that table and cannot use a learned one")


def dit_param_shapes(cfg: DiTConfig) -> dict[str, np.ndarray]:
  """'/'-joined param names of `DiT(cfg)` -> zero-strided placeholders of the right shape.

  Built abstractly (`nnx.eval_shape`), so it costs nothing even for DiT-XL.
  """
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  tree = nnx.to_pure_dict(nnx.state(abstract))
  placeholders = jax.tree_util.tree_map(
      lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), tree)
  return arrays.flatten_params(placeholders)


def load_dit(path: str | os.PathLike, source: str, cfg: DiTConfig | None = None, *,
             num_heads: int | None = None) -> tuple[DiTConfig, dict]:
  """(cfg, params) from a safetensors checkpoint on disk.

  diffusers: `path` is the `transformer/` folder (holding `config.json` and
  `diffusion_pytorch_model*.safetensors`) or the safetensors file itself; the config comes from
  `config.json` when `cfg` is None. original: `path` is the safetensors file, and `cfg` (or
  `num_heads`, to infer the rest from shapes) is required.
  """
  _check_source(source)
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"path: {str(path)!r} does not exist")
  state_dict = read_safetensors(checkpoint_files(path))
  if cfg is None:
    config_json = (path if path.is_dir() else path.parent) / "config.json"
    if source == "diffusers" and config_json.is_file():
      cfg = dit_config_from_diffusers(config_json)
    elif num_heads is not None:
      cfg = infer_dit_config(state_dict, source, num_heads=num_heads)
    else:
      raise ValueError(f"cfg: no config.json beside {str(path)!r}; pass cfg= or num_heads=")
  return cfg, dit_params_from_state_dict(state_dict, cfg, source)


def _check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f"source: expected one of {list(SOURCES)}, got {source!r}")


def release_config(cfg: DiTConfig) -> DiTConfig:
  """The same architecture computed as the original release does (undoes diffusers' two
  numerical differences)."""
  return dataclasses.replace(cfg, timestep_freq_shift=0.0, mlp_norm_eps=None)
