"""`layers.materialize_cotangent`: the identity in value, in forward- and in reverse-mode
derivatives, and on CPU a conditional in the compiled backward pass (the fusion boundary that keeps
XLA:CPU from recomputing the residual stream's cotangent chain in every consumer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.models import layers


def _residual_net(x, ws, cut):
  """A small pre-norm residual stack, with `cut` applied to the stream at every block."""
  for w in ws:
    x = cut(x)
    x = x + jnp.tanh(layers.layer_norm(x, 1e-6) @ w)
  return jnp.sum(jnp.sin(x))


@pytest.fixture(scope="module")
def net_inputs():
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (8, 5, 16))
  ws = list(jax.random.normal(kw, (3, 16, 16)) * 0.3)
  return x, ws


def test_forward_is_the_identity_bit_for_bit():
  x = jax.random.normal(jax.random.key(1), (4, 7))
  np.testing.assert_array_equal(jax.jit(layers.materialize_cotangent)(x), x)
  x16 = x.astype(jnp.bfloat16)
  out = layers.materialize_cotangent(x16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, x16)


def test_gradients_equal_the_plain_networks(net_inputs):
  x, ws = net_inputs
  plain = jax.jit(jax.grad(lambda x, ws: _residual_net(x, ws, lambda a: a), argnums=(0, 1)))
  cut = jax.jit(jax.grad(lambda x, ws: _residual_net(x, ws, layers.materialize_cotangent),
                         argnums=(0, 1)))
  for a, b in zip(jax.tree.leaves(plain(x, ws)), jax.tree.leaves(cut(x, ws))):
    np.testing.assert_array_equal(b, a)


def test_forward_mode_and_vmap(net_inputs):
  x, ws = net_inputs
  t = jnp.cos(x)
  _, plain = jax.jvp(lambda x: _residual_net(x, ws, lambda a: a), (x,), (t,))
  _, cut = jax.jvp(lambda x: _residual_net(x, ws, layers.materialize_cotangent), (x,), (t,))
  np.testing.assert_allclose(cut, plain, rtol=1e-6)
  g = jax.vmap(jax.grad(lambda x: _residual_net(x, ws, layers.materialize_cotangent)))(x)
  g_plain = jax.vmap(jax.grad(lambda x: _residual_net(x, ws, lambda a: a)))(x)
  np.testing.assert_allclose(g, g_plain, rtol=1e-6, atol=1e-7)


def test_the_cpu_backward_keeps_a_conditional(net_inputs):
  """The mechanism itself: JAX lifts bare-identity branches out of a conditional, so a change
  there would silently remove the boundary; this fails instead."""
  if jax.default_backend() != "cpu":
    pytest.skip("the boundary is placed on the CPU backend only")
  x, ws = net_inputs
  grad = jax.jit(jax.grad(lambda x: _residual_net(x, ws, layers.materialize_cotangent)))
  hlo = grad.lower(x).compile().as_text()
  assert " conditional(" in hlo
  plain = jax.jit(jax.grad(lambda x: _residual_net(x, ws, lambda a: a)))
  assert " conditional(" not in plain.lower(x).compile().as_text()
