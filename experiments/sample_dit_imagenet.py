"""ImageNet class-conditional sampling with a converted DiT and the Stable Diffusion VAE.

    python -m experiments.sample_dit_imagenet \\
        --transformer /path/to/DiT-XL-2-256/transformer --vae /path/to/sd-vae-ft-ema \\
        --labels 207 360 387 974 --steps 50 --guidance-scale 4.0

`--transformer` is diffusers' `transformer/` folder (`config.json` +
`diffusion_pytorch_model.safetensors`) of `facebook/DiT-XL-2-256`, or with `--source original` a
safetensors re-save of the release's `DiT-XL-2-256x256.pt` (then give `--num-heads 16`). `--vae`
is a diffusers `AutoencoderKL` folder (`stabilityai/sd-vae-ft-ema` or `-ft-mse`). Nothing is
downloaded. Sampling is DDIM (eta 0, leading spacing, linear betas 1e-4..0.02 — the checkpoint's
scheduler) with classifier-free guidance on all latent channels as diffusers' DiTPipeline does
(`--guided-channels 3` reproduces the release's `sample.py`). Writes
`results/sample_dit_imagenet/{results.json, report.md, samples.png, samples.npy}`.
`--smoke` only shortens the run (2 labels, 2 steps); the tests run it on tiny random weights.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import common
from jaxinf.checkpoints.dit import SOURCES, load_dit
from jaxinf.checkpoints.vae import load_vae
from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import dit_denoiser
from jaxinf.diffusion.guidance import CFG
from jaxinf.diffusion.sample import sample
from jaxinf.models.dit import DiT
from jaxinf.models.functional import to_functional
from jaxinf.models.vae import AutoencoderKL

# what its page needs to have results (scripts/build_docs.py)
RESULTS_NEED = ("the DiT-XL/2-256 and SD-VAE weights on local disk; nothing is downloaded and "
                "the machines that built these pages have no model hub")


@dataclasses.dataclass(frozen=True)
class Config(common.Checked):
  transformer: str = ""  # diffusers transformer/ folder, or a release safetensors file
  vae: str = ""  # diffusers AutoencoderKL folder
  source: str = "diffusers"  # "diffusers" or "original" (the release's naming)
  num_heads: int | None = None  # needed for --source original (16 for DiT-XL/2)
  labels: tuple[int, ...] = (207, 360, 387, 974, 88, 979, 417, 279)
  steps: int = 50
  guidance_scale: float = 4.0
  guided_channels: int | None = None
  seed: int = 0
  out_dir: str = "results/sample_dit_imagenet"
  smoke: bool = False  # the first 2 labels, 2 steps (options given beside it are kept)

  def check(self) -> None:
    """The options alone; the files are checked by `check_paths` as the run starts."""
    super().check()
    common.check_choices(self, "source", choices=SOURCES)
    common.check_ints(self, "num_heads", "guided_channels", "steps")
    common.check_ints(self, "labels", low=0)
    common.check_ints(self, "seed", low=0)
    common.check_with("guidance_scale", lambda: CFG(self.guidance_scale, self.guided_channels))
    if not self.out_dir:
      common.refuse("out_dir", "expected a folder, got ''")


def smoke_config(cfg: Config) -> Config:
  return common.smoke_sized(cfg, dataclasses.replace(cfg, labels=cfg.labels[:2], steps=2),
                            derived=())


def check_paths(cfg: Config) -> None:
  """Refuses missing or misplaced files before anything is loaded or compiled."""
  for name in ("transformer", "vae"):
    value = getattr(cfg, name)
    if not value:
      raise ValueError(f"{name}: pass the path of the local {name} weights (--{name} PATH)")
    if not Path(value).exists():
      raise FileNotFoundError(f"{name}: {value!r} does not exist")
  vae = Path(cfg.vae)
  if not (vae / "config.json").is_file():
    raise FileNotFoundError(f"vae: {cfg.vae!r} has no config.json (expected a diffusers "
                            "AutoencoderKL folder)")


def run(cfg: Config) -> dict:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  check_paths(cfg)
  labels, steps = cfg.labels, cfg.steps
  dit_cfg, dit_params = load_dit(cfg.transformer, cfg.source, num_heads=cfg.num_heads)
  vae_cfg, vae_params = load_vae(cfg.vae)
  # Abstract modules: only the graph is needed, so DiT-XL's 675M parameters are not initialised.
  apply, _ = to_functional(nnx.eval_shape(lambda: DiT(dit_cfg, rngs=nnx.Rngs(0))))
  decode, _ = to_functional(nnx.eval_shape(lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0))),
                            "decode_latents")
  denoiser = dit_denoiser(apply, dit_params, dit_cfg)
  guidance = CFG(cfg.guidance_scale, cfg.guided_channels) if cfg.guidance_scale > 1 else None

  t0 = time.perf_counter()
  latents = sample(jax.random.key(cfg.seed), denoiser, schedules.NoiseSchedule(), solvers.DDIM(),
                   (len(labels), *dit_cfg.sample_shape), steps=steps,
                   cond=jnp.asarray(labels, jnp.int32), guidance=guidance)
  images = jnp.clip(jax.jit(decode)(vae_params, latents) / 2 + 0.5, 0.0, 1.0)
  images = np.asarray(jax.block_until_ready(images))
  seconds = time.perf_counter() - t0

  out = common.study_dir(cfg.out_dir)
  np.save(out / "samples.npy", images)
  _save_grid(images, out / "samples.png")
  row = dict(labels=" ".join(map(str, labels)), steps=steps, guidance_scale=cfg.guidance_scale,
             image_size=int(images.shape[1]), seconds_with_compile=round(seconds, 2))
  common.write_report(out, [row], title="DiT ImageNet samples",
                      notes=f"transformer: {cfg.transformer}, vae: {cfg.vae}; see samples.png",
                      extra=dict(dit=dataclasses.asdict(dit_cfg), vae=dataclasses.asdict(vae_cfg)))
  return row


def _save_grid(images: np.ndarray, path: Path) -> None:
  plt = common.pyplot()
  n = len(images)
  fig, axes = plt.subplots(1, n, figsize=(2 * n, 2), squeeze=False)
  for ax, img in zip(axes[0], images):
    ax.imshow(img)
    ax.axis("off")
  common.save_figure(fig, path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
  print(common.cli(run, Config))
