"""The data comparison's results: per condition and checkpoint, accuracy (mean ± SE over trials)
against training tokens, raw tokens and effective raw tokens.

Files in the comparison folder (:mod:`apps.bolt.compare`):

* ``results.json``: ``rows`` (one per run and evaluated checkpoint: condition, trial, step,
  train_tokens, accuracy), ``summary`` (one per condition and checkpoint: the mean, its SE over
  trials, the token axes), ``data`` (the scan: ratios, passes, leakage), ``stage_seconds``;
* ``conditions.csv``: the summary in the format :mod:`plots.method_compare` reads (condition,
  train_tokens, raw_tokens, effective_raw_tokens, accuracy, accuracy_se);
* ``results.md``: the final-checkpoint table, the data table and every checkpoint;
* ``compare.png``: the figure (accuracy against each token axis).

Token axes of a checkpoint at ``t`` training tokens, with the condition's measured ratio ``s``
(packed tokens per pass / raw tokens per pass, ``scan.json``): effective raw tokens ``t / s``
(raw-document tokens seen, repeats counted); raw tokens = the unique raw tokens the data was
made from, capped at the effective raw tokens (a fresh-data run has seen only what it read).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from apps.bolt.evaluation.results import mean_se
from lingua.io import atomic_open, atomic_write_json, read_jsonl

CSV_COLUMNS = ("condition", "train_tokens", "raw_tokens", "effective_raw_tokens", "accuracy", "accuracy_se", "trials")


def checkpoint_accuracy(run_dir: Path) -> dict[int, tuple[int, float]]:
    """Step -> (training tokens, task accuracy) of a run's evaluations: the accuracy from
    ``metrics.eval.jsonl`` (the first exact-match metric; a step's last line wins, as a resumed
    run records it again), the tokens from the step's row in ``metrics.jsonl``."""
    path = run_dir / "metrics.eval.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run recorded no evaluation")
    tokens = {int(r["step"]): int(r["tokens"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "tokens" in r and "step" in r}
    out: dict[int, tuple[int, float]] = {}
    for line in read_jsonl(path):
        keys = sorted(k for k in line if k.startswith("eval/") and "/exact_match" in k and not k.endswith("_se"))
        if keys and line.get("step") is not None:
            step = int(line["step"])
            if step not in tokens:
                raise ValueError(f"{run_dir}/metrics.jsonl has no tokens for the evaluated step {step}")
            out[step] = (tokens[step], float(line[keys[0]]))
    return out


def summarize(rows: list[dict], data: dict[str, Any]) -> list[dict]:
    """One line per (condition, checkpoint) with the token axes (module docstring)."""
    by_point: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        by_point[(r["condition"], r["train_tokens"])].append(r["accuracy"])
    order = list(data["conditions"])
    out = []
    for (cond, tokens), accs in sorted(by_point.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        d = data["conditions"][cond]
        effective = tokens / d["ratio"]
        mean, se = mean_se(accs)
        out.append({"condition": cond, "train_tokens": tokens, "effective_raw_tokens": effective,
                    "raw_tokens": min(d["unique_raw_tokens"], effective), "accuracy": mean, "accuracy_se": se,
                    "trials": len(accs)})
    return out


def _fmt(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def markdown(name: str, summary: list[dict], data: dict[str, Any], eval_n: int | None, other: list[dict] = ()) -> str:
    final = {}
    for s in summary:
        final[s["condition"]] = s  # sorted by tokens: the last one is the final checkpoint
    lines = [f"# {name}: data conditions at {data['train_tokens']:,} training tokens", ""]
    n = f", {eval_n} problems per evaluation" if eval_n else ""
    lines += [f"Final checkpoint, mean ± SE over trials{n}:", "",
              "| condition | accuracy | trials | effective raw tokens | unique raw tokens |", "|---|---|---|---|---|"]
    for cond, s in final.items():
        lines.append(f"| {cond} | {_fmt(s['accuracy'], s['accuracy_se'])} | {s['trials']} | {s['effective_raw_tokens']:,.0f} | "
                     f"{data['conditions'][cond]['unique_raw_tokens']:,} |")
    if other:
        lines += ["", "Final models on another prompt (mean ± SE over trials):", "", "| condition | tasks | accuracy | trials |",
                  "|---|---|---|---|"]
        lines += [f"| {o['condition']} | {o['tasks']} | {_fmt(o['accuracy'], o['accuracy_se'])} | {o['trials']} |" for o in other]
    lines += ["", "Data (measured, `scan.json`):", "",
              "| condition | dataset | layout | synthetic-to-raw ratio | packed tokens / pass | passes | statements read | eval problems found |",
              "|---|---|---|---|---|---|---|---|"]
    for cond, d in data["conditions"].items():
        leak = d.get("leakage") or {}
        lines.append(f"| {cond} | {d['dataset']} | {d['layout']} | {d['ratio']:.3f} | {d['packed_tokens']:,} | {d['passes']:.1f} | "
                     f"{leak.get('statements', '-')} | {leak.get('eval_problems_found', 'not scanned')} |")
    lines += ["", "Every checkpoint:", "", "| condition | training tokens | effective raw tokens | accuracy |", "|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['condition']} | {s['train_tokens']:,} | {s['effective_raw_tokens']:,.0f} | {_fmt(s['accuracy'], s['accuracy_se'])} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, summary: list[dict], labels: dict[str, str] | None = None) -> None:
    """``conditions.csv`` (``labels``: the name a condition gets in it, default its own)."""
    labels = labels or {}
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for s in summary:
            row = {k: ("" if s.get(k) is None else s[k]) for k in CSV_COLUMNS}
            w.writerow({**row, "condition": labels.get(s["condition"], s["condition"])})


def other_prompts(others: list[dict]) -> list[dict]:
    """Mean ± SE over trials of the final models on other prompts, per (condition, tasks)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for o in others:
        groups[(o["condition"], o["tasks"])].append(o["accuracy"])
    out = []
    for (cond, tasks), accs in groups.items():
        mean, se = mean_se(accs)
        out.append({"condition": cond, "tasks": tasks, "accuracy": mean, "accuracy_se": se, "trials": len(accs)})
    return out


def write_report(root: Path, cfg: Any, data: dict[str, Any], runs: list[dict], stage_seconds: dict[str, float],
                 eval_n: int | None = None, others: list[dict] = ()) -> dict:
    rows = []
    for r in runs:
        for step, (tokens, acc) in sorted(checkpoint_accuracy(Path(r["run_dir"])).items()):
            rows.append({**{k: r[k] for k in ("condition", "trial", "run")}, "step": step, "train_tokens": tokens, "accuracy": acc})
    summary = summarize(rows, data)
    other = other_prompts(list(others))
    result = {"name": cfg.name, "train_tokens": cfg.train_tokens, "trials": cfg.trials, "eval_problems": eval_n,
              "rows": rows, "summary": summary, "other_prompts": other, "other_prompt_rows": list(others), "data": data,
              "stage_seconds": stage_seconds}
    atomic_write_json(root / "results.json", result)
    write_csv(root / "conditions.csv", summary, getattr(cfg, "labels", None))
    with atomic_open(root / "results.md", "w") as f:
        f.write(markdown(cfg.name, summary, data, eval_n, other))
    from plots.common import save
    from plots.method_compare import figure

    save(figure([root / "conditions.csv"]), root / "compare.png")
    print((root / "results.md").read_text())
    return result
