"""The one training loop: jitted steps, orbax checkpoints, a loss log, exact resume.

`step_fn(state, *data) -> (state, loss)` must derive all its randomness from `state["step"]`
(fold_in), so a run restored from the checkpoint at step k continues with exactly the losses an
uninterrupted run has after step k. Loss records past the restored checkpoint (written before a
kill) are dropped and recomputed identically: nothing is lost, nothing duplicated. Dropping them
rewrites the log atomically (a temporary file renamed over it), so a kill during the rewrite leaves
the old log or the new one, never a truncated one; the log is synced to disk before every
checkpoint, so it always holds every record up to the latest checkpoint. The step every trainer
runs here is `jaxinf.train.step.make_train_step`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxinf.checkpoints.native import CheckpointStore


def _read_losses(path: Path, upto: int) -> list[dict]:
  """Loss records with step <= upto."""
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      break  # a line cut short by a kill: nothing after it was checkpointed
    if rec["step"] <= upto:
      records.append(rec)
  return records


def _rewrite_losses(path: Path, records: list[dict]) -> None:
  """Replaces the log at `path` by `records`: written and synced to `path` + ".tmp", then renamed
  over `path` (`os.replace`, atomic on POSIX and Windows), so a kill at any point leaves either the
  old log or the new one."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def run_training(step_fn: Callable, state: dict[str, Any], data: Sequence[Any], *, steps: int,
                 out_dir: str | os.PathLike, checkpoint_every: int, progress: bool = True,
                 desc: str = "train") -> tuple[dict[str, Any], list[dict]]:
  """Runs `step_fn` until `state["step"] == steps`, resuming from `out_dir/checkpoints`.

  Appends `{"step", "loss"}` per step to `out_dir/losses.jsonl`; checkpoints every
  `checkpoint_every` steps and at the end. Returns (state, all loss records of the run). Raises
  `ValueError` before training if the log lacks a record up to the restored checkpoint (a log
  deleted, or truncated by a kill under the non-atomic rewrite of earlier versions).
  """
  for name, value in (("steps", steps), ("checkpoint_every", checkpoint_every)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}: expected a positive int, got {value!r}")
  if not callable(step_fn):
    raise TypeError(f"step_fn: expected the step of make_train_step, got {type(step_fn).__name__}")
  if not isinstance(state, dict) or "step" not in state:
    raise TypeError("state: expected a dict with a 'step' counter (init_train_state's layout)")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  store = CheckpointStore(out_dir / "checkpoints")
  start = store.latest_step()
  if start is not None:
    state = store.restore(start, state)
  start = int(start or 0)
  log_path = out_dir / "losses.jsonl"
  records = _read_losses(log_path, start)
  if [r["step"] for r in records] != list(range(1, start + 1)):
    store.close()
    raise ValueError(f"out_dir: {log_path} lacks loss records before the restored checkpoint: "
                     f"expected steps 1..{start}, found {len(records)} records; the log was lost "
                     f"or truncated, so train in a new folder")
  _rewrite_losses(log_path, records)
  with open(log_path, "a") as log, tqdm(total=steps, initial=start, disable=not progress,
                                        desc=desc, unit="step") as bar:
    for s in range(start, steps):
      state, loss = step_fn(state, *data)
      rec = {"step": s + 1, "loss": float(loss)}
      records.append(rec)
      log.write(json.dumps(rec) + "\n")
      log.flush()
      if (s + 1) % checkpoint_every == 0 or s + 1 == steps:
        os.fsync(log.fileno())  # on disk before the checkpoint that relies on it
        store.save(s + 1, state)
      bar.update(1)
      if (s + 1) % 50 == 0:
        bar.set_postfix(loss=f"{np.mean([r['loss'] for r in records[-50:]]):.4f}")
  store.close()
  return state, records
