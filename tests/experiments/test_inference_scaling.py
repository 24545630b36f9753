"""inference_scaling --smoke trains (or reuses) the tiny solver and scorer and reports every method."""

from __future__ import annotations

import json

import pytest

from experiments import inference_scaling


@pytest.mark.slow
def test_smoke_run(tmp_path):
  cfg = inference_scaling.Config(out_dir=str(tmp_path / "inference_scaling"), smoke=True,
                                 progress=False)
  rows = inference_scaling.run(cfg)
  out = tmp_path / "inference_scaling_smoke"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  assert [r["N"] for r in rows] == [1, 2, 4]
  for r in rows:
    for m in ("best_of_n", "self_consistency", "weighted_consistency", "coverage"):
      assert 0.0 <= r[m] <= 1.0
  # coverage (pass@N) is non-decreasing in N and bounds every method that answers from N samples
  cov = [r["coverage"] for r in rows]
  assert cov == sorted(cov)
  assert all(r[m] <= r["coverage"] + 1e-12 for r in rows
             for m in ("best_of_n", "self_consistency", "weighted_consistency"))
  assert "particle_filter (best)" in rows[1] and "particle_filter (best)" not in rows[2]
  assert (out / "solver" / "checkpoints").is_dir() and (out / "scorer" / "checkpoints").is_dir()
  assert (out / "accuracy.png").stat().st_size > 0 and (out / "coverage.png").stat().st_size > 0
