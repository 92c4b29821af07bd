"""What the figures of this package share.

* which metrics are shares (accuracy, thoughts right, pass@k: their axis starts at 0) and which
  are not (ELBO, NLL, losses: the axis fits the data, never forced to 0);
* how a model of an EM run is named (run ``<model>_t<trial>``; model ``warmstart``, ``iter<t>``,
  ``iter1_k<K>``, ``raw_token_match``, ...) and drawn (colour, line style, legend label);
* the per-iteration panel: the bootstrap iterations as a line with a standard-error band, the
  warmstart, the raw baselines and K ablations as horizontal lines with their bands;
* figures without pyplot (no global state, no backend switch: safe inside a notebook) and saving.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SHARE_MARKERS = ("accuracy", "correct", "exact_match", "pass@", "maj@")
"""A metric whose name contains one of these is a share in [0, 1]."""

BOOTSTRAP_LABEL = "BoLT (bootstrap latents)"
STYLES = {"warmstart": ("k", "--"), "raw_token_match": ("C1", ":"), "raw_flops_match": ("C3", "-.")}
"""Colour and line style of the groups every EM run has; others get the next free colour."""

_RUN = re.compile(r"^(?P<model>.+?)_t(?P<trial>\d+)$")
_ITER = re.compile(r"^iter(?P<it>\d+)(?:_k(?P<k>\d+))?$")


def is_share(metric: str) -> bool:
    return any(m in metric for m in SHARE_MARKERS)


def short_name(metric: str) -> str:
    """A metric's name in titles (``val/heldout/elbo_4_per_token`` -> ``ELBO-4 per token``)."""
    last = metric.split("/")[-1]
    m = re.fullmatch(r"elbo_(\d+)_per_token", last)
    if m:
        return f"ELBO-{m.group(1)} per token"
    if last in ("val_nll_per_token", "nll_per_token"):
        return "NLL per token"
    if metric == "loss/train":
        return "training loss"
    if metric.startswith("eval/"):
        return metric[len("eval/"):]
    if metric.startswith("finetune_"):
        return "finetuned " + metric[len("finetune_"):].replace("_", " ")
    return metric.replace("_", " ")


def metric_label(metric: str) -> str:
    """Axis label of a metric key: its name, with units and direction where they help."""
    name = short_name(metric)
    if name.startswith("ELBO"):
        return f"{name} (nats, higher is better)"
    if name == "NLL per token":
        return f"{name} (nats, lower is better)"
    if name == "training loss":
        return f"{name} (nats per token)"
    return name


def fit_ylim(ax: Any, metric: str) -> None:
    """Shares from 0 (a small gap is not drawn as a large one); everything else (ELBO,
    negative; NLL, around its values) keeps the range of its data."""
    ax.relim()
    ax.autoscale_view()
    if is_share(metric):
        ax.set_ylim(bottom=0)


def split_run(name: str) -> tuple[str, int | None]:
    """``iter2_t1`` -> (``iter2``, 1); a name without a trial suffix -> (name, None)."""
    m = _RUN.match(name)
    return (m.group("model"), int(m.group("trial"))) if m else (name, None)


def model_key(model: str) -> tuple[str, int | None, int | None]:
    """(group, iteration, K) of an EM model name, as the EM report groups its rows:
    ``warmstart`` -> iteration 0; ``iter<t>`` -> ``bootstrap``; ``iter1_k<K>`` -> ``ablation_k<K>``;
    anything else (raw baselines, other conditions) is its own group without an iteration."""
    if model == "warmstart":
        return "warmstart", 0, None
    m = _ITER.match(model)
    if m:
        it, k = int(m.group("it")), m.group("k")
        return (f"ablation_k{k}", it, int(k)) if k else ("bootstrap", it, None)
    return model, None, None


def group_label(group: str, k: int | None = None) -> str:
    if group == "bootstrap":
        return BOOTSTRAP_LABEL
    return group.replace("_", " ") + (f" (K={k})" if k else "")


