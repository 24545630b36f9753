"""Low-bit weights and activations for jaxinf models (issue 15); see `jaxinf.quant.base`.

Why jaxinf writes its own, after evaluating qwix 0.1.8 (Google's JAX quantization library) on
JAX 0.10.2 and 0.12: qwix's PTQ (`qwix.quantize_model` with a `PtqProvider`) quantizes our NNX
modules (TransformerLM, DiT) to int8 / fp8 / int4 / nf4 / mxfp4, W8A8 included, by intercepting
`dot_general` inside module calls, and runs jitted. What it does not give us: (1) it works on a
live NNX module; its quantized parameter tree (`{'kernel': {'array': {'qvalue', 'scale'}}}`) is not
our models' tree, so the compiled loops of `generate` / `sample`, which merge a params dict into
the model inside `jit`, refuse it (`check_params`) and the model code would have to change;
(2) 4-bit values are stored one per byte (JAX's `int4` / `float4_e2m1fn` on CPU: 512 bytes for
512 int4 values), so no memory saving at 4 bits; (3) no per-tensor search of the FP split and
bias (LLM-FP4), no learned rounding (AdaRound), no SqueezeLLM. Its integer scale is
absmax / (qmax + 0.5) with the asymmetric code -2^(b-1) reachable; ours is symmetric (module
`formats`). qwix stays an optional test-time reference: `tests/quant/test_qarray.py` checks our
rounding against qwix's stored int8 / int4 / fp8 values given qwix's own scale.
"""

from jaxinf.quant.adaround import (
  AdaRoundConfig,
  AdaRoundResult,
  MatmulRecorder,
  adaround,
  record_matmul_inputs,
)
from jaxinf.quant.base import QuantizedWeight, is_quantized
from jaxinf.quant.formats import (
  FORMATS,
  FloatFormat,
  FloatSearch,
  IntFormat,
  SearchResult,
  get_format,
  search_float_format,
)
from jaxinf.quant.ptq import (
  QuantConfig,
  QuantReport,
  kernel_params,
  param_bytes,
  quantize_params,
)
from jaxinf.quant.qarray import (
  KernelWeight,
  QArray,
  QEmbedding,
  dequantize,
  pack_nibbles,
  quantize,
  quantize_embedding,
  unpack_nibbles,
)
from jaxinf.quant.squeeze import SqueezeWeight, fisher_diagonal, squeeze_params

__all__ = [
  "FORMATS",
  "AdaRoundConfig",
  "AdaRoundResult",
  "FloatFormat",
  "FloatSearch",
  "IntFormat",
  "KernelWeight",
  "MatmulRecorder",
  "QArray",
  "QEmbedding",
  "QuantConfig",
  "QuantReport",
  "QuantizedWeight",
  "SearchResult",
  "SqueezeWeight",
  "adaround",
  "dequantize",
  "fisher_diagonal",
  "get_format",
  "is_quantized",
  "kernel_params",
  "pack_nibbles",
  "param_bytes",
  "quantize",
  "quantize_embedding",
  "quantize_params",
  "record_matmul_inputs",
  "search_float_format",
  "squeeze_params",
  "unpack_nibbles",
]
