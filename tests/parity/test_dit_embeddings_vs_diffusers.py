"""DiT's fixed embeddings against diffusers' implementations of the same formulas."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
embeddings = pytest.importorskip("diffusers.models.embeddings")

from jaxinf.models import layers  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("dim,grid", [(64, 4), (384, 16), (1152, 32)])
def test_2d_sincos_position_embedding(dim, grid):
  ref = embeddings.get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="np")
  np.testing.assert_allclose(layers.sincos_2d(dim, grid), ref, atol=1e-6)


def test_timestep_embedding_is_cos_first_without_shift():
  """The original DiT uses exponent -log(P) i / half: diffusers' flip_sin_to_cos=True with
  downscale_freq_shift=0 (diffusers' own DiT port uses shift 1 — see the checkpoint converters)."""
  t = np.array([0.0, 1.0, 17.0, 250.5, 999.0], np.float32)
  ref = embeddings.get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                          downscale_freq_shift=0).numpy()
  ours = np.asarray(layers.timestep_embedding(jnp.asarray(t), 256))
  # Both compute t * freq in fp32, and exp() differs by an ulp between XLA and torch: the argument
  # (<= t) carries an error of about eps32 * t, so the bound grows with t.
  bound = 1e-6 + np.finfo(np.float32).eps * t[:, None]
  assert np.all(np.abs(ours - ref) <= bound), np.max(np.abs(ours - ref) - bound)
