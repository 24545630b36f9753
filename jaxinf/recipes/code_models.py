"""The trained byte-level code models the language-model studies share, trained on first use and
reused.

    model, params = code_model("target")            # transformer-12m, the large model
    model, params = code_model("transformer-1m")    # a family model, ~1M parameters
    model, params, losses = family_model("rwkv7", FamilyTraining())   # one budget, one folder
    train, heldout = corpus()                       # the stdlib's source, files held out whole

Names: `target` (`transformer-12m`, ~12.7M parameters: the verifier of speculative decoding and the
large model of entropy-adaptive and contrastive decoding), the four ~1M families (`transformer-1m`,
`mamba-1m`, `rwkv7-1m`, `transnormer-1m`: `experiments.lm_families` compares them, speculative
decoding drafts with them, Mirostat samples from one) and `draft-tiny` (a ~100K-parameter
transformer). The family models train with one budget (`FamilyTraining`: same steps, batch and
window for every family) into `results/lm_families/train/<family>/`, so whichever study runs first
trains them and the others reuse the checkpoints. Every model trains on the Python standard
library's own source (`jaxinf.data.stdlib_code`), checkpoints as it goes and resumes exactly when
killed. `smoke=True` gives tiny models trained a few steps, in their own folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np

from jaxinf.checkpoints.native import CheckpointStore
from jaxinf.config import check_bool_fields, check_int
from jaxinf.data.stdlib_code import load_corpus
from jaxinf.models import families
from jaxinf.models import transformer as transformer_lib
from jaxinf.train.lm import CopyTask, LMTrainConfig, train_lm
from jaxinf.train.step import OptimizerConfig
from pallas_kernels.dispatch import IMPLS as KERNEL_IMPLS

# the families of `jaxinf.models.families` the studies compare, in the order they report them
FAMILIES = ("transformer", "transnormer", "rwkv7", "mamba")
FAMILY_MODELS = {f"{family}-1m": family for family in FAMILIES}
NAMES = ("target", "draft-tiny") + tuple(FAMILY_MODELS)
VOCAB_SIZE = 259     # bytes and the three specials of `ByteTokenizer`
SMOKE_BYTES = 200_000
# the longest context any study asks for (lm_families prefills 2048-byte prompts)
MAX_LEN = 2048

TARGET_TRAIN = LMTrainConfig(steps=900, batch_size=8, seq_len=128, checkpoint_every=50,
                             optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=60,
                                                       weight_decay=0.1))
DRAFT_TINY = transformer_lib.TransformerConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_layers=2,
                                               num_heads=4, num_kv_heads=2, mlp_hidden=172,
                                               tie_embeddings=True, max_len=1024)
DRAFT_TINY_TRAIN = LMTrainConfig(steps=500, batch_size=8, seq_len=128, checkpoint_every=100,
                                 optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=50,
                                                           weight_decay=0.1))
SMOKE_TRAIN = LMTrainConfig(steps=4, batch_size=2, seq_len=32, checkpoint_every=2,
                            optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2,
                                                      weight_decay=0.1))


@dataclasses.dataclass(frozen=True)
class FamilyTraining:
  """The one training budget of the ~1M family models, and where their checkpoints live
  (`<out_dir>/train/<family>/`). Studies that reuse a family model pass the same value."""
  train: LMTrainConfig = LMTrainConfig(
      steps=500, batch_size=8, seq_len=128, checkpoint_every=100,
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=50, weight_decay=0.1))
  # Mamba trains with the sequential selective scan: on a 2-core CPU it ran 371 ms/step against
  # 992 ms/step for the chunked XLA form at batch 8 x 128 (the same math, held equal by the tests).
  # Trained models come back with every family's default kernels ("auto").
  mamba_train_impl: str = "reference"
  corpus_bytes: int | None = None  # None: the whole stdlib corpus
  seed: int = 0                    # parameter initialisation
  out_dir: str = "results/lm_families"  # checkpoints in <out_dir>/train/<family>/
  tiny: bool = False               # the "-tiny" sizes instead of "-1m" (smoke runs)

  def __post_init__(self):
    # checked as the options are parsed: a bad one must not cost a training run first
    if not isinstance(self.train, LMTrainConfig):  # it checks its own fields
      raise TypeError(f"train: expected an LMTrainConfig, got {self.train!r}")
    if self.mamba_train_impl not in KERNEL_IMPLS:
      raise ValueError(f"mamba_train_impl: unknown {self.mamba_train_impl!r}; expected one of "
                       f"{list(KERNEL_IMPLS)}")
    if self.corpus_bytes is not None:
      check_int("corpus_bytes", self.corpus_bytes, 1)
    check_int("seed", self.seed, 0)
    if not isinstance(self.out_dir, str) or not self.out_dir:
      raise ValueError(f"out_dir: expected a folder, got {self.out_dir!r}")
    check_bool_fields(self)

  def folder(self, family: str) -> Path:
    return Path(self.out_dir) / "train" / family

  def finished(self, family: str) -> bool:
    """Whether `family`'s checkpoint has reached the full budget (training will be skipped)."""
    ckpts = self.folder(family) / "checkpoints"
    return ckpts.exists() and CheckpointStore(ckpts).latest_step() == self.train.steps


