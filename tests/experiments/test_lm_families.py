"""lm_families --smoke runs every part (training, speed, memory, peers) and reports."""

from __future__ import annotations

import json

import pytest

from experiments import lm_families
from jaxinf.recipes import code_models


@pytest.mark.slow
def test_smoke_run(tmp_path):
  pytest.importorskip("torch")  # its peers (transformers, the rwkv package) run on torch
  cfg = lm_families.Config(out_dir=str(tmp_path / "lm_families"), smoke=True, progress=False)
  rows = lm_families.run(cfg)
  out = tmp_path / "lm_families_smoke"
  assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
  assert {r["study"] for r in rows} == {"train", "prefill", "decode", "memory", "peer"}
  train = {r["family"]: r for r in rows if r["study"] == "train"}
  assert sorted(train) == sorted(code_models.FAMILIES)
  # an untrained byte model sits near log2(259) = 8.02 bits; anything far above means a broken eval
  assert all(0 < r["heldout_bpb"] < 9 for r in train.values())
  # a KV cache grows linearly with the context; recurrent states don't grow at all
  mem = {(r["family"], r["context"]): r["state_bytes"] for r in rows if r["study"] == "memory"}
  assert mem["transformer", 256] == 4 * mem["transformer", 64]
  for fam in ("transnormer", "rwkv7", "mamba"):
    assert mem[fam, 256] == mem[fam, 64] > 0
  # greedy decoding on the same converted weights agrees token for token with each library
  peer = [r for r in rows if r["study"] == "peer" and "speedup" in r]
  assert {r["peer"] for r in peer} == {"transformers llama", "transformers mamba",
                                       "rwkv package rwkv7"}
  assert all(r["greedy_agree"] == 1.0 for r in peer)
  assert (out / "train" / "rwkv7" / "checkpoints").is_dir()
  for name in ("loss", "prefill", "memory", "decode"):
    assert (out / f"{name}.png").stat().st_size > 0
  assert "## peer" in (out / "report.md").read_text()
