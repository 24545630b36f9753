"""Meshes, the rule table, sharded placement and initialisation, and the bad-input errors — all
raised before anything is traced (8 forced host devices: tests/conftest.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.models import dit, families, vae
from jaxinf.parallel import mesh as mesh_lib
from jaxinf.parallel import rules, shard
from pallas_kernels import dispatch


def test_eight_host_devices():
  assert jax.device_count() == 8, "tests/conftest.py must force 8 host devices"


def test_make_mesh_axes_and_types():
  mesh = mesh_lib.make_mesh(data=2, tensor=4)
  assert mesh.axis_names == ("data", "fsdp", "tensor", "sequence")
  assert mesh.axis_sizes == (2, 1, 4, 1)
  assert mesh.axis_types == (AxisType.Auto,) * 4
  assert mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=-1, tensor=2)).axis_sizes == (1, 4, 2, 1)
  assert mesh_lib.describe_mesh(mesh) == "data=2 fsdp=1 tensor=4 sequence=1 (8 cpu devices)"


@pytest.mark.parametrize("sizes, match", [
    ({"data": 2, "tensor": 2}, "multiply to 4, but there are 8 devices"),
    ({"data": 3, "tensor": -1}, "do not divide the 8 devices"),
    ({"data": 0}, "data: expected a mesh axis size"),
    ({"data": -1, "tensor": -1}, "at most one axis may be -1"),
    ({"model": 8}, "unknown mesh axes"),
])
def test_bad_mesh(sizes, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.make_mesh(**sizes)


def test_logical_to_spec():
  mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
  assert rules.logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
  # batch takes data x fsdp, so a later embed dimension of the same array is not split again
  assert rules.logical_to_spec(("batch", "length", "embed"), mesh) == P(("data", "fsdp"), None,
                                                                       None)
  # size-1 axes are dropped (sequence), None replicates
  assert rules.logical_to_spec(("length", None, "norm"), mesh) == P(None, None, None)


def test_unknown_logical_axis_and_missing_mesh_axis():
  mesh = mesh_lib.make_mesh(data=8)
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    rules.logical_to_spec(("hidden",), mesh)
  bad = rules.DEFAULT_RULES + (("experts", "expert"),)
  with pytest.raises(ValueError, match="'experts' -> 'expert' names mesh axes \\['expert'\\]"):
    rules.logical_to_spec(("embed",), mesh, bad)
  model, _ = families.build("transformer-tiny")
  with pytest.raises(ValueError, match="names mesh axes"):
    shard.param_shardings(model, mesh, bad)
  with pytest.raises(ValueError, match="two rules"):
    rules.check_rules((("embed", None), ("embed", "fsdp")))


def test_indivisible_heads_batch_and_params():
  tensor4 = mesh_lib.make_mesh(data=2, tensor=4)
  model, _ = families.build("transformer-tiny")  # 4 heads, 2 kv heads
  with pytest.raises(ValueError, match="num_kv_heads: 2 heads do not divide over mesh axes "
                                       "\\('tensor',\\) of 4 devices"):
    shard.param_shardings(model, tensor4)
  with pytest.raises(ValueError, match="num_heads: 2 heads"):
    shard.init_params(dit.DIT_CONFIGS["DiT-tiny"], tensor4)
  with pytest.raises(ValueError, match="prompts: dimension 0 \\('batch', size 6\\) does not "
                                       "divide over mesh axes \\('data',\\)"):
    shard.shard_batch(np.zeros((6, 3), np.int32), mesh_lib.make_mesh(data=4, tensor=2),
                      what="prompts")
  # a parameter dimension: vocab 259 over tensor
  model, _ = families.build("transformer-1m")
  with pytest.raises(ValueError, match="params: dimension 0 \\('vocab', size 259\\)"):
    shard.param_shardings(model, mesh_lib.make_mesh(data=4, tensor=2))


def test_every_parameter_has_axes():
  for size in ("transformer-tiny", "mamba-tiny", "rwkv7-tiny", "transnormer-tiny"):
    model, _ = families.build(size)
    axes = shard.param_axes(model)
    assert jax.tree.structure(axes, is_leaf=lambda n: isinstance(n, tuple)) == \
        jax.tree.structure(model.abstract_params())
  for config in (dit.DIT_CONFIGS["DiT-tiny"], vae.VAEConfig()):
    axes = shard.param_axes(config)
    leaves = jax.tree.leaves(axes, is_leaf=lambda n: isinstance(n, tuple))
    shapes = jax.tree.leaves(shard.abstract_params(config))
    assert len(leaves) == len(shapes) and all(len(a) == s.ndim for a, s in zip(leaves, shapes))
  with pytest.raises(TypeError, match="model: expected a language-model family"):
    shard.param_axes(object())


def test_sharded_init_equals_unsharded_init_and_is_split():
  mesh = mesh_lib.make_mesh(data=4, tensor=2)
  model, params = families.build("transformer-tiny", seed=3)
  sharded = shard.init_params(model, mesh, seed=3)
  # the same random bits: bit-identical to the same initialiser jitted on one device, and within
  # 1 ulp of the eager one (XLA fuses the normal's scaling differently from op-by-op execution)
  jitted = jax.jit(lambda: model.init_params(3))()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jitted, sharded)
  jax.tree.map(lambda a, b: np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), 1),
               params, sharded)
  q = sharded["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding == NamedSharding(mesh, P(None, "tensor"))
  # no device holds the whole matrix
  assert {s.data.shape for s in q.addressable_shards} == {(32, 16)}
  table = shard.describe_params(sharded, shard.param_axes(model))
  assert "layers/0/self_attn/q_proj/kernel" in table and "('embed', 'heads')" in table
  assert "PartitionSpec(None, 'tensor')" in table or "P(None, 'tensor')" in table


def test_concrete_value_never_reads_sharded_arrays():
  mesh = mesh_lib.make_mesh(data=8)
  x = np.arange(16, dtype=np.int32).reshape(8, 2)
  np.testing.assert_array_equal(dispatch.concrete_value(x), x)
  np.testing.assert_array_equal(dispatch.concrete_value(jnp.asarray(x)), x)
  assert dispatch.concrete_value(shard.shard_batch(x, mesh)) is None
  assert dispatch.concrete_value(jnp.zeros(dispatch.MAX_CHECKED_ELEMENTS + 1)) is None
  assert dispatch.concrete_value(jax.ShapeDtypeStruct((2,), jnp.int32)) is None


def test_constrain_is_identity_without_mesh_and_pins_with_one():
  x = jnp.ones((8, 4))
  assert rules.constrain(x, ("batch", None)) is x
  mesh = mesh_lib.make_mesh(data=2, tensor=4)
  f = jax.jit(lambda x: rules.constrain(x * 2, ("batch", "heads")))
  with jax.set_mesh(mesh):
    y = f(x)
  assert y.sharding.spec == P("data", "tensor")
  np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))
