"""Evaluate a checkpoint on few-shot CoT tasks through lm-evaluation-harness.

    python -m apps.bolt.eval ckpt=RUN/checkpoints/STEP tasks=synthetic_cot
    python -m apps.bolt.eval config=apps/bolt/configs/eval_benchmarks_local.yaml ckpt=... seeds=[0,1,2]

``ckpt`` may be a consolidated folder, a run's ``checkpoints/<step>/`` (consolidated on demand)
or a run folder (its newest checkpoint). ``tasks`` are base names (``gsm8k_cot``,
``hendrycks_math_cot``, ``mmlu_stem_cot``, ``synthetic_cot``); with ``variant=auto`` a model
trained with the ``random`` or ``prior`` layout gets the ``latent_`` versions.

Prints the results table, writes the results under ``<consolidated>/eval/<eval_id>/`` (see
:mod:`apps.bolt.evaluation.runner`) and adds one flat line to ``RUN/metrics.eval.jsonl``.
Rerunning an evaluation that completed with the same settings prints its table and does nothing
else (``overwrite=true`` redoes it). On a cluster, one such job per checkpoint is submitted with
:func:`apps.bolt.evaluation.in_training.launch_eval`. See docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.bolt.evaluation.options import HarnessOptions
from lingua.args import check_min
from lingua.backends import check_backend
from lingua.errors import entry_point

logger = logging.getLogger("apps.bolt.eval")


@dataclass
class EvalArgs:
    ckpt: str = ""
    """Consolidated folder, ``RUN/checkpoints/<step>/`` or ``RUN/``."""
    tasks: str = "synthetic_cot"
    """Comma-separated task or group names, without the ``latent_`` prefix."""
    variant: str = "auto"
    """``auto`` (from the run's training layout), ``raw`` or ``latent``."""
    data_root: str = ""
    """Local data root (offline): hub datasets are read from ``<root>/<path>/<name>/<split>.jsonl``
    and ``dataset_path: json`` tasks resolve their files against it. Empty: hub datasets."""
    include_path: str = ""
    """Task folder; empty: the shipped ``apps/bolt/configs/tasks``."""
    harness: HarnessOptions = field(default_factory=HarnessOptions)
    device: str = "cpu"
    backend: str = "engine"
    """``engine`` (in-process, ``device``) | ``vllm`` (CUDA; ``pip install -e .[vllm]``)."""
    max_batch_tokens: int = 16384
    """Token budget of one forward in the engine (memory bound)."""
    out_dir: str = ""
    """Results folder; empty: ``<consolidated>/eval/<eval_id>``."""
    metrics_file: str = ""
    """Where the flat metrics line goes; empty: ``RUN/metrics.eval.jsonl`` (none when the
    checkpoint is not inside a run); ``none``: nowhere."""
    overwrite: bool = False
    """Redo an evaluation that already completed with the same settings."""

    def validate(self) -> None:
        if self.variant not in ("auto", "raw", "latent"):
            raise ValueError(f"variant must be auto, raw or latent, got {self.variant!r}")
        if not [t for t in self.tasks.split(",") if t.strip()]:
            raise ValueError("tasks is empty")
        check_backend(self.backend)
        check_min(self, 1, "max_batch_tokens")

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


def eval_id(cfg: EvalArgs, variant: str) -> str:
    """Name of one evaluation setting: the tasks plus a hash of everything that changes numbers."""
    from lingua.args import to_dict

    harness = to_dict(cfg.harness)
    if cfg.harness.limit is None:  # the subset rule changes nothing when every document is scored
        harness.pop("subset", None)
        harness.pop("subset_seed", None)
    keyed = {"tasks": cfg.task_list(), "variant": variant, "data_root": cfg.data_root, "harness": harness}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:8]
    return f"{'+'.join(cfg.task_list())}-{digest}"


