"""Training metrics: ``metrics.jsonl`` (one flat dict per logged step, "/"-separated keys),
hardware figures (MFU, memory) and an optional wandb mirror.

wandb is imported only when ``logging.wandb`` is true, runs offline unless the config says
otherwise (``WANDB_MODE`` is exported before the import, which also stops wandb's network
look-up at exit), and is never required: everything it shows is in ``metrics.jsonl``.

A run's wandb identity (:func:`wandb_identity`) comes from its folder, not its name: the EM driver
names runs ``warmstart_t0``, ``iter1_t0``, ... in every experiment, so the id is the name plus a
hash of the resolved run folder (the same on every resume of that folder, different for another
experiment's run of the same name). ``group`` is the experiment (``logging.wandb_group``; default:
the run folder's parent, or its grandparent when the parent is a generic ``runs`` folder, i.e. the
EM ``dump_dir``'s name), ``job_type`` the stage (``logging.wandb_job_type``; default: the run
name without its ``_t<trial>`` suffix: ``warmstart``, ``iter1``, ``raw_token_match``).
"""

from __future__ import annotations

import json
import hashlib
import logging
import os
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lingua.io import atomic_write_text

logger = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")

# Dense bf16 peak FLOP/s per GPU (vendor data sheets, without sparsity). Matched as substrings
# of ``torch.cuda.get_device_name()``, most specific first.
PEAK_FLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
)


@dataclass
class LoggingArgs:
    level: str = "INFO"
    wandb: bool = False
    """Mirror metrics to wandb (imported only then)."""
    wandb_mode: str = "offline"
    """offline | online | disabled; online needs credentials configured for wandb."""
    wandb_project: str = "bolt"
    wandb_entity: str = ""
    wandb_tags: list[str] = field(default_factory=list)
    wandb_group: str = ""
    """The experiment the run belongs to; "": the run folder's parent (skipping a ``runs`` folder)."""
    wandb_job_type: str = ""
    """The run's stage; "": its name without the ``_t<trial>`` suffix."""

    def validate(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {'|'.join(WANDB_MODES)}, got {self.wandb_mode!r}")
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"level must be DEBUG|INFO|WARNING|ERROR, got {self.level!r}")


_GENERIC_PARENTS = ("runs",)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def wandb_identity(run_dir: str | os.PathLike, run_name: str, args: LoggingArgs) -> dict[str, str]:
    """``id``, ``group`` and ``job_type`` of the wandb run of the run folder ``run_dir``.

    The id is the (sanitised) name plus 12 hex digits of the SHA-256 of the resolved folder path:
    stable across resumes of the folder, distinct between experiments that reuse run names."""
    folder = Path(run_dir).resolve()
    digest = hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:12]
    stem = _UNSAFE.sub("-", run_name).strip("-.")[:48] or "run"
    group = args.wandb_group
    if not group:
        parent = folder.parent
        if parent.name in _GENERIC_PARENTS and parent.parent.name:
            parent = parent.parent
        group = parent.name or "root"
    job_type = args.wandb_job_type or re.sub(r"_t\d+$", "", run_name) or run_name
    return {"id": f"{stem}-{digest}", "group": group[:128], "job_type": job_type[:64]}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of ``device`` when it is a GPU we know; None otherwise (CPUs included:
    their peak depends on cores, clocks and ISA, and a guess would make MFU meaningless)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    if not peak or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)


def memory_stats(device: torch.device) -> dict[str, float]:
    """GPU allocator peaks on CUDA; resident set size of the process on CPU (GiB)."""
    gib = 1024**3
    if device.type == "cuda":
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
        }
    out = {"memory/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}
    try:
        with open("/proc/self/statm") as f:
            out["memory/rss_gib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / gib
    except (OSError, ValueError, IndexError):
        pass
    return out


class MetricLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` (flushed at once, so a crash loses
    at most the line being written) and mirrors it to wandb when enabled. Only the main rank
    should create one."""

    def __init__(self, path: str | os.PathLike, args: LoggingArgs, run_name: str, config: dict[str, Any],
                 run_dir: str | os.PathLike | None = None):
        """``run_dir`` (default: the folder of ``path``) fixes the wandb identity (:func:`wandb_identity`)."""
        self.path = Path(path)
        self.run_dir = Path(run_dir) if run_dir is not None else self.path.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._wandb = self._init_wandb(args, run_name, config) if args.wandb else None

    def _init_wandb(self, args: LoggingArgs, run_name: str, config: dict[str, Any]) -> Any:
        os.environ["WANDB_MODE"] = args.wandb_mode
        import wandb

        return wandb.init(
            project=args.wandb_project,
            entity=args.wandb_entity or None,
            name=run_name,
            **wandb_identity(self.run_dir, run_name, args),
            resume="allow",
            dir=str(self.path.parent),
            config=config,
            tags=[t[:64] for t in args.wandb_tags],
            mode=args.wandb_mode,
        )

    def log(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._wandb is not None:
            step = metrics.get("step")
            self._wandb.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Drop the lines of steps after ``last_step`` (and any torn last line) from a metrics file,
    so a resumed run does not log those steps twice. Returns the number of lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and rec.get("step", 0) > last_step:
            dropped += 1
        else:
            kept.append(raw)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        logger.info("dropped %d metric lines after step %d from %s", dropped, last_step, path)
    return dropped
