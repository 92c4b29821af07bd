"""Checkpoint-and-requeue on a job's time-limit signal: the signal to watch, the exit status of a
run that stopped on it after saving, and the handler the training loop polls. :mod:`lingua.trainer`
stops at the end of the current step when the signal came; :mod:`lingua.launch`'s job wrapper
requeues a job that exits with :data:`EXIT_REQUEUE`."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from lingua.args import ConfigError

EXIT_REQUEUE = 75
"""Exit status of a training stopped by the time-limit signal after saving a checkpoint (EX_TEMPFAIL)."""
REQUEUE_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


class TrainingRequeued(SystemExit):
    """Raised by :func:`train` once a run stopped by the requeue signal has saved its checkpoint
    and released its folder; its exit status is :data:`EXIT_REQUEUE`."""

    def __init__(self, step: int, signame: str):
        super().__init__(EXIT_REQUEUE)
        self.step, self.signame = step, signame


def requeue_signal() -> signal.Signals | None:
    """The time-limit warning signal: ``$SUBMITIT_PREEMPT_SIGNAL`` (``USR2``, ``SIGUSR2`` or a
    number; ``none`` or empty: no handler), default ``SIGUSR2`` (what submitit asks slurm for)."""
    name = os.environ.get(REQUEUE_SIGNAL_ENV, "USR2").strip()
    if name.lower() in ("", "none", "0"):
        return None
    try:
        return signal.Signals(int(name)) if name.isdigit() else signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise ConfigError(f"{REQUEUE_SIGNAL_ENV}={name!r} is not a signal name (e.g. USR2) or number") from None


class StopSignal:
    """Records the requeue signal while installed (main thread only); the loop polls ``seen``."""

    def __init__(self) -> None:
        self.sig = requeue_signal()
        self.seen: str | None = None
        self._previous: Any = None

    def __enter__(self) -> "StopSignal":
        if self.sig is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(self.sig, self._previous)
