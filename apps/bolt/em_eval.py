"""Evaluation of one EM model, as its own entry point (so the EM driver can run it in process or
submit it as a one-GPU job):

    python -m apps.bolt.em_eval config=DUMP/configs/eval_<name>.yaml

The config is written by the driver, fully resolved (:meth:`apps.bolt.em.EMDriver.eval_config`).
Per model: accuracy on the few-shot tasks (the latent variant for latent-trained models: they
write their own thought before answering; the raw variant for raw baselines), validation NLL per
raw token and per character on held-out raw documents (positive; lower is better), and for
latent models the n-sample ELBO per raw token (log-likelihood scale; higher is better). All of
them are computed by the backend ``tasks.backend`` names (:mod:`lingua.backends`: the in-process
engine, or vLLM, the cluster configs' choice on GPUs).
Writes ``OUT/result.json`` and then the ``OUT/COMPLETE`` marker; a complete folder is not redone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.bolt.chunking import ChunkArgs
from apps.bolt.eval import EvalArgs
from lingua.args import cli_config, dump_config
from lingua.errors import entry_point
from lingua.io import atomic_write_json, is_done, mark_done

logger = logging.getLogger("apps.bolt.em")

ACCURACY = "accuracy"
THOUGHT = "thought_correct"
NLL = "val_nll_per_token"
RESULT = "result.json"


@dataclass
class ModelEvalArgs:
    name: str = ""
    """The model's name in the EM run (e.g. ``iter1_t0``)."""
    ckpt: str = ""
    """Consolidated model folder."""
    latent: bool = True
    """Trained on latent data: latent task variant and the ELBO; else the raw variant."""
    out: str = ""
    """Result folder: ``result.json`` + ``COMPLETE``."""
    tasks: EvalArgs = field(default_factory=EvalArgs)
    """The few-shot task evaluation (``apps.bolt.eval``), resolved: ckpt, variant, data root."""
    val_dir: str = ""
    """Held-out raw documents (a prepared dataset folder) for NLL and ELBO."""
    val_docs: int = 100
    elbo_docs: int = 20
    """Held-out documents for the ELBO of latent models (0: skip)."""
    elbo_samples: list[int] = field(default_factory=lambda: [1, 2, 4])
    max_latent_tokens: int = 1024
    """Latent length limit of the ELBO's posterior samples (the E-step's)."""
    chunk: ChunkArgs | None = None
    """Chunking of the held-out ELBO; the EM driver passes the E-step's, so the bound is taken on
    the chunks the models train and infer on. None: uniform chunks of the reference's size with
    the whole previous text as prefix (the reference's ELBO evaluation)."""
    device: str = "cpu"

    def validate(self) -> None:
        for key in ("ckpt", "out", "val_dir"):
            if not getattr(self, key):
                raise ValueError(f"{key}=... is required")
        if self.val_docs < 1 or self.elbo_docs < 0:
            raise ValueError("val_docs >= 1 and elbo_docs >= 0 are required")


def task_accuracy(summary: dict, tasks: list[str]) -> dict[str, float]:
    """Exact match per requested task or group (its first filter in sorted order, e.g.
    ``flexible-extract``), from an ``apps.bolt.eval`` summary whose keys are
    ``<task as lm-eval names it>/<metric>/<filter>`` (``latent_`` variants included)."""
    from apps.bolt.evaluation.tasks import base_name

    out: dict[str, float] = {}
    for key, value in sorted(summary["summary"].items()):
        task = base_name(key.split("/", 1)[0])
        if "/exact_match/" in key and task in tasks and task not in out:
            out[task] = float(value["mean"])
    missing = [t for t in tasks if t not in out]
    if missing:
        raise KeyError(f"no exact_match metric for tasks {missing} in eval summary keys {sorted(summary['summary'])}")
    return out


