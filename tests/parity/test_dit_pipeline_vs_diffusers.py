"""A whole diffusers `DiTPipeline` run (tiny random DiT + tiny random VAE, DDIMScheduler, classifier-
free guidance) against jaxinf's `sample` + VAE decode with the converted weights.

What DiTPipeline does, read from `diffusers/pipelines/dit/pipeline_dit.py`: it draws the initial
latents with `randn_tensor` from the generator; with `guidance_scale > 1` it runs the batch
`[latents, latents]` with labels `[y, 1000]` (the null class is hard-coded to 1000), guides all
`in_channels` latent channels (not the release's first 3), keeps the variance half of the 2B output
as it came (the first B rows conditional), drops the variance channels before `scheduler.step`
(DDIM has its own variance), steps all 2B rows and keeps the first B at the end; the timestep is the
scheduler's int64 `t` broadcast to shape `[2B]`. DDIM with eta = 0 draws no noise, so the same
initial latents fix the whole run. jaxinf reproduces this with `CFG(scale)` (all channels) and
`x_init` = the pipeline's latents.

Tolerances. The pipeline's output images match to 1e-4 absolute (measured ~1e-5). The final latents
are compared relative to their scale: an untrained DiT predicts noise unrelated to x_t, so the DDIM
x0 estimate carries 1/sqrt(abar_t) (60 at t = 900) and the latents of this run reach |x| ~ 10^3,
where one fp32 ulp is 6e-5; they agree to ~7e-6 of max |x| (a trained model keeps latents O(1)).
The disagreement is fp32 arithmetic in the two DiTs (e.g. exp() of the timestep frequencies differs
by an ulp between torch and XLA), amplified along the trajectory, not the schedule tables: jaxinf
builds them in float64, diffusers in float32, and rebuilding jaxinf's in float32 changes nothing
measurable (`test_schedule_precision_is_not_what_limits_the_match`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxinf.checkpoints import dit as dit_ckpt  # noqa: E402
from jaxinf.checkpoints import vae as vae_ckpt  # noqa: E402
from jaxinf.diffusion import schedules, solvers  # noqa: E402
from jaxinf.diffusion.denoiser import dit_denoiser  # noqa: E402
from jaxinf.diffusion.guidance import CFG, classifier_free_guidance  # noqa: E402
from jaxinf.diffusion.sample import sample  # noqa: E402
from jaxinf.models.dit import DiT  # noqa: E402
from jaxinf.models.functional import to_functional  # noqa: E402
from jaxinf.models.vae import AutoencoderKL  # noqa: E402

from test_dit_vs_diffusers import randomize_, state_dict_np  # noqa: E402
from test_vae_vs_diffusers import tiny_diffusers_vae  # noqa: E402

pytestmark = pytest.mark.parity

STEPS = 10
LABELS = [1, 7, 999]


@pytest.fixture(scope="module")
def pipeline():
  transformer = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
      sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()  # 1000: the pipeline's null
  randomize_(transformer, seed=5)
  vae = tiny_diffusers_vae(seed=6)
  # facebook/DiT-XL-2-256's scheduler: DDIM, linear betas, epsilon, no clipping (see
  # diffusers' scripts/convert_dit_to_diffusers.py).
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                      prediction_type="epsilon", clip_sample=False)
  pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def run_pipeline(pipe, scale: float):
  """(final latents handed to the VAE, images) of one DiTPipeline run, and its initial latents."""
  seen = []
  decode = pipe.vae.decode
  pipe.vae.decode = lambda z, *a, **k: (seen.append(z.numpy().copy()), decode(z, *a, **k))[1]
  try:
    images = pipe(class_labels=LABELS, guidance_scale=scale, num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
  finally:
    pipe.vae.decode = decode
  # DiTPipeline draws its latents with randn_tensor(generator) on the CPU: this same draw.
  init = torch.randn((len(LABELS), 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
  latents = seen[0] * pipe.vae.config.scaling_factor  # it decodes latents / scaling_factor
  return init, latents, images


def run_jaxinf(pipe, init, scale: float, schedule: schedules.NoiseSchedule | None = None):
  cfg = dit_ckpt.dit_config_from_diffusers(pipe.transformer.config)
  params = dit_ckpt.dit_params_from_state_dict(state_dict_np(pipe.transformer), cfg, "diffusers")
  apply, _ = to_functional(DiT(cfg, rngs=nnx.Rngs(0)))
  denoiser = dit_denoiser(apply, params, cfg)
  vcfg = vae_ckpt.vae_config_from_diffusers(pipe.vae.config)
  vparams = vae_ckpt.vae_params_from_state_dict(state_dict_np(pipe.vae), vcfg)
  decode, _ = to_functional(AutoencoderKL(vcfg, rngs=nnx.Rngs(0)), "decode_latents")

  x_init = jnp.asarray(init.transpose(0, 2, 3, 1))
  latents = sample(jax.random.key(0), denoiser, schedule or schedules.NoiseSchedule(),
                   solvers.DDIM(), x_init.shape, steps=STEPS, cond=jnp.asarray(LABELS),
                   guidance=CFG(scale) if scale > 1 else None, x_init=x_init)
  images = jnp.clip(decode(vparams, latents) / 2 + 0.5, 0.0, 1.0)  # DiTPipeline's output mapping
  return np.asarray(latents), np.asarray(images)


class Float32Schedule(schedules.NoiseSchedule):
  """The linear schedule with diffusers' float32 arithmetic (torch.linspace and cumprod in fp32)."""

  @property
  def alphas_cumprod(self) -> np.ndarray:
    betas = torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps,
                           dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0).numpy().astype(np.float64)


