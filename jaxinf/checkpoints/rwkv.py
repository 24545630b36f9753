"""RWKV-7 checkpoints (RWKV-LM / BlinkDL naming) into `jaxinf.models.rwkv.RWKV7` params.

The published RWKV-7 weights (BlinkDL's `RWKV-x070-*.pth`, the state dict of RWKV-LM's x070
model) are pickles; jaxinf reads only safetensors, so re-save them once with
`safetensors.torch.save_file(torch.load(path, weights_only=True), out)`. Names:

  emb.weight [V, C]; blocks.0.ln0.{weight,bias}; blocks.N.ln{1,2}.{weight,bias};
  blocks.N.att.{x_r,x_w,x_k,x_v,x_a,x_g,w0,a0,v0,k_k,k_a} [1, 1, C]; blocks.N.att.{w1,a1,v1,g1}
  [C, rank], {w2,a2,v2,g2} [rank, C]; blocks.N.att.r_k [H, N];
  blocks.N.att.{receptance,key,value,output}.weight [C, C] (torch Linear, [out, in]);
  blocks.N.att.ln_x.{weight,bias} [C]; blocks.N.ffn.x_k [1, 1, C];
  blocks.N.ffn.key.weight [F, C], blocks.N.ffn.value.weight [C, F]; ln_out.{weight,bias};
  head.weight [V, C].

RWKV-LM creates v0/v1/v2 in layer 0 too but never uses them (layer 0's v *is* v_first; the `rwkv`
package overwrites them with empty tensors on load). They are the only names accepted and dropped;
any other missing or unexpected name is refused with the full list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from jaxinf.checkpoints.arrays import check_keys, flat_leaves, unflatten_params
from jaxinf.checkpoints.torch_weights import read_safetensors
from jaxinf.checkpoints.validate import check_state_dict
from jaxinf.models.rwkv import RWKV7Config, RWKV7LM

_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
_LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
_LINEAR = ("receptance", "key", "value", "output")
_LAYER0_UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def _n_layers(state_dict: Mapping[str, np.ndarray]) -> int:
  ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
  if not ids or ids != set(range(max(ids) + 1)):
    raise ValueError(f"state_dict: expected blocks.0 .. blocks.N-1, got block ids {sorted(ids)}")
  return max(ids) + 1


def rwkv7_config_from_state_dict(state_dict: Mapping[str, np.ndarray], **overrides) -> RWKV7Config:
  """The RWKV7Config whose shapes the state dict has (as the `rwkv` package infers them)."""
  try:
    vocab, c = state_dict["emb.weight"].shape
    h, n = state_dict["blocks.0.att.r_k"].shape
    fields = dict(
        vocab_size=int(vocab), d_model=int(c), n_layers=_n_layers(state_dict), head_size=int(n),
        d_ffn=int(state_dict["blocks.0.ffn.key.weight"].shape[0]),
        decay_lora=int(state_dict["blocks.0.att.w1"].shape[1]),
        a_lora=int(state_dict["blocks.0.att.a1"].shape[1]),
        gate_lora=int(state_dict["blocks.0.att.g1"].shape[1]))
  except KeyError as e:
    raise ValueError(f"state_dict: not an RWKV-7 state dict, missing {e.args[0]!r}") from None
  v1 = next((state_dict[f"blocks.{i}.att.v1"] for i in range(1, fields["n_layers"])
             if f"blocks.{i}.att.v1" in state_dict), None)
  if v1 is not None:
    fields["v_lora"] = int(v1.shape[1])
  fields.update(overrides)
  return RWKV7Config(**fields)


def _expected_map(cfg: RWKV7Config) -> dict[str, tuple[str, bool]]:
  """RWKV-LM name -> (jaxinf '/'-path, transpose?)."""
  out = {"emb.weight": ("emb", False), "ln_out.weight": ("ln_out_w", False),
         "ln_out.bias": ("ln_out_b", False), "head.weight": ("head", True),
         "blocks.0.ln0.weight": ("blocks/0/ln0_w", False),
         "blocks.0.ln0.bias": ("blocks/0/ln0_b", False)}
  for i in range(cfg.n_layers):
    src, dst = f"blocks.{i}.", f"blocks/{i}/"
    for ln in ("ln1", "ln2"):
      out[f"{src}{ln}.weight"] = (f"{dst}{ln}_w", False)
      out[f"{src}{ln}.bias"] = (f"{dst}{ln}_b", False)
    for name in _MIXES + _LORA + ("r_k",):
      if i == 0 and name in ("v0", "v1", "v2"):
        continue
      out[f"{src}att.{name}"] = (f"{dst}att/{name}", False)
    for name in _LINEAR:
      out[f"{src}att.{name}.weight"] = (f"{dst}att/{name}", True)
    out[f"{src}att.ln_x.weight"] = (f"{dst}att/ln_x_w", False)
    out[f"{src}att.ln_x.bias"] = (f"{dst}att/ln_x_b", False)
    out[f"{src}ffn.x_k"] = (f"{dst}ffn/x_k", False)
    out[f"{src}ffn.key.weight"] = (f"{dst}ffn/key", True)
    out[f"{src}ffn.value.weight"] = (f"{dst}ffn/value", True)
  return out


def rwkv7_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: RWKV7Config) -> dict:
  """jaxinf params from an RWKV-LM x070 state dict. Every name and shape must match the model of
  `cfg`; mismatches raise ValueError listing them all."""
  check_state_dict(state_dict, where="state_dict")
  mapping = _expected_map(cfg)
  unexpected = sorted(set(state_dict) - set(mapping) - set(_LAYER0_UNUSED))
  missing = sorted(set(mapping) - set(state_dict))
  if missing or unexpected:
    raise ValueError(f"state_dict: does not match an RWKV-7 model with {cfg.n_layers} layers: "
                     f"missing keys {missing}, unexpected keys {unexpected}")
  flat = {}
  for src, (dst, transpose) in mapping.items():
    arr = np.asarray(state_dict[src], np.float32)
    if transpose:
      arr = arr.T
    elif arr.ndim == 3 and arr.shape[:2] == (1, 1):  # RWKV-LM's (1, 1, C) mixes
      arr = arr[0, 0]
    flat[dst] = arr
  check_keys(flat, flat_leaves(RWKV7LM(cfg).abstract_params()),
             what="state_dict (after renaming)")
  return unflatten_params(flat)


def load_rwkv7(path: str | os.PathLike, **model_options) -> tuple[RWKV7LM, dict]:
  """(model, params) from an RWKV-7 safetensors file; the config is inferred from the shapes,
  `model_options` are the model's (`impl`, `interpret`, `max_step`)."""
  state_dict = read_safetensors(path)
  cfg = rwkv7_config_from_state_dict(state_dict)
  params = rwkv7_params_from_state_dict(state_dict, cfg)
  return RWKV7LM(cfg, **model_options), params
