"""What every experiment shares, and the only experiments module another one imports.

- where results go and how they are written: `results/<name>/results.json` (a list of row dicts),
  `report.md` (a title, notes and the same rows as a Markdown table), PNG plots beside them;
- the options: every experiment's `Config` checks itself when it is built (from the command line or
  in code), so a bad option is refused by name before anything is loaded, trained or compiled;
- the `--smoke` results folder, the command line, figures saved the same way;
- timing: warmed-up medians, and several functions timed side by side (round robin);
- study measures on byte-level code: held-out prompt windows, distinct n-grams, parameter counts.

Trained models and evaluation set-ups that several studies reuse are library code, in
`jaxinf.recipes`; this module holds only the plumbing of an experiment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

C = TypeVar("C")


# --- the options every experiment has ------------------------------------------------------------

def option(name: str) -> str:
  """How an error names option `name`: the field (`samples_per_class`, `dit.model`) and, when the
  flag is spelt otherwise, the flag as typed (`samples_per_class (--samples-per-class)`)."""
  flag = "--" + name.replace("_", "-")
  return name if flag == "--" + name else f"{name} ({flag})"


def _short(value: Any, limit: int = 120) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def refuse(name: str, message: str, error: type[Exception] = ValueError) -> None:
  """Raises `error` whose message starts with option `name` (see `option`)."""
  raise error(f"{option(name)}: {message}")


def renamed(name: str, error: Exception) -> Exception:
  """A library validator's `error` re-worded to start with option `name` (its own message kept,
  without repeating the name when it already starts with it)."""
  message = str(error)
  bare = name.rsplit(".", 1)[-1]
  for prefix in (name + ": ", bare + ": "):
    if message.startswith(prefix):
      message = message[len(prefix):]
      break
  return type(error)(f"{option(name)}: {message}")


def _type_ok(value: Any, hint: Any, infinite_ok: bool = False) -> bool:
  """Whether `value` is of the annotation `hint` (bool, int, float, str, None, unions, tuples of
  these; a dataclass: an instance of it). Annotations it does not know are left to `check`.
  Floats are finite (`infinite_ok`: +-inf passes too, nan never)."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  ok = functools.partial(_type_ok, infinite_ok=infinite_ok)
  if hint is type(None) or hint is None:
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if hint is float:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and not math.isnan(value)
            and (infinite_ok or math.isfinite(value)))
  if hint is str:
    return isinstance(value, str)
  if origin in (typing.Union, types.UnionType):
    return any(ok(value, a) for a in args)
  if origin is tuple:
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(ok(v, args[0]) for v in value)
    return len(value) == len(args) and all(ok(v, a) for v, a in zip(value, args))
  if isinstance(hint, type) and dataclasses.is_dataclass(hint):
    return isinstance(value, hint)
  return True


_EXPECTED = {bool: "a bool", int: "an int", float: "a finite number", str: "a str",
             type(None): "None"}


def _describe(hint: Any) -> str:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_describe(a) for a in args)
  if origin is tuple:
    if len(args) == 2 and args[1] is Ellipsis:
      return f"a tuple of ({_describe(args[0])})"
    return "a tuple (" + ", ".join(_describe(a) for a in args) + ")"
  return _EXPECTED.get(hint, getattr(hint, "__name__", str(hint)))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def check_types(config, infinite_ok: Sequence[str] = (), group: str = "") -> None:
  """Every field of the dataclass `config` holds a value of its annotation: bools are bools (not
  "no"), ints ints (not 2.0 or True), floats finite numbers (not nan or inf; the fields named in
  `infinite_ok` may be +-inf), strs strs, tuples tuples of their items, `X | None` also None,
  nested option groups instances of their class. `group`: as `check_ints`."""
  hints = _hints(type(config))
  for f in dataclasses.fields(config):
    value, hint = getattr(config, f.name), hints.get(f.name)
    if hint is not None and not _type_ok(value, hint, f.name in infinite_ok):
      refuse(group + f.name, f"expected {_describe(hint)}, got {_short(value)}")


def check_ints(config, *names: str, low: int = 1, high: int | None = None,
               group: str = "") -> None:
  """Each field in `names` is an int (or a non-empty tuple of ints; None passes) in
  [low, high]. `group`: the prefix of the nested option group `config` is, dot included
  ("train."), so that errors name `train.steps`."""
  for field in names:
    value, name = getattr(config, field), group + field
    values = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and not value:
      refuse(name, "expected at least one value, got ()")
    for v in values:
      if v is None:
        continue
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        refuse(name, f"expected an int, got {_short(value)}", TypeError)
      if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        refuse(name, f"expected {'ints' if isinstance(value, tuple) else 'an int'} {bound}, "
                     f"got {_short(value)}")


