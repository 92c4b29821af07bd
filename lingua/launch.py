"""One launcher for every stage: print the command (``cat``), run it here (``run``), or submit it
to slurm through submitit (``launch``), optionally as an array of shards.

    python -m lingua.launch mode=cat  module=apps.bolt.train nproc=2 -- config=cfg.yaml steps=10
    python -m lingua.launch mode=run  module=apps.bolt.estep shards=4 -- config=estep.yaml
    python -m lingua.launch mode=launch module=apps.bolt.estep shards=200 gpus=1 wait=true -- config=...

With ``shards=N`` the stage gets ``shard=i num_shards=N`` appended for i in 0..N-1 (run mode
runs them one after another, or ``parallel`` at a time; slurm mode submits a job array), plus
``shard_args`` with ``{shard}`` replaced by i. With ``nproc>1`` the stage runs under torchrun
(``--standalone`` on one node; on several nodes the rendezvous is the job's first node).

Before anything is submitted, ``launch`` parses the stage's own configuration exactly as the
stage will (its ``main``'s ``cli_config`` class, over the first job's arguments), so a missing
``config=`` file or a typo fails at once with one line (exit 2), not after the queue wait
(``check_config=false`` skips this). ``cluster=slurm`` without ``sbatch`` on ``PATH`` is one line
too. ``mode=cat script=true`` also prints the sbatch script ``launch`` would submit.

Time limits: submitit asks slurm for its warning signal (``SIGUSR2``, ``signal_delay_s`` seconds
before the limit). The job wrapper (:class:`JobCommand`) passes it on to the stage (a training saves
a checkpoint at the end of its current step and exits with ``lingua.requeue.EXIT_REQUEUE``), waits
for it, and has submitit requeue the job, which then resumes from that checkpoint.

Submitted jobs are plain submitit jobs, so a program can also wait for them and re-attach to
them later from their ids: :func:`submit_jobs` here, then :mod:`lingua.jobs` (``attach_jobs``,
``job_alive``, ``wait_jobs``; the EM driver does this). ``cluster=local`` runs the same
submissions as local processes through submitit's local executor: a stand-in for slurm on a
machine without it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from lingua.args import ConfigError, load_config, parse_args
from lingua.errors import ExpectedError, entry_point
# this module is also the EM driver's default job backend: submit_jobs here, the rest re-exported
from lingua.jobs import JobsFailed, attach_jobs, job_alive, wait_jobs  # noqa: F401
from lingua.requeue import EXIT_REQUEUE  # noqa: F401  (also read as launch.EXIT_REQUEUE)

MODES = ("cat", "run", "launch")
CLUSTERS = ("slurm", "local")
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
    signal_delay_s: int = 90
    """Launch mode (slurm): the time-limit warning signal comes this long before the limit."""
    check_config: bool = True
    """Launch mode: parse the stage's configuration before submitting (fail here, not in the queue)."""
    script: bool = False
    """Cat mode: also print the sbatch script launch mode would submit (cluster=slurm)."""

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
        if self.signal_delay_s < 0 or (self.signal_delay_s >= 60 * self.time_min):
            raise ValueError(f"signal_delay_s must be >= 0 and shorter than time_min, got {self.signal_delay_s}")


def stage_config_class(module: str) -> type | None:
    """The dataclass a stage's ``main`` parses its command line into: the first argument of the
    ``cli_config(...)`` call in its ``main`` (read from the source; the module is then imported,
    which runs no work). None when its ``main`` does not parse through ``cli_config``, or when
    the module is not importable here (it may be in the job's environment only)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name == "main":
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "cli_config"
                        and node.args and isinstance(node.args[0], ast.Name)):
                    cls = getattr(importlib.import_module(module), node.args[0].id, None)
                    return cls if isinstance(cls, type) else None
    return None


def check_stage_config(a: LaunchArgs, stage_argv: list[str]) -> type | None:
    """Parse the first job's stage arguments as the stage will; a problem raises ConfigError
    naming the stage. Returns the config class (None: the stage has no ``cli_config`` to check)."""
    cls = stage_config_class(a.module)
    if cls is None:
        return None
    argv = [x for x in commands(a, stage_argv)[0] if x != "--debug"]
    argv = argv[argv.index(a.module) + 1:] if a.module in argv else argv
    try:
        parse_args(cls, argv)
    except ConfigError as e:
        raise ConfigError(f"{a.module}: {e} (nothing was submitted)") from None
    return cls


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

    def __init__(self, command: list[str], cwd: str, grace_s: float = 80.0):
        self.command = list(command)
        self.cwd = cwd
        self.grace_s = grace_s
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_child"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._child = None

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
        self._child = subprocess.Popen(cmd, cwd=self.cwd, env=env)
        code = self._child.wait()
        if code == EXIT_REQUEUE:
            raise RuntimeError(f"command stopped to be requeued (status {code}) but this job got no time-limit signal; "
                               f"resubmit it to resume: {shlex.join(cmd)}")
        if code != 0:
            raise RuntimeError(f"command exited with status {code}: {shlex.join(cmd)}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on the time-limit signal (``submitit.helpers.Checkpointable``'s
        protocol): pass the signal on to the stage (torchrun's workers under torchrun), wait up to
        ``grace_s`` for it to save and exit, then return this same command for submitit to
        requeue (rerun, the stage resumes). A stage that failed meanwhile is not requeued, except
        under torchrun, which reports its workers' status 75 as a failure of its own."""
        import submitit
        from submitit.core.utils import DelayedSubmission

        child = self._child
        torchrun = os.path.basename(self.command[0]) == "torchrun"
        if child is not None and child.poll() is None:
            sig = submitit.JobEnvironment._usr_sig()
            for pid in (_child_pids(child.pid) if torchrun else [child.pid]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=self.grace_s)
        code = None if child is None else child.poll()
        if code not in (None, 0, EXIT_REQUEUE) and not torchrun:
            print(f"not requeued: the command exited with status {code}", file=sys.stderr, flush=True)
            return None
        return DelayedSubmission(self, *args, **kwargs)


