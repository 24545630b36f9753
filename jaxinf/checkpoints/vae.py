"""diffusers' `AutoencoderKL` checkpoints (e.g. `stabilityai/sd-vae-ft-ema`) into
`jaxinf.models.vae.AutoencoderKL` params.

Names are diffusers' own, walked from the config: `encoder.conv_in`,
`encoder.down_blocks.i.resnets.j.{norm1,conv1,norm2,conv2,conv_shortcut}`,
`encoder.down_blocks.i.downsamplers.0.conv`, `{encoder,decoder}.mid_block.resnets.{0,1}`,
`{encoder,decoder}.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`,
`decoder.up_blocks.i.upsamplers.0.conv`, `{encoder,decoder}.{conv_norm_out,conv_out}`,
`quant_conv`, `post_quant_conv`. Checkpoints saved before diffusers 0.14 name the mid-block
attention `query`, `key`, `value`, `proj_attn` (the hub's `sd-vae-ft-ema` does); they are renamed
exactly as diffusers' `ModelMixin._fix_state_dict_keys_on_load` renames them. GroupNorm
`weight` -> `scale`; Conv2d `[O, I, kh, kw]` -> `[kh, kw, I, O]`; Linear `[out, in]` -> `[in, out]`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxinf.checkpoints import arrays
from jaxinf.checkpoints.torch_weights import (check_source_keys, checkpoint_files, conv_kernel,
                                              linear_kernel, read_safetensors)
from jaxinf.checkpoints.validate import check_state_dict
from jaxinf.models.vae import AutoencoderKL, VAEConfig

_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_config_from_diffusers(config: Mapping[str, Any] | str | os.PathLike, **overrides: Any
                              ) -> VAEConfig:
  """The `VAEConfig` of a diffusers `AutoencoderKL` config (a dict or a `config.json`); missing
  entries take `AutoencoderKL`'s defaults, unsupported block types are refused by name."""
  if isinstance(config, (str, os.PathLike)):
    path = Path(config)
    if not path.is_file():
      raise FileNotFoundError(f"config: no such file {str(path)!r}")
    config = json.loads(path.read_text())
  if not isinstance(config, Mapping):
    raise TypeError(f"config: expected a mapping or a path to config.json, got {type(config)}")
  get = lambda k, d: d if config.get(k) is None else config[k]  # noqa: E731
  chans = tuple(int(c) for c in get("block_out_channels", (64,)))
  for key, want in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    types = list(get(key, [want] * len(chans)))
    if len(types) != len(chans) or any(t != want for t in types):
      raise ValueError(f"config: {key}={types} is not supported; jaxinf's VAE needs "
                       f"{len(chans)} x {want!r}")
  if get("act_fn", "silu") != "silu":
    raise ValueError(f"config: act_fn={config['act_fn']!r} is not supported (silu only)")
  for key in ("latents_mean", "latents_std"):
    if config.get(key) is not None:
      raise ValueError(f"config: {key} (per-channel latent statistics) is not supported")
  fields = dict(
      in_channels=get("in_channels", 3), out_channels=get("out_channels", 3),
      block_out_channels=chans, layers_per_block=get("layers_per_block", 1),
      latent_channels=get("latent_channels", 4), norm_num_groups=get("norm_num_groups", 32),
      scaling_factor=float(get("scaling_factor", 0.18215)), shift_factor=config.get("shift_factor"),
      use_quant_conv=get("use_quant_conv", True), use_post_quant_conv=get("use_post_quant_conv", True),
      mid_block_add_attention=get("mid_block_add_attention", True))
  fields.update(overrides)
  return VAEConfig(**fields)


