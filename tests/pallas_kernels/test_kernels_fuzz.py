"""Hypothesis fuzz of every public kernel (issue 12): a named error, or well-formed output.

For each of `attention`, `attention_step`, `lightning_attention`, `lightning_attention_step`,
`selective_scan`, `selective_scan_step`, `wkv7` and `wkv7_step` a request is drawn as a handful
of labels, each valid most of the time so that a good share of requests run:

* shape: the kernel's one valid shape, or one argument with an axis dropped / added / grown by
  one / set to zero, a zero batch (every batched argument) or a zero time axis;
* dtype: float32 / bfloat16 / float16 for every argument, float64 numpy arrays for every
  argument, or one argument int32 / complex64 / float64 / bfloat16 / a Python list;
* values: normal draws inside the documented domain, NaN or inf injected into one argument, and
  for the decays (lightning's `decay`, RWKV-7's `w`) values > 1, negative, 0, subnormal or 1;
* impl: "reference", "xla", "pallas" with interpret=True, "auto", "bogus", "pallas" and
  "pallas_tpu" without interpret (refused on CPU), a non-bool interpret;
* blocks: default, small valid ones, invalid ones (zero / negative / non-power-of-two sizes,
  unknown forms) and a non-blocks object;
* per-op options (attention's causal / scale / kv_lengths / q_offsets / return_lse, the step's
  lengths, selective scan's delta_softplus and optional arguments, initial states).

The outcome must be one of: a ValueError/TypeError whose message starts with the name of one of
the function's arguments ("q must ...", "blocks.xla_chunk must ...", "impl='pallas' ..."), or
output of the documented shapes in the documented dtype (the input's dtype, canonicalised: a
float64 numpy input gives float32 output without x64), finite whenever every input was finite and
inside its documented domain. The hot path is documented unchecked for values (only a concrete
decay's domain is checked), so NaN/inf inputs may give non-finite output; nothing is asserted
about those values. A request whose labels are all valid must run; one with a label that the
docstrings rule out (wrong rank, mismatched dims, integer or complex dtypes, a decay outside
(0, 1], a bogus impl or block size) must be refused. One valid shape per kernel and mostly
float32 keep the number of distinct compilations small.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pallas_kernels import (
  AttentionBlocks,
  LightningBlocks,
  SelectiveScanBlocks,
  WKVBlocks,
  attention,
  attention_step,
  lightning_attention,
  lightning_attention_step,
  selective_scan,
  selective_scan_step,
  wkv7,
  wkv7_step,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
STEP_SETTINGS = settings(SETTINGS, max_examples=120)  # one plain jnp step: cheap to compile


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One public kernel as the fuzz sees it.

  `arrays(rng)` gives the valid inputs by name (float64 numpy, cast later); `batched` names the
  arrays whose axis 0 is the batch, `timed` those whose axis 1 is time (empty for step forms);
  `decays` the arrays whose domain is (0, 1]; `ints` integer arrays (lengths) that keep their
  dtype; `options` maps an option label to (keyword arguments, valid?); `call(arrays, **kw)`
  calls the kernel; `shapes(arrays, options)` gives the expected output shapes (first one in the
  input's dtype, the rest as `out_dtypes`)."""

  fn: Callable
  arrays: Callable[[np.random.Generator], dict]
  batched: tuple[str, ...]
  timed: tuple[str, ...]
  decays: tuple[str, ...]
  ints: tuple[str, ...]
  options: dict
  blocks: dict
  call: Callable
  shapes: Callable
  params: tuple[str, ...]


B, T, H, DK, DV = 2, 8, 2, 8, 6


def _normal(rng, *shape, scale=1.0):
  return scale * rng.standard_normal(shape)


# ---------------------------------------------------------------------------------- attention

def _attention_arrays(rng):
  return {"q": _normal(rng, B, T, 4, DK), "k": _normal(rng, B, T, 2, DK),
          "v": _normal(rng, B, T, 2, DV)}


