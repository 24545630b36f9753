"""Lightning attention with per-head decay: jaxinf against transformers' MiniMax
(`transformers.models.minimax.modeling_minimax.MiniMaxLightningAttention`), on small random weights.

MiniMax's linear-attention layer is TransNormerLLM's token mixer with three changes: SiLU on q, k
*and* v (one fused qkv projection laid out per head as [q | k | v]); an RMSNorm *with* a weight on
the attention output; a sigmoid output gate from its own projection instead of u. Its lightning
attention is the same recurrence, o_t = q_t S_t with S_t = lambda_h S_{t-1} + k_t^T v_t, computed
in blocks of `block_size` for a prompt and one token at a time with its cache. So the test builds
MiniMax's layer from jaxinf's pieces — `lightning_prefill` (the `lightning_attention` kernel plus the
closed-form state), `lightning_steps` (`lightning_attention_step`) and `srms_norm` — and holds
outputs and the carried state to 1e-4, for a prompt spanning several blocks and then token by token.

Decay convention. MiniMax (`get_slope_rate`): slope_h = 2^(-8(h+1)/H) * (1 - l/(L-1+1e-5) + 1e-5)
and lambda_h = exp(-slope_h) (`ratio = torch.exp(-self.slope_rate)`). TransNormerLLM (ours,
`layer_slopes`): the same ALiBi base 2^(-8(h+1)/H) for a power-of-two H, scaled by
(1 - l/(L-1) + 1e-5): MiniMax puts an extra 1e-5 in the denominator. At l = 0 the two are equal
(factor 1 + 1e-5); elsewhere they differ by l/(L-1) * 1e-5/(L-1) in the factor, which this test
measures and then sidesteps by giving jaxinf's kernel MiniMax's own rate (decay = exp(-slope_rate)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")
from transformers import MiniMaxConfig  # noqa: E402

from jaxinf.models.transnormer import (layer_decay, layer_slopes, lightning_prefill,  # noqa: E402
                                       lightning_steps, srms_norm)

pytestmark = pytest.mark.parity

D, H, HD, L, BLOCK = 32, 4, 8, 4, 4


def _layer(layer_idx: int):
  cfg = MiniMaxConfig(hidden_size=D, num_attention_heads=H, head_dim=HD, num_hidden_layers=L,
                      block_size=BLOCK, hidden_act="silu",
                      layer_types=["linear_attention"] * L)
  torch.manual_seed(layer_idx)
  layer = minimax.MiniMaxLightningAttention(cfg, layer_idx).eval()
  with torch.no_grad():
    for p in layer.parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 1.0) + (1.0 if p.ndim == 1 else 0))
  return layer


def _jaxinf_layer(layer, x, decay, state=None, steps=False):
  """MiniMax's layer from jaxinf's lightning pieces. x: [B, T, D] numpy."""
  w = {k: jnp.asarray(v.detach().numpy()) for k, v in layer.state_dict().items()}
  x = jnp.asarray(x)
  b, t, _ = x.shape
  qkv = jax.nn.silu(x @ w["qkv_proj.weight"].T).reshape(b, t, H, 3 * HD)
  q, k, v = jnp.split(qkv, 3, axis=-1)
  if state is None:
    state = jnp.zeros((b, H, HD, HD), jnp.float32)
  if steps:
    o, states = lightning_steps(q, k, v, decay, state)
    final = states[-1]
  else:
    o, final = lightning_prefill(q, k, v, decay, state, jnp.full((b,), t, jnp.int32), impl="xla")
  o = srms_norm(o.reshape(b, t, H * HD), 1e-6) * w["norm.weight"]
  o = jax.nn.sigmoid(x @ w["output_gate.weight"].T) * o
  return np.asarray(o @ w["out_proj.weight"].T), np.asarray(final)


def test_decay_convention():
  for l in range(L):
    rate = _layer(l).slope_rate.reshape(-1).double().numpy()
    ours = layer_slopes(H, l, L)
    # same ALiBi base; the layer factors differ only by MiniMax's 1e-5 in the denominator
    factors = (1 - l / (L - 1 + 1e-5) + 1e-5) / (1 - l / (L - 1) + 1e-5)
    np.testing.assert_allclose(rate / ours, factors, rtol=1e-6)
  np.testing.assert_allclose(layer_decay(H, 0, L),
                             torch.exp(-_layer(0).slope_rate).reshape(-1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("layer_idx", [0, 2])
def test_prefill_and_decode_match(layer_idx):
  layer = _layer(layer_idx)
  decay = jnp.asarray(torch.exp(-layer.slope_rate).reshape(-1).numpy())
  if layer_idx == 0:  # our own schedule is MiniMax's here (see the module docstring)
    np.testing.assert_allclose(layer_decay(H, 0, L), decay, rtol=1e-6)
  g = torch.Generator().manual_seed(7)
  x = torch.randn(2, 10, D, generator=g)          # 10 tokens = blocks of 4, 4, 2
  new = torch.randn(2, 3, D, generator=g)
  cache = minimax.MiniMaxCache()
  with torch.no_grad():
    want, want_state = layer(x, None, None, cache=cache)
    want_steps = [layer(new[:, i:i + 1], None, None, cache=cache)[0] for i in range(3)]
  got, state = _jaxinf_layer(layer, x.numpy(), decay)
  np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(state, want_state.numpy(), atol=1e-4, rtol=0)
  got_steps, _ = _jaxinf_layer(layer, new.numpy(), decay, state=jnp.asarray(state), steps=True)
  np.testing.assert_allclose(got_steps, torch.cat(want_steps, 1).numpy(), atol=1e-4, rtol=0)
