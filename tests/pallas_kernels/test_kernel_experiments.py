"""The kernel experiments run end to end at their smoke sizes and write their reports."""

from __future__ import annotations

import json

import pytest

from experiments import bench_kernels, device_check


@pytest.mark.slow
def test_bench_kernels_smoke_writes_results(tmp_path):
  result = bench_kernels.main(bench_kernels.BenchConfig(smoke=True, results_root=str(tmp_path),
                                                        repeats=1))
  out_dir = tmp_path / "bench_kernels_smoke"
  rows = json.loads((out_dir / "results.json").read_text())
  # Every op with every impl at every smoke length (nothing is skipped at smoke sizes).
  assert {(r["op"], r["impl"]) for r in rows} == {
      (op, impl) for op in bench_kernels.OPS for impl in bench_kernels.IMPLS
      if impl != "xla_parallel" or op in bench_kernels.PARALLEL_FORMS}
  assert all(r["median_ms"] > 0 for r in rows)
  assert (out_dir / "time.png").stat().st_size > 0 and (out_dir / "memory.png").exists()
  assert "Goal check" in (out_dir / "report.md").read_text()
  assert {e["op"] for e in result["exponents"]} == set(bench_kernels.OPS)


@pytest.mark.slow
def test_device_check_cpu_interpret_mode_passes(tmp_path):
  result = device_check.main(device_check.DeviceCheckConfig(cpu=True, results_root=str(tmp_path)))
  assert result["errors"] == []
  correctness = [r for r in result["rows"] if r["section"] == "correctness"]
  assert len(correctness) == 8  # four kernels x (bf16, fp32)
  assert all(r["status"] == "PASS" for r in correctness), correctness
  assert (tmp_path / "device_check_cpu" / "report.md").exists()


@pytest.mark.slow
def test_device_check_tpu_forms_in_tpu_interpret_mode(tmp_path):
  # The TPU section (what a TPU backend runs by default) with the Mosaic forms in TPU interpret
  # mode: the same checks, the TPU block-size variants.
  result = device_check.main(device_check.DeviceCheckConfig(cpu=True, form="tpu",
                                                            results_root=str(tmp_path)))
  assert result["errors"] == []
  correctness = [r for r in result["rows"] if r["section"] == "correctness"]
  assert len(correctness) == 8 and all(r["form"] == "tpu" for r in correctness)
  assert all(r["status"] == "PASS" for r in correctness), correctness
  timed_impls = {r["impl"] for r in result["rows"] if "ms" in r}
  assert {"pallas_block_d256", "pallas_chunk64"} <= timed_impls  # the TPU defaults ran
  assert "TPU kernel forms" in (tmp_path / "device_check_cpu" / "report.md").read_text()


def test_device_check_tpu_defaults_peaks_and_bad_form():
  assert device_check.FORMS["tpu"].scan_variants["pallas_block_d256"] == (
      device_check.pk.SelectiveScanBlocks())  # the TPU default comes first (run at --cpu)
  assert device_check.peaks(type("Device", (), {"device_kind": "TPU v5 lite"})())[:2] == (
      197.0, 0.819)
  assert device_check.peaks(type("Device", (), {"device_kind": "TPU v5p"})())[:2] == (
      459.0, 2.765)
  with pytest.raises(ValueError, match="form"):
    device_check.main(device_check.DeviceCheckConfig(cpu=True, form="cuda"))
