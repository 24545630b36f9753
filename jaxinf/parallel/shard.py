"""Parameters, inputs and caches onto a mesh, through the rule table (`jaxinf.parallel.rules`).

    mesh = make_mesh(data=2, tensor=4)
    model = TransformerLM(config)
    params = init_params(model, mesh, seed=0)          # sharded at creation: no full copy anywhere
    print(describe_params(params, param_axes(model)))  # path, shape, logical axes, mesh spec
    prompts = shard_batch(prompts, mesh)               # rows over data x fsdp
    with jax.set_mesh(mesh):
      out = generate(model, params, prompts, key, max_new_tokens=32)

A model here is a language-model family (`jaxinf.models.functional.FamilyLM`), whose parameter
axis names come from `jaxinf.models.families`, or the config of a DiT (`DiTConfig`) or VAE
(`VAEConfig`), whose names come from `dit.DIT_AXIS_RULES` / `vae.VAE_AXIS_RULES` through the same
`families.param_axes_from_rules`. Every function here checks its inputs against the mesh before
anything is traced or transferred: a head count, batch or parameter dimension that does not
divide over its mesh axes, an unknown logical name, or a rule naming a missing mesh axis is a
ValueError naming it. Nothing here reads array values (no host pulls of sharded arrays).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding

from jaxinf.models import dit, families, vae
from jaxinf.models.functional import FamilyLM
from jaxinf.parallel import rules as rules_lib
from jaxinf.parallel.rules import DEFAULT_RULES

# Config fields that count attention heads (split over the rule "head_count", i.e. tensor).
_HEAD_FIELDS = ("num_heads", "num_kv_heads", "n_heads")


def _module_factory(model):
  """(NNX module type, config) of a DiT or VAE config, or None."""
  if isinstance(model, dit.DiTConfig):
    return dit.DiT, model, dit.DIT_AXIS_RULES, "DiT"
  if isinstance(model, vae.VAEConfig):
    return vae.AutoencoderKL, model, vae.VAE_AXIS_RULES, "VAE"
  return None


def _check_model(model) -> None:
  if not isinstance(model, FamilyLM) and _module_factory(model) is None:
    raise TypeError(f"model: expected a language-model family (FamilyLM), a DiTConfig or a "
                    f"VAEConfig, got {type(model).__name__}")


def abstract_params(model) -> dict:
  """The parameter tree of `model` as `jax.ShapeDtypeStruct`s (nothing allocated)."""
  _check_model(model)
  if isinstance(model, FamilyLM):
    return model.abstract_params()
  module_type, config, _, _ = _module_factory(model)
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: module_type(config,
                                                                        rngs=nnx.Rngs(0)))))


def param_axes(model, params=None) -> dict:
  """Each parameter's logical axis names (a tree like `params`; default the model's abstract
  parameters)."""
  _check_model(model)
  if isinstance(model, FamilyLM):
    return families.param_axes(model, params)
  _, _, axis_rules, owner = _module_factory(model)
  return families.param_axes_from_rules(axis_rules, abstract_params(model) if params is None
                                        else params, owner=owner)


def check_heads(model, mesh, rules=DEFAULT_RULES) -> None:
  """Every head count of `model`'s config divides over the mesh axes of the rule "head_count"
  (Megatron splits attention by whole heads)."""
  _check_model(model)
  config = model.config if isinstance(model, FamilyLM) else model
  n = rules_lib.axis_size("head_count", mesh, rules)
  for field in _HEAD_FIELDS:
    count = getattr(config, field, None)
    if count is not None and count % n:
      raise ValueError(f"{field}: {count} heads do not divide over mesh axes "
                       f"{rules_lib.mesh_axes('head_count', mesh, rules)} of {n} devices")


def param_shardings(model, mesh, rules=DEFAULT_RULES, params=None) -> dict:
  """A tree like the parameters of `model` of `NamedSharding`s on `mesh` under `rules`, checked:
  head counts and every sharded dimension divide over their mesh axes."""
  check_heads(model, mesh, rules)
  shapes = abstract_params(model) if params is None else params
  axes = param_axes(model, shapes)
  return jax.tree.map(
      lambda names, x: NamedSharding(mesh, rules_lib.logical_to_spec(
          names, mesh, rules, shape=x.shape, what="params")),
      axes, shapes, is_leaf=lambda n: isinstance(n, tuple))


def init_params(model, mesh, *, seed: int = 0, rules=DEFAULT_RULES) -> dict:
  """The model's random parameters (the same values as its unsharded initialisation with `seed`)
  created directly in their shards: one jitted initialiser with `out_shardings`, so no device
  ever holds the full tree (random bits are sharding-invariant: `jax_threefry_partitionable`)."""
  shardings = param_shardings(model, mesh, rules)
  if isinstance(model, FamilyLM):
    init = lambda: model.init_params(seed)
  else:
    module_type, config, _, _ = _module_factory(model)
    init = lambda: nnx.to_pure_dict(nnx.state(module_type(config, rngs=nnx.Rngs(seed))))
  return jax.jit(init, out_shardings=shardings)()


def shard_params(model, params, mesh, rules=DEFAULT_RULES) -> dict:
  """`params` (host or device arrays of `model`) placed onto `mesh` under `rules`."""
  return jax.device_put(params, param_shardings(model, mesh, rules, params))


def restore_params(store, step: int, model, mesh, rules=DEFAULT_RULES) -> dict:
  """The parameters saved at `step` in a `jaxinf.checkpoints.native.CheckpointStore`, read
  straight into their shards on `mesh` (any mesh: orbax reshards from the saved layout). The
  stored tree is checked against the model's before anything is read (missing, extra, shape and
  dtype differences by path) and the restored values for finiteness (`CheckpointStore.restore`)."""
  from jaxinf.checkpoints.native import CheckpointStore  # orbax only where checkpoints are read
  if not isinstance(store, CheckpointStore):
    raise TypeError(f"store: expected a jaxinf.checkpoints.native.CheckpointStore, got "
                    f"{type(store).__name__}")
  return store.restore(step, abstract_params(model), param_shardings(model, mesh, rules))


def batch_sharding(shape, mesh, rules=DEFAULT_RULES, *, what: str = "x") -> NamedSharding:
  """The sharding of an input `[B, ...]` with its rows over the rule "batch"; ValueError if B
  does not divide."""
  if not isinstance(shape, tuple) or not shape:
    raise ValueError(f"{what}: expected an array with a batch dimension, got shape {shape!r}")
  names = ("batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, rules_lib.logical_to_spec(names, mesh, rules, shape=shape,
                                                       what=what))


def shard_batch(x, mesh, rules=DEFAULT_RULES, *, what: str = "x"):
  """`x` `[B, ...]` (numpy or jax) placed with its rows over the rule "batch" (data x fsdp)."""
  if not hasattr(x, "shape"):
    raise TypeError(f"{what}: expected an array, got {type(x).__name__}")
  return jax.device_put(x, batch_sharding(tuple(x.shape), mesh, rules, what=what))


def cache_shardings(model: FamilyLM, cache, mesh, rules=DEFAULT_RULES):
  """Shardings of a family's cache: each leaf's batch axis (`model.cache_batch_axes`) over the
  rule "batch", the rest replicated."""
  def one(x, axis):
    names = tuple("batch" if d == axis else None for d in range(x.ndim))
    return NamedSharding(mesh, rules_lib.logical_to_spec(names, mesh, rules, shape=x.shape,
                                                         what="cache"))
  return jax.tree.map(one, cache, model.cache_batch_axes(cache))


def describe_params(params, axes=None) -> str:
  """One line per parameter: path, shape, logical axes (if `axes` given) and its sharding's
  PartitionSpec (or the device for an unsharded array) — the one place to see a model's layout."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  names = ([None] * len(leaves) if axes is None else
           jax.tree.leaves(axes, is_leaf=lambda n: isinstance(n, tuple)))
  rows = [("parameter", "shape", "logical axes", "sharding")]
  for (path, x), logical in zip(leaves, names):
    sharding = getattr(x, "sharding", None)
    spec = (sharding.spec if isinstance(sharding, NamedSharding) else
            "-" if sharding is None else f"{type(sharding).__name__}")
    rows.append((families._path_name(path), str(tuple(x.shape)),
                 "" if logical is None else str(logical), str(spec)))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  total = sum(math.prod(x.shape) for _, x in leaves)
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  return "\n".join(lines + [f"{len(leaves)} parameters, {total:,} values"])
