"""KV-cache compression for `jaxinf.models.transformer`: fixed-size caches with eviction policies,
and int8 / fp8 KV storage, all inside the compiled decode loop.

    model = TransformerLM(cfg, kv_policy=KVPolicy("h2o", budget=128, recent=32))
    out = generate(model, params, prompts, key, max_new_tokens=256)   # unchanged

A compressed cache holds `slots` entries per layer, row and KV head, head-major as the
transformer's own cache: "k", "v" `[L, B, Hkv, slots, D]`, the per-slot "pos", "score" and scales
`[L, B, Hkv, slots]` (the policies' rules below work slot-major, `[B, slots, Hkv, ...]`, on one
layer at a time). Each slot stores the key, the
value, the token's absolute position (`pos`, -1 for a dead slot) and the policy's score. RoPE is
applied when a key is written, with its true position, so a key never needs re-rotation when
tokens around it are evicted: the logit q_i . k_s of a kept key is exactly the uncompressed one,
and eviction only removes terms from the softmax (Xiao et al. 2023, §3.2, re-number positions
inside the cache instead; we keep the true ones, which is what H2O's and SnapKV's releases do).

One step of k new tokens (k > 1: speculative verification) per layer:

1. the new keys/values join the S cached slots as S + k candidates;
2. the k queries attend to every live candidate (causal among the new ones) — the XLA reference
   path (`attend`), not the Pallas kernels, because H2O / D2O need the probabilities;
3. the policy gives each candidate a priority (`priority`); protected ones (sinks, the recent
   window, SnapKV's selection) get +inf; candidates are ordered by (priority, position),
   highest first, and the first `budget` are kept (`select`); D2O merges the rest (`merge`).

Prefill attends uncompressed (full causal attention over the prompt, as in all four papers), then
compresses the prompt's keys/values into the slots with the same `select`.

Policies (`KVPolicy.policy`):

* "streaming" — StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with
  Attention Sinks", §3.2): the first `sinks` tokens and the most recent budget - sinks.
* "h2o" — H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", §4, Algorithm 1): score_s = the
  accumulated attention sum_i sum_{heads of the group} A_{i,s} token s has received from every
  query so far (prompt queries included); the `recent` newest tokens are kept, and of the rest the
  lowest-score one is evicted.
* "snapkv" — SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
  Generation", §4.1, eqs. 1-2): after prefill, each prompt key s gets C_s = sum over the last
  `window` prompt queries (and the heads of its KV group) of A_{i,s}, pooled along s by a 1-D
  max or average pool of size `kernel` (stride 1, same padding, the window's own keys left out);
  the top budget - window prompt keys and the window are kept. The prompt is compressed once;
  during decoding the selection stays pinned and the remaining slots slide over the newest tokens.
* "d2o" — D2O (Wan et al. 2024, "D2O: Dynamic Discriminative Operations", §3): layer-level, the
  budget of layer l for a row is proportional to the density of its prompt attention — the mean
  normalised entropy H_l = mean_i (-sum_s A_{i,s} log A_{i,s}) / log(i + 1) over heads and prompt
  queries (dense, high-entropy layers, typically the shallow ones, get more slots):
  each layer gets a floor low = max(recent + 1, budget // 2) and the rest of L * budget in
  proportion: b_l = low + floor(L * (budget - low) * H_l / sum_l' H_l'), at most
  min(2 * budget, max_len) physical slots, so sum_l b_l <= L * budget (the cache keeps the
  per-layer budgets in `budget`). Token-level, H2O's eviction within the layer, and a
  compensation: each evicted token e finds the retained slot c of its KV head whose key is most
  similar, u_e = max_c cos(k_e, k_c); the threshold tau is an exponential moving average of the
  mean of these maxima over eviction events, tau_t = beta * tau_{t-1} + (1 - beta) * mean_e u_e
  (tau_0 the first event's mean); evicted tokens with u_e >= tau_t are merged, the others
  discarded:
  k_c <- (e * k_c + sum_{e -> c} exp(u_e) k_e) / (e + sum_{e -> c} exp(u_e)) and the same for v
  (the retained token's own weight is exp(cos(k_c, k_c)) = e). The merged slot keeps its position
  and score.

Storage (`KVPolicy.storage`), independent of the policy: "int8" keeps keys/values as int8 with a
fp32 scale per token and KV head (absmax / 127, round to nearest; |x - x^| <= scale / 2), and
"float8_e4m3fn" as `jnp.float8_e4m3fn` with a per-token-per-head scale absmax / 448 (relative error
<= 2^-4 for normal values, absolute <= 2^-10 * scale below the normal range). Keys/values are
dequantized to the compute dtype on read.

Rollback (the SequenceModel contract): a policy that evicts cannot undo a step exactly (the
evicted and merged entries and the scores the rejected queries added are gone), so `rollback` is
refused with a ValueError naming the policy; policy "none" (storage only, no eviction) keeps a
slot per position and rolls back exactly by the length pointer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.models import layers
from jaxinf.parallel import kernels as mesh_kernels
from pallas_kernels import reference

POLICIES = ("none", "streaming", "h2o", "snapkv", "d2o")
STORAGES = ("native", "int8", "float8_e4m3fn")
POOLINGS = ("max", "avg")
_QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
# D2O's physical slots per layer, as a multiple of the mean budget (the per-layer budgets move
# within [budget // 2, D2O_MAX_RATIO * budget])
D2O_MAX_RATIO = 2


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class KVPolicy:
  """The KV-cache compression of a `TransformerLM` (`kv_policy=`); None there is no compression.

  policy: one of POLICIES ("none": no eviction, only `storage`).
  budget: live slots per layer (D2O: the mean over layers); required unless policy is "none".
  sinks: StreamingLLM's attention sinks (the first tokens, always kept).
  recent: the recent window H2O and D2O always keep (default budget // 2, H2O's half-and-half).
  window: SnapKV's observation window (the last prompt queries, whose keys are kept too).
  kernel, pooling: SnapKV's 1-D pool over key positions (odd size; "max" or "avg").
  merge_beta: D2O's EMA weight of the merge threshold.
  storage: "native" (the compute dtype), "int8" or "float8_e4m3fn".
  """

  policy: str = "none"
  budget: int | None = None
  sinks: int = 4
  recent: int | None = None
  window: int = 16
  kernel: int = 5
  pooling: str = "max"
  merge_beta: float = 0.5
  storage: str = "native"

  def __post_init__(self):
    if not isinstance(self.policy, str) or self.policy not in POLICIES:
      raise ValueError(f"policy: unknown KV policy {self.policy!r}; known: {list(POLICIES)}")
    if not isinstance(self.storage, str) or self.storage not in STORAGES:
      raise ValueError(f"storage: unknown KV storage {self.storage!r}; known: {list(STORAGES)}")
    if not isinstance(self.pooling, str) or self.pooling not in POOLINGS:
      raise ValueError(f"pooling: expected one of {list(POOLINGS)}, got {self.pooling!r}")
    for name in ("sinks", "window", "kernel"):
      value = getattr(self, name)
      if not _is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if self.sinks < 0:
      raise ValueError(f"sinks: expected an int >= 0, got {self.sinks}")
    if self.window < 1:
      raise ValueError(f"window: expected a positive int (SnapKV's observation window), got "
                       f"{self.window}")
    if self.kernel < 1 or self.kernel % 2 == 0:
      raise ValueError(f"kernel: expected an odd positive int (a same-size 1-D pool), got "
                       f"{self.kernel}")
    if isinstance(self.merge_beta, bool) or not isinstance(self.merge_beta, (int, float)):
      raise TypeError(f"merge_beta: expected a number in [0, 1], got {self.merge_beta!r}")
    if not 0.0 <= self.merge_beta <= 1.0:
      raise ValueError(f"merge_beta: expected a number in [0, 1], got {self.merge_beta!r}")
    if self.policy == "none":
      if self.budget is not None:
        raise ValueError(f"budget: policy 'none' keeps every token; got budget={self.budget!r} "
                         "(choose an evicting policy)")
      return
    if self.budget is None or not _is_int(self.budget):
      raise TypeError(f"budget: policy {self.policy!r} needs an int budget (slots per layer), "
                      f"got {self.budget!r}")
    if self.budget < 1:
      raise ValueError(f"budget: expected a positive int, got {self.budget}")
    if self.recent is None:
      object.__setattr__(self, "recent", self.budget // 2)
    if not _is_int(self.recent):
      raise TypeError(f"recent: expected an int, got {type(self.recent).__name__}")
    if self.policy in ("h2o", "d2o") and not 1 <= self.recent <= self.budget:
      raise ValueError(f"recent: expected a window in [1, budget={self.budget}], got "
                       f"{self.recent} (a budget below the recent window cannot keep it)")
    if self.policy == "streaming" and self.budget <= self.sinks:
      raise ValueError(f"budget: {self.budget} must exceed sinks={self.sinks} to leave a recent "
                       "window")
    if self.policy == "snapkv" and self.budget < self.window:
      raise ValueError(f"budget: {self.budget} is below SnapKV's observation window "
                       f"window={self.window}, which is always kept")

  @property
  def evicts(self) -> bool:
    return self.policy != "none"

  @property
  def quantized(self) -> bool:
    return self.storage != "native"

  def slots(self, max_len: int) -> int:
    """Physical slots per layer of a cache for `max_len` tokens: max_len without eviction, the
    budget (D2O: up to D2O_MAX_RATIO times it, for its per-layer budgets) otherwise."""
    if not self.evicts:
      return max_len
    self.check_cache(max_len)
    if self.policy == "d2o":
      return min(max_len, D2O_MAX_RATIO * self.budget)
    return self.budget

  def check_cache(self, max_len: int, what: str = "the cache") -> None:
    """The budget fits `max_len` positions (a ValueError naming `budget` otherwise)."""
    if self.evicts and self.budget > max_len:
      raise ValueError(f"budget: {self.budget} slots exceed {what} of max_len={max_len}")


# ---------------------------------------------------------------------------------------------
# storage


def encode(x: jax.Array, storage: str, dtype) -> dict:
  """Keys or values `[..., D]` in `storage`: {"q": stored array, "scale": [...] fp32 or None}."""
  if storage == "native":
    return {"q": x.astype(dtype), "scale": None}
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=-1)
  scale = jnp.where(amax > 0, amax / _QMAX[storage], 1.0)
  y = x32 / scale[..., None]
  if storage == "int8":
    q = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8)
  else:
    q = y.astype(jnp.float8_e4m3fn)
  return {"q": q, "scale": scale}


def decode(q: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
  """The stored keys or values back in the compute `dtype`."""
  if scale is None:
    return q.astype(dtype)
  return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def storage_dtype(storage: str, dtype) -> jnp.dtype:
  return {"native": jnp.dtype(dtype), "int8": jnp.dtype(jnp.int8),
          "float8_e4m3fn": jnp.dtype(jnp.float8_e4m3fn)}[storage]


def error_bound(x, storage: str) -> np.ndarray:
  """Elementwise bound on |decode(encode(x)) - x| for fp32 `x` `[..., D]` (before the final cast
  to the compute dtype): half a step of the scaled grid."""
  x = np.asarray(x, np.float64)
  amax = np.max(np.abs(x), axis=-1, keepdims=True)
  scale = np.where(amax > 0, amax / _QMAX[storage], 1.0)
  if storage == "int8":
    return scale / 2 * (1 + 1e-5)
  # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal spacing 2^-9
  return (np.abs(x) * 2.0 ** -4 + scale * 2.0 ** -10) * (1 + 1e-5)


# ---------------------------------------------------------------------------------------------
# attention with probabilities


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, key_pos: jax.Array,
           q_pos: jax.Array):
  """Softmax attention of queries `q` [B, T, H, D] at positions `q_pos` [B, T] over candidate
  slots `keys`/`values` [B, C, Hkv, D] at positions `key_pos` [B, C, Hkv] (-1: dead); query i
  sees slot s iff 0 <= key_pos[s] <= q_pos[i]. Vaswani et al. 2017, eq. 1, with GQA, as
  `pallas_kernels.reference.softmax_attention`. Returns (out [B, T, H, D] in q's dtype, probs
  [B, Hkv, G, T, C] fp32), G = H // Hkv."""
  b, t, h, d = q.shape
  hkv = keys.shape[2]
  g = h // hkv
  qg = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
  hi = jax.lax.Precision.HIGHEST
  logits = d ** -0.5 * jnp.einsum("bthgd,bchd->bhgtc", qg, keys.astype(jnp.float32),
                                  precision=hi)
  kp = jnp.transpose(key_pos, (0, 2, 1))[:, :, None, None, :]          # [B, Hkv, 1, 1, C]
  visible = (kp >= 0) & (kp <= q_pos[:, None, None, :, None])
  probs, _, _ = reference.masked_softmax(logits, visible)
  out = jnp.einsum("bhgtc,bchd->bthgd", probs, values.astype(jnp.float32), precision=hi)
  return out.reshape(b, t, h, d).astype(q.dtype), probs


# ---------------------------------------------------------------------------------------------
# the policies' rules (numpy twins in tests/models/test_kv_policies.py)


def received_attention(probs: jax.Array, q_valid: jax.Array) -> jax.Array:
  """H2O's per-step score increment: sum over the valid queries (`q_valid` [B, T]) and the query
  heads of each KV group of the attention each candidate received: [B, Hkv, G, T, C] -> [B, C,
  Hkv]."""
  p = jnp.where(q_valid[:, None, None, :, None], probs, 0.0)
  return jnp.transpose(jnp.sum(p, axis=(2, 3)), (0, 2, 1))


def snapkv_scores(probs: jax.Array, lengths: jax.Array, policy: KVPolicy) -> jax.Array:
  """SnapKV's pooled votes (Li et al. 2024, eqs. 1-2) of prompt keys from the last `window`
  queries of each row: [B, Hkv, G, T, T] -> [B, T, Hkv]. Keys inside the window are left out of
  the pool (they are kept anyway); average pooling divides by the kernel size (zero padding
  counted, as `avg_pool1d`)."""
  t = probs.shape[-1]
  idx = jnp.arange(t)
  first = lengths - policy.window
  q_in = (idx[None] >= first[:, None]) & (idx[None] < lengths[:, None])          # [B, T]
  votes = received_attention(probs, q_in)                                         # [B, T, Hkv]
  k_out = (idx[None] < first[:, None])[:, :, None]
  votes = jnp.where(k_out, votes, 0.0)
  r = policy.kernel // 2
  padded = jnp.pad(votes, ((0, 0), (r, r), (0, 0)))
  shifted = jnp.stack([padded[:, i:i + t] for i in range(policy.kernel)])
  if policy.pooling == "max":
    return jnp.max(shifted, axis=0)
  return jnp.sum(shifted, axis=0) / policy.kernel


def priority(policy: KVPolicy, pos: jax.Array, score: jax.Array, length: jax.Array, *,
             prefill: bool) -> jax.Array:
  """The keep priority of candidates (higher is kept; +inf protected) at `pos` with `score`
  [B, C, Hkv] once each row holds `length` [B] tokens."""
  inf = jnp.float32(jnp.inf)
  length = length[:, None, None]
  if policy.policy == "streaming":
    return jnp.where(pos < policy.sinks, inf, pos.astype(jnp.float32))
  if policy.policy in ("h2o", "d2o"):
    return jnp.where(pos >= length - policy.recent, inf, score)
  # snapkv: at prefill the observation window is protected and the rest ranked by pooled votes;
  # afterwards the selection is pinned (score +inf) and the rest slides (newest kept)
  if prefill:
    return jnp.where(pos >= length - policy.window, inf, score)
  return jnp.where(jnp.isposinf(score), inf, pos.astype(jnp.float32))


def keep_order(prio: jax.Array, pos: jax.Array) -> jax.Array:
  """Indices [B, C, Hkv] that sort candidates by (priority, position) descending along C, dead
  candidates (pos < 0) last: keeping the first `budget` is the eviction rule of every policy
  (ties in priority keep the newest token)."""
  live = pos >= 0
  k1 = jnp.where(live, -prio, jnp.inf)
  k2 = jnp.where(live, -pos, 1)
  idx = jnp.broadcast_to(jnp.arange(pos.shape[1], dtype=jnp.int32)[None, :, None], pos.shape)
  return jax.lax.sort((k1, k2, idx), dimension=1, num_keys=2)[2]


def d2o_layer_budgets(density: jax.Array, policy: KVPolicy, slots: int) -> jax.Array:
  """D2O's layer-level allocation (Wan et al. 2024, §3.1): [L, B] densities -> [L, B] budgets.
  Every layer gets a floor of low = max(recent + 1, budget // 2) slots and the rest of the total
  L * budget in proportion to its density: b_l = low + floor(L * (budget - low) * H_l / sum H),
  at most `slots`; so sum_l b_l <= L * budget (never more memory than the uniform budget). A budget
  that fills the cache (budget >= slots, every token fits) is every layer's: moving slots away
  from a layer could only lose tokens there."""
  n_layers = density.shape[0]
  if policy.budget >= slots:
    return jnp.full(density.shape, slots, jnp.int32)
  low = min(max(policy.recent + 1, policy.budget // 2), policy.budget)
  total = jnp.sum(density, axis=0, keepdims=True)
  share = jnp.where(total > 0, density / jnp.where(total > 0, total, 1.0), 1.0 / n_layers)
  extra = jnp.floor(n_layers * (policy.budget - low) * share).astype(jnp.int32)
  return jnp.minimum(low + extra, slots)


def attention_density(probs: jax.Array, lengths: jax.Array) -> jax.Array:
  """The mean normalised entropy of the prompt attention rows of one layer, per row:
  [B, Hkv, G, T, T] -> [B] (queries 1 .. length - 1; query 0 sees one key)."""
  t = probs.shape[-1]
  ent = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0),
                 axis=-1)                                                       # [B, Hkv, G, T]
  i = jnp.arange(t)
  norm = jnp.log(jnp.maximum(i + 1, 2).astype(jnp.float32))
  valid = (i[None] >= 1) & (i[None] < lengths[:, None])                        # [B, T]
  per_q = jnp.mean(ent / norm, axis=(1, 2))                                    # [B, T]
  n = jnp.sum(valid, axis=1)
  return jnp.where(n > 0, jnp.sum(jnp.where(valid, per_q, 0.0), 1) / jnp.maximum(n, 1), 0.0)


def merge(kept_k, kept_v, kept_live, ev_k, ev_v, evicted, tau, beta: float):
  """D2O's compensation (Wan et al. 2024, §3.2): evicted keys/values `ev_k`, `ev_v`
  [B, E, Hkv, D] (`evicted` [B, E, Hkv] marks real ones) merged into the retained `kept_k`,
  `kept_v` [B, S, Hkv, D] (`kept_live` [B, S, Hkv]) under the EMA threshold `tau` [B, Hkv] (NaN
  before the first event). Returns (k, v, merged [B, S, Hkv] bool, tau)."""
  hi = jax.lax.Precision.HIGHEST

  def unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  cos = jnp.einsum("behd,bshd->bhes", unit(ev_k), unit(kept_k), precision=hi)  # [B, Hkv, E, S]
  cos = jnp.where(jnp.transpose(kept_live, (0, 2, 1))[:, :, None, :], cos, -jnp.inf)
  best = jnp.argmax(cos, axis=-1)
  u = jnp.max(cos, axis=-1)                                                     # [B, Hkv, E]
  valid = jnp.transpose(evicted, (0, 2, 1)) & jnp.isfinite(u)
  n = jnp.sum(valid, axis=-1)
  mean_u = jnp.sum(jnp.where(valid, u, 0.0), -1) / jnp.maximum(n, 1)
  tau = jnp.where(n > 0, jnp.where(jnp.isnan(tau), mean_u, beta * tau + (1 - beta) * mean_u),
                  tau)
  take = valid & (u >= tau[..., None])
  w = jnp.where(take, jnp.exp(jnp.where(take, u, 0.0)), 0.0)                   # [B, Hkv, E]
  onehot = (best[..., None] == jnp.arange(kept_k.shape[1])) & take[..., None]   # [B, Hkv, E, S]
  wo = jnp.where(onehot, w[..., None], 0.0)
  den = jnp.transpose(jnp.sum(wo, axis=2), (0, 2, 1))                           # [B, S, Hkv]
  e = jnp.float32(math.e)

  def combine(kept, ev):
    num = jnp.einsum("bhes,behd->bshd", wo, ev.astype(jnp.float32), precision=hi)
    mixed = (e * kept.astype(jnp.float32) + num) / (e + den[..., None])
    return jnp.where((den > 0)[..., None], mixed, kept.astype(jnp.float32))

  return combine(kept_k, ev_k), combine(kept_v, ev_v), den > 0, tau


def select(policy: KVPolicy, cand: dict, prio: jax.Array, budget: jax.Array, slots: int,
           tau: jax.Array | None, dtype, max_evicted: int | None = None):
  """Keeps the first `budget` [B] candidates of `cand` (arrays [B, C, ...] on axis 1: "k", "v",
  their "k_scale", "v_scale" when quantized, "pos", "score") in the order of `keep_order`, into
  `slots` slots; D2O merges the evicted ones. Returns (slot arrays, tau).

  `max_evicted`: a bound on the live candidates beyond `budget` (a decode step of k tokens over a
  cache holding at most `budget` live slots evicts at most k), so D2O compares only those with the
  kept slots: the same merge at O(k * slots) instead of O(C * slots) per head."""
  c = cand["pos"].shape[1]
  if c < slots:  # fewer candidates than slots (a short prompt): pad with dead ones
    pad = slots - c
    cand = {n: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),
                       constant_values=-1 if n == "pos" else 0) for n, a in cand.items()}
    prio = jnp.pad(prio, ((0, 0), (0, pad), (0, 0)))
    c = slots
  order = keep_order(prio, cand["pos"])

  def gather(a):
    idx = order if a.ndim == 3 else order[..., None]
    return jnp.take_along_axis(a, idx, axis=1)

  s = {n: gather(a) for n, a in cand.items()}
  live = s["pos"] >= 0
  keep = (jnp.arange(c)[None, :, None] < budget[:, None, None]) & live
  out = {n: a[:, :slots] for n, a in s.items()}
  out["pos"] = jnp.where(keep[:, :slots], out["pos"], -1)
  if policy.policy == "d2o":
    scale = policy.storage != "native"
    kept_k = decode(out["k"], out.get("k_scale") if scale else None, jnp.float32)
    kept_v = decode(out["v"], out.get("v_scale") if scale else None, jnp.float32)
    ev, evicted = s, live & ~keep
    if max_evicted is not None and max_evicted < c:   # the candidates just past the budget
      at = budget[:, None] + jnp.arange(max_evicted)[None]                     # [B, E]
      idx = jnp.broadcast_to(jnp.minimum(at, c - 1)[..., None], (*at.shape, live.shape[2]))
      ev = {n: jnp.take_along_axis(a, idx if a.ndim == 3 else idx[..., None], axis=1)
            for n, a in s.items()}
      evicted = jnp.take_along_axis(evicted, idx, axis=1) & (at < c)[..., None]
    ev_k = decode(ev["k"], ev.get("k_scale") if scale else None, jnp.float32)
    ev_v = decode(ev["v"], ev.get("v_scale") if scale else None, jnp.float32)
    k, v, merged, tau = merge(kept_k, kept_v, keep[:, :slots], ev_k, ev_v, evicted, tau,
                              policy.merge_beta)
    for name, x in (("k", k), ("v", v)):
      enc = encode(x, policy.storage, dtype)
      out[name] = jnp.where(merged[..., None], enc["q"], out[name])
      if scale:
        out[name + "_scale"] = jnp.where(merged, enc["scale"], out[name + "_scale"])
  return out, tau


