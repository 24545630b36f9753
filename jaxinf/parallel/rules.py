"""Logical axis names -> mesh axes: the one rule table (the MaxText / levanter pattern).

Models name the dimensions of their parameters and activations in their own words ("embed",
"heads", "mlp", "batch": see `jaxinf.models.families` for the parameter names); a rule table maps
each logical name to mesh axes, so a new model adds names, never sharding code. This is MaxText's
`logical_axis_rules` (`src/maxtext/configs/base.yml`) and levanter's `axis_resources`.

    rules = DEFAULT_RULES                       # ((logical name, mesh axes or None), ...)
    spec = logical_to_spec(("embed", "mlp"), mesh, rules, shape=(64, 256))   # P('fsdp', 'tensor')

Semantics (`logical_to_spec`):

- every logical name must have a rule (an unknown name is a ValueError naming it), and every mesh
  axis a rule names must exist in the mesh (a ValueError naming the rule);
- a rule's value is None (replicated), one mesh axis, or a tuple of them (sharded over their
  product, major to minor);
- mesh axes of size 1 are dropped, and a mesh axis already used by an earlier dimension of the same
  array is not used again (batch -> (data, fsdp) then embed -> fsdp leaves embed whole);
- with `shape`, every sharded dimension must divide by the product of its mesh axes, else a
  ValueError naming the array, the dimension and the axes (nothing is silently replicated).

Inside traced code, `constrain(x, names)` pins an activation to the rule table's layout when a mesh
is active (`jax.set_mesh(mesh)`), and is the identity otherwise. It always uses `DEFAULT_RULES`:
jit caches a trace per mesh context (the mesh is part of JAX's trace context) but would not see a
per-call rule table, so activation rules are a constant; parameter rules may differ per call
(`jaxinf.parallel.shard`), and XLA reshards between the two where they disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Megatron-LM (Shoeybi et al. 2019, §3) tensor parallelism: column-parallel first matmuls of
# attention and MLP (heads, mlp -> tensor), row-parallel second ones (their input dimension on
# tensor), one all-reduce per block; ZeRO-3 / FSDP (Rajbhandari et al. 2020) shards the residual
# width over fsdp; the batch runs over data x fsdp (MaxText's default).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    # parameters of the language-model families (jaxinf.models.families)
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("norm", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_count", "tensor"),
    ("head_dim", None),
    ("qkvu", "tensor"),
    ("decay_lora", None),
    ("a_lora", None),
    ("v_lora", None),
    ("gate_lora", None),
    ("ssm_inner", "tensor"),
    ("ssm_inner_xz", "tensor"),
    ("ssm_state", None),
    ("conv_kernel", None),
    ("dt_rank", None),
    ("ssm_proj", None),
    # DiT (jaxinf.models.dit.DIT_AXIS_RULES)
    ("qkv", "tensor"),
    ("patch", None),
    ("frequency", None),
    ("classes", None),
    ("modulation", None),
    # VAE (jaxinf.models.vae.VAE_AXIS_RULES): a convolutional net, data parallel only
    ("kernel_h", None),
    ("kernel_w", None),
    ("channels_in", None),
    ("channels", None),
)


def check_rules(rules, mesh=None) -> dict[str, tuple[str, ...]]:
  """The rule table as {logical name: mesh axes tuple}; raises ValueError for a malformed table, a
  name with two rules, or (given `mesh`) a rule naming a mesh axis the mesh does not have."""
  if not isinstance(rules, (tuple, list)):
    raise TypeError(f"rules: expected a sequence of (logical name, mesh axes) pairs, got "
                    f"{type(rules).__name__}")
  table: dict[str, tuple[str, ...]] = {}
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)):
      raise ValueError(f"rules: expected (logical name, mesh axes) pairs, got {rule!r}")
    name, target = rule
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    if not all(isinstance(a, str) for a in axes):
      raise ValueError(f"rules: the rule for {name!r} must name mesh axes as strings (or None), "
                       f"got {target!r}")
    if name in table:
      raise ValueError(f"rules: logical axis {name!r} has two rules")
    if mesh is not None:
      missing = [a for a in axes if a not in mesh.axis_names]
      if missing:
        raise ValueError(f"rules: the rule {name!r} -> {target!r} names mesh axes {missing} that "
                         f"the mesh does not have (its axes: {tuple(mesh.axis_names)})")
    table[name] = axes
  return table


def logical_to_spec(names: Sequence[str | None], mesh, rules=DEFAULT_RULES, *,
                    shape: Sequence[int] | None = None, what: str = "array") -> P:
  """The `PartitionSpec` of an array whose dimensions carry logical `names` (None: replicated),
  under `rules` on `mesh` (see the module docstring). `what` names the array in errors."""
  table = check_rules(rules, mesh)
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"{what}: {len(names)} logical axes {tuple(names)} for shape {tuple(shape)}")
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"{what}: unknown logical axis {name!r} (no rule; known: "
                       f"{sorted(table)})")
    axes = tuple(a for a in table[name] if sizes[a] > 1 and a not in used)
    if shape is not None and axes and shape[dim] % math.prod(sizes[a] for a in axes):
      raise ValueError(
          f"{what}: dimension {dim} ({name!r}, size {shape[dim]}) does not divide over mesh axes "
          f"{axes} of {math.prod(sizes[a] for a in axes)} devices; change the mesh or the rule "
          f"for {name!r}")
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def mesh_axes(name: str, mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes of size > 1 that logical axis `name` is sharded over."""
  spec = logical_to_spec((name,), mesh, rules)[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def axis_size(name: str, mesh, rules=DEFAULT_RULES) -> int:
  """How many ways logical axis `name` is split on `mesh`."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return math.prod(sizes[a] for a in mesh_axes(name, mesh, rules))


def active_mesh():
  """The mesh of the enclosing `jax.set_mesh` (abstract inside jit), or None if there is none or
  every axis has size 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return None
  return mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`x` pinned to the layout `DEFAULT_RULES` gives its logical `names` on the active mesh: a
  sharding constraint (GSPMD) inside jit. None leaves a dimension to XLA's propagation, as does a
  rule whose mesh axes are missing from the mesh or do not divide the dimension (the pre-trace
  checks of `jaxinf.parallel.shard` report the cases a caller controls). The identity when no mesh
  is active."""
  mesh = active_mesh()
  if mesh is None:
    return x
  rules = tuple((n, tuple(a for a in rule_axes(t) if a in mesh.axis_names))
                for n, t in DEFAULT_RULES)
  spec = []
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  used: set[str] = set()
  table = dict(rules)
  for dim, name in enumerate(names):
    if name is not None and name not in table:
      raise ValueError(f"names: unknown logical axis {name!r}")
    axes = tuple(a for a in table[name] if sizes[a] > 1 and a not in used) if name else ()
    if not axes or x.shape[dim] % math.prod(sizes[a] for a in axes):
      spec.append(P.UNCONSTRAINED)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  if all(s is P.UNCONSTRAINED for s in spec):
    return x
  return jax.lax.with_sharding_constraint(x, P(*spec))


def constrain_tree(tree, names_tree):
  """`constrain` on every leaf of `tree`, with `names_tree` a matching tree of name tuples."""
  return jax.tree.map(lambda names, x: constrain(x, names), names_tree, tree,
                      is_leaf=lambda n: isinstance(n, tuple))


def rule_axes(target) -> tuple[str, ...]:
  """A rule's mesh axes as a tuple (None: none)."""
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)
