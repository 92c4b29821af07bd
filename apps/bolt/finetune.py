"""Supervised finetuning of a checkpoint on a task's train split (completion-only loss), then
sampling evaluation on its test split: the BoLT paper's finetuning evaluation.

    python -m apps.bolt.finetune config=apps/bolt/configs/finetune_synthetic.yaml ckpt=RUN out=OUT
    bin/finetune.sh cat|run|launch [launcher options] -- config=... ckpt=... out=...

``ckpt`` is a consolidated folder, ``RUN/checkpoints/<step>/`` or ``RUN/`` (as for
``apps.bolt.eval``). Steps, all in ``out``:

1. data (:mod:`apps.bolt.finetune_data`): the task's problems as (prompt, completion) records in
   the checkpoint's format (``format=auto``: ``thought`` for models trained with a prior-thought
   layout, ``delimiter`` for raw ones), written to ``OUT/data/train/`` with a ``COMPLETE`` marker;
2. training with the project's trainer (:func:`lingua.trainer.train`: FSDP2 under torchrun,
   checkpoints, exact resume) from the checkpoint's weights, in ``OUT/train/``. The ``sft``
   formatter marks BOS and the prompt out of the loss, so only completion tokens and EOS are
   trained on. Examples are packed into ``train.seq_len`` windows with per-document attention
   masks (an example cut by a window border continues, without its prompt, in the next window);
   the reference padded each example instead, 64 per step, so ``train.grad_acc_steps: 0`` sizes a
   step to hold ``train.examples_per_step`` examples' tokens on average, and ``train.epochs``
   passes take about as many optimizer steps as the reference's;
3. evaluation (:mod:`apps.bolt.finetune_eval`, rank 0 only): n samples per test prompt, accuracy,
   pass@k, maj@k, in ``OUT/eval/{before,after}/`` (``before``: the checkpoint as given, with
   ``eval.before=true``); samples are cached in ``OUT/eval/samples.sqlite``;
4. ``OUT/result.json``, then ``OUT/COMPLETE``. A complete folder is not redone (a different
   config for it is an error); an interrupted one resumes: data kept, training resumed from its
   last checkpoint, only missing samples drawn.

The EM driver calls :func:`finetune_and_evaluate`. Sweeps over seeds and upstream trials:
:mod:`apps.bolt.finetune_sweep`. See docs/finetune.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from apps.bolt.finetune_data import (
    FORMATS, REFERENCE_SAMPLES, SFT_FORMAT, TASKS, FinetuneDataArgs, TaskFormat, choose_format, load_problems,
    sft_format, sft_records,
)
from apps.bolt.finetune_eval import SampleEvalArgs
from lingua.args import ConfigError, cli_config, dc_replace, dump_config, from_dict, to_dict
from lingua.checkpoint import CheckpointArgs
from lingua.distributed import DistributedArgs
from lingua.errors import entry_point
from lingua.io import atomic_write_json, is_done, mark_done, write_jsonl
from lingua.metrics import LoggingArgs
from lingua.optim import OptimArgs

logger = logging.getLogger("apps.bolt.finetune")

RESULT = "result.json"
_NOT_IN_KEY = ("out", "eval.device", "eval.max_batch_tokens", "eval.chunk", "train.log_freq", "train.logging",
               "train.checkpoint")
"""Settings that do not change a run's numbers: a complete folder may be reread with others."""


def _reference_optim() -> OptimArgs:
    """AdamW, lr 1e-4, beta2 0.95, no weight decay, cosine to 0 (the reference's finetune configs)."""
    return OptimArgs(lr=1e-4, weight_decay=0.0, beta1=0.9, beta2=0.95, scheduler="cosine", warmup=0, lr_min_ratio=0.0)


