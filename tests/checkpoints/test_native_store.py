"""The native orbax store read back by a fresh `CheckpointStore`, as a resuming process has it."""

import jax.numpy as jnp
import numpy as np

from jaxinf.checkpoints.native import CheckpointStore


def test_a_fresh_store_restores_what_another_store_saved(tmp_path):
  tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": {"c": jnp.ones(2, jnp.bfloat16)}}
  saver = CheckpointStore(tmp_path)
  saver.save(5, tree)
  saver.close()
  reader = CheckpointStore(tmp_path)  # no handler state carried over from the saver
  assert reader.latest_step() == 5
  like = {"w": jnp.zeros((2, 3), jnp.float32), "b": {"c": jnp.zeros(2, jnp.bfloat16)}}
  restored = reader.restore(5, like)
  np.testing.assert_array_equal(restored["w"], tree["w"])
  assert restored["b"]["c"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(restored["b"]["c"], tree["b"]["c"])
  reader.close()
