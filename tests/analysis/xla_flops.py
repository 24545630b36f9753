"""XLA's own FLOP count of a function, every loop iteration included.

`HloCostAnalysis` (what `jax.jit(f).lower(...).cost_analysis()` reports) counts the body of a
`while` loop once, whatever its trip count (checked in `test_xla_counts_a_loop_body_once`), and
jaxinf's recurrences (Mamba's and RWKV-7's token-serial scans, lightning attention's blocks, the
attention XLA form's query chunks) are loops. `xla_flops` therefore re-traces the function with
every `scan` unrolled in Python (a small jaxpr interpreter: scans become their iterations, inner
jits and custom-derivative calls are inlined, every other primitive is bound as it was) and asks
XLA for the cost of that loop-free program, before optimisation (`Lowered.cost_analysis`: the
program as written; the compiled module's count also includes elementwise work that fusion
duplicates into several consumers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

_INLINE_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _closed(jaxpr):
  return jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(jaxpr, ())


def _eval(closed, *args):
  jaxpr = closed.jaxpr
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  env.update(zip(jaxpr.constvars, closed.consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == "scan":
      outs = _scan(eqn.params, ins)
    elif name not in ("while", "cond") and any(k in eqn.params for k in _INLINE_KEYS):
      key = next(k for k in _INLINE_KEYS if k in eqn.params)
      outs = _eval(_closed(eqn.params[key]), *ins)
    else:
      outs = eqn.primitive.bind(*ins, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _scan_inputs(params, ins):
  """(constants, carries, xs) among a scan's inputs: JAX 0.10 names the counts, JAX 0.12 packs
  the groups in a flat tree `ft_in` (unpacked as its own `_scan_impl` does)."""
  if "num_consts" in params:
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    return ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
  consts, carry, xs = params["ft_in"].update(ins).unpack()
  return list(consts), list(carry), list(xs)


def _scan(params, ins):
  consts, carry, xs = _scan_inputs(params, ins)
  n_carry = len(carry)
  length, body = params["length"], _closed(params["jaxpr"])
  ys = {}
  for i in (reversed(range(length)) if params["reverse"] else range(length)):
    out = _eval(body, *consts, *carry, *[x[i] for x in xs])
    carry, ys[i] = out[:n_carry], out[n_carry:]
  n_ys = len(body.jaxpr.outvars) - n_carry
  return list(carry) + [jnp.stack([ys[i][j] for i in range(length)]) for j in range(n_ys)]


def unrolled(fn):
  """`fn` with every scan unrolled (the same values, no loops left for XLA to count once)."""
  def run(*args):
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval(closed, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shape), outs)
  return run


def cost(fn, *args) -> dict[str, float]:
  """XLA's cost analysis (flops, transcendentals) of `fn(*args)` with its loops unrolled."""
  analysis = jax.jit(unrolled(fn)).lower(*args).cost_analysis()
  if isinstance(analysis, list):  # older JAX: one dict per computation
    analysis = analysis[0]
  return {"flops": float(analysis["flops"]),
          "transcendentals": float(analysis.get("transcendentals", 0.0))}
