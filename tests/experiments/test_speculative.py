"""speculative --smoke trains (or reuses) the tiny code models and runs every method once."""

from __future__ import annotations

import json
import math

import pytest

from experiments import speculative


@pytest.mark.slow
def test_smoke_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # checkpoints and results go under tmp_path/results
  rows = speculative.run(speculative.Config(smoke=True, progress=False))
  out = tmp_path / "results" / "speculative_smoke"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  speed = [r for r in rows if r["study"] == "speed"]
  methods = {r["method"] for r in speed}
  assert {"speculative", "speculative-adaptive", "prompt-lookup", "trie-lookahead", "jacobi",
          "lookahead", "medusa", "medusa-typical (LOSSY)"} <= methods
  # greedy: every lossless method reproduces generate token for token
  assert all(r["identical_to_generate"] for r in speed if r["lossless"])
  for r in speed:
    assert r["speedup"] > 0 and r["tokens_per_call"] >= 1
    assert math.isnan(r["alpha"]) or 0 <= r["alpha"] <= 1
    assert math.isnan(r["accept_rate"]) or 0 <= r["accept_rate"] <= 1
  # the self-draft steps in the target's cache, and a row against the fp32-ffi target where the
  # CPU kernel builds
  assert any(r["draft"] == "self-int4-a8" for r in speed)
  if speculative._kernel_unavailable() is None:
    assert any(r["target"] == "target-fp32-ffi" for r in speed)
  anatomy = [r for r in rows if r["study"] == "anatomy"]
  assert len(anatomy) == 1 and anatomy[0]["rounds"] >= 1
  # pieces timed on their own are positive; round_ms, overhead_ms and generate_token_ms are
  # differences of two timed runs, which at smoke size (a few tokens) can come out negative on a
  # noisy machine: they must be finite, not of either sign (tests never check wall-clock time)
  for name in ("draft_step_ms", "verify_ms", "pieces_round_ms"):
    assert anatomy[0][name] > 0
  for name in ("round_ms", "overhead_ms", "generate_token_ms"):
    assert math.isfinite(anatomy[0][name])
  assert "## Where a self-draft round goes" in (out / "report.md").read_text()
  assert (tmp_path / "results" / "code_models_smoke" / "train" / "fastdraft-1m" /
          "target_text.npy").exists()
  assert (out / "speedup_gamma.png").stat().st_size > 0
