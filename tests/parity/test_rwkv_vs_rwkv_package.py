"""RWKV-7: jaxinf's model (converted from safetensors) against the `rwkv` pip package's RWKV_x070.

The `rwkv` package (`RWKV_V7_ON=1`, strategy `cpu fp32`, no JIT/CUDA) is BlinkDL's own inference
code for the released x070 models. Its loader only reads `.pth`, so the random state dict is also
written with torch.save into a temporary folder for it alone; jaxinf reads the safetensors copy.
Logits must agree to 1e-4 for a whole-sequence forward (jaxinf prefill) and token by token
(jaxinf step), including a step over several tokens.
"""

from __future__ import annotations

import os

os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
rwkv_model = pytest.importorskip("rwkv.model")
safetensors_torch = pytest.importorskip("safetensors.torch")

from jaxinf.checkpoints.rwkv import load_rwkv7, rwkv7_params_from_state_dict  # noqa: E402
from jaxinf.models.rwkv import RWKV7Config  # noqa: E402
from jaxinf.recipes.lm_peers import rwkv_state_dict  # noqa: E402

pytestmark = pytest.mark.parity

V, C, L, H, N, F = 37, 32, 3, 2, 16, 64
CFG = RWKV7Config(vocab_size=V, d_model=C, n_layers=L, head_size=N, d_ffn=F, decay_lora=8,
                  a_lora=6, v_lora=4, gate_lora=10)


def random_state_dict(seed: int = 0) -> dict:
  """An RWKV-LM x070 state dict with random weights of the scale real ones have."""
  return rwkv_state_dict(CFG, seed)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  sd = random_state_dict()
  folder = tmp_path_factory.mktemp("rwkv7")
  torch.save(sd, folder / "model.pth")            # the rwkv package's own format, for it alone
  safetensors_torch.save_file(sd, str(folder / "model.safetensors"))
  ref = rwkv_model.RWKV(model=str(folder / "model"), strategy="cpu fp32")
  model, params = load_rwkv7(folder / "model.safetensors", max_step=4, impl="xla")
  return ref, model, params, sd


TOKENS = [3, 17, 0, 36, 5, 5, 22, 9, 11, 30, 2, 8]


def test_config_inferred(both):
  _, model, _, _ = both
  cfg = model.config
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_size, cfg.ffn_dim) == (
      V, C, L, H, N, F)
  assert (cfg.decay_lora, cfg.a_lora, cfg.v_lora, cfg.gate_lora) == (8, 6, 4, 10)


def test_prefill_matches(both):
  ref, model, params, _ = both
  want, _ = ref.forward(list(TOKENS), None, full_output=True)
  prefill = jax.jit(model.prefill)
  got, _ = prefill(params, jnp.asarray([TOKENS], jnp.int32), model.init_cache(1, 32),
                   jnp.asarray([len(TOKENS)], jnp.int32))
  np.testing.assert_allclose(np.asarray(got[0]), want.numpy(), atol=1e-4, rtol=0)


def test_token_by_token_matches(both):
  ref, model, params, _ = both
  prefill, step = jax.jit(model.prefill), jax.jit(model.step)
  # reference: 4-token prompt, then one token at a time
  want = []
  out, state = ref.forward(TOKENS[:4], None)
  for t in TOKENS[4:]:
    out, state = ref.forward([t], state)
    want.append(out.numpy().copy())
  _, cache = prefill(params, jnp.asarray([TOKENS[:4]], jnp.int32), model.init_cache(1, 32),
                     jnp.asarray([4], jnp.int32))
  got = []
  for t in TOKENS[4:8]:
    logits, cache = step(params, jnp.asarray([[t]], jnp.int32), cache)
    got.append(np.asarray(logits[0, 0]))
  logits, cache = step(params, jnp.asarray([TOKENS[8:12]], jnp.int32), cache)  # k = 4 at once
  got.extend(np.asarray(logits[0]))
  np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-4, rtol=0)


def test_converter_refuses_missing_and_extra_keys(both):
  _, model, _, sd = both
  sd = {k: v.numpy() for k, v in sd.items()}
  bad = dict(sd)
  del bad["blocks.1.att.k_a"]
  bad["blocks.1.att.bogus"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"missing keys \['blocks.1.att.k_a'\].*unexpected keys "
                     r"\['blocks.1.att.bogus'\]"):
    rwkv7_params_from_state_dict(bad, model.config)
  bad = dict(sd, **{"blocks.2.att.r_k": np.zeros((H, N + 1), np.float32)})
  with pytest.raises(ValueError, match="shape mismatches"):
    rwkv7_params_from_state_dict(bad, model.config)
