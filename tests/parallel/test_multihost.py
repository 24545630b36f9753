"""Multi-host inference through `jax.distributed` (jaxinf.parallel.distributed), on one machine.

The main check launches `experiments.sharded_sampling --smoke` as two local processes with 4 forced
CPU devices each, joined by `jax.distributed.initialize` on 127.0.0.1 (gloo CPU collectives), on a
data x tensor = 2 x 4 mesh whose data axis spans the two processes (each loads half the prompts
and labels, and the DiT samples from its parameters saved and read back by both processes
through orbax). Oracle: the same function in this process on its 8 devices (tests/conftest.py), same
mesh shape. Greedy tokens identical; DDIM samples within atol 1e-5 + rtol 1e-5 (fp32; the
cross-process all-reduces of the tensor axis may sum in another order than the in-process ones).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import sharded_sampling
from jaxinf.parallel import distributed, shard
from jaxinf.parallel import mesh as mesh_lib

ROOT = Path(__file__).resolve().parents[2]
TOL = {"atol": 1e-5, "rtol": 1e-5}
TIMEOUT_S = 150  # both processes, start-up and compilation included
MESH = {"data": 2, "tensor": 4}


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out_dir: Path, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = []
  for pid in range(2):
    log = logs / f"process{pid}.log"
    cmd = [sys.executable, "-m", "experiments.sharded_sampling", "--smoke",
           "--out-dir", str(out_dir), "--mesh.data", "2", "--mesh.tensor", "4",
           "--distributed.coordinator", coordinator, "--distributed.num-processes", "2",
           "--distributed.process-id", str(pid), "--distributed.timeout-s", "60"]
    with open(log, "w") as f:
      procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                     stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs) -> str:
  """Waits for every process until TIMEOUT_S; kills them all on timeout or a failure; returns
  their output for an assertion message."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for proc, _ in procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
      if proc.returncode:
        break
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{log.read_text()[-4000:]}"
                   for i, (p, log) in enumerate(procs))


def test_two_processes_of_four_devices_equal_one_of_eight(tmp_path):
  out_dir = tmp_path / "sharded_sampling"
  procs = _launch(out_dir, tmp_path)
  cfg = sharded_sampling.smoke_config(sharded_sampling.Config())
  expected = sharded_sampling.outputs(cfg, mesh_lib.make_mesh(**MESH))  # meanwhile, here
  logs = _wait(procs)
  assert [p.returncode for p, _ in procs] == [0, 0], logs
  written = tmp_path / "sharded_sampling_smoke"
  got = np.load(written / "outputs.npz")
  assert got["tokens"].shape == (cfg.batch, cfg.new_tokens), logs
  np.testing.assert_array_equal(got["tokens"], expected["tokens"])
  np.testing.assert_allclose(got["samples"], expected["samples"], **TOL)
  assert "2 process(es)" in (written / "report.md").read_text()
  meta = json.loads((written / "meta.json").read_text())
  assert meta["processes"] == 2 and meta["process_0_rows"] == [0, cfg.batch // 2]  # its half


# --- pieces, in this (single-process) run --------------------------------------------------------

def test_nothing_configured_is_one_process(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert not distributed.DistributedConfig().requested
  assert distributed.initialize(distributed.DistributedConfig()) is False
  assert distributed.is_main_process() and jax.process_count() == 1


@pytest.mark.parametrize("fields, error", [
    ({"num_processes": 2, "process_id": 2}, ValueError),
    ({"coordinator": "127.0.0.1"}, ValueError),
    ({"coordinator": 1234}, TypeError),
    ({"num_processes": 0}, ValueError),
    ({"process_id": True}, TypeError),
    ({"local_device_ids": [0, 1]}, TypeError),
    ({"cpu_collectives": "nccl"}, ValueError),
])
def test_config_rejects_bad_fields(fields, error):
  with pytest.raises(error, match=next(iter(fields))):
    distributed.DistributedConfig(**fields)


def test_initialize_rejects_a_non_config():
  with pytest.raises(TypeError, match="cfg"):
    distributed.initialize({"num_processes": 2})


def test_global_batch_in_one_process_is_shard_batch():
  mesh = mesh_lib.make_mesh(**MESH)
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  assert distributed.process_rows(8, mesh) == slice(0, 8)
  got = distributed.global_batch(x, 8, mesh)
  want = shard.shard_batch(x, mesh)
  assert got.sharding == want.sharding
  np.testing.assert_array_equal(distributed.gather(got), x)
  with pytest.raises(ValueError, match="rows 0:8 of 8, got 4"):
    distributed.global_batch(x[:4], 8, mesh)
  with pytest.raises(ValueError, match="batch"):
    distributed.process_rows(0, mesh)
