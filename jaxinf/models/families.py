"""The language-model families by name: one registry, one factory, one interface.

Every family is a `jaxinf.models.functional.FamilyLM`: a frozen dataclass of its config, `impl`
and `interpret` (and `max_step` for the recurrent ones), hashable by value, so equal configs give
one jit compilation. This module registers each family with what the rest of jaxinf asks of it:

- its named sizes (`named_config("rwkv7-1m")`; "-tiny" is the smoke size of every family);
- `build(config or size name, seed=..., impl=..., **model_options) -> (model, params)`, the one
  factory (the same parameters as the family's own `init_params(seed)`);
- the logical axis names of every parameter (`param_axes`), which the sharding rules of
  `jaxinf.parallel` map onto mesh axes (the MaxText / levanter pattern: a new family adds names,
  never sharding code);
- its cache layout: `model.cache_batch_axes(cache)` and `model.rollback_keys`, the top-level cache
  entries that only serve `rollback` (what a fresh prompt does not need).

Logical axis names (a dimension named alike has one size within a model):

  vocab, embed          token table rows, the residual stream
  norm                  norm scales and biases over the residual stream
  mlp                   the feed-forward hidden width
  heads, kv_heads       flattened (head x head_dim) outputs of query / key-value projections
  head_count, head_dim  an unflattened head axis and its width
  qkvu                  TransNormerLLM's fused q|k|v|u projection output
  decay_lora, a_lora, v_lora, gate_lora   RWKV-7's LoRA ranks
  ssm_inner, ssm_inner_xz, ssm_state, conv_kernel, dt_rank, ssm_proj   Mamba's inner width, its
                        fused x|z projection, the SSM state, the conv window, the dt rank and the
                        fused dt|B|C projection

Adding a family: its module (config dataclass, NNX module, a `FamilyLM` subclass), one `Family`
entry below (sizes and axis rules), a converter in `jaxinf.checkpoints`, and its tests
(`tests/models/test_families.py` runs the SequenceModel contract suite on every registered
family). See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax

from jaxinf.models import mamba, rwkv, transformer, transnormer
from jaxinf.models.functional import FamilyLM


@dataclasses.dataclass(frozen=True)
class Family:
  """One language-model family: its model class, named sizes and parameter axis rules.

  `axis_rules`: (regex over the '/'-joined parameter path, logical axis names), first full match
  wins; every parameter must match exactly one rank-compatible rule.
  `matmul_weights`: a regex fully matching the paths of the `[in, out]` weights the model applies
  as `x @ w` (`layers.Linear` or a plain product) — those a low-bit weight
  (`jaxinf.quant.base.QuantizedWeight`) may replace; embeddings, norms, biases, convolution and
  state parameters are not among them.
  """
  name: str
  model_type: type[FamilyLM]
  sizes: Mapping[str, Any]
  axis_rules: tuple[tuple[str, tuple[str, ...]], ...]
  matmul_weights: str

  @property
  def config_type(self) -> type:
    return self.model_type.config_type

  @property
  def rollback_keys(self) -> tuple[str, ...]:
    return self.model_type.rollback_keys

  @property
  def model_options(self) -> tuple[str, ...]:
    """Keyword options of the model beside its config (impl, interpret, max_step, ...)."""
    return tuple(f.name for f in dataclasses.fields(self.model_type) if f.name != "config")


_NORM = ("norm",)

FAMILIES: dict[str, Family] = {
    "transformer": Family(
        "transformer", transformer.TransformerLM, transformer.TRANSFORMER_CONFIGS, (
            (r"embed_tokens/embedding", ("vocab", "embed")),
            (r"(layers/\d+/(input|post_attention)_layernorm|norm)/weight", _NORM),
            (r"layers/\d+/self_attn/q_proj/kernel", ("embed", "heads")),
            (r"layers/\d+/self_attn/[kv]_proj/kernel", ("embed", "kv_heads")),
            (r"layers/\d+/self_attn/o_proj/kernel", ("heads", "embed")),
            (r"layers/\d+/mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
            (r"layers/\d+/mlp/down_proj/kernel", ("mlp", "embed")),
            (r"lm_head/kernel", ("embed", "vocab")),
        ),
        r"layers/\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel|lm_head/kernel"),
    "mamba": Family(
        "mamba", mamba.MambaLM, mamba.MAMBA_CONFIGS, (
            (r"embeddings/embedding", ("vocab", "embed")),
            (r"(layers/\d+/norm|norm_f)/weight", _NORM),
            (r"layers/\d+/mixer/in_proj/kernel", ("embed", "ssm_inner_xz")),
            (r"layers/\d+/mixer/in_proj/bias", ("ssm_inner_xz",)),
            (r"layers/\d+/mixer/conv_weight", ("conv_kernel", "ssm_inner")),
            (r"layers/\d+/mixer/(conv_bias|D|dt_bias)", ("ssm_inner",)),
            (r"layers/\d+/mixer/A_log", ("ssm_inner", "ssm_state")),
            (r"layers/\d+/mixer/x_proj/kernel", ("ssm_inner", "ssm_proj")),
            (r"layers/\d+/mixer/dt_proj/kernel", ("dt_rank", "ssm_inner")),
            (r"layers/\d+/mixer/out_proj/kernel", ("ssm_inner", "embed")),
            (r"layers/\d+/mixer/out_proj/bias", ("embed",)),
            (r"lm_head/kernel", ("embed", "vocab")),
        ),
        r"layers/\d+/mixer/(in|x|dt|out)_proj/kernel|lm_head/kernel"),
    "rwkv7": Family(
        "rwkv7", rwkv.RWKV7LM, rwkv.RWKV7_CONFIGS, (
            (r"emb", ("vocab", "embed")),
            (r"head", ("embed", "vocab")),
            (r"(blocks/\d+/ln[012]|ln_out)_[wb]", _NORM),
            (r"blocks/\d+/att/x_[rwkvag]", ("embed",)),
            (r"blocks/\d+/att/(receptance|key|value)", ("embed", "heads")),
            (r"blocks/\d+/att/output", ("heads", "embed")),
            (r"blocks/\d+/att/([wav]0|k_k|k_a|ln_x_[wb])", ("heads",)),
            (r"blocks/\d+/att/w1", ("embed", "decay_lora")),
            (r"blocks/\d+/att/w2", ("decay_lora", "heads")),
            (r"blocks/\d+/att/a1", ("embed", "a_lora")),
            (r"blocks/\d+/att/a2", ("a_lora", "heads")),
            (r"blocks/\d+/att/v1", ("embed", "v_lora")),
            (r"blocks/\d+/att/v2", ("v_lora", "heads")),
            (r"blocks/\d+/att/g1", ("embed", "gate_lora")),
            (r"blocks/\d+/att/g2", ("gate_lora", "heads")),
            (r"blocks/\d+/att/r_k", ("head_count", "head_dim")),
            (r"blocks/\d+/ffn/x_k", ("embed",)),
            (r"blocks/\d+/ffn/key", ("embed", "mlp")),
            (r"blocks/\d+/ffn/value", ("mlp", "embed")),
        ),
        r"head|blocks/\d+/att/(receptance|key|value|output|[wavg][12])|blocks/\d+/ffn/(key|value)"),
    "transnormer": Family(
        "transnormer", transnormer.TransNormerLM, transnormer.TRANSNORMER_CONFIGS, (
            (r"embed_tokens", ("vocab", "embed")),
            (r"lm_head", ("embed", "vocab")),
            (r"layers/\d+/token_mixer/qkvu_proj", ("embed", "qkvu")),
            (r"layers/\d+/token_mixer/out_proj", ("heads", "embed")),
            (r"layers/\d+/token_mixer/theta", ("head_count", "head_dim")),
            (r"layers/\d+/channel_mixer/l[12]", ("embed", "mlp")),
            (r"layers/\d+/channel_mixer/l3", ("mlp", "embed")),
        ),
        r"lm_head|layers/\d+/(token_mixer/(qkvu|out)_proj|channel_mixer/l[123])"),
}


def get_family(name: str) -> Family:
  """The family registered as `name` ("transformer", "mamba", "rwkv7", "transnormer")."""
  if not isinstance(name, str) or name not in FAMILIES:
    raise ValueError(f"family: unknown family {name!r}; known: {sorted(FAMILIES)}")
  return FAMILIES[name]


def family_of(obj: Any) -> Family:
  """The family of a config, a model, or a named size ("rwkv7-1m")."""
  if isinstance(obj, str):
    return FAMILIES[_size_owner(obj)]
  for family in FAMILIES.values():
    if isinstance(obj, (family.config_type, family.model_type)):
      return family
  raise TypeError(f"config: expected the config or model of a registered family "
                  f"({sorted(FAMILIES)}) or a size name, got {type(obj).__name__}")


def sizes() -> list[str]:
  """Every registered size name, family by family."""
  return [size for family in FAMILIES.values() for size in family.sizes]


def _size_owner(size: str) -> str:
  for family in FAMILIES.values():
    if size in family.sizes:
      return family.name
  raise ValueError(f"size: unknown model size {size!r}; known: {sizes()}")


def named_config(size: str, **overrides: Any):
  """The config of the named size (e.g. "transformer-1m", "mamba-tiny"), with fields replaced."""
  config = FAMILIES[_size_owner(size)].sizes[size]
  known = {f.name for f in dataclasses.fields(config)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"overrides: {unknown} are not fields of {type(config).__name__} "
                     f"(known: {sorted(known)})")
  return dataclasses.replace(config, **overrides)


def build(config: Any, *, seed: int | jax.Array = 0, **model_options: Any
          ) -> tuple[FamilyLM, dict]:
  """(model, random params) of any family: `config` a family's config or a size name;
  `model_options` the model's fields beside its config (impl, interpret, max_step for recurrent
  families); `seed` an int or a `jax.random.key`."""
  if isinstance(config, str):
    config = named_config(config)
  family = family_of(config)
  unknown = sorted(set(model_options) - set(family.model_options))
  if unknown:
    raise ValueError(f"model_options: {unknown} are not options of the {family.name} family "
                     f"(known: {list(family.model_options)})")
  model = family.model_type(config, **model_options)
  return model, model.init_params(seed)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_axes(model: FamilyLM, params: dict | None = None) -> dict:
  """A tree like `params` (default: the model's abstract parameters) whose leaves are each
  parameter's logical axis names, a tuple of one name per dimension. Raises ValueError naming any
  parameter no rule covers, or covers with the wrong rank."""
  family = family_of(model)
  if params is None:
    params = model.abstract_params()
  return param_axes_from_rules(family.axis_rules, params, owner=family.name)


def param_axes_from_rules(axis_rules, params, *, owner: str = "model") -> dict:
  """The one mechanism behind every model's logical axis names (the families above,
  `dit.DIT_AXIS_RULES`, `vae.VAE_AXIS_RULES`): `axis_rules` is a tuple of (regex over the
  '/'-joined parameter path, logical axis names), the first full match wins. Returns a tree like
  `params` of name tuples; ValueError names a parameter no rule covers or one whose rank differs
  from its rule's."""
  rules = [(re.compile(pattern), axes) for pattern, axes in axis_rules]

  def axes_of(path, leaf):
    name = _path_name(path)
    for pattern, axes in rules:
      if pattern.fullmatch(name):
        if len(axes) != len(leaf.shape):
          raise ValueError(f"params: {name} has shape {tuple(leaf.shape)} but the {owner} "
                           f"axis rule names {len(axes)} axes {axes}")
        return axes
    raise ValueError(f"params: no {owner} axis rule covers parameter {name!r}")

  return jax.tree_util.tree_map_with_path(axes_of, params)


def matmul_weight_paths(model: FamilyLM, params: dict | None = None) -> list[str]:
  """The '/'-joined paths of the model's `[in, out]` matmul weights (the family's
  `matmul_weights`): the leaves a low-bit weight may replace (`jaxinf.quant`)."""
  pattern = re.compile(family_of(model).matmul_weights)
  if params is None:
    params = model.abstract_params()
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [name for name in (_path_name(path) for path, _ in flat) if pattern.fullmatch(name)]
