"""jaxinf's DiT, loaded through `jaxinf.checkpoints.dit`, against diffusers' `DiTTransformer2DModel`
on small random weights (every parameter randomised, so no adaLN-Zero zero hides a mistake).

The original-release path is tested by writing the diffusers model's weights in the release's
naming (the inverse of diffusers' `scripts/convert_dit_to_diffusers.py`) and checking that both
converters give identical params; its numerics by switching diffusers' model to the release's two
settings (timestep shift 0, MLP LayerNorm eps 1e-6) and comparing again.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from jaxinf.checkpoints import arrays  # noqa: E402
from jaxinf.checkpoints import dit as dit_ckpt  # noqa: E402
from jaxinf.models import layers  # noqa: E402
from jaxinf.models.dit import DiT  # noqa: E402
from jaxinf.models.functional import to_functional  # noqa: E402

pytestmark = pytest.mark.parity

NUM_CLASSES = 10
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)


def randomize_(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random (weights ~ 1/sqrt(fan_in), biases 0.1), then every block's embedder
  copy set to block 0's, as in a converted checkpoint."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.1 if p.ndim == 1 else (1.0 if "embedding_table" in name
                                       else 1.0 / np.sqrt(p[0].numel()))
      p.copy_(torch.randn(p.shape, generator=g) * scale)
    if hasattr(model, "transformer_blocks"):
      emb0 = model.transformer_blocks[0].norm1.emb
      for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0.state_dict())


def tiny_diffusers_dit(learn_sigma: bool, seed: int = 0, **overrides):
  cfg = dict(TINY, out_channels=8 if learn_sigma else 4, **overrides)
  model = diffusers.DiTTransformer2DModel(**cfg).eval()
  randomize_(model, seed)
  return model


def state_dict_np(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def inputs(batch: int = 4, seed: int = 1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
  t = np.array([0, 17, 500, 999][:batch], np.int64)
  y = np.array([3, NUM_CLASSES, 0, 9][:batch], np.int64)  # includes the null class
  return x, t, y


def run_diffusers(model, x, t, y) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(x), timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def run_jaxinf(cfg, params, x, t, y) -> np.ndarray:
  apply, _ = to_functional(DiT(cfg, rngs=nnx.Rngs(0)))
  return np.asarray(apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)),
                          jnp.asarray(t, jnp.float32), jnp.asarray(y, jnp.int32)))


def to_original_state_dict(sd: dict[str, np.ndarray], depth: int, hidden: int, grid: int):
  """diffusers names -> the release's names: `convert_dit_to_diffusers.py` read backwards."""
  emb = "transformer_blocks.0.norm1.emb"
  o = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"],
       "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
       "pos_embed": layers.sincos_2d(hidden, grid)[None].astype(np.float32),
       "y_embedder.embedding_table.weight": sd[f"{emb}.class_embedder.embedding_table.weight"],
       "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
       "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
       "final_layer.linear.weight": sd["proj_out_2.weight"],
       "final_layer.linear.bias": sd["proj_out_2.bias"]}
  for i, j in (("0", "1"), ("2", "2")):
    for p in ("weight", "bias"):
      o[f"t_embedder.mlp.{i}.{p}"] = sd[f"{emb}.timestep_embedder.linear_{j}.{p}"]
  for d in range(depth):
    s = f"transformer_blocks.{d}"
    for p in ("weight", "bias"):
      o[f"blocks.{d}.attn.qkv.{p}"] = np.concatenate(
          [sd[f"{s}.attn1.to_{n}.{p}"] for n in "qkv"], axis=0)
      o[f"blocks.{d}.attn.proj.{p}"] = sd[f"{s}.attn1.to_out.0.{p}"]
      o[f"blocks.{d}.mlp.fc1.{p}"] = sd[f"{s}.ff.net.0.proj.{p}"]
      o[f"blocks.{d}.mlp.fc2.{p}"] = sd[f"{s}.ff.net.2.{p}"]
      o[f"blocks.{d}.adaLN_modulation.1.{p}"] = sd[f"{s}.norm1.linear.{p}"]
  return o


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dit_matches_diffusers(learn_sigma, tmp_path):
  model = tiny_diffusers_dit(learn_sigma)
  model.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = dit_ckpt.load_dit(tmp_path, "diffusers")  # config.json + safetensors from disk
  assert cfg.learn_sigma == learn_sigma and cfg.timestep_freq_shift == 1.0
  assert cfg.mlp_norm_eps == 1e-5
  x, t, y = inputs()
  ref = run_diffusers(model, x, t, y)
  ours = run_jaxinf(cfg, params, x, t, y)
  assert ref.shape == ours.shape == (4, 8, 8, 8 if learn_sigma else 4)
  assert np.abs(ref).mean() > 0.1  # not trivially zero
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_both_differences_matter():
  """Each of diffusers' two departures is needed. The timestep shift changes the whole model's
  output by O(1). The MLP LayerNorm eps changes it by only ~1e-5 (eps / variance, and the residual
  stream carries the unit-scale sin-cos table, so its variance is O(1)), below fp32 noise; it is
  checked on one block fed a small-variance stream, where diffusers' block needs eps 1e-5."""
  model = tiny_diffusers_dit(learn_sigma=True)
  cfg = dit_ckpt.dit_config_from_diffusers(model.config)
  params = dit_ckpt.dit_params_from_state_dict(state_dict_np(model), cfg, "diffusers")
  x, t, y = inputs()
  ref = run_diffusers(model, x, t, y)
  out = run_jaxinf(dataclasses.replace(cfg, timestep_freq_shift=0.0), params, x, t, y)
  assert np.max(np.abs(out - ref)) > 0.1

  h = np.random.default_rng(2).standard_normal((4, cfg.num_tokens, cfg.hidden_size))
  h = (1e-3 * h).astype(np.float32)  # variance 1e-6, so eps 1e-5 vs 1e-6 rescales the MLP input by ~5 %
  with torch.no_grad():
    ref_block = model.transformer_blocks[0](
        torch.from_numpy(h), timestep=torch.from_numpy(t),
        class_labels=torch.from_numpy(y)).numpy()
  errors = {}
  for eps in (1e-5, 1e-6):
    dit = DiT(dataclasses.replace(cfg, mlp_norm_eps=eps), rngs=nnx.Rngs(0))
    nnx.update(dit, params)
    c = dit.t_embedder(jnp.asarray(t, jnp.float32)) + dit.y_embedder(jnp.asarray(y))
    errors[eps] = np.max(np.abs(np.asarray(dit.blocks[0](jnp.asarray(h), c)) - ref_block))
  # the right eps passes the 1e-4 parity bar with room to spare; the release's eps fails it
  assert errors[1e-5] < 1e-5 and errors[1e-6] > 1e-4, errors


