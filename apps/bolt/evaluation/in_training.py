"""Evaluation during training: hooks for ``lingua.trainer.train(eval_hooks=...)`` and the launcher
hook that evaluates a checkpoint as a separate job.

Every hook is a callable ``(model, step, run_dir) -> {metric: value}`` (``lingua.trainer.EvalHook``);
the trainer calls them every ``eval.every`` steps, at ``eval.must_eval_steps`` and at the final
step, on every rank, with the model in eval mode, and logs rank 0's dict into ``metrics.jsonl``
(each row with ``step`` and ``tokens``).

* :class:`ValidationNLL`: negative log-likelihood of held-out raw documents, per token and per
  character. **Sign:** reported as a positive number, ``-sum log p(x_t | x_<t) / count``. The
  reference called the (negative) log-likelihood itself "nll"; its plots negated it. A document
  is conditioned on BOS; one longer than the window is cut to its first ``window - 1`` tokens
  (counted in ``docs_truncated``; its characters are those of the kept tokens).
* :class:`ValidationELBO`: the n-sample ELBO (n = 1, 2, 4) of held-out documents under uniform
  chunking with the full prefix as context, computed by :func:`apps.bolt.posterior.compute_elbo`;
  this module only schedules it and names the metrics.
* :class:`TaskEvalHook`: the lm-eval tasks (e.g. ``synthetic_cot``) on the live model, in
  process; results go to ``RUN/evals/<step>/<eval_id>/`` and a line to ``RUN/metrics.eval.jsonl``.
* :class:`LaunchEvalHook` (``eval.mode=launch``): one job per evaluation step through
  ``lingua.launch`` (``cat`` prints it, ``run`` runs it here, ``launch`` submits it to slurm, or
  to local processes with ``cluster=local``), for models too large to evaluate inside the training
  job. The job, ``python -m apps.bolt.evaluation.in_training ckpt=RUN/checkpoints/<step>``
  (:func:`evaluate_checkpoint`), runs the hooks above on that checkpoint with the run's own
  ``eval`` section, adds one line (``eval_id: in_training``, ``step``, ``tokens``, the same metric
  keys) to ``RUN/metrics.eval.jsonl`` and then drops the checkpoint's pending-evaluation record, so
  cleanup may remove it. :func:`eval_curve` reads a run's evaluations, either mode, by step.
* :func:`launch_eval`: the task evaluation ``python -m apps.bolt.eval`` of one checkpoint as a job.

In a multi-process run every rank computes the same numbers (keeping FSDP collectives in step);
only rank 0 writes files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from apps.bolt.evaluation.options import HarnessOptions
from lingua.errors import ExpectedError, entry_point
from lingua.launch import LaunchArgs
from lingua.trainer import EvalArgs

logger = logging.getLogger(__name__)

EVAL_JOB_MODULE = "apps.bolt.evaluation.in_training"
"""The per-checkpoint evaluation job of launch mode (``python -m`` this module ``ckpt=...``)."""
IN_TRAINING_EVAL_ID = "in_training"
"""``eval_id`` of the job's line in ``RUN/metrics.eval.jsonl``."""
JOBS_LAUNCHED = "eval/jobs_launched"
"""The launch hook's metric (1.0: the job started); bookkeeping, not an evaluation result."""

def _is_main_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _engine(model: Any, tokenizer: Any, max_batch_tokens: int) -> Any:
    from lingua.generation import Engine

    return Engine(model, tokenizer, max_batch_tokens=max_batch_tokens)


def load_documents(path: str | Path, max_docs: int, text_key: str = "text") -> list[str]:
    """The first ``max_docs`` documents (non-empty ``text_key``) of a jsonl file or of a folder's
    ``*.jsonl`` files in sorted order (:func:`lingua.io.read_docs`: bad lines are counted and
    logged by ``file:line``, not used)."""
    from lingua.io import read_docs

    p = Path(path)
    docs = [d.record[text_key] for d in read_docs(p, text_key, limit=max_docs, nonblank=True)]
    if not docs:
        raise ValueError(f"{p}: no documents with a non-empty {text_key!r} field")
    return docs