ATTENTION_OPTIONS = {
    "causal": (dict(causal=True), True),
    "ragged+lse": (dict(causal=True, kv_lengths=np.array([5, 8], np.int32),
                        q_offsets=np.array([0, 0], np.int32), return_lse=True), True),
    "empty row": (dict(kv_lengths=np.array([0, 8], np.int32), scale=0.3), True),
    "scale 0": (dict(scale=0.0), False),
    "scale nan": (dict(scale=float("nan")), False),
    "scale -1": (dict(scale=-1.0), False),
    "scale bool": (dict(scale=True), False),
    "scale str": (dict(scale="0.5"), False),
    "scale vector": (dict(scale=np.array([0.5, 0.5])), False),
    "kv_lengths > Tk": (dict(kv_lengths=np.array([T + 1, 1], np.int32)), False),
    "kv_lengths < 0": (dict(kv_lengths=np.array([-1, 1], np.int32)), False),
    "kv_lengths float": (dict(kv_lengths=np.array([1.0, 2.0])), False),
    "kv_lengths [3]": (dict(kv_lengths=np.array([1, 2, 3], np.int32)), False),
    "kv_lengths list": (dict(kv_lengths=[1, 2]), False),
    "q_offsets < 0": (dict(causal=True, q_offsets=np.array([-1, 0], np.int32)), False),
    "causal int": (dict(causal=1), False),
    "return_lse str": (dict(return_lse="yes"), False),
}


def _attention_shapes(a, kw):
  out = (a["q"].shape[0], a["q"].shape[1], a["q"].shape[2], a["v"].shape[3])
  return [out, out[:1] + (out[2], out[1])] if kw.get("return_lse") else [out]


def _attention_step_arrays(rng):
  return {"q": _normal(rng, B, 1, 4, DK), "k_cache": _normal(rng, B, T, 2, DK),
          "v_cache": _normal(rng, B, T, 2, DV), "lengths": np.array([5, T], np.int32)}


STEP_OPTIONS = {
    "plain": (dict(), True),
    "lse": (dict(return_lse=True, scale=0.3), True),
    "lengths < K": (dict(lengths=np.array([0, T], np.int32)), False),
    "lengths > S": (dict(lengths=np.array([T + 1, T], np.int32)), False),
    "lengths float": (dict(lengths=np.array([5.0, 8.0])), False),
    "lengths None": (dict(lengths=None), False),
    "scale inf": (dict(scale=float("inf")), False),
}


def _attention_step_call(a, **kw):
  lengths = kw.pop("lengths", a["lengths"])
  return attention_step(a["q"], a["k_cache"], a["v_cache"], lengths, **kw)


def _step_shapes(a, kw):
  out = (a["q"].shape[0], a["q"].shape[1], a["q"].shape[2], a["v_cache"].shape[3])
  return [out, out[:1] + (out[2], out[1])] if kw.get("return_lse") else [out]


ATTENTION_BLOCKS = {
    "default": (AttentionBlocks(), True),
    "small": (AttentionBlocks(block_q=16, block_k=16, xla_chunk=3), True),
    "block_q 24": (AttentionBlocks(block_q=24), None),   # refused by the pallas form only
    "xla_chunk 0": (AttentionBlocks(xla_chunk=0), None),  # refused by the xla form only
    "not blocks": ({"block_q": 16}, False),
}

# ---------------------------------------------------------------------------------- lightning

def _lightning_arrays(rng):
  return {"q": _normal(rng, B, T, H, DK, scale=0.5), "k": _normal(rng, B, T, H, DK, scale=0.5),
          "v": _normal(rng, B, T, H, DV), "decay": np.array([0.9, 0.5])}


STATE_OPTIONS = {
    "plain": (dict(), True),
    "state": (dict(return_final_state=True, initial_state="zeros"), True),
    "state wrong shape": (dict(initial_state="wrong"), False),
    "state int": (dict(initial_state="int"), False),
}


def _initial_state(kw, shape):
  """Replaces the option's placeholder by an array of the state's `shape`."""
  kind = kw.get("initial_state")
  if kind is None:
    return kw
  kw = dict(kw)
  kw["initial_state"] = {"zeros": np.full(shape, 0.1, np.float32),
                         "wrong": np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32),
                         "int": np.zeros(shape, np.int32)}[kind]
  return kw


def _lightning_call(a, **kw):
  kw = _initial_state(kw, (B, H, DK, DV))
  return lightning_attention(a["q"], a["k"], a["v"], a["decay"], **kw)


def _lightning_shapes(a, kw):
  out = a["v"].shape
  state = (out[0], out[2], a["q"].shape[3], out[3])
  return [out, state] if kw.get("return_final_state") else [out]