def smoke_training(training: FamilyTraining, out_dir: str) -> FamilyTraining:
  """`training` cut to a smoke run: tiny models, a few steps on a 200 KB corpus, in `out_dir`."""
  return dataclasses.replace(
      training, train=dataclasses.replace(
          training.train, steps=6, batch_size=2, seq_len=32, checkpoint_every=3,
          optimizer=dataclasses.replace(training.train.optimizer, warmup_steps=2)),
      corpus_bytes=SMOKE_BYTES, tiny=True, out_dir=out_dir)


def family_config(family: str, tiny: bool, max_len: int):
  """`family`'s registered "-1m" size over the byte vocabulary (`tiny`: its "-tiny" size)."""
  families.get_family(family)  # a ValueError naming the known families
  overrides = dict(vocab_size=VOCAB_SIZE)
  if family == "transformer":
    # RoPE has no parameter tied to the context: max_len only sizes the longest KV cache (the
    # recurrent families keep max_len None: their state does not grow)
    overrides["max_len"] = max_len
  return families.named_config(f"{family}-{'tiny' if tiny else '1m'}", **overrides)


def family_model(family: str, training: FamilyTraining, train_stream: np.ndarray | None = None,
                 *, max_len: int = MAX_LEN, progress: bool = True):
  """(model with default kernels, trained params, loss records) of `family` under `training`:
  trains (resuming any partial run) or reuses the finished checkpoint. `max_len` only sizes the
  transformer's longest KV cache (no parameter depends on it); `train_stream` defaults to the
  stdlib corpus capped at `training.corpus_bytes`."""
  impl = training.mamba_train_impl if family == "mamba" else "auto"
  model, params = families.build(family_config(family, training.tiny, max_len),
                                 seed=training.seed, impl=impl)
  if train_stream is None:
    train_stream = _corpus(training.corpus_bytes)[0]
  state, records = train_lm(model, params, train_stream, cfg=training.train,
                            out_dir=training.folder(family), progress=progress)
  return dataclasses.replace(model, impl="auto"), state["params"], records


