"""`experiments.scaling --smoke` (1 and 4 of the suite's 8 forced host devices): every parallel
layout reproduces one device (DiT fp32 1e-5, greedy tokens identical), the patch rows' HLO bytes
equal their closed form, the stale modes report their quality rows, and the report and plot are
written."""

from __future__ import annotations

import json

import numpy as np

from experiments import scaling


def test_smoke_run(tmp_path):
  out = tmp_path / "scaling_smoke"
  result = scaling.run(scaling.Config(smoke=True, out_dir=str(tmp_path / "scaling"),
                                      progress=False))
  rows, quality = result["rows"], result["quality"]
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  assert {(r["parallel"], r["devices"]) for r in rows} == {
      ("none", 1), ("patch exact", 1), ("patch distrifusion", 1), ("patch pcpp", 1),
      ("data", 4), ("tensor", 4), ("patch exact", 4), ("patch distrifusion", 4),
      ("patch pcpp", 4)}
  for r in rows:
    if r["model"].startswith("transformer"):
      assert r["tokens_identical"] is True, r
    elif r["parallel"] in ("none", "data", "tensor", "patch exact"):
      assert r["max_abs_diff"] <= 1e-5, r
    if r["parallel"].startswith("patch"):
      assert r["bytes_per_step"] == r["closed_form"], r
  four = {r["parallel"]: r for r in rows if r["devices"] == 4 and r["model"] == "DiT-tiny"}
  assert four["data"]["bytes_per_step"] == 0  # pure data parallelism: no collective at all
  assert four["tensor"]["bytes_per_step"] > 0  # Megatron's all-reduces are in the HLO
  # stale modes differ from exact (a little), PCPP sends a third of DistriFusion's bytes
  # (2 neighbours x half a band vs 3 whole bands)
  assert four["patch distrifusion"]["max_abs_diff"] > 1e-4
  assert four["patch pcpp"]["bytes_per_step"] * 3 == four["patch distrifusion"]["bytes_per_step"]
  assert [q["mode"] for q in quality] == ["exact", "distrifusion", "pcpp"]
  assert all(np.isfinite(q["fd_digits"]) and 0 <= q["cond_accuracy"] <= 1 for q in quality)
  assert quality[2]["bytes_vs_distrifusion"] == 1 / 3
  for name in ("report.md", "scaling.png", "meta.json"):
    assert (out / name).stat().st_size > 0
