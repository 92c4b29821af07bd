"""The bootstrap figure of EM runs: accuracy, ELBO and NLL per EM iteration, and over training tokens.

    python -m plots.bootstrap RUN_DIR [RUN_DIR ...] --out FIG.png

``RUN_DIR`` is an EM run folder (``apps.bolt.em``'s ``dump_dir``). Two rows of three panels per
run folder:

1. per EM iteration (``results.json``'s ``summary``: mean and SE over trials): accuracy, ELBO-4
   per raw token, validation NLL per raw token. The bootstrap iterations are a line with an SE
   band; the warmstart, the raw baselines and K ablations horizontal lines with their bands.
   Raw baselines have no ELBO (no thoughts to sample): they appear in the accuracy and NLL panels.
   A fourth panel shows the thoughts per iteration where the world has an oracle (as in
   ``accuracy.png``: share right among those the E-step kept, uniform pick, best of K, and the
   share of evaluation problems whose generated thought is right).
2. over training tokens, one colour per model (trials share it): the curves every training run
   logged in ``runs/<run>/metrics.jsonl`` and ``metrics.eval.jsonl`` (in-training task exact
   match, ``val/<source>/elbo_4_per_token``, ``val/<source>/nll_per_token``) and, as markers, the
   run's final evaluation (``results.json`` rows) at the tokens it trained on; the fourth panel
   is the training loss (on the run's own stream: thoughts included for latent models, so not
   comparable with the held-out NLL per raw token).

A run still going (no ``results.json`` yet) shows its training curves only. Accuracy axes start
at 0; ELBO and NLL axes fit their values. :func:`plot_run` is what the EM
demo calls.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plots.common import (
    figure_cli,
    draw_per_iteration,
    fit_ylim,
    group_label,
    group_style,
    iteration_colour,
    metric_label,
    model_key,
    new_figure,
    no_data,
    save,
    short_name,
    split_run,
)
from plots.plot_utils import plot_thoughts
from plots.runs import RESULTS, curves, load_em_result, train_tokens, training_runs

ACCURACY, ELBO, NLL = "accuracy", "elbo_4_per_token", "val_nll_per_token"
"""Per-model metrics of ``apps.bolt.em_eval`` (``ACCURACY``, ``NLL``) and ``apps.bolt.em_report.ELBO``."""
PANELS = (ACCURACY, ELBO, NLL)
LOSS = "loss/train"


def _curve_key(keys: Sequence[str], metric: str) -> str | None:
    """The logged key of a training run that shows ``metric`` (the first source in sorted order)."""
    if metric == ACCURACY:
        match = [k for k in keys if k.startswith("eval/") and "/exact_match/" in k]
    elif metric == ELBO:
        match = [k for k in keys if k.startswith("val/") and k.endswith("/elbo_4_per_token")]
    else:
        match = [k for k in keys if k.startswith("val/") and k.endswith("/nll_per_token")]
    return sorted(match)[0] if match else None


def _run_order(name: str) -> tuple:
    """Warmstart, then the iterations in order, then every other model (by name); trials in order."""
    model, trial = split_run(name)
    group, it, _ = model_key(model)
    return (0 if group == "warmstart" else 1 if group == "bootstrap" else 2, it or 0, model, trial or 0)


def _model_style(model: str, others: list[str]) -> tuple[str, str]:
    """(colour, legend label) of a model in the curves row."""
    group, it, k = model_key(model)
    if group == "bootstrap":
        return iteration_colour(it), f"iteration {it}"
    color, _ = group_style(group, others.index(group) if group in others else 0)
    return color, group_label(group, k)


def _draw_curves(axes: Sequence[Any], run_dir: Path, result: dict) -> None:
    """The second row: the three metrics and the training loss over training tokens (module docstring)."""
    from matplotlib.ticker import EngFormatter

    runs = {r.name: r for r in training_runs(run_dir)}
    names = sorted(set(runs) | {r["run"] for r in result.get("rows", []) if r.get("run")}, key=_run_order)
    models = {name: split_run(name)[0] for name in names}
    others = [g for g in dict.fromkeys(model_key(m)[0] for m in models.values()) if g not in ("bootstrap", "warmstart")]
    logged = {name: curves(runs[name]) for name in names if name in runs}
    tokens = {name: train_tokens(runs[name]) for name in names if name in runs}
    rows = {r["run"]: r for r in result.get("rows", []) if r.get("run")}
    for ax, metric in zip(axes, (*PANELS, LOSS)):
        labelled: set[str] = set()
        drawn = 0
        for name in names:
            color, label = _model_style(models[name], others)
            shown = label if label not in labelled else "_nolegend_"
            series = logged.get(name, {})
            key = LOSS if metric == LOSS else _curve_key(list(series), metric)
            if key and key in series:
                xs, ys = series[key]
                ax.plot(xs, ys, ".-", color=color, alpha=0.8, lw=1.2, ms=3, label=shown)
                labelled.add(label)
                shown, drawn = "_nolegend_", drawn + 1
            final = rows.get(name, {}).get(metric)
            if final is not None and tokens.get(name):
                ax.plot([tokens[name]], [final], "o", color=color, ms=5, label=shown)
                labelled.add(label)
                drawn += 1
        ax.set_xlabel("training tokens")
        ax.set_ylabel(metric_label(metric))
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
        if drawn:
            fit_ylim(ax, metric)
            ax.legend(fontsize=7, loc="best")
        else:
            no_data(ax, f"{short_name(metric)} logged over tokens")


def _result(run_dir: Path) -> dict:
    """The run's ``results.json``; a run still going (no report yet) draws its training curves."""
    if not (run_dir / RESULTS).is_file() and training_runs(run_dir):
        return {"name": run_dir.name, "rows": [], "summary": []}
    return load_em_result(run_dir)


def figure(run_dirs: Sequence[str | Path]) -> Any:
    """The figure (a :class:`matplotlib.figure.Figure`) of one or more EM run folders."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("no EM run folder given")
    results = [_result(d) for d in run_dirs]
    fig, axes = new_figure(2 * len(run_dirs), len(PANELS) + 1)
    for i, (run_dir, result) in enumerate(zip(run_dirs, results)):
        name = result.get("name") or run_dir.name
        lines = result.get("summary", [])
        for ax, metric in zip(axes[2 * i], PANELS):
            draw_per_iteration(ax, lines, metric)
            ax.set_title(f"{name}: {short_name(metric)} per iteration", fontsize=10)
        if not plot_thoughts(axes[2 * i][-1], lines, legend_outside=False):
            no_data(axes[2 * i][-1], "thought quality (no oracle)")
        axes[2 * i][-1].set_title(f"{name}: thoughts per iteration", fontsize=10)
        _draw_curves(axes[2 * i + 1], run_dir, result)
        for ax, metric in zip(axes[2 * i + 1], (*PANELS, LOSS)):
            ax.set_title(f"{name}: {short_name(metric)} over training tokens", fontsize=10)
    return fig


def plot_run(run_dir: str | Path, out_png: str | Path) -> Path:
    """Write the bootstrap figure of one EM run folder to ``out_png``; returns its path."""
    return save(figure([run_dir]), out_png)


def main(argv: Sequence[str] | None = None) -> int:
    return figure_cli("python -m plots.bootstrap", __doc__, "EM run folders (with results.json)", figure, argv, metric=False)


if __name__ == "__main__":
    sys.exit(main())
