"""`claim_out_dir`: a folder holds one run; a config field added since the run was written counts
as the same run only at its default."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxinf.diffusion import schedules
from jaxinf.train.flow import claim_out_dir


@dataclasses.dataclass(frozen=True)
class Old:
  steps: int = 10


@dataclasses.dataclass(frozen=True)
class New:  # Old with a field added later
  steps: int = 10
  dtype: str = "float64"
  inner: tuple = (1, 2)


def test_same_config_is_the_same_run_and_another_is_refused(tmp_path):
  claim_out_dir(tmp_path, {"train": Old(5), "method": "x"})
  claim_out_dir(tmp_path, {"train": Old(5), "method": "x"})
  for other in ({"train": Old(6), "method": "x"}, {"train": Old(5), "method": "y"},
                {"train": Old(5)}, {"train": Old(5), "method": "x", "extra": 1}):
    with pytest.raises(ValueError, match="^out_dir: .* another configuration"):
      claim_out_dir(tmp_path, other)


def test_a_field_added_since_counts_only_at_its_default(tmp_path):
  claim_out_dir(tmp_path, {"train": Old(5)})
  written = json.loads((tmp_path / "config.json").read_text())
  assert written == {"train": {"steps": 5}}
  claim_out_dir(tmp_path, {"train": New(5)})  # dtype and inner at their defaults: the same run
  assert json.loads((tmp_path / "config.json").read_text())["train"] == {
      "steps": 5, "dtype": "float64", "inner": [1, 2]}
  claim_out_dir(tmp_path / "b", {"train": Old(5)})
  with pytest.raises(ValueError, match="another configuration"):
    claim_out_dir(tmp_path / "b", {"train": New(5, dtype="float32")})


def test_a_noise_schedule_written_before_its_dtype_option_is_reused(tmp_path):
  """The quickstart's finished runs were written before `NoiseSchedule.dtype` existed."""
  old = {"schedule": {"beta_schedule": "linear", "num_train_timesteps": 1000,
                      "beta_start": 0.0001, "beta_end": 0.02, "rescale_betas_zero_snr": False}}
  (tmp_path / "config.json").write_text(json.dumps(old))
  claim_out_dir(tmp_path, {"schedule": schedules.NoiseSchedule("linear")})
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(ValueError, match="another configuration"):
    claim_out_dir(tmp_path, {"schedule": schedules.NoiseSchedule("linear", dtype="float32")})
