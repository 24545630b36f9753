"""Low-bit weights and activations for jaxinf models (issue 15); see `jaxinf.quant.base`."""

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
from jaxinf.quant.ptq import QuantConfig, QuantReport, param_bytes, quantize_params
from jaxinf.quant.qarray import (
  QArray,
  dequantize,
  pack_nibbles,
  quantize,
  unpack_nibbles,
)
from jaxinf.quant.squeeze import SqueezeWeight, fisher_diagonal, squeeze_params

__all__ = [
  "FORMATS", "AdaRoundConfig", "AdaRoundResult", "FloatFormat", "FloatSearch", "IntFormat",
  "MatmulRecorder", "QArray", "QuantConfig", "QuantReport", "QuantizedWeight", "SearchResult",
  "SqueezeWeight", "adaround", "dequantize", "fisher_diagonal", "get_format", "is_quantized",
  "pack_nibbles", "param_bytes", "quantize", "quantize_params", "record_matmul_inputs",
  "search_float_format", "squeeze_params", "unpack_nibbles",
]
