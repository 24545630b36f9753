"""sampler_pareto --smoke runs every part (solvers, caching, the diffusers peer) and reports."""

from __future__ import annotations

import json

import pytest

from experiments import sampler_pareto


@pytest.mark.slow
def test_smoke_run(tmp_path):
  pytest.importorskip("torch")  # the study runs its peer (diffusers' DiTPipeline) on torch
  cfg = sampler_pareto.Config(quickstart_dir=str(tmp_path / "quickstart"),
                              out_dir=str(tmp_path / "sampler_pareto"), smoke=True, progress=False)
  rows = sampler_pareto.run(cfg)
  out = tmp_path / "sampler_pareto_smoke"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  studies = {r["study"] for r in rows}
  assert studies == {"solver", "cache", "few-step", "peer"}
  few = {r["sampler"] for r in rows if r["study"] == "few-step"}
  assert few == {"flow_teacher", "reflow", "instaflow", "slimflow", "lcm", "mlcm"}
  cache = [r for r in rows if r["study"] == "cache"]
  assert [r["nfe"] for r in cache] == [6, 3, 3, 3]  # uncached, then 3 refreshes each
  peer = [r for r in rows if r["study"] == "peer"]
  assert all(r["max_abs_diff"] <= 1e-4 for r in peer)
  assert (tmp_path / "quickstart_smoke" / "dit" / "checkpoints").is_dir()
  assert (out / "pareto.png").stat().st_size > 0 and "Seed claims" in (out / "report.md").read_text()
