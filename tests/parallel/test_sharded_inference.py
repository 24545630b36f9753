"""Sharded inference equals single-device inference, for every language-model family and the DiT
(8 forced host devices: tests/conftest.py).

Meshes: data x tensor (4 x 2: batch rows over data, Megatron heads / MLP / vocab over tensor) and
data x fsdp (2 x 4: rows over both, the residual width of every weight over fsdp). Parameters are
initialised in their shards (`shard.init_params`), prompts placed by rows (`shard.shard_batch`),
and every call runs under `jax.set_mesh`, so the models' activation and cache constraints and the
kernels' shard_maps are live. Oracle: the same call on one device with unsharded parameters.

Tolerances (fp32): logits and samples within atol 1e-5 + rtol 1e-5 (a sharded matmul sums its
contraction in another order); greedy tokens identical.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxinf.checkpoints.native import CheckpointStore
from jaxinf.decoding.generate import generate
from jaxinf.decoding.jacobi import jacobi_generate, lookahead_generate
from jaxinf.decoding.lookup import prompt_lookup_generate, trie_lookahead_generate
from jaxinf.decoding.medusa import medusa_generate
from jaxinf.decoding.speculative import speculative_generate
from jaxinf.diffusion import cache as fc
from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import dit_denoiser, dit_feature_apply
from jaxinf.diffusion.sample import sample
from jaxinf.diffusion.solvers import DDIM
from jaxinf.models import dit, families
from jaxinf.models.functional import to_functional
from jaxinf.models.medusa import medusa_heads
from jaxinf.parallel import mesh as mesh_lib
from jaxinf.parallel import shard
from tests.decoding.families import FAMILIES, tiny_model

TOL = {"atol": 1e-5, "rtol": 1e-5}
BATCH, PROMPT, NEW = 8, 6, 6
MESHES = {"data_tensor": {"data": 4, "tensor": 2}, "data_fsdp": {"data": 2, "fsdp": 4}}


@pytest.fixture(scope="module")
def meshes():
  return {name: mesh_lib.make_mesh(**sizes) for name, sizes in MESHES.items()}


@pytest.fixture(scope="module")
def prompts():
  return np.asarray(jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 0, 16), np.int32)


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request, prompts):
  """(model, params, single-device logits, greedy tokens, speculative tokens)."""
  model, params = tiny_model(request.param)
  logits = model(params, jnp.asarray(prompts))
  tokens = generate(model, params, prompts, jax.random.key(0), max_new_tokens=NEW).tokens
  spec = speculative_generate(model, params, model, params, prompts, jax.random.key(0),
                              max_new_tokens=NEW, gamma=2).tokens
  return model, params, np.asarray(logits), np.asarray(tokens), np.asarray(spec)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_lm_forward_and_generate(lm, prompts, meshes, mesh_name):
  model, params, logits, tokens, spec = lm
  mesh = meshes[mesh_name]
  sharded = shard.shard_params(model, params, mesh)
  rows = shard.shard_batch(prompts, mesh, what="prompts")
  with jax.set_mesh(mesh):
    got = model(sharded, rows)
    out = generate(model, sharded, rows, jax.random.key(0), max_new_tokens=NEW)
    if mesh_name == "data_tensor":
      got_spec = speculative_generate(model, sharded, model, sharded, rows, jax.random.key(0),
                                      max_new_tokens=NEW, gamma=2).tokens
      np.testing.assert_array_equal(np.asarray(got_spec), spec)
  np.testing.assert_allclose(np.asarray(got), logits, **TOL)
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)


def test_caches_follow_the_batch(meshes, prompts):
  """Every cache leaf of init_cache, and every state / KV leaf ([L, B, ...] arrays) after prefill
  and step, has its batch axis (`cache_batch_axes`) on the data axis."""
  mesh = meshes["data_tensor"]
  for family in FAMILIES:
    model, params = tiny_model(family)
    sharded = shard.shard_params(model, params, mesh)
    rows = shard.shard_batch(prompts, mesh)
    with jax.set_mesh(mesh):
      fresh = model.init_cache(BATCH, 16)
      _, cache = model.prefill(sharded, rows, fresh, np.full((BATCH,), PROMPT, np.int32))
      _, stepped = model.step(sharded, rows[:, :1], cache)
    axes = jax.tree.leaves(model.cache_batch_axes(fresh))
    for leaf, axis in zip(jax.tree.leaves(fresh), axes):
      assert leaf.sharding.spec[axis] == "data", (family, leaf.shape, leaf.sharding)
    for tree in (cache, stepped):
      for leaf, axis in zip(jax.tree.leaves(tree), axes):
        if leaf.ndim > 1:
          assert leaf.sharding.spec[axis] == "data", (family, leaf.shape, leaf.sharding)


@pytest.mark.parametrize("family", FAMILIES)
def test_pallas_under_shard_map_equals_xla(family, prompts, meshes):
  """impl="pallas" (interpreted on CPU) on the data x tensor mesh, each kernel inside
  jax.shard_map, against the single-device XLA form."""
  model, params = tiny_model(family)
  xla = families.build(model.config, impl="xla",
                       **({"max_step": model.max_step} if model.max_step else {}))[0]
  pallas = families.build(model.config, impl="pallas", interpret=True,
                          **({"max_step": model.max_step} if model.max_step else {}))[0]
  mesh = meshes["data_tensor"]
  sharded = shard.shard_params(pallas, params, mesh)
  rows = shard.shard_batch(prompts, mesh)
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(pallas)(sharded, rows))
    got = pallas(sharded, rows)
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr
  np.testing.assert_allclose(np.asarray(got), np.asarray(xla(params, jnp.asarray(prompts))),
                             **TOL)


# --- DiT ----------------------------------------------------------------------------------------

DIT = dit.dit_config("DiT-tiny", num_heads=4)


@functools.cache
def _dit_apply():
  return to_functional(nnx.eval_shape(lambda: dit.DiT(DIT, rngs=nnx.Rngs(0))))[0]


def _dit_sample(params, labels):
  apply = _dit_apply()
  return sample(jax.random.key(0), dit_denoiser(apply, params, DIT), schedules.NoiseSchedule(),
                DDIM(), (BATCH, *DIT.sample_shape), steps=4, cond=labels)


@pytest.fixture(scope="module")
def dit_reference():
  # jittered: a fresh DiT (adaLN-Zero) outputs exactly zero, which would leave only the noise and
  # the solver's arithmetic to compare
  params = dit.jitter_params(nnx.to_pure_dict(nnx.state(dit.DiT(DIT, rngs=nnx.Rngs(0)))), 1)
  labels = np.arange(BATCH, dtype=np.int32) % DIT.num_classes
  out = _dit_apply()(params, jnp.zeros((BATCH, *DIT.sample_shape)), jnp.full((BATCH,), 500.0),
                     jnp.asarray(labels))
  assert float(jnp.std(out)) > 0.05  # the network contributes to every sample
  return params, labels, np.asarray(_dit_sample(params, jnp.asarray(labels)))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_dit_sample(dit_reference, meshes, mesh_name):
  params, labels, expected = dit_reference
  mesh = meshes[mesh_name]
  with jax.set_mesh(mesh):
    got = _dit_sample(shard.shard_params(DIT, params, mesh), shard.shard_batch(labels, mesh))
  np.testing.assert_allclose(np.asarray(got), expected, **TOL)


def test_checkpoint_saved_on_data_mesh_restores_onto_data_tensor(dit_reference, tmp_path):
  params, labels, expected = dit_reference
  saved_on = mesh_lib.make_mesh(data=8)
  store = CheckpointStore(tmp_path)
  store.save(1, shard.shard_params(DIT, params, saved_on))
  store.wait()
  target = mesh_lib.make_mesh(data=2, tensor=4)
  restored = shard.restore_params(store, 1, DIT, target)
  store.close()
  qkv = restored["blocks"][0]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.mesh.axis_sizes == (2, 1, 4, 1) and qkv.sharding.spec == P(None, "tensor")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, restored)
  with jax.set_mesh(target):
    got = _dit_sample(restored, shard.shard_batch(labels, target))
  np.testing.assert_allclose(np.asarray(got), expected, **TOL)


# --- the other lossless decoders and the feature-cached sampler ---------------------------------

_DECODERS = {
    "prompt_lookup": lambda m, p, x, k: prompt_lookup_generate(m, p, x, k, max_new_tokens=NEW,
                                                               ngram=2),
    "trie_lookahead": lambda m, p, x, k: trie_lookahead_generate(m, p, x, k, max_new_tokens=NEW,
                                                                 ngram=2),
    "jacobi": lambda m, p, x, k: jacobi_generate(m, p, x, k, max_new_tokens=NEW, window=3),
    "lookahead": lambda m, p, x, k: lookahead_generate(m, p, x, k, max_new_tokens=NEW, window=3),
}


@pytest.fixture(scope="module")
def transformer(prompts):
  """The tiny transformer, its params and one-device greedy `generate` tokens."""
  model, params = tiny_model("transformer")
  tokens = generate(model, params, prompts, jax.random.key(0), max_new_tokens=NEW).tokens
  return model, params, np.asarray(tokens)


@pytest.mark.parametrize("decoder", list(_DECODERS))
def test_draft_verify_decoders_on_a_mesh(transformer, prompts, meshes, decoder):
  """Prompt lookup, trie Lookahead, Jacobi and lookahead decoding (greedy, so equal to
  `generate`'s tokens on one device) with sharded params and rows. One family suffices: the
  decoders reach the model only through the SequenceModel contract, which the tests above shard
  for every family."""
  model, params, tokens = transformer
  mesh = meshes["data_tensor"]
  with jax.set_mesh(mesh):
    out = _DECODERS[decoder](model, shard.shard_params(model, params, mesh),
                             shard.shard_batch(prompts, mesh), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)


def test_medusa_on_a_mesh(transformer, prompts, meshes):
  """Medusa's tree verification with sharded target params (heads replicated): greedy tokens equal
  one-device `generate`."""
  model, params, tokens = transformer
  heads, head_params = medusa_heads(model, params, num_heads=4)  # DEFAULT_TREE: 4 deep
  mesh = meshes["data_tensor"]
  with jax.set_mesh(mesh):
    out = medusa_generate(model, shard.shard_params(model, params, mesh), heads, head_params,
                          shard.shard_batch(prompts, mesh), jax.random.key(0),
                          max_new_tokens=NEW)
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)


def test_feature_cached_dit_sample_on_a_mesh(dit_reference, meshes):
  """FORA-style feature caching (every 2nd step reuses the cached block outputs) on the data x
  tensor mesh equals the same cached sampler on one device."""
  params, labels, _ = dit_reference
  apply = _dit_apply()
  features = dit_feature_apply(nnx.eval_shape(lambda: dit.DiT(DIT, rngs=nnx.Rngs(0))))

  def run(p, y):
    den = dit_denoiser(apply, p, DIT, features=features)
    return sample(jax.random.key(0), den, schedules.NoiseSchedule(), DDIM(),
                  (BATCH, *DIT.sample_shape), steps=4, cond=y, cache=fc.fixed_interval(4, 2))

  expected = np.asarray(run(params, jnp.asarray(labels)))
  mesh = meshes["data_tensor"]
  with jax.set_mesh(mesh):
    got = run(shard.shard_params(DIT, params, mesh), shard.shard_batch(labels, mesh))
  np.testing.assert_allclose(np.asarray(got), expected, **TOL)
