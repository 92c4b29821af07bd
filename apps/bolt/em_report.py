"""Baseline budgets and the results table and plot of an EM run (the per-model metrics come
from :mod:`apps.bolt.em_eval`: accuracy, validation NLL per raw token, ELBO per raw token)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from apps.bolt.em_eval import ACCURACY, NLL, THOUGHT
from apps.bolt.em_exec import run_name_of
from lingua.io import atomic_write_json, atomic_write_text, read_jsonl

logger = logging.getLogger("apps.bolt.em")

ELBO = "elbo_4_per_token"
FINETUNE = "finetune_accuracy"  # the finetuning evaluation's accuracy (EMArgs.finetune_eval)



def raw_fraction(tokenizer_args: Any, latents_dir: Path, max_docs: int | None = None, layout_name: str = "random") -> dict[str, float]:
    """Share of raw-text tokens in the packed latent training stream (``layout_name``, BOS/EOS
    counted as in packing), measured on the latent dataset (all of it unless ``max_docs``) with a
    fixed seed; also the totals (``raw_tokens``, ``packed_tokens``: one epoch). The paper's
    latent/raw token ratio is about 3.3 (a raw share of about 0.3). A document with several
    records (WRAP repeats) counts its raw text once per record, so the ratio is per pass."""
    from apps.bolt.formats import make_layout, raw_text
    from lingua.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_args)
    layout = make_layout(layout_name)
    rng = np.random.default_rng(0)
    raw = packed = 0
    files = sorted(latents_dir.glob("*.jsonl"))
    n = 0
    for f in files:
        for rec in read_jsonl(f):
            spans = layout(rec, rng)
            text = spans if isinstance(spans, str) else "".join(s for s, _ in spans)
            raw += len(tok.encode(raw_text(rec))) + 2
            packed += len(tok.encode(text)) + 2
            n += 1
            if max_docs is not None and n >= max_docs:
                break
        if max_docs is not None and n >= max_docs:
            break
    if not packed:
        raise ValueError(f"no documents in {latents_dir} to measure the raw share")
    return {"raw_fraction": raw / packed, "latent_to_raw_ratio": packed / raw, "docs_measured": n,
            "raw_tokens": raw, "packed_tokens": packed}


# ------------------------------------------------------------------------------ the report


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = float(np.mean(vals))
    se = float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else None
    return mean, se


def latents_of(group: str, iteration: int | None, k: int | None) -> str | None:
    """The E-step dataset a model of this row was trained on (None: teacher data or raw)."""
    if group == "bootstrap":
        return f"iter{iteration}_latents"
    if group.startswith("ablation_k"):
        return f"iter1_k{k}_latents"
    return None


def estep_quality(data: Path) -> dict[str, dict]:
    """Latent quality of every E-step of the run (its lineage's ``quality``), by dataset name, with
    the model that wrote the thoughts (its run name), K and the sampling temperature."""
    out = {}
    for lineage in sorted(data.glob("*_latents/lineage.json")):
        info = json.loads(lineage.read_text())
        q = info.get("quality")
        if q:
            out[lineage.parent.name] = {**{k: v for k, v in q.items() if k != "tally"},
                                        "model": run_name_of(info.get("model", "")),
                                        "num_samples": info.get("num_samples"), "temperature": info.get("temperature")}
    return out


def format_estep_table(quality: dict[str, dict]) -> str:
    """One line per E-step: whose thoughts, how many right, and what importance resampling did."""
    if not quality:
        return ""

    def f(x, fmt=".3f") -> str:
        return "-" if x is None else format(x, fmt)

    rows = ["| E-step data | thoughts by | K | T | chunks with a thought | kept right | SIR / uniform / argmax / best-of-K "
            "| one sample | equations true | log-weight gap (nats) | right beats wrong |", "|" + "---|" * 11]
    order = sorted(quality, key=lambda n: (not n.startswith("iter"), len(n), n))
    for name in order:
        q = quality[name]
        sel = q["selector"]
        rows.append(f"| {name} | {q['model']} | {q['num_samples']} | {q['temperature']} | {q['chunks_with_thought']} | "
                    f"{f(q['selected_correct'])} | {f(sel['sir'])} / {f(sel['uniform'])} / {f(sel['argmax'])} / "
                    f"{f(sel['best_of_k'])} | {f(sel['sample'])} | {f(q['equation_truth'])} | "
                    f"{f(q['log_weight_gap'], '+.2f')} | {f(q['right_beats_wrong'])} |")
    return "\n".join(rows)


def binomial_se(p: float, n: int) -> float:
    return float(np.sqrt(p * (1 - p) / n)) if n else float("nan")


def aggregate(rows: list[dict], quality: dict[str, dict] | None = None) -> list[dict]:
    """One line per (group, iteration, K): mean and standard error over trials (with one trial,
    the accuracy's SE is the binomial one over the evaluated problems, ``accuracy_se_kind``),
    plus the quality of the thoughts the model was trained on, where measured."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["group"], r["iteration"], r["k"]), []).append(r)
    out = []
    for (group, it, k), rs in groups.items():
        line: dict[str, Any] = {"group": group, "iteration": it, "k": k, "trials": len(rs)}
        for metric in (ACCURACY, NLL, "elbo_1_per_token", ELBO, THOUGHT):
            mean, se = _mean_se([r.get(metric) for r in rs])
            if mean is not None:
                line[metric] = mean
                line[f"{metric}_se"] = se
        n = rs[0].get("n_problems")
        if len(rs) == 1 and n and ACCURACY in line:
            line[f"{ACCURACY}_se"] = binomial_se(line[ACCURACY], n)
            line[f"{ACCURACY}_se_kind"] = f"binomial, n={n}"
        elif len(rs) > 1:
            line[f"{ACCURACY}_se_kind"] = f"over {len(rs)} trials"
        per_task = _per_task(rs)
        if len(per_task) > 1:  # the table's accuracy averages them: show each benchmark too
            line["accuracy_by_task"] = per_task
        mean, se = _mean_se([r.get(FINETUNE) for r in rs])
        if mean is not None:  # the same SE rule: over trials, or binomial over problems for one trial
            line[FINETUNE] = mean
            line[f"{FINETUNE}_se"] = rs[0].get("finetune_accuracy_se") if len(rs) == 1 else se
            for key in sorted({k for r in rs for k in r if k.startswith(("finetune_pass@", "finetune_maj@"))}):
                line[key] = _mean_se([r.get(key) for r in rs])[0]
        name = latents_of(group, it, k)
        if quality and name in quality:
            line["trained_on"] = {"latents": name, **quality[name]}
        out.append(line)
    return out


def _task_n(row: dict, task: str) -> int | None:
    """Problems of ``task`` in one evaluation (lm-eval may name it with a variant prefix)."""
    counts = row.get("n_by_task") or {}
    hits = [n for name, n in counts.items() if name == task or name.endswith("_" + task)]
    return hits[0] if len(hits) == 1 else None


def _per_task(rs: list[dict]) -> dict[str, dict]:
    """Accuracy per benchmark: mean and SE over trials, or for one trial the binomial SE over
    that benchmark's problems (with its n)."""
    tasks = sorted({t for r in rs for t in (r.get("accuracy_by_task") or {})})
    out = {}
    for task in tasks:
        mean, se = _mean_se([(r.get("accuracy_by_task") or {}).get(task) for r in rs])
        entry: dict[str, Any] = {"accuracy": mean, "accuracy_se": se, "trials": len(rs)}
        n = _task_n(rs[0], task)
        if n:
            entry["n"] = n
            if len(rs) == 1:
                entry["accuracy_se"] = binomial_se(mean, n)
        out[task] = entry
    return out


def _fmt(line: dict, key: str, digits: int = 3) -> str:
    if key not in line:
        return "-"
    se = line.get(f"{key}_se")
    return f"{line[key]:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _fmt_task(line: dict, task: str) -> str:
    entry = line.get("accuracy_by_task", {}).get(task)
    if not entry:
        return "-"
    n = f" ({entry['n']})" if entry.get("n") else ""
    return _fmt(entry, "accuracy") + n


def _trained_on(line: dict) -> tuple[str, str]:
    """(correct share of the thoughts it trained on, SIR vs uniform pick) or dashes."""
    q = line.get("trained_on")
    if not q or q.get("selected_correct") is None:
        return ("oracle", "-") if line["group"] == "warmstart" else ("-", "-")
    sel = q["selector"]
    return f"{q['selected_correct']:.3f}", f"{sel['sir']:.3f} / {sel['uniform']:.3f}"


def format_table(lines: list[dict]) -> str:
    finetuned = any(FINETUNE in ln for ln in lines)
    tasks = sorted({t for ln in lines for t in ln.get("accuracy_by_task", {})})
    header = ("model", "iter", "K", "trials", "accuracy" + (" (mean of tasks)" if tasks else ""),
              *(f"{t} (n)" for t in tasks), "thoughts right (eval)", "trained on: thoughts right",
              "SIR / uniform", "val NLL/token", "ELBO-4/token") + (("finetuned accuracy",) if finetuned else ())
    body = [
        (
            ln["group"], "-" if ln["iteration"] is None else str(ln["iteration"]), "-" if ln["k"] is None else str(ln["k"]),
            str(ln["trials"]), _fmt(ln, ACCURACY), *(_fmt_task(ln, t) for t in tasks), _fmt(ln, THOUGHT),
            *_trained_on(ln), _fmt(ln, NLL), _fmt(ln, ELBO),
        ) + ((_fmt(ln, FINETUNE),) if finetuned else ())
        for ln in lines
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *map(fmt, body)])


def write_report(root: Path, name: str, rows: list[dict], stage_seconds: dict[str, float]) -> dict:
    """``results.json``, ``results.md``, ``accuracy.png`` and ``bootstrap.png`` of the EM run in ``root`` (its data in
    ``root/data``): the per-model ``rows``, aggregated over trials, and the E-step table."""
    quality = estep_quality(root / "data")
    lines = aggregate(rows, quality)
    table = format_table(lines)
    budgets_file = root / "baseline_budgets.json"
    result = {
        "name": name,
        "rows": rows,
        "summary": lines,
        "baseline_budgets": json.loads(budgets_file.read_text()) if budgets_file.is_file() else None,
        "estep_quality": quality,
        "stage_seconds": stage_seconds,
    }
    atomic_write_json(root / "results.json", result)
    esteps = format_estep_table(quality)
    text = f"# EM results: {name}\n\n{table}\n"
    if esteps:
        text += f"\n## Thoughts written by each E-step (graded against the oracle)\n\n{esteps}\n"
    atomic_write_text(root / "results.md", text)
    try:
        from plots.bootstrap import plot_run
        from plots.plot_utils import plot_em_accuracy

        plot_em_accuracy(result, root / "accuracy.png")
        plot_run(root, root / "bootstrap.png")  # per iteration and over training tokens (docs/figures.md)
    except ImportError as e:  # matplotlib is a base requirement; keep the report even without it
        logger.warning("no plot: %s", e)
    print(f"\nEM results ({root}):\n{table}\n")
    if esteps:
        print(f"E-steps (thoughts graded against the oracle):\n{esteps}\n")
    return result
