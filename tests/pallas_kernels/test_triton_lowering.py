"""Each Pallas kernel lowers to Triton IR for CUDA, checked on a machine without a GPU.

`jax.export` with `platforms=["cuda"]` runs the Pallas -> Triton lowering (the step that rejects
unsupported primitives, non-power-of-two tiles or a wrong backend) without a GPU. Triton's own
compilation to PTX happens only on a GPU: `experiments/device_check.py` covers that.

The lowering needs a target GPU: JAX 0.10 assumed sm_90 when none was present, JAX 0.12 asks for
an abstract GPU device, which `dispatch.lowering_target("gpu")` supplies on both (an H100, sm_90).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import dispatch
from tests.bad_input import raises_before_tracing

TRITON_CALL = "__gpu$xla.gpu.triton"
B, T, H, D = 1, 200, 2, 64  # T deliberately not a multiple of any block


def lower_for_cuda(fn, *args) -> str:
  # Only the lowering runs on the abstract device: the arguments are made before (new JAX refuses
  # eager array operations while only an abstract mesh is set).
  with dispatch.lowering_target("gpu"):
    exported = export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
  return exported.mlir_module()


def module(name):
  # `pallas_kernels.attention` is also the name of the public function, so import the module.
  return importlib.import_module(f"pallas_kernels.{name}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("kernel", ["flash", "lightning", "selective_scan", "wkv7"])
def test_kernel_lowers_to_triton(kernel, dtype):
  x = jnp.ones((B, T, H, D), dtype)
  if kernel == "flash":
    limits = jnp.full((B, T), T, jnp.int32)
    blocks = module("attention").AttentionBlocks()  # the default tiles, and the lse output
    fn = lambda q, k, v: module("attention")._attention_pallas(
        q, k, v, limits, scale=0.1, block_q=blocks.block_q, block_k=blocks.block_k,
        interpret=False, return_lse=True)
    args = (x, x[:, :, :1], x[:, :, :1])  # GQA: one KV head
  elif kernel == "lightning":
    fn = lambda q, k, v: module("lightning")._lightning_pallas(
        q, k, v, jnp.log(jnp.asarray([0.9, 0.99])), jnp.zeros((B, H, D, D)), chunk=64,
        block_v=64, interpret=False)
    args = (x, x, x)
  elif kernel == "selective_scan":
    u = jnp.ones((B, T, 96), dtype)  # 96 channels in 2 groups: padding inside each group
    bc = jnp.ones((B, T, 2, 16), dtype)
    fn = lambda u, delta, z, B_, C_: module("selective_scan")._selective_scan_pallas(
        u, delta, -jnp.ones((96, 16)), B_, C_, jnp.ones(96), z, jnp.zeros(96),
        jnp.zeros((1, 96, 16)), delta_softplus=True, block_d=64, interpret=False)
    args = (u, u, u, bc, bc)
  else:
    fn = lambda *xs: module("wkv")._wkv7_pallas(*xs, jnp.zeros((B, H, D, D)), block_v=32,
                                                interpret=False)
    args = (x,) * 6
  assert TRITON_CALL in lower_for_cuda(fn, *args)


def test_lowering_target_restores_the_context_and_names_bad_arguments():
  with dispatch.lowering_target("gpu"):
    assert jax.sharding.get_abstract_mesh().abstract_device.device_kind == "NVIDIA H100"
  assert jax.sharding.get_abstract_mesh().abstract_device is None
  assert float(jnp.ones(3).sum()) == 3.0  # eager operations work again afterwards
  with raises_before_tracing(ValueError, "platform"):
    with dispatch.lowering_target("cuda"):
      pass
  with raises_before_tracing(ValueError, "device_kind"):
    with dispatch.lowering_target("gpu", ""):
      pass
  with raises_before_tracing(ValueError, "num_cores"):
    with dispatch.lowering_target("tpu", num_cores=0):
      pass
