"""Medusa decoding: candidates from K heads arranged in a static sparse tree, verified in one target
call with tree attention (Cai et al. 2024, "Medusa", §2.1.2 and §2.3.1).

    out = medusa_generate(model, params, heads, head_params, prompts, key, max_new_tokens=128,
                          tree=DEFAULT_TREE, sampler=GREEDY, acceptance="exact")

One round of the compiled `lax.while_loop`:

1. The tree's root is the last emitted token (not yet in the cache). A node at depth d ≥ 1 is the
   rank-r candidate of head d, read from the heads' logits at the last accepted position; the tree
   is a fixed tuple of rank paths (`MedusaTree`), so every shape is static.
2. `model.tree_step` runs all n nodes at once: node i sees the cached prefix and its ancestors
   (the tree attention mask), so its logits are those of stepping its path token by token.
3. Acceptance walks the tree (below), giving a root-to-node path of 1 + n_accept nodes and a next
   token drawn at its last node; the round emits the n_accept accepted candidates and that token.
4. `model.commit_path` moves the path's K/V into contiguous slots and advances the length: the
   cache is exactly that of sequential decoding. The heads read the hidden state of the path's
   last node for the next round's candidates.

Acceptance:

* "exact" (lossless): the candidates are point masses, so verification is "draw y ~ p at a node
  and keep walking while y equals one of its children" — the point-mass case of speculative
  sampling (`jaxinf.decoding.verify`: acceptance u < p(x), residual p without x), extended to
  siblings: the siblings are distinct tokens, so at most one matches y, and y itself is emitted at
  the first node without a matching child. Every emitted token is drawn from the target's own
  distribution p = `verify.probs(sampler, logits)` given its prefix, so the output has exactly the
  distribution of `generate` with the same sampler (greedy: the argmax walk, token for token).
  Each node draws with its own randomness (one categorical per node per round, from
  `fold_in(key, round)`), and a node's draw is used only when it lies on the walked path.
* "typical" (LOSSY): Medusa's typical acceptance (§2.3.1): a candidate x after node u is
  accepted if p_u(x) > min(ε, δ·exp(−H(p_u))); the path with the longest accepted prefix wins
  (ties: the first in tree order, i.e. the higher-ranked candidates); the next token is drawn from
  p at its last node. Tokens accepted this way are NOT distributed as the target's samples — the
  output distribution differs from `generate`'s; only greedy (where p is one-hot) coincides.

Only transformer targets (`tree_step` / `commit_path`); recurrent targets are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.decoding import checks, sampling
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.verify import SpeculativeOutput, append_tokens, probs
from jaxinf.models.medusa import MedusaHeads
from jaxinf.models.tree_attention import tree_structure

ACCEPTANCE = ("exact", "typical")


@dataclasses.dataclass(frozen=True)
class MedusaTree:
  """A static sparse candidate tree (Medusa's "medusa choices"): each path `(r_1, ..., r_d)` is
  the node reached by taking head 1's rank-r_1 candidate, then head 2's rank-r_2 one, and so on.
  The set must be prefix-closed (every node's parent is in it). Node 0 is the root (the last
  emitted token); the others follow in (depth, path) order, so parents precede children."""

  paths: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    paths = self.paths
    if not isinstance(paths, tuple) or not paths or any(
        not isinstance(p, tuple) or not p or any(
            isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0 for r in p)
        for p in paths):
      raise ValueError(f"paths: expected a non-empty tuple of non-empty tuples of ranks >= 0, "
                       f"got {paths!r}")
    if len(set(paths)) != len(paths):
      raise ValueError("paths: duplicate paths")
    missing = sorted({p[:-1] for p in paths if len(p) > 1} - set(paths))
    if missing:
      raise ValueError(f"paths: not prefix-closed; missing parents {missing[:5]}")
    object.__setattr__(self, "paths", tuple(sorted((tuple(int(r) for r in p) for p in paths),
                                                   key=lambda p: (len(p), p))))

  @property
  def num_nodes(self) -> int:
    """Nodes including the root."""
    return len(self.paths) + 1

  @property
  def depth(self) -> int:
    return max(len(p) for p in self.paths)

  @property
  def parents(self) -> tuple[int, ...]:
    index = {p: i + 1 for i, p in enumerate(self.paths)}
    return (-1,) + tuple(index[p[:-1]] if len(p) > 1 else 0 for p in self.paths)

  @property
  def ranks(self) -> np.ndarray:
    """[n] the head rank of each node (0 for the root)."""
    return np.array([0] + [p[-1] for p in self.paths], np.int32)

  @property
  def top_k(self) -> tuple[int, ...]:
    """How many candidates each head 1..depth contributes (its largest rank + 1)."""
    return tuple(max(p[d] for p in self.paths if len(p) > d) + 1 for d in range(self.depth))

  def path_nodes(self) -> np.ndarray:
    """[n, depth + 1] the node at each depth of node i's root-to-node path, padded with i."""
    parents = self.parents
    depths, _ = tree_structure(parents)
    out = np.zeros((self.num_nodes, self.depth + 1), np.int32)
    for i in range(self.num_nodes):
      chain, j = [], i
      while j >= 0:
        chain.append(j)
        j = parents[j]
      chain = chain[::-1]
      out[i] = chain + [i] * (self.depth + 1 - len(chain))
      assert len(chain) == depths[i] + 1
    return out


def tree_from_topk(sizes: Sequence[int]) -> MedusaTree:
  """The full tree of the Cartesian products of each head's top-k (head d keeps sizes[d-1]
  candidates): prod(sizes[:d]) nodes at depth d."""
  sizes = tuple(sizes)
  if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                      for s in sizes):
    raise ValueError(f"sizes: expected a non-empty sequence of ints >= 1, got {sizes!r}")
  paths = [p for d in range(1, len(sizes) + 1)
           for p in itertools.product(*(range(s) for s in sizes[:d]))]
  return MedusaTree(tuple(paths))


