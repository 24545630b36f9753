"""kv_compression --smoke trains a tiny model a few steps and measures the uncompressed cache, H2O
and D2O; its options are refused by name when built."""

from __future__ import annotations

import json

import pytest
from bad_input import raises_before_tracing

from experiments import kv_compression


def test_smoke_run(tmp_path):
  cfg = kv_compression.Config(out_dir=str(tmp_path / "kv"), smoke=True, progress=False)
  rows = kv_compression.run(cfg)
  out = tmp_path / "kv_smoke"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  assert [(r["policy"], r["budget"]) for r in rows] == [("full", None), ("h2o", 24), ("d2o", 24)]
  full, h2o, d2o = rows
  # a (nearly untrained) byte model: bits per byte near log2(259) = 8.02, positive
  assert all(0 < r["stream_bpb"] < 9 and 0 <= r["recall"] <= 1 for r in rows)
  # the uncompressed cache holds every streamed position; H2O holds its budget; D2O's per-layer
  # budgets never add up to more than the uniform one
  assert full["live_slots_stream"] == 32
  assert h2o["live_slots_stream"] == 24 and d2o["live_slots_stream"] <= 24
  report = (out / "report.md").read_text()
  assert "D2O beats H2O at the same budget" in report and "budget 24:" in report
  assert (out / "kv_compression.png").stat().st_size > 0
  assert (out / "train" / "checkpoints").is_dir()
  assert (out / "train" / "copy_warmup" / "checkpoints").is_dir()   # the copy warm-up ran first
  recipe = json.loads((out / "train" / "recipe.json").read_text())
  assert recipe["copy_warmup_steps"] == 2 and recipe["copy"]["spans"] == 2


@pytest.mark.parametrize("options, error, names", [
    ({"policies": ("lru",)}, ValueError, "policies: unknown"),
    ({"storages": ("int4",)}, ValueError, "storages: unknown"),
    ({"budgets": (0,)}, ValueError, "budgets"),
    ({"budgets": (4096,)}, ValueError, "budgets: 4096 exceeds the longest"),
    ({"window": 0}, ValueError, "window"),
    ({"sinks": 64, "budgets": (32,)}, ValueError, "budgets.*sinks"),
    ({"copy_windows": 1.5}, ValueError, "copy_windows.*repeat_windows"),
    ({"copy_spans": -1}, ValueError, "copy_spans"),
    ({"copy_warmup_steps": -1}, ValueError, "copy_warmup_steps"),
])
def test_bad_options_are_named(options, error, names):
  with raises_before_tracing(error, names):
    kv_compression.Config(**options)