class ValidationNLL:
    """Held-out NLL per token and per character (positive numbers; see the module docstring)."""

    def __init__(self, docs: Sequence[str], tokenizer: Any, *, source: str = "heldout", max_tokens: int = 0, max_batch_tokens: int = 16384):
        if not docs:
            raise ValueError("ValidationNLL needs at least one document")
        self.docs = list(docs)
        self.tokenizer = tokenizer
        self.source = source
        self.max_tokens = max_tokens
        self.max_batch_tokens = max_batch_tokens

    def __call__(self, model: Any, step: int, run_dir: Path) -> dict[str, float]:
        return self.compute(_engine(model, self.tokenizer, self.max_batch_tokens))

    def compute(self, backend: Any) -> dict[str, float]:
        """The metrics for any backend (the hook builds an in-process engine)."""
        tok = self.tokenizer
        window = self.max_tokens or backend.max_seq_len
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        pairs, chars, truncated = [], 0, 0
        for text in self.docs:
            ids = tok.encode(text)
            if len(ids) > window - 1:
                ids = ids[: window - 1]
                truncated += 1
                chars += len(tok.decode(ids))
            else:
                chars += len(text)
            pairs.append(([start], ids))
        scores = backend.score(pairs, max_len=window, add_bos=False)
        nll = -sum(s.sum_logprob for s in scores)
        tokens = sum(s.num_tokens for s in scores)
        p = f"val/{self.source}"
        return {
            f"{p}/nll_per_token": nll / max(tokens, 1),
            f"{p}/nll_per_char": nll / max(chars, 1),
            f"{p}/docs": float(len(self.docs)),
            f"{p}/tokens": float(tokens),
            f"{p}/docs_truncated": float(truncated),
        }


class ValidationELBO:
    """n-sample ELBOs of held-out documents, every ``every`` steps, at ``steps`` (the must-evaluate
    steps) and at ``final_step`` (the trainer sets it through :meth:`plan`)."""

    def __init__(
        self,
        docs: Sequence[str],
        tokenizer: Any,
        *,
        source: str = "heldout",
        elbo_samples: Sequence[int] = (1, 2, 4),
        every: int = 0,
        final_step: int | None = None,
        steps: Sequence[int] = (),
        seed: int = 0,
        max_batch_tokens: int = 16384,
        compute_elbo: Optional[Callable[..., dict[str, float]]] = None,
    ):
        if not elbo_samples or min(elbo_samples) < 1:
            raise ValueError(f"elbo_samples must be positive sample counts, got {list(elbo_samples)}")
        if compute_elbo is None:
            from apps.bolt.posterior import compute_elbo
        self.compute_elbo = compute_elbo
        self.docs = list(docs)
        self.tokenizer = tokenizer
        self.source = source
        self.elbo_samples = sorted(set(elbo_samples))
        self.every = every
        self.final_step = final_step
        self.steps = set(steps)
        self.seed = seed
        self.max_batch_tokens = max_batch_tokens

    def plan(self, total_steps: int) -> None:
        """Called by the trainer before training: the run's final step, whose ELBO always runs."""
        self.final_step = total_steps

    def due(self, step: int) -> bool:
        """Whether the ELBO runs at ``step`` (it costs sampling, so it may run less often than
        the other hooks): every ``every`` steps, at ``steps`` and ``final_step``, or always when
        ``every`` is 0."""
        return not self.every or step % self.every == 0 or step == self.final_step or step in self.steps

    def __call__(self, model: Any, step: int, run_dir: Path) -> dict[str, float]:
        if not self.due(step):
            return {}
        return self.compute(_engine(model, self.tokenizer, self.max_batch_tokens))

    def compute(self, backend: Any) -> dict[str, float]:
        out = self.compute_elbo(backend, self.docs, elbo_samples=self.elbo_samples, seed=self.seed)
        return {f"val/{self.source}/{k}": float(v) for k, v in out.items()}


