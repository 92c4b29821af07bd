"""Watching submitted jobs: re-attach to them by id, ask whether they still run, wait for them
and collect the failures with their log files.

Jobs are submitit jobs (slurm or submitit's local executor), as :func:`lingua.launch.submit_jobs`
returns them; a program can re-attach to them later from their ids (the EM driver does, after a
restart), so nothing here needs the process that submitted them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "PREEMPTED")


def attach_jobs(cluster: str, folder: str | Path, job_ids: Sequence[str]) -> list[Any]:
    """Job handles for ids submitted earlier (possibly by another process) into ``folder``."""
    if cluster == "slurm":
        from submitit.slurm.slurm import SlurmJob

        return [SlurmJob(folder, job_id) for job_id in job_ids]
    from submitit.local.local import LocalJob

    return [LocalJob(folder, job_id) for job_id in job_ids]


def job_alive(job: Any) -> bool:
    """Whether a job may still produce a result: no result file yet and, for slurm, a live state
    (a state slurm no longer knows, e.g. a purged old job, counts as finished). A local job's id
    is its controller's pid."""
    if job.paths.result_pickle.exists():
        return False
    from submitit.local.local import LocalJob

    if isinstance(job, LocalJob):
        if getattr(job, "_process", None) is not None:
            return job._process.poll() is None
        return _pid_running(int(job.job_id))
    state = job.watcher.get_state(job.job_id, mode="standard")  # one sacct call for all new handles
    return state.split()[0].upper() in LIVE_STATES if state else False


def _done(job: Any) -> bool:
    """submitit's ``done()``, except for a local job re-attached from its id: submitit cannot see
    its process, so ask the system whether the pid still runs."""
    from submitit.local.local import LocalJob

    if isinstance(job, LocalJob) and getattr(job, "_process", None) is None:
        return job.paths.result_pickle.exists() or not _pid_running(int(job.job_id))
    return job.done()


def _pid_running(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our finished child
        if done:
            return False
    except ChildProcessError:
        pass  # not our child: fall back to a signal-0 probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class JobFailure:
    job_id: str
    state: str
    stdout: str
    stderr: str
    error: str
    """The job's exception (last lines), as submitit reports it."""

    def describe(self) -> str:
        return f"job {self.job_id} ({self.state}): {self.error}\n    logs: {self.stderr}\n          {self.stdout}"


class JobsFailed(RuntimeError):
    """Some submitted jobs failed; the message names each one with its log files."""

    def __init__(self, what: str, failures: Sequence[JobFailure]):
        self.failures = list(failures)
        lines = [f"{what}: {len(self.failures)} job(s) failed"] + [f.describe() for f in self.failures[:10]]
        if len(self.failures) > 10:
            lines.append(f"... and {len(self.failures) - 10} more")
        super().__init__("\n".join(lines))


def _tail(text: str, lines: int = 6) -> str:
    return "\n      ".join(text.strip().splitlines()[-lines:])


def wait_jobs(jobs: Sequence[Any], poll_s: float = 60.0, log: Callable[[str], None] | None = None) -> list[JobFailure]:
    """Block until every job is done; returns the failed ones (empty when all succeeded)."""
    pending = list(jobs)
    t0 = last = time.monotonic()
    while pending:
        pending = [j for j in pending if not _done(j)]
        if not pending:
            break
        if log is not None and time.monotonic() - last >= max(600.0, 10 * poll_s):
            last = time.monotonic()
            log(f"waiting for {len(pending)} of {len(jobs)} job(s) ({(last - t0) / 60:.0f} min so far)")
        time.sleep(poll_s)
    failures = []
    for job in jobs:
        state = str(job.state)
        if job.paths.result_pickle.exists() or state.upper().startswith(("COMPLETED", "FINISHED")):
            exc = job.exception()  # reads the result file (waiting briefly for a slow file system)
            error = None if exc is None else _tail(str(exc))
        else:  # killed by the scheduler (time limit, memory, node failure, cancel): no result file
            error = f"no result file (state {state}); the end of its error log says why"
        if error is not None:
            failures.append(JobFailure(str(job.job_id), state, str(job.paths.stdout), str(job.paths.stderr), error))
    return failures
