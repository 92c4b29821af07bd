"""Reading run folders for the figures.

* an EM run folder (``apps.bolt.em``'s ``dump_dir``): ``results.json`` (``apps.bolt.em_report``),
  ``budgets.json`` and ``baseline_budgets.json`` (``apps.bolt.em``), its training runs under
  ``runs/<run>/``;
* a training run folder (``lingua.trainer``): ``metrics.jsonl`` (one line per logged step:
  ``loss/train``, ``tokens/total``, and on evaluation steps ``val/<source>/nll_per_token``,
  ``val/<source>/elbo_<n>_per_token``, ``eval/<task>/exact_match/<filter>``),
  ``metrics.eval.jsonl`` (in-training task evaluations), ``config.yaml``,
  ``final_consolidated.json`` (with the tokens seen), ``checkpoints/<step>/train_state.json``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

RESULTS = "results.json"  # apps.bolt.em_report.write_report
METRICS = "metrics.jsonl"  # lingua.trainer
EVAL_METRICS = "metrics.eval.jsonl"  # apps.bolt.evaluation.in_training.TaskEvalHook
FINAL = "final_consolidated.json"  # apps.bolt.em_exec
_ELBO_KEY = re.compile(r"^val/.+/elbo_\d+_per_token$")


def read_json(path: str | Path) -> Any:
    """The JSON content of ``path``, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL file (split on ``\\n`` only); blank lines and a torn line (a run
    still writing) are skipped. A missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for raw in path.read_text(encoding="utf-8").split("\n"):
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return out


def load_em_result(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: an EM run folder has it once its report has run "
                                "(python -m apps.bolt.em config=...)")
    return json.loads(path.read_text(encoding="utf-8"))


def training_runs(run_dir: str | Path) -> list[Path]:
    """The training runs of an EM run folder (``runs/*`` with a ``metrics.jsonl``), or the folder
    itself when it is a training run; sorted by name."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS).is_file():
        return [run_dir]
    runs = run_dir / "runs"
    return sorted(d for d in runs.iterdir() if (d / METRICS).is_file()) if runs.is_dir() else []


def _config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _data_shards(run: Path, cfg: dict) -> int:
    """Data shards of the run (its last checkpoint's record, else the config, else 1)."""
    states = sorted((run / "checkpoints").glob("*/train_state.json")) if (run / "checkpoints").is_dir() else []
    if states:
        state = read_json(states[-1]) or {}
        if state.get("data_shards"):
            return int(state["data_shards"])
    return int((cfg.get("distributed") or {}).get("data_shards") or 1)


def tokens_per_step(run: str | Path, lines: list[dict] | None = None) -> float | None:
    """Training tokens per optimizer step: from a logged ``tokens/total`` (its step's share), else
    the config's batch size x sequence length x gradient accumulation x data shards."""
    run = Path(run)
    for ln in reversed(lines if lines is not None else read_jsonl(run / METRICS)):
        if ln.get("tokens/total") and ln.get("step"):
            return float(ln["tokens/total"]) / float(ln["step"])
    cfg = _config(run)
    data = cfg.get("data") or {}
    if not data.get("batch_size") or not data.get("seq_len"):
        return None
    return float(data["batch_size"] * data["seq_len"] * max(1, int(cfg.get("grad_acc_steps") or 1)) * _data_shards(run, cfg))


def train_tokens(run: str | Path) -> int | None:
    """Tokens the run trained on: ``final_consolidated.json``'s tokens seen, else the last logged
    ``tokens/total``, else the config's ``num_tokens`` budget; None when none is there."""
    run = Path(run)
    seen = ((read_json(run / FINAL) or {}).get("summary") or {}).get("tokens_seen")
    if seen:
        return int(sum(seen.values()))
    totals = [ln["tokens/total"] for ln in read_jsonl(run / METRICS) if ln.get("tokens/total")]
    if totals:
        return int(totals[-1])
    budget = _config(run).get("num_tokens")
    return int(budget) if budget and budget > 0 else None


def is_curve_key(key: str) -> bool:
    """Metrics drawn over training tokens: losses, held-out NLL and ELBOs, task exact match."""
    return (key in ("loss/train", "val/loss") or (key.startswith("val/") and key.endswith("/nll_per_token"))
            or bool(_ELBO_KEY.match(key)) or (key.startswith("eval/") and "/exact_match/" in key))


def curves(run: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (tokens, values)}`` of a training run, by step (a step logged twice keeps its
    last value), from ``metrics.jsonl`` and ``metrics.eval.jsonl``. Tokens: the line's
    ``tokens/total``, else its step x :func:`tokens_per_step`."""
    run = Path(run)
    lines = read_jsonl(run / METRICS)
    per_step = tokens_per_step(run, lines)
    by_key: dict[str, dict[int, tuple[float, float]]] = {}
    for ln in lines + read_jsonl(run / EVAL_METRICS):
        step = ln.get("step")
        if not isinstance(step, int):
            continue
        tokens = ln.get("tokens/total")
        if tokens is None and per_step is not None:
            tokens = step * per_step
        if tokens is None:
            continue
        for key, value in ln.items():
            if is_curve_key(key) and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                by_key.setdefault(key, {})[step] = (float(tokens), float(value))
    out = {}
    for key, points in sorted(by_key.items()):
        pts = [points[s] for s in sorted(points)]
        out[key] = ([t for t, _ in pts], [v for _, v in pts])
    return out
