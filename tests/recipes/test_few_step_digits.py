"""The few-step recipe on digits (`jaxinf.recipes.few_step_digits`): every stage trains, hands back
a denoiser the `sample` driver takes, and a finished stage is reused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion.sample import sample
from jaxinf.recipes.few_step_digits import FewStepBudget, few_step_models_on_digits
from jaxinf.train import distill


@pytest.mark.slow
def test_few_step_models_on_digits_smoke(tmp_path):
  """Every stage runs on a toy budget, hands back denoisers the `sample` driver takes with the
  recommended solver, and a second call reuses the finished stages."""
  budget = FewStepBudget(teacher_steps=2, reflow_steps=2, instaflow_steps=2,
                         slimflow_reflow_steps=2, slimflow_distill_steps=2, lcm_steps=2,
                         mlcm_steps=2,
                         coupling=distill.CouplingConfig(pairs=20, solver_steps=2))
  models = few_step_models_on_digits(tmp_path, budget, progress=False, log=lambda s: None)
  assert sorted(models) == ["flow_teacher", "instaflow", "lcm", "mlcm", "reflow", "slimflow"]
  assert models["slimflow"].params < models["instaflow"].params / 2
  labels = jnp.arange(10, dtype=jnp.int32)
  for name, m in models.items():
    x = sample(jax.random.key(0), m.denoiser, m.schedule, m.solver, (10, 8, 8, 1), steps=m.steps,
               cond=labels, guidance=m.guidance)
    assert x.shape == (10, 8, 8, 1) and bool(jnp.all(jnp.isfinite(x))), name
  losses = (tmp_path / "lcm" / "losses.jsonl").read_text()
  again = few_step_models_on_digits(tmp_path, budget, progress=False, log=lambda s: None)
  assert (tmp_path / "lcm" / "losses.jsonl").read_text() == losses
  np.testing.assert_array_equal(jax.tree.leaves(again["lcm"].denoiser.params)[0],
                                jax.tree.leaves(models["lcm"].denoiser.params)[0])
