"""Device meshes with jaxinf's four named axes: `data`, `fsdp`, `tensor`, `sequence`.

    mesh = make_mesh(MeshConfig(data=2, tensor=4))     # or make_mesh(data=2, tensor=4)
    with jax.set_mesh(mesh):                            # activation constraints, kernel shard_maps
      out = generate(model, sharded_params, sharded_prompts, key, max_new_tokens=16)

Every mesh has all four axes (size 1 where unused), so a rule table naming them applies to any
mesh; one axis may be -1, "the remaining devices".

Axis types: **Auto**, deliberately (`jax.make_mesh` defaults to Explicit on current JAX). With
Auto axes the compiler (GSPMD / Shardy) propagates shardings from the inputs and from
`with_sharding_constraint` through code written without sharding in mind: jaxinf's models,
samplers and decoders index, scatter into caches and run `while_loop`s whose carries XLA lays out
by propagation. Explicit axes ("sharding in types", JAX's explicit-sharding guide) make every
operation with an ambiguous output sharding a trace-time error that needs an `out_sharding` (each
matmul against an FSDP-sharded weight, each gather and cache scatter), which would put sharding
code into every model — the opposite of the rule-table design. Explicit axes remain the better
tool for hand-written collectives; the shard_map kernels of `jaxinf.parallel.kernels` are manual
regions inside this Auto mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from jaxinf.parallel.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes of a mesh (each >= 1, or -1 for one axis: the devices left over)."""

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      size = getattr(self, name)
      if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(f"{name}: expected a mesh axis size >= 1 (or -1: the remaining "
                         f"devices), got {size!r}")
    if sum(getattr(self, name) == -1 for name in MESH_AXES) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")

  def shape(self, num_devices: int) -> tuple[int, ...]:
    """The axis sizes for `num_devices` devices (-1 resolved); ValueError if they do not multiply
    to exactly that many."""
    sizes = [getattr(self, name) for name in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh: the fixed axes of {self} ({known} devices) do not divide the "
                         f"{num_devices} devices")
      sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
      raise ValueError(f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} multiply to {known}, "
                       f"but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, *, devices: Sequence | None = None,
              **sizes: int) -> Mesh:
  """A `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor", "sequence"), all `AxisType.Auto`
  (see the module docstring), over `devices` (default: all of `jax.devices()`, laid out by
  `jax.make_mesh` for the interconnect). Give a `MeshConfig` or its fields as keywords.

  Raises ValueError before anything runs if the sizes do not multiply to the device count."""
  if config is None:
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
      raise ValueError(f"sizes: unknown mesh axes {unknown}; jaxinf's axes are {MESH_AXES}")
    config = MeshConfig(**sizes)
  elif sizes:
    raise ValueError(f"sizes: give a MeshConfig or keyword sizes, not both (got {sorted(sizes)})")
  if not isinstance(config, MeshConfig):
    raise TypeError(f"config: expected a MeshConfig, got {type(config).__name__}")
  n = len(jax.devices()) if devices is None else len(devices)
  shape = config.shape(n)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices is None:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=list(devices))


def describe_mesh(mesh: Mesh) -> str:
  """"data=2 fsdp=1 tensor=4 sequence=1 (8 cpu devices)"."""
  sizes = " ".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes))
  return f"{sizes} ({mesh.size} {mesh.devices.flat[0].platform} devices)"
