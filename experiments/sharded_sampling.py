"""Sharded inference on one or many hosts: greedy decoding of a random transformer and DDIM
sampling of a random DiT, parameters and inputs sharded over a `--mesh`.

    python -m experiments.sharded_sampling --smoke                         # all devices on data
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m experiments.sharded_sampling --smoke --mesh.data 2 --mesh.tensor 4
    # two processes x 4 CPU devices on this machine (the second with --distributed.process-id 1)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.sharded_sampling \\
      --smoke --mesh.data 2 --mesh.tensor 4 --distributed.coordinator 127.0.0.1:12355 \\
      --distributed.num-processes 2 --distributed.process-id 0
    # TPU pod slice / SLURM: every process runs the same line with --distributed.auto

Every process runs the same program (`jaxinf.parallel.distributed`): it loads only its own rows of
the prompts and class labels (`process_rows`, `global_batch`), parameters are created in their
shards (`shard.init_params`), the DiT's are saved and read back through orbax (each process
its own shards), and process 0 alone writes `results/sharded_sampling/{results.json,
meta.json, report.md, outputs.npz}` (`outputs.npz`: the tokens `[B, new_tokens]` and samples
`[B, 8, 8, 1]`, which tests/parallel/test_multihost.py compares with one process on the same mesh).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from experiments import common
from jaxinf.checkpoints.native import CheckpointStore
from jaxinf.decoding.generate import generate
from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import dit_denoiser
from jaxinf.diffusion.sample import sample
from jaxinf.diffusion.solvers import DDIM
from jaxinf.models import dit, families
from jaxinf.models.functional import to_functional
from jaxinf.models.transformer import TransformerConfig
from jaxinf.parallel import distributed, shard
from jaxinf.parallel import mesh as mesh_lib
from jaxinf.parallel.distributed import DistributedConfig
from jaxinf.parallel.mesh import MeshConfig


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/sharded_sampling"
  mesh: MeshConfig = MeshConfig(data=-1)           # --mesh.data 2 --mesh.tensor 4
  distributed: DistributedConfig = DistributedConfig()  # --distributed.coordinator host:port ...
  batch: int = 64             # prompts and DiT samples (global, over all processes)
  prompt_len: int = 16
  new_tokens: int = 64        # greedy tokens per prompt
  lm_width: int = 256         # the transformer: hidden size (8 heads, MLP 4x), 4 layers
  dit: str = "DiT-digits"     # a named 8x8x1 DiT config (`jaxinf.models.dit.DIT_CONFIGS`)
  ddim_steps: int = 20
  # save the DiT's parameters with orbax (`<out_dir>/dit_params/`, every process its shards) and
  # sample from the copy read back onto the mesh: orbax's multi-host path, as a long run resumes
  checkpoint: bool = True

  def check(self) -> None:
    """The options alone (the mesh and distributed groups check their own); whether the devices
    fit the mesh is checked as the run starts."""
    super().check()
    common.check_ints(self, "batch", "prompt_len", "new_tokens", "lm_width")
    common.check_ints(self, "ddim_steps", high=schedules.NoiseSchedule().num_train_timesteps)
    common.check_choices(self, "dit", choices=tuple(dit.DIT_CONFIGS))
    heads = 4 if self.lm_width <= 32 else 8  # `lm_config`
    if self.lm_width % heads:
      common.refuse("lm_width", f"expected a multiple of its {heads} heads, got {self.lm_width}")


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, batch=8, prompt_len=6, new_tokens=6, lm_width=32, dit="DiT-tiny", ddim_steps=4,
      out_dir=common.smoke_dir(cfg.out_dir)))


def lm_config(cfg: Config) -> TransformerConfig:
  small = cfg.lm_width <= 32
  return TransformerConfig(vocab_size=16 if small else 256, hidden_size=cfg.lm_width,
                           num_layers=2 if small else 4, num_heads=4 if small else 8,
                           num_kv_heads=4 if small else 8, mlp_hidden=2 * cfg.lm_width if small
                           else 4 * cfg.lm_width, max_len=cfg.prompt_len + cfg.new_tokens,
                           init_std=0.3 if small else 0.02)


def dit_config(cfg: Config) -> dit.DiTConfig:
  # DiT-tiny with 4 heads, as tests/parallel: the heads split over a tensor axis of up to 4
  return dit.dit_config(cfg.dit, **({"num_heads": 4} if cfg.dit == "DiT-tiny" else {}))


def host_inputs(cfg: Config, rows: slice) -> tuple[np.ndarray, np.ndarray]:
  """This process's rows of the prompts `[B, prompt_len]` and class labels `[B]`: the stand-in
  for a per-process data loader (the global batch is a function of the seed)."""
  prompts = np.random.default_rng(cfg.seed).integers(
      0, lm_config(cfg).vocab_size, (cfg.batch, cfg.prompt_len)).astype(np.int32)
  labels = np.arange(cfg.batch, dtype=np.int32) % 10
  return prompts[rows], labels[rows]


def outputs(cfg: Config, mesh, checkpoint_dir: Path | None = None) -> dict:
  """Greedy tokens `[B, new_tokens]` and DDIM samples `[B, 8, 8, 1]` on `mesh` (every process
  calls it; each gets the whole arrays back), with the seconds each took, compilation included.
  With `checkpoint_dir` (the same on every process) the DiT samples from its parameters saved
  there and restored (`CheckpointStore`, `shard.restore_params`)."""
  rows = distributed.process_rows(cfg.batch, mesh, what="batch")
  prompts, labels = host_inputs(cfg, rows)
  prompts = distributed.global_batch(prompts, cfg.batch, mesh, what="prompts")
  labels = distributed.global_batch(labels, cfg.batch, mesh, what="labels")

  model, _ = families.build(lm_config(cfg))  # params come from init_params, in their shards
  lm_params = shard.init_params(model, mesh, seed=cfg.seed)
  dit_cfg = dit_config(cfg)
  # adaLN-Zero: a fresh DiT outputs zeros; jittered weights make the sample depend on the network
  dit_params = dit.jitter_params(shard.init_params(dit_cfg, mesh, seed=cfg.seed), cfg.seed + 1)
  if checkpoint_dir is not None:
    store = CheckpointStore(checkpoint_dir)
    step = (store.latest_step() or 0) + 1  # a fresh step after an earlier run's
    store.save(step, dit_params)
    store.wait()
    dit_params = shard.restore_params(store, step, dit_cfg, mesh)
    store.close()
  apply = to_functional(nnx.eval_shape(lambda: dit.DiT(dit_cfg, rngs=nnx.Rngs(0))))[0]

  @jax.jit
  def draw(params, labels):
    return sample(jax.random.key(cfg.seed), dit_denoiser(apply, params, dit_cfg),
                  schedules.NoiseSchedule(), DDIM(), (cfg.batch, *dit_cfg.sample_shape),
                  steps=cfg.ddim_steps, cond=labels)

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    tokens = generate(model, lm_params, prompts, jax.random.key(cfg.seed),
                      max_new_tokens=cfg.new_tokens).tokens
    tokens = distributed.gather(tokens)
    t1 = time.perf_counter()
    samples = distributed.gather(jax.block_until_ready(draw(dit_params, labels)))
    t2 = time.perf_counter()
  return dict(tokens=tokens, samples=samples, lm_seconds=t1 - t0, dit_seconds=t2 - t1)


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  distributed.initialize(cfg.distributed)  # before anything touches a device
  mesh = mesh_lib.make_mesh(cfg.mesh)
  out = outputs(cfg, mesh, Path(cfg.out_dir).absolute() / "dit_params" if cfg.checkpoint
                else None)
  where = f"{mesh_lib.describe_mesh(mesh)}, {jax.process_count()} process(es)"
  rows = [dict(model=f"transformer width {cfg.lm_width}", work=f"greedy {cfg.new_tokens} tokens",
               batch=cfg.batch, seconds=out["lm_seconds"], mesh=where),
          dict(model=cfg.dit, work=f"DDIM {cfg.ddim_steps} steps", batch=cfg.batch,
               seconds=out["dit_seconds"], mesh=where)]
  rows_0 = distributed.process_rows(cfg.batch, mesh)  # the rows process 0 loaded
  if distributed.is_main_process():
    dest = common.study_dir(cfg.out_dir)
    np.savez(dest / "outputs.npz", tokens=out["tokens"], samples=out["samples"])
  # process 0 only, as every experiment's report (common.write_report)
  common.write_report(Path(cfg.out_dir), rows, title="Sharded sampling",
                      extra=dict(config=dataclasses.asdict(cfg), processes=jax.process_count(),
                                 process_0_rows=[rows_0.start, rows_0.stop]),
                      notes="Random weights; `seconds` include compilation.")
  return rows


if __name__ == "__main__":
  common.cli(run, Config)