def group_style(group: str, index: int = 0) -> tuple[str, Any]:
    """(colour, line style) of a group; ``index`` numbers the groups without a fixed style."""
    return STYLES.get(group, (f"C{(4 + index) % 10}", (0, (3, 1, 1, 1))))


def iteration_colour(iteration: int) -> str:
    """Colours of bootstrap iterations 1, 2, ... in curves where each has its own line."""
    return ("C0", "C9", "C2", "C8", "C5", "C6")[(iteration - 1) % 6]


def draw_per_iteration(ax: Any, lines: list[dict], metric: str, *, legend_outside: bool = False,
                       series_label: str = BOOTSTRAP_LABEL) -> int:
    """Draw ``metric`` of summary lines (``group``, ``iteration``, ``k``, ``<metric>``,
    ``<metric>_se``, as ``results.json``'s ``summary``) on ``ax``: the bootstrap group per
    iteration, every other group as a horizontal line, each with its SE band. Returns the
    number of series drawn (0: the panel says the metric is missing)."""
    have = [ln for ln in lines if ln.get(metric) is not None]
    boot = sorted((ln for ln in have if ln["group"] == "bootstrap"), key=lambda ln: ln["iteration"])
    xmax = max([ln["iteration"] for ln in boot] + [1])
    if boot:
        xs = [ln["iteration"] for ln in boot]
        ys = [float(ln[metric]) for ln in boot]
        se = [float(ln.get(f"{metric}_se") or 0.0) for ln in boot]
        ax.plot(xs, ys, "o-", color="C0", label=series_label)
        ax.fill_between(xs, [y - s for y, s in zip(ys, se)], [y + s for y, s in zip(ys, se)], color="C0", alpha=0.2)
    others = [ln for ln in have if ln["group"] != "bootstrap"]
    free = [g for g in dict.fromkeys(ln["group"] for ln in others) if g not in STYLES]
    for ln in others:
        color, style = group_style(ln["group"], free.index(ln["group"]) if ln["group"] in free else 0)
        y = float(ln[metric])
        ax.hlines(y, 0, xmax, colors=color, linestyles=style, label=group_label(ln["group"], ln.get("k")))
        se = ln.get(f"{metric}_se")
        if se:
            ax.fill_between([0, xmax], y - se, y + se, color=color, alpha=0.1)
    ax.set_xlabel("bootstrap iteration")
    ax.set_ylabel(metric_label(metric))
    ax.set_xticks(range(xmax + 1))
    ax.set_xlim(-0.2, xmax + 0.2)
    ax.grid(alpha=0.3)
    drawn = (1 if boot else 0) + len(others)
    if not drawn:
        no_data(ax, short_name(metric))
        return 0
    fit_ylim(ax, metric)
    if legend_outside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7, loc="best")
    return drawn


def no_data(ax: Any, what: str) -> None:
    """An empty panel that says what is missing (its ticks removed, its title and labels kept)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes, color="0.4")


def new_figure(nrows: int, ncols: int, panel: tuple[float, float] = (5.0, 3.6)) -> tuple[Any, Any]:
    """A figure of ``nrows`` x ``ncols`` panels (a 2-D array of axes), without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=120, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` (PNG, or any format matplotlib knows by the suffix); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def figure_cli(prog: str, doc: str | None, inputs_help: str, draw: Any, argv: Any = None, metric: bool = False) -> int:
    """The command of a figure module (``python -m plots.<name> INPUT... --out FIG.png``):
    ``draw(inputs)`` (or ``draw(inputs, metric)`` with ``metric``) builds the figure; bad inputs
    are one ``error:`` line and exit status 2."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR", help=inputs_help)
    parser.add_argument("--out", required=True, help="figure file (PNG, or another suffix matplotlib writes)")
    if metric:
        parser.add_argument("--metric", default="accuracy", help="sweep column: accuracy (default), pass@k, maj@k")
    args = parser.parse_args(argv)
    try:
        path = save(draw(args.inputs, args.metric) if metric else draw(args.inputs), args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
