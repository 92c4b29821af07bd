"""Run lm-eval tasks on a backend, once per seed, and write what came out.

Used by the CLI (``python -m apps.bolt.eval``) and by the in-training task hook, so both produce
the same files:

    <out_dir>/results_seed<S>.json    lm-eval's output for seed S (without samples) + limits + subset
    <out_dir>/samples_seed<S>.jsonl   one line per evaluated document (when log_samples)
    <out_dir>/summary.json            config, per-key mean / standard error over seeds, limits, subset
    <out_dir>/COMPLETE                written last

Documents: ``harness.limit`` selects, per task, the documents chosen by
:mod:`apps.bolt.evaluation.subset` (``harness.subset``: stratified by default, or the first N),
handed to lm-eval as ``samples``; every seed scores the same ones. ``subset`` in the files says
how many documents of how many each task scored, by which rule and seed, and their indices.

Seeds: each seed sets lm-eval's few-shot sampler seed (exemplar order for ``sampler: default``)
and the backend's sampling seed. lm-eval's global ``random``/``numpy``/``torch`` seeding is
switched off so that evaluating inside a training process leaves the trainer's RNG streams alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from apps.bolt.evaluation.harness import BoltLM
from apps.bolt.evaluation.options import HarnessOptions
from apps.bolt.evaluation.results import aggregate_seeds, flatten_results
from apps.bolt.evaluation.standard import std_metric_keys
from apps.bolt.evaluation.subset import describe as describe_subset
from apps.bolt.evaluation.subset import plan as choose_subsets
from apps.bolt.evaluation.subset import record as subset_record
from apps.bolt.evaluation.subset import samples_arg
from apps.bolt.evaluation.tasks import TaskLibrary
from lingua.io import atomic_write_json, atomic_write_text, mark_done

logger = logging.getLogger(__name__)


@dataclass
class EvalOutcome:
    tasks: list[str]
    results: list[dict[str, Any]]
    """lm-eval output per seed (JSON-safe, samples removed)."""
    samples: list[dict[str, list]]
    """Per seed: task -> logged samples (empty without log_samples)."""
    flat: list[dict[str, float]]
    summary: dict[str, dict[str, Any]]
    limits: list[dict[str, int]]
    subset: dict[str, Any] = field(default_factory=dict)
    """Which documents were scored (:func:`apps.bolt.evaluation.subset.record`)."""


def _json_safe(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def evaluate_tasks(backend: Any, tasks: Sequence[str], library: TaskLibrary, opts: HarnessOptions) -> EvalOutcome:
    """Evaluate ``tasks`` (names as shipped, variant already applied) once per seed."""
    import lm_eval

    opts.validate()
    results, samples, flat, limits = [], [], [], []
    subsets = None
    for seed in opts.seeds:
        built = library.build(tasks, opts.num_fewshot)
        if subsets is None:  # the same documents for every seed
            subsets = choose_subsets(built, opts.limit, rule=opts.subset, seed=opts.subset_seed)
            chosen = subset_record(subsets, opts.limit, opts.subset, opts.subset_seed)
            for line in describe_subset(chosen):
                logger.info("documents: %s", line)
        lm = BoltLM(
            backend,
            max_gen_tokens=opts.max_gen_tokens,
            context_window=opts.context_window or None,
            overflow=opts.overflow,
            seed=seed,
        )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=built,
            task_manager=library.manager,
            limit=None,  # the subset goes in as samples (lm-eval's limit would take the first N)
            samples=samples_arg(subsets),
            bootstrap_iters=opts.bootstrap_iters,
            log_samples=opts.log_samples,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            fewshot_random_seed=seed,
        )
        if out is None:  # only on non-zero ranks, which we never use
            raise RuntimeError("lm-eval returned no results")
        samples.append(_json_safe(out.pop("samples", {})))
        res = _json_safe(out)
        res["limits"] = lm.limits.as_dict()
        res["seed"] = seed
        res["subset"] = chosen
        results.append(res)
        flat.append(std_metric_keys(flatten_results(res), library.standard_raw_names))
        limits.append(lm.limits.as_dict())
        logger.info("seed %d done: %s", seed, ", ".join(f"{k}={v:.4f}" for k, v in flat[-1].items()))
    return EvalOutcome(list(tasks), results, samples, flat, aggregate_seeds(flat), limits, chosen)


def write_outcome(out_dir: str | Path, outcome: EvalOutcome, info: dict[str, Any]) -> Path:
    """Write the files listed in the module docstring; ``info`` (config, checkpoint, variant,
    eval id) goes into ``summary.json``. Returns the summary path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "COMPLETE").unlink(missing_ok=True)
    for res, smp in zip(outcome.results, outcome.samples):
        seed = res["seed"]
        atomic_write_json(out / f"results_seed{seed}.json", res)
        if smp:
            lines = [json.dumps({"task": t, **s}, ensure_ascii=False) for t in sorted(smp) for s in smp[t]]
            atomic_write_text(out / f"samples_seed{seed}.jsonl", "".join(x + "\n" for x in lines))
    summary = {**info, "tasks": outcome.tasks, "summary": outcome.summary, "limits": outcome.limits,
               "subset": outcome.subset}
    path = out / "summary.json"
    atomic_write_json(path, summary)
    mark_done(out, {"eval_id": info.get("eval_id")})
    return path
