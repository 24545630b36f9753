"""The quickstart's --smoke run writes every artefact the README promises."""

from __future__ import annotations

import json

import pytest

from experiments import quickstart

KEYS = {"sampler", "steps", "nfe", "guidance", "seconds", "fd", "cond_accuracy"}


@pytest.mark.slow
def test_smoke_run_writes_results(tmp_path):
  cfg = quickstart.Config(smoke=True, out_dir=str(tmp_path / "quickstart"), progress=False)
  rows = quickstart.run(cfg)
  out = tmp_path / "quickstart_smoke"
  assert json.loads((out / "meta.json").read_text())["reused_checkpoint"] is False
  out = tmp_path / "quickstart_smoke"
  saved = json.loads((out / "results.json").read_text())
  assert saved == json.loads(json.dumps(rows))
  assert all(KEYS <= set(r) for r in saved)
  runs = [r for r in saved if r["study"] == "main"]
  assert {(r["sampler"], r["steps"], r["guidance"] > 0) for r in runs} == {
      ("ddpm", 20, False), ("ddpm", 20, True), ("ddim", 5, False), ("ddim", 5, True)}
  assert all(r["nfe"] == r["steps"] * (2 if r["guidance"] > 0 else 1) for r in runs)
  sweep = [r for r in saved if r["study"] == "guidance sweep"]
  assert [r["guidance"] for r in sweep] == [1.0, 3.0]
  for name in ("report.md", "samples.png", "pareto.png", "guidance.png"):
    assert (out / name).stat().st_size > 0
  # a second run reuses the finished checkpoint instead of training again
  again = quickstart.run(cfg)
  meta = json.loads((out / "meta.json").read_text())
  assert meta["reused_checkpoint"] is True
  assert [r["fd"] for r in again] == [r["fd"] for r in rows]  # same key, same samples
