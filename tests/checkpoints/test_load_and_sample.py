"""Loading from disk (safetensors only) and the `sample_dit_imagenet` experiment on tiny random
weights saved by diffusers itself, as a user's real checkpoint folders would be laid out."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from experiments import sample_dit_imagenet as exp  # noqa: E402
from jaxinf.checkpoints.torch_weights import read_safetensors  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  dit = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
      sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  dit.save_pretrained(root / "transformer", safe_serialization=True)
  vae.save_pretrained(root / "vae", safe_serialization=True)
  return root


def test_experiment_smoke_run(checkpoint_dirs, tmp_path):
  out = tmp_path / "results" / "sample_dit_imagenet"
  row = exp.run(exp.Config(transformer=str(checkpoint_dirs / "transformer"),
                           vae=str(checkpoint_dirs / "vae"), out_dir=str(out), smoke=True))
  assert row["steps"] == 2 and row["image_size"] == 16
  images = np.load(out / "samples.npy")
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
  assert images.min() >= 0 and images.max() <= 1
  assert (out / "samples.png").is_file() and json.loads((out / "results.json").read_text())


def test_missing_or_foreign_files_are_refused(checkpoint_dirs, tmp_path):
  with pytest.raises(ValueError, match="transformer"):
    exp.check_paths(exp.Config(vae=str(checkpoint_dirs / "vae")))
  with pytest.raises(FileNotFoundError, match="vae"):
    exp.check_paths(exp.Config(transformer=str(checkpoint_dirs / "transformer"),
                               vae=str(tmp_path / "nowhere")))
  pt = tmp_path / "DiT-XL-2-256x256.pt"
  pt.write_bytes(b"not read")
  with pytest.raises(ValueError, match="pickled"):
    read_safetensors(pt)
  with pytest.raises(FileNotFoundError, match="no such safetensors file"):
    read_safetensors(tmp_path / "missing.safetensors")


def test_half_precision_files_are_widened(tmp_path):
  from safetensors.torch import save_file
  w = torch.randn(3, 5)
  save_file({"a": w.to(torch.bfloat16), "b": w.to(torch.float16)}, str(tmp_path / "w.safetensors"))
  got = read_safetensors(tmp_path / "w.safetensors")
  assert got["a"].dtype == got["b"].dtype == np.float32
  np.testing.assert_array_equal(got["a"], w.to(torch.bfloat16).float().numpy())
  np.testing.assert_array_equal(got["b"], w.to(torch.float16).float().numpy())
