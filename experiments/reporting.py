"""Where an experiment's results go and how they are written.

Every experiment writes `results/<name>/results.json` (a list of row dicts), `report.md` (a title,
notes and the same rows as a Markdown table) and its PNG plots beside them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def results_dir(name: str, root: str | os.PathLike | None = None) -> Path:
  """`results/<name>/` under `root` (default: the current directory), created if missing."""
  path = Path(root if root is not None else "results") / name
  path.mkdir(parents=True, exist_ok=True)
  return path


def _cell(value: Any) -> str:
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.4g}"
  return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
  """Rows of dicts as a GitHub Markdown table; `columns` fixes the order (default: first row's keys)."""
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
  """Writes `results.json` (the rows; `extra` goes to `meta.json`) and `report.md`."""
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
