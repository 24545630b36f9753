"""Multi-host runs through JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program: it calls `initialize` before anything touches a device,
builds the same global mesh (`jaxinf.parallel.mesh.make_mesh` sees every process's devices),
loads only its own rows of each batch (`process_rows`, `global_batch`), and only process 0 writes
results (`is_main_process`). Orbax checkpoints (`jaxinf.checkpoints.native.CheckpointStore`) are
multi-host already: every process calls save / restore with the same global arrays, each writes
and reads its own shards, and orbax synchronises the processes through the distributed client.

    cfg = DistributedConfig(coordinator="10.0.0.1:1234", num_processes=2, process_id=0)
    initialize(cfg)                       # before any jax.devices() / computation
    mesh = make_mesh(data=2, tensor=4)    # 8 devices over 2 processes
    rows = process_rows(batch, mesh)      # this process's slice of the global batch
    prompts = global_batch(load(rows), batch, mesh)

A `DistributedConfig` with nothing set is a single process (`initialize` does nothing), unless
`auto` is set or JAX's `JAX_COORDINATOR_ADDRESS` is in the environment: then JAX fills every unset
field itself (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes; `jax.distributed.initialize`).

On CPU the cross-process collectives are gloo's TCP collectives
(`jax_cpu_collectives_implementation`), set before the CPU client starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxinf.parallel import shard
from jaxinf.parallel.rules import DEFAULT_RULES

CPU_COLLECTIVES = ("gloo", "mpi")


def _check_optional_int(name: str, value, minimum: int) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name}: expected an int or None, got {type(value).__name__}")
  if value < minimum:
    raise ValueError(f"{name}: expected >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Where this process stands in a multi-process run; None leaves a field to JAX's detection."""

  coordinator: str | None = None   # "host:port" of process 0's coordinator service
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None  # this process's devices (default: all)
  auto: bool = False               # initialise with nothing set: JAX detects TPU pods, SLURM, MPI
  cpu_collectives: str = "gloo"    # cross-process collectives on CPU: "gloo" or "mpi"
  timeout_s: int = 300             # how long to wait for every process to connect

  def __post_init__(self):
    if self.coordinator is not None:
      if not isinstance(self.coordinator, str):
        raise TypeError(f"coordinator: expected 'host:port' or None, got "
                        f"{type(self.coordinator).__name__}")
      host, _, port = self.coordinator.rpartition(":")
      if not host or not port.isdigit():
        raise ValueError(f"coordinator: expected 'host:port', got {self.coordinator!r}")
    _check_optional_int("num_processes", self.num_processes, 1)
    _check_optional_int("process_id", self.process_id, 0)
    if (self.num_processes is not None and self.process_id is not None
        and self.process_id >= self.num_processes):
      raise ValueError(f"process_id: expected < num_processes={self.num_processes}, got "
                       f"{self.process_id}")
    ids = self.local_device_ids
    if ids is not None and (not isinstance(ids, tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
      raise TypeError(f"local_device_ids: expected a tuple of ints >= 0 or None, got {ids!r}")
    if not isinstance(self.auto, bool):
      raise TypeError(f"auto: expected a bool, got {type(self.auto).__name__}")
    if self.cpu_collectives not in CPU_COLLECTIVES:
      raise ValueError(f"cpu_collectives: expected one of {CPU_COLLECTIVES}, got "
                       f"{self.cpu_collectives!r}")
    _check_optional_int("timeout_s", self.timeout_s, 1)

  @property
  def fully_specified(self) -> bool:
    """Coordinator, process count and id all given (and not `auto`): JAX detects nothing."""
    return not self.auto and None not in (self.coordinator, self.num_processes, self.process_id)

  @property
  def requested(self) -> bool:
    """Whether this is a multi-process run: a field set, `auto`, or JAX_COORDINATOR_ADDRESS."""
    return (self.auto or any(v is not None for v in (
        self.coordinator, self.num_processes, self.process_id, self.local_device_ids))
            or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))


def initialize(cfg: DistributedConfig | None = None) -> bool:
  """Starts `jax.distributed` as `cfg` says, once; True if this is a multi-process run.

  Call it before anything touches a device. With nothing configured it does nothing (one
  process); called again it only checks that the running set-up matches `cfg` (ValueError if
  not)."""
  cfg = DistributedConfig() if cfg is None else cfg
  if not isinstance(cfg, DistributedConfig):
    raise TypeError(f"cfg: expected a DistributedConfig, got {type(cfg).__name__}")
  if jax.distributed.is_initialized():
    for name, running in (("num_processes", jax.process_count()),
                          ("process_id", jax.process_index())):
      wanted = getattr(cfg, name)
      if wanted is not None and wanted != running:
        raise ValueError(f"{name}: jax.distributed already runs with {name}={running}, "
                         f"cfg asks for {wanted}")
    return True
  if not cfg.requested:
    return False
  # Read when the CPU client is created (inside initialize's first device use), so set first;
  # harmless on GPU and TPU, whose collectives are their own.
  jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
      process_id=cfg.process_id,
      local_device_ids=None if cfg.local_device_ids is None else list(cfg.local_device_ids),
      initialization_timeout=cfg.timeout_s,
      # all three given: nothing to detect (a SLURM or Kubernetes environment would otherwise
      # still be probed, and SLURM's would narrow each process to one local device)
      cluster_detection_method="deactivate" if cfg.fully_specified else None)
  return True


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes results (True in a single-process run)."""
  return jax.process_index() == 0


def process_rows(batch: int, mesh, rules=DEFAULT_RULES, *, what: str = "x") -> slice:
  """The rows of a global `[batch, ...]` input, sharded over the rule "batch", that this process
  holds: the rows it loads and passes to `global_batch`. All of them when the batch axes lie
  within each process (every process then loads the whole batch)."""
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
    raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
  sharding = shard.batch_sharding((batch,), mesh, rules, what=what)
  spans = sorted({idx[0].indices(batch)[:2]
                  for idx in sharding.addressable_devices_indices_map((batch,)).values()})
  start, stop = spans[0][0], spans[-1][1]
  if any(a[1] < b[0] for a, b in itertools.pairwise(spans)):
    raise ValueError(f"{what}: this process's rows {spans} of the batch are not contiguous on "
                     f"mesh {dict(zip(mesh.axis_names, mesh.axis_sizes))}")
  return slice(start, stop)


def global_batch(local, batch: int, mesh, rules=DEFAULT_RULES, *, what: str = "x") -> jax.Array:
  """One global `[batch, ...]` array from each process's rows `local` (`process_rows`), sharded
  over the rule "batch" (`jax.make_array_from_process_local_data`). In one process this equals
  `shard.shard_batch(local, mesh)`."""
  if not hasattr(local, "shape") or not local.shape:
    raise TypeError(f"{what}: expected an array with a batch dimension, got "
                    f"{type(local).__name__}")
  rows = process_rows(batch, mesh, rules, what=what)
  if local.shape[0] != rows.stop - rows.start:
    raise ValueError(f"{what}: this process holds rows {rows.start}:{rows.stop} of {batch}, "
                     f"got {local.shape[0]} rows")
  global_shape = (batch, *local.shape[1:])
  sharding = shard.batch_sharding(global_shape, mesh, rules, what=what)
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), global_shape)


def gather(x) -> np.ndarray:
  """The whole of a global array on every process's host (a collective: every process calls
  it); `np.asarray(x)` when this process holds all of it."""
  if not isinstance(x, jax.Array):
    raise TypeError(f"x: expected a jax.Array, got {type(x).__name__}")
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
