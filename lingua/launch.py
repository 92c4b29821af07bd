"""One launcher for every stage: print the command (``cat``), run it here (``run``), or submit it
to slurm through submitit (``launch``), optionally as an array of shards.

    python -m lingua.launch mode=cat  module=apps.bolt.train nproc=2 -- config=cfg.yaml steps=10
    python -m lingua.launch mode=run  module=apps.bolt.estep shards=4 -- config=estep.yaml
    python -m lingua.launch mode=launch module=apps.bolt.estep shards=200 gpus=1 wait=true -- config=...

With ``shards=N`` the stage gets ``shard=i num_shards=N`` appended for i in 0..N-1 (run mode
runs them one after another, or ``parallel`` at a time; slurm mode submits a job array), plus
``shard_args`` with ``{shard}`` replaced by i. With ``nproc>1`` the stage runs under torchrun
(``--standalone`` on one node; on several nodes the rendezvous is the job's first node).

Submitted jobs are plain submitit jobs, so a program can also wait for them and re-attach to
them later from their ids: :func:`submit_jobs`, :func:`attach_jobs`, :func:`job_alive`,
:func:`wait_jobs` (the EM driver does this). ``cluster=local`` runs the same submissions as local
processes through submitit's local executor: a stand-in for slurm on a machine without it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from lingua.args import load_config
from lingua.errors import entry_point

MODES = ("cat", "run", "launch")
CLUSTERS = ("slurm", "local")
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "PREEMPTED")
"""Slurm states of a job that has not finished for good (a re-attached job in one is waited for)."""
MASTER_ADDR = "{master_addr}"
"""Placeholder in multi-node torchrun commands, filled in the job from its node list."""


@dataclass
class LaunchArgs:
    mode: str = "cat"  # cat | run | launch
    module: str = ""  # e.g. apps.bolt.train
    nproc: int = 1  # processes per node (torchrun when > 1)
    nodes: int = 1
    shards: int = 0  # 0: one job; N: N jobs with shard=i num_shards=N
    shard_args: list[str] = field(default_factory=list)
    """Extra stage arguments per shard, ``{shard}`` replaced by the shard index (e.g. a per-shard
    cache file: SQLite files are not safe to share between nodes on network file systems)."""
    parallel: int = 1  # run mode: shards running at once
    job_name: str = "bolt"
    log_dir: str = "runs/launch_logs"
    # slurm resources (launch mode)
    cluster: str = "slurm"
    """submitit executor: ``slurm``, or ``local`` (jobs as local processes) to stand in for it."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus: int = 0  # per node
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 24 * 60
    max_array_parallel: int = 256
    extra_slurm: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    """Slurm: shell lines run in the job before the command (``module load ...``, ``source .venv/bin/activate``)."""
    rdzv_port: int = 29500
    """Multi-node torchrun: rendezvous port on the job's first node."""
    wait: bool = False
    """Launch mode: block until the jobs finish; exit 1 (listing their logs) when one failed."""
    poll_s: float = 60.0
    """Seconds between checks while waiting."""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.module:
            raise ValueError("module is required, e.g. module=apps.bolt.train")
        if self.shards < 0 or self.nproc < 1 or self.parallel < 1 or self.nodes < 1:
            raise ValueError("shards >= 0, nproc >= 1, nodes >= 1 and parallel >= 1 are required")
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {CLUSTERS}, got {self.cluster!r}")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {self.poll_s}")


def stage_command(a: LaunchArgs, stage_argv: list[str], shard: int | None = None) -> list[str]:
    """The exact command one job runs."""
    argv = list(stage_argv)
    if shard is not None:
        argv += [f"shard={shard}", f"num_shards={a.shards}"]
        argv += [s.format(shard=shard) for s in a.shard_args]
    if a.nproc > 1 or a.nodes > 1:
        head = ["torchrun", f"--nproc_per_node={a.nproc}"]
        if a.nodes == 1:
            head += ["--standalone"]
        else:
            head += [f"--nnodes={a.nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={MASTER_ADDR}:{a.rdzv_port}"]
        return head + ["-m", a.module] + argv
    return [sys.executable, "-m", a.module] + argv


def commands(a: LaunchArgs, stage_argv: list[str], shard_ids: Sequence[int] | None = None) -> list[list[str]]:
    """One command per job: every shard (or only ``shard_ids``), or the single job."""
    if a.shards == 0:
        return [stage_command(a, stage_argv)]
    ids = range(a.shards) if shard_ids is None else shard_ids
    bad = [i for i in ids if not 0 <= i < a.shards]
    if bad:
        raise ValueError(f"shard ids {bad} outside 0..{a.shards - 1}")
    return [stage_command(a, stage_argv, s) for s in ids]


def _run_local(cmds: list[list[str]], parallel: int) -> int:
    running: list[subprocess.Popen] = []
    failures = 0
    for cmd in cmds:
        while len(running) >= parallel:
            failures += running.pop(0).wait() != 0
        print("+ " + shlex.join(cmd), flush=True)
        running.append(subprocess.Popen(cmd))
    for p in running:
        failures += p.wait() != 0
    return 1 if failures else 0


