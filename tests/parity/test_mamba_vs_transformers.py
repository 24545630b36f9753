"""jaxinf's Mamba, loaded through `jaxinf.checkpoints.transformers_lm`, against transformers'
`MambaForCausalLM` (its reference PyTorch path: the sequential scan of `mamba_selective_scan` and
`mamba_selective_state_update`) on small random weights: prefill logits and token-by-token logits
(transformers with its conv/SSM cache vs jaxinf's `step`) to 1e-4 in fp32.

Weights go through `save_pretrained` (config.json + model.safetensors) and `load_mamba`. Every
parameter is randomised, A_log, D, dt_proj.bias and the conv included.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from jaxinf.checkpoints import transformers_lm  # noqa: E402

pytestmark = pytest.mark.parity

TOL = 1e-4
VOCAB = 64
CONFIGS = {
    "tied": dict(),  # transformers' defaults: tied head, conv bias, no projection biases
    "untied_biases": dict(tie_word_embeddings=False, use_bias=True, use_conv_bias=False,
                          conv_kernel=3, time_step_rank=5),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  randn = lambda shape: torch.randn(shape, generator=g)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("A_log"):  # A = -exp(A_log) in about [-8, -0.1]
        p.copy_(randn(p.shape).clamp(-2, 2))
      elif name.endswith("dt_proj.bias"):  # softplus(bias) about 0.005 .. 1
        p.copy_(-2.0 + randn(p.shape))
      elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        p.copy_(1.0 + 0.2 * randn(p.shape))
      elif "embeddings" in name:
        p.copy_(randn(p.shape))
      elif p.ndim == 1:  # D, biases
        p.copy_(0.3 * randn(p.shape))
      else:  # Linear [out, in] and depthwise conv [Di, 1, W]: ~ 1/sqrt(fan_in)
        p.copy_(randn(p.shape) / np.sqrt(p[0].numel()))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 state_size=8, **CONFIGS[request.param])
  hf = transformers.MambaForCausalLM(cfg).eval()
  randomize_(hf, seed=1)
  folder = tmp_path_factory.mktemp(f"mamba_{request.param}")
  hf.save_pretrained(folder)
  model, params = transformers_lm.load_mamba(folder)
  return hf, model, params


def tokens(batch: int, length: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int64)


def test_prefill_logits_match(pair):
  hf, model, params = pair
  ids = tokens(2, 12, seed=2)
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids), use_cache=False).logits.numpy()
  ours, _ = model.prefill(params, jnp.asarray(ids, jnp.int32), model.init_cache(2),
                          jnp.asarray([12, 12]))
  assert np.abs(ref).max() > 1.0  # logits of a size where a 1e-4 tolerance means something
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=TOL)


def test_token_by_token_logits_match(pair):
  hf, model, params = pair
  ids = tokens(2, 12, seed=3)
  prompt = 4
  with torch.no_grad():
    out = hf(torch.from_numpy(ids[:, :prompt]), use_cache=True)
    refs, hf_cache = [out.logits.numpy()], out.cache
    for t in range(prompt, ids.shape[1]):
      out = hf(torch.from_numpy(ids[:, t:t + 1]), cache=hf_cache, use_cache=True)
      refs.append(out.logits.numpy())
      hf_cache = out.cache
  cache = model.init_cache(2)
  logits, cache = model.prefill(params, jnp.asarray(ids[:, :prompt], jnp.int32), cache,
                                jnp.asarray([prompt, prompt]))
  ours = [np.asarray(logits)]
  for t in range(prompt, ids.shape[1]):
    logits, cache = model.step(params, jnp.asarray(ids[:, t:t + 1], jnp.int32), cache)
    ours.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(ours, 1), np.concatenate(refs, 1), rtol=0, atol=TOL)


def test_converter_refuses_missing_and_extra_keys(pair):
  hf, model, _ = pair
  sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  sd.pop("backbone.layers.0.mixer.A_log")
  sd["backbone.layers.0.mixer.A"] = np.zeros((64, 8), np.float32)
  with pytest.raises(ValueError, match=r"missing keys \['backbone.layers.0.mixer.A_log'\], "
                                       r"unexpected keys \['backbone.layers.0.mixer.A'\]"):
    transformers_lm.mamba_params(sd, model.config)


def test_config_mapping():
  convert = transformers_lm.mamba_config_from_transformers
  cfg = convert(dict(vocab_size=10, hidden_size=40, num_hidden_layers=1, time_step_rank="auto"))
  assert (cfg.dt_rank, cfg.inner_size, cfg.conv_kernel, cfg.tie_embeddings) == (3, 80, 4, True)
  with pytest.raises(ValueError, match="hidden_act='gelu' is not implemented"):
    convert(dict(vocab_size=10, hidden_size=40, num_hidden_layers=1, hidden_act="gelu"))
