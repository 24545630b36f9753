"""Bad parameter trees at every model entry point and bad values in every model config: a named
error, raised before anything is traced. The checks read shapes and dtypes only, so these tests
compile nothing (params are built from `abstract_params()` as zero-strided host arrays)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinf.checkpoints.validate import ParamsMismatchError
from jaxinf.models import families
from jaxinf.models.dit import DiT, DiTConfig, dit_config
from jaxinf.models.functional import to_functional
from jaxinf.models.mamba import MambaConfig
from jaxinf.models.medusa import MedusaConfig
from jaxinf.models.rwkv import RWKV7Config
from jaxinf.models.transformer import TransformerConfig
from jaxinf.models.transnormer import TransNormerConfig
from jaxinf.models.vae import AutoencoderKL, VAEConfig
from jaxinf.parallel import shard
from tests.bad_input import raises_before_tracing

TINY = ["transformer-tiny", "mamba-tiny", "rwkv7-tiny", "transnormer-tiny"]


def _host(abstract):
  return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)


def _first_path(tree):
  path, _ = jax.tree_util.tree_flatten_with_path(tree)[0][0]
  return [getattr(k, "key", getattr(k, "idx", None)) for k in path]


def _set(tree, path, value):
  tree = jax.tree.map(lambda x: x, tree)  # a copy of the containers
  node = tree
  for k in path[:-1]:
    node = node[k]
  if value is None:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return tree


def _bad_trees(abstract):
  good = _host(abstract)
  path = _first_path(good)
  leaf = good
  for k in path:
    leaf = leaf[k]
  name = "/".join(str(k) for k in path)
  return {
      "empty": ({}, r"missing keys"),
      "missing": (_set(good, path, None), rf"missing keys \['{name}'\]"),
      "extra": ({**good, "extra_head": np.zeros(3, np.float32)}, r"unexpected keys \['extra_head'\]"),
      "shape": (_set(good, path, np.zeros(leaf.shape + (2,), np.float32)),
                rf"shape mismatches \['{name}: "),
      "dtype": (_set(good, path, np.zeros(leaf.shape, np.int32)),
                rf"dtype mismatches \['{name}: int32 != float32'\]"),
      "not a tree": (None, r"expected a nested dict"),
  }


CASES = ["empty", "missing", "extra", "shape", "dtype", "not a tree"]


@pytest.fixture(scope="module", params=TINY)
def lm(request):
  model = families.build(request.param)[0]
  return model, _bad_trees(model.abstract_params())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("entry", ["__call__", "prefill", "step"])
def test_family_entry_points_refuse_other_param_trees(lm, case, entry):
  model, trees = lm
  params, listing = trees[case]
  tokens = jnp.zeros((1, 2), jnp.int32)
  error = TypeError if case == "not a tree" else ParamsMismatchError
  with raises_before_tracing(error, r"^params: .*" + listing):
    if entry == "__call__":
      model(params, tokens)
    elif entry == "prefill":
      model.prefill(params, tokens, model.init_cache(1, 4), jnp.array([2]))
    else:
      model.step(params, tokens, model.init_cache(1, 4))


def test_family_accepts_its_own_tree_in_any_float_width():
  model = families.build("transformer-tiny")[0]
  model.check_params(_host(model.abstract_params()))
  model.check_params(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                                  model.abstract_params()))


TINY_DIT = DiTConfig(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1,
                     num_heads=2, num_classes=3)
TINY_VAE = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("what", ["DiT", "VAE"])
def test_functional_apply_refuses_other_param_trees(case, what):
  if what == "DiT":
    module = nnx.eval_shape(lambda: DiT(TINY_DIT, rngs=nnx.Rngs(0)))
    apply, abstract = to_functional(module)
    args = (jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  else:
    module = nnx.eval_shape(lambda: AutoencoderKL(TINY_VAE, rngs=nnx.Rngs(0)))
    apply, abstract = to_functional(module, "decode_latents")
    args = (jnp.zeros((1, 4, 4, 4)),)
  params, listing = _bad_trees(abstract)[case]
  error = TypeError if case == "not a tree" else ParamsMismatchError
  model_name = "DiT" if what == "DiT" else "AutoencoderKL"
  with raises_before_tracing(error, rf"^params: (?=.*\b{model_name}\b).*" + listing):
    apply(params, *args)
  with raises_before_tracing(error, r"^params: .*" + listing):
    apply.check_params(params)  # what trainers call before they trace


# --- configs ----------------------------------------------------------------------------------

_BASE = {
    DiTConfig: dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                    num_heads=2, num_classes=10),
    TransformerConfig: {}, MambaConfig: {}, MedusaConfig: {}, VAEConfig: {},
    RWKV7Config: dict(vocab_size=10, d_model=64, n_layers=2),
    TransNormerConfig: dict(vocab_size=10, d_model=32, n_layers=2, n_heads=2),
}
_KINDS = {"int": [0, -3, 2.0, True, "8", None],
          "float": [float("nan"), float("inf"), "1e-5", True, None],
          "bool": ["no", 1, None], "str": [3, None]}


def _bad_values():
  for cls, base in _BASE.items():
    for f in dataclasses.fields(cls):
      kind = f.type.split("|")[0].strip()
      values = [v for v in _KINDS.get(kind, []) if not (v is None and "None" in f.type)]
      for value in values:
        yield pytest.param(cls, base, f.name, value, id=f"{cls.__name__}.{f.name}={value!r}")


@pytest.mark.parametrize("cls, base, field, value", list(_bad_values()))
def test_config_field_types_and_ranges(cls, base, field, value):
  with raises_before_tracing((ValueError, TypeError), rf"^{field}"):
    cls(**{**base, field: value})


@pytest.mark.parametrize("cls, overrides, names", [
    (DiTConfig, dict(mlp_ratio=0), "mlp_ratio"),
    (DiTConfig, dict(mlp_ratio=-1.0), "mlp_ratio"),
    (DiTConfig, dict(mlp_ratio=0.01), "mlp_ratio"),
    (DiTConfig, dict(num_heads=3), "num_heads"),
    (DiTConfig, dict(patch_size=3), "patch_size"),
    (DiTConfig, dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (DiTConfig, dict(label_init_std=0.0), "label_init_std"),
    (DiTConfig, dict(dtype="int8"), "dtype"),
    (TransformerConfig, dict(num_heads=3), "num_heads"),
    (TransformerConfig, dict(num_kv_heads=3), "num_kv_heads"),
    (TransformerConfig, dict(rope_theta=-1.0), "rope_theta"),
    (TransformerConfig, dict(head_dim=3), "head_dim"),
    (MambaConfig, dict(dt_min=0.5, dt_max=0.1), "dt_min"),
    (MambaConfig, dict(conv_kernel=1), "conv_kernel"),
    (RWKV7Config, dict(head_size=48), "d_model"),
    (TransNormerConfig, dict(n_heads=3), "hidden_dim"),
    (TransNormerConfig, dict(lrpe=(True,)), "lrpe"),
    (TransNormerConfig, dict(lrpe=(1, 0)), "lrpe"),
    (VAEConfig, dict(norm_num_groups=7), "norm_num_groups"),
    (VAEConfig, dict(block_out_channels=(8, 0)), "block_out_channels"),
    (VAEConfig, dict(scaling_factor=0.0), "scaling_factor"),
    (VAEConfig, dict(shift_factor=float("nan")), "shift_factor"),
    (MedusaConfig, dict(init_std=-0.1), "init_std"),
])
def test_config_relations(cls, overrides, names):
  with raises_before_tracing(ValueError, rf"^{names}"):
    cls(**{**_BASE[cls], **overrides})


def test_unknown_names_and_foreign_models():
  with raises_before_tracing(ValueError, "name: unknown DiT config 'DiT-foo'"):
    dit_config("DiT-foo")
  with raises_before_tracing(ValueError, "size: unknown model size"):
    families.named_config("transformer-70b")
  with raises_before_tracing(ValueError, "overrides"):
    families.named_config("transformer-tiny", hiden_size=3)
  with raises_before_tracing(ValueError, "impl"):
    families.build(families.named_config("transnormer-tiny"), impl="bogus")
  for call in (lambda: families.build(object()), lambda: families.family_of(object())):
    with raises_before_tracing(TypeError, "config"):
      call()
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  for call in (lambda: shard.abstract_params(object()), lambda: shard.param_axes(object()),
               lambda: shard.param_shardings(object(), mesh),
               lambda: shard.init_params(object(), mesh)):
    with raises_before_tracing(TypeError, "model"):
      call()