LIGHTNING_BLOCKS = {
    "default": (LightningBlocks(), True),
    "small": (LightningBlocks(chunk=16, block_v=16, xla_chunk=3), True),
    "xla_chunk 0": (LightningBlocks(xla_chunk=0), None),
    "xla_chunk -2": (LightningBlocks(xla_chunk=-2), None),
    "chunk 0": (LightningBlocks(chunk=0, block_v=0), None),
    "not blocks": (None, False),
}


def _lightning_step_arrays(rng):
  return {"q": _normal(rng, B, H, DK, scale=0.5), "k": _normal(rng, B, H, DK, scale=0.5),
          "v": _normal(rng, B, H, DV), "decay": np.array([0.9, 0.5]),
          "state": _normal(rng, B, H, DK, DV, scale=0.1)}


def _lightning_step_call(a, **kw):
  return lightning_attention_step(a["q"], a["k"], a["v"], a["decay"], a["state"], **kw)


def _pair_shapes(out_key, state_key):
  """A step's (output shaped like `out_key`, new state shaped like `state_key`)."""
  return lambda a, kw: [a[out_key].shape, a[state_key].shape]

# ----------------------------------------------------------------------------- selective scan

CH, N = 4, 3


def _scan_arrays(rng):
  return {"u": _normal(rng, B, T, CH), "delta": np.abs(_normal(rng, B, T, CH, scale=0.3)),
          "A": -np.exp(_normal(rng, CH, N, scale=0.5)), "B": _normal(rng, B, T, N),
          "C": _normal(rng, B, T, N), "D": _normal(rng, CH), "z": _normal(rng, B, T, CH)}


SCAN_OPTIONS = {
    "plain": (dict(), True),
    "softplus+bias+state": (dict(delta_softplus=True, delta_bias="bias", initial_state="zeros",
                                 return_final_state=True), True),
    "softplus int": (dict(delta_softplus=1), False),
    "bias wrong shape": (dict(delta_bias="wrong"), False),
    "state wrong shape": (dict(initial_state="wrong"), False),
}


def _scan_kwargs(kw, state_shape):
  kw = dict(kw)
  if kw.get("delta_bias") == "bias":
    kw["delta_bias"] = np.full((CH,), -1.0, np.float32)
  elif kw.get("delta_bias") == "wrong":
    kw["delta_bias"] = np.zeros((CH + 1,), np.float32)
  return _initial_state(kw, state_shape)


def _scan_call(a, **kw):
  kw = _scan_kwargs(kw, (B, CH, N))
  return selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], **kw)


def _scan_shapes(a, kw):
  out = a["u"].shape
  return [out, (out[0], out[2], a["A"].shape[1])] if kw.get("return_final_state") else [out]


SCAN_BLOCKS = {
    "default": (SelectiveScanBlocks(), True),
    "small": (SelectiveScanBlocks(block_d=2, xla_chunk=3, xla_inner="associative"), True),
    "xla_inner bogus": (SelectiveScanBlocks(xla_inner="bogus"), False),
    "xla_chunk 0": (SelectiveScanBlocks(xla_chunk=0), None),
    "xla_chunk -1": (SelectiveScanBlocks(xla_chunk=-1), None),
    "not blocks": ("blocks", False),
}


def _scan_step_arrays(rng):
  return {"u": _normal(rng, B, CH), "delta": np.abs(_normal(rng, B, CH, scale=0.3)),
          "A": -np.exp(_normal(rng, CH, N, scale=0.5)), "B": _normal(rng, B, N),
          "C": _normal(rng, B, N), "D": _normal(rng, CH), "z": _normal(rng, B, CH),
          "state": _normal(rng, B, CH, N, scale=0.1)}


SCAN_STEP_OPTIONS = {
    "plain": (dict(), True),
    "softplus+bias": (dict(delta_softplus=True, delta_bias="bias"), True),
    "softplus str": (dict(delta_softplus="yes"), False),
    "bias wrong shape": (dict(delta_bias="wrong"), False),
}


def _scan_step_call(a, **kw):
  kw = _scan_kwargs(kw, (B, CH, N))
  return selective_scan_step(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                             state=a["state"], **kw)

# ----------------------------------------------------------------------------------- RWKV-7