def run(cfg: EvalArgs, *, backend: Any = None) -> dict[str, Any]:
    """Evaluate and write results; returns ``summary.json``'s content.

    ``backend``: serve the model from this :class:`~lingua.generation.GenerationBackend` instead
    of loading ``ckpt`` (tests, or a vLLM server); ``ckpt`` then only locates the run, if given.
    """
    from apps.bolt.evaluation.checkpoints import resolve_checkpoint
    from apps.bolt.evaluation.results import format_table, metrics_line, record_metrics
    from apps.bolt.evaluation.runner import evaluate_tasks, write_outcome
    from apps.bolt.evaluation.subset import describe as describe_subset
    from apps.bolt.evaluation.tasks import TASKS_DIR, TaskLibrary, apply_variant, variant_for_layout
    from lingua.args import to_dict
    from lingua.io import is_done

    ref = resolve_checkpoint(cfg.ckpt) if cfg.ckpt else None
    if ref is None and backend is None:
        raise ValueError("ckpt is required (a consolidated folder, RUN/checkpoints/STEP or RUN)")
    variant = cfg.variant if cfg.variant != "auto" else variant_for_layout(ref.layout if ref else None)
    tasks = apply_variant(cfg.task_list(), variant)
    eid = eval_id(cfg, variant)
    if cfg.out_dir:
        out_dir = Path(cfg.out_dir)
    elif ref is not None:
        out_dir = ref.results_dir / eid
    else:
        raise ValueError("out_dir is required when no ckpt is given")
    summary_path = out_dir / "summary.json"
    if is_done(out_dir) and summary_path.is_file() and not cfg.overwrite:
        done = json.loads(summary_path.read_text())
        if done.get("eval_id") == eid:
            print(format_table(done["summary"], f"{eid} (already complete: {out_dir})"))
            if cfg.harness.limit is not None:
                for line in describe_subset(done.get("subset")):
                    print(f"documents: {line}")
            return done

    from lingua.args import dump_config

    dump_config(cfg, out_dir / "config.yaml")
    library = TaskLibrary(cfg.include_path or TASKS_DIR, cfg.data_root or None)
    if backend is None:
        from lingua.backends import build_backend

        backend = build_backend(cfg.backend, ref.consolidated, device=cfg.device, max_batch_tokens=cfg.max_batch_tokens)
    logger.info("evaluating %s on %s (variant %s, seeds %s)", ref.consolidated if ref else "backend", tasks, variant, cfg.harness.seeds)
    outcome = evaluate_tasks(backend, tasks, library, cfg.harness)
    info = {
        "eval_id": eid,
        "variant": variant,
        "checkpoint": str(ref.consolidated) if ref else None,
        "step": ref.step if ref else None,
        "layout": ref.layout if ref else None,
        "config": to_dict(cfg),
    }
    write_outcome(out_dir, outcome, info)
    print(format_table(outcome.summary, f"{eid} ({variant} variant, step {info['step']})"))
    if cfg.harness.limit is not None:
        for line in describe_subset(outcome.subset):
            print(f"documents: {line}")
    for seed, lim in zip(cfg.harness.seeds, outcome.limits):
        bound = {k: v for k, v in lim.items() if v and not k.endswith("requests") and k != "rolling_windows"}
        if bound:
            print(f"seed {seed}: limits bound: {bound}")

    metrics_path = _metrics_path(cfg, ref)
    if metrics_path is not None:
        record_metrics(metrics_path, metrics_line(outcome.summary, step=info["step"], variant=variant, eval_id=eid))
        logger.info("metrics line written to %s", metrics_path)
    return json.loads(summary_path.read_text())


def _metrics_path(cfg: EvalArgs, ref: Any) -> Path | None:
    from apps.bolt.evaluation.results import METRICS_FILE

    if cfg.metrics_file == "none":
        return None
    if cfg.metrics_file:
        return Path(cfg.metrics_file)
    return ref.run_dir / METRICS_FILE if ref is not None and ref.run_dir is not None else None


@entry_point("apps.bolt.eval")
def main(argv: list[str] | None = None) -> None:
    from lingua.args import cli_config

    run(cli_config(EvalArgs, argv, "apps.bolt.eval"))


if __name__ == "__main__":
    main()
