"""jaxinf's `AutoencoderKL`, loaded through `jaxinf.checkpoints.vae`, against diffusers' on small
random weights (GroupNorm affines and every bias randomised too)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxinf.checkpoints import vae as vae_ckpt  # noqa: E402
from jaxinf.models.functional import to_functional  # noqa: E402
from jaxinf.models.vae import AutoencoderKL, latents_to_vae, vae_to_latents  # noqa: E402

pytestmark = pytest.mark.parity

TINY = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=16,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def tiny_diffusers_vae(seed: int = 0, **overrides):
  model = diffusers.AutoencoderKL(**dict(TINY, **overrides)).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # GroupNorm scale around 1, every bias small but nonzero
        base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
  return model


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  model = tiny_diffusers_vae()
  path = tmp_path_factory.mktemp("vae")
  model.save_pretrained(path, safe_serialization=True)
  cfg, params = vae_ckpt.load_vae(path)  # config.json + safetensors from disk
  return model, cfg, params


def test_encode_decode_match_diffusers(pair):
  model, cfg, params = pair
  assert cfg.block_out_channels == (32, 64) and cfg.downsample_factor == 2
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  z = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x)).latent_dist
    ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
    ref_dec = model.decode(torch.from_numpy(z)).sample.numpy()
    ref_full = model(torch.from_numpy(x)).sample.numpy()

  encode, _ = to_functional(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), "encode")
  decode, _ = to_functional(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), "decode")
  mean, logvar = jax.jit(encode)(params, jnp.asarray(nhwc(x)))
  dec = jax.jit(decode)(params, jnp.asarray(nhwc(z)))
  full = decode(params, mean)

  for ours, ref in ((mean, ref_mean), (logvar, ref_logvar), (dec, ref_dec), (full, ref_full)):
    assert np.abs(ref).mean() > 0.05  # nothing trivially zero
    np.testing.assert_allclose(np.asarray(ours), nhwc(ref), atol=1e-4, rtol=0)


def test_scaled_latents_round_trip():
  cfg = vae_ckpt.vae_config_from_diffusers(dict(TINY, scaling_factor=0.5, shift_factor=0.25))
  z = jnp.linspace(-2, 2, 8)
  np.testing.assert_allclose(vae_to_latents(z, cfg), (z - 0.25) * 0.5)
  np.testing.assert_allclose(latents_to_vae(vae_to_latents(z, cfg), cfg), z, atol=1e-6)


def test_deprecated_attention_names_load_the_same(pair):
  model, cfg, params = pair
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  old = {}
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  for k, v in sd.items():
    for new, dep in renames.items():
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
    old[k] = v
  assert any(".proj_attn." in k for k in old)
  again = vae_ckpt.vae_params_from_state_dict(old, cfg)
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_bad_state_dicts_and_configs_are_refused(pair):
  model, cfg, _ = pair
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  missing = {k: v for k, v in sd.items() if k != "decoder.up_blocks.1.resnets.1.conv2.bias"}
  with pytest.raises(ValueError, match=r"missing keys \['decoder.up_blocks.1.resnets.1.conv2.bias'\]"):
    vae_ckpt.vae_params_from_state_dict(missing, cfg)
  with pytest.raises(ValueError, match=r"unexpected keys \['encoder.extra.weight'\]"):
    vae_ckpt.vae_params_from_state_dict(dict(sd, **{"encoder.extra.weight": np.ones(3)}), cfg)
  with pytest.raises(ValueError, match="shape mismatches"):
    vae_ckpt.vae_params_from_state_dict(
        sd, vae_ckpt.vae_config_from_diffusers(dict(TINY, in_channels=1)))
  with pytest.raises(ValueError, match="down_block_types"):
    vae_ckpt.vae_config_from_diffusers(dict(TINY, down_block_types=("DownBlock2D",) * 2))
  with pytest.raises(ValueError, match="x:"):
    AutoencoderKL(cfg, rngs=nnx.Rngs(0)).encode(jnp.zeros((1, 15, 16, 3)))
