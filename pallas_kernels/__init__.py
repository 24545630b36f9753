"""Kernels for the four operations jaxinf's models spend their time in.

Each op has one public function with `impl="auto" | "reference" | "xla" | "pallas"` (or an explicit
"pallas_gpu" | "pallas_tpu" form) and
`interpret=False`, and a step form for decoding; `reference` holds the naive oracles.
"""

from __future__ import annotations

from pallas_kernels.attention import AttentionBlocks, attention, attention_step
from pallas_kernels.lightning import LightningBlocks, lightning_attention, lightning_attention_step
from pallas_kernels.selective_scan import (
    SelectiveScanBlocks,
    selective_scan,
    selective_scan_step,
)
from pallas_kernels.wkv import WKVBlocks, wkv7, wkv7_step

__all__ = [
    "AttentionBlocks",
    "LightningBlocks",
    "SelectiveScanBlocks",
    "WKVBlocks",
    "attention",
    "attention_step",
    "lightning_attention",
    "lightning_attention_step",
    "selective_scan",
    "selective_scan_step",
    "wkv7",
    "wkv7_step",
]
