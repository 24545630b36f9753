"""What every experiment shares, and the only experiments module another one imports.

- where results go and how they are written: `results/<name>/results.json` (a list of row dicts),
  `report.md` (a title, notes and the same rows as a Markdown table), PNG plots beside them;
- the `--smoke` results folder, the command line, figures saved the same way;
- timing: warmed-up medians, and several functions timed side by side (round robin);
- study measures on byte-level code: held-out prompt windows, distinct n-grams, parameter counts.

Trained models and evaluation set-ups that several studies reuse are library code, in
`jaxinf.recipes`; this module holds only the plumbing of an experiment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

C = TypeVar("C")


# --- the options every experiment has ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The options every experiment has; its `Config` extends this and sets its own `out_dir`."""
  out_dir: str = "results"
  seed: int = 0           # the run's random draws (initialisation, prompts, sampling keys)
  smoke: bool = False     # the tiny size the tests run, in `<out_dir>_smoke`
  progress: bool = True   # progress bars


# --- results -----------------------------------------------------------------------------------

def study_dir(out_dir: str | os.PathLike) -> Path:
  """The experiment's results folder `out_dir`, created if missing."""
  path = Path(out_dir)
  path.mkdir(parents=True, exist_ok=True)
  return path


def results_dir(name: str, root: str | os.PathLike | None = None) -> Path:
  """`results/<name>/` under `root` (default: the current directory), created if missing."""
  return study_dir(Path(root if root is not None else "results") / name)


def smoke_dir(out_dir: str | os.PathLike) -> str:
  """`results/<name>` -> `results/<name>_smoke`: a --smoke run never touches a full run's files."""
  path = Path(out_dir)
  return str(path.parent / f"{path.name}_smoke")


def _cell(value: Any) -> str:
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.4g}"
  return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
  """Rows of dicts as a GitHub Markdown table; `columns` fixes the order (default: first row's
  keys)."""
  if not rows:
    return "(no rows)\n"
  columns = list(columns if columns is not None else rows[0].keys())
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def write_report(
    out_dir: Path,
    rows: Sequence[dict[str, Any]],
    *,
    title: str,
    notes: str = "",
    columns: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
  """Writes `results.json` (the rows; `extra` goes to `meta.json`) and `report.md`; in a
  multi-process run (`jaxinf.parallel.distributed`) process 0 alone writes, the others return."""
  if jax.process_index() != 0:
    return
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(json.dumps(list(rows), indent=2) + "\n")
  if extra is not None:
    (out_dir / "meta.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
  text = f"# {title}\n\n"
  if notes:
    text += notes.strip() + "\n\n"
  text += markdown_table(rows, columns)
  (out_dir / "report.md").write_text(text)


def print_report(out: Path, seconds: float) -> None:
  """Prints the finished `report.md` and where it went (process 0 only, which wrote it)."""
  if jax.process_index() != 0:
    return
  print(f"\n{(out / 'report.md').read_text()}\nwrote {out}/ in {seconds:.0f} s")


def cli(run: Callable[[C], Any], config_type: type[C]) -> None:
  """The command line of an experiment: `config_type`'s fields as options (tyro), then `run`."""
  import tyro

  run(tyro.cli(config_type))


# --- plots -------------------------------------------------------------------------------------

def pyplot():
  """`matplotlib.pyplot` on the Agg backend: experiments write PNG files, never open windows."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120, **savefig_options) -> None:
  """Lays out, writes (process 0 only) and closes `fig` (closed figures free their memory in long
  runs)."""
  if jax.process_index() == 0:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, **savefig_options)
  pyplot().close(fig)


# --- timing ------------------------------------------------------------------------------------

def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall seconds of `fn()` over `repeats` calls after one warm-up call (compilation)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def side_by_side(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each function, warmed up first, then timed interleaved (round robin), so
  load from other processes hits all of them alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())  # async dispatch: wait for the result, not the launch
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


# --- measures on byte-level code -----------------------------------------------------------------

def heldout_prompts(heldout: np.ndarray, batch: int, length: int, seed: int) -> np.ndarray:
  """`batch` windows of `length` held-out bytes (EOS-free) as int32 [B, T]."""
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < batch:
    s = int(rng.integers(0, len(heldout) - length))
    window = heldout[s:s + length]
    if (window < 256).all():
      out.append(window)
  return np.stack(out).astype(np.int32)


def distinct_ngrams(tokens: np.ndarray, n: int) -> float:
  """Fraction of distinct n-grams per row, averaged (1: no repetition; low: loops): the
  distinct-n of Li et al. 2016 ("A Diversity-Promoting Objective"), per sequence."""
  fracs = []
  for row in tokens:
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    fracs.append(len(set(grams)) / max(len(grams), 1))
  return float(np.mean(fracs))


def param_count(params) -> int:
  """Number of parameters (array elements) in a params tree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
