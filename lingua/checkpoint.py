"""Training checkpoints: one folder per step, written so that a crash never leaves a folder that
looks usable.

``<run>/checkpoints/<step:010d>/`` holds

* the model and optimizer state through ``torch.distributed.checkpoint`` (``.metadata`` and
  ``__<rank>_0.distcp`` shards; any world size can load them, DCP reshards);
* ``train_state.json``: step, data positions per data shard, RNG states per rank, schedule,
  tokens seen (gathered on rank 0, so one file describes the whole run);
* ``config.yaml`` (the resolved run config) and ``params.json`` (the model arguments);
* ``COMPLETE``, written last, after every rank has finished writing;
* ``EVAL_PENDING`` (JSON) while the evaluation of this step has not been recorded: written before
  ``COMPLETE`` when the step is an evaluation step, removed once its result is in the run's metrics
  (by the trainer for in-process evaluation, by the evaluation job in launch mode).

Resuming picks the newest folder with the marker; folders without it are debris from a killed
write and are ignored (and removed by the next cleanup). Cleanup keeps the newest ``keep``
complete folders, the steps listed in ``keep_steps`` (and those the trainer adds: must-evaluate
steps), and every folder whose evaluation is pending.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lingua.distributed import DistEnv, barrier
from lingua.io import atomic_write_json, atomic_write_text, is_done, mark_done
from lingua.locks import disk_full_error

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
PARAMS = "params.json"
EVAL_PENDING = "EVAL_PENDING"
"""Step-folder record of an evaluation not yet recorded; cleanup never removes such a folder."""
# Test hook, "<step>:<seconds>": when saving that step, sleep after the shards and the train
# state are written but before the COMPLETE marker, so a test can kill the process mid-write.
PAUSE_ENV = "LINGUA_TEST_CKPT_PAUSE"


@dataclass
class CheckpointArgs:
    every: int = 1000
    """Save every N optimizer steps (0: only at the end). The final step is always saved."""
    keep: int = 2
    """Keep the newest k complete checkpoints (0: keep all)."""
    keep_steps: list[int] = field(default_factory=list)
    """Steps never removed by cleanup, on top of the newest ``keep``."""
    resume: bool = True
    """Continue from the newest complete checkpoint in the run folder when there is one."""
    init_ckpt_path: str = ""
    """Consolidated folder (``lingua.consolidated``) whose weights start a fresh run, e.g. an
    imported TinyLlama. Ignored when resuming: the run's own checkpoint wins."""
    consolidate: bool = True
    """At the end, also write ``checkpoints/<final step>/consolidated/`` for inference/export."""
    allow_config_change: bool = False
    """Resume even though settings that change the run (learning rate, steps, data, ...) differ
    from the checkpoint's; the change is recorded in the run folder (see ``lingua.trainer``)."""

    def validate(self) -> None:
        if self.every < 0 or self.keep < 0:
            raise ValueError(f"every and keep must be >= 0, got every={self.every} keep={self.keep}")