class TaskEvalHook:
    """lm-eval tasks on the live model; writes results and the ``metrics.eval.jsonl`` line."""

    def __init__(self, tasks: Sequence[str], tokenizer: Any, *, variant: str, data_root: str | None,
                 harness: HarnessOptions, include_path: str | Path | None = None, max_batch_tokens: int = 16384):
        from apps.bolt.evaluation.tasks import TASKS_DIR, TaskLibrary, apply_variant

        self.base_tasks = list(tasks)
        self.tasks = apply_variant(tasks, variant)
        self.variant = variant
        self.tokenizer = tokenizer
        self.harness = harness
        self.max_batch_tokens = max_batch_tokens
        self.library = TaskLibrary(include_path or TASKS_DIR, data_root)
        for name in self.tasks:  # fail at setup, not after the first training interval
            self.library.leaf_tasks(name)

    @property
    def eval_id(self) -> str:
        return f"{'+'.join(self.base_tasks)}-intrain"

    def __call__(self, model: Any, step: int, run_dir: Path) -> dict[str, float]:
        from apps.bolt.evaluation.results import METRICS_FILE, metrics_line, record_metrics
        from apps.bolt.evaluation.runner import evaluate_tasks, write_outcome

        outcome = evaluate_tasks(_engine(model, self.tokenizer, self.max_batch_tokens), self.tasks, self.library, self.harness)
        line = metrics_line(outcome.summary, step=step, variant=self.variant, eval_id=self.eval_id)
        if _is_main_rank():
            info = {"eval_id": self.eval_id, "variant": self.variant, "step": step, "checkpoint": None}
            write_outcome(Path(run_dir) / "evals" / f"{step:010d}" / self.eval_id, outcome, info)
            record_metrics(Path(run_dir) / METRICS_FILE, line)
        return {k: v for k, v in line.items() if k.startswith("eval/")}


# -------------------------------------------------------------------------- separate jobs
def launch_eval(ckpt_dir: str | Path, launch: Any, overrides: Sequence[str] = ()) -> int:
    """Evaluate ``ckpt_dir`` as its own ``python -m apps.bolt.eval`` job (tasks only) through
    ``lingua.launch`` with the given ``LaunchArgs`` (mode ``cat``/``run``/``launch``; resources
    such as ``gpus`` and ``partition`` come from it). ``overrides`` are eval config overrides,
    e.g. ``["config=apps/bolt/configs/eval_synthetic.yaml"]``. Returns the launcher's exit code."""
    import dataclasses

    from lingua.launch import run as launch_run

    args = dataclasses.replace(launch, module="apps.bolt.eval", shards=0)
    return launch_run(args, [*overrides, f"ckpt={Path(ckpt_dir)}"])


