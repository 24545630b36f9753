"""quantization --smoke trains a tiny DiT and a tiny code LM a few steps, quantizes them through
`jaxinf.quant` and samples / scores them; its options are refused by name when built."""

from __future__ import annotations

import json
import re
import math

import pytest
from bad_input import raises_before_tracing

from experiments import quantization


def test_smoke_run(tmp_path):
  cfg = quantization.Config(out_dir=str(tmp_path / "q"), smoke=True, progress=False)
  rows = quantization.run(cfg)
  out = tmp_path / "q_smoke"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  assert [(r["study"], r["format"]) for r in rows] == [
      ("dit", "fp32"), ("dit", "int4_g"), ("dit", "w8a8_fp8"),
      ("code_lm", "fp32"), ("code_lm", "int3"), ("code_lm", "squeeze3")]
  dit = rows[:3]
  lm = rows[3:]
  # low-bit storage is smaller than the fp32 tree, counted from the arrays
  assert all(r["weight_bytes"] < dit[0]["weight_bytes"] for r in dit[1:])
  assert all(r["weight_bytes"] < lm[0]["weight_bytes"] for r in lm[1:])
  assert [r["stored_as"] for r in dit] == ["fp32", "int4", "e4m3_fn"]
  assert all(r["fd"] > 0 and 0 <= r["cond_accuracy"] <= 1 and r["ms_per_step"] > 0 for r in dit)
  # a (nearly untrained) byte model: bits per byte near log2(259) = 8.02
  assert all(0 < r["bpb"] < 9 for r in lm)
  report = (out / "report.md").read_text()
  assert "FP8 W8A8 no noticeable degradation" in report
  assert "SqueezeLLM 3-bit closes most of the gap" in report
  assert not re.search(r"\{(meta|cfg|full|r)\b", report)   # no f-string left unformatted
  assert (out / "quantization.png").stat().st_size > 0


@pytest.mark.parametrize("options, error, names", [
    ({"dit_formats": ("int2",)}, ValueError, "dit_formats.*unknown"),
    ({"lm_formats": ("squeeze9",)}, ValueError, "lm_formats.*unknown"),
    ({"steps": 0}, ValueError, "steps"),
    ({"guidance_scale": math.nan}, ValueError, "guidance_scale"),
    ({"adaround_iterations": 0}, ValueError, "adaround_iterations"),
    ({"samples_per_class": 500}, ValueError, "samples_per_class"),
])
def test_bad_options_are_named(options, error, names):
  with raises_before_tracing(error, names):
    quantization.Config(**options)


def test_the_code_lm_is_the_kv_compression_studys_recipe():
  """At the defaults both studies ask for one recipe, so one training in one folder serves both
  (`window_lm` would refuse the folder for any other)."""
  from experiments import kv_compression
  assert quantization.Config().lm_recipe() == kv_compression.lm_recipe(kv_compression.Config())
  assert quantization.Config().lm_dir == kv_compression.Config().out_dir
  assert quantization.Config(seed=3).lm_recipe().seed == 3
