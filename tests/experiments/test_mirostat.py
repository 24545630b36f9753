"""mirostat --smoke trains (or reuses) the tiny model and reports every sampler."""

from __future__ import annotations

import json

import pytest

from experiments import mirostat
from jaxinf.recipes import code_models


@pytest.mark.slow
def test_smoke_run(tmp_path):
  fam = code_models.FamilyTraining(out_dir=str(tmp_path / "lm_families"))
  cfg = mirostat.Config(families=fam, out_dir=str(tmp_path / "mirostat"), smoke=True,
                        progress=False)
  rows = mirostat.run(cfg)
  out = tmp_path / "mirostat_smoke"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  assert [r["sampler"] for r in rows] == ["mirostat v2 tau=1.5", "mirostat v1 tau=1.5",
                                          "top-k k=5", "top-p p=0.9", "pure sampling (T=1)"]
  # bits of a drawn byte under a (nearly untrained) model: positive, and near log2(259) = 8.02
  assert all(0 < r["surprise_mean"] < 9 for r in rows)
  assert (tmp_path / "lm_families_smoke" / "train" / "rwkv7" / "checkpoints").is_dir()
  assert (out / "mirostat.png").stat().st_size > 0
