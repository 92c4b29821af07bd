"""Text logging for runs: a rank-prefixed ``train.log`` and a one-line progress report.

Every rank appends to the same ``train.log`` (lines are short single writes to a file opened in
append mode, so they interleave whole); only rank 0 prints INFO to the console, other ranks print
warnings and errors, each line prefixed with its rank so a multi-process log stays readable.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

_HANDLER_TAG = "_lingua_handler"
_RUN_LOGS: list[Path] = []


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__("[rank%d] %%(asctime)s %%(levelname).1s %%(name)s: %%(message)s" % rank, "%H:%M:%S")


def init_logger(log_file: str | os.PathLike | None, rank: int = 0, level: str = "INFO") -> logging.Logger:
    """Configure the root logger for this process. Calling it again (a second run in the same
    process, as tests do) replaces the handlers it installed before instead of adding more."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    fmt = _RankFormatter(rank)
    handlers: list[logging.Handler] = []
    # A caller that already logs to the console (e.g. the EM driver composing stages) keeps its
    # handler; adding ours would print every line twice.
    if not any(getattr(h, "stream", None) in (sys.stdout, sys.stderr) for h in root.handlers):
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(level if rank == 0 else "WARNING")
        console.setFormatter(fmt)
        handlers.append(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        remember_log_file(log_file)
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(fmt)
        handlers.append(file_handler)
    for h in handlers:
        setattr(h, _HANDLER_TAG, True)
        root.addHandler(h)
    return root


def remember_log_file(path: str | os.PathLike) -> None:
    """Note a run's log file; the entry point's error handler appends a failure's traceback to it
    (after the run has closed its handlers). See :mod:`lingua.errors`."""
    _RUN_LOGS.append(Path(path).absolute())


def run_log_files() -> list[Path]:
    """The log files runs of this process have opened, oldest first (once per opening)."""
    return list(_RUN_LOGS)


def close_logger() -> None:
    """Detach and close the handlers installed by :func:`init_logger` (flushes train.log)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(h)
        h.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


class Every:
    """A clock for progress lines of long loops: ``due()`` is true at most once per ``seconds``
    (counted from its creation), so a loop over millions of items logs a line now and then."""

    def __init__(self, seconds: float = 30.0, clock=time.perf_counter):
        self.seconds = seconds
        self.clock = clock
        self.t0 = self.last = clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True

    def elapsed(self) -> float:
        return self.clock() - self.t0


class Progress:
    """Progress line with an ETA from the average time per step of this process's steps (the
    first step, which pays for compilation and warm-up, is left out once there are others)."""

    def __init__(self, total_steps: int, start_step: int, clock=time.perf_counter):
        self.total = total_steps
        self.start = start_step
        self.clock = clock
        self.t0 = clock()
        self.t_first: float | None = None

    def mark_first_step(self) -> None:
        if self.t_first is None:
            self.t_first = self.clock()

    def eta_seconds(self, step: int) -> float:
        now = self.clock()
        if self.t_first is not None and step - self.start > 1:
            per_step = (now - self.t_first) / (step - self.start - 1)
        elif step > self.start:
            per_step = (now - self.t0) / (step - self.start)
        else:
            return float("nan")
        return per_step * (self.total - step)

    def line(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float) -> str:
        pct = 100.0 * step / max(self.total, 1)
        return (
            f"step {step}/{self.total} ({pct:.0f}%) | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f}"
            f" | {format_count(tokens_per_s)} tok/s | ETA {format_duration(self.eta_seconds(step))}"
        )
