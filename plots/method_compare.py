"""Accuracy per data condition against tokens: raw tokens, effective raw tokens (and training tokens).

    python -m plots.method_compare INPUT [INPUT ...] --out FIG.png

A *data condition* is what a model was trained on: latent thoughts, raw data repeated, fresh raw
data, paraphrases (WRAP), ... ``INPUT`` is one of:

* a CSV file with one row per model (or checkpoint) and the columns

  ============================ =========================================================
  ``condition``                the series the row belongs to (a line in every panel)
  ``raw_tokens``               unique raw-document tokens its training data was made from
                               (the data budget: the same for every data-constrained
                               condition, more for fresh raw data)
  ``effective_raw_tokens``     raw-document tokens seen in training, repeats counted: the
                               training tokens divided by the condition's synthetic-to-raw
                               token ratio (1 for raw data, about 3.3 for latent thoughts in
                               the paper; the reference's "effective raw tokens seen")
  ``accuracy``                 the evaluation accuracy (a share)
  ``accuracy_se``              its standard error (empty: no error bar)
  ``train_tokens`` (optional)  tokens the model trained on (thoughts and markers included)
  ============================ =========================================================

  A token column may be empty in a row; the row is then left out of that panel only.
* an EM run folder (``results.json``): every summary line with an accuracy is a condition
  (``warmstart``, ``bootstrap iteration <t>``, ``raw token match``, ``raw flops match``,
  ``ablation K=<k>``), its tokens taken from its runs (:func:`em_conditions`).

One panel per token column present (training tokens, raw tokens, effective raw tokens, in this
order), log x, accuracy from 0 with SE bars; the rows of a condition are joined in token order.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plots.common import figure_cli, fit_ylim, new_figure
from plots.runs import RESULTS, load_em_result, read_json, train_tokens

X_COLUMNS = ("train_tokens", "raw_tokens", "effective_raw_tokens")
REQUIRED = ("condition", "accuracy")
X_LABELS = {"train_tokens": "training tokens (thoughts included)", "raw_tokens": "raw tokens (unique, the data budget)",
            "effective_raw_tokens": "effective raw tokens seen (repeats counted)"}


def _number(text: Any) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def read_csv(path: str | Path) -> list[dict]:
    """The condition rows of a CSV (see the module docstring), numbers parsed, blanks None."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in columns]
        if missing or not any(c in columns for c in X_COLUMNS):
            raise ValueError(f"{path}: needs the columns {', '.join(REQUIRED)} and at least one of "
                             f"{', '.join(X_COLUMNS)} (has {columns})")
        rows = []
        for row in reader:
            rec = {"condition": row["condition"], "accuracy": _number(row["accuracy"]),
                   "accuracy_se": _number(row.get("accuracy_se"))}
            rec.update({c: _number(row.get(c)) for c in X_COLUMNS})
            if rec["accuracy"] is not None:
                rows.append(rec)
    return rows


def condition_name(group: str, iteration: int | None, k: int | None) -> str:
    if group == "bootstrap":
        return f"bootstrap iteration {iteration}"
    if group.startswith("ablation_k"):
        return f"ablation K={k}"
    return group.replace("_", " ")


def _latents(group: str, iteration: int | None, k: int | None) -> str | None:
    """The latent dataset a group trained on (the EM report's naming); None for raw groups."""
    from apps.bolt.em_report import latents_of

    return "warmstart_latents" if group == "warmstart" else latents_of(group, iteration, k)