class LaunchEvalHook:
    """Start the job ``python -m <launch.module> <job_args> ckpt=<checkpoint>`` for the checkpoint
    saved at this step (the trainer saves before it runs the hooks; with ``eval.mode=launch`` it
    saves one at every evaluation step). Steps without a complete checkpoint are skipped with a
    warning. The checkpoint's pending-evaluation record gets the command (before the launch: a job
    may finish at once) and stays until the job drops it; when the launch fails the record says so
    and a resumed run launches again. Only rank 0 launches."""

    def __init__(self, launch: Any, job_args: Sequence[str] = ()):
        self.launch = launch
        self.job_args = list(job_args)

    def command(self, folder: Path) -> list[str]:
        import dataclasses

        from lingua.launch import commands

        return commands(dataclasses.replace(self.launch, shards=0), [*self.job_args, f"ckpt={folder}"])[0]

    def __call__(self, model: Any, step: int, run_dir: Path) -> dict[str, float]:
        import dataclasses
        import shlex

        from lingua.checkpoint import mark_eval_pending, read_eval_pending, step_folder
        from lingua.io import is_done
        from lingua.launch import job_folder
        from lingua.launch import run as launch_run

        folder = step_folder(Path(run_dir).resolve() / "checkpoints", step)
        if not is_done(folder):
            logger.warning("step %d: no complete checkpoint at %s; no eval job launched", step, folder)
            return {}
        if not _is_main_rank():
            return {}
        record = read_eval_pending(folder)
        info = {**(record or {"step": step}), "launched": True, "command": shlex.join(self.command(folder)),
                "launch_mode": self.launch.mode, "job_logs": str(job_folder(self.launch))}
        if record is not None:
            mark_eval_pending(folder, info)
        try:
            code = launch_run(dataclasses.replace(self.launch, shards=0), [*self.job_args, f"ckpt={folder}"])
            error = f"launcher exited with {code}" if code else None
        except Exception as e:  # noqa: BLE001 - training goes on; the record makes a resume retry
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            logger.error("eval job for %s not launched: %s", folder, error)
            if record is not None and read_eval_pending(folder) is not None:
                mark_eval_pending(folder, {**info, "launched": False, "error": error})
        return {JOBS_LAUNCHED: float(error is None)}


def _eval_launch_args() -> LaunchArgs:
    return LaunchArgs(mode="launch", module=EVAL_JOB_MODULE, job_name="bolt_eval")


@dataclass
class InTrainingEvalArgs(EvalArgs):
    """What a training run evaluates as it goes, and when (``every``, ``must_eval_steps``,
    ``keep_checkpoints``, ``mode``: :class:`lingua.trainer.EvalArgs`); the train app's ``eval``
    section."""

    val_docs: str = ""
    """Held-out raw documents (a jsonl file or a folder of them); empty: no NLL/ELBO hooks."""
    val_docs_source: str = ""
    """Instead of ``val_docs``: a folder under ``data.root_dir`` (e.g. ``validation``), for
    templates whose data root is set per run (the EM driver's)."""
    val_source: str = "heldout"
    """Name in the metric keys: ``val/<source>/nll_per_token`` etc."""
    val_max_docs: int = 1000
    val_max_tokens: int = 0
    """Window for scoring a document (0: the model's max_seqlen)."""
    elbo: str = "auto"
    """``auto``: for models trained with a latent layout (random/prior), ``on``, ``off``."""
    elbo_samples: list[int] = field(default_factory=lambda: [1, 2, 4])
    elbo_max_docs: int = 0
    """The ELBO scores only the first N held-out documents (it samples K thoughts per chunk);
    0: all ``val_max_docs``."""
    elbo_every: int = 0
    """Steps between ELBO evaluations, on top of the final and must-evaluate steps (0: whenever
    the hooks run)."""
    tasks: str = ""
    """Comma-separated lm-eval tasks to run in process (e.g. ``synthetic_cot``); empty: none."""
    data_root: str = ""
    harness: HarnessOptions = field(default_factory=HarnessOptions)
    max_batch_tokens: int = 16384
    launch: LaunchArgs = field(default_factory=_eval_launch_args)
    """``mode=launch``: how each evaluation job starts (``lingua.launch``: ``mode`` cat/run/launch,
    ``cluster`` slurm/local, ``gpus``, ``partition``, ``time_min``, ``setup``, ...). ``module`` is
    the job's entry point, called with ``launch_args`` and ``ckpt=RUN/checkpoints/<step>``."""
    launch_args: list[str] = field(default_factory=list)
    """Extra arguments of each evaluation job, e.g. ``[device=cuda]``."""

    def validate(self) -> None:
        super().validate()
        if self.elbo not in ("auto", "on", "off"):
            raise ValueError(f"elbo must be auto, on or off, got {self.elbo!r}")
        if self.val_docs and self.val_docs_source:
            raise ValueError("set val_docs or val_docs_source, not both")
        if self.elbo_max_docs < 0 or self.val_max_docs < 1:
            raise ValueError(f"val_max_docs must be >= 1 and elbo_max_docs >= 0, got {self.val_max_docs}, {self.elbo_max_docs}")
        if self.launch.shards or self.launch.nproc != 1 or self.launch.nodes != 1:
            raise ValueError("launch: an evaluation job is one process (shards=0, nproc=1, nodes=1)")

    def evaluates(self) -> bool:
        """Whether anything is configured to evaluate (held-out documents or tasks)."""
        return bool(self.val_docs or self.val_docs_source or self.tasks)

    def docs_path(self, data_root_dir: str = "") -> str:
        """The held-out documents: ``val_docs``, or ``val_docs_source`` under ``data_root_dir``."""
        if self.val_docs_source:
            if not data_root_dir:
                raise ExpectedError(f"eval.val_docs_source={self.val_docs_source!r} needs data.root_dir")
            return str(Path(data_root_dir) / self.val_docs_source)
        return self.val_docs