@functools.cache
def _corpus(max_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
  return load_corpus(max_bytes=max_bytes)


def corpus(smoke: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) byte streams of the stdlib source (`smoke`: capped at 200 KB each)."""
  return _corpus(SMOKE_BYTES if smoke else None)


def heldout_code(smoke: bool = False) -> np.ndarray:
  return corpus(smoke)[1]


def models_dir(smoke: bool = False) -> Path:
  """The folder of the transformer code models' checkpoints (`train/<name>/`), which studies also
  use for models they derive from them (FastDraft drafts, Medusa heads)."""
  return Path("results") / ("code_models_smoke" if smoke else "speculative")


def _transformer_spec(name: str, smoke: bool = False):
  """(untrained model, random params, train config, checkpoint folder) of `target` or
  `draft-tiny`."""
  if name == "target":
    mcfg = (families.named_config("transformer-tiny", vocab_size=VOCAB_SIZE, max_len=1024)
            if smoke else families.named_config("transformer-12m"))
    train = SMOKE_TRAIN if smoke else TARGET_TRAIN
  elif name == "draft-tiny":
    mcfg = (dataclasses.replace(DRAFT_TINY, hidden_size=16, num_layers=1, mlp_hidden=32)
            if smoke else DRAFT_TINY)
    train = SMOKE_TRAIN if smoke else DRAFT_TINY_TRAIN
  else:
    raise ValueError(f"name: {name!r} is not a transformer code model; known: "
                     f"['target', 'draft-tiny']")
  return (*families.build(mcfg, seed=0), train, models_dir(smoke) / "train" / name)


def code_model(name: str, *, smoke: bool = False, progress: bool = True):
  """(model, trained params) of `name`: trains (resuming any partial run) or reuses the finished
  checkpoint. Models come back with their default kernel implementation ("auto")."""
  if name not in NAMES:
    raise ValueError(f"name: unknown code model {name!r}; known: {list(NAMES)}")
  if name in FAMILY_MODELS:
    training = FamilyTraining()
    if smoke:
      training = smoke_training(training, str(models_dir(True)))
    model, params, _ = family_model(FAMILY_MODELS[name], training, corpus(smoke)[0],
                                    progress=progress)
  else:
    model, params, train_cfg, folder = _transformer_spec(name, smoke)
    state, _ = train_lm(model, params, corpus(smoke)[0], cfg=train_cfg, out_dir=folder,
                        progress=progress)
    params = state["params"]
  return model, jax.tree.map(lambda x: x, params)


@dataclasses.dataclass(frozen=True)
class WindowLM:
  """The 4-layer GQA byte transformer trained on long code windows (`copy_trained_lm` is the recipe
  the KV-compression and quantization studies share; `window_lm` refuses a folder holding another
  recipe's training): `hidden_size`, `num_layers` (4 heads, 2 KV
  heads, tied embeddings, MLP 2.75x), `max_len` the longest context asked of it, trained
  `train_steps` of `batch_size` x `seq_len` bytes (AdamW 3e-3, 10 % warm-up, decay 0.1) with
  `copy` (a `jaxinf.train.lm.CopyTask`, or None) mixed in.

  copy_warmup_steps > 0 first trains that many steps on copy data alone (`copy_warmup_batch`
  windows of `copy_warmup_len` bytes, each printable random bytes repeating with a period of 8 to
  half the window), then trains on code from those weights. A model this small trained on code
  alone does not learn to copy in a few hundred steps; on repeats alone it forms induction heads
  in an abrupt drop of the loss (as Olsson et al. 2022 describe) whose timing depends on the seed
  and schedule: after ~450 steps of 16 x 128 bytes in `experiments.kv_compression`'s run, ~2,800
  in a trial with a 50-step learning-rate warm-up (0.2 s a step on 2 cores)."""
  hidden_size: int = 128
  num_layers: int = 4
  max_len: int = 512
  train_steps: int = 200
  batch_size: int = 8
  seq_len: int = 512
  seed: int = 0
  copy: CopyTask | None = None
  copy_warmup_steps: int = 0
  copy_warmup_batch: int = 16
  copy_warmup_len: int = 128

  def __post_init__(self):
    for name in ("hidden_size", "num_layers", "max_len", "train_steps", "batch_size", "seq_len",
                 "copy_warmup_batch", "copy_warmup_len"):
      check_int(name, getattr(self, name), low=1)
    check_int("seed", self.seed, low=0)
    check_int("copy_warmup_steps", self.copy_warmup_steps, low=0)
    self.train_configs()   # each phase's LMTrainConfig checks its windows and copy task (type too)

  def warmup_task(self) -> CopyTask:
    """The copy-only warm-up's data: printable bytes repeating with a period up to half a window."""
    return CopyTask(repeat_windows=1.0, min_period=8, max_period=max(self.copy_warmup_len // 2, 8),
                    token_low=32, token_high=127)

  def train_configs(self) -> list[LMTrainConfig]:
    """The training phases in order: the copy warm-up (when `copy_warmup_steps` > 0), then code."""
    def phase(steps, batch, seq_len, copy):
      return LMTrainConfig(steps=steps, batch_size=batch, seq_len=seq_len,
                           checkpoint_every=max(steps // 4, 1), seed=self.seed, copy=copy,
                           optimizer=OptimizerConfig(learning_rate=3e-3,
                                                     warmup_steps=max(steps // 10, 1),
                                                     weight_decay=0.1))
    phases = []
    if self.copy_warmup_steps:
      phases.append(phase(self.copy_warmup_steps, self.copy_warmup_batch, self.copy_warmup_len,
                          self.warmup_task()))
    return phases + [phase(self.train_steps, self.batch_size, self.seq_len, self.copy)]

  def config(self) -> transformer_lib.TransformerConfig:
    return transformer_lib.TransformerConfig(
        vocab_size=VOCAB_SIZE, hidden_size=self.hidden_size, num_layers=self.num_layers,
        num_heads=4, num_kv_heads=2, mlp_hidden=int(self.hidden_size * 2.75),
        tie_embeddings=True,
        max_len=max(self.max_len, self.seq_len,
                    self.copy_warmup_len if self.copy_warmup_steps else 1))


def copy_trained_lm(*, hidden_size: int = 128, num_layers: int = 4, max_len: int = 512,
                    train_steps: int = 1500, batch_size: int = 8, seq_len: int = 512,
                    seed: int = 0, copy_windows: float = 0.25, copy_spans: int = 2,
                    copy_warmup_steps: int = 4000) -> WindowLM:
  """The copy-trained `WindowLM` that `experiments.kv_compression` measures and
  `experiments.quantization` quantizes (at these defaults the two share one training): a warm-up
  on copies alone, then code with `copy_windows` of the windows replaced by printable random bytes
  repeating with a period of up to 480 and `copy_spans` spans of 8-48 bytes copied within each
  (both bounded by the window for small windows)."""
  window = seq_len + 1
  copy = None
  if copy_windows or copy_spans:
    copy = CopyTask(repeat_windows=copy_windows, max_period=min(480, window - 1),
                    spans=copy_spans, min_span=min(8, window // 2),
                    max_span=min(48, window // 2), token_low=32, token_high=127)
  return WindowLM(hidden_size=hidden_size, num_layers=num_layers, max_len=max_len,
                  train_steps=train_steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
                  copy=copy, copy_warmup_steps=copy_warmup_steps)


def window_lm(recipe: WindowLM, train: np.ndarray, out_dir: str | Path, *, progress: bool = True):
  """(model, params, records of the code training): trains `recipe` on the byte stream `train`
  into `out_dir` (the copy warm-up, if any, into `out_dir/copy_warmup`), resuming a killed run,
  or reuses the finished checkpoints there. `out_dir/recipe.json` records the recipe; a folder
  holding another recipe's training is refused (ValueError naming `out_dir`), never resumed."""
  if not isinstance(recipe, WindowLM):
    raise TypeError(f"recipe: expected a WindowLM, got {type(recipe).__name__}")
  out_dir = Path(out_dir)
  claim_folder(out_dir, dataclasses.asdict(recipe))
  model, params = families.build(recipe.config(), seed=recipe.seed)
  phases = recipe.train_configs()
  folders = [out_dir / "copy_warmup"] * (len(phases) - 1) + [out_dir]
  for tcfg, folder in zip(phases, folders):
    state, records = train_lm(model, params, train, cfg=tcfg, out_dir=folder, progress=progress)
    params = state["params"]
  return model, params, records


def claim_folder(out_dir: Path, recipe: dict) -> None:
  """Writes `recipe` to `out_dir/recipe.json`, or checks that the one there is the same; a folder
  with checkpoints and no recipe.json (written before it was recorded) is refused too."""
  path = out_dir / "recipe.json"
  text = json.dumps(recipe, sort_keys=True, indent=1)
  if path.exists():
    if json.loads(path.read_text()) != json.loads(text):
      raise ValueError(f"out_dir: {out_dir} holds the training of another recipe "
                       f"({path.read_text()!s}); give another folder or delete it")
    return
  if (out_dir / "checkpoints").exists():
    raise ValueError(f"out_dir: {out_dir} holds checkpoints of an unrecorded recipe (no "
                     "recipe.json); give another folder or delete it")
  out_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