@dataclass
class SFTArgs:
    """Finetuning on the train split (defaults: the reference, on top of the core trainer)."""

    epochs: float = 5.0
    examples_per_step: int = 64
    """Examples an optimizer step covers on average when ``grad_acc_steps`` is 0 (the reference:
    8 per device x 8 accumulation steps)."""
    batch_size: int = 8
    """Packed windows per micro-batch and data shard."""
    grad_acc_steps: int = 0
    """Micro-batches per optimizer step; 0: from ``examples_per_step`` (see the module docstring)."""
    seq_len: int = 2048
    """Window length (the reference's ``max_seq_len``); capped at the model's ``max_seqlen``."""
    warmup_ratio: float = 0.05
    """Linear warmup over this share of the steps (rounded up); replaces ``optim.warmup``."""
    grad_clip: float = 1.0
    optim: OptimArgs = field(default_factory=_reference_optim)
    log_freq: int = 10
    checkpoint: CheckpointArgs = field(default_factory=lambda: CheckpointArgs(every=500, keep=1))
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    """``mixed_precision`` (default on) is bf16 compute on GPUs; CPUs stay fp32."""
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    def validate(self) -> None:
        if self.epochs <= 0 or self.examples_per_step < 1 or self.batch_size < 1 or self.grad_acc_steps < 0:
            raise ValueError("train: epochs > 0, examples_per_step >= 1, batch_size >= 1 and grad_acc_steps >= 0 are required")
        if self.seq_len < 2 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("train: seq_len >= 2 and warmup_ratio in [0, 1) are required")


@dataclass
class FinetuneArgs:
    ckpt: str = ""
    """The model to finetune: consolidated folder, ``RUN/checkpoints/<step>/`` or ``RUN/``."""
    out: str = ""
    """Output folder (data, training run, evaluation, ``result.json``, ``COMPLETE``)."""
    task: str = "synthetic"
    """``math``, ``gsm8k`` or ``synthetic``."""
    format: str = "auto"
    """``auto`` (from the checkpoint's training layout), ``thought``, ``delimiter`` or ``text``."""
    seed: int = 42
    """Training RNGs, data order and evaluation samples (the sweep's downstream seed)."""
    data: FinetuneDataArgs = field(default_factory=FinetuneDataArgs)
    train: SFTArgs = field(default_factory=SFTArgs)
    eval: SampleEvalArgs = field(default_factory=SampleEvalArgs)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"format must be auto or one of {FORMATS}, got {self.format!r}")


