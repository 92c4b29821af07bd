"""One launcher for every stage: print the command (``cat``), run it here (``run``), or submit it
to slurm through submitit (``launch``), optionally as an array of shards.

    python -m lingua.launch mode=cat  module=apps.bolt.train nproc=2 -- config=cfg.yaml steps=10
    python -m lingua.launch mode=run  module=apps.bolt.estep shards=4 -- config=estep.yaml
    python -m lingua.launch mode=launch module=apps.bolt.estep shards=200 gpus=1 -- config=...

With ``shards=N`` the stage gets ``shard=i num_shards=N`` appended for i in 0..N-1 (run mode
runs them one after another, or ``parallel`` at a time; slurm mode submits a job array). With
``nproc>1`` the stage runs under ``torchrun --standalone --nproc_per_node``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lingua.args import ConfigError, load_config

MODES = ("cat", "run", "launch")


@dataclass
class LaunchArgs:
    mode: str = "cat"  # cat | run | launch
    module: str = ""  # e.g. apps.bolt.train
    nproc: int = 1  # processes per node (torchrun when > 1)
    nodes: int = 1
    shards: int = 0  # 0: one job; N: N jobs with shard=i num_shards=N
    parallel: int = 1  # run mode: shards running at once
    job_name: str = "bolt"
    log_dir: str = "runs/launch_logs"
    # slurm resources (launch mode)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus: int = 0  # per node
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 24 * 60
    max_array_parallel: int = 256
    extra_slurm: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.module:
            raise ValueError("module is required, e.g. module=apps.bolt.train")
        if self.shards < 0 or self.nproc < 1 or self.parallel < 1:
            raise ValueError("shards >= 0, nproc >= 1 and parallel >= 1 are required")


def stage_command(a: LaunchArgs, stage_argv: list[str], shard: int | None = None) -> list[str]:
    """The exact command one job runs."""
    argv = list(stage_argv)
    if shard is not None:
        argv += [f"shard={shard}", f"num_shards={a.shards}"]
    if a.nproc > 1 or a.nodes > 1:
        head = ["torchrun", f"--nproc_per_node={a.nproc}"]
        head += ["--standalone"] if a.nodes == 1 else [f"--nnodes={a.nodes}", "--rdzv_backend=c10d"]
        return head + ["-m", a.module] + argv
    return [sys.executable, "-m", a.module] + argv


def commands(a: LaunchArgs, stage_argv: list[str]) -> list[list[str]]:
    shards = [None] if a.shards == 0 else list(range(a.shards))
    return [stage_command(a, stage_argv, s) for s in shards]


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


def _submit_slurm(a: LaunchArgs, cmds: list[list[str]]) -> list[str]:
    try:
        import submitit
    except ImportError as e:  # pragma: no cover - submitit is in requirements
        raise SystemExit("launch mode needs submitit: pip install submitit") from e
    folder = Path(a.log_dir) / a.job_name
    ex = submitit.AutoExecutor(folder=str(folder))
    params = dict(
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
    ex.update_parameters(**params)
    fns = [submitit.helpers.CommandFunction(cmd, cwd=os.getcwd()) for cmd in cmds]
    with ex.batch():
        jobs = [ex.submit(fn) for fn in fns]
    return [j.job_id for j in jobs]


def run(a: LaunchArgs, stage_argv: list[str]) -> int:
    cmds = commands(a, stage_argv)
    if a.mode == "cat":
        for cmd in cmds:
            print(shlex.join(cmd))
        return 0
    if a.mode == "run":
        return _run_local(cmds, a.parallel)
    ids = _submit_slurm(a, cmds)
    print(f"submitted {len(ids)} job(s): {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, stage_argv = argv[:cut], argv[cut + 1 :]
    else:
        own, stage_argv = argv, []
    try:
        a = load_config(LaunchArgs, None, own)
    except ConfigError as e:
        raise SystemExit(f"lingua.launch: {e}") from None
    raise SystemExit(run(a, stage_argv))


if __name__ == "__main__":
    main()
