"""The shared bad-input helper catches what it should: a pre-trace error passes; one raised inside
jit or one that does not name the argument fails."""

import jax, jax.numpy as jnp, pytest
from tests.bad_input import raises_before_tracing

def f(x):
  if x.shape[0] == 0: raise ValueError("x must be non-empty")
  return jax.jit(lambda y: y + 1)(x)

def g(x):
  def inner(y):
    raise ValueError("x must be non-empty")
  return jax.jit(inner)(x)

def test_ok():
  with raises_before_tracing(ValueError, "x must"):
    f(jnp.zeros((0,)))

def test_traced_fails():
  with pytest.raises(AssertionError, match="while tracing"):
    with raises_before_tracing(ValueError, "x must"):
      g(jnp.zeros((1,)))

def test_wrong_name_fails():
  with pytest.raises(AssertionError, match="does not name"):
    with raises_before_tracing(ValueError, "steps"):
      f(jnp.zeros((0,)))