def _child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc); [pid] itself when they cannot be read."""
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()] or [pid]
    except OSError:
        return [pid]


def _executor(a: LaunchArgs, folder: Path) -> Any:
    if a.cluster == "slurm" and shutil.which("sbatch") is None:
        raise ExpectedError("cluster=slurm but slurm's sbatch is not on PATH (no slurm here?); "
                            "use cluster=local to run the jobs as local processes, or mode=run")
    try:
        import submitit
    except ImportError as e:  # pragma: no cover - submitit is in requirements
        raise ExpectedError("launch mode needs submitit: pip install submitit") from e
    ex = submitit.AutoExecutor(folder=str(folder), cluster=a.cluster)
    ex.update_parameters(**_executor_params(a))
    return ex


def _executor_params(a: LaunchArgs) -> dict[str, Any]:
    """submitit.AutoExecutor parameters (generic names, slurm ones prefixed ``slurm_``)."""
    params: dict[str, Any] = dict(
        name=a.job_name,
        nodes=a.nodes,
        tasks_per_node=1,
        cpus_per_task=a.cpus_per_task,
        mem_gb=a.mem_gb,
        timeout_min=a.time_min,
        slurm_array_parallelism=a.max_array_parallel,
    )
    if a.cluster == "slurm":  # (submitit's local executor signals 30 s before its limit)
        params["slurm_signal_delay_s"] = a.signal_delay_s
    if a.gpus:
        params["gpus_per_node"] = a.gpus
    for key, value in (("slurm_partition", a.partition), ("slurm_account", a.account), ("slurm_qos", a.qos)):
        if value:
            params[key] = value
    if a.extra_slurm:
        params["slurm_additional_parameters"] = dict(a.extra_slurm)
    if a.setup:
        params["slurm_setup"] = list(a.setup)
    return params


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
    grace = max(1.0, (a.signal_delay_s if a.cluster == "slurm" else 30) - 10.0)
    fns = [JobCommand(cmd, cwd=os.getcwd(), grace_s=grace) for cmd in cmds]
    with _SUBMIT_LOCK, _submission_env():
        ex = _executor(a, job_folder(a))
        with ex.batch():
            jobs = [ex.submit(fn) for fn in fns]
    return jobs


def sbatch_script(a: LaunchArgs, n_jobs: int = 1) -> str:
    """The sbatch script ``launch`` submits for ``n_jobs`` commands (an array when > 1), as
    submitit renders it (the commands themselves travel in its pickles). Needs no slurm."""
    if a.cluster != "slurm":
        raise ConfigError("script=true renders the sbatch script of cluster=slurm; cluster=local submits none")
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    class RenderingExecutor(SlurmExecutor):  # the real one refuses to exist without srun
        @classmethod
        def affinity(cls) -> int:
            return 1

    ex = RenderingExecutor(folder=str(job_folder(a)))
    ex.update_parameters(**ex._convert_parameters({k.removeprefix("slurm_"): v for k, v in _executor_params(a).items()}))
    params = dict(ex.parameters)
    if n_jobs > 1:
        params["map_count"] = n_jobs
    return _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder, **params)


def run(a: LaunchArgs, stage_argv: list[str]) -> int:
    cmds = commands(a, stage_argv)
    if a.mode == "cat":
        for cmd in cmds:
            print(shlex.join(cmd))
        if a.script:
            print(f"# sbatch script (submitit runs the command(s) above from its pickles in {job_folder(a)}):")
            print(sbatch_script(a, len(cmds)), end="")
        return 0
    if a.mode == "launch" and a.check_config:
        check_stage_config(a, stage_argv)
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