def build_eval_hooks(args: InTrainingEvalArgs, tokenizer: Any, *, layout: str, final_step: int | None = None,
                     data_root_dir: str = "") -> list[Callable]:
    """The hooks ``args`` asks for, for a run trained with ``layout`` (``elbo=auto``: the ELBO for
    latent layouts only); ``data_root_dir`` resolves ``val_docs_source``. With ``mode=launch``: the
    one hook that starts an evaluation job per checkpoint (the job builds the others), or none
    when there is nothing to evaluate."""
    from apps.bolt.evaluation.tasks import LATENT_LAYOUTS, variant_for_layout

    docs_path = args.docs_path(data_root_dir)
    if args.mode == "launch":
        if docs_path and not Path(docs_path).exists():  # fail now, not in the first job
            raise ExpectedError(f"eval held-out documents not found: {docs_path}")
        return [LaunchEvalHook(args.launch, args.launch_args)] if args.evaluates() else []
    hooks: list[Callable] = []
    if docs_path:
        docs = load_documents(docs_path, args.val_max_docs)
        hooks.append(ValidationNLL(docs, tokenizer, source=args.val_source, max_tokens=args.val_max_tokens, max_batch_tokens=args.max_batch_tokens))
        if args.elbo == "on" or (args.elbo == "auto" and layout in LATENT_LAYOUTS):
            elbo_docs = docs[: args.elbo_max_docs] if args.elbo_max_docs else docs
            hooks.append(ValidationELBO(elbo_docs, tokenizer, source=args.val_source, elbo_samples=args.elbo_samples,
                                        every=args.elbo_every, final_step=final_step, steps=args.must_eval_steps,
                                        max_batch_tokens=args.max_batch_tokens))
    if args.tasks:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        hooks.append(TaskEvalHook(names, tokenizer, variant=variant_for_layout(layout), data_root=args.data_root or None,
                                  harness=args.harness, max_batch_tokens=args.max_batch_tokens))
    return hooks


# ------------------------------------------------------------------- the per-checkpoint job
@dataclass
class CheckpointEvalArgs:
    """``python -m apps.bolt.evaluation.in_training ckpt=RUN/checkpoints/<step> [device=cuda]``"""

    ckpt: str = ""
    """A complete training checkpoint folder ``RUN/checkpoints/<step>``."""
    device: str = "auto"
    """``auto``: cuda when available, else cpu."""

    def validate(self) -> None:
        if not self.ckpt:
            raise ValueError("ckpt is required (RUN/checkpoints/<step>)")


def run_hooks(hooks: Sequence[Callable], model: Any, step: int, run_dir: Path) -> dict[str, Any]:
    """The hooks' results as the trainer logs them (keys without a "/" get ``eval/``)."""
    out: dict[str, Any] = {}
    for hook in hooks:
        for k, v in (hook(model, step, run_dir) or {}).items():
            out[k if "/" in k else f"eval/{k}"] = v
    return out