def em_conditions(run_dir: str | Path) -> list[dict]:
    """Conditions of an EM run folder, one per summary line with an accuracy:

    * ``train_tokens``: mean over the line's trials of the tokens each run trained on
      (``runs/<run>/``: tokens seen, else logged, else budgeted); for a raw baseline without run
      folders, its budget in ``baseline_budgets``;
    * raw share of the training stream: 1 for raw groups; for latent groups, their dataset's
      raw/packed tokens per epoch in ``budgets.json`` (runs with epoch budgets), else the share
      measured on iteration 1's data (``baseline_budgets.raw_fraction``), an approximation for
      the other latent datasets;
    * ``effective_raw_tokens`` = ``train_tokens`` x raw share;
    * ``raw_tokens`` = ``effective_raw_tokens`` capped at the raw tokens of one pass over the
      dataset (``budgets.json``, else ``baseline_budgets.raw_tokens``: the bootstrap corpus the
      M-steps and raw baselines train on; unknown for the warmstart without ``budgets.json``).
    """
    run_dir = Path(run_dir)
    result = load_em_result(run_dir)
    budgets = read_json(run_dir / "budgets.json") or {}
    baseline = result.get("baseline_budgets") or read_json(run_dir / "baseline_budgets.json") or {}
    out = []
    for ln in result.get("summary", []):
        if ln.get("accuracy") is None:
            continue
        group, it, k = ln["group"], ln.get("iteration"), ln.get("k")
        runs = [r["run"] for r in result.get("rows", []) if r.get("run")
                and (r["group"], r.get("iteration"), r.get("k")) == (group, it, k)]
        seen = [t for t in (train_tokens(run_dir / "runs" / r) for r in runs) if t]
        tokens = sum(seen) / len(seen) if seen else (baseline.get("budgets") or {}).get(group)
        latents = _latents(group, it, k)
        entry = budgets.get(latents) if latents else None
        if latents is None:
            share, corpus = 1.0, baseline.get("raw_tokens")
        elif entry and entry.get("packed_tokens_per_epoch"):
            share, corpus = entry["raw_tokens_per_epoch"] / entry["packed_tokens_per_epoch"], entry["raw_tokens_per_epoch"]
        else:
            share = baseline.get("raw_fraction")
            corpus = baseline.get("raw_tokens") if group != "warmstart" else None
        effective = tokens * share if tokens is not None and share is not None else None
        out.append({"condition": condition_name(group, it, k), "accuracy": ln["accuracy"],
                    "accuracy_se": ln.get("accuracy_se"), "train_tokens": tokens, "effective_raw_tokens": effective,
                    "raw_tokens": min(effective, corpus) if effective is not None and corpus else None})
    return out


def load(inputs: Sequence[str | Path]) -> list[dict]:
    rows: list[dict] = []
    for item in map(Path, inputs):
        if item.is_file():
            rows += read_csv(item)
        elif (item / RESULTS).is_file():
            rows += em_conditions(item)
        else:
            raise FileNotFoundError(f"{item}: neither a conditions CSV nor an EM run folder ({RESULTS})")
    if not rows:
        raise ValueError(f"no condition with an accuracy in {[str(i) for i in inputs]}")
    return rows


def figure(inputs: Sequence[str | Path]) -> Any:
    """The figure (a :class:`matplotlib.figure.Figure`): one panel per token column present."""
    from matplotlib.ticker import EngFormatter, NullFormatter

    rows = load(inputs)
    columns = [c for c in X_COLUMNS if any(r.get(c) for r in rows)]
    if not columns:
        raise ValueError("no row has a token count (train_tokens, raw_tokens or effective_raw_tokens)")
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    fig, axes = new_figure(1, len(columns), panel=(5.5, 4.0))
    for ax, column in zip(axes[0], columns):
        for i, cond in enumerate(conditions):
            pts = sorted((r[column], r["accuracy"], r.get("accuracy_se") or 0.0) for r in rows
                         if r["condition"] == cond and r.get(column))
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-",
                        color=f"C{i % 10}", capsize=3, ms=4, label=cond)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter())
        lo, hi = ax.get_xlim()
        # within a decade the minor ticks carry the labels; across decades they would crowd
        ax.xaxis.set_minor_formatter(NullFormatter() if hi / lo >= 10 else EngFormatter())
        ax.set_xlabel(X_LABELS[column])
        ax.set_ylabel("accuracy")
        ax.set_title(f"accuracy vs {X_LABELS[column].split(' (')[0]}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        fit_ylim(ax, "accuracy")
        ax.legend(fontsize=7, loc="best")
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    return figure_cli("python -m plots.method_compare", __doc__, "EM run folders or condition CSV files", figure, argv, metric=False)


if __name__ == "__main__":
    sys.exit(main())
