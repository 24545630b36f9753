"""kv_compression --smoke trains a tiny model a few steps and measures the uncompressed cache, H2O
and D2O; its options are refused by name when built."""

from __future__ import annotations

import json
import re

import numpy as np

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
  assert not re.search(r"\{(meta|cfg|full|r)\b", report)   # no f-string left unformatted
  assert (out / "kv_compression.png").stat().st_size > 0
  assert (out / "train" / "checkpoints").is_dir()
  assert (out / "train" / "copy_warmup" / "checkpoints").is_dir()   # the copy warm-up ran first
  recipe = json.loads((out / "train" / "recipe.json").read_text())
  assert recipe["copy_warmup_steps"] == 2 and recipe["copy"]["spans"] == 2
  control = json.loads((out / "meta.json").read_text())["plant_control"]
  assert set(control) == {"hex", "string"} and "Why a hex literal" in report
  assert all(0 <= c["first_digit_acc"] <= 1 and c["key_bits_per_char"] > 0
             for c in control.values())


def test_every_plant_holds_the_same_keys_and_code():
  cfg = kv_compression.Config(rows=3, context=40, key_len=6)
  heldout = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, np.uint8).astype(np.int32)
  (hexp, hexk), (strp, strk) = (kv_compression.recall_prompts(cfg, heldout, p)
                                for p in ("hex", "string"))
  np.testing.assert_array_equal(hexk, strk)
  for row_h, row_s, key in zip(hexp, strp, hexk):
    text_h, text_s = bytes(row_h.astype(np.uint8)), bytes(row_s.astype(np.uint8))
    key = bytes(key.astype(np.uint8)).decode()
    assert text_h.startswith(f"SECRET_KEY = 0x{key}\n".encode())
    assert text_s.startswith(f'SECRET_KEY = "{key}"\n'.encode())
    assert text_h.endswith(b"\nSECRET_KEY = 0x") and text_s.endswith(b'\nSECRET_KEY = "')
    assert text_h[22:-16] == text_s[22:-15] and len(text_h[22:-16]) == 40   # the same code
    assert len(text_h) <= cfg.prompt_len and len(text_s) <= cfg.prompt_len


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