def evaluate_checkpoint(cfg: CheckpointEvalArgs) -> dict[str, Any]:
    """The launch-mode job: the run's in-training evaluation (its saved ``eval`` section, in
    process) of one checkpoint; adds the ``in_training`` line (``step``, ``tokens``, metrics) to
    ``RUN/metrics.eval.jsonl`` (a rerun replaces it), then drops the checkpoint's pending record.
    Returns the line. The weights are read from the shards; nothing is written into the checkpoint."""
    import dataclasses
    import json

    import torch
    import yaml

    from apps.bolt.evaluation.checkpoints import training_layout
    from apps.bolt.evaluation.results import METRICS_FILE, record_metrics
    from lingua.args import from_dict
    from lingua.checkpoint import CONFIG, TRAIN_STATE, clear_eval_pending, load_model
    from lingua.consolidated import load_tokenizer
    from lingua.io import is_done

    step_dir = Path(cfg.ckpt).resolve()
    if not (is_done(step_dir) and (step_dir / TRAIN_STATE).is_file() and step_dir.parent.name == "checkpoints"):
        raise ExpectedError(f"{step_dir} is not a complete training checkpoint (RUN/checkpoints/<step> with COMPLETE)")
    run_dir = step_dir.parent.parent
    saved = yaml.safe_load((step_dir / CONFIG).read_text()) or {}
    args = from_dict(InTrainingEvalArgs, saved.get("eval") or {}, f"{step_dir / CONFIG} (eval section)")
    state = json.loads((step_dir / TRAIN_STATE).read_text())
    step, tokens = int(state["step"]), int(sum(state.get("tokens_seen", {}).values()))
    total = (state.get("scheduler") or {}).get("total_steps")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(run_dir)
    model = load_model(step_dir).to(device).eval()
    hooks = build_eval_hooks(dataclasses.replace(args, mode="inprocess"), tokenizer, layout=training_layout(saved),
                             final_step=total, data_root_dir=(saved.get("data") or {}).get("root_dir", ""))
    logger.info("evaluating %s (step %d, %d tokens) with %d hook(s) on %s", step_dir, step, tokens, len(hooks), device)
    with torch.no_grad():
        metrics = run_hooks(hooks, model, step, run_dir)
    line = {"step": step, "tokens": tokens, "eval_id": IN_TRAINING_EVAL_ID, **metrics}
    record_metrics(run_dir / METRICS_FILE, line)
    clear_eval_pending(step_dir)
    logger.info("step %d: %d metric(s) recorded in %s", step, len(metrics), run_dir / METRICS_FILE)
    return line


def eval_curve(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's evaluations by step, whichever mode made them: the ``metrics.jsonl`` rows with
    ``val/`` or ``eval/`` keys (in process) and the ``in_training`` lines of ``metrics.eval.jsonl``
    (launch mode), each as ``{"step", "tokens", metric: value}``, sorted by step (for one step,
    the launch-mode line after the in-process row)."""
    from apps.bolt.evaluation.results import METRICS_FILE
    from lingua.io import read_jsonl

    run_dir = Path(run_dir)
    rows = []
    for source, path in enumerate((run_dir / "metrics.jsonl", run_dir / METRICS_FILE)):
        if not path.is_file():
            continue
        for r in read_jsonl(path, strict=False):
            if source == 1 and r.get("eval_id") != IN_TRAINING_EVAL_ID:
                continue
            metrics = {k: v for k, v in r.items() if k.startswith(("val/", "eval/")) and k != JOBS_LAUNCHED}
            if metrics:
                rows.append((r["step"], source, {"step": r["step"], "tokens": r.get("tokens"), **metrics}))
    return [row for _, _, row in sorted(rows, key=lambda t: (t[0], t[1]))]


@entry_point(EVAL_JOB_MODULE)
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from lingua.args import cli_config

    return evaluate_checkpoint(cli_config(CheckpointEvalArgs, argv, EVAL_JOB_MODULE))


if __name__ == "__main__":
    main()
