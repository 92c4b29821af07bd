"""One writer per run folder: ``with RunLock(folder, "train"): ...``.

Every stage that writes a folder (training's ``dump_dir``, ``prepare``'s ``out_dir``, one E-step
or teacher shard, a merge) holds an exclusive lock file while it works, so a second identical
command fails at once with one line naming the holder instead of interleaving metrics and
deleting the first one's checkpoints. The lock file (default ``FOLDER/.lock``; a shard passes
its own name, so the shards of one stage run side by side) records the holder's host, pid,
start time and command line.

Two mechanisms, chosen per file system:

* ``flock``: the kernel releases the lock when the holder exits, however it dies (``kill -9``
  included), so a lock is never stale on a local disk. The file is removed on release; a file
  left by a killed holder is simply locked again by the next writer.
* where ``flock`` is not supported (some NFS mounts), an exclusively created file (``O_EXCL``).
  A file left by a holder that died is recognised when it names a pid of this host that no longer
  runs, and taken over; otherwise the error says to delete the file if no such process runs.

Disk full: a full disk that leaves the ``with`` block without saying where (an ``OSError``
without a file name, as ``f.write`` raises, or torch's ``enforce fail at inline_container.cc``)
is re-raised as ``OSError(ENOSPC)`` naming the locked folder (:func:`disk_full_error`, also used
by :mod:`lingua.checkpoint`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from lingua.errors import ExpectedError

LOCK_NAME = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_FULL_SIGNS = ("inline_container", "database or disk is full", "disk I/O error")
_NEARLY_FULL = 64 << 20
"""Free bytes below which a write failure without an errno is taken for a full disk."""


class LockHeldError(ExpectedError):
    """The folder is being written by another process (the message names it)."""


def _holder_info(what: str) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "what": what,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:300],
    }


def read_holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """What the lock file ``path`` says about its holder (None: no file, or not written yet)."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def disk_full_error(e: BaseException, folder: str | os.PathLike) -> OSError | None:
    """``OSError(ENOSPC, ..., folder)`` when ``e`` is a full disk (or quota) that does not say
    where: an ``OSError`` without a file name (``f.write``'s), or a writer that reports it without
    an errno while ``folder``'s file system is (nearly) full: torch's zip writer (``[enforce fail at
    inline_container.cc...]``; DCP wraps it in a ``CheckpointException``) or SQLite (``database or
    disk is full``, ``disk I/O error``). Else None."""
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, trace)}
    for inner in [*(pair[0] for pair in failures.values()), e] if isinstance(failures, dict) else [e]:
        if isinstance(inner, OSError) and inner.errno in _DISK_FULL:
            return None if inner.filename is not None else OSError(inner.errno, os.strerror(inner.errno), str(folder))
        if any(sign in str(inner) for sign in _FULL_SIGNS) and not isinstance(inner, OSError):
            try:
                free = shutil.disk_usage(_existing(Path(folder))).free
            except OSError:
                return None
            if free < _NEARLY_FULL:
                said = str(inner).strip().splitlines()[0][:200]
                return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free; {said})", str(folder))
    return None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _died_here(holder: dict | None) -> bool:
    """The holder named by a lock file ran on this host and no longer runs."""
    return bool(holder) and holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive lock of ``folder`` (created when missing) for ``what`` (``train``, ``prepare``,
    ``E-step shard 0/4``, ...), taken on ``__enter__`` / :meth:`acquire`.

    Raises :class:`LockHeldError` when another process (or another ``RunLock`` of this process)
    holds it. ``use_flock=False`` forces the exclusive-create fallback (tests)."""

    def __init__(self, folder: str | os.PathLike, what: str = "train", name: str = LOCK_NAME,
                 *, use_flock: bool | None = None):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.use_flock = fcntl is not None if use_flock is None else use_flock
        self._fd: int | None = None
        self._info: dict[str, Any] | None = None

    @classmethod
    def beside(cls, path: str | os.PathLike, what: str) -> "RunLock":
        """The lock of one shard's output ``path`` (a file or folder): ``<stem>.lock`` beside it,
        so the shards of one stage, written into one folder by parallel processes, do not block
        each other while two processes writing the same shard do."""
        path = Path(path)
        return cls(path.parent, what, f"{path.stem}.lock")

    # ------------------------------------------------------------------------------ public
    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> "RunLock":
        """Take the lock; ``wait_s`` > 0: while another process holds it, retry every ``poll_s``
        seconds for up to ``wait_s`` seconds before raising :class:`LockHeldError` (for work that
        concurrent jobs should do once, e.g. one HF export read by many E-step shards)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._acquire_once()
            except LockHeldError:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    def _acquire_once(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # retried when the file vanished or was replaced between two steps
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            try:
                locked = self._flock(fd)
                if locked and not _same_file(fd, self.path):  # removed by a holder releasing it
                    os.close(fd)
                    continue
                if not locked and not created:  # no flock: the file is a lock unless its holder died here
                    holder = read_holder(self.path)
                    if not _died_here(holder):
                        raise self._held_error(holder)
                    os.close(fd)
                    if read_holder(self.path) == holder:
                        self.path.unlink(missing_ok=True)
                    continue
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.use_flock = fd, locked
            self._write_info()
            return self
        raise RuntimeError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self.use_flock or read_holder(self.path) == self._info:
                self.path.unlink(missing_ok=True)  # still ours (flock held / our record)
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self if self.held else self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
        named = disk_full_error(exc, self.folder) if exc is not None else None
        if named is not None:
            raise named from exc

    # ----------------------------------------------------------------------------- private
    def _flock(self, fd: int) -> bool:
        """Take the flock of ``fd``: True, or False where the file system has none."""
        if not self.use_flock:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._held_error(read_holder(self.path)) from None
        except OSError as e:
            if e.errno in _NO_FLOCK:
                return False
            raise
        return True

    def _write_info(self) -> None:
        self._info = _holder_info(self.what)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(self._info) + "\n").encode("utf-8"), 0)

    def _held_error(self, holder: dict | None) -> LockHeldError:
        if holder:
            who = (f"{holder.get('what', 'a run')} on host {holder.get('host')}, pid {holder.get('pid')}, "
                   f"since {holder.get('since')} ({holder.get('command', '')})")
        else:
            who = "another process (its lock file names no holder yet)"
        return LockHeldError(
            f"{self.folder} is in use by {who}; wait for it to end or stop it. "
            f"If no such process runs, the lock is stale: delete {self.path}"
        )

@contextlib.contextmanager
def lock_run_folder(folder: Path, env: Any, stage: str = "train") -> Iterator[None]:
    """Hold ``folder``'s :class:`RunLock` for the whole call in a distributed job (``env``: a
    :class:`lingua.distributed.DistEnv`). Rank 0 takes it; when it cannot, every rank raises (none
    is left waiting in a collective)."""
    from lingua import distributed as D

    lock = RunLock(folder, stage) if env.is_main else None
    failure = None
    if lock is not None:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = e
    message = D.all_gather_object(None if failure is None else str(failure))[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise LockHeldError(f"rank 0 could not lock the run folder: {message}")
    with lock if lock is not None else contextlib.nullcontext():
        yield


__all__ = ["LOCK_NAME", "LockHeldError", "RunLock", "disk_full_error", "lock_run_folder", "read_holder"]
