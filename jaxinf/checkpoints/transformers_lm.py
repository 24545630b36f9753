"""Language-model checkpoints in transformers' layout, into jaxinf's softmax transformer and Mamba.

    model, params = load_llama("path/to/llama-folder")     # config.json + model*.safetensors
    model, params = load_mamba("path/to/mamba-folder")

Sources, read from safetensors only (never pickle; see `jaxinf.checkpoints.torch_weights`):

- `LlamaForCausalLM` (transformers `models/llama/modeling_llama.py`): `model.embed_tokens`,
  `model.layers.N.{input_layernorm, post_attention_layernorm}`,
  `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
  `model.norm`, `lm_head` (absent when `tie_word_embeddings`). The rotary tables are buffers, not
  weights. q/k need no permutation: jaxinf's RoPE uses the same rotate-half pairing.
- `MambaForCausalLM` (transformers `models/mamba/modeling_mamba.py`, the layout of mamba_ssm's
  `MambaLMHeadModel` with `backbone.embedding` renamed `backbone.embeddings`):
  `backbone.embeddings`, `backbone.layers.N.norm`, `backbone.layers.N.mixer.{in_proj, conv1d,
  x_proj, dt_proj, out_proj, A_log, D}`, `backbone.norm_f`, `lm_head` (tied by default). The
  depthwise `conv1d.weight [Di, 1, W]` becomes `conv_weight [W, Di]` (tap w multiplies the input
  W - 1 - w steps back); `dt_proj.bias` becomes `dt_bias`, which the selective scan adds before
  its softplus, as mamba_ssm's `delta_bias`.

Every name is mapped explicitly. A state dict with a missing or unexpected key, or a wrong shape,
is refused with the lists; with tied embeddings an `lm_head.weight` (which `state_dict()` itself
contains) is accepted only if it equals the embedding. Configs are read from `config.json`;
options whose arithmetic jaxinf does not implement (biases in Llama's projections, rope scaling,
activations other than SiLU) are refused, not ignored.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.checkpoints import arrays
from jaxinf.checkpoints.torch_weights import (StateDict, check_source_keys, linear_kernel,
                                              read_safetensors)
from jaxinf.checkpoints.validate import check_state_dict
from jaxinf.models.mamba import MambaConfig, MambaLM
from jaxinf.models.transformer import TransformerConfig, TransformerLM

# ---------------------------------------------------------------------------------------------
# Files


def model_files(path: str | os.PathLike) -> list[Path]:
  """transformers' weight file(s) in a folder: `model.safetensors` or its `model-*-of-*` shards
  (or a single `.safetensors` file given directly)."""
  path = Path(path)
  if path.is_file():
    return [path]
  if (path / "model.safetensors").is_file():
    return [path / "model.safetensors"]
  shards = sorted(path.glob("model-*-of-*.safetensors"))
  if shards:
    return shards
  found = sorted(p.name for p in path.glob("*")) if path.is_dir() else "no such folder"
  raise FileNotFoundError(f"path: no model.safetensors (or shards) in {str(path)!r}; found "
                          f"{found} (pickled pytorch_model.bin files are not read)")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  file = Path(path) / "config.json"
  if not file.is_file():
    raise FileNotFoundError(f"path: no config.json in {str(path)!r}")
  return json.loads(file.read_text())


def _get(config: Mapping[str, Any], name: str, default: Any = KeyError) -> Any:
  if name in config and config[name] is not None:
    return config[name]
  if default is KeyError:
    raise ValueError(f"config: missing {name!r}")
  return default


def _refuse(config: Mapping[str, Any], name: str, allowed: tuple, default: Any) -> None:
  value = config.get(name, default)
  if value not in allowed:
    raise ValueError(f"config: {name}={value!r} is not implemented by jaxinf (supported: "
                     f"{list(allowed)})")


# ---------------------------------------------------------------------------------------------
# Llama


def llama_config_from_transformers(config: Mapping[str, Any],
                                   **overrides: Any) -> TransformerConfig:
  """`TransformerConfig` from a `LlamaConfig` dict (config.json), transformers 4.x or 5.x."""
  _refuse(config, "hidden_act", ("silu",), "silu")
  _refuse(config, "attention_bias", (False,), False)
  _refuse(config, "mlp_bias", (False,), False)
  # transformers 5 keeps rope settings in `rope_parameters`; 4.x had `rope_theta` + `rope_scaling`.
  rope = dict(config.get("rope_parameters") or {})
  scaling = config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise ValueError(f"config: rope_type={rope_type!r} is not implemented by jaxinf (supported: "
                     "['default'])")
  theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
  heads = _get(config, "num_attention_heads")
  fields = dict(
      vocab_size=_get(config, "vocab_size"),
      hidden_size=_get(config, "hidden_size"),
      num_layers=_get(config, "num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=_get(config, "num_key_value_heads", heads),
      head_dim=_get(config, "head_dim", None),
      mlp_hidden=_get(config, "intermediate_size"),
      rope_theta=float(theta),
      norm_eps=float(_get(config, "rms_norm_eps", 1e-6)),
      tie_embeddings=bool(_get(config, "tie_word_embeddings", False)),
      max_len=_get(config, "max_position_embeddings", 2048),
      init_std=float(_get(config, "initializer_range", 0.02)),
  )
  fields.update(overrides)
  return TransformerConfig(**fields)


def llama_params(state_dict: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict:
  """jaxinf `Transformer` params from a `LlamaForCausalLM` state dict (numpy arrays)."""
  check_state_dict(state_dict, where="LlamaForCausalLM state dict")
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  src: dict[str, tuple[str, str]] = {"embed_tokens/embedding": ("model.embed_tokens.weight", "id"),
                                     "norm/weight": ("model.norm.weight", "id")}
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    src[f"layers/{i}/input_layernorm/weight"] = (pre + "input_layernorm.weight", "id")
    src[f"layers/{i}/post_attention_layernorm/weight"] = (
        pre + "post_attention_layernorm.weight", "id")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      src[f"layers/{i}/self_attn/{name}/kernel"] = (pre + f"self_attn.{name}.weight", "linear")
    for name in ("gate_proj", "up_proj", "down_proj"):
      src[f"layers/{i}/mlp/{name}/kernel"] = (pre + f"mlp.{name}.weight", "linear")
  if not cfg.tie_embeddings:
    src["lm_head/kernel"] = ("lm_head.weight", "linear")
  _check_tied(sd, cfg.tie_embeddings, "model.embed_tokens.weight", "LlamaForCausalLM state dict")
  return _convert(sd, src, TransformerLM(cfg).abstract_params(), "LlamaForCausalLM state dict",
                  optional=("lm_head.weight",) if cfg.tie_embeddings else ())


def load_llama(path: str | os.PathLike, **overrides: Any) -> tuple[TransformerLM, dict]:
  """(model, params) from a transformers Llama folder: config.json + model*.safetensors."""
  cfg = llama_config_from_transformers(read_config(path), **overrides)
  return TransformerLM(cfg), llama_params(read_safetensors(model_files(path)), cfg)


# ---------------------------------------------------------------------------------------------
# Mamba


def mamba_config_from_transformers(config: Mapping[str, Any], **overrides: Any) -> MambaConfig:
  """`MambaConfig` (jaxinf's) from a transformers `MambaConfig` dict (config.json)."""
  _refuse(config, "hidden_act", ("silu",), "silu")
  hidden = _get(config, "hidden_size")
  expand = _get(config, "expand", 2)
  rank = config.get("time_step_rank", "auto")
  rank = math.ceil(hidden / 16) if rank in ("auto", None) else int(rank)
  inner = config.get("intermediate_size")
  if inner is not None and inner != expand * hidden:
    raise ValueError(f"config: intermediate_size {inner} != expand * hidden_size "
                     f"({expand} * {hidden})")
  fields = dict(
      vocab_size=_get(config, "vocab_size"),
      hidden_size=hidden,
      num_layers=_get(config, "num_hidden_layers"),
      state_size=_get(config, "state_size", 16),
      expand=expand,
      conv_kernel=_get(config, "conv_kernel", 4),
      dt_rank=rank,
      norm_eps=float(_get(config, "layer_norm_epsilon", 1e-5)),
      use_bias=bool(_get(config, "use_bias", False)),
      use_conv_bias=bool(_get(config, "use_conv_bias", True)),
      tie_embeddings=bool(_get(config, "tie_word_embeddings", True)),
  )
  fields.update(overrides)
  return MambaConfig(**fields)


def mamba_params(state_dict: Mapping[str, np.ndarray], cfg: MambaConfig) -> dict:
  """jaxinf `Mamba` params from a `MambaForCausalLM` state dict (numpy arrays)."""
  check_state_dict(state_dict, where="MambaForCausalLM state dict")
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  src: dict[str, tuple[str, str]] = {"embeddings/embedding": ("backbone.embeddings.weight", "id"),
                                     "norm_f/weight": ("backbone.norm_f.weight", "id")}
  for i in range(cfg.num_layers):
    pre, dst = f"backbone.layers.{i}.", f"layers/{i}/"
    src[dst + "norm/weight"] = (pre + "norm.weight", "id")
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
      src[dst + f"mixer/{name}/kernel"] = (pre + f"mixer.{name}.weight", "linear")
    if cfg.use_bias:
      for name in ("in_proj", "out_proj"):
        src[dst + f"mixer/{name}/bias"] = (pre + f"mixer.{name}.bias", "id")
    src[dst + "mixer/dt_bias"] = (pre + "mixer.dt_proj.bias", "id")
    src[dst + "mixer/conv_weight"] = (pre + "mixer.conv1d.weight", "conv1d")
    if cfg.use_conv_bias:
      src[dst + "mixer/conv_bias"] = (pre + "mixer.conv1d.bias", "id")
    src[dst + "mixer/A_log"] = (pre + "mixer.A_log", "id")
    src[dst + "mixer/D"] = (pre + "mixer.D", "id")
  if not cfg.tie_embeddings:
    src["lm_head/kernel"] = ("lm_head.weight", "linear")
  _check_tied(sd, cfg.tie_embeddings, "backbone.embeddings.weight", "MambaForCausalLM state dict")
  return _convert(sd, src, MambaLM(cfg).abstract_params(), "MambaForCausalLM state dict",
                  optional=("lm_head.weight",) if cfg.tie_embeddings else ())


def load_mamba(path: str | os.PathLike, **overrides: Any) -> tuple[MambaLM, dict]:
  """(model, params) from a transformers Mamba folder: config.json + model*.safetensors."""
  cfg = mamba_config_from_transformers(read_config(path), **overrides)
  return MambaLM(cfg), mamba_params(read_safetensors(model_files(path)), cfg)


# ---------------------------------------------------------------------------------------------
# Shared


def _conv1d_kernel(weight: np.ndarray) -> np.ndarray:
  """Depthwise `nn.Conv1d.weight [Di, 1, W]` -> `[W, Di]`."""
  if weight.ndim != 3 or weight.shape[1] != 1:
    raise ValueError(f"weight: expected a depthwise Conv1d weight [Di, 1, W], got {weight.shape}")
  return np.ascontiguousarray(weight[:, 0, :].T)


_LAYOUTS = {"id": lambda w: w, "linear": linear_kernel, "conv1d": _conv1d_kernel}


def _check_tied(sd: StateDict, tied: bool, embed_name: str, what: str) -> None:
  """A tied model's `lm_head.weight`, when present (`state_dict()` lists both names of a shared
  tensor), must be the embedding: anything else would be silently dropped."""
  if tied and "lm_head.weight" in sd and embed_name in sd:
    if sd["lm_head.weight"].shape != sd[embed_name].shape or \
        not np.array_equal(sd["lm_head.weight"], sd[embed_name]):
      raise ValueError(f"{what}: the config ties the embeddings, but lm_head.weight differs from "
                       f"{embed_name}; load with tie_embeddings=False")


def _flat_shapes(tree: dict, prefix: str = "") -> dict[str, Any]:
  """`arrays.flatten_params`'s names for a tree of `jax.ShapeDtypeStruct` (no weights allocated)."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_shapes(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _convert(sd: StateDict, src: dict[str, tuple[str, str]], template: dict, what: str,
             optional: tuple[str, ...] = ()) -> dict:
  check_source_keys(sd, [name for name, _ in src.values()], what, optional=optional)
  flat = {dst: _LAYOUTS[layout](sd[name]) for dst, (name, layout) in src.items()}
  arrays.check_keys(flat, _flat_shapes(template), what=f"{what} (converted)")
  return arrays.unflatten_params(flat)
