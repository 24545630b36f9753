"""Killing training mid-run and restarting resumes from the checkpoint with identical losses, and a
kill while the restart rewrites the loss log loses no record (`jaxinf.train.loop`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments import train_dit
from jaxinf.train.loop import run_training

ARGS = ["--model", "DiT-tiny", "--train.steps", "120", "--train.checkpoint-every", "10",
        "--train.batch-size", "16", "--no-progress"]


def run(out_dir, **kw):
  return subprocess.Popen([sys.executable, "-m", "experiments.train_dit", "--out-dir", str(out_dir),
                           *ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def losses(out_dir: Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "losses.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_kill_and_resume_gives_identical_losses(tmp_path):
  ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"
  ref = run(ref_dir)
  assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()
  expected = losses(ref_dir)
  assert sorted(expected) == list(range(1, 121))

  victim = run(cut_dir)
  deadline = time.time() + 300
  # wait until a checkpoint beyond step 30 exists, then kill without warning
  while time.time() < deadline:
    done = [int(p.name) for p in (cut_dir / "checkpoints").glob("[0-9]*") if p.name.isdigit()] \
        if (cut_dir / "checkpoints").exists() else []
    if done and max(done) >= 30:
      break
    assert victim.poll() is None, "training finished before it could be killed"
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = max(losses(cut_dir))
  assert killed_at < 120, "the run was not interrupted"

  resumed = run(cut_dir)
  assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
  got = losses(cut_dir)
  assert sorted(got) == list(range(1, 121))  # nothing lost, nothing duplicated
  assert got == expected  # bit-identical losses, before and after the kill


# --- the loss log's rewrite at start-up, in-process on a toy step ---------------------------------

STEPS, EVERY = 12, 4


class Killed(Exception):
  """Stands for SIGKILL where it is raised."""


@jax.jit
def toy_step(state, x):
  """Noisy gradient descent on (w - x)^2; the noise is drawn from the step, as `run_training`
  requires."""
  noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), state["step"]))
  w = state["w"]
  loss = jnp.square(w - x) + 0.1 * noise
  return {"step": state["step"] + 1, "w": w - 0.2 * (w - x) + 0.05 * noise}, loss


def toy_run(out_dir, step_fn=toy_step):
  state = {"step": jnp.zeros((), jnp.int32), "w": jnp.zeros((), jnp.float32)}
  return run_training(step_fn, state, (jnp.float32(1.5),), steps=STEPS, out_dir=out_dir,
                      checkpoint_every=EVERY, progress=False)


def killed_after(step: int):
  """`toy_step` that dies when asked for step `step + 1`."""

  def step_fn(state, x):
    if int(state["step"]) == step:
      raise Killed
    return toy_step(state, x)

  return step_fn


def log_records(out_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (out_dir / "losses.jsonl").read_text().splitlines()]


def wait_for_checkpoint(out_dir: Path, step: int) -> None:
  """Orbax may still be finishing the save of `step` when the killed run's exception returns; it
  renames the step's folder into place when complete."""
  deadline = time.time() + 60
  while not (out_dir / "checkpoints" / str(step)).is_dir():
    assert time.time() < deadline, f"checkpoint {step} never appeared"
    time.sleep(0.05)


def test_kill_during_log_rewrite_loses_no_record(tmp_path, monkeypatch):
  ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"
  _, expected = toy_run(ref_dir)
  assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

  # a run killed at step 10: checkpoint 8, and records 9 and 10 beyond it in the log
  with pytest.raises(Killed):
    toy_run(cut_dir, killed_after(10))
  wait_for_checkpoint(cut_dir, 8)
  assert log_records(cut_dir) == expected[:10]

  # the restart restores step 8 and rewrites the log to records 1..8; kill it after the new log is
  # written in full but before it replaces the old one
  real_replace = os.replace
  seen = []

  def kill_at_rename(src, dst, *args, **kwargs):
    if Path(dst) == cut_dir / "losses.jsonl":
      seen.append([json.loads(line) for line in Path(src).read_text().splitlines()])
      raise Killed
    return real_replace(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "replace", kill_at_rename)
  with pytest.raises(Killed):
    toy_run(cut_dir)
  monkeypatch.undo()
  assert seen == [expected[:8]]  # the kill came inside the rewrite, with the new log complete
  assert log_records(cut_dir) == expected[:10]  # the old log is untouched

  # the next restart resumes from 8: every record, each once, equal to the uninterrupted run's
  _, got = toy_run(cut_dir)
  assert got == expected
  assert (cut_dir / "losses.jsonl").read_text() == (ref_dir / "losses.jsonl").read_text()
  assert not (cut_dir / "losses.jsonl.tmp").exists()


def test_incomplete_log_is_refused(tmp_path):
  """A log missing records before the restored checkpoint (lost under the old truncate-then-write
  rewrite) raises a ValueError naming the log instead of returning a short history."""
  toy_run(tmp_path)
  log = tmp_path / "losses.jsonl"
  lines = log.read_text().splitlines(keepends=True)
  log.write_text("".join(lines[:3] + lines[4:]))  # step 4 lost
  with pytest.raises(ValueError, match="losses.jsonl"):
    toy_run(tmp_path)
  log.write_text("")  # everything lost
  with pytest.raises(ValueError, match="losses.jsonl"):
    toy_run(tmp_path)


@pytest.mark.slow
def test_train_dit_names_an_incomplete_log(tmp_path):
  """experiments.train_dit on a finished run whose log was lost: a ValueError naming the log, not
  an IndexError on the empty history."""
  cfg = train_dit.Config(out_dir=str(tmp_path), smoke=True, progress=False)
  train_dit.main(cfg)
  (tmp_path / "losses.jsonl").write_text("")
  with pytest.raises(ValueError, match="losses.jsonl"):
    train_dit.main(cfg)