# ------------------------------------------------------------------------------------- slurm
class JobCommand:
    """What a submitted job runs: one command, its output streamed to the job's log files (not
    buffered in memory as ``submitit.helpers.CommandFunction`` does: training logs are long).

    In the job, the interpreter's folder leads ``PATH`` (so ``torchrun`` is the job's own) and
    ``{master_addr}`` becomes the job's first node (multi-node rendezvous)."""

    def __init__(self, command: list[str], cwd: str):
        self.command = list(command)
        self.cwd = cwd

    def resolved(self, master_addr: str | None = None) -> list[str]:
        if master_addr is None and any(MASTER_ADDR in c for c in self.command):
            import submitit

            master_addr = submitit.JobEnvironment().hostnames[0]
        return [c.replace(MASTER_ADDR, master_addr) if master_addr else c for c in self.command]

    def __call__(self) -> int:
        cmd = self.resolved()
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        print("+ " + shlex.join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=self.cwd, env=env)
        if code != 0:
            raise RuntimeError(f"command exited with status {code}: {shlex.join(cmd)}")
        return code


def _executor(a: LaunchArgs, folder: Path) -> Any:
    try:
        import submitit
    except ImportError as e:  # pragma: no cover - submitit is in requirements
        raise SystemExit("launch mode needs submitit: pip install submitit") from e
    ex = submitit.AutoExecutor(folder=str(folder), cluster=a.cluster)
    params: dict[str, Any] = dict(
        name=a.job_name,
        nodes=a.nodes,
        tasks_per_node=1,
        cpus_per_task=a.cpus_per_task,
        mem_gb=a.mem_gb,
        timeout_min=a.time_min,
        slurm_array_parallelism=a.max_array_parallel,
    )
    if a.gpus:
        params["gpus_per_node"] = a.gpus
    for key, value in (("slurm_partition", a.partition), ("slurm_account", a.account), ("slurm_qos", a.qos)):
        if value:
            params[key] = value
    if a.extra_slurm:
        params["slurm_additional_parameters"] = dict(a.extra_slurm)
    if a.setup:
        params["slurm_setup"] = list(a.setup)
    ex.update_parameters(**params)
    return ex


def job_folder(a: LaunchArgs) -> Path:
    """Where submitit keeps a submission's scripts, pickles and logs."""
    return Path(a.log_dir) / a.job_name


_SUBMIT_LOCK = threading.Lock()
_INHERITED = ("SLURM_", "SLURMD_", "SRUN_", "SUBMITIT_")
_DISTRIBUTED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def _submission_env() -> Iterator[None]:
    """Hide the variables of the job we may be running in (a driver submitted as a job), which
    sbatch would pass on and srun would obey (cpus, memory, cpu binding, ranks), as
    ``submitit.helpers.clean_env`` does, but keep ``SLURM_CONF``: some clusters need it to find
    their configuration. Callers hold ``_SUBMIT_LOCK``: the environment is process-wide."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ)
              if (k.startswith(_INHERITED) and k != "SLURM_CONF") or k in _DISTRIBUTED}
    try:
        yield
    finally:
        os.environ.update(hidden)


def submit_jobs(a: LaunchArgs, cmds: list[list[str]]) -> list[Any]:
    """Submit one job per command (an array when there are several); returns submitit jobs.
    Safe to call from several threads."""
    fns = [JobCommand(cmd, cwd=os.getcwd()) for cmd in cmds]
    with _SUBMIT_LOCK, _submission_env():
        ex = _executor(a, job_folder(a))
        with ex.batch():
            jobs = [ex.submit(fn) for fn in fns]
    return jobs


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


def run(a: LaunchArgs, stage_argv: list[str]) -> int:
    cmds = commands(a, stage_argv)
    if a.mode == "cat":
        for cmd in cmds:
            print(shlex.join(cmd))
        return 0
    if a.mode == "run":
        return _run_local(cmds, a.parallel)
    jobs = submit_jobs(a, cmds)
    ids = [str(j.job_id) for j in jobs]
    print(f"submitted {len(ids)} job(s): {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}; logs in {job_folder(a)}")
    if not a.wait:
        return 0
    failures = wait_jobs(jobs, a.poll_s, log=print)
    if failures:
        print(JobsFailed(a.module, failures), file=sys.stderr)
        return 1
    print(f"all {len(jobs)} job(s) finished")
    return 0


@entry_point("lingua.launch")
def main(argv: list[str] | None = None) -> None:
    argv = list(argv or [])
    if "--" in argv:
        cut = argv.index("--")
        own, stage_argv = argv[:cut], argv[cut + 1 :]
    else:
        own, stage_argv = argv, []
    raise SystemExit(run(load_config(LaunchArgs, None, own), stage_argv))


if __name__ == "__main__":
    main()
