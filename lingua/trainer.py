"""The training loop every stage uses (warmstart, M-step, baselines): ``train(cfg)``.

One optimizer step = ``grad_acc_steps`` micro-batches from each of the ``data_shards`` data
streams (a rank reads ``data_shards / world_size`` of them), so the global batch is
``data.batch_size * data_shards * grad_acc_steps`` sequences of ``data.seq_len`` tokens.

Loss: the mean cross-entropy over every position whose ``loss_mask`` is True, across all
micro-batches and ranks of the step. Each micro-batch contributes ``sum(CE) / N_step`` with
``N_step`` the global count of loss positions, gradients are summed across ranks, so the gradient
is exactly that of the token mean, whatever the split into micro-batches and processes.
(The reference averaged per-micro-batch means, which weights tokens unevenly once masks differ.)

Gradient clipping runs once per optimizer step, on the accumulated gradient. The reference
clipped after every micro-step's backward, i.e. it clipped partial sums, so the effective
update depended on ``grad_acc_steps``; FSDP gradient sync is also skipped until the last
micro-step here.

Run folder (``dump_dir``): ``config.yaml`` (resolved config, written before any work),
``metrics.jsonl``, ``train.log``, ``tokenizer/`` (a copy), ``checkpoints/<step:010d>/``, and
``.lock`` while a process trains in it (:class:`lingua.locks.RunLock`: a second ``train`` on the
same folder fails at once naming the holder). Every ``metrics.jsonl`` row has ``step`` and
``tokens`` (training tokens read so far, summed over sources and ranks), the x axes of curves.

Evaluation (the ``eval`` section, :class:`EvalArgs`): the eval hooks run every ``eval.every``
steps, at each of ``eval.must_eval_steps`` and always at the final step. A must-evaluate step also
gets a checkpoint (kept for good with ``eval.keep_checkpoints``). When a checkpoint is saved at an
evaluation step it carries a pending-evaluation record (``lingua.checkpoint.EVAL_PENDING``),
written before its ``COMPLETE`` marker; cleanup never removes such a folder. In-process
(``eval.mode=inprocess``) the record is dropped once the step's metrics row holds the results; a
run killed in between evaluates that step when it resumes. With ``eval.mode=launch`` the hooks
hand the checkpoint to a separate job (every evaluation step then saves one), and the record stays
until that job has written its result and dropped it.

Resuming with other settings: what may change, and what is refused or recorded, is
:func:`lingua.train_args.check_resume_config`'s (its module docstring).

Time limits (requeue): on the scheduler's warning signal (``SIGUSR2``, or the signal named by
``SUBMITIT_PREEMPT_SIGNAL``, the variable submitit itself reads; ``none`` turns this off) the run
finishes the current step, saves a checkpoint there, and the process exits with status
:data:`EXIT_REQUEUE` (75, ``EX_TEMPFAIL``): rerun (or requeued by ``lingua.launch``'s job
wrapper), it resumes from that step exactly as if it had not stopped.

Finished runs: rerunning one trains nothing; when its final consolidated folder is missing or
incomplete (e.g. the process was killed while consolidating) it is rebuilt from the last
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lingua import distributed as D
from lingua.args import ConfigError, dump_config, to_dict
from lingua.checkpoint import (
    CheckpointManager,
    capture_rng,
    clear_eval_pending,
    consolidate,
    load_init_checkpoint,
    pending_evals,
    read_eval_pending,
    restore_rng,
    step_folder,
)
from lingua.consolidated import TOKENIZER_DIR, is_complete, save_tokenizer
from lingua.data import DataArgs
from lingua.locks import lock_run_folder
from lingua.logger import Progress, close_logger, init_logger
from lingua.metrics import MetricLogger, memory_stats, mfu, peak_flops, truncate_metrics
from lingua.optim import build_optimizer, lr_at, set_lr
from lingua.requeue import (  # noqa: F401  (re-exported)
    EXIT_REQUEUE,
    REQUEUE_SIGNAL_ENV,
    StopSignal,
    TrainingRequeued,
    requeue_signal,
)
from lingua.tokenizer import build_tokenizer
from lingua.train_args import (  # noqa: F401  (re-exported: the configs are imported from here)
    CONFIG_CHANGES,
    EVAL_MODES,
    EvalArgs,
    TrainArgs,
    ValArgs,
    check_resume_config,
)
from lingua.transformer import build_model, flops_per_token

logger = logging.getLogger(__name__)

EvalHook = Callable[[torch.nn.Module, int, Path], dict]
"""``(model, step, run_dir) -> {metric: value}``; called on every rank (hooks may use
collectives); rank 0's result is logged, keys without a "/" get an ``eval/`` prefix. A hook with
a ``plan(total_steps)`` method is told the run's final step before training starts."""

