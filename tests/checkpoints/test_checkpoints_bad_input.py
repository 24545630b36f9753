"""Bad checkpoints and parameter trees: the one tree check (missing, extra, shape, dtype), file
errors that name the file, finiteness at load, orbax restores, and a hypothesis fuzz of the check
and the npz loader. Every case asserts a named error raised before anything is traced."""

from __future__ import annotations

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec

from jaxinf.checkpoints import arrays
from jaxinf.checkpoints.native import CheckpointStore
from jaxinf.checkpoints.torch_weights import read_safetensors
from jaxinf.checkpoints.validate import (MAX_LISTED, ParamsMismatchError, check_finite,
                                         check_params, check_state_dict, param_differences)
from tests.bad_input import raises_before_tracing

safetensors_numpy = pytest.importorskip("safetensors.numpy")

TREE = {"embed": np.zeros((5, 4), np.float32),
        "blocks": {0: {"w": np.zeros((4, 4), np.float32), "b": np.zeros((4,), np.float32)}},
        "step": np.zeros((), np.int32)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# --- the tree check ---------------------------------------------------------------------------


def _without(tree, key):
  return {k: v for k, v in tree.items() if k != key}


BAD_TREES = {
    "empty": ({}, r"missing keys \['blocks/0/b', 'blocks/0/w', 'embed', 'step'\]"),
    "missing": (_without(TREE, "embed"), r"missing keys \['embed'\]"),
    "extra": ({**TREE, "head": np.zeros(3, np.float32)}, r"unexpected keys \['head'\]"),
    "shape": ({**TREE, "embed": np.zeros((5, 3), np.float32)},
              r"shape mismatches \['embed: \(5, 3\) != \(5, 4\)'\]"),
    "dtype": ({**TREE, "embed": np.zeros((5, 4), np.int64)},
              r"dtype mismatches \['embed: int64 != float32'\]"),
    "not an array": ({**TREE, "embed": "weights"}, r"not arrays \['embed: str'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_tree_check_lists_what_differs(case):
  given_tree, listing = BAD_TREES[case]
  with raises_before_tracing(ParamsMismatchError, r"^params: does not match .*" + listing):
    check_params(_abstract(TREE), given_tree)


@pytest.mark.parametrize("given_tree", [None, 3, "params", np.zeros(3)])
def test_tree_check_refuses_what_is_not_a_tree(given_tree):
  with raises_before_tracing(TypeError, "params"):
    check_params(TREE, given_tree)


def test_tree_check_accepts_the_same_tree_in_every_form():
  check_params(TREE, TREE)
  check_params(_abstract(TREE), jax.tree.map(jnp.asarray, TREE))
  check_params(_abstract(TREE), _abstract(TREE))
  flat = arrays.flat_leaves({k: v for k, v in TREE.items()})
  check_params(TREE, flat)  # '/'-joined flat names are the same paths


def test_kind_mode_accepts_another_float_width_but_not_integers():
  bf16 = {**TREE, "embed": np.zeros((5, 4), jnp.bfloat16)}
  check_params(TREE, bf16, dtypes="kind")
  with raises_before_tracing(ParamsMismatchError, "dtype mismatches"):
    check_params(TREE, bf16)
  with raises_before_tracing(ParamsMismatchError, r"embed: int32 != float32"):
    check_params(TREE, {**TREE, "embed": np.zeros((5, 4), np.int32)}, dtypes="kind")
  with raises_before_tracing(ValueError, "dtypes"):
    check_params(TREE, TREE, dtypes="loose")


def test_long_listings_are_capped():
  expected = {f"w{i:02d}": jax.ShapeDtypeStruct((2,), jnp.float32) for i in range(30)}
  with raises_before_tracing(ParamsMismatchError, rf"30 differences.*\.\.\. {30 - MAX_LISTED} more"
                             ) as info:
    check_params(expected, {})
  assert "w29" not in str(info.value)


def test_sharded_arrays_are_checked_without_a_transfer():
  mesh = jax.make_mesh((len(jax.devices()),), ("x",))
  sharded = jax.device_put(jnp.zeros((8 * len(jax.devices()), 4)),
                           NamedSharding(mesh, PartitionSpec("x")))
  expected = {"w": jax.ShapeDtypeStruct(sharded.shape, jnp.float32)}
  with jax.transfer_guard("disallow"):
    check_params(expected, {"w": sharded})
    with raises_before_tracing(ParamsMismatchError, "shape mismatches"):
      check_params({"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)}, {"w": sharded})


def test_finiteness_names_the_tensor_and_the_source():
  bad = {"a": np.ones(3, np.float32), "b": {"c": np.array([1.0, np.nan], np.float32)},
         "d": jnp.array([jnp.inf]), "i": np.array([1, 2])}
  with raises_before_tracing(ValueError, r"^here: non-finite .*\['b/c', 'd'\]"):
    check_finite(bad, where="here")
  check_finite({"a": np.ones(3), "i": np.array([1, 2])}, where="here")


# --- foreign state dicts and safetensors files ------------------------------------------------


@pytest.mark.parametrize("value, error, names", [
    (np.arange(6, dtype=np.int64).reshape(2, 3), TypeError, r"'t: int64'"),
    (np.array([[0.0, np.inf, 1.0]], np.float32), ValueError, r"non-finite .*'t'"),
])
def test_state_dict_tensors_must_be_floating_and_finite(value, error, names):
  with raises_before_tracing(error, "state_dict.*" + names):
    check_state_dict({"ok": np.ones(2, np.float32), "t": value})
  with raises_before_tracing(TypeError, "state_dict"):
    check_state_dict([("t", value)])


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("st") / "good.safetensors"
  safetensors_numpy.save_file({"a": np.ones((4, 4), np.float32)}, str(path))
  return path


@pytest.mark.parametrize("kind", ["truncated", "random", "oversized header", "empty"])
def test_unreadable_safetensors_name_the_file(kind, good_file, tmp_path):
  data = good_file.read_bytes()
  content = {"truncated": data[:-10], "random": np.random.default_rng(0).bytes(100),
             "oversized header": struct.pack("<Q", 10**12) + b"{}", "empty": b""}[kind]
  bad = _write(tmp_path / "bad.safetensors", content)
  with raises_before_tracing(ValueError, rf"paths: '{bad}' is not a readable safetensors file"):
    read_safetensors(bad)


def test_safetensors_integer_or_nonfinite_tensors_are_refused(tmp_path):
  path = tmp_path / "w.safetensors"
  safetensors_numpy.save_file({"w": np.ones(3, np.float32),
                               "y_embedder.embedding_table.weight": np.zeros((4, 2), np.int64)},
                              str(path))
  with raises_before_tracing(TypeError, rf"'y_embedder.embedding_table.weight' in '{path}' has "
                                        r"dtype int64"):
    read_safetensors(path)
  safetensors_numpy.save_file({"w": np.array([1.0, np.nan], np.float32)}, str(path))
  with raises_before_tracing(ValueError, rf"tensor 'w' in '{path}' holds non-finite"):
    read_safetensors(path)


def test_dit_checkpoint_with_an_integer_table_is_refused(tmp_path):
  """The issue's probe: an int64 embedding table in a DiT checkpoint used to load (cast)."""
  from jaxinf.checkpoints.dit import dit_params_from_state_dict, load_dit
  from jaxinf.models.dit import DiTConfig
  cfg = DiTConfig(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1,
                  num_heads=2, num_classes=3)
  sd = {"y_embedder.embedding_table.weight": np.zeros((4, 16), np.int64)}
  with raises_before_tracing(TypeError, r"original DiT state dict.*'y_embedder.embedding_table"):
    dit_params_from_state_dict(sd, cfg, "original")
  path = tmp_path / "dit.safetensors"
  safetensors_numpy.save_file(sd, str(path))
  with raises_before_tracing(TypeError, rf"in '{path}' has dtype int64"):
    load_dit(path, "original", cfg)


# --- npz parameter files ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("npz") / "params.npz"
  arrays.save_params(path, {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)})
  return path


def test_truncated_or_foreign_npz_names_the_file(npz_file, tmp_path):
  for content in (npz_file.read_bytes()[:-30], b"PK\x03\x04 not a zip", b""):
    bad = _write(tmp_path / "bad.npz", content)
    with raises_before_tracing(ValueError, rf"checkpoint '{bad}': not a readable \.npz"):
      arrays.load_params(bad)
  with raises_before_tracing(FileNotFoundError, "path"):
    arrays.load_params(tmp_path / "missing.npz")


def test_npz_template_and_finiteness(npz_file, tmp_path):
  template = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
  params, _ = arrays.load_params(npz_file, template)
  np.testing.assert_array_equal(params["w"], template["w"])
  with raises_before_tracing(ParamsMismatchError, rf"checkpoint '{npz_file}'.*dtype mismatches "
                                                  r"\['w: float32 != float64'\]"):
    arrays.load_params(npz_file, {**template, "w": np.ones((3, 2))})
  nan = tmp_path / "nan.npz"
  arrays.save_params(nan, {"w": np.array([1.0, np.nan], np.float32)})
  with raises_before_tracing(ValueError, rf"checkpoint '{nan}': non-finite .*\['w'\]"):
    arrays.load_params(nan)


# --- orbax restores ---------------------------------------------------------------------------

STATE = {"params": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "step": jnp.zeros((), jnp.int32)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  s = CheckpointStore(tmp_path_factory.mktemp("orbax"), max_to_keep=5)
  s.save(1, STATE)
  s.save(2, {**STATE, "params": {**STATE["params"], "w": jnp.full((2, 3), jnp.nan)}})
  s.wait()
  yield s
  s.close()


def _like(**params):
  return {**STATE, "params": {**STATE["params"], **params}}


RESTORE_CASES = {
    "dtype": (_like(w=jnp.ones((2, 3), jnp.bfloat16)), r"dtype mismatches \['params/w: float32 "
                                                        r"!= bfloat16'\]"),
    "shape": (_like(w=jnp.ones((2, 4))), r"shape mismatches \['params/w: \(2, 3\) != \(2, 4\)'\]"),
    "stored extra": ({**STATE, "params": {"w": jnp.ones((2, 3))}},
                     r"unexpected keys \['params/b'\]"),
    "stored missing": (_like(c=jnp.ones(1)), r"missing keys \['params/c'\]"),
}


@pytest.mark.parametrize("case", sorted(RESTORE_CASES))
def test_restore_refuses_another_tree(store, case):
  like, listing = RESTORE_CASES[case]
  with raises_before_tracing(ParamsMismatchError, rf"checkpoint '{store.directory}' step 1: .*"
                                                  + listing):
    store.restore(1, like)


def test_restore_exact_and_named_failures(store):
  restored = store.restore(1, STATE)
  jax.tree.map(np.testing.assert_array_equal, restored, STATE)
  with raises_before_tracing(ValueError, r"step: no step 7 .*saved steps: \[1, 2\]"):
    store.restore(7, STATE)
  with raises_before_tracing(TypeError, "step"):
    store.restore("1", STATE)
  with raises_before_tracing(ValueError, r"step 2: non-finite .*\['params/w'\]"):
    store.restore(2, STATE)


def test_restore_of_an_empty_step_directory(tmp_path):
  s = CheckpointStore(tmp_path / "ck")
  s.save(1, STATE)
  s.wait()
  (tmp_path / "ck" / "3").mkdir()
  s.close()
  s = CheckpointStore(tmp_path / "ck")
  with raises_before_tracing(ValueError, r"step 3: not a complete checkpoint"):
    s.restore(3, STATE)
  s.close()


def test_sharded_restore_checks_the_model_tree(tmp_path):
  from jaxinf.models import families
  from jaxinf.parallel import mesh as mesh_lib
  from jaxinf.parallel import shard
  model = families.build("transformer-tiny")[0]
  other = families.build(families.named_config("transformer-tiny", mlp_hidden=32))[0]
  s = CheckpointStore(tmp_path / "ck")
  s.save(1, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), other.abstract_params()))
  s.wait()
  mesh = mesh_lib.make_mesh(data=len(jax.devices()))
  with raises_before_tracing(ParamsMismatchError, r"step 1: .*shape mismatches \['layers/0/mlp"):
    shard.restore_params(s, 1, model, mesh)
  with raises_before_tracing(TypeError, "store"):
    shard.restore_params(str(tmp_path), 1, model, mesh)
  s.close()


# --- fuzz: the tree check and the npz loader against perturbed trees ---------------------------

_DTYPES = [np.float32, np.float16, np.int32]


@st.composite
def _trees(draw):
  names = draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=4,
                        unique=True))
  tree = {}
  for name in names:
    shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    value = np.arange(int(np.prod(shape)), dtype=draw(st.sampled_from(_DTYPES))).reshape(shape)
    if draw(st.booleans()):
      tree.setdefault("sub", {})[name] = value
    else:
      tree[name] = value
  return tree


def _perturb(tree, how, data):
  flat = arrays.flat_leaves(tree)
  name = data.draw(st.sampled_from(sorted(flat)))
  if how == "drop":
    flat.pop(name)
  elif how == "add":
    flat[name + "_x"] = np.zeros(1, np.float32)
  elif how == "shape":
    flat[name] = np.zeros(flat[name].shape + (2,), flat[name].dtype)
  elif how == "dtype":
    other = [d for d in _DTYPES if np.dtype(d) != flat[name].dtype]
    flat[name] = flat[name].astype(data.draw(st.sampled_from(other)))
  return arrays.unflatten_params(flat)


@settings(max_examples=25, deadline=None)
@given(tree=_trees(), how=st.sampled_from(["none", "drop", "add", "shape", "dtype"]),
       data=st.data())
def test_fuzz_named_error_or_exact_load(tmp_path_factory, tree, how, data):
  """Whatever the perturbation: either the check passes and the load is exact, or the error is
  the named one (never a crash elsewhere); a real perturbation is always caught."""
  perturbed = _perturb(tree, how, data)
  path = tmp_path_factory.mktemp("fuzz") / "p.npz"
  arrays.save_params(path, perturbed)
  n, _ = param_differences(_abstract(tree), perturbed)
  assert (n == 0) == (how == "none")
  if how == "none":
    check_params(_abstract(tree), perturbed)
    loaded, _ = arrays.load_params(path, tree)
    jax.tree.map(np.testing.assert_array_equal, loaded, tree)
    assert jax.tree.map(lambda x: x.dtype, loaded) == jax.tree.map(lambda x: x.dtype, tree)
  else:
    with raises_before_tracing(ParamsMismatchError, "params"):
      check_params(_abstract(tree), perturbed)
    with raises_before_tracing(ParamsMismatchError, f"checkpoint '{path}'"):
      arrays.load_params(path, tree)
