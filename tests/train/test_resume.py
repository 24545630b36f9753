"""Killing training mid-run and restarting resumes from the checkpoint with identical losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
