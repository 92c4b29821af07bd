"""Evaluation during training: hooks for ``lingua.trainer.train(eval_hooks=...)`` and the launcher
hook that evaluates a checkpoint as a separate job.

Every hook is a callable ``(model, step, run_dir) -> {metric: value}`` (``lingua.trainer.EvalHook``);
the trainer calls them every ``eval_every`` steps and at the end, on every rank, with the model in
eval mode, and logs rank 0's dict into ``metrics.jsonl``.

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
* :func:`launch_eval` / :class:`LaunchEvalHook`: one ``python -m apps.bolt.eval`` job per
  checkpoint through ``lingua.launch`` (``cat`` prints it, ``run`` runs it here, ``launch``
  submits it to slurm), for models too large to evaluate inside the training job.

In a multi-process run every rank computes the same numbers (keeping FSDP collectives in step);
only rank 0 writes files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from apps.bolt.evaluation.options import HarnessOptions

logger = logging.getLogger(__name__)

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
    """n-sample ELBOs of held-out documents, every ``every`` steps and at ``final_step``."""

    def __init__(
        self,
        docs: Sequence[str],
        tokenizer: Any,
        *,
        source: str = "heldout",
        elbo_samples: Sequence[int] = (1, 2, 4),
        every: int = 0,
        final_step: int | None = None,
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
        self.seed = seed
        self.max_batch_tokens = max_batch_tokens

    def due(self, step: int) -> bool:
        """Whether the ELBO runs at ``step`` (it costs sampling, so it may run less often than
        the other hooks): every ``every`` steps, at ``final_step``, or always when ``every`` is 0."""
        return not self.every or step % self.every == 0 or step == self.final_step

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
    """Evaluate ``ckpt_dir`` as its own ``python -m apps.bolt.eval`` job through
    ``lingua.launch`` with the given ``LaunchArgs`` (mode ``cat``/``run``/``launch``; resources
    such as ``gpus`` and ``partition`` come from it). ``overrides`` are eval config overrides,
    e.g. ``["config=apps/bolt/configs/eval_synthetic.yaml"]``. Returns the launcher's exit code."""
    import dataclasses

    from lingua.launch import run as launch_run

    args = dataclasses.replace(launch, module="apps.bolt.eval", shards=0)
    return launch_run(args, [*overrides, f"ckpt={Path(ckpt_dir)}"])


class LaunchEvalHook:
    """Submit an eval job for the checkpoint saved at this step (the trainer saves before it
    runs the hooks). Steps without a complete checkpoint folder are skipped with a warning."""

    def __init__(self, launch: Any, overrides: Sequence[str] = ()):
        self.launch = launch
        self.overrides = list(overrides)

    def __call__(self, model: Any, step: int, run_dir: Path) -> dict[str, float]:
        from lingua.checkpoint import step_folder
        from lingua.io import is_done

        folder = step_folder(Path(run_dir) / "checkpoints", step)
        if not is_done(folder):
            logger.warning("step %d: no complete checkpoint at %s; no eval job launched", step, folder)
            return {}
        if not _is_main_rank():
            return {}
        code = launch_eval(folder, self.launch, self.overrides)
        if code:
            logger.error("eval job launch for %s exited with %d", folder, code)
        return {"eval/jobs_launched": float(code == 0)}


@dataclass
class InTrainingEvalArgs:
    """What a training run evaluates as it goes (a config section for the train app)."""

    val_docs: str = ""
    """Held-out raw documents (a jsonl file or a folder of them); empty: no NLL/ELBO hooks."""
    val_source: str = "heldout"
    """Name in the metric keys: ``val/<source>/nll_per_token`` etc."""
    val_max_docs: int = 1000
    val_max_tokens: int = 0
    """Window for scoring a document (0: the model's max_seqlen)."""
    elbo: str = "auto"
    """``auto``: for models trained with a latent layout (random/prior), ``on``, ``off``."""
    elbo_samples: list[int] = field(default_factory=lambda: [1, 2, 4])
    elbo_every: int = 0
    """Steps between ELBO evaluations, on top of the final step (0: whenever the hooks run)."""
    tasks: str = ""
    """Comma-separated lm-eval tasks to run in process (e.g. ``synthetic_cot``); empty: none."""
    data_root: str = ""
    harness: HarnessOptions = field(default_factory=HarnessOptions)
    max_batch_tokens: int = 16384

    def validate(self) -> None:
        if self.elbo not in ("auto", "on", "off"):
            raise ValueError(f"elbo must be auto, on or off, got {self.elbo!r}")


def build_eval_hooks(args: InTrainingEvalArgs, tokenizer: Any, *, layout: str, final_step: int | None = None) -> list[Callable]:
    """The hooks ``args`` asks for, for a run trained with ``layout`` (``elbo=auto``: the ELBO for
    latent layouts only)."""
    from apps.bolt.evaluation.tasks import LATENT_LAYOUTS, variant_for_layout

    hooks: list[Callable] = []
    if args.val_docs:
        docs = load_documents(args.val_docs, args.val_max_docs)
        hooks.append(ValidationNLL(docs, tokenizer, source=args.val_source, max_tokens=args.val_max_tokens, max_batch_tokens=args.max_batch_tokens))
        if args.elbo == "on" or (args.elbo == "auto" and layout in LATENT_LAYOUTS):
            hooks.append(ValidationELBO(docs, tokenizer, source=args.val_source, elbo_samples=args.elbo_samples,
                                        every=args.elbo_every, final_step=final_step, max_batch_tokens=args.max_batch_tokens))
    if args.tasks:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        hooks.append(TaskEvalHook(names, tokenizer, variant=variant_for_layout(layout), data_root=args.data_root or None,
                                  harness=args.harness, max_batch_tokens=args.max_batch_tokens))
    return hooks
