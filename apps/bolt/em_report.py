"""Evaluation of EM models, baseline budgets, and the results table and plot of an EM run.

Per model: accuracy on the world's few-shot task (the latent variant for latent-trained models:
they write their own thought before answering; the raw variant for raw baselines), validation
NLL per raw token and per character on held-out raw documents (positive; lower is better), and
for latent models the n-sample ELBO per raw token (log-likelihood scale; higher is better).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lingua.args import load_config
from lingua.io import atomic_write_json, atomic_write_text, read_jsonl

if TYPE_CHECKING:  # pragma: no cover
    from apps.bolt.em import EMDriver

logger = logging.getLogger("apps.bolt.em")

ACCURACY = "accuracy"
NLL = "val_nll_per_token"
ELBO = "elbo_4_per_token"


def _accuracy(summary: dict) -> float:
    """The task's exact-match value (first filter) from an eval summary."""
    for key, value in sorted(summary["summary"].items()):
        if "/exact_match/" in key:
            return float(value["mean"])
    raise KeyError(f"no exact_match metric in eval summary keys {sorted(summary['summary'])}")


def evaluate_model(driver: "EMDriver", name: str, ckpt: Path, latent: bool) -> dict[str, Any]:
    from apps.bolt import eval as eval_stage
    from apps.bolt.estep import compute_elbo
    from apps.bolt.evaluation.in_training import ValidationNLL, load_documents
    from lingua.consolidated import load_consolidated
    from lingua.generation import Engine

    c = driver.cfg
    ecfg = load_config(
        eval_stage.EvalArgs, c.eval.config,
        [*c.eval.overrides, f"ckpt={ckpt}", f"data_root={driver.data}", f"variant={'latent' if latent else 'raw'}",
         f"device={c.device}"],
    )
    model, tok = load_consolidated(ckpt, device=c.device)
    engine = Engine(model, tok, max_batch_tokens=ecfg.max_batch_tokens)
    summary = eval_stage.run(ecfg, backend=engine)
    out: dict[str, Any] = {"ckpt": str(ckpt), "variant": summary.get("variant"), ACCURACY: _accuracy(summary)}
    docs = load_documents(driver.data / "validation", c.eval_val_docs)
    nll = ValidationNLL(docs, tok, source="validation").compute(engine)
    out[NLL] = nll["val/validation/nll_per_token"]
    out["val_nll_per_char"] = nll["val/validation/nll_per_char"]
    if latent and c.eval_elbo_docs:
        est = driver.estep_config("eval", ckpt)
        elbo = compute_elbo(engine, docs[: c.eval_elbo_docs], num_samples=[1, 2, 4], seed=0,
                            max_latent_tokens=est.posterior.max_latent_tokens)
        out.update({k: v for k, v in elbo.items() if k.endswith("per_token")})
    logger.info("[em] eval %s: %s", name, {k: v for k, v in out.items() if k != "ckpt"})
    return out


def raw_fraction(driver: "EMDriver", latents_dir: Path, max_docs: int = 2000) -> dict[str, float]:
    """Share of raw-text tokens in the packed latent training stream (``random`` layout, BOS/EOS
    counted as in packing), measured on the latent dataset with a fixed seed. The paper's
    latent/raw token ratio is about 3.3 (a raw share of about 0.3)."""
    from apps.bolt.formats import make_layout, raw_text
    from lingua.tokenizer import TokenizerArgs, build_tokenizer

    targs = load_config(TokenizerArgs, None, [o.removeprefix("tokenizer.") for o in driver.tokenizer_overrides])
    tok = build_tokenizer(targs)
    layout = make_layout("random")
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
            if n >= max_docs:
                break
        if n >= max_docs:
            break
    if not packed:
        raise ValueError(f"no documents in {latents_dir} to measure the raw share")
    return {"raw_fraction": raw / packed, "latent_to_raw_ratio": packed / raw, "docs_measured": n}


# ------------------------------------------------------------------------------ the report


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = float(np.mean(vals))
    se = float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else None
    return mean, se


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per (group, iteration, K): mean and standard error over trials."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["group"], r["iteration"], r["k"]), []).append(r)
    out = []
    for (group, it, k), rs in groups.items():
        line: dict[str, Any] = {"group": group, "iteration": it, "k": k, "trials": len(rs)}
        for metric in (ACCURACY, NLL, "elbo_1_per_token", ELBO):
            mean, se = _mean_se([r.get(metric) for r in rs])
            if mean is not None:
                line[metric] = mean
                line[f"{metric}_se"] = se
        out.append(line)
    return out


def _fmt(line: dict, key: str, digits: int = 3) -> str:
    if key not in line:
        return "-"
    se = line.get(f"{key}_se")
    return f"{line[key]:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def format_table(lines: list[dict]) -> str:
    header = ("model", "iter", "K", "trials", "accuracy", "val NLL/token", "ELBO-4/token")
    body = [
        (
            ln["group"], "-" if ln["iteration"] is None else str(ln["iteration"]), "-" if ln["k"] is None else str(ln["k"]),
            str(ln["trials"]), _fmt(ln, ACCURACY), _fmt(ln, NLL), _fmt(ln, ELBO),
        )
        for ln in lines
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *map(fmt, body)])


def write_report(driver: "EMDriver", rows: list[dict]) -> dict:
    lines = aggregate(rows)
    table = format_table(lines)
    budgets_file = driver.root / "baseline_budgets.json"
    result = {
        "name": driver.cfg.name,
        "rows": rows,
        "summary": lines,
        "baseline_budgets": json.loads(budgets_file.read_text()) if budgets_file.is_file() else None,
        "stage_seconds": driver.stage_seconds(),
    }
    atomic_write_json(driver.root / "results.json", result)
    atomic_write_text(driver.root / "results.md", f"# EM results: {driver.cfg.name}\n\n{table}\n")
    try:
        from plots.plot_utils import plot_em_accuracy

        plot_em_accuracy(result, driver.root / "accuracy.png")
    except ImportError as e:  # matplotlib is a base requirement; keep the report even without it
        logger.warning("no plot: %s", e)
    print(f"\nEM results ({driver.root}):\n{table}\n")
    return result