# ---------------------------------------------------------------------------------------------
# the cache and the two forms over it (called by `transformer.Transformer.prefill` / `.step`)


def init_cache(policy: KVPolicy, cfg, batch: int, max_len: int) -> dict:
  """The compressed cache of `policy` for `batch` rows and up to `max_len` tokens."""
  slots = policy.slots(max_len)
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
  # every leaf its own buffer: the transformer's `step` donates the cache
  zeros = lambda: jnp.zeros(shape, storage_dtype(policy.storage, cfg.dtype))
  cache = {"k": zeros(), "v": zeros(), "length": jnp.zeros((batch,), jnp.int32),
           "last_k": jnp.zeros((batch,), jnp.int32)}
  if policy.quantized:
    cache["k_scale"] = jnp.ones(shape[:-1], jnp.float32)
    cache["v_scale"] = jnp.ones(shape[:-1], jnp.float32)
  if policy.evicts:
    cache["pos"] = jnp.full(shape[:-1], -1, jnp.int32)
    cache["score"] = jnp.zeros(shape[:-1], jnp.float32)
    cache["budget"] = jnp.full((cfg.num_layers, batch), policy.budget, jnp.int32)
    if policy.policy == "d2o":
      cache["tau"] = jnp.full((cfg.num_layers, batch, cfg.num_kv_heads), jnp.nan, jnp.float32)
  return cache