def sample_stats(out_dir: Path) -> dict[str, Any]:
    """From the logged samples of the first seed: ``n_problems`` (documents scored, the n of the
    accuracy's binomial standard error), ``n_by_task`` (per task, as lm-eval names it) and, for tasks whose documents carry their true thought
    (a ``latent`` field, as the synthetic world's do), ``thought_correct``: the share of latent
    generations whose thought (the text before the first ``<|END_OF_LATENT|>``) equals it up to
    whitespace; a thought never closed counts as wrong."""
    from apps.bolt.formats import split_latent_generation

    files = sorted(out_dir.glob("samples_seed*.jsonl"))
    if not files:
        return {}
    n, grades, by_task = 0, [], {}
    with open(files[0], encoding="utf-8") as f:
        for line in f:
            s = json.loads(line)
            n += 1
            by_task[str(s.get("task", ""))] = by_task.get(str(s.get("task", "")), 0) + 1
            doc, resps = s.get("doc") or {}, s.get("resps") or []
            if not isinstance(doc.get("latent"), str) or not resps or "latent" not in str(s.get("task", "")):
                continue
            gen = resps[0][0] if isinstance(resps[0], list) else resps[0]
            thought, _ = split_latent_generation(gen)
            grades.append(thought is not None and " ".join(thought.split()) == " ".join(doc["latent"].split()))
    out: dict[str, Any] = {"n_problems": n, "n_by_task": dict(sorted(by_task.items()))}
    if grades:
        out[THOUGHT] = sum(grades) / len(grades)
    return out


def evaluate_model(cfg: ModelEvalArgs) -> dict[str, Any]:
    """Compute one model's metrics (see the module docstring)."""
    from apps.bolt import eval as eval_stage
    from apps.bolt.posterior import compute_elbo
    from apps.bolt.evaluation.in_training import ValidationNLL, load_documents
    from lingua.backends import build_backend

    # one backend serves every metric: the tasks' choice (engine, or vLLM on a cluster)
    backend = build_backend(cfg.tasks.backend, cfg.ckpt, device=cfg.device, max_batch_tokens=cfg.tasks.max_batch_tokens)
    tok = backend.tokenizer
    if not cfg.tasks.out_dir:
        cfg.tasks.out_dir = str(Path(cfg.out) / "tasks")
    summary = eval_stage.run(cfg.tasks, backend=backend)
    by_task = task_accuracy(summary, cfg.tasks.task_list())
    out: dict[str, Any] = {
        "ckpt": cfg.ckpt, "variant": summary.get("variant"),
        ACCURACY: sum(by_task.values()) / len(by_task), "accuracy_by_task": by_task,
    }
    out.update(sample_stats(Path(cfg.tasks.out_dir)))
    docs = load_documents(Path(cfg.val_dir), cfg.val_docs)
    nll = ValidationNLL(docs, tok, source="validation").compute(backend)
    out[NLL] = nll["val/validation/nll_per_token"]
    out["val_nll_per_char"] = nll["val/validation/nll_per_char"]
    if cfg.latent and cfg.elbo_docs:
        elbo = compute_elbo(backend, docs[: cfg.elbo_docs], elbo_samples=cfg.elbo_samples, seed=0,
                            max_latent_tokens=cfg.max_latent_tokens, chunk=cfg.chunk)
        out.update({k: v for k, v in elbo.items() if k.endswith("per_token")})
    logger.info("[em] eval %s: %s", cfg.name, {k: v for k, v in out.items() if k != "ckpt"})
    return out


def run(cfg: ModelEvalArgs) -> dict[str, Any]:
    """Evaluate unless ``cfg.out`` is complete; returns the result."""
    out = Path(cfg.out)
    if not is_done(out):
        dump_config(cfg, out / "config.yaml")
        atomic_write_json(out / RESULT, evaluate_model(cfg))
        mark_done(out)
    return json.loads((out / RESULT).read_text())


@entry_point("apps.bolt.em_eval")
def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(cli_config(ModelEvalArgs, argv, "apps.bolt.em_eval")), indent=2))


if __name__ == "__main__":
    main()
