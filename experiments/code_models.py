"""The trained byte-level code models the decoding studies share, trained on first use and reused.

    model, params = code_model("target")            # transformer-12m, the large model
    model, params = code_model("transformer-1m")    # the lm_families checkpoints, ~1M parameters
    heldout = heldout_code()                        # held-out stdlib bytes for prompts

Names: `target` (`transformer-12m`, ~12.7M parameters: the verifier of speculative decoding and the
large model of entropy-adaptive and contrastive decoding), the four ~1M families of
`experiments.lm_families` (`transformer-1m`, `mamba-1m`, `rwkv7-1m`, `transnormer-1m`, trained
there with its config and stored in its folder, so either experiment reuses the other's
checkpoints), and `draft-tiny` (a ~100K-parameter transformer). Every model trains on the Python
standard library's own source (`jaxinf.data.stdlib_code`), checkpoints as it goes and resumes
exactly when killed. `smoke=True` gives tiny models trained a few steps, in their own folder.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np

from experiments import lm_families
from jaxinf.data.stdlib_code import load_corpus
from jaxinf.models import transformer as transformer_lib
from jaxinf.train.lm import LMTrainConfig, train_lm

FAMILY_MODELS = {"transformer-1m": "transformer", "mamba-1m": "mamba", "rwkv7-1m": "rwkv7",
                 "transnormer-1m": "transnormer"}
NAMES = ("target", "draft-tiny") + tuple(FAMILY_MODELS)
SMOKE_BYTES = 200_000
# the longest context any study asks for (lm_families prefills 2048-byte prompts)
MAX_LEN = 2048

TARGET_TRAIN = LMTrainConfig(steps=900, batch_size=8, seq_len=128, learning_rate=2e-3,
                             warmup_steps=60, checkpoint_every=50)
DRAFT_TINY = transformer_lib.TransformerConfig(vocab_size=259, hidden_size=64, num_layers=2,
                                               num_heads=4, num_kv_heads=2, mlp_hidden=172,
                                               tie_embeddings=True, max_len=1024)
DRAFT_TINY_TRAIN = LMTrainConfig(steps=500, batch_size=8, seq_len=128, learning_rate=3e-3,
                                 warmup_steps=50, checkpoint_every=100)
SMOKE_TRAIN = LMTrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=2, checkpoint_every=2)


def _root(smoke: bool) -> Path:
  return Path("results") / ("code_models_smoke" if smoke else "speculative")


@functools.cache
def corpus(smoke: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) byte streams of the stdlib source."""
  return load_corpus(max_bytes=SMOKE_BYTES if smoke else None)


def heldout_code(smoke: bool = False) -> np.ndarray:
  return corpus(smoke)[1]


def model_spec(name: str, smoke: bool = False):
  """(untrained model, random params, train config, checkpoint folder) of `name`."""
  if name not in NAMES:
    raise ValueError(f"name: unknown code model {name!r}; known: {list(NAMES)}")
  if name in FAMILY_MODELS:
    family = FAMILY_MODELS[name]
    cfg = lm_families.Config()
    if smoke:
      cfg = lm_families.smoke_config(cfg)
    impl = cfg.mamba_train_impl if family == "mamba" else "auto"
    model, params = lm_families.build_model(
        family, lm_families.family_config(family, smoke, MAX_LEN), impl=impl, seed=cfg.seed)
    folder = (Path("results/code_models_smoke/train") if smoke
              else Path(cfg.out_dir) / "train") / family
    return model, params, cfg.train, folder
  if name == "target":
    mcfg = (transformer_lib.transformer_config("transformer-tiny", vocab_size=259, max_len=1024)
            if smoke else transformer_lib.transformer_config("transformer-12m"))
    train = SMOKE_TRAIN if smoke else TARGET_TRAIN
  else:
    mcfg = (dataclasses.replace(DRAFT_TINY, hidden_size=16, num_layers=1, mlp_hidden=32)
            if smoke else DRAFT_TINY)
    train = SMOKE_TRAIN if smoke else DRAFT_TINY_TRAIN
  model = transformer_lib.TransformerLM(mcfg)
  return model, model.init_params(0), train, _root(smoke) / "train" / name


def code_model(name: str, *, smoke: bool = False, progress: bool = True):
  """(model, trained params) of `name`: trains (resuming any partial run) or reuses the finished
  checkpoint. Models come back with their default kernel implementation ("auto")."""
  model, params, train_cfg, folder = model_spec(name, smoke)
  state, _ = train_lm(model, params, corpus(smoke)[0], cfg=train_cfg, out_dir=folder,
                      progress=progress)
  if name == "mamba-1m":
    model = dataclasses.replace(model, impl="auto")
  return model, jax.tree.map(lambda x: x, state["params"])