def cache_batch_axes(cache: dict) -> dict:
  return {n: 0 if n in ("length", "last_k") else 1 for n in cache}


def _layer(cache: dict, i: int, names) -> dict:
  """Layer i's entries `names`, head-major as stored: `[B, Hkv, slots, ...]`."""
  return {n: cache[n][i] for n in names if n in cache}


def _slot_major(entry: dict) -> dict:
  """`[B, Hkv, slots, ...]` -> `[B, slots, Hkv, ...]`, the layout of the policies' rules."""
  return {n: jnp.swapaxes(a, 1, 2) for n, a in entry.items()}


def _stack_head_major(arrays) -> jax.Array:
  """Per-layer slot-major `[B, slots, Hkv, ...]` -> the cache's `[L, B, Hkv, slots, ...]`."""
  return jnp.swapaxes(jnp.stack(arrays), 2, 3)


def _encoded(policy: KVPolicy, k, v, dtype) -> dict:
  ek, ev = encode(k, policy.storage, dtype), encode(v, policy.storage, dtype)
  out = {"k": ek["q"], "v": ev["q"]}
  if policy.quantized:
    out["k_scale"], out["v_scale"] = ek["scale"], ev["scale"]
  return out


def _decoded(policy: KVPolicy, entry: dict, name: str, dtype):
  return decode(entry[name], entry.get(name + "_scale") if policy.quantized else None, dtype)