def run_key(cfg: FinetuneArgs) -> str:
    """Hash of every setting that changes a run's numbers."""
    data = to_dict(cfg)
    for key in _NOT_IN_KEY:
        node, *path = key.split(".")
        if path:
            data[node].pop(path[0], None)
        else:
            data.pop(node, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def plan_steps(sft: SFTArgs, examples: int, tokens: int, seq_len: int, data_shards: int) -> dict[str, int]:
    """Micro-batches per step, optimizer steps and warmup steps for ``tokens`` packed tokens of
    ``examples`` training examples (see the module docstring)."""
    rows_per_micro = sft.batch_size * data_shards
    grad_acc = sft.grad_acc_steps
    if grad_acc == 0:
        rows_wanted = sft.examples_per_step * tokens / examples / seq_len
        grad_acc = max(1, round(rows_wanted / rows_per_micro))
    steps = max(1, round(sft.epochs * tokens / (rows_per_micro * grad_acc * seq_len)))
    return {"grad_acc_steps": grad_acc, "steps": steps, "warmup": math.ceil(sft.warmup_ratio * steps)}


def _tokenizer_args(consolidated: Path) -> dict:
    """The checkpoint's tokenizer args with an absolute path (as ``load_tokenizer`` resolves it)."""
    folder = consolidated / "tokenizer"
    args = json.loads((folder / "tokenizer_args.json").read_text())
    if args.get("path") is not None:
        args["path"] = str((folder / args["path"]).resolve())
    return args


def prepare_data(cfg: FinetuneArgs, fmt: TaskFormat, tokenizer: Any, folder: Path) -> dict:
    """Write the training records to ``folder/train/sft.jsonl`` (once); returns their counts."""
    key = hashlib.sha256(json.dumps([to_dict(cfg.data), cfg.task, fmt.format, cfg.seed, tokenizer.encode("0 a <b>")],
                                    sort_keys=True).encode()).hexdigest()[:16]
    marker = folder / "COMPLETE"
    if is_done(folder):
        saved = json.loads(marker.read_text())
        if saved.get("key") != key:
            raise ConfigError(f"{folder} holds training data made with other settings; use another out")
        return saved["stats"]
    bos = {i: s for s, i in tokenizer.special_ids.items()}[tokenizer.bos_id]
    records = sft_records(load_problems(cfg.task, "train", cfg.data), fmt, bos, cfg.seed)
    lengths = [len(tokenizer.encode(r["prompt"])) + len(tokenizer.encode(r["completion"])) + 1 for r in records]
    loss = [len(tokenizer.encode(r["completion"])) + 1 for r in records]
    stats = {"examples": len(records), "tokens": sum(lengths), "loss_tokens": sum(loss), "longest": max(lengths)}
    write_jsonl(folder / "train" / "sft.jsonl", records)
    mark_done(folder, {"key": key, "stats": stats})
    logger.info("training data: %d examples, %d tokens (%d in the loss), longest %d", stats["examples"],
                stats["tokens"], stats["loss_tokens"], stats["longest"])
    return stats


def train_config(cfg: FinetuneArgs, consolidated: Path, stats: dict) -> Any:
    """The core trainer's config of the finetuning run."""
    from lingua.consolidated import load_params
    from lingua.trainer import TrainArgs

    params = load_params(consolidated)
    seq_len = min(cfg.train.seq_len, params.max_seqlen)
    shards = cfg.train.distributed.data_shards or int(os.environ.get("WORLD_SIZE", "1"))
    plan = plan_steps(cfg.train, stats["examples"], stats["tokens"], seq_len, shards)
    out = Path(cfg.out)
    t = cfg.train
    return from_dict(TrainArgs, {
        "name": f"finetune-{cfg.task}", "dump_dir": str(out / "train"), "seed": cfg.seed, "steps": plan["steps"],
        "grad_acc_steps": plan["grad_acc_steps"], "grad_clip": t.grad_clip, "log_freq": t.log_freq,
        "model": to_dict(params), "tokenizer": _tokenizer_args(consolidated),
        "data": {"root_dir": str(out / "data"), "sources": {"train": 1.0}, "batch_size": t.batch_size, "seq_len": seq_len,
                 "seed": cfg.seed, "add_bos": False, "add_eos": True, "format": SFT_FORMAT, "doc_mask": True},
        "optim": {**to_dict(t.optim), "warmup": plan["warmup"]},
        "checkpoint": {**to_dict(t.checkpoint), "init_ckpt_path": str(consolidated), "consolidate": True},
        "distributed": to_dict(t.distributed), "logging": to_dict(t.logging),
    }, "finetune training config")


def evaluate_checkpoint(cfg: FinetuneArgs, folder: Path, fmt: TaskFormat, problems: list, name: str) -> dict:
    """Sample and score one consolidated model on the test problems (``OUT/eval/<name>/``)."""
    import torch

    from apps.bolt.finetune_eval import evaluate
    from lingua.consolidated import fingerprint, load_consolidated
    from lingua.generation import Engine

    out = Path(cfg.out) / "eval" / name
    key = run_key(cfg)
    if is_done(out) and json.loads((out / "COMPLETE").read_text()).get("key") == key:
        return json.loads((out / "metrics.json").read_text())
    device = cfg.eval.device if cfg.eval.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_consolidated(folder, device=device)
    window = min(cfg.eval.context_window or model.args.max_seqlen, model.args.max_seqlen)
    engine = Engine(model, tok, max_batch_tokens=cfg.eval.max_batch_tokens, max_seq_len=window)
    n = cfg.eval.n or REFERENCE_SAMPLES[cfg.task]
    metrics, rows = evaluate(engine, problems, fmt, cfg.eval, n=n, seed=cfg.seed,
                             store_path=Path(cfg.out) / "eval" / "samples.sqlite", model_key=fingerprint(folder))
    metrics["checkpoint"] = str(folder)
    write_jsonl(out / "samples.jsonl", rows)
    atomic_write_json(out / "metrics.json", metrics)
    mark_done(out, {"key": key})  # an evaluation made with other settings is redone
    logger.info("%s: accuracy %.4f +- %.4f over %d problems x %d samples", name, metrics["accuracy"],
                metrics["accuracy_se"], metrics["n_problems"], n)
    return metrics


def run(cfg: FinetuneArgs) -> dict[str, Any]:
    """Finetune and evaluate (see the module docstring); returns ``result.json``'s content (on
    ranks other than 0 of a multi-process run: an empty dict, after training)."""
    from apps.bolt.evaluation.checkpoints import resolve_checkpoint
    from lingua.consolidated import load_tokenizer
    from lingua.trainer import train

    if not cfg.ckpt or not cfg.out:
        raise ConfigError("ckpt=... and out=... are required")
    out = Path(cfg.out)
    key = run_key(cfg)
    if is_done(out) and (out / RESULT).is_file():
        done = json.loads((out / RESULT).read_text())
        if done.get("key") != key:
            raise ConfigError(f"{out} is complete with other settings (see its config.yaml); use another out")
        logger.info("%s is complete: accuracy %.4f", out, done["metrics"]["accuracy"])
        return done
    dump_config(cfg, out / "config.yaml")
    ref = resolve_checkpoint(cfg.ckpt)
    fmt = TaskFormat(cfg.task, choose_format(cfg.format, ref.layout))
    logger.info("finetuning %s (layout %s) on %s in the %s format", ref.consolidated, ref.layout, cfg.task, fmt.format)
    test = load_problems(cfg.task, "test", cfg.data)  # before training: a missing test set fails early
    stats = prepare_data(cfg, fmt, load_tokenizer(ref.consolidated), out / "data")
    tcfg = train_config(cfg, ref.consolidated, stats)
    summary = train(tcfg, format_fn=sft_format())
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    result = {
        "key": key, "task": cfg.task, "format": fmt.format, "seed": cfg.seed, "ckpt": str(ref.consolidated),
        "layout": ref.layout, "finetuned": summary["consolidated"],
        "train": {**stats, "steps": tcfg.steps, "grad_acc_steps": tcfg.grad_acc_steps, "seq_len": tcfg.data.seq_len,
                  "warmup": tcfg.optim.warmup, "final_loss": summary["final_loss"]},
        "before": evaluate_checkpoint(cfg, ref.consolidated, fmt, test, "before") if cfg.eval.before else None,
        "metrics": evaluate_checkpoint(cfg, Path(summary["consolidated"]), fmt, test, "after"),
    }
    atomic_write_json(out / RESULT, result)
    mark_done(out)
    return result


def finetune_and_evaluate(ckpt: str, out: str, cfg: FinetuneArgs | None = None) -> dict[str, Any]:
    """For the EM driver: finetune ``ckpt`` into ``out`` with ``cfg``'s other settings; returns
    plain metrics: ``accuracy`` (mean over samples), ``accuracy_se`` (binomial, over problems),
    ``pass@k``, ``maj@k``, ``n_problems``, ``samples_per_problem``, plus ``task``, ``format``."""
    result = run(dc_replace(cfg or FinetuneArgs(), ckpt=ckpt, out=out))
    metrics = {k: v for k, v in result.get("metrics", {}).items() if k not in ("limits", "checkpoint")}
    return {**metrics, "task": result.get("task"), "format": result.get("format")} if result else {}


@entry_point("apps.bolt.finetune")
def main(argv: Sequence[str] | None = None) -> dict:
    result = run(cli_config(FinetuneArgs, argv, "apps.bolt.finetune"))
    if result:
        print(json.dumps({k: result[k] for k in ("task", "format", "metrics", "before")}, indent=2))
    return result


if __name__ == "__main__":
    main()
