"""Evaluation results: flat metrics, mean and standard error over seeds, the printed table, and the
line appended to a run's ``metrics.eval.jsonl`` (what the plots read).

Metric keys are ``<task>/<metric>/<filter>`` with the task's *base* name (no ``latent_``
prefix), so raw and latent models of one comparison share keys; the line's ``variant`` field says
which prompts were used. Example line::

    {"step": 200, "variant": "latent", "eval_id": "synthetic_cot-1a2b3c4d", "n_seeds": 3,
     "eval/synthetic_cot/exact_match/flexible-extract": 0.41,
     "eval/synthetic_cot/exact_match/flexible-extract_se": 0.02, ...}

Standard error over seeds is ``std(ddof=1) / sqrt(n)``; with one seed it is absent (the per-seed
lm-eval stderr, over documents, stays in the results JSON).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from apps.bolt.evaluation.tasks import TASK_PREFIX, base_name
from lingua.io import atomic_write_text, read_jsonl

METRICS_FILE = "metrics.eval.jsonl"
_SKIP_KEYS = {"alias", "name", "sample_len", "sample_count", " ", "samples"}


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>/<filter>": value}`` for every numeric, non-stderr result of one
    ``simple_evaluate`` output (tasks and groups; task names as lm-eval reports them, less the
    shipped tasks' ``bolt_`` prefix: ``gsm8k_cot``, ``latent_gsm8k_cot``)."""
    flat: dict[str, float] = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        task = task[len(TASK_PREFIX) :] if task.startswith(TASK_PREFIX) else task
        for key, value in metrics.items():
            if key in _SKIP_KEYS or "," not in key or "_stderr," in key:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):  # "N/A" stderr placeholders and the like
                continue
            metric, filt = key.split(",", 1)
            flat[f"{task}/{metric}/{filt}"] = number
    return flat


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for fewer than two values)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate_seeds(per_seed: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """``{key: {"mean", "se", "n", "values"}}`` over the seeds that report ``key``."""
    keys = sorted({k for r in per_seed for k in r})
    out = {}
    for k in keys:
        values = [r[k] for r in per_seed if k in r]
        mean, se = mean_se(values)
        out[k] = {"mean": mean, "se": se, "n": len(values), "values": values}
    return out


def metrics_line(summary: dict[str, dict[str, Any]], *, step: int | None, variant: str, eval_id: str) -> dict[str, Any]:
    """The flat line for ``metrics.eval.jsonl`` (keys use base task names)."""
    n = max((v["n"] for v in summary.values()), default=0)
    line: dict[str, Any] = {"step": step, "variant": variant, "eval_id": eval_id, "n_seeds": n}
    for key, v in summary.items():
        task, rest = key.split("/", 1)
        name = f"eval/{base_name(task)}/{rest}"
        line[name] = v["mean"]
        if v["se"] is not None:
            line[f"{name}_se"] = v["se"]
    return line


def format_table(summary: dict[str, dict[str, Any]], title: str = "") -> str:
    """A plain-text table: task, metric, filter, mean, standard error, seeds."""
    rows = [("task", "metric", "filter", "value", "± se", "seeds")]
    for key, v in summary.items():
        task, metric, filt = key.split("/", 2)
        se = "" if v["se"] is None else f"{v['se']:.4f}"
        rows.append((task, metric, filt, f"{v['mean']:.4f}", se, str(v["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(([title] if title else []) + lines)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock next to ``path`` (eval jobs of one run may finish together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_metrics(path: str | os.PathLike, line: dict[str, Any]) -> None:
    """Add ``line`` to the metrics file, replacing an earlier line with the same step and
    ``eval_id`` (a rerun of the same evaluation), so the file never holds duplicates. The
    file is rewritten atomically under a lock."""
    import json

    path = Path(path)
    with _locked(path):
        old = list(read_jsonl(path)) if path.is_file() else []
        kept = [r for r in old if not (r.get("step") == line["step"] and r.get("eval_id") == line["eval_id"])]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*kept, line])
        atomic_write_text(path, text)