def _wkv_arrays(rng):
  return {"r": _normal(rng, B, T, H, DK), "w": rng.uniform(0.5, 1.0, (B, T, H, DK)),
          "k": _normal(rng, B, T, H, DK, scale=0.3), "v": _normal(rng, B, T, H, DV),
          "a": _normal(rng, B, T, H, DK, scale=0.1), "b": _normal(rng, B, T, H, DK, scale=0.1)}


def _wkv_call(a, **kw):
  kw = _initial_state(kw, (B, H, DV, DK))
  return wkv7(a["r"], a["w"], a["k"], a["v"], a["a"], a["b"], **kw)


def _wkv_shapes(a, kw):
  out = a["v"].shape
  state = (out[0], out[2], out[3], a["r"].shape[3])
  return [out, state] if kw.get("return_final_state") else [out]


WKV_BLOCKS = {
    "default": (WKVBlocks(), True),
    "small": (WKVBlocks(block_v=2, xla_chunk=3, xla_form="chunked"), True),
    "xla_form bogus": (WKVBlocks(xla_form="bogus"), False),
    "chunked xla_chunk 0": (WKVBlocks(xla_chunk=0, xla_form="chunked"), None),
    "block_v -4": (WKVBlocks(block_v=-4), None),
    "not blocks": (LightningBlocks(), False),
}


def _wkv_step_arrays(rng):
  return {"r": _normal(rng, B, H, DK), "w": rng.uniform(0.5, 1.0, (B, H, DK)),
          "k": _normal(rng, B, H, DK, scale=0.3), "v": _normal(rng, B, H, DV),
          "a": _normal(rng, B, H, DK, scale=0.1), "b": _normal(rng, B, H, DK, scale=0.1),
          "state": _normal(rng, B, H, DV, DK, scale=0.1)}


def _wkv_step_call(a, **kw):
  return wkv7_step(a["r"], a["w"], a["k"], a["v"], a["a"], a["b"], a["state"], **kw)


NO_OPTIONS = {"plain": (dict(), True)}
NO_BLOCKS = {"default": (None, True)}

KERNELS = {
    "attention": Kernel(
        attention, _attention_arrays, ("q", "k", "v"), ("q", "k", "v"), (), (), ATTENTION_OPTIONS,
        ATTENTION_BLOCKS, lambda a, **kw: attention(a["q"], a["k"], a["v"], **kw),
        _attention_shapes, ("q", "k", "v", "causal", "scale", "kv_lengths", "q_offsets", "impl",
                            "interpret", "blocks", "return_lse")),
    "attention_step": Kernel(
        attention_step, _attention_step_arrays, ("q", "k_cache", "v_cache", "lengths"), (), (),
        ("lengths",), STEP_OPTIONS, ATTENTION_BLOCKS, _attention_step_call, _step_shapes,
        ("q", "k_cache", "v_cache", "lengths", "scale", "impl", "interpret", "blocks",
         "return_lse")),
    "lightning_attention": Kernel(
        lightning_attention, _lightning_arrays, ("q", "k", "v"), ("q", "k", "v"), ("decay",), (),
        STATE_OPTIONS, LIGHTNING_BLOCKS, _lightning_call, _lightning_shapes,
        ("q", "k", "v", "decay", "initial_state", "return_final_state", "impl", "interpret",
         "blocks")),
    "lightning_attention_step": Kernel(
        lightning_attention_step, _lightning_step_arrays, ("q", "k", "v", "state"), (),
        ("decay",), (), NO_OPTIONS, NO_BLOCKS, _lightning_step_call, _pair_shapes("v", "state"),
        ("q", "k", "v", "decay", "state", "impl", "interpret")),
    "selective_scan": Kernel(
        selective_scan, _scan_arrays, ("u", "delta", "B", "C", "z"), ("u", "delta", "B", "C", "z"),
        (), (), SCAN_OPTIONS, SCAN_BLOCKS, _scan_call, _scan_shapes,
        ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "initial_state",
         "return_final_state", "impl", "interpret", "blocks")),
    "selective_scan_step": Kernel(
        selective_scan_step, _scan_step_arrays, ("u", "delta", "B", "C", "z", "state"), (), (),
        (), SCAN_STEP_OPTIONS, NO_BLOCKS, _scan_step_call, _pair_shapes("u", "state"),
        ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state", "delta_softplus", "impl",
         "interpret")),
    "wkv7": Kernel(
        wkv7, _wkv_arrays, ("r", "w", "k", "v", "a", "b"), ("r", "w", "k", "v", "a", "b"), ("w",),
        (), STATE_OPTIONS, WKV_BLOCKS, _wkv_call, _wkv_shapes,
        ("r", "w", "k", "v", "a", "b", "initial_state", "return_final_state", "impl", "interpret",
         "blocks")),
    "wkv7_step": Kernel(
        wkv7_step, _wkv_step_arrays, ("r", "w", "k", "v", "a", "b", "state"), (), ("w",), (),
        NO_OPTIONS, NO_BLOCKS, _wkv_step_call, _pair_shapes("v", "state"),
        ("r", "w", "k", "v", "a", "b", "state", "impl", "interpret")),
}