def test_original_release_naming_gives_identical_params(tmp_path):
  model = tiny_diffusers_dit(learn_sigma=True, seed=3)
  sd = state_dict_np(model)
  cfg = dit_ckpt.dit_config_from_diffusers(model.config)
  from_diffusers = dit_ckpt.dit_params_from_state_dict(sd, cfg, "diffusers")
  original = to_original_state_dict(sd, cfg.depth, cfg.hidden_size, cfg.grid_size)
  path = tmp_path / "DiT-tiny.safetensors"
  safetensors_torch.save_file({k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in original.items()}, str(path))
  cfg_o, from_original = dit_ckpt.load_dit(path, "original", num_heads=2)
  assert cfg_o == dit_ckpt.release_config(cfg)  # shapes give the rest of the config
  a, b = arrays.flatten_params(from_diffusers), arrays.flatten_params(from_original)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # The release's numerics, against diffusers switched to the release's two settings.
  with torch.no_grad():
    for block in model.transformer_blocks:
      block.norm1.emb.time_proj.downscale_freq_shift = 0
      block.norm3.eps = 1e-6
  x, t, y = inputs()
  np.testing.assert_allclose(run_jaxinf(cfg_o, from_original, x, t, y),
                             run_diffusers(model, x, t, y), atol=1e-4, rtol=0)


def test_config_from_diffusers_and_from_shapes():
  model = tiny_diffusers_dit(learn_sigma=True)
  cfg = dit_ckpt.dit_config_from_diffusers(dict(model.config))
  assert (cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size, cfg.depth,
          cfg.num_heads, cfg.num_classes, cfg.null_class) == (8, 2, 4, 32, 2, 2, 10, 10)
  inferred = dit_ckpt.infer_dit_config(state_dict_np(model), "diffusers", num_heads=2,
                                       input_size=8)
  assert inferred == cfg
  with pytest.raises(ValueError, match="input_size"):
    dit_ckpt.infer_dit_config(state_dict_np(model), "diffusers", num_heads=2)
  with pytest.raises(ValueError, match="norm_type"):
    dit_ckpt.dit_config_from_diffusers(dict(model.config, norm_type="ada_norm"))
  with pytest.raises(ValueError, match="out_channels"):
    dit_ckpt.dit_config_from_diffusers(dict(model.config, out_channels=5))


def test_bad_state_dicts_are_refused_with_the_list():
  model = tiny_diffusers_dit(learn_sigma=False)
  sd = state_dict_np(model)
  cfg = dit_ckpt.dit_config_from_diffusers(model.config)

  missing = dict(sd)
  del missing["transformer_blocks.1.attn1.to_k.bias"]
  extra = dict(sd, **{"transformer_blocks.1.attn1.norm_q.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match=r"missing keys \['transformer_blocks.1.attn1.to_k.bias'\]"):
    dit_ckpt.dit_params_from_state_dict(missing, cfg, "diffusers")
  with pytest.raises(ValueError, match=r"unexpected keys \['transformer_blocks.1.attn1.norm_q"):
    dit_ckpt.dit_params_from_state_dict(extra, cfg, "diffusers")

  copies = dict(sd)
  key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
  copies[key] = copies[key] + 1.0
  with pytest.raises(ValueError, match="embedder copies differ.*" + key.replace(".", r"\.")):
    dit_ckpt.dit_params_from_state_dict(copies, cfg, "diffusers")

  with pytest.raises(ValueError, match="shape mismatches"):
    dit_ckpt.dit_params_from_state_dict(sd, dataclasses.replace(cfg, learn_sigma=True),
                                        "diffusers")
  with pytest.raises(ValueError, match="missing keys"):
    dit_ckpt.dit_params_from_state_dict(sd, cfg, "original")
  with pytest.raises(ValueError, match="source"):
    dit_ckpt.dit_params_from_state_dict(sd, cfg, "timm")

  original = to_original_state_dict(sd, cfg.depth, cfg.hidden_size, cfg.grid_size)
  original["pos_embed"] = original["pos_embed"] * 1.01
  with pytest.raises(ValueError, match="sin-cos"):
    dit_ckpt.dit_params_from_state_dict(original, dit_ckpt.release_config(cfg), "original")
