"""TransNormerLLM: jaxinf (converted from safetensors) against the authors' released model code.

That code (OpenNLPLab's `modeling_transnormer.py`, with `norm.py`/`utils.py`) ships inside the
checkpoint folders on the model hub, not in a package, and nothing can be downloaded here. So this
test carries an independent torch transcription of it — read from the released file, not from
jaxinf — with the release's module names (`model.embed_tokens`, `model.layers.N.token_mixer.
{qkvu_proj,out_proj,lrpe.theta}`, `model.layers.N.channel_mixer.l{1,2,3}`, `lm_head`), so its
`state_dict()` is the release's and goes through jaxinf's converter. It computes a prompt with the
release's *quadratic* path (`linear_attention` with the mask exp(slope * -(i - j)) of
`_prepare_decoder_linear_attn_mask`) and decodes with the release's recurrent `inference` branch
(kv = exp(-slope) kv + k^T v, LRPE offset = tokens seen), so neither of jaxinf's code paths
(chunked kernel + closed-form state; step) is mirrored by the oracle. Slopes are the release's
`_build_slope_tensor` times (1 - l/(L-1) + 1e-5); embeddings are scaled by sqrt(d)
(`no_scale_embedding=False`); LRPE is on in layer 0 only. Logits agree to 1e-4.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn, F = torch.nn, torch.nn.functional

from jaxinf.checkpoints.transnormer import (load_transnormer,  # noqa: E402
                                            transnormer_config_from_hf,
                                            transnormer_params_from_state_dict)

pytestmark = pytest.mark.parity

HF_CONFIG = dict(vocab_size=45, decoder_embed_dim=32, decoder_layers=3, decoder_attention_heads=4,
                 hidden_dim=32, glu_dim=48, linear_use_lrpe_list=[1, 0, 0],
                 no_scale_embedding=False, norm_type="simplermsnorm", linear_act_fun="silu",
                 bias=False)


def release_slopes(n):
  def power_of_2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(n).is_integer():
    return power_of_2(n)
  closest = 2 ** math.floor(math.log2(n))
  return power_of_2(closest) + release_slopes(2 * closest)[0::2][:n - closest]


def srms(x):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Lrpe(nn.Module):
  def __init__(self, h, d):
    super().__init__()
    self.theta = nn.Parameter((10000 ** (-2 / (h * d) * torch.arange(h * d))).reshape(h, 1, -1))

  def forward(self, x, offset):
    theta = self.theta * (torch.arange(x.shape[-2]).reshape(1, -1, 1) + offset)
    return torch.cat([x * torch.cos(theta), x * torch.sin(theta)], dim=-1)


class NormLinearAttention(nn.Module):
  def __init__(self, d, hidden, h, use_lrpe):
    super().__init__()
    self.h = h
    self.qkvu_proj = nn.Linear(d, 4 * hidden, bias=False)
    self.out_proj = nn.Linear(hidden, d, bias=False)
    self.use_lrpe = use_lrpe
    if use_lrpe:
      self.lrpe = Lrpe(h, d // h)

  def forward(self, x, slope, kv=None, offset=0):
    q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
    b, n, _ = x.shape
    q, k, v = (t.reshape(b, n, self.h, -1).transpose(1, 2) for t in (q, k, v))
    q, k = F.silu(q), F.silu(k)
    if self.use_lrpe:
      q, k = self.lrpe(q, offset), self.lrpe(k, offset)
    ratio = torch.exp(-slope)                               # [h, 1, 1]
    if kv is None:  # the release's quadratic form over a whole prompt
      i = torch.arange(n)
      mask = torch.where(i[None, :] <= i[:, None], -(i[:, None] - i[None, :]).float(),
                         torch.tensor(float("-inf")))
      out = ((q @ k.transpose(-1, -2)) * torch.exp(slope * mask)) @ v
      kv = torch.zeros(b, self.h, q.shape[-1], v.shape[-1])
      for t in range(n):
        kv = ratio * kv + k[:, :, t, :, None] * v[:, :, t, None, :]
    else:           # the release's `inference` recurrence
      outs = []
      for t in range(n):
        kv = ratio * kv + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(q[:, :, t:t + 1] @ kv)
      out = torch.cat(outs, dim=-2)
    out = srms(out.transpose(1, 2).reshape(b, n, -1))
    return self.out_proj(u * out), kv


class GLU(nn.Module):
  def __init__(self, d, g):
    super().__init__()
    self.l1, self.l2, self.l3 = nn.Linear(d, g, bias=False), nn.Linear(d, g, bias=False), nn.Linear(
        g, d, bias=False)

  def forward(self, x):
    return self.l3(self.l1(x) * self.l2(x))


class Layer(nn.Module):
  def __init__(self, c, use_lrpe):
    super().__init__()
    d = c["decoder_embed_dim"]
    self.token_mixer = NormLinearAttention(d, c["hidden_dim"], c["decoder_attention_heads"],
                                           use_lrpe)
    self.channel_mixer = GLU(d, c["glu_dim"])


class Body(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.embed_tokens = nn.Embedding(c["vocab_size"], c["decoder_embed_dim"])
    self.layers = nn.ModuleList([Layer(c, bool(u)) for u in c["linear_use_lrpe_list"]])


class ReleaseLM(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.c = c
    self.model = Body(c)
    self.lm_head = nn.Linear(c["decoder_embed_dim"], c["vocab_size"], bias=False)
    self.slopes = torch.tensor(release_slopes(c["decoder_attention_heads"])).reshape(-1, 1, 1)

  def forward(self, ids, kvs=None, offset=0):
    x = math.sqrt(self.c["decoder_embed_dim"]) * self.model.embed_tokens(ids)
    n_layers = len(self.model.layers)
    new = []
    for l, layer in enumerate(self.model.layers):
      slope = self.slopes * (1 - l / (n_layers - 1) + 1e-5)
      y, kv = layer.token_mixer(srms(x), slope, None if kvs is None else kvs[l], offset)
      x = x + y
      x = x + layer.channel_mixer(srms(x))
      new.append(kv)
    return self.lm_head(srms(x)), new


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  torch.manual_seed(0)
  ref = ReleaseLM(HF_CONFIG).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "theta" not in name:
        p.copy_(torch.randn_like(p) * (1.0 if "embed" in name else p.shape[-1] ** -0.5))
      else:  # a trained theta is no longer the init
        p.mul_(torch.exp(0.3 * torch.randn_like(p)))
  path = tmp_path_factory.mktemp("tnl") / "model.safetensors"
  safetensors_torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
  model, params = load_transnormer(path, transnormer_config_from_hf(HF_CONFIG), max_step=4,
                                   impl="xla")
  return ref, model, params


TOKENS = [3, 17, 0, 44, 5, 5, 22, 9, 11, 30, 2, 8]


def test_prefill_and_token_by_token_match(both):
  ref, model, params = both
  with torch.no_grad():
    want_full, _ = ref(torch.tensor([TOKENS]))
    _, kvs = ref(torch.tensor([TOKENS[:5]]))
    want_steps = []
    for i, t in enumerate(TOKENS[5:]):
      logits, kvs = ref(torch.tensor([[t]]), kvs, offset=5 + i)
      want_steps.append(logits[0, 0].numpy())
  prefill, step = jax.jit(model.prefill), jax.jit(model.step)
  got_full, _ = prefill(params, jnp.asarray([TOKENS]), model.init_cache(1, 16), jnp.array([12]))
  np.testing.assert_allclose(np.asarray(got_full[0]), want_full[0].numpy(), atol=1e-4, rtol=0)
  _, cache = prefill(params, jnp.asarray([TOKENS[:5]]), model.init_cache(1, 16), jnp.array([5]))
  got = []
  for t in TOKENS[5:8]:
    logits, cache = step(params, jnp.asarray([[t]]), cache)
    got.append(np.asarray(logits[0, 0]))
  logits, cache = step(params, jnp.asarray([TOKENS[8:12]]), cache)  # k = 4 at once
  got.extend(np.asarray(logits[0]))
  np.testing.assert_allclose(np.stack(got), np.stack(want_steps), atol=1e-4, rtol=0)


def test_converter_refuses_missing_and_extra_keys(both):
  ref, model, _ = both
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  bad = {k: v for k, v in sd.items() if k != "model.layers.0.token_mixer.lrpe.theta"}
  bad["model.layers.1.token_mixer.out_proj.bias"] = np.zeros(32, np.float32)
  with pytest.raises(ValueError, match=r"missing keys \['model.layers.0.token_mixer.lrpe.theta'\]"
                     r".*unexpected keys \['model.layers.1.token_mixer.out_proj.bias'\]"):
    transnormer_params_from_state_dict(bad, model.config)
  with pytest.raises(ValueError, match="bias=True"):
    transnormer_config_from_hf(dict(HF_CONFIG, bias=True))