def prefill(module, policy: KVPolicy, tokens, cache, lengths, *, impl, interpret,
            return_hidden):
  """`Transformer.prefill` with `policy`: full causal attention over the prompt, then the
  prompt's keys/values compressed into the slots (storage-only: written at their positions)."""
  cfg = module.cfg
  dtype = jnp.dtype(cfg.dtype)
  b, t = tokens.shape
  lengths = lengths.astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  q_valid = positions < lengths[:, None]
  x = layers.embed(module.embed_tokens, tokens).astype(jnp.float32)
  new = {n: [] for n in ("k", "v", "k_scale", "v_scale", "score")}
  density = []
  key_pos = jnp.broadcast_to(jnp.where(q_valid, positions, -1)[:, :, None],
                             (b, t, cfg.num_kv_heads))
  for block in module.layers:
    q, k, v = block.attention_inputs(x, positions)
    if not policy.evicts:
      o = mesh_kernels.attention(q, k, v, causal=True, kv_lengths=lengths, impl=impl,
                                 interpret=interpret)
    else:
      o, probs = attend(q, k, v, key_pos, positions)
      if policy.policy == "snapkv":
        new["score"].append(snapkv_scores(probs, lengths, policy))
      elif policy.policy in ("h2o", "d2o"):
        new["score"].append(received_attention(probs, q_valid))
      else:
        new["score"].append(jnp.zeros((b, t, cfg.num_kv_heads), jnp.float32))
      if policy.policy == "d2o":
        density.append(attention_density(probs, lengths))
    for name, a in _encoded(policy, k, v, dtype).items():
      new[name].append(a)
    x = block.finish(x, o)
  cache = dict(cache)
  if not policy.evicts:
    keep_new = q_valid[:, None, :]                                          # [B, 1, T]
    for name in ("k", "v", "k_scale", "v_scale"):
      if name in cache:
        a = _stack_head_major(new[name])                                    # [L, B, Hkv, T, ...]
        mask = keep_new[..., None] if a.ndim == 5 else keep_new
        cache[name] = cache[name].at[:, :, :, :t].set(
            jnp.where(mask, a, cache[name][:, :, :, :t]))
  else:
    slots = cache["k"].shape[3]
    budget = cache["budget"]
    if policy.policy == "d2o":
      budget = d2o_layer_budgets(jnp.stack(density), policy, slots)
    names = [n for n in ("k", "v", "k_scale", "v_scale") if n in cache]
    outs = {n: [] for n in names + ["pos", "score", "tau"]}
    for i in range(cfg.num_layers):
      cand = {n: new[n][i] for n in names}
      cand["pos"], cand["score"] = key_pos, new["score"][i]
      prio = priority(policy, key_pos, cand["score"], lengths, prefill=True)
      tau = cache["tau"][i] if "tau" in cache else None
      out, tau = select(policy, cand, prio, budget[i], slots, tau, dtype)
      if policy.policy == "snapkv":  # pin the selection; the window slides from here on
        window = out["pos"] >= (lengths - policy.window)[:, None, None]
        out["score"] = jnp.where((out["pos"] >= 0) & ~window, jnp.inf, 0.0)
      for n in names + ["pos", "score"]:
        outs[n].append(out[n])
      outs["tau"].append(tau)
    for n in names + ["pos", "score"]:
      cache[n] = _stack_head_major(outs[n])
    cache["budget"] = budget
    if "tau" in cache:
      cache["tau"] = jnp.stack(outs["tau"])
  cache.update(length=lengths, last_k=jnp.zeros_like(lengths))
  return (*module._outputs(x, return_hidden), cache)


