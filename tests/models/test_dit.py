"""DiT: sizes from the paper, adaLN-Zero initialisation, patchify, and input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinf.models import layers
from jaxinf.models.dit import DIT_CONFIGS, DiT, DiTConfig, dit_config
from jaxinf.models.functional import to_functional


@pytest.mark.parametrize("name,millions", [
    ("DiT-S/2", 33.0), ("DiT-B/2", 130.5), ("DiT-L/2", 458.1), ("DiT-XL/2", 675.1)])
def test_parameter_counts_match_the_paper(name, millions):
  """DiT paper, Table 4 (counts include the fixed position-embedding buffer)."""
  cfg = dit_config(name)
  state = nnx.state(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
  count = sum(x.size for x in jax.tree.leaves(state)) + cfg.num_tokens * cfg.hidden_size
  assert round(count / 1e6, 1) == millions


def test_named_configs_cover_sizes_and_patches():
  for size in ("S", "B", "L", "XL"):
    for patch in (2, 4, 8):
      assert DIT_CONFIGS[f"DiT-{size}/{patch}"].patch_size == patch


@pytest.fixture(scope="module")
def sigma_dit():
  cfg = dit_config("DiT-tiny", learn_sigma=True)
  return cfg, DiT(cfg, rngs=nnx.Rngs(0))


def test_adaln_zero_init_outputs_zero(sigma_dit):
  cfg, model = sigma_dit
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  out = model(x, jnp.array([3.0, 900.0]), jnp.array([1, cfg.null_class]))
  assert out.shape == (2, 8, 8, 2)  # learned sigma doubles the channels
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  for block in model.blocks:
    np.testing.assert_array_equal(np.asarray(block.adaLN_modulation.kernel[...]), 0.0)


def test_patchify_roundtrip_and_order():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  tokens = layers.patchify(x, 2)
  assert tokens.shape == (2, 16, 12)
  # token 1 is the patch at rows 0-1, columns 2-3, flattened (p, q, c)
  np.testing.assert_array_equal(tokens[0, 1], x[0, 0:2, 2:4, :].reshape(-1))
  np.testing.assert_array_equal(layers.unpatchify(tokens, 2, 4, 3), x)


def test_functional_apply_equals_module(sigma_dit):
  cfg, model = sigma_dit
  apply, params = to_functional(model)
  # make the output non-zero: perturb the final layer through the params dict only
  params = jax.tree.map(lambda p: p + 0.01, params)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t, y = jnp.array([1.0, 2.0]), jnp.array([4, 5])
  out = jax.jit(apply)(params, x, t, y)
  assert float(jnp.abs(out).max()) > 0
  nnx.update(model, params)
  np.testing.assert_allclose(out, model(x, t, y), atol=1e-6)


def test_label_dropout_rate():
  cfg = dit_config("DiT-tiny")
  model = DiT(cfg, rngs=nnx.Rngs(0))
  y = jnp.zeros((20000,), jnp.int32)
  dropped = np.asarray(model.drop_labels(y, jax.random.key(0)) == cfg.null_class).mean()
  # binomial(20000, 0.1): sd 0.0021
  assert abs(dropped - cfg.class_dropout_prob) < 5 * 0.0021


class TestBadInput:
  def test_wrong_image_shape(self, sigma_dit):
    _, model = sigma_dit
    with pytest.raises(ValueError, match="x: expected"):
      model(jnp.zeros((1, 16, 16, 1)), jnp.zeros(1), jnp.zeros(1, jnp.int32))

  def test_label_out_of_range(self, sigma_dit):
    _, model = sigma_dit
    with pytest.raises(ValueError, match="y: class labels"):
      model(jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.array([11]))

  @pytest.mark.parametrize("kw,match", [
      (dict(patch_size=3), "patch_size"), (dict(num_heads=5), "num_heads"),
      (dict(class_dropout_prob=1.0), "class_dropout_prob"), (dict(dtype="int8"), "dtype")])
  def test_config(self, kw, match):
    with pytest.raises(ValueError, match=match):
      DiTConfig(**{**dict(input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2), **kw})

  def test_unknown_name(self):
    with pytest.raises(ValueError, match="name"):
      dit_config("DiT-XXL/2")


def test_jitter_params_adds_scaled_noise_and_makes_a_fresh_dit_non_zero():
  """A fresh DiT outputs exactly zero (adaLN-Zero); `jitter_params` adds scale * N(0, 1) to every
  leaf (std within 10 % of the scale over the DiT-tiny's ~50k weights) and the output is no
  longer zero."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jaxinf.models import dit
  from jaxinf.models.functional import to_functional

  cfg = dit.dit_config("DiT-tiny")
  apply, params = to_functional(dit.DiT(cfg, rngs=nnx.Rngs(0)))
  x, t, y = jnp.ones((2, *cfg.sample_shape)), jnp.full((2,), 10.0), jnp.arange(2)
  assert float(jnp.abs(apply(params, x, t, y)).max()) == 0.0
  jittered = dit.jitter_params(params, 3, scale=0.05)
  diff = np.concatenate([np.ravel(np.asarray(b) - np.asarray(a))
                         for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jittered))])
  assert abs(diff.std() - 0.05) < 0.005 and abs(diff.mean()) < 0.005
  assert float(jnp.abs(apply(jittered, x, t, y)).max()) > 0.01
