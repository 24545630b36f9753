"""Every registered solver meets the `solvers.Solver` protocol: each of its members, with the
protocol's signature, and the state contract the scan relies on (`step` returns x and a state of
`init_state`'s structure, shapes and dtypes, so the carry of `lax.scan` keeps fixed shapes)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import pytest

from jaxinf.diffusion import schedules, solvers

FLOW_SOLVERS = ("flow_euler", "flow_heun")
SHAPE = (2, 4, 4, 3)
STEPS = 4


def protocol_members() -> dict[str, object]:
  return {name: value for name, value in vars(solvers.Solver).items()
          if not name.startswith("_") and (callable(value) or isinstance(value, property))}


def test_the_protocol_lists_what_the_driver_uses():
  assert set(protocol_members()) == {"stochastic", "check", "timesteps", "table",
                                     "init_noise_scale", "init_state", "model_input", "step"}


def params(fn) -> list[str]:
  return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", sorted(solvers.SOLVERS))
def test_solver_has_every_member_with_its_signature(name):
  solver = solvers.make_solver(name)
  assert isinstance(solver, solvers.Solver)
  for member, proto in protocol_members().items():
    if isinstance(proto, property):
      assert isinstance(getattr(solver, member), bool), member
    else:
      assert params(getattr(solver, member)) == params(proto), member


def setting(name):
  """(schedule, prediction type) the solver takes."""
  if name in FLOW_SOLVERS:
    return schedules.FlowSchedule(shift=3.0), "flow"
  return schedules.NoiseSchedule(), "epsilon"


@pytest.mark.parametrize("name", sorted(solvers.SOLVERS))
def test_table_and_step_keep_fixed_shapes(name):
  solver = solvers.make_solver(name)
  schedule, prediction_type = setting(name)
  table = solver.table(schedule, STEPS)
  rows = len(table["t"])
  assert rows >= STEPS
  assert all(v.shape == (rows,) and v.dtype == jnp.float32 for v in table.values())
  assert len(solver.timesteps(schedule, STEPS)) == STEPS
  x = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
  row = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in table}
  state = jax.eval_shape(solver.init_state, x)

  def one_row(x, out, c, state):
    noise = out if solver.stochastic else None
    return solver.model_input(x, c), solver.step(x, out, None, c, noise, state, prediction_type)

  x_in, (x_next, next_state) = jax.eval_shape(one_row, x, x, row, state)
  assert x_in.shape == SHAPE and x_next.shape == SHAPE and x_next.dtype == jnp.float32
  assert jax.tree.structure(next_state) == jax.tree.structure(state)
  assert jax.tree.leaves(next_state) == jax.tree.leaves(state)
