"""Finetuned accuracy per EM iteration against the warmstart and the raw baselines.

    python -m plots.finetune INPUT [INPUT ...] --out FIG.png [--metric accuracy]

``INPUT`` is one of:

* a finetuning sweep folder (``apps.bolt.finetune_sweep``'s ``out``) or its ``results.csv``. Its
  ``run`` rows (one per upstream trial x downstream seed) are read; a trial named like an EM run,
  ``<model>_t<i>`` (``warmstart_t0``, ``iter2_t1``, ``raw_token_match_t0``), belongs to that model;
  any other trial name (``t0``) to the model named by the sweep folder (one sweep per model:
  ``FT/warmstart``, ``FT/iter1``, ``FT/raw_token_match``, ...);
* an EM run folder whose ``results.json`` summary carries ``finetune_accuracy`` (an EM run with
  ``finetune_eval: true``): its lines are drawn as they are.

Per model, from sweep rows: the mean over its runs and the SE std(ddof=1)/sqrt(runs) (the
sweep's rule for its aggregate rows); a model with one run keeps that run's binomial SE.
``--metric`` picks another column of the sweep (``pass@4``, ``maj@4``; no SE unless the CSV has
one). Models are placed as in the EM figures: ``iter<t>`` at iteration t, the warmstart and every
other model as a horizontal line with its SE band.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plots.common import draw_per_iteration, figure_cli, model_key, new_figure, split_run
from plots.runs import RESULTS, read_json

SWEEP_CSV = "results.csv"  # apps.bolt.finetune_sweep.CSV_FILE


def _number(text: str | None) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def sweep_runs(path: str | Path, metric: str = "accuracy") -> list[dict]:
    """``{model, trial, seed, value, se}`` per ``run`` row of a sweep's ``results.csv`` (``path``:
    the file or its folder)."""
    path = Path(path)
    csv_path = path / SWEEP_CSV if path.is_dir() else path
    folder_model = csv_path.parent.name
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "row" not in (reader.fieldnames or []) or metric not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path}: not a finetune sweep's results.csv with a {metric!r} column "
                             f"(columns: {reader.fieldnames})")
        out = []
        for row in reader:
            if row["row"] != "run" or _number(row.get(metric)) is None:
                continue
            model, trial = split_run(row["trial"])
            if trial is None:
                model = folder_model
            out.append({"model": model, "trial": row["trial"], "seed": row.get("seed"),
                        "value": _number(row[metric]), "se": _number(row.get(f"{metric}_se"))})
    return out


def model_lines(runs: list[dict], metric: str = "accuracy") -> list[dict]:
    """Summary lines (``group``, ``iteration``, ``k``, ``finetune_<metric>`` and its SE, ``runs``),
    one per model, in first-seen order."""
    key = f"finetune_{metric}"
    out = []
    for model in dict.fromkeys(r["model"] for r in runs):
        values = [r for r in runs if r["model"] == model]
        mean = sum(r["value"] for r in values) / len(values)
        if len(values) > 1:
            se = math.sqrt(sum((r["value"] - mean) ** 2 for r in values) / (len(values) - 1) / len(values))
        else:
            se = values[0]["se"]
        group, it, k = model_key(model)
        out.append({"group": group, "iteration": it, "k": k, "model": model, "runs": len(values),
                    key: mean, f"{key}_se": se})
    return out


def load(inputs: Sequence[str | Path], metric: str = "accuracy") -> list[dict]:
    """The summary lines of every input (see the module docstring)."""
    key = f"finetune_{metric}"
    runs: list[dict] = []
    lines: list[dict] = []
    for item in map(Path, inputs):
        if item.is_file() or (item / SWEEP_CSV).is_file():
            runs += sweep_runs(item, metric)
        elif (item / RESULTS).is_file():
            summary = (read_json(item / RESULTS) or {}).get("summary", [])
            lines += [ln for ln in summary if ln.get(key) is not None]
        else:
            raise FileNotFoundError(f"{item}: neither a finetune sweep ({SWEEP_CSV}) nor an EM run folder ({RESULTS})")
    lines = model_lines(runs, metric) + lines
    if not lines:
        raise ValueError(f"no finetuned {metric} in {[str(i) for i in inputs]}")
    return lines


def figure(inputs: Sequence[str | Path], metric: str = "accuracy", title: str | None = None) -> Any:
    """The figure (a :class:`matplotlib.figure.Figure`): finetuned ``metric`` per iteration."""
    lines = load(inputs, metric)
    fig, axes = new_figure(1, 1, panel=(7.5, 4.0))
    ax = axes[0][0]
    draw_per_iteration(ax, lines, f"finetune_{metric}", legend_outside=True)
    ax.set_title(title or f"finetuned {metric} per EM iteration")
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    return figure_cli("python -m plots.finetune", __doc__, "finetune sweep folders / results.csv, or EM run folders", figure, argv, metric=True)


if __name__ == "__main__":
    sys.exit(main())