def check_numbers(config, *names: str, low: float | None = None, high: float | None = None,
                  low_open: bool = False, group: str = "") -> None:
  """Each field in `names` is a finite real number (or a tuple of them) in [low, high]
  (`low_open`: (low, high]). `group`: as `check_ints`."""
  for field in names:
    value, name = getattr(config, field), group + field
    for v in value if isinstance(value, tuple) else (value,):
      if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        refuse(name, f"expected a real number, got {_short(value)}", TypeError)
      too_low = low is not None and (v <= low if low_open else v < low)
      if not math.isfinite(v) or too_low or (high is not None and v > high):
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}]"
        refuse(name, f"expected a finite number in {lo}, {hi}, got {_short(value)}")


def check_choices(config, *names: str, choices: Sequence[str]) -> None:
  """Each field in `names` (a str, or a tuple of strs) is one of `choices`."""
  for name in names:
    value = getattr(config, name)
    for v in value if isinstance(value, tuple) else (value,):
      if v not in choices:
        refuse(name, f"unknown {v!r}; expected {'some' if isinstance(value, tuple) else 'one'} "
                     f"of {list(choices)}")


def check_solver_steps(name: str, pairs: Sequence[tuple[str, int]], schedule, **options) -> None:
  """`pairs` of (solver name, steps) run on `schedule`: each name one of
  `jaxinf.diffusion.solvers.SOLVERS` taking `options` (e.g. spacing), each step count in
  [1, num_train_timesteps], checked by the library's own validators; errors name option `name`."""
  from jaxinf.diffusion import schedules, solvers

  for solver, steps in pairs:
    try:
      solvers.make_solver(solver, **options)
      schedules.check_steps(steps, schedule.num_train_timesteps)
    except (TypeError, ValueError) as e:
      raise renamed(name, e) from None


def check_with(name: str, build: Callable[[], Any]) -> Any:
  """`build()` (a library object whose constructor checks its options), its error re-worded to
  name option `name`."""
  try:
    return build()
  except (TypeError, ValueError) as e:
    raise renamed(name, e) from None


class Checked:
  """Options that check themselves when built, from the command line (tyro) or in code: a
  ValueError or TypeError naming the option, before anything is loaded, trained or compiled.

  `check` runs `check_types` (every field of its annotation; floats finite, except the fields a
  class names in `infinite_ok`); an experiment's `Config` extends it with its ranges and names
  (calling `super().check()` first)."""

  infinite_ok: tuple[str, ...] = ()  # a class attribute, not an option

  def __post_init__(self):
    self.check()

  def check(self) -> None:
    check_types(self, self.infinite_ok)


@dataclasses.dataclass(frozen=True)
class StudyConfig(Checked):
  """The options every experiment has; its `Config` extends this and sets its own `out_dir`."""
  out_dir: str = "results"
  seed: int = 0           # the run's random draws (initialisation, prompts, sampling keys)
  smoke: bool = False     # the tiny size the tests run, in `<out_dir>_smoke` (options given
                          # beside it are kept: `smoke_sized`)
  progress: bool = True   # progress bars

  def check(self) -> None:
    super().check()
    check_ints(self, "seed", low=0)
    if not self.out_dir:
      refuse("out_dir", "expected a folder, got ''")


def _field_default(f: dataclasses.Field) -> Any:
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  return dataclasses.MISSING


def _smoke_merge(path: str, given: Any, smoked: Any, default: Any, derived: tuple[str, ...]):
  if path in derived or given == smoked:
    return smoked
  if (dataclasses.is_dataclass(given) and not isinstance(given, type)
      and type(given) is type(smoked) is type(default)):
    return dataclasses.replace(smoked, **{
        f.name: _smoke_merge(f"{path}.{f.name}", getattr(given, f.name), getattr(smoked, f.name),
                             getattr(default, f.name), derived)
        for f in dataclasses.fields(given) if f.init})
  return smoked if given == default else given   # an option the user set wins


def smoke_sized(config: C, smoked: C, *, derived: tuple[str, ...] = ("out_dir",)) -> C:
  """`smoked` (the `--smoke` sizes of `config`) with every option the user set kept: smoke only
  shrinks what was left at its default, so an option given with `--smoke` (`--samples-per-class
  3 --smoke`, `--dit.model DiT-digits-sigma --smoke`) is honoured, never silently dropped.
  `derived` names the options (dotted for nested ones) smoke derives from the given value, such as
  `out_dir` -> `<out_dir>_smoke`. The result checks itself like any config."""
  return dataclasses.replace(smoked, **{
      f.name: _smoke_merge(f.name, getattr(config, f.name), getattr(smoked, f.name),
                           _field_default(f), derived)
      for f in dataclasses.fields(config) if f.init})


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
  if value is None:  # not measured for this row (e.g. the timing of a sweep row)
    return "–"
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


def parse(config_type: type[C], args: Sequence[str] | None = None) -> C:
  """`config_type` from the command line `args` (default: `sys.argv`) by tyro; the config checks
  itself as it is built, so a bad option stops here (tyro prints the error naming it)."""
  import tyro

  return tyro.cli(config_type, args=args)


def cli(run: Callable[[C], Any], config_type: type[C]) -> Any:
  """The command line of an experiment: `config_type`'s fields as options (tyro), then `run`."""
  return run(parse(config_type))


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
