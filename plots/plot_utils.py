"""Plot helpers that redraw the paper's figures from run folders.

* :func:`load_run_metrics` reads ``metrics.eval.jsonl`` (one flat line per evaluation) of runs;
* :func:`plot_em_accuracy` draws accuracy per EM iteration against the warmstart and the raw
  baselines from an EM run's ``results.json`` (the bootstrap figure of the paper, toy scale);
* :func:`smooth` and :func:`envelope` are the reference's post-processing (rolling mean, running
  best).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


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


def plot_em_accuracy(result: dict[str, Any], path: str | Path, metric: str = "accuracy") -> Path:
    """Accuracy per bootstrap iteration (mean ± SE over trials), the warmstart as a dashed line
    and each raw baseline (and K ablation) as a horizontal band; when the run measured latent
    quality (a world with an oracle), a second panel with the thoughts per iteration: the share
    the E-step got right (what the iteration trained on; SIR against a uniform pick) and the
    share of evaluation problems whose generated thought is right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = result["summary"]
    boot = sorted((ln for ln in lines if ln["group"] == "bootstrap" and metric in ln), key=lambda ln: ln["iteration"])
    quality = [ln for ln in boot if ln.get("trained_on", {}).get("selected_correct") is not None]
    fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(12 if quality else 7.5, 4), dpi=120, squeeze=False)
    ax = axes[0][0]
    if boot:
        xs = [ln["iteration"] for ln in boot]
        ys = np.array([ln[metric] for ln in boot])
        se = np.array([ln.get(f"{metric}_se") or 0.0 for ln in boot])
        ax.plot(xs, ys, "o-", color="C0", label="BoLT (bootstrap latents)")
        ax.fill_between(xs, ys - se, ys + se, color="C0", alpha=0.2)
    xmax = max([ln["iteration"] for ln in boot] + [1])
    styles = {"warmstart": ("k", "--"), "raw_token_match": ("C1", ":"), "raw_flops_match": ("C3", "-.")}
    for i, ln in enumerate(l for l in lines if l["group"] != "bootstrap" and metric in l):
        color, style = styles.get(ln["group"], (f"C{4 + i}", (0, (3, 1, 1, 1))))
        label = ln["group"].replace("_", " ") + (f" (K={ln['k']})" if ln.get("k") else "")
        ax.hlines(ln[metric], 0, xmax, colors=color, linestyles=style, label=label)
        if ln.get(f"{metric}_se"):
            ax.fill_between([0, xmax], ln[metric] - ln[f"{metric}_se"], ln[metric] + ln[f"{metric}_se"],
                            color=color, alpha=0.1)
    ax.set_xlabel("bootstrap iteration")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_xticks(range(xmax + 1))
    ax.set_title(f"{result.get('name', 'EM')}: {metric} per iteration")
    values = [ln[metric] for ln in lines if metric in ln]
    if values and min(values) >= 0:
        ax.set_ylim(bottom=0)  # accuracies from 0: small gaps are not drawn as large ones (not ELBOs)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # off the data
    ax.grid(alpha=0.3)
    if quality:
        _plot_thoughts(axes[0][1], lines, quality, xmax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_thoughts(ax: Any, lines: list[dict], boot: list[dict], xmax: int) -> None:
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
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
