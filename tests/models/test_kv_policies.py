"""KV-cache compression (`jaxinf.models.kv_policies`) against a plain-numpy reference of each
eviction rule on the attention probabilities recorded from the (jitted) JAX run, a full budget
against the uncompressed model, the int8 / fp8 storage against its error bound, rollback, and bad
input.

The reference below (`RefCache`) re-implements every policy from the papers' rules — H2O's
accumulated attention, StreamingLLM's sinks + window, SnapKV's pooled observation-window votes,
D2O's entropy-proportional layer budgets and its cosine-threshold merge — in numpy float64 over
per-token dicts, sharing no code with the library. It is fed only the inputs of each attention
call (keys, values, positions, probabilities), recorded by wrapping `kv_policies.attend` with a
host callback, and must keep exactly the positions the JAX cache keeps after every call.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bad_input import raises_before_tracing
from sequence_contract import TRANSFORMER_CFG, copied, random_tokens

from jaxinf.decoding.generate import generate
from jaxinf.models import kv_policies
from jaxinf.models.kv_policies import KVPolicy
from jaxinf.models.transformer import TransformerLM

CFG = TRANSFORMER_CFG   # 2 layers, 4 heads over 2 KV heads, max_len 48, init_std 0.2


@pytest.fixture(scope="module")
def params():
  return TransformerLM(CFG).init_params(3)


# --- the numpy reference -----------------------------------------------------------------------


class RefCache:
  """One layer's compressed cache for every (row, KV head): {position: [score, k, v, pinned]}."""

  def __init__(self, policy: KVPolicy, rows: int, heads: int):
    self.p = policy
    self.entries = [[{} for _ in range(heads)] for _ in range(rows)]
    self.tau = [[None] * heads for _ in range(rows)]
    self.merges = 0

  def prio(self, pos, entry, length, prefill):
    p = self.p
    if p.policy == "streaming":
      return math.inf if pos < p.sinks else pos
    if p.policy in ("h2o", "d2o"):
      return math.inf if pos >= length - p.recent else entry[0]
    if prefill:  # snapkv
      return math.inf if pos >= length - p.window else entry[0]
    return math.inf if entry[3] else pos

  def evict(self, b, h, length, budget, prefill):
    ent = self.entries[b][h]
    order = sorted(ent, key=lambda pos: (-self.prio(pos, ent[pos], length, prefill), -pos))
    kept, gone = order[:budget], order[budget:]
    if self.p.policy == "d2o" and gone:
      self.merge(b, h, kept, gone)
    self.entries[b][h] = {pos: ent[pos] for pos in kept}

  def merge(self, b, h, kept, gone):
    """D2O: each evicted key's most similar kept key (cosine), an EMA threshold on the mean of
    those maxima, weights e for the kept token and exp(u) for each merged one."""
    ent = self.entries[b][h]
    unit = lambda x: x / max(np.linalg.norm(x), 1e-12)
    best = []
    for e in gone:
      sims = {c: float(unit(ent[e][1]) @ unit(ent[c][1])) for c in kept}
      c = max(sims, key=sims.get)
      best.append((e, c, sims[c]))
    mean = np.mean([u for _, _, u in best])
    tau = self.tau[b][h]
    tau = mean if tau is None else self.p.merge_beta * tau + (1 - self.p.merge_beta) * mean
    self.tau[b][h] = tau
    num = {c: [math.e * ent[c][1], math.e * ent[c][2], math.e] for c in kept}
    for e, c, u in best:
      if u >= tau:
        self.merges += 1
        num[c][0] = num[c][0] + math.exp(u) * ent[e][1]
        num[c][1] = num[c][1] + math.exp(u) * ent[e][2]
        num[c][2] += math.exp(u)
    for c, (k, v, w) in num.items():
      if w > math.e:
        ent[c][1], ent[c][2] = k / w, v / w


def snapkv_votes(probs, length, policy):
  """SnapKV's pooled votes of one row and KV head from probs [G, T, T]."""
  t = probs.shape[-1]
  first = length - policy.window
  votes = probs[:, first:length].sum(axis=(0, 1))
  votes[first:] = 0.0
  r = policy.kernel // 2
  padded = np.concatenate([np.zeros(r), votes, np.zeros(r)])
  windows = np.stack([padded[i:i + policy.kernel] for i in range(t)])
  return windows.max(1) if policy.pooling == "max" else windows.sum(1) / policy.kernel


