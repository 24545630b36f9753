"""Native training checkpoints with orbax: save a pytree at a step, restore the latest exactly.

Orbax writes each step to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointStore:
  """`save(step, tree)`, `latest_step()`, `restore(step, like)` over one directory."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def save(self, step: int, tree: Any) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(tree))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, like: Any, shardings: Any = None) -> Any:
    """Restores `step` into the structure, shapes and dtypes of `like`. `shardings`: a tree like
    `like` of `jax.sharding.Sharding`s (e.g. `NamedSharding`s on any mesh, not necessarily the
    one the checkpoint was saved from): each process then reads only its own shards, straight
    onto the devices (`jaxinf.parallel.shard.restore_params`)."""
    if shardings is None:
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    else:
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              like, shardings)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
