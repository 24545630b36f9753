"""TransNormerLLM checkpoints (OpenNLPLab's released `TransnormerForCausalLM` naming) into
`jaxinf.models.transnormer.TransNormerLLM` params, from safetensors only.

Names (torch Linear weights are [out, in]; jaxinf stores [in, out]):

  model.embed_tokens.weight [V, d]; lm_head.weight [V, d];
  model.layers.N.token_mixer.qkvu_proj.weight [4 hidden, d]; ...token_mixer.out_proj.weight
  [d, hidden]; ...token_mixer.lrpe.theta [H, 1, D] (LRPE layers only);
  model.layers.N.channel_mixer.l{1,2}.weight [glu, d], ...channel_mixer.l3.weight [d, glu].

The SRMSNorms have no weights and the slopes are computed, so nothing else is expected; any other
name (biases, i.e. a `bias=True` config, included) is refused with the full list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from jaxinf.checkpoints.arrays import check_keys, flat_leaves, unflatten_params
from jaxinf.checkpoints.torch_weights import read_safetensors
from jaxinf.checkpoints.validate import check_state_dict
from jaxinf.models.transnormer import TransNormerConfig, TransNormerLM


def _expected_map(cfg: TransNormerConfig) -> dict[str, tuple[str, str]]:
  """release name -> (jaxinf '/'-path, how: 'T' transpose, 'theta' squeeze, '' as is)."""
  out = {"model.embed_tokens.weight": ("embed_tokens", ""), "lm_head.weight": ("lm_head", "T")}
  for i in range(cfg.n_layers):
    src, dst = f"model.layers.{i}.", f"layers/{i}/"
    out[src + "token_mixer.qkvu_proj.weight"] = (dst + "token_mixer/qkvu_proj", "T")
    out[src + "token_mixer.out_proj.weight"] = (dst + "token_mixer/out_proj", "T")
    if cfg.use_lrpe(i):
      out[src + "token_mixer.lrpe.theta"] = (dst + "token_mixer/theta", "theta")
    for name in ("l1", "l2", "l3"):
      out[src + f"channel_mixer.{name}.weight"] = (dst + f"channel_mixer/{name}", "T")
  return out


def transnormer_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                       cfg: TransNormerConfig) -> dict:
  """jaxinf params from the release's state dict; names and shapes must match `cfg` exactly."""
  check_state_dict(state_dict, where="state_dict")
  mapping = _expected_map(cfg)
  missing = sorted(set(mapping) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(mapping))
  if missing or unexpected:
    raise ValueError(f"state_dict: does not match a TransNormerLLM with {cfg.n_layers} layers "
                     f"(lrpe={cfg.lrpe}): missing keys {missing}, unexpected keys {unexpected}")
  flat = {}
  for src, (dst, how) in mapping.items():
    arr = np.asarray(state_dict[src], np.float32)
    if how == "T":
      arr = arr.T
    elif how == "theta":
      arr = arr.reshape(arr.shape[0], -1)  # [H, 1, D] -> [H, D]
    flat[dst] = arr
  check_keys(flat, flat_leaves(TransNormerLM(cfg).abstract_params()),
             what="state_dict (after renaming)")
  return unflatten_params(flat)


def transnormer_config_from_hf(config: Mapping, **overrides) -> TransNormerConfig:
  """TransNormerConfig from the release's `config.json` fields (`TransnormerConfig`)."""
  if config.get("bias", False):
    raise ValueError("config: bias=True checkpoints are not supported (jaxinf's layers have none)")
  if config.get("norm_type", "simplermsnorm") != "simplermsnorm":
    raise ValueError(f"config: norm_type {config['norm_type']!r} is not 'simplermsnorm'")
  if config.get("linear_act_fun", "silu") != "silu":
    raise ValueError(f"config: linear_act_fun {config['linear_act_fun']!r} is not 'silu'")
  glu = config.get("glu_dim", 2816)
  fields = dict(
      vocab_size=config["vocab_size"], d_model=config["decoder_embed_dim"],
      n_layers=config["decoder_layers"], n_heads=config["decoder_attention_heads"],
      hidden_dim=config.get("hidden_dim", config["decoder_embed_dim"]),
      glu_dim=None if glu == -1 else glu,
      lrpe=tuple(bool(x) for x in config.get("linear_use_lrpe_list", [])),
      scale_embedding=not config.get("no_scale_embedding", False))
  fields.update(overrides)
  return TransNormerConfig(**fields)


def load_transnormer(path: str | os.PathLike, cfg: TransNormerConfig, **model_options
                     ) -> tuple[TransNormerLM, dict]:
  """(model, params) from a safetensors file of the release's state dict; `model_options` are the
  model's (`impl`, `interpret`, `max_step`)."""
  params = transnormer_params_from_state_dict(read_safetensors(path), cfg)
  return TransNormerLM(cfg, **model_options), params
