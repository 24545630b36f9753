"""roofline --smoke writes its tables (every family and the DiT, on every device and this CPU),
the measured decode of every family and the DiT breakdown."""

from __future__ import annotations

import json

from experiments import roofline
from jaxinf.analysis import roofline as rl


def test_smoke_run(tmp_path):
  cfg = roofline.Config(out_dir=str(tmp_path / "roofline"), smoke=True, progress=False)
  rows = roofline.run(cfg)
  out = tmp_path / "roofline_smoke"
  for name in ("results.json", "report.md", "roofline.png", "meta.json"):
    assert (out / name).stat().st_size > 0, name
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  devices = set(rl.DEVICES) | {"host-cpu"}
  for mode, batch in (("decode", 1), ("decode", 4), ("prefill", 2)):
    table = [r for r in rows if r["mode"] == mode and r["batch"] == batch]
    assert {(r["family"], r["device"]) for r in table} == {
        (f, d) for f in ("transformer", "mamba", "rwkv7", "transnormer") for d in devices}
  assert {r["device"] for r in rows if r["family"] == "dit"} == devices
  measured = [r for r in rows if r["mode"] == "decode (measured)"]
  assert {(r["family"], r["batch"]) for r in measured} == {
      (f, b) for f in ("transformer", "mamba", "rwkv7", "transnormer") for b in (1, 4)}
  assert all(r["measured_ms"] > 0 and r["measured/predicted"] > 0 for r in measured)
  meta = json.loads((out / "meta.json").read_text())
  assert meta["dit"]["forward_ms"] > 0 and 0 < meta["dit"]["fraction_of_peak"]
  assert len(meta["dit"]["matmul_rates"]) == 7
  report = (out / "report.md").read_text()
  for heading in ("## Decode at batch 1", "## Decode at batch 4", "## Prefill at batch 2",
                  "## Measured decode on this CPU", "## DiT sampling step on this CPU"):
    assert heading in report
