"""Input checks every decoder shares (`generate`, speculative, lookup / Jacobi, Medusa, EAD,
contrastive, inference-time scaling), run on concrete values before tracing: a bad argument is a
`ValueError`/`TypeError` that names it, never a clipped id or a shape error from inside jit."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinf.config import check_key  # noqa: F401  (re-exported: every decoder imports it here)
from jaxinf.data.tokenizer import pad_batch
from jaxinf.decoding import sampling
from jaxinf.decoding.sampling import SamplerConfig
from pallas_kernels import dispatch


def _is_int(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_prompts(model, prompts, prompt_lengths, *, max_new_tokens: int, eos_id: int | None,
                  pad_id: int, max_len: int | None = None, extra: int = 0,
                  name: str = "prompts", lengths_name: str = "prompt_lengths"):
  """Prompts for `model`: `[B, T]` right-padded ids with `prompt_lengths` `[B]` (default: all T),
  or a list of non-empty token lists. Returns (prompts int32 [B, T], lengths int32 [B], cache
  positions): the longest prompt plus max_new_tokens plus `extra` (the slack a decoder writes past
  the last kept token, e.g. one block of drafts), or `max_len` if given."""
  check_model("model", model)
  if pad_id is None:
    raise ValueError("pad_id: expected an id in the vocabulary, got None")
  if isinstance(prompts, (list, tuple)) and prompt_lengths is None:
    if not prompts or not all(isinstance(p, (list, tuple)) and p for p in prompts):
      raise ValueError(f"{name}: expected a non-empty list of non-empty token lists or an "
                       "[B, T] array")
    prompts, prompt_lengths = pad_batch(prompts, pad_id)
  if not hasattr(prompts, "shape") and not isinstance(prompts, (list, tuple)):
    raise TypeError(f"{name}: expected integer ids [B, T], got {type(prompts).__name__}")
  # Sharded (or large) device prompts stay where they are: their ids are not read here
  # (dispatch.concrete_value's rule), only their shape and dtype; the lengths size the cache, so
  # they must be host-readable.
  values = dispatch.concrete_value(prompts)
  if values is not None or not isinstance(prompts, jax.Array):
    prompts = np.asarray(prompts) if values is None else values
  if (prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer)
      or 0 in prompts.shape):
    raise ValueError(f"{name}: expected integer ids of shape [B, T], got {prompts.dtype} "
                     f"{tuple(prompts.shape)}")
  b, t = prompts.shape
  lengths = (np.full((b,), t, np.int32) if prompt_lengths is None
             else dispatch.concrete_value(prompt_lengths))
  if lengths is None:
    raise TypeError(f"{lengths_name}: expected host-readable lengths (numpy, or a small "
                    f"single-device array): they size the cache")
  if (lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer)
      or lengths.min() < 1 or lengths.max() > t):
    raise ValueError(f"{lengths_name}: expected [{b}] ints in [1, {t}], got {lengths.tolist()}")
  v = model.vocab_size
  valid = np.arange(t)[None] < lengths[:, None]
  bad = (np.zeros(0) if isinstance(prompts, jax.Array)
         else prompts[valid][(prompts[valid] < 0) | (prompts[valid] >= v)])
  if bad.size:
    raise ValueError(f"{name}: token ids {sorted(set(bad.tolist()))[:5]} outside the vocabulary "
                     f"[0, {v})")
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
  for arg, tok in (("eos_id", eos_id), ("pad_id", pad_id)):
    if tok is not None and (not _is_int(tok) or not 0 <= tok < v):
      raise ValueError(f"{arg}: {tok!r} outside the vocabulary [0, {v})")
  need = int(lengths.max()) + max_new_tokens + extra
  cap = max_len if max_len is not None else need
  if not _is_int(cap):
    raise TypeError(f"max_len: expected an int, got {type(max_len).__name__}")
  if need > cap:
    raise ValueError(f"max_len: the longest prompt ({lengths.max()}) plus max_new_tokens "
                     f"({max_new_tokens})" + (f" plus {extra} positions of slack" if extra else "")
                     + f" needs {need} cache positions, max_len is {cap}")
  check_context(name, model, int(cap))
  return prompts.astype(np.int32), lengths.astype(np.int32), int(cap)


_MODEL_METHODS = ("vocab_size", "init_cache", "prefill", "step", "rollback")


def check_model(name: str, model) -> None:
  """`model` is a SequenceModel (`jaxinf.models.functional.SequenceModel`: vocab_size, init_cache,
  prefill, step, rollback), not, say, an untrained module or a params dict passed in its place."""
  missing = [a for a in _MODEL_METHODS if not hasattr(model, a)]
  if missing:
    raise TypeError(f"{name}: expected a SequenceModel (a jaxinf.models family such as "
                    f"TransformerLM), got {type(model).__name__} (no {', '.join(missing)})")
  v = model.vocab_size
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
    raise TypeError(f"{name}: vocab_size must be a positive int, got {v!r}")


def check_params(name: str, model, params, model_name: str = "model") -> None:
  """`params` has `model`'s parameter tree (missing / extra / shape / dtype, by path), when the
  model can say what it expects (`check_params`, every jaxinf family); a tree of another
  structure is refused here rather than as a reshape error deep in the traced model."""
  if params is None:
    raise TypeError(f"{name}: expected the {model_name}'s parameter tree, got None")
  checker = getattr(model, "check_params", None)
  if checker is not None:
    checker(params, name=name)


def check_context(name: str, model, cap: int) -> None:
  """A cache of `cap` positions fits the model's context."""
  if model.max_len is not None and cap > model.max_len:
    raise ValueError(f"{name}: {cap} positions (prompt + max_new_tokens + slack) exceed the "
                     f"model's context of {model.max_len}")


