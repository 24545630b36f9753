"""Native training checkpoints with orbax: save a pytree at a step, restore the latest exactly.

Orbax writes each step to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxinf.checkpoints.validate import abstract_tree, check_finite, check_params


class CheckpointStore:
  """`save(step, tree)`, `latest_step()`, `restore(step, like)` over one directory."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        # Named up front so a fresh manager (a new process resuming) can read the stored tree's
        # metadata before restoring; without it orbax returns no metadata for the item.
        item_handlers=ocp.StandardCheckpointHandler())

  def save(self, step: int, tree: Any) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(tree))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, like: Any, shardings: Any = None) -> Any:
    """Restores `step` into the structure, shapes and dtypes of `like`. `shardings`: a tree like
    `like` of `jax.sharding.Sharding`s (e.g. `NamedSharding`s on any mesh, not necessarily the
    one the checkpoint was saved from): each process then reads only its own shards, straight
    onto the devices (`jaxinf.parallel.shard.restore_params`).

    Checked before anything is read: `step` is a saved step, its directory holds a complete
    checkpoint, and the stored tree has exactly the leaves, shapes and dtypes of `like` (orbax
    would otherwise cast to `like`'s dtypes silently); after reading, every floating leaf is
    finite. Errors name the directory and step (`ParamsMismatchError` lists the differences)."""
    where = f"checkpoint {self.directory!r} step {step!r}"
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise TypeError(f"step: expected an int, got {type(step).__name__}")
    steps = list(self._manager.all_steps())
    if step not in steps:
      raise ValueError(f"step: no step {step} in {self.directory!r}; saved steps: {steps}")
    try:
      stored = self._manager.item_metadata(step)
      stored = getattr(stored, "tree", stored)
    except Exception as e:  # orbax's own errors name neither the directory nor what is missing
      raise ValueError(f"{where}: not a complete checkpoint (empty or partly written step "
                       f"directory?): {type(e).__name__}: {e}") from e
    if stored is None or not jax.tree.leaves(stored):
      raise ValueError(f"{where}: not a complete checkpoint (no stored arrays)")
    check_params(abstract_tree(like), stored, name=where, dtypes="exact",
                 what="the tree to restore into (`like`)")
    if shardings is None:
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    else:
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              like, shardings)
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise ValueError(f"{where}: could not be read into `like` (truncated or corrupt files?): "
                       f"{type(e).__name__}: {e}") from e
    check_finite(restored, where=where)
    return restored

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
