"""bench_decode --smoke: the table's structure (every runtime that is installed, at both batches, a
roofline beside each row), peers that are missing skipped by name, and jaxinf's greedy tokens equal
to transformers' on the same weights (where torch and transformers are installed)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from experiments import bench_decode


def _has(*modules: str) -> bool:
  return all(importlib.util.find_spec(m) is not None for m in modules)


def test_smoke_run(tmp_path, capsys):
  cfg = bench_decode.Config(out_dir=str(tmp_path / "bench"), smoke=True, progress=False)
  runtimes, skipped = bench_decode.available(cfg)
  rows = bench_decode.run(cfg)
  printed = capsys.readouterr().out
  out = tmp_path / "bench_smoke"
  for name in ("results.json", "report.md", "meta.json", "bench_decode.png"):
    assert (out / name).stat().st_size > 0, name
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  for name, why in skipped.items():
    assert f"skipped {name}: {why}" in printed
  assert "jaxinf" in runtimes

  expected = {("jaxinf", "float32")}
  if "transformers" in runtimes:
    expected.add(("transformers", "float32"))
  if "llama.cpp" in runtimes:
    expected |= {("llama.cpp", w) for w in bench_decode.GGUF_TYPES}
  if bench_decode.quantizer() is not None:
    expected |= {("jaxinf", w) for w in bench_decode.JAXINF_WEIGHTS if w != "float32"}
  for batch in (1, 8):
    table = {(r["runtime"], r["weights"]): r for r in rows if r["batch"] == batch}
    assert set(table) == expected, batch
    for r in table.values():
      assert r["size"] == "llama-tiny" and len(r["times"]) == 1
      assert r["tokens_per_s"] == pytest.approx(batch * 8 / r["seconds"])
      assert r["roofline_tok_s"] > 0 and r["of_roofline"] == pytest.approx(
          r["tokens_per_s"] / r["roofline_tok_s"])
      assert r["weight_mb"] > 0
      if "llama.cpp" in runtimes:
        peer = table[("llama.cpp", bench_decode.PEER_OF[r["weights"]])]
        assert r["vs_llama_cpp"] == pytest.approx(r["tokens_per_s"] / peer["tokens_per_s"])
      else:
        assert r["vs_llama_cpp"] is None
    # fp32 weights: every parameter read once, but one row of the untied embedding
    cfg_tiny = bench_decode.SIZES["llama-tiny"]
    assert table[("jaxinf", "float32")]["weight_mb"] * 1e6 == 4 * (
        bench_decode.param_count(cfg_tiny) - (cfg_tiny.vocab_size - 1) * cfg_tiny.hidden_size)
    if "transformers" in runtimes:
      ours = table[("jaxinf", "float32")]
      assert ours["agrees_with"] == "transformers float32"
      assert ours["exact"] is True and ours["agree_prefix"] == 1.0
    if "llama.cpp" in runtimes:
      # f32 in another library's arithmetic: greedy agrees at least for most of the tokens
      assert table[("llama.cpp", "f32")]["agree_prefix"] >= 0.5
      assert table[("llama.cpp", "f32")]["weight_mb"] == pytest.approx(
          table[("jaxinf", "float32")]["weight_mb"], rel=1e-6)
  report = (out / "report.md").read_text()
  assert "| size | batch | runtime |" in report and "Read bandwidth" in report
  meta = json.loads((out / "meta.json").read_text())
  # DRAM sampled at the start and after each size; the roofline divides by their median
  samples = meta["dram_samples_gbps"]
  assert len(samples) == 2 and all(g > 0 for g in samples)
  assert meta["bandwidth_gbps"] == pytest.approx(sum(samples) / 2)
  for r in rows:
    assert r["roofline_tok_s"] == pytest.approx(
        r["batch"] * meta["bandwidth_gbps"] * 1e9 / r["step_bytes"])
  kernel_rows = meta["kernel_or_xla"]
  if bench_decode.quantizer() is not None and kernel_rows:  # empty: no C++ compiler
    from jaxinf.quant import cpu_kernel

    assert {(r["weights"], r["rows"]) for r in kernel_rows} == {
        (w, m) for w in bench_decode.KERNEL_ROW_WEIGHTS for m in (1, 65)}
    for r in kernel_rows:
      assert r["kernel_ms"] > 0 and r["xla_ms"] > 0
      assert r["chosen"] == ("kernel" if cpu_kernel.use_kernel(
          r["rows"], codes=r["weights"] != "float32-ffi")
                             else "xla")
    assert "## Kernel or XLA, by rows of x" in report


def test_missing_peers_are_skipped_by_name(monkeypatch):
  """Without llama-cpp-python (or torch), the run goes on with what is installed and says why."""
  real = bench_decode._installed
  monkeypatch.setattr(bench_decode, "_installed", lambda m: m != "llama_cpp" and real(m))
  runtimes, skipped = bench_decode.available(bench_decode.Config(smoke=True))
  assert "llama.cpp" not in runtimes and "llama.cpp" in skipped
  assert "llama-cpp-python not installed" in skipped["llama.cpp"] or "torch" in skipped["llama.cpp"]
  monkeypatch.setattr(bench_decode, "_installed",
                      lambda m: m not in ("torch", "llama_cpp") and real(m))
  runtimes, skipped = bench_decode.available(bench_decode.Config(smoke=True))
  assert runtimes == ["jaxinf"] and {"transformers", "llama.cpp"} <= set(skipped)


@pytest.mark.parametrize("options, name", [
    ({"sizes": ("llama-7b",)}, "sizes"),
    ({"runtimes": ("vllm",)}, "runtimes"),
    ({"gguf_types": ("q5_k",)}, "gguf_types"),
    ({"new_tokens": 2000}, "new_tokens"),
    ({"batches": (0,)}, "batches"),
    ({"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
    ({"threads": -1}, "threads"),
])
def test_bad_options_are_named(options, name):
  with pytest.raises(ValueError, match=name):
    bench_decode.Config(**options)
