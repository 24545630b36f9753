"""jaxinf's softmax transformer, loaded through `jaxinf.checkpoints.transformers_lm`, against
transformers' `LlamaForCausalLM` on small random weights: prefill logits and token-by-token logits
(transformers with its KV cache vs jaxinf's `step`) to 1e-4 in fp32.

The weights travel the real path: `save_pretrained` (config.json + model.safetensors) in a temp
folder, then `load_llama` on that folder. Every parameter is randomised (norm weights too), so a
mapping that swaps two same-shaped tensors or drops a norm would show.
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
    # GQA 4 query heads over 2 kv heads, untied head
    "gqa": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2),
    # tied embeddings (save_pretrained drops lm_head.weight), explicit head_dim != hidden/heads,
    # a non-default rope theta and eps
    "tied_headdim": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                         rms_norm_eps=1e-5),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # RMSNorm weights around 1
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, intermediate_size=64, num_hidden_layers=2,
                                 max_position_embeddings=64, **CONFIGS[request.param])
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.config._attn_implementation = "eager"
  randomize_(hf, seed=1)
  folder = tmp_path_factory.mktemp(f"llama_{request.param}")
  hf.save_pretrained(folder)
  model, params = transformers_lm.load_llama(folder)
  return hf, model, params, folder


def tokens(batch: int, length: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int64)


def test_prefill_logits_match(pair):
  hf, model, params, _ = pair
  ids = tokens(2, 12, seed=2)
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids)).logits.numpy()
  cache = model.init_cache(2, 12)
  ours, _ = model.prefill(params, jnp.asarray(ids, jnp.int32), cache, jnp.asarray([12, 12]))
  assert np.abs(ref).max() > 1.0  # logits of a size where a 1e-4 tolerance means something
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=TOL)


def test_token_by_token_logits_match(pair):
  hf, model, params, _ = pair
  ids = tokens(2, 12, seed=3)
  prompt = 4
  with torch.no_grad():
    out = hf(torch.from_numpy(ids[:, :prompt]), use_cache=True)
    refs, hf_cache = [out.logits.numpy()], out.cache
    for t in range(prompt, ids.shape[1]):
      out = hf(torch.from_numpy(ids[:, t:t + 1]), cache=hf_cache, use_cache=True)
      refs.append(out.logits.numpy())
      hf_cache = out.cache
  cache = model.init_cache(2, ids.shape[1])
  logits, cache = model.prefill(params, jnp.asarray(ids[:, :prompt], jnp.int32), cache,
                                jnp.asarray([prompt, prompt]))
  ours = [np.asarray(logits)]
  for t in range(prompt, ids.shape[1]):
    logits, cache = model.step(params, jnp.asarray(ids[:, t:t + 1], jnp.int32), cache)
    ours.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(ours, 1), np.concatenate(refs, 1), rtol=0, atol=TOL)


def state_dict_np(hf) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def test_converter_refuses_missing_and_extra_keys(pair):
  hf, model, _, _ = pair
  sd = state_dict_np(hf)
  cfg = model.config
  sd.pop("model.layers.1.mlp.up_proj.weight")
  sd["model.layers.2.mlp.up_proj.weight"] = np.zeros((64, 32), np.float32)
  with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\], "
                                       r"unexpected keys \['model.layers.2.mlp.up_proj.weight'\]"):
    transformers_lm.llama_params(sd, cfg)


def test_converter_refuses_wrong_shapes_and_untied_head(pair):
  hf, model, _, _ = pair
  cfg = model.config
  sd = state_dict_np(hf)
  sd["model.norm.weight"] = np.ones((31,), np.float32)
  with pytest.raises(ValueError, match=r"shape mismatches \['norm/weight: \(31,\) != \(32,\)'\]"):
    transformers_lm.llama_params(sd, cfg)
  if cfg.tie_embeddings:  # state_dict() lists the tied head; a different one is refused
    sd = state_dict_np(hf)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
      transformers_lm.llama_params(sd, cfg)


def test_unsupported_config_is_refused():
  base = dict(vocab_size=8, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
              intermediate_size=8)
  convert = transformers_lm.llama_config_from_transformers
  with pytest.raises(ValueError, match="attention_bias=True is not implemented"):
    convert(dict(base, attention_bias=True))
  with pytest.raises(ValueError, match="rope_type='linear' is not implemented"):
    convert(dict(base, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))


def test_pickled_weights_are_not_read(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    transformers_lm.model_files(tmp_path)