def tree_from_accuracies(accuracy, num_nodes: int) -> MedusaTree:
  """Medusa's sparse tree (Cai et al. 2024, §2.1.2 / App. C): `accuracy` `[K, R]` is the measured
  probability that head k's rank-r candidate is right; a node's expected acceptance is the product
  of its path's accuracies (heads taken as independent), and nodes are added greedily, always the
  best one adjacent to the tree, until it holds `num_nodes` candidates (root excluded)."""
  acc = np.asarray(accuracy, np.float64)
  if acc.ndim != 2 or acc.size == 0 or not np.all((acc >= 0) & (acc <= 1)):
    raise ValueError(f"accuracy: expected [K, R] probabilities in [0, 1], got shape {acc.shape}")
  if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
    raise ValueError(f"num_nodes: expected an int >= 1, got {num_nodes!r}")
  k, r = acc.shape
  if num_nodes > sum(r ** d for d in range(1, k + 1)):
    raise ValueError(f"num_nodes: {num_nodes} exceeds the {k}-deep, {r}-wide full tree")
  chosen: list[tuple[int, ...]] = []
  frontier = {(j,): acc[0, j] for j in range(r)}
  while len(chosen) < num_nodes:
    path = max(frontier, key=lambda p: (frontier[p], -len(p), tuple(-x for x in p)))
    value = frontier.pop(path)
    chosen.append(path)
    if len(path) < k:
      frontier.update({path + (j,): value * acc[len(path), j] for j in range(r)})
  return MedusaTree(tuple(chosen))


# A small sparse tree for 4 heads (12 candidates), shaped like Medusa's: wider at shallow depths,
# the top-1 chain deepest.
DEFAULT_TREE = MedusaTree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 0, 1),
                           (0, 1, 0), (1, 0, 0), (0, 0, 0, 0)))


