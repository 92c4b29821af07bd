"""Plot helpers that redraw the paper's figures from run folders.

* :func:`load_run_metrics` reads ``metrics.eval.jsonl`` (one flat line per evaluation) of runs;
* :func:`plot_em_accuracy` draws accuracy (or another per-model metric) per EM iteration against
  the warmstart and the raw baselines from an EM run's ``results.json`` (``accuracy.png`` of the
  EM report); :func:`plot_thoughts` its thought-quality panel. The full bootstrap figure (ELBO,
  NLL, curves over training tokens) is :mod:`plots.bootstrap`;
* :func:`smooth` and :func:`envelope` are the reference's post-processing (rolling mean, running
  best).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from plots.common import draw_per_iteration, new_figure, save


def load_run_metrics(run_dirs: Iterable[str | Path], file: str = "metrics.eval.jsonl") -> dict[str, list[dict]]:
    """``{run name: [metric lines sorted by step]}`` for every run folder that has the file."""
    out: dict[str, list[dict]] = {}
    for d in run_dirs:
        p = Path(d) / file
        if p.is_file():
            lines = [json.loads(x) for x in p.read_text().split("\n") if x.strip()]
            out[Path(d).name] = sorted(lines, key=lambda r: (r.get("step") is None, r.get("step") or 0))
    return out


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing rolling mean (window shrinks at the start)."""
    a = np.asarray(values, dtype=float)
    return [float(a[max(0, i - window + 1) : i + 1].mean()) for i in range(len(a))]


def envelope(values: list[float], higher_is_better: bool = True) -> list[float]:
    """Best value so far (cummax for accuracies and ELBOs, cummin for losses)."""
    a = np.asarray(values, dtype=float)
    return list(map(float, np.maximum.accumulate(a) if higher_is_better else np.minimum.accumulate(a)))


def em_accuracy_figure(result: dict[str, Any], metric: str = "accuracy") -> Any:
    """The figure of :func:`plot_em_accuracy` (a :class:`matplotlib.figure.Figure`)."""
    lines = result["summary"]
    quality = _quality_lines(lines)
    fig, axes = new_figure(1, 2 if quality else 1, panel=(6.0 if quality else 7.5, 4.0))
    ax = axes[0][0]
    draw_per_iteration(ax, lines, metric, legend_outside=True)
    ax.set_title(f"{result.get('name', 'EM')}: {metric} per iteration")
    if quality:
        plot_thoughts(axes[0][1], lines)
    return fig


def plot_em_accuracy(result: dict[str, Any], path: str | Path, metric: str = "accuracy") -> Path:
    """Accuracy per bootstrap iteration (mean ± SE over trials), the warmstart as a dashed line
    and each raw baseline (and K ablation) as a horizontal band; when the run measured latent
    quality (a world with an oracle), a second panel with the thoughts per iteration: the share
    the E-step got right (what the iteration trained on; SIR against a uniform pick) and the
    share of evaluation problems whose generated thought is right. Shares (accuracy) are drawn
    from 0; other metrics (``elbo_4_per_token``: negative; ``val_nll_per_token``) on an axis that
    fits their values."""
    return save(em_accuracy_figure(result, metric), path)


def _quality_lines(lines: list[dict]) -> list[dict]:
    boot = sorted((ln for ln in lines if ln["group"] == "bootstrap"), key=lambda ln: ln["iteration"])
    return [ln for ln in boot if (ln.get("trained_on") or {}).get("selected_correct") is not None]


def plot_thoughts(ax: Any, lines: list[dict], legend_outside: bool = True) -> bool:
    """Thought quality per iteration on ``ax`` from summary lines; False (nothing drawn) when the
    run did not grade its thoughts."""
    boot = _quality_lines(lines)
    if not boot:
        return False
    xmax = max([ln["iteration"] for ln in lines if ln["group"] == "bootstrap"] + [1])
    xs = [ln["iteration"] for ln in boot]
    sel = [ln["trained_on"]["selector"] for ln in boot]
    ax.plot(xs, [ln["trained_on"]["selected_correct"] for ln in boot], "o-", color="C0", label="E-step: kept thought right")
    ax.plot(xs, [s["uniform"] for s in sel], "x:", color="C0", alpha=0.6, label="E-step: uniform pick (expected)")
    ax.plot(xs, [s["best_of_k"] for s in sel], "^:", color="C2", alpha=0.6, label="E-step: best of K")
    evals = [(ln["iteration"], ln["thought_correct"]) for ln in lines
             if ln["group"] in ("warmstart", "bootstrap") and ln.get("thought_correct") is not None]
    if evals:
        evals.sort()
        ax.plot([x for x, _ in evals], [y for _, y in evals], "s--", color="C3", label="eval: generated thought right")
    ax.set_xlabel("bootstrap iteration (E-step t uses the model of iteration t-1)")
    ax.set_ylabel("share of thoughts equal to the oracle's")
    ax.set_xticks(range(xmax + 1))
    ax.set_ylim(0, 1)
    ax.set_title("thought quality")
    if legend_outside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return True