@pytest.mark.parametrize("scale", [4.0, 1.0])
def test_dit_pipeline_matches_jaxinf(pipeline, scale):
  init, ref_latents, ref_images = run_pipeline(pipeline, scale)
  latents, images = run_jaxinf(pipeline, init, scale)
  assert np.abs(ref_latents).mean() > 0.1 and 0.05 < ref_images.mean() < 0.95
  assert 0.02 < np.mean((ref_images > 0) & (ref_images < 1))  # not all clipped away
  np.testing.assert_allclose(images, ref_images, atol=1e-4, rtol=0)
  ref = ref_latents.transpose(0, 2, 3, 1)
  np.testing.assert_allclose(latents, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_schedule_precision_is_not_what_limits_the_match(pipeline):
  """jaxinf builds its tables in float64, diffusers in float32 (torch.linspace and cumprod). The
  tables differ by float32 rounding, yet jaxinf run on diffusers' float32 table is no closer to the
  pipeline than jaxinf's own float64 run: the residual is the DiTs' fp32 arithmetic."""
  init, ref_latents, _ = run_pipeline(pipeline, 4.0)
  ref = ref_latents.transpose(0, 2, 3, 1)
  err64 = np.abs(run_jaxinf(pipeline, init, 4.0)[0] - ref).max()
  err32 = np.abs(run_jaxinf(pipeline, init, 4.0, Float32Schedule())[0] - ref).max()
  table_gap = np.abs(Float32Schedule().alphas_cumprod - schedules.NoiseSchedule().alphas_cumprod)
  assert 0 < table_gap.max() < 1e-6
  assert err32 > 0.5 * err64, (err32, err64)


def test_guided_channels_reproduces_the_release_forward_with_cfg():
  """`guided_channels=3` against the DiT release's `forward_with_cfg`, written out in numpy: guide
  channels :3, take channel 3 and the variance half from the conditional rows."""
  cfg = dit_ckpt.dit_config_from_diffusers(dict(
      num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
      sample_size=8, patch_size=2, num_embeds_ada_norm=10))
  model = DiT(cfg, rngs=nnx.Rngs(0))
  _, params = to_functional(model)
  leaves, treedef = jax.tree_util.tree_flatten(params)  # adaLN-Zero starts at zero: randomise all
  keys = jax.random.split(jax.random.key(0), len(leaves))
  params = jax.tree_util.tree_unflatten(
      treedef, [0.2 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
  apply, _ = to_functional(model)
  denoiser = dit_denoiser(apply, params, cfg)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y, scale = jnp.array([10.0, 600.0]), jnp.array([2, 5]), 4.0

  both = np.asarray(apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                          jnp.concatenate([y, jnp.full_like(y, cfg.null_class)])))
  cond, uncond = both[:2], both[2:]
  want = cond.copy()
  want[..., :3] = uncond[..., :3] + scale * (cond[..., :3] - uncond[..., :3])
  got = classifier_free_guidance(denoiser, scale, guided_channels=3)(x, t, y)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  got_all = CFG(scale)(denoiser)(x, t, y)
  assert np.abs(np.asarray(got_all)[..., 3] - want[..., 3]).max() > 1e-3  # channel 3 differs

  with pytest.raises(ValueError, match="guided_channels"):
    CFG(scale, guided_channels=5)(denoiser)
  with pytest.raises(TypeError, match="guided_channels"):
    classifier_free_guidance(denoiser, scale, guided_channels=2.0)