# ------------------------------------------------------------------------------------ labels

VALID_DTYPES = ["float32", "float32", "float32", "bfloat16"]
DTYPES = ["float32", "bfloat16", "float16", "float64 numpy", "int32 one", "complex64 one",
          "float64 one", "bfloat16 one", "list one"]
VALID_VALUES = ["normal"]  # (and "decay subnormal", "decay 1": valid, drawn with the faults)
VALUES = ["normal", "nan one", "inf one", "decay > 1", "decay < 0", "decay 0",
          "decay subnormal", "decay 1"]
IMPLS = {
    "reference": (dict(impl="reference"), True),
    "xla": (dict(impl="xla"), True),
    "pallas": (dict(impl="pallas", interpret=True), True),
    "auto": (dict(), True),
    "bogus": (dict(impl="bogus"), False),
    "pallas compiled": (dict(impl="pallas"), False),  # CPU: needs interpret=True
    "pallas_tpu compiled": (dict(impl="pallas_tpu"), False),
    "interpret str": (dict(impl="xla", interpret="yes"), False),
}
VALID_IMPLS = ["reference", "xla", "pallas", "auto"]
SHAPES = ["valid", "drop axis", "add axis", "grow axis", "zero axis", "zero batch",
          "zero channels", "zero time"]


def _pick(draw, faulty, good, every):
  return draw(st.sampled_from(every if faulty else good))


@st.composite
def requests(draw, name):
  """(shape, arg, dtype, values, impl, blocks, option) labels. Most requests have no faulty
  label (valid labels vary among themselves), the rest one or two, so a good share runs."""
  kernel = KERNELS[name]
  arg_names = sorted(kernel.arrays(np.random.default_rng(0)))
  faults = draw(st.sampled_from([0, 0, 1, 1, 1, 2]))
  dims = ("shape", "dtype", "values", "impl", "blocks", "option")
  faulty = set(draw(st.permutations(dims))[:faults])
  shapes = SHAPES if kernel.timed else [s for s in SHAPES if s != "zero time"]
  values = VALUES if kernel.decays else [v for v in VALUES if not v.startswith("decay")]
  good_blocks = [k for k, (_, ok) in kernel.blocks.items() if ok]
  return (_pick(draw, "shape" in faulty, ["valid"], shapes),
          draw(st.sampled_from(arg_names)),
          _pick(draw, "dtype" in faulty, VALID_DTYPES, DTYPES),
          _pick(draw, "values" in faulty, VALID_VALUES, values),
          _pick(draw, "impl" in faulty, VALID_IMPLS, sorted(IMPLS)),
          _pick(draw, "blocks" in faulty, good_blocks, sorted(kernel.blocks)),
          _pick(draw, "option" in faulty, [k for k, (_, ok) in kernel.options.items() if ok],
                sorted(kernel.options)))


def _named(params):
  """A message that starts with one of `params` (then a space, '.', '=', ',', ':' or '[')."""
  names = "|".join(sorted(params, key=len, reverse=True))
  return re.compile(rf"^({names})[ .=,:\[]")


# Arguments whose last axis (Dv) no other argument has to match (unless a state is passed).
FREE_LAST = {("attention", "v"), ("attention_step", "v_cache"), ("lightning_attention", "v"),
             ("wkv7", "v")}


