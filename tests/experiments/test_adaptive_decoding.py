"""adaptive_decoding --smoke: tiny code models, every row, the report and both plots."""

from __future__ import annotations

import json

import pytest

from experiments import adaptive_decoding


@pytest.mark.slow
def test_smoke_run(tmp_path):
  cfg = adaptive_decoding.Config(out_dir=str(tmp_path / "adaptive_decoding"), smoke=True,
                                 progress=False)
  rows = adaptive_decoding.run(cfg)
  out = tmp_path / "adaptive_decoding_smoke"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  by = {r["method"]: r for r in rows}
  assert {"EAD (lossy) tau=1", "EAD (lossy) tau=7", "EAD (lossy) tau=7 eager"} <= set(by)
  assert sum(m.startswith("CD (lossy)") for m in by) == 2
  large = next(r for m, r in by.items() if m.startswith("large alone"))
  small = next(r for m, r in by.items() if m.startswith("small alone"))
  # the large model agrees with itself; the small one alone makes no large-model token
  assert large["agree_large"] == 1.0 and large["speedup_vs_large"] == 1.0
  assert small["large_share"] == 0.0
  for r in rows:
    assert 0.0 <= r.get("large_share", 0.0) <= 1.0
    assert r["tok_s_b1"] > 0
    if "nll_large" in r:
      assert 0 < r["nll_large"] < 10
  assert "lossy" in (out / "report.md").read_text()
  assert (out / "ead.png").stat().st_size > 0 and (out / "contrastive.png").stat().st_size > 0