_EVAL_HOOKS: dict[str, EvalHook] = {}


def register_eval_hook(name: str, hook: EvalHook, *, replace: bool = False) -> None:
    """Make ``hook`` selectable by name from the ``evals`` list of a training config."""
    if name in _EVAL_HOOKS and not replace:
        raise ValueError(f"eval hook {name!r} is already registered")
    _EVAL_HOOKS[name] = hook


def _process_seed(seed: int, rank: int) -> None:
    s = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    import random

    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def masked_loss_sum(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """Sum of the cross-entropy over the positions where ``loss_mask`` is True.

    Masked-out targets become ``ignore_index``: those rows are skipped inside the loss kernel
    (no per-token loss tensor, no multiply by the mask, and a masked target never needs to be
    a valid id).
    """
    doc_ids = batch.get("doc_ids")
    logits = model(batch["input"].to(device), doc_ids=None if doc_ids is None else doc_ids.to(device))
    target = batch["target"].to(device).masked_fill(~batch["loss_mask"].to(device, torch.bool), -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")


class _Run:
    """State of one ``train`` call; the loop body is split into methods for readability."""

    def __init__(self, cfg: TrainArgs, format_fn: Any, eval_hooks: Sequence[EvalHook], stop: StopSignal | None = None):
        self.cfg = cfg
        self.stop_signal = stop
        self.format_fn = format_fn
        self.env = D.init_distributed(cfg.distributed)
        self.dir = Path(cfg.dump_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        init_logger(self.dir / "train.log", self.env.rank, cfg.logging.level.upper())
        self.config_yaml = dump_config(cfg)
        self.must_eval = set(cfg.eval.must_eval_steps)
        kept = self.must_eval if cfg.eval.keep_checkpoints else ()
        self.ckpt = CheckpointManager(self.dir / "checkpoints", cfg.checkpoint, self.env, keep_steps=kept)
        self.resume_dir = self.ckpt.latest()
        if self.resume_dir is not None:
            check_resume_config(cfg, self.dir, self.resume_dir, self.config_yaml, self.env.is_main)
        if self.env.is_main:
            dump_config(cfg, self.dir / "config.yaml")
            logger.info("resolved config:\n%s", self.config_yaml)
        if cfg.val.source and not (Path(cfg.data.root_dir) / cfg.val.source).is_dir():
            raise ConfigError(f"val.source: no folder {cfg.val.source!r} under data.root_dir={cfg.data.root_dir}")
        unknown = [n for n in cfg.evals if n not in _EVAL_HOOKS]
        if unknown:
            raise ConfigError(f"evals: unknown eval hook(s) {unknown}; registered: {sorted(_EVAL_HOOKS)}")
        self.hooks = [_EVAL_HOOKS[n] for n in cfg.evals] + list(eval_hooks)

    # -------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        resume_dir = self.resume_dir
        saved = _read_train_state(resume_dir) if resume_dir else None
        self.data_shards = _resolve_shards(cfg.distributed.data_shards, env.world_size, saved)
        self.total = cfg.total_steps(self.data_shards)
        token_steps = cfg.eval.token_steps(cfg.global_batch(self.data_shards) * cfg.data.seq_len)
        self.must_eval |= token_steps
        if cfg.eval.keep_checkpoints:
            self.ckpt.keep_steps |= token_steps
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        if env.is_main:
            save_tokenizer(self.tokenizer, self.dir / TOKENIZER_DIR)
        vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else self.tokenizer.vocab_size
        self.margs = dataclasses.replace(cfg.model, vocab_size=vocab)
        _process_seed(cfg.seed, env.rank)
        model = build_model(self.margs, device=env.device, init=True)
        self.model = D.parallelize(model, cfg.distributed, env)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step, self.tokens_seen, data_states = 0, {}, {}
        if saved is not None:
            self.ckpt.load(resume_dir, self.model, self.optimizer)
            self.step = saved["step"]
            # run totals live on rank 0 only; the other ranks count from zero (sums stay right)
            self.tokens_seen = dict(saved.get("tokens_seen", {})) if env.is_main else {}
            data_states = saved["data"]
            rngs = saved.get("rng", [])
            if len(rngs) == env.world_size:
                restore_rng(rngs[env.rank])
            else:
                logger.warning("world size changed (%d -> %d): process RNGs reseeded", len(rngs), env.world_size)
                _process_seed(cfg.seed + self.step, env.rank)
            logger.info("resuming from %s at step %d", resume_dir, self.step)
        elif cfg.checkpoint.init_ckpt_path:
            load_init_checkpoint(self.model, cfg.checkpoint.init_ckpt_path)
        self.resumed_from = str(resume_dir) if resume_dir else None
        per_rank = self.data_shards // env.world_size
        self.shards = list(range(env.rank * per_rank, (env.rank + 1) * per_rank))
        self.data_states: dict[str, Any] = {str(s): data_states.get(str(s)) for s in self.shards}
        self.iters = {s: self._data_iter(cfg.data, s, self.data_states[str(s)]) for s in self.shards}
        self.metrics = None
        if env.is_main:
            truncate_metrics(self.dir / "metrics.jsonl", self.step)
            self.metrics = MetricLogger(self.dir / "metrics.jsonl", cfg.logging, cfg.name, to_dict(cfg))
        self.plan_evals()
        self.flops_per_token = flops_per_token(self.margs, cfg.data.seq_len)
        self.peak = peak_flops(env.device)
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "model %.2fM params | %d steps | global batch %d x %d tokens | %d data shard(s) on %d rank(s)",
            n_params / 1e6, self.total, cfg.global_batch(self.data_shards), cfg.data.seq_len, self.data_shards, env.world_size,
        )

    def plan_evals(self) -> None:
        """Check the must-evaluate steps against the run's length, tell the hooks its final step,
        and say which checkpoints still wait for their evaluation."""
        beyond = sorted(s for s in self.must_eval if s > self.total)
        if beyond:
            raise ConfigError(f"eval.must_eval_steps {beyond} lie beyond the run's last step {self.total}")
        missed = sorted(s for s in self.must_eval if s < self.step and not step_folder(self.ckpt.dir, s).is_dir())
        if missed and self.cfg.eval.keep_checkpoints:  # kept for good, so never saved: added on resume
            logger.warning("eval.must_eval_steps %s were passed before this resume without a checkpoint: not evaluated", missed)
        for hook in self.hooks:
            plan = getattr(hook, "plan", None)
            if callable(plan):
                plan(self.total)
        if self.env.is_main:
            waiting = [p.name for s, p in pending_evals(self.ckpt.dir) if s != self.step]
            if waiting:
                logger.info("%d checkpoint(s) wait for their evaluation (kept until it is recorded): %s", len(waiting), ", ".join(waiting))

    def _data_iter(self, data_args: DataArgs, shard: int, state: dict | None, format_fn: Any = "train") -> Iterator:
        from lingua.data import build_data_iterator

        fn = self.format_fn if format_fn == "train" else format_fn
        return build_data_iterator(data_args, self.tokenizer, rank=shard, world_size=self.data_shards, state=state, format_fn=fn)

    # -------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        lr = lr_at(self.step + 1, cfg.optim, self.total)
        set_lr(self.optimizer, lr)
        t_data = time.perf_counter()
        micro = []
        for s in self.shards:
            for _ in range(cfg.grad_acc_steps):
                batch, state = next(self.iters[s])
                self.data_states[str(s)] = state
                micro.append(batch)
                for src, n in batch.get("tokens_by_source", {}).items():
                    self.tokens_seen[src] = self.tokens_seen.get(src, 0) + int(n)
        t_data = time.perf_counter() - t_data
        local_count = float(sum(int(b["loss_mask"].sum()) for b in micro))
        (count,) = D.all_reduce_sum([local_count], env.device)
        denom = max(count, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, batch in enumerate(micro):
            with D.no_grad_sync(self.model, skip=i < len(micro) - 1):
                with D.autocast(cfg.distributed, env):
                    s = masked_loss_sum(self.model, batch, env.device)
                (s / denom).backward()
            loss_sum += s.detach().double()
        grad_norm = D.clip_grad_norm_(self.model, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        (total_loss,) = D.all_reduce_sum([float(loss_sum)], env.device)
        return {"loss": total_loss / denom, "lr": lr, "grad_norm": grad_norm, "loss_tokens": count, "data_s": t_data}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        same = cfg.val.format == "train"
        val_data = dataclasses.replace(
            cfg.data, sources={cfg.val.source: 1.0}, prefetch=False, shuffle_buffer=0,
            format=cfg.data.format if same else cfg.val.format,
        )
        self.model.eval()
        loss_sum = count = 0.0
        for s in self.shards:
            it = self._data_iter(val_data, s, None, self.format_fn if same else None)
            for _ in range(cfg.val.batches):
                batch, _ = next(it)
                with D.autocast(cfg.distributed, self.env):
                    loss_sum += float(masked_loss_sum(self.model, batch, self.env.device))
                count += float(batch["loss_mask"].sum())
            close = getattr(it, "close", None)
            if callable(close):
                close()
        self.model.train()
        loss_sum, count = D.all_reduce_sum([loss_sum, count], self.env.device)
        return {"val/loss": loss_sum / max(count, 1.0), "val/tokens": count}

    def run_evals(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.model.eval()
        for hook in self.hooks:
            for k, v in (hook(self.model, self.step, self.dir) or {}).items():
                out[k if "/" in k else f"eval/{k}"] = v
        self.model.train()
        return out

    def save(self, eval_pending: dict[str, Any] | None = None) -> Path:
        data = {k: v for part in D.all_gather_object(self.data_states) for k, v in part.items()}
        state = {
            "step": self.step,
            "data_shards": self.data_shards,
            "world_size": self.env.world_size,
            "data": data,
            "tokens_seen": self.global_tokens_seen(),
            "rng": D.all_gather_object(capture_rng()),
            "scheduler": {"name": self.cfg.optim.scheduler, "total_steps": self.total,
                          "lr": lr_at(self.step, self.cfg.optim, self.total)},
        }
        return self.ckpt.save(self.step, self.model, self.optimizer, state, self.config_yaml, to_dict(self.margs), eval_pending)

    def tokens(self) -> int:
        """Training tokens read so far, all sources and ranks (a collective)."""
        return sum(self.global_tokens_seen().values())

    def resume_pending_eval(self) -> dict[str, Any] | None:
        """Evaluate the resumed step when its checkpoint says its evaluation was never recorded
        (the run was killed between saving and logging, or a launch failed before the job was
        submitted); returns the results, or None when there was nothing to do."""
        if self.resume_dir is None:
            return None
        info = D.all_gather_object(read_eval_pending(self.resume_dir) if self.env.is_main else None)[0]
        if info is None or info.get("launched"):
            return None
        if not self.hooks:
            logger.warning("step %d: evaluation pending in %s but no eval hooks are configured: record dropped", self.step, self.resume_dir)
            if self.env.is_main:
                clear_eval_pending(self.resume_dir)
            return None
        logger.info("step %d: its evaluation was not recorded (interrupted run); evaluating it now", self.step)
        evals = self.run_evals()
        tokens = self.tokens()
        if self.metrics is not None:
            self.metrics.log({"step": self.step, "tokens": tokens, **evals})
        if self.cfg.eval.mode == "inprocess" and self.env.is_main:
            clear_eval_pending(self.resume_dir)
        return evals

    def global_tokens_seen(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for part in D.all_gather_object(self.tokens_seen):
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        return total

    # -------------------------------------------------------------------------------------
    def loop(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        losses: dict[int, float] = {}
        last: dict[str, Any] = {"val": None, "eval": {}, "checkpoint": None}
        progress = Progress(self.total, self.step)
        step_tokens = cfg.global_batch(self.data_shards) * cfg.data.seq_len
        window_s, window_steps = 0.0, 0  # time in train_step only: saves and evals excluded
        end = min(self.total, self.cfg.stop_at_step) if self.cfg.stop_at_step > 0 else self.total
        resumed_eval = self.resume_pending_eval()
        if resumed_eval is not None:
            last["eval"] = resumed_eval
        launch = cfg.eval.mode == "launch"
        while self.step < end:
            t0 = time.perf_counter()
            out = self.train_step()
            window_s += time.perf_counter() - t0
            progress.mark_first_step()
            window_steps += 1
            losses[self.step] = out["loss"]
            requeue = self.requeue_requested()
            stop, final = self.step == end or requeue, self.step == self.total
            must = self.step in self.must_eval
            eval_due = bool(self.hooks) and cfg.eval.is_eval_step(self.step, self.total, self.must_eval)
            val_due = bool(cfg.val.source) and (bool(cfg.val.every and self.step % cfg.val.every == 0) or final or must)
            log_due = self.step % cfg.log_freq == 0 or stop
            save_due = bool(cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or stop or must or (eval_due and launch)
            record: dict[str, Any] = {}
            seen = None
            if log_due:
                tps = step_tokens * window_steps / max(window_s, 1e-9)
                record.update({
                    "loss/train": out["loss"], "optim/lr": out["lr"], "optim/grad_norm": out["grad_norm"],
                    "tokens/loss_tokens": out["loss_tokens"], "tokens/total": self.step * step_tokens,
                    "speed/tokens_per_s": tps, "speed/step_s": window_s / window_steps, "speed/data_s": out["data_s"],
                    "speed/mfu": mfu(self.flops_per_token, tps, self.peak, env.world_size),
                })
                seen = self.global_tokens_seen()
                record.update({f"tokens/source/{k}": v for k, v in sorted(seen.items())})
                record.update(memory_stats(env.device))
                logger.info(progress.line(self.step, out["loss"], out["lr"], out["grad_norm"], tps))
                window_s, window_steps = 0.0, 0
            if save_due:
                pending = {"step": self.step, "mode": cfg.eval.mode, "launched": False} if eval_due else None
                last["checkpoint"] = str(self.save(pending))
            if val_due:
                last["val"] = self.validate()
                record.update(last["val"])
                logger.info("step %d: val loss %.4f", self.step, last["val"]["val/loss"])
            # near the time limit an in-process evaluation waits for the resume (its checkpoint says so)
            defer_eval = requeue and self.step < end and not launch
            if eval_due and not defer_eval:
                last["eval"] = self.run_evals()
                record.update(last["eval"])
            if log_due or val_due or eval_due:  # the same on every rank: tokens() is a collective
                tokens = self.tokens() if seen is None else sum(seen.values())
                if self.metrics is not None:
                    self.metrics.log({"step": self.step, "tokens": tokens, **record})
            if eval_due and save_due and not launch and not defer_eval and env.is_main:
                clear_eval_pending(last["checkpoint"])  # its results are in the metrics row now
            if requeue and self.step < end:
                logger.warning("step %d: %s received: checkpoint saved, stopping to be requeued", self.step, self.stop_signal.seen)
                last["requeue"] = self.stop_signal.seen
                break
        finished = self.step == self.total
        consolidated = self.consolidate_final(last["checkpoint"] or self.resumed_from) if finished else None
        return {
            "run_dir": str(self.dir), "step": self.step, "total_steps": self.total, "resumed_from": self.resumed_from,
            "losses": losses, "final_loss": losses.get(self.step), "val": last["val"], "eval": last["eval"],
            "checkpoint": last["checkpoint"], "consolidated": consolidated, "tokens_seen": self.global_tokens_seen(),
            "requeue": last.get("requeue"),
        }

    def requeue_requested(self) -> bool:
        """Whether any rank got the requeue signal (a collective when distributed, so all stop together)."""
        seen = self.stop_signal is not None and self.stop_signal.seen is not None
        if self.env.world_size > 1:
            (n,) = D.all_reduce_sum([float(seen)], self.env.device)
            if n and self.stop_signal is not None and self.stop_signal.seen is None:
                self.stop_signal.seen = "signal on another rank"
            return n > 0
        return seen

    def consolidate_final(self, step_dir: str | None) -> str | None:
        """The final step's consolidated folder, written when it is missing or incomplete: after
        training, and on a rerun of a finished run whose consolidation was killed."""
        if not self.cfg.checkpoint.consolidate or step_dir is None:
            return None
        folder = Path(step_dir) / "consolidated"
        if not is_complete(folder):
            if step_dir == self.resumed_from:
                logger.warning("%s is incomplete (killed while consolidating?): rebuilding it", folder)
            D.barrier()
            if self.env.is_main:
                consolidate(step_dir, self.tokenizer)
            D.barrier()
        return str(folder)

    def close(self) -> None:
        for it in getattr(self, "iters", {}).values():
            close = getattr(it, "close", None)
            if callable(close):
                close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()


def _read_train_state(folder: Path) -> dict:
    return json.loads((folder / "train_state.json").read_text())


def _resolve_shards(configured: int, world: int, saved: dict | None) -> int:
    """The run's number of data shards: fixed by its checkpoint once there is one."""
    shards = configured or (saved["data_shards"] if saved else world)
    if saved is not None and shards != saved["data_shards"]:
        raise ConfigError(f"distributed.data_shards={shards} but the checkpoint was written with {saved['data_shards']}")
    if shards % world:
        raise ConfigError(f"distributed.data_shards={shards} is not a multiple of the world size {world}")
    return shards


def train(cfg: TrainArgs, *, format_fn: Any = None, eval_hooks: Sequence[EvalHook] = ()) -> dict[str, Any]:
    """Train (or resume training) as configured; returns a summary dict (run_dir, step,
    losses by step, final_loss, val and eval results, last checkpoint, consolidated folder)."""
    started_pg = not D.dist.is_initialized()
    with StopSignal() as stop:
        try:
            with lock_run_folder(Path(cfg.dump_dir), D.init_distributed(cfg.distributed)):
                run = None
                try:
                    run = _Run(cfg, format_fn, eval_hooks, stop)
                    run.setup()
                    summary = run.loop()
                finally:
                    if run is not None:
                        run.close()
        finally:
            close_logger()
            if started_pg:
                D.destroy_distributed()
    if summary["requeue"]:
        raise TrainingRequeued(summary["step"], summary["requeue"])
    return summary