def step(module, policy: KVPolicy, tokens, cache, *, impl, interpret, return_hidden):
  """`Transformer.step` with `policy`: k new tokens attend to the live slots and each other, then
  each layer keeps its budget (storage-only: written at their positions, the attention kernel
  reads the dequantized cache)."""
  cfg = module.cfg
  dtype = jnp.dtype(cfg.dtype)
  b, kn = tokens.shape
  start = cache["length"]
  positions = start[:, None] + jnp.arange(kn, dtype=jnp.int32)[None]
  new_length = start + kn
  rows = jnp.arange(b)[:, None]
  names = [n for n in ("k", "v", "k_scale", "v_scale") if n in cache]
  cache = dict(cache)
  x = layers.embed(module.embed_tokens, tokens).astype(jnp.float32)
  q_valid = jnp.ones((b, kn), bool)
  layers_out = {n: [] for n in names + ["pos", "score", "tau"]}
  for i, block in enumerate(module.layers):
    q, k, v = block.attention_inputs(x, positions)
    enc = _encoded(policy, k, v, dtype)
    if not policy.evicts:
      for n in names:  # [B, kn, Hkv, ...] to slots `positions` of [L, B, Hkv, S, ...]
        cache[n] = cache[n].at[i, rows, :, positions].set(enc[n])
      o = mesh_kernels.attention_step(q, _decoded(policy, _layer(cache, i, names), "k", dtype),
                                      _decoded(policy, _layer(cache, i, names), "v", dtype),
                                      new_length, impl=impl, interpret=interpret, layout="bhsd")
    else:
      old = _slot_major(_layer(cache, i, names + ["pos", "score"]))
      new_pos = jnp.broadcast_to(positions[:, :, None], (b, kn, cfg.num_kv_heads))
      cand = {n: jnp.concatenate([old[n], enc[n]], axis=1) for n in names}
      cand["pos"] = jnp.concatenate([old["pos"], new_pos], axis=1)
      keys, values = _decoded(policy, cand, "k", dtype), _decoded(policy, cand, "v", dtype)
      o, probs = attend(q, keys, values, cand["pos"], positions)
      score = jnp.concatenate([old["score"], jnp.zeros((b, kn, cfg.num_kv_heads))], axis=1)
      if policy.policy in ("h2o", "d2o"):
        score = score + received_attention(probs, q_valid)
      cand["score"] = score
      prio = priority(policy, cand["pos"], score, new_length, prefill=False)
      tau = cache["tau"][i] if "tau" in cache else None
      # the cache holds at most budget live slots, so kn candidates at most are evicted
      out, tau = select(policy, cand, prio, cache["budget"][i], cache["k"].shape[3], tau, dtype,
                        max_evicted=kn)
      for n in names + ["pos", "score"]:
        layers_out[n].append(out[n])
      layers_out["tau"].append(tau)
    x = block.finish(x, o)
  if policy.evicts:
    for n in names + ["pos", "score"]:
      cache[n] = _stack_head_major(layers_out[n])
    if "tau" in cache:
      cache["tau"] = jnp.stack(layers_out["tau"])
  cache.update(length=new_length, last_k=jnp.full_like(start, kn))
  return (*module._outputs(x, return_hidden), cache)