def _build(name, kernel, shape_kind, arg, dtype_kind, value_kind):
  """The inputs by name, and whether the request is expected to be valid (True), refused
  (False) or either (None), and whether every input is finite and in domain."""
  arrays = kernel.arrays(np.random.default_rng(0))
  verdict, clean = True, True
  # shapes
  if shape_kind == "drop axis":
    arrays[arg] = arrays[arg][..., 0]
    verdict = False
  elif shape_kind == "add axis":
    arrays[arg] = arrays[arg][..., None]
    verdict = False
  elif shape_kind == "grow axis":
    x = arrays[arg]
    arrays[arg] = np.concatenate([x, x[..., :1]], axis=-1)
    verdict = None if (name, arg) in FREE_LAST else False
  elif shape_kind == "zero axis":
    arrays[arg] = arrays[arg][..., :0]
    verdict = None if (name, arg) in FREE_LAST else False
  elif shape_kind == "zero batch":
    for n in kernel.batched:
      arrays[n] = arrays[n][:0]
    verdict = None  # an empty batch: a named refusal or empty output
  elif shape_kind == "zero channels":
    for n in arrays:
      if arrays[n].ndim >= 2 or n not in kernel.ints:
        arrays[n] = arrays[n][..., :0]
    verdict = None  # every last axis empty (head dims, channels, decays): refused or empty
  elif shape_kind == "zero time":
    if not kernel.timed:
      return None
    for n in kernel.timed:
      arrays[n] = arrays[n][:, :0]
    verdict = False  # documented: at least one position
  # values (before the dtype cast, so a cast may move a decay in or out of the domain)
  decays = [n for n in kernel.decays if arrays[n].size]
  if value_kind in ("nan one", "inf one"):
    if arrays[arg].size and arg not in kernel.ints:
      arrays[arg] = arrays[arg].copy()
      arrays[arg].flat[0] = np.nan if value_kind == "nan one" else np.inf
      clean = False
  elif value_kind.startswith("decay"):
    if not decays:
      return None
    new = {"decay > 1": 1.5, "decay < 0": -0.5, "decay 0": 0.0, "decay subnormal": 1e-40,
           "decay 1": 1.0}[value_kind]
    arrays[decays[0]] = arrays[decays[0]].copy()
    arrays[decays[0]].flat[0] = new
  # dtypes
  floats = [n for n in arrays if n not in kernel.ints]
  if dtype_kind in ("float32", "bfloat16", "float16"):
    arrays.update({n: jnp.asarray(arrays[n], dtype_kind) for n in floats})
  elif dtype_kind == "float64 numpy":
    pass  # float64 numpy, every floating argument
  else:
    cast, _ = dtype_kind.split(" ")
    arrays.update({n: jnp.asarray(arrays[n], jnp.float32) for n in floats})
    if arg in kernel.ints:
      arg = floats[0]
    if cast == "list":
      arrays[arg] = np.asarray(arrays[arg]).tolist()
      verdict = False
    elif cast in ("int32", "complex64"):
      arrays[arg] = np.asarray(arrays[arg]).astype(cast)
      verdict = False
    else:
      arrays[arg] = (np.asarray(arrays[arg], np.float64) if cast == "float64"
                     else jnp.asarray(arrays[arg], cast))
      verdict = verdict if verdict is False else None  # a lone other float: refused or run
  for n in kernel.decays:
    if n in arrays and hasattr(arrays[n], "dtype") and jnp.issubdtype(arrays[n].dtype,
                                                                      jnp.floating):
      value = np.asarray(arrays[n], np.float64)
      if not np.isfinite(value).all():
        verdict = verdict if verdict is False else None  # a NaN decay may be refused as such
      elif value.size and not ((value > 0) & (value <= 1)).all():
        verdict = False  # documented domain (0, 1], checked when the decay is concrete
  return arrays, verdict, clean