def d2o_budgets(prefill_probs, length, policy, slots):
  """A floor per layer, the rest of the total budget in proportion to the mean normalised entropy
  of each layer's attention rows."""
  dens = []
  for probs in prefill_probs:            # [Hkv, G, T, T] of one row per layer
    ent = []
    for q in range(1, length):
      p = probs[:, :, q, :q + 1].reshape(-1, q + 1)
      with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
      ent.append(h.mean() / math.log(q + 1))
    dens.append(np.mean(ent))
  dens = np.array(dens)
  n = len(dens)
  low = min(max(policy.recent + 1, policy.budget // 2), policy.budget)
  budgets = low + np.floor(n * (policy.budget - low) * dens / dens.sum()).astype(int)
  assert budgets.sum() <= n * policy.budget
  return np.minimum(budgets, slots)


def reference_run(policy, calls, n_layers, rows, heads, slots, prompt_len, steps):
  """Replays the recorded attention calls through `RefCache`; yields the kept positions
  [layer][row][head] after the prefill and after each step."""
  caches = [RefCache(policy, rows, heads) for _ in range(n_layers)]
  # prefill: one call per layer
  budgets = np.full((n_layers, rows), policy.budget)
  if policy.policy == "d2o":
    budgets = np.stack([d2o_budgets([c["probs"][b] for c in calls[:n_layers]], prompt_len,
                                    policy, slots) for b in range(rows)], axis=1)
  for i in range(n_layers):
    call, cache = calls[i], caches[i]
    for b in range(rows):
      for h in range(heads):
        probs = call["probs"][b, h].astype(np.float64)                 # [G, T, T]
        if policy.policy == "snapkv":
          scores = snapkv_votes(probs, prompt_len, policy)
        else:
          scores = probs.sum(axis=(0, 1))
        for s in range(prompt_len):
          cache.entries[b][h][s] = [scores[s], call["k"][b, s, h].astype(np.float64),
                                    call["v"][b, s, h].astype(np.float64), False]
        cache.evict(b, h, prompt_len, budgets[i, b], prefill=True)
        if policy.policy == "snapkv":
          for s, e in cache.entries[b][h].items():
            e[3] = s < prompt_len - policy.window
  yield [[[sorted(c.entries[b][h]) for h in range(heads)] for b in range(rows)] for c in caches]
  length, n = prompt_len, n_layers
  for k in steps:
    for i in range(n_layers):
      call, cache = calls[n], caches[i]
      n += 1
      for b in range(rows):
        for h in range(heads):
          ent = cache.entries[b][h]
          pos = call["pos"][b, :, h]
          # the call's live candidates are exactly our kept entries plus the k new tokens
          assert sorted(p for p in pos if 0 <= p < length) == sorted(ent)
          for c in np.flatnonzero(pos >= length):
            ent[int(pos[c])] = [0.0, call["k"][b, c, h].astype(np.float64),
                                call["v"][b, c, h].astype(np.float64), False]
          if policy.policy in ("h2o", "d2o"):
            received = call["probs"][b, h].astype(np.float64).sum(axis=(0, 1))
            for c in np.flatnonzero(pos >= 0):
              ent[int(pos[c])][0] += received[c]
          cache.evict(b, h, length + k, budgets[i, b], prefill=False)
    length += k
    yield [[[sorted(c.entries[b][h]) for h in range(heads)] for b in range(rows)] for c in caches]
  reference_run.caches = caches


def jax_kept(cache):
  pos = np.asarray(cache["pos"])                 # [L, B, Hkv, S]
  return [[[sorted(int(p) for p in pos[i, b, h] if p >= 0) for h in range(pos.shape[2])]
           for b in range(pos.shape[1])] for i in range(pos.shape[0])]


POLICY_CASES = {
    "streaming": KVPolicy("streaming", budget=8, sinks=2),
    "h2o": KVPolicy("h2o", budget=8, recent=3),
    "snapkv-max": KVPolicy("snapkv", budget=8, window=3, kernel=3),
    "snapkv-avg": KVPolicy("snapkv", budget=9, window=4, kernel=5, pooling="avg"),
    "d2o": KVPolicy("d2o", budget=7, recent=3, merge_beta=0.5),
}


@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_keeps_what_the_numpy_reference_keeps_on_recorded_attention(case, params,
                                                                            monkeypatch):
  """Eager prefill of 14 tokens, four one-token steps and a three-token step; the probabilities
  of every attention call are recorded and replayed through the reference, which must keep the
  same positions after every call (and, for H2O/D2O, the same scores; for D2O the same merged
  keys and values)."""
  policy = POLICY_CASES[case]
  model = TransformerLM(CFG, kv_policy=policy)
  calls = []
  attend = kv_policies.attend

  def record(keys, values, key_pos, probs):
    calls.append({"k": np.asarray(keys), "v": np.asarray(values), "pos": np.asarray(key_pos),
                      "probs": np.asarray(probs)})

  def recording(q, keys, values, key_pos, q_pos):
    out, probs = attend(q, keys, values, key_pos, q_pos)
    jax.debug.callback(record, keys, values, key_pos, probs, ordered=True)
    return out, probs

  monkeypatch.setattr(kv_policies, "attend", recording)
  # fresh jits of the model's two forms (traced here, with the recording `attend`)
  prefill = jax.jit(functools.partial(model.pure("prefill"), impl=model.impl, interpret=False,
                                      kv_policy=policy))
  step = jax.jit(functools.partial(model.pure("step"), impl=model.impl, interpret=False,
                                   kv_policy=policy))
  rows, prompt_len, steps = 2, 14, (1, 1, 1, 1, 3)
  tokens = jnp.asarray(random_tokens(model, (rows, prompt_len + sum(steps)), seed=5))
  cache = model.init_cache(rows, CFG.max_len)
  slots = cache["k"].shape[3]
  _, cache = prefill(params, tokens[:, :prompt_len], cache,
                     jnp.full((rows,), prompt_len, jnp.int32))
  jax.effects_barrier()
  kept = [jax_kept(cache)]
  at = prompt_len
  for k in steps:
    _, cache = step(params, tokens[:, at:at + k], cache)
    jax.effects_barrier()
    kept.append(jax_kept(cache))
    at += k
  ref = list(reference_run(policy, calls, CFG.num_layers, rows, CFG.num_kv_heads, slots,
                           prompt_len, steps))
  assert len(ref) == len(kept)
  for when, (got, want) in enumerate(zip(kept, ref)):
    assert got == want, f"kept positions differ after call {when}"
  # eviction happened (the test is not vacuous), within the budget
  assert all(len(s) <= slots for layer in kept[-1] for row in layer for s in row)
  assert max(len(s) for layer in kept[-1] for row in layer for s in row) < prompt_len + sum(steps)
  caches = reference_run.caches
  pos = np.asarray(cache["pos"])
  for i, rc in enumerate(caches):
    for b in range(rows):
      for h in range(CFG.num_kv_heads):
        for slot in np.flatnonzero(pos[i, b, h] >= 0):
          entry = rc.entries[b][h][int(pos[i, b, h, slot])]
          if policy.policy in ("h2o", "d2o"):
            np.testing.assert_allclose(float(cache["score"][i, b, h, slot]), entry[0],
                                       rtol=1e-5)
          np.testing.assert_allclose(np.asarray(cache["k"][i, b, h, slot]), entry[1], rtol=1e-5,
                                     atol=1e-6)
          np.testing.assert_allclose(np.asarray(cache["v"][i, b, h, slot]), entry[2], rtol=1e-5,
                                     atol=1e-6)
  if policy.policy == "d2o":
    assert sum(rc.merges for rc in caches) > 0        # the merge path ran
    budgets = np.asarray(cache["budget"])
    assert len(set(budgets.ravel().tolist())) > 1     # the layers got different budgets


# --- a full budget is no compression -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "d2o"])
def test_full_budget_equals_the_uncompressed_model(policy, params):
  """Budget = every position of the cache: nothing is evicted, and the logits of prefill, a
  three-token step and `generate` equal the uncompressed model's to fp32 rounding (the compressed
  path attends through `attend`, the uncompressed one through the chunked XLA kernel)."""
  prompt_len, new = 10, 12
  cap = prompt_len + new
  opts = {"sinks": 2, "window": 4} if policy != "h2o" else {}
  model = TransformerLM(CFG, kv_policy=KVPolicy(policy, budget=cap, **opts))
  base = TransformerLM(CFG)
  tokens = jnp.asarray(random_tokens(base, (2, prompt_len + 3), seed=8))
  lengths = jnp.array([prompt_len, prompt_len - 3], jnp.int32)
  outs = []
  for m in (base, model):
    logits, cache = m.prefill(params, tokens[:, :prompt_len], m.init_cache(2, cap), lengths)
    step_logits, _ = m.step(params, tokens[:, prompt_len:], cache)
    valid = np.arange(prompt_len)[None] < np.asarray(lengths)[:, None]
    outs.append((np.asarray(logits)[valid], np.asarray(step_logits)))
  for got, want in zip(outs[1], outs[0]):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
  key = jax.random.key(0)
  ref = generate(base, params, tokens[:, :prompt_len], key, max_new_tokens=new)
  out = generate(model, params, tokens[:, :prompt_len], key, max_new_tokens=new)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(out.surprise), np.asarray(ref.surprise), rtol=0,
                             atol=2e-5)


def test_small_budget_changes_generation_and_keeps_the_cache_fixed(params):
  """The counter-check of the full-budget test: at budget 6 the cache has 6 slots whatever the
  length, and the output moves away from the uncompressed model's."""
  model = TransformerLM(CFG, kv_policy=KVPolicy("h2o", budget=6, recent=2))
  prompts = jnp.asarray(random_tokens(model, (2, 16), seed=9))
  key = jax.random.key(1)
  out = generate(model, params, prompts, key, max_new_tokens=16)
  ref = generate(TransformerLM(CFG), params, prompts, key, max_new_tokens=16)
  assert not np.allclose(np.asarray(out.surprise), np.asarray(ref.surprise), atol=1e-3)
  assert model.init_cache(2, 40)["k"].shape[3] == 6


# --- int8 / fp8 storage --------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["int8", "float8_e4m3fn"])
def test_quantized_storage_within_its_bound(storage, params):
  """decode(encode(x)) within the format's bound (half a step of the per-token-per-head grid,
  int8; 2^-4 relative + 2^-10 scale, e4m3) on data spanning magnitudes, and the cache of a
  prefill: stored in the low-bit dtype, within the bound of the uncompressed cache's values."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 2, 16)) * np.exp(rng.uniform(-6, 4, (3, 5, 2, 1)))
  x[0, 0, 0] = 0.0
  x = x.astype(np.float32)
  enc = kv_policies.encode(jnp.asarray(x), storage, jnp.float32)
  got = np.asarray(kv_policies.decode(enc["q"], enc["scale"], jnp.float32))
  err = np.abs(got.astype(np.float64) - x)
  assert (err <= kv_policies.error_bound(x, storage)).all()
  assert err.max() > 0           # it is lossy: the bound is what is tested
  model = TransformerLM(CFG, kv_policy=KVPolicy(storage=storage))
  base = TransformerLM(CFG)
  tokens = jnp.asarray(random_tokens(base, (2, 12), seed=2))
  lengths = jnp.full((2,), 12, jnp.int32)
  logits, cache = model.prefill(params, tokens, model.init_cache(2, 20), lengths)
  ref_logits, ref = base.prefill(params, tokens, base.init_cache(2, 20), lengths)
  assert cache["k"].dtype == jnp.dtype(storage)
  # prefill attends with the fresh keys/values: the logits are the uncompressed model's
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref_logits))
  for name in ("k", "v"):
    stored = np.asarray(kv_policies.decode(cache[name], cache[name + "_scale"], jnp.float32))
    want = np.asarray(ref[name], np.float64)[:, :, :, :12]   # [L, B, Hkv, S, D]
    bound = kv_policies.error_bound(want, storage)
    assert (np.abs(stored[:, :, :, :12] - want) <= bound).all()


def test_storage_only_rolls_back_exactly_and_evicting_policies_refuse(params):
  """int8 storage, no eviction: a 3-token step rolled back entirely leaves the prefilled slots
  and length as they were, so the next step's logits are bit-identical to stepping the prefilled
  cache; rolled back to its first token, then 2 tokens, it matches a 1-token step then the same 2
  tokens (to fp32 rounding: the first token's key comes from a 3-row instead of a 1-row matmul).
  An evicting policy refuses rollback by name."""
  model = TransformerLM(CFG, kv_policy=KVPolicy(storage="int8"))
  tokens = jnp.asarray(random_tokens(model, (2, 13), seed=3))
  lengths = jnp.full((2,), 8, jnp.int32)
  _, cache = model.prefill(params, tokens[:, :8], model.init_cache(2, 16), lengths)
  # `step` donates its cache: the caches stepped from more than once are stepped as copies
  _, c1 = model.step(params, tokens[:, 8:11], copied(cache))
  c0 = model.rollback(c1, jnp.zeros((2,), jnp.int32))
  np.testing.assert_array_equal(np.asarray(c0["length"]), np.asarray(cache["length"]))
  for name in ("k", "v", "k_scale", "v_scale"):
    np.testing.assert_array_equal(np.asarray(c0[name][:, :, :, :8]),
                                  np.asarray(cache[name][:, :, :, :8]))
  np.testing.assert_array_equal(np.asarray(model.step(params, tokens[:, 11:13], copied(c0))[0]),
                                np.asarray(model.step(params, tokens[:, 11:13], copied(cache))[0]))
  c1 = model.rollback(c1, jnp.ones((2,), jnp.int32))
  got, _ = model.step(params, tokens[:, 11:13], c1)
  _, c2 = model.step(params, tokens[:, 8:9], cache)
  want, _ = model.step(params, tokens[:, 11:13], c2)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
  h2o = TransformerLM(CFG, kv_policy=KVPolicy("h2o", budget=8))
  _, hc = h2o.prefill(params, tokens[:, :8], h2o.init_cache(2, 16), lengths)
  _, hc = h2o.step(params, tokens[:, 8:10], hc)
  with raises_before_tracing(ValueError, "kv_policy: rollback .* 'h2o'"):
    h2o.rollback(hc, jnp.ones((2,), jnp.int32))
  with raises_before_tracing(ValueError, "kv_policy: tree_step"):
    h2o.tree_step(params, tokens[:, :3], hc, (-1, 0, 0))


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("options, error, names", [
    ({"policy": "lru", "budget": 8}, ValueError, "policy: unknown KV policy 'lru'"),
    ({"policy": "h2o"}, TypeError, "budget: policy 'h2o' needs an int budget"),
    ({"policy": "h2o", "budget": 8.0}, TypeError, "budget"),
    ({"policy": "h2o", "budget": 0}, ValueError, "budget: expected a positive int"),
    ({"policy": "streaming", "budget": 4, "sinks": 4}, ValueError, "budget: 4 must exceed sinks=4"),
    ({"policy": "h2o", "budget": 8, "recent": 9}, ValueError, "recent: .*budget below the recent"),
    ({"policy": "d2o", "budget": 8, "recent": 0}, ValueError, "recent"),
    ({"policy": "snapkv", "budget": 8, "window": 0}, ValueError, "window: expected a positive int"),
    ({"policy": "snapkv", "budget": 8, "window": -2}, ValueError, "window"),
    ({"policy": "snapkv", "budget": 4, "window": 6}, ValueError, "budget: 4 is below SnapKV's"),
    ({"policy": "snapkv", "budget": 8, "kernel": 4}, ValueError, "kernel: expected an odd"),
    ({"policy": "snapkv", "budget": 8, "pooling": "mean"}, ValueError, "pooling"),
    ({"policy": "none", "budget": 8}, ValueError, "budget: policy 'none' keeps every token"),
    ({"storage": "int4"}, ValueError, "storage: unknown KV storage 'int4'"),
    ({"policy": "d2o", "budget": 8, "merge_beta": 1.5}, ValueError, "merge_beta"),
])
def test_bad_policy_options_are_named(options, error, names):
  with raises_before_tracing(error, names):
    KVPolicy(**options)


def test_budget_larger_than_the_cache_is_named(params):
  with raises_before_tracing(ValueError, "budget: 64 slots exceed the model's context of "
                                         "max_len=48"):
    TransformerLM(CFG, kv_policy=KVPolicy("h2o", budget=64))
  model = TransformerLM(CFG, kv_policy=KVPolicy("streaming", budget=20))
  with raises_before_tracing(ValueError, "budget: 20 slots exceed the cache of max_len=16"):
    model.init_cache(2, 16)
  with raises_before_tracing(TypeError, "kv_policy: expected a KVPolicy"):
    TransformerLM(CFG, kv_policy="h2o")