def step_folder(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{step:010d}"


def list_checkpoints(ckpt_dir: str | os.PathLike, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) pairs sorted by step; by default only folders with the COMPLETE marker."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.isdigit() and (is_done(p) or not complete_only):
            out.append((int(p.name), p))
    return out


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def mark_eval_pending(folder: str | os.PathLike, info: dict[str, Any]) -> None:
    """Record (atomically) that the evaluation of checkpoint ``folder`` is not recorded yet;
    ``info`` says how it will be done (mode, the job's command and id)."""
    atomic_write_json(Path(folder) / EVAL_PENDING, info)


def read_eval_pending(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The pending-evaluation record of ``folder``, or None when its evaluation is recorded."""
    path = Path(folder) / EVAL_PENDING
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:  # written atomically, so only by hand: still pending
        return {}
    return info if isinstance(info, dict) else {}


def clear_eval_pending(folder: str | os.PathLike) -> bool:
    """The evaluation of ``folder`` is recorded: drop its record (True if there was one)."""
    try:
        os.remove(Path(folder) / EVAL_PENDING)
    except FileNotFoundError:
        return False
    return True


def pending_evals(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints whose evaluation is pending, sorted by step."""
    return [(s, p) for s, p in list_checkpoints(ckpt_dir) if (p / EVAL_PENDING).is_file()]


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load; that is our plain-process mode, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def _disk_full_names(folder: Path, remove: bool = False) -> Iterator[None]:
    """A full disk while writing ``folder`` raises ``OSError(ENOSPC)`` naming it, not torch's
    ``enforce fail at inline_container.cc``; with ``remove`` the unfinished folder is deleted
    (it has no marker, so it is never used; this frees its space at once)."""
    try:
        yield
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        named = disk_full_error(e, folder)
        if named is None:
            raise
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
        raise named from e


def _test_pause(step: int) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            logger.warning("%s: sleeping %ss before writing COMPLETE of step %d", PAUSE_ENV, seconds, step)
            time.sleep(float(seconds))


# ------------------------------------------------------------------------------------------
# RNG states (JSON-able)


def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) generator states, as JSON."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode("ascii")

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(pystate), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = b64(torch.cuda.get_rng_state())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    version, pystate, gauss = state["python"]
    random.setstate((version, tuple(pystate), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# ------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, finds, loads and prunes the step folders of one run. Every rank calls ``save`` and
    ``load`` (DCP is collective); rank 0 alone writes the JSON/YAML files and the marker."""

    def __init__(self, ckpt_dir: str | os.PathLike, args: CheckpointArgs, env: DistEnv, keep_steps: Iterable[int] = ()):
        self.dir = Path(ckpt_dir)
        self.args = args
        self.env = env
        self.keep_steps = set(args.keep_steps) | {int(s) for s in keep_steps}
        """Steps cleanup never removes: ``checkpoint.keep_steps`` plus the caller's (must-evaluate steps)."""

    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir) if self.args.resume else None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_state: dict[str, Any],
        config_yaml: str,
        model_params: dict[str, Any],
        eval_pending: dict[str, Any] | None = None,
    ) -> Path:
        """Write the step folder; with ``eval_pending``, its pending-evaluation record goes in
        before the ``COMPLETE`` marker, so no cleanup can ever see the folder unprotected."""
        folder = step_folder(self.dir, step)
        t0 = time.perf_counter()
        if self.env.is_main:
            if folder.exists():  # debris of an interrupted write, or a run restarted with resume off
                logger.warning("replacing existing %s checkpoint folder %s", "complete" if is_done(folder) else "incomplete", folder)
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        barrier()
        with _disk_full_names(folder, remove=self.env.is_main):
            model_sd, optim_sd = get_state_dict(model, optimizer)
            with _quiet_single_process():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
            if self.env.is_main:
                atomic_write_json(folder / TRAIN_STATE, train_state)
                atomic_write_text(folder / CONFIG, config_yaml)
                atomic_write_json(folder / PARAMS, model_params)
                if eval_pending is not None:
                    mark_eval_pending(folder, eval_pending)
                _test_pause(step)
        barrier()
        if self.env.is_main:
            mark_done(folder, {"step": step})
            self.cleanup()
        barrier()
        logger.info("saved checkpoint %s in %.2fs", folder, time.perf_counter() - t0)
        return folder

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer in place from ``folder``; return its train state."""
        if not is_done(folder):
            raise FileNotFoundError(f"{folder} is not a complete checkpoint (no COMPLETE marker)")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        logger.info("resumed model and optimizer from %s", folder)
        return json.loads((folder / TRAIN_STATE).read_text())

    def cleanup(self) -> list[Path]:
        """Remove complete folders beyond the newest ``keep`` (except ``keep_steps`` and folders
        whose evaluation is pending) and incomplete folders older than the newest complete one.
        Returns what was removed."""
        complete = list_checkpoints(self.dir)
        if not complete:
            return []
        newest = complete[-1][0]
        keep = {s for s, _ in complete[-self.args.keep :]} if self.args.keep else {s for s, _ in complete}
        keep |= self.keep_steps
        removed, spared = [], []
        for s, p in list_checkpoints(self.dir, complete_only=False):
            stale_debris = not is_done(p) and s < newest
            if is_done(p) and s not in keep and (p / EVAL_PENDING).is_file():
                spared.append(p)
            elif stale_debris or (is_done(p) and s not in keep):
                shutil.rmtree(p)
                removed.append(p)
        if removed:
            logger.info("checkpoint cleanup removed %s", ", ".join(p.name for p in removed))
        if spared:
            logger.info("checkpoint cleanup kept %s: evaluation pending", ", ".join(p.name for p in spared))
        return removed


# ------------------------------------------------------------------------------------------
# consolidated checkpoints (single folder, plain state dict) for inference, export and init


def consolidate(step_dir: str | os.PathLike, tokenizer: Any = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Turn the DCP shards of ``step_dir`` into a ``lingua.consolidated`` folder (default
    ``step_dir/consolidated``). Runs in one process, whatever world size wrote the shards. The
    tokenizer defaults to the run folder's copy (``<run>/tokenizer``)."""
    from lingua.consolidated import load_tokenizer, save_consolidated

    step_dir = Path(step_dir)
    out = Path(out_dir) if out_dir is not None else step_dir / "consolidated"
    model = load_model(step_dir)
    if tokenizer is None:
        tokenizer = load_tokenizer(step_dir.parent.parent)
    train_state = json.loads((step_dir / TRAIN_STATE).read_text())
    with _disk_full_names(out):
        save_consolidated(model, tokenizer, out, extra={"step": train_state["step"], "source": str(step_dir)})
    logger.info("consolidated %s -> %s", step_dir, out)
    return out


def load_model(step_dir: str | os.PathLike) -> nn.Module:
    """The model of a complete checkpoint folder, on CPU, read in this one process whatever world
    size wrote the shards (the weights only; nothing is written)."""
    from lingua.args import from_dict
    from lingua.transformer import Transformer, TransformerArgs

    step_dir = Path(step_dir)
    if not is_done(step_dir):
        raise FileNotFoundError(f"{step_dir} is not a complete checkpoint (no COMPLETE marker)")
    margs = from_dict(TransformerArgs, json.loads((step_dir / PARAMS).read_text()), str(step_dir / PARAMS))
    model = Transformer(margs)
    state = {"model": model.state_dict()}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    model.load_state_dict(state["model"])
    return model


def load_init_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the weights of the consolidated folder ``path`` into ``model`` (sharded or not).
    Shape mismatches (e.g. a vocabulary that does not match the tokenizer) are an error that
    names every offending tensor."""
    from lingua.consolidated import load_consolidated

    src, _ = load_consolidated(path, device="cpu")
    full = src.state_dict()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k}: missing in {path}" for k in own if k not in full]
    problems += [f"{k}: unexpected in {path}" for k in full if k not in own]
    problems += [
        f"{k}: {tuple(full[k].shape)} in {path} vs {own[k]} in the model"
        for k in own
        if k in full and tuple(full[k].shape) != own[k]
    ]
    if problems:
        raise ValueError(f"init checkpoint {path} does not fit the model config:\n  " + "\n  ".join(problems))
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    logger.info("initialised weights from %s", path)