def _run(name, request):
  kernel = KERNELS[name]
  shape_kind, arg, dtype_kind, value_kind, impl_kind, blocks_kind, option_kind = request
  built = _build(name, kernel, shape_kind, arg, dtype_kind, value_kind)
  if built is None:
    event("label does not apply")
    return
  arrays, verdict, clean = built
  impl_kw, impl_ok = IMPLS[impl_kind]
  blocks, blocks_ok = kernel.blocks[blocks_kind]
  option_kw, option_ok = kernel.options[option_kind]
  kw = dict(impl_kw, **option_kw)
  if kernel.blocks is not NO_BLOCKS:
    kw["blocks"] = blocks
  if blocks_ok is None:
    blocks_ok = impl_kind in ("reference",)  # only the forms that do not read it accept it
    blocks_ok = None if not blocks_ok else True
  for ok in (impl_ok, blocks_ok, option_ok):
    if ok is False:
      verdict = False
    elif ok is None and verdict is True:
      verdict = None
  try:
    outs = kernel.call(arrays, **kw)
  except (TypeError, ValueError) as e:
    message = str(e)
    head = re.split(r"[ .=:\[]", message)[0]
    event(f"{name} refused: {head}")
    assert _named(kernel.params).match(message), (
        f"{name}: unnamed {type(e).__name__} for {request}: {message}")
    assert verdict is not True, f"{name}: refused a valid request {request}: {message}"
    return
  event(f"{name} ran")
  assert verdict is not False, f"{name}: accepted {request}"
  outs = list(outs) if isinstance(outs, tuple) else [outs]
  expected = kernel.shapes(arrays, dict(option_kw))
  assert [tuple(o.shape) for o in outs] == [tuple(s) for s in expected], (outs, request)
  first = next(iter(arrays.values()))
  assert outs[0].dtype == jax.dtypes.canonicalize_dtype(first.dtype), (outs[0].dtype, request)
  for extra in outs[1:]:
    assert extra.dtype == jnp.float32, (extra.dtype, request)
  if clean:
    values = [np.asarray(o, np.float32) for o in outs]
    assert np.isfinite(values[0]).all(), f"{name}: non-finite output from clean input {request}"
    for extra in values[1:]:  # a query that sees no key has lse = -inf (documented)
      assert not np.isnan(extra).any() and not (extra == np.inf).any(), request


VALID = ("valid", "q", "float32", "normal")


@SETTINGS
@given(requests("attention"))
@example((*VALID, "xla", "default", "causal"))
@example((*VALID, "pallas", "small", "ragged+lse"))
@example((*VALID, "reference", "default", "empty row"))
@example(("zero channels", "q", "float32", "normal", "xla", "default", "causal"))  # was a crash
def test_attention(request):
  _run("attention", request)


@SETTINGS
@given(requests("attention_step"))
@example((*VALID, "xla", "default", "plain"))
@example((*VALID, "pallas", "default", "lse"))
@example((*VALID, "xla", "default", "lengths > S"))  # was refused as "kv_lengths"
def test_attention_step(request):
  _run("attention_step", request)


@SETTINGS
@given(requests("lightning_attention"))
@example((*VALID, "xla", "default", "plain"))
@example(("valid", "decay", "float32", "decay subnormal", "pallas", "small", "state"))
@example(("valid", "decay", "bfloat16", "decay > 1", "xla", "default", "plain"))  # was accepted
@example((*VALID, "xla", "xla_chunk 0", "plain"))  # was a ZeroDivisionError
@example((*VALID, "xla", "not blocks", "plain"))  # was an AttributeError
def test_lightning_attention(request):
  _run("lightning_attention", request)


@STEP_SETTINGS
@given(requests("lightning_attention_step"))
@example((*VALID, "xla", "default", "plain"))
def test_lightning_attention_step(request):
  _run("lightning_attention_step", request)


@SETTINGS
@given(requests("selective_scan"))
@example(("valid", "u", "float32", "normal", "xla", "default", "plain"))
@example(("valid", "u", "float32", "normal", "pallas", "small", "softplus+bias+state"))
@example(("valid", "u", "float32", "normal", "xla", "xla_chunk 0", "plain"))  # was a crash
@example(("valid", "u", "float32", "normal", "xla", "not blocks", "plain"))  # was a crash
def test_selective_scan(request):
  _run("selective_scan", request)


@STEP_SETTINGS
@given(requests("selective_scan_step"))
@example(("valid", "u", "float32", "normal", "xla", "default", "plain"))
def test_selective_scan_step(request):
  _run("selective_scan_step", request)


@SETTINGS
@given(requests("wkv7"))
@example(("valid", "r", "float32", "normal", "xla", "default", "plain"))
@example(("valid", "w", "float32", "decay subnormal", "pallas", "small", "state"))
@example(("valid", "w", "bfloat16", "decay < 0", "reference", "default", "plain"))  # was accepted
@example(("valid", "r", "float32", "normal", "xla", "chunked xla_chunk 0", "plain"))  # a crash
def test_wkv7(request):
  _run("wkv7", request)


@STEP_SETTINGS
@given(requests("wkv7_step"))
@example(("valid", "r", "float32", "normal", "xla", "default", "plain"))
def test_wkv7_step(request):
  _run("wkv7_step", request)