def _name_map(cfg: VAEConfig) -> list[tuple[str, str, str]]:
  """(diffusers name without .weight/.bias, jaxinf path, kind) for every layer."""
  m: list[tuple[str, str, str]] = []

  def resnet(src: str, dst: str, cin: int, cout: int):
    m.extend([(f"{src}.norm1", f"{dst}/norm1", "norm"), (f"{src}.conv1", f"{dst}/conv1", "conv"),
              (f"{src}.norm2", f"{dst}/norm2", "norm"), (f"{src}.conv2", f"{dst}/conv2", "conv")])
    if cin != cout:
      m.append((f"{src}.conv_shortcut", f"{dst}/conv_shortcut", "conv"))

  def mid(side: str, c: int):
    for j in range(2):
      resnet(f"{side}.mid_block.resnets.{j}", f"{side}/mid_block/resnets/{j}", c, c)
    if cfg.mid_block_add_attention:
      a, d = f"{side}.mid_block.attentions.0", f"{side}/mid_block/attention"
      m.extend([(f"{a}.group_norm", f"{d}/group_norm", "norm"), (f"{a}.to_q", f"{d}/to_q", "linear"),
                (f"{a}.to_k", f"{d}/to_k", "linear"), (f"{a}.to_v", f"{d}/to_v", "linear"),
                (f"{a}.to_out.0", f"{d}/to_out", "linear")])

  chans, n = cfg.block_out_channels, cfg.layers_per_block
  m.append(("encoder.conv_in", "encoder/conv_in", "conv"))
  for i, c in enumerate(chans):
    cin = chans[max(i - 1, 0)]
    for j in range(n):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder/down_blocks/{i}/resnets/{j}",
             cin if j == 0 else c, c)
    if i < len(chans) - 1:
      m.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder/down_blocks/{i}/downsample",
                "conv"))
  mid("encoder", chans[-1])
  m += [("encoder.conv_norm_out", "encoder/conv_norm_out", "norm"),
        ("encoder.conv_out", "encoder/conv_out", "conv")]

  rchans = tuple(reversed(chans))
  m.append(("decoder.conv_in", "decoder/conv_in", "conv"))
  mid("decoder", rchans[0])
  for i, c in enumerate(rchans):
    cin = rchans[max(i - 1, 0)]
    for j in range(n + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder/up_blocks/{i}/resnets/{j}",
             cin if j == 0 else c, c)
    if i < len(rchans) - 1:
      m.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder/up_blocks/{i}/upsample", "conv"))
  m += [("decoder.conv_norm_out", "decoder/conv_norm_out", "norm"),
        ("decoder.conv_out", "decoder/conv_out", "conv")]
  if cfg.use_quant_conv:
    m.append(("quant_conv", "quant_conv", "conv"))
  if cfg.use_post_quant_conv:
    m.append(("post_quant_conv", "post_quant_conv", "conv"))
  return m


_TRANSFORMS = {"conv": (conv_kernel, "kernel"), "linear": (linear_kernel, "kernel"),
               "norm": (lambda w: w, "scale")}


def rename_deprecated_attention(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`mid_block.attentions.0.{query,key,value,proj_attn}` -> `{to_q,to_k,to_v,to_out.0}`."""
  out = {}
  for name, value in state_dict.items():
    prefix, _, rest = name.partition(".mid_block.attentions.0.")
    if rest:
      layer, _, param = rest.rpartition(".")
      if layer in _DEPRECATED_ATTENTION:
        name = f"{prefix}.mid_block.attentions.0.{_DEPRECATED_ATTENTION[layer]}.{param}"
        if name in state_dict:
          raise ValueError(f"state_dict: holds both {rest!r} and its new name {name!r}")
    out[name] = value
  return out


def vae_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict:
  """jaxinf VAE params (the nested dict of `to_functional(AutoencoderKL(cfg))`) from a diffusers
  state dict; missing or unexpected names and shapes that do not fit `cfg` raise ValueError."""
  if not isinstance(cfg, VAEConfig):
    raise TypeError(f"cfg: expected a VAEConfig, got {type(cfg).__name__}")
  check_state_dict(state_dict, where="diffusers AutoencoderKL state dict")
  state_dict = rename_deprecated_attention({k: np.asarray(v) for k, v in state_dict.items()})
  name_map = _name_map(cfg)
  expected = [f"{src}.{p}" for src, _, _ in name_map for p in ("weight", "bias")]
  check_source_keys(state_dict, expected, "diffusers AutoencoderKL state dict")
  flat = {}
  for src, dst, kind in name_map:
    transform, leaf = _TRANSFORMS[kind]
    weight = state_dict[f"{src}.weight"]
    if kind == "linear" and weight.ndim == 4 and weight.shape[2:] == (1, 1):
      weight = weight[:, :, 0, 0]  # attention saved as 1x1 convs (the LDM release's layout)
    flat[f"{dst}/{leaf}"] = np.asarray(transform(weight), np.float32)
    flat[f"{dst}/bias"] = np.asarray(state_dict[f"{src}.bias"], np.float32)
  arrays.check_keys(flat, vae_param_shapes(cfg), what=f"AutoencoderKL state dict converted for {cfg}")
  return arrays.unflatten_params(flat)


def vae_param_shapes(cfg: VAEConfig) -> dict[str, np.ndarray]:
  """'/'-joined param names of `AutoencoderKL(cfg)` -> zero-strided placeholders (no memory)."""
  abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  tree = nnx.to_pure_dict(nnx.state(abstract))
  return arrays.flatten_params(jax.tree_util.tree_map(
      lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), tree))


def load_vae(path: str | os.PathLike, cfg: VAEConfig | None = None) -> tuple[VAEConfig, dict]:
  """(cfg, params) from a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`)
  or a safetensors file (then `cfg` is required unless a `config.json` sits beside it)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"path: {str(path)!r} does not exist")
  state_dict = read_safetensors(checkpoint_files(path))
  if cfg is None:
    config_json = (path if path.is_dir() else path.parent) / "config.json"
    if not config_json.is_file():
      raise ValueError(f"cfg: no config.json beside {str(path)!r}; pass cfg=")
    cfg = vae_config_from_diffusers(config_json)
  return cfg, vae_params_from_state_dict(state_dict, cfg)