def medusa_generate(model, params, heads: MedusaHeads, head_params, prompts, key, *,
                    max_new_tokens: int, tree: MedusaTree = DEFAULT_TREE,
                    sampler: SamplerConfig = sampling.GREEDY, acceptance: str = "exact",
                    typical_epsilon: float = 0.09, typical_delta: float = 0.3,
                    eos_id: int | None = None, prompt_lengths=None, pad_id: int = 0,
                    max_len: int | None = None) -> SpeculativeOutput:
  """Medusa decoding of up to `max_new_tokens` per prompt (module docstring).

  prompts: `[B, T]` right-padded ids with `prompt_lengths` `[B]`, or a list of token lists.
  acceptance: "exact" (lossless: the output is distributed as `generate`'s with `sampler`) or
    "typical" (LOSSY: Medusa's typical acceptance with threshold
    min(typical_epsilon, typical_delta · exp(−H)); the defaults are Medusa's 0.09 and 0.3).
  max_len: the cache size; it must hold the longest prompt + max_new_tokens + the tree's nodes.
  Returns `SpeculativeOutput`: drafted counts the tree's candidate nodes per target call, accepted
  the candidates emitted on the accepted path.
  """
  if not (hasattr(model, "tree_step") and hasattr(model, "commit_path")):
    raise ValueError(f"model: Medusa's tree attention needs a transformer target with tree_step "
                     f"and commit_path; {type(model).__name__} has none")
  checks.check_model("model", model)
  checks.check_params("params", model, params)
  checks.check_key(key)
  if not isinstance(tree, MedusaTree):
    raise TypeError(f"tree: expected a MedusaTree, got {type(tree).__name__}")
  # the tree's n nodes are written past the last kept token: n positions of slack
  prompts, lengths, cap = checks.check_prompts(model, prompts, prompt_lengths,
                                               max_new_tokens=max_new_tokens, eos_id=eos_id,
                                               pad_id=pad_id, max_len=max_len,
                                               extra=tree.num_nodes)
  v = model.vocab_size
  if not isinstance(heads, MedusaHeads):
    raise TypeError(f"heads: expected MedusaHeads, got {type(heads).__name__}")
  if heads.vocab_size != v or heads.config.hidden_size != model.config.hidden_size:
    raise ValueError(f"heads: built for vocabulary {heads.vocab_size} and hidden size "
                     f"{heads.config.hidden_size}, the target has {v} and "
                     f"{model.config.hidden_size}")
  checks.check_params("head_params", heads, head_params, "Medusa heads")
  if tree.depth > heads.num_heads:
    raise ValueError(f"tree: {tree.depth} levels deep, but there are only {heads.num_heads} heads")
  if max(tree.top_k) > v:
    raise ValueError(f"tree: asks for rank {max(tree.top_k) - 1} of a {v}-token vocabulary")
  checks.check_sampler(sampler, v, stateless=True)
  if acceptance not in ACCEPTANCE:
    raise ValueError(f"acceptance: expected one of {ACCEPTANCE}, got {acceptance!r}")
  for name, value, high in (("typical_epsilon", typical_epsilon, 1.0),
                            ("typical_delta", typical_delta, None)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or (
        high is not None and value > high):
      raise ValueError(f"{name}: expected a number in (0, {high or 'inf'}], got {value!r}")
  out = _medusa(model, params, heads, head_params, jnp.asarray(prompts, jnp.int32),
                jnp.asarray(lengths, jnp.int32), key, tree=tree, sampler=sampler,
                acceptance=acceptance, epsilon=float(typical_epsilon),
                delta=float(typical_delta), max_new_tokens=max_new_tokens,
                eos_id=None if eos_id is None else int(eos_id),
                pad_id=int(pad_id), cap=int(cap))
  return jax.block_until_ready(out)


def _candidates(heads, head_params, hidden, tree: MedusaTree):
  """The tree's candidate tokens `[B, n - 1]` from the heads' logits at `hidden` `[B, C]`."""
  logits = heads(head_params, hidden)[:, :tree.depth]  # [B, D, V]
  top = jax.lax.top_k(logits, max(tree.top_k))[1].astype(jnp.int32)  # [B, D, R]
  depths, _ = tree_structure(tree.parents)
  return top[:, depths[1:] - 1, tree.ranks[1:]]


@functools.partial(jax.jit, static_argnames=("model", "heads", "tree", "sampler", "acceptance",
                                             "epsilon", "delta", "max_new_tokens", "eos_id",
                                             "pad_id", "cap"))
def _medusa(model, params, heads, head_params, prompts, lengths, key, *, tree, sampler,
            acceptance, epsilon, delta, max_new_tokens, eos_id, pad_id, cap):
  b = prompts.shape[0]
  rows = jnp.arange(b)
  parents = tree.parents
  n, d_max = tree.num_nodes, tree.depth
  depths, ancestors = (jnp.asarray(a) for a in tree_structure(parents))
  parent_idx = jnp.asarray(np.maximum(np.array(parents), 0))
  path_nodes = jnp.asarray(tree.path_nodes())

  cache = model.init_cache(b, cap)
  logits, hidden, cache = model.prefill(params, prompts, cache, lengths, return_hidden=True)
  # the first token exactly as `generate` draws it (same key, same rule)
  tok, _, _ = sampling.sample_token(sampler, jax.random.fold_in(key, 0), logits[rows, lengths - 1],
                                    {}, None)
  tok = tok.astype(jnp.int32)
  out = jnp.full((b, max_new_tokens + d_max + 1), pad_id, jnp.int32).at[:, 0].set(tok)
  pos = jnp.ones((b,), jnp.int32)
  done = pos >= max_new_tokens
  if eos_id is not None:
    done = done | (tok == eos_id)
  cand = _candidates(heads, head_params, hidden[rows, lengths - 1], tree)
  zeros = jnp.zeros((b,), jnp.int32)

  def cond(carry):
    return ~jnp.all(carry[5])

  def body(carry):
    i, root, cand, cache, out, done, pos, calls, drafted, accepted = carry
    active = ~done
    nodes = jnp.concatenate([root[:, None], cand], axis=1)  # [B, n]
    logits, hidden, cache = model.tree_step(params, nodes, cache, parents, return_hidden=True)
    p = probs(sampler, logits)  # [B, n, V]: what `generate` would draw from after each node
    if sampler.greedy:
      y = jnp.argmax(p, axis=-1).astype(jnp.int32)
    else:
      logp = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
      y = jax.random.categorical(jax.random.fold_in(key, i), logp, axis=-1).astype(jnp.int32)
    if acceptance == "exact":
      ok = nodes == y[:, parent_idx]
    else:  # Medusa's typical acceptance (lossy)
      p_x = jnp.take_along_axis(p[:, parent_idx], nodes[..., None], -1)[..., 0]
      entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
      ok = p_x > jnp.minimum(epsilon, delta * jnp.exp(-entropy))[:, parent_idx]
    ok = ok.at[:, 0].set(True)
    # a node is on an accepted path iff it and all its ancestors are accepted
    on_path = ~jnp.any(ancestors[None] & ~ok[:, None, :], axis=-1)  # [B, n]
    best = jnp.argmax(jnp.where(on_path, depths[None], -1), axis=1)  # first deepest node
    n_acc = depths[best]
    path = path_nodes[best]  # [B, D + 1]
    path_tok = jnp.take_along_axis(nodes, path, axis=1)
    nxt = y[rows, best]
    j = jnp.arange(d_max + 1)[None]
    shifted = jnp.concatenate([path_tok[:, 1:], path_tok[:, :1]], axis=1)
    new = jnp.where(j < n_acc[:, None], shifted, jnp.where(j == n_acc[:, None], nxt[:, None],
                                                           pad_id))
    out, pos, done, _ = append_tokens(out, pos, new, n_acc + 1, done, eos_id)
    done = done | (pos >= max_new_tokens)
    cache = model.commit_path(cache, path, jnp.where(active, n_acc + 1, 0))
    cand = _candidates(heads, head_params, hidden[rows, best], tree)
    act = active.astype(jnp.int32)
    return (i + 1, nxt, cand, cache, out, done, pos, calls + act, drafted + act * (n - 1),
            accepted + act * n_acc)

  carry = (jnp.int32(1), tok, cand, cache, out, done, pos, zeros, zeros, zeros)
  _, _, _, _, out, _, pos, calls, drafted, accepted = jax.lax.while_loop(cond, body, carry)
  return SpeculativeOutput(out[:, :max_new_tokens], jnp.minimum(pos, max_new_tokens), calls,
                           drafted, accepted)