def check_sampler(sampler, vocab_size: int, name: str = "sampler", *,
                  stateless: bool = False) -> None:
  """A SamplerConfig valid for the vocabulary; `stateless=True` (every accelerator that verifies
  a block of tokens at once) also refuses rules whose distribution depends on earlier draws."""
  if not isinstance(sampler, SamplerConfig):
    raise TypeError(f"{name}: expected a SamplerConfig, got {type(sampler).__name__}")
  sampling.check_vocab(sampler, vocab_size)
  if stateless and sampler.mirostat is not None:
    raise ValueError(f"{name}: Mirostat's feedback state changes the distribution within a "
                     "verified block; speculative decoding supports the stateless rules only")
  if stateless and sampler.repetition_penalty is not None:
    raise ValueError(f"{name}: repetition_penalty depends on the tokens accepted within the "
                     "verified block; speculative decoding supports the stateless rules only")


def check_same_vocab(name_a: str, a, name_b: str, b) -> None:
  """Two SequenceModels over one vocabulary (their distributions are compared id by id)."""
  check_model(name_a, a)
  check_model(name_b, b)
  if a.vocab_size != b.vocab_size:
    raise ValueError(f"{name_b}: its vocabulary of {b.vocab_size} ids differs from the "
                     f"{name_a}'s {a.vocab_size}: the two models must share one tokenizer")


def check_block(model, name: str, tokens: int, arg: str):
  """The model to run so that one `step` over `tokens` positions fits the state history it keeps
  for rollback (`max_step`, recurrent families); `arg` names the option that sets the block size.

  A jaxinf family (a frozen dataclass with a `max_step` field) whose history is too short is
  resized: `dataclasses.replace(model, max_step=tokens)` — the parameters do not depend on it,
  only the cache's history axis does, so the output is the same. Any other model with too small a
  `max_step` is refused, naming `arg` and the `max_step` it needs."""
  limit = getattr(model, "max_step", None)
  if limit is None or tokens <= limit:
    return model
  if dataclasses.is_dataclass(model) and "max_step" in {f.name for f in dataclasses.fields(model)}:
    return dataclasses.replace(model, max_step=tokens)
  raise ValueError(f"{arg}: a block of {tokens} tokens per step exceeds the {name}'s "
                   f"max_step={limit} (the state history it keeps for rollback); use a smaller "
                   f"block or build the {name} with max_step >= {tokens}")

