"""The shared acceptance rule against closed forms: one verified position of a fixed p and q, where
the emitted token's law must be p exactly (Leviathan et al. 2023, Appendix A.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding import verify
from jaxinf.decoding.checks import check_sampler
from jaxinf.decoding.sampling import SamplerConfig

from .stats import chi_square_pvalue

P = jnp.array([[[0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.2, 0.6]]])   # [1, 2, V]: draft pos + bonus
Q = jnp.array([[[0.05, 0.7, 0.05, 0.2]]])                          # far from p
N = 40_000


def _emitted(rule, q, point_mass=False):
  """The token emitted at the verified position for N independent rounds."""
  def one(k):
    kd, kv = jax.random.split(k)
    x = jax.random.categorical(kd, jnp.log(q[0, 0])).astype(jnp.int32)[None, None]
    n, t = rule(kv, P, x, None if point_mass else q)
    return jnp.where(n[0] == 1, x[0, 0], t[0])
  return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), N)))


def _wrong_rule(key, p, drafts, q):
  """A plausible bug: rejections resampled from p instead of the residual max(0, p - q)."""
  n, _ = verify.verify(key, p, drafts, q)
  t = jax.random.categorical(jax.random.fold_in(key, 7), jnp.log(p[:, 0]))
  return n, t


def test_emitted_token_is_distributed_as_p():
  assert chi_square_pvalue(_emitted(verify.verify, Q), P[0, 0]) > 1e-3


def test_point_mass_drafts_are_exact():
  # drafts drawn from Q but verified as point masses: still exact (the rule only needs q(x) > 0)
  assert chi_square_pvalue(_emitted(verify.verify, Q, point_mass=True), P[0, 0]) > 1e-3


def test_negative_control_wrong_residual_is_rejected():
  assert chi_square_pvalue(_emitted(_wrong_rule, Q), P[0, 0]) < 1e-6


def test_bonus_token_and_padding():
  p = jnp.tile(P, (2, 1, 1))
  drafts = jnp.array([[1], [1]], jnp.int32)
  q = jnp.tile(jax.nn.one_hot(jnp.array([[1]]), 4), (2, 1, 1))
  # p(1)/q(1) = 0.3: row 1 has no real draft (n_draft 0), so it always draws from p[:, 0]
  n, _ = verify.verify(jax.random.key(1), p, drafts, q, n_draft=jnp.array([1, 0]))
  assert int(n[1]) == 0
  # a certain draft (p(x) = 1) is always accepted and the bonus comes from the last position
  certain = jnp.array([[[0, 1.0, 0, 0], [0, 0, 0, 1.0]]])
  n, t = verify.verify(jax.random.key(2), certain, jnp.array([[1]], jnp.int32))
  assert (int(n[0]), int(t[0])) == (1, 3)


def test_greedy_probs_are_one_hot_at_argmax():
  logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
  np.testing.assert_array_equal(verify.probs(SamplerConfig(temperature=0.0), logits),
                                [[0, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(verify.probs(SamplerConfig(temperature=1.0, top_k=1), logits),
                             [[0, 1, 0], [1, 0, 0]], atol=1e-12)


@pytest.mark.parametrize("bad", [dict(mirostat=2), dict(repetition_penalty=1.2)])
def test_stateful_samplers_refused(bad):
  with pytest.raises(ValueError, match="sampler"):
    check_sampler(SamplerConfig(**bad), 4, stateless=True)
