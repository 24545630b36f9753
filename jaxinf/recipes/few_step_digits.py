"""Few-step generators on digits: a flow-matching teacher, its 2-rectified flow, one-step InstaFlow
and SlimFlow students, and LCM / MLCM consistency students — each returned as a `Denoiser` with the
schedule, solver and step count to hand to `jaxinf.diffusion.sample.sample`.

    models = few_step_models_on_digits("results/few_step")
    m = models["instaflow"]
    x = sample(key, m.denoiser, m.schedule, m.solver, (200, 8, 8, 1), steps=m.steps,
               cond=labels, guidance=m.guidance)
    print(evaluate_on_digits(m, DigitsEvaluator.load()))

Every stage trains in its own subfolder through the shared loop (checkpoints, exact resume; a
finished stage is reused), and the coupled pairs are saved beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinf.config import check_int
from jaxinf.data import digits
from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser
from jaxinf.diffusion.guidance import CFG
from jaxinf.diffusion.sample import sample
from jaxinf.diffusion.solvers import DDIM, FlowEuler
from jaxinf.models.dit import DiT
from jaxinf.models.functional import to_functional
from jaxinf.train import consistency, distill
from jaxinf.train.flow import (FlowTrainConfig, claim_out_dir, flow_denoiser,
                               train_flow_dit_on_digits, train_regression)


@dataclasses.dataclass(frozen=True)
class FewStepBudget:
  """Training steps of each stage (batch 64 throughout) and the couplings' settings."""

  teacher_steps: int = 2500
  reflow_steps: int = 800
  instaflow_steps: int = 800
  slimflow_reflow_steps: int = 1200
  slimflow_distill_steps: int = 600
  lcm_steps: int = 800
  mlcm_steps: int = 800
  mlcm_segments: int = 4
  coupling: distill.CouplingConfig = distill.CouplingConfig()
  # the SlimFlow student: the digits DiT at half the width (about a quarter of the parameters)
  slim_hidden_size: int = 32
  slim_num_heads: int = 2
  lcm: consistency.LCMConfig = consistency.LCMConfig()
  finetune_learning_rate: float = 1e-3

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      counted = f.name.endswith("_steps") or f.name == "mlcm_segments"
      if counted and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{f.name}: expected a positive int, got {v!r}")
    check_int("slim_hidden_size", self.slim_hidden_size, 1)
    check_int("slim_num_heads", self.slim_num_heads, 1)
    if self.slim_hidden_size % self.slim_num_heads:
      raise ValueError(f"slim_hidden_size: {self.slim_hidden_size} does not split into "
                       f"slim_num_heads={self.slim_num_heads} heads")
    lr = self.finetune_learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
      raise ValueError(f"finetune_learning_rate: expected a finite number > 0, got {lr!r}")
    for name, cls in (("coupling", distill.CouplingConfig), ("lcm", consistency.LCMConfig)):
      if not isinstance(getattr(self, name), cls):  # each checks its own fields
        raise TypeError(f"{name}: expected a {cls.__name__}, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class FewStepModel:
  """A denoiser with the sampler recommended for it (`guidance` None: sample unguided)."""

  denoiser: Denoiser
  schedule: Any
  solver: Any
  steps: int
  guidance: Any = None
  train_steps: int = 0
  params: int = 0


def _num_params(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _balanced_labels(n: int) -> np.ndarray:
  return (np.arange(n) % digits.NUM_CLASSES).astype(np.int32)


def _coupling(path: Path, key, den: Denoiser, cfg: distill.CouplingConfig, guidance):
  """(z, x, y) from `den`'s ODE, cached in `path` with the settings that drew it (a cache drawn
  with other settings is refused, not reused)."""
  settings = json.dumps({"coupling": dataclasses.asdict(cfg), "guided": guidance is not None})
  if path.exists():
    with np.load(path) as f:
      if str(f["settings"]) != settings:
        raise ValueError(f"out_dir: {path} was drawn with {f['settings']}, not {settings}; "
                         f"use a new folder")
      return f["z"], f["x"], f["y"]
  y = _balanced_labels(cfg.pairs)
  z, x = distill.ode_coupling(key, den, schedules.FlowSchedule(), (cfg.pairs, *digits.IMAGE_SHAPE),
                              steps=cfg.solver_steps, cond=y, guidance=guidance)
  np.savez(path, z=z, x=x, y=y, settings=np.asarray(settings))
  return z, x, y


def few_step_models_on_digits(out_dir, budget: FewStepBudget = FewStepBudget(), *,
                              progress: bool = True, log=print) -> dict[str, FewStepModel]:
  """Trains (or resumes, or reuses) every stage; returns {name: FewStepModel} for
  `flow_teacher` (flow Euler, 50 steps, CFG), `reflow` (2-RF, 2 Euler steps), `instaflow` and
  `slimflow` (1 step), `lcm` (LCM solver, 4 steps) and `mlcm` (trailing DDIM, one step per
  segment). Writes each stage's wall time to
  `out_dir/timings.json` (a reused stage counts only its loading)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fs = schedules.FlowSchedule()
  w = budget.coupling.guidance_scale
  guidance = CFG(w) if w != 1.0 else None
  coupling = dataclasses.asdict(budget.coupling)
  timings: dict[str, float] = {}
  clock = time.perf_counter()

  def lap(name):
    nonlocal clock
    now = time.perf_counter()
    timings[name] = now - clock
    clock = now
    log(f"[few-step] {name}: {timings[name]:.1f} s")

  # 1. the flow-matching teacher
  model_cfg, apply, state, _ = train_flow_dit_on_digits(
      out / "teacher", train_cfg=FlowTrainConfig(steps=budget.teacher_steps), progress=progress)
  teacher_params = state["ema"]
  teacher = flow_denoiser(model_cfg, apply, teacher_params)
  lap("teacher")

  # 2. 2-rectified flow from the teacher's weights on the teacher's guided coupling
  pairs1 = _coupling(out / "pairs_teacher.npz", jax.random.key(budget.coupling.seed), teacher,
                     budget.coupling, guidance)
  lap("teacher coupling")
  finetune = dataclasses.replace(FlowTrainConfig().optimizer,
                                 learning_rate=budget.finetune_learning_rate)
  ft = FlowTrainConfig(steps=budget.reflow_steps, optimizer=finetune)
  rdir = claim_out_dir(out / "reflow", {"train": ft, "coupling": coupling,
                                        "stage": "reflow"})
  state, _ = train_regression(distill.reflow_loss(apply, schedule=fs, cfg=ft), teacher_params,
                              pairs1, cfg=ft, out_dir=rdir, progress=progress, desc="reflow")
  reflow_params = state["ema"]
  reflow = flow_denoiser(model_cfg, apply, reflow_params)
  lap("reflow")

  # 3. InstaFlow: one-step distillation of the 2-RF on its own (unguided) coupling
  pairs2 = _coupling(out / "pairs_reflow.npz", jax.random.key(budget.coupling.seed + 1), reflow,
                     budget.coupling, None)
  lap("reflow coupling")
  ft = FlowTrainConfig(steps=budget.instaflow_steps, optimizer=finetune)
  idir = claim_out_dir(out / "instaflow", {"train": ft, "coupling": coupling,
                                           "stage": "instaflow"})
  state, _ = train_regression(distill.one_step_loss(apply, schedule=fs), reflow_params, pairs2,
                              cfg=ft, out_dir=idir, progress=progress, desc="instaflow")
  instaflow = flow_denoiser(model_cfg, apply, state["ema"])
  lap("instaflow")

  # 4. SlimFlow: a smaller student, annealing reflow on the teacher's coupling, then flow-guided
  # one-step distillation on the small 2-RF's coupling
  slim_cfg = dataclasses.replace(model_cfg, hidden_size=budget.slim_hidden_size,
                                 num_heads=budget.slim_num_heads)
  slim_apply, slim_init = to_functional(DiT(slim_cfg, rngs=nnx.Rngs(1)))
  sr = FlowTrainConfig(steps=budget.slimflow_reflow_steps)
  sdir = claim_out_dir(out / "slimflow_reflow", {"train": sr,
                                                 "coupling": coupling, "model": slim_cfg.__dict__,
                                                 "stage": "slim_reflow"})
  state, _ = train_regression(
      distill.annealing_reflow_loss(slim_apply, schedule=fs, cfg=sr,
                                    anneal_steps=max(budget.slimflow_reflow_steps // 2, 1)),
      slim_init, pairs1, cfg=sr, out_dir=sdir, progress=progress, desc="slimflow reflow")
  slim_reflow_params = state["ema"]
  slim_reflow = flow_denoiser(slim_cfg, slim_apply, slim_reflow_params)
  lap("slimflow annealing reflow")
  pairs3 = _coupling(out / "pairs_slim_reflow.npz", jax.random.key(budget.coupling.seed + 2),
                     slim_reflow, budget.coupling, None)
  lap("slimflow coupling")
  sd = FlowTrainConfig(steps=budget.slimflow_distill_steps, optimizer=finetune)
  ddir = claim_out_dir(out / "slimflow", {"train": sd, "coupling": coupling,
                                          "model": slim_cfg.__dict__, "stage": "slim_distill"})
  state, _ = train_regression(distill.flow_guided_distillation_loss(slim_apply, schedule=fs),
                              slim_reflow_params, pairs3, cfg=sd, out_dir=ddir,
                              frozen=slim_reflow_params, progress=progress, desc="slimflow")
  slimflow = flow_denoiser(slim_cfg, slim_apply, state["ema"])
  lap("slimflow distillation")

  # 5. LCM: consistency distillation of the (guided) teacher on the VP view of the flow
  vp = schedules.NoiseSchedule()
  x0_apply = consistency.FlowAsVP(apply, fs.num_train_timesteps, vp)
  lc = FlowTrainConfig(steps=budget.lcm_steps,  # LCM's target-network EMA
                       optimizer=dataclasses.replace(finetune, ema_decay=0.95))
  ldir = claim_out_dir(out / "lcm", {"train": lc, "lcm": budget.lcm,
                                       "stage": "lcm"})
  images, labels = digits.load_digits_images()
  state, _ = train_regression(
      consistency.consistency_distillation_loss(x0_apply, x0_apply, schedule=vp, cfg=budget.lcm,
                                                null_cond=model_cfg.null_class),
      teacher_params, (images, labels), cfg=lc, out_dir=ldir, frozen=teacher_params,
      progress=progress, desc="lcm")
  lcm = consistency.flow_as_vp_denoiser(flow_denoiser(model_cfg, apply, state["ema"]), fs, vp)
  lap("lcm")

  # 6. MLCM: multistep consistency distillation over segments, sampled by trailing DDIM
  mc = dataclasses.replace(lc, steps=budget.mlcm_steps)
  mdir = claim_out_dir(out / "mlcm", {"train": mc, "lcm": budget.lcm,
                                      "segments": budget.mlcm_segments, "stage": "mlcm"})
  state, _ = train_regression(
      consistency.multistep_consistency_loss(x0_apply, x0_apply, schedule=vp, cfg=budget.lcm,
                                             segments=budget.mlcm_segments,
                                             null_cond=model_cfg.null_class),
      teacher_params, (images, labels), cfg=mc, out_dir=mdir, frozen=teacher_params,
      progress=progress, desc="mlcm")
  mlcm = consistency.flow_as_vp_denoiser(flow_denoiser(model_cfg, apply, state["ema"]), fs, vp)
  lap("mlcm")

  (out / "timings.json").write_text(json.dumps(timings, indent=2))
  n_big, n_slim = _num_params(teacher_params), _num_params(slim_reflow_params)
  return {
      "flow_teacher": FewStepModel(teacher, fs, FlowEuler(), 50, guidance, budget.teacher_steps,
                                n_big),
      "reflow": FewStepModel(reflow, fs, FlowEuler(), 2, None, budget.reflow_steps, n_big),
      "instaflow": FewStepModel(instaflow, fs, FlowEuler(), 1, None, budget.instaflow_steps, n_big),
      "slimflow": FewStepModel(slimflow, fs, FlowEuler(), 1, None,
                            budget.slimflow_reflow_steps + budget.slimflow_distill_steps, n_slim),
      "lcm": FewStepModel(lcm, vp, budget.lcm.solver(), 4, None, budget.lcm_steps, n_big),
      "mlcm": FewStepModel(mlcm, vp, DDIM(spacing="trailing"), budget.mlcm_segments, None,
                           budget.mlcm_steps, n_big),
  }


def evaluate_on_digits(model: FewStepModel, evaluator, *, per_class: int = 20, seed: int = 0,
                       steps: int | None = None, solver=None, guidance="default") -> dict:
  """FD-digits and conditional accuracy of `per_class` samples of each digit."""
  steps = model.steps if steps is None else steps
  solver = model.solver if solver is None else solver
  guidance = model.guidance if guidance == "default" else guidance
  labels = np.repeat(np.arange(digits.NUM_CLASSES), per_class).astype(np.int32)
  x = sample(jax.random.key(seed), model.denoiser, model.schedule, solver,
             (len(labels), *digits.IMAGE_SHAPE), steps=steps, cond=jnp.asarray(labels),
             guidance=guidance)
  x = np.asarray(x)
  return {"fd": float(evaluator.fd(x)), "cond_accuracy": float(evaluator.cond_accuracy(x, labels))}
