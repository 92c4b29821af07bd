"""Where the EM driver's heavy stages run: on this machine (``executor: local``, the default: the
laptop path) or as slurm jobs (``executor: slurm``: the cluster path).

The local executor (:mod:`apps.bolt.em_local`, re-exported here) uses the whole machine:
``local.jobs`` heavy processes at once (default 0: one per CPU core this process may use, 1 when
the models run on a GPU). With ``jobs`` 1 (the old behaviour) training, evaluation and the teacher
run in the driver's process, one stage after another. With ``jobs`` > 1 training and evaluation
run as subprocesses (``python -m apps.bolt.train config=DUMP/configs/train_<name>.yaml``, ``python
-m apps.bolt.em_eval config=DUMP/configs/eval_<name>.yaml``, ``OMP_NUM_THREADS`` =
``local.threads_per_proc``, output appended to ``DUMP/logs/<stage>.log``; a failure raises an error
naming that log and quoting its last lines), the driver runs independent trials and branches in
threads (:class:`Branches`), and every heavy process (training, evaluation, each E-step shard
process) takes a slot of one semaphore of size ``jobs``, so no more than ``jobs`` run at once
(their start and end times: ``DUMP/logs/processes.jsonl``). The E-step runs as
``local.estep_procs`` shard processes (default 0: one per CPU core when the E-step is on the CPU;
1: in the driver's process, as before): it writes the shard config to
``DUMP/configs/estep_<name>.yaml``, starts ``python -m apps.bolt.estep config=... shard=i
num_shards=N cache=OUT/cache/samples.shard-XXXXX.db``, appends each one's output to
``DUMP/logs/estep_<name>.shard-i.log``, and merges the shards here exactly as after a slurm array.
The shard count N is recorded in ``OUT/work/local_shards.json`` before the first shard starts: a
rerun (after a crash or a failed shard) runs only the shards still missing, and keeps that N even
if the core count changed (so two splits never mix; delete ``OUT/work`` to re-split). A failed
shard raises, once every running shard has ended, an error naming the shard and its log.

Both executors take the same fully resolved stage configs and return nothing: the driver reads
every result from disk afterwards (a training run's final checkpoint, an E-step's merged
dataset, an evaluation's ``result.json``), so the two paths cannot drift apart.

The slurm executor writes each stage's config to ``DUMP/configs/<stage>.yaml`` and submits
``python -m apps.bolt.<stage> config=...`` through :mod:`lingua.launch`: training under torchrun
on ``gpus_per_node`` GPUs; the E-step as an array of ``shards`` one-GPU jobs (``shard=i
num_shards=N``) and then ``action=merge`` here; evaluation as a one-GPU job
(:mod:`apps.bolt.em_eval`); the teacher here (it mostly waits on the OpenAI Batch API) or as CPU
jobs. It blocks until the jobs finish and raises, naming their log files, when one failed.

Job ids are recorded in ``DUMP/jobs/<stage>.json`` before waiting. A rerun of the driver (after
it was killed, or after a failed job was fixed) first re-attaches to recorded jobs that are
still pending or running and waits for them; only then does it submit what the outputs on disk
still lack (the missing E-step shards, an unfinished training run, which resumes from its last
checkpoint), never a second copy of a live job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lingua.args import dump_config
from lingua.io import atomic_write_json, is_done

logger = logging.getLogger("apps.bolt.em")

EXECUTORS = ("local", "slurm")
TRAIN_KINDS = ("warmstart", "train")


@dataclass
class Resources:
    """One job's allocation. Training runs ``gpus_per_node`` processes per node (torchrun)."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 24 * 60

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1 or self.mem_gb < 1 or self.time_min < 1:
            raise ValueError(f"bad job resources {self}: nodes, cpus_per_task, mem_gb, time_min >= 1, gpus_per_node >= 0")


def _gpu_job(gpus: int, cpus: int, mem_gb: int, time_min: int) -> Callable[[], Resources]:
    return lambda: Resources(1, gpus, cpus, mem_gb, time_min)


@dataclass
class EStepJobs:
    shards: int = 200
    """Array size: the bootstrap corpus is cut into this many contiguous slices (the reference: 200)."""
    gpus_per_shard: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    time_min: int = 12 * 60
    cache_per_shard: bool = True
    """One sample cache per shard (``OUT/cache/samples.shard-XXXXX.db``) instead of one shared
    SQLite file, which is not safe across nodes on network file systems. Ignored when the E-step
    config sets ``cache``."""

    def validate(self) -> None:
        if self.shards < 1 or self.gpus_per_shard < 0:
            raise ValueError("estep.shards >= 1 and estep.gpus_per_shard >= 0 are required")


@dataclass
class TeacherJobs:
    where: str = "driver"
    """``driver``: in the driver's process (it mostly waits on the Batch API and needs the network,
    which compute nodes may lack); ``job``: as an array of CPU jobs, then the merge here."""
    shards: int = 1
    cpus_per_task: int = 4
    mem_gb: int = 16
    time_min: int = 48 * 60

    def validate(self) -> None:
        if self.where not in ("driver", "job") or self.shards < 1:
            raise ValueError(f"teacher.where must be driver or job and teacher.shards >= 1, got {self.where!r}, {self.shards}")


@dataclass
class SlurmArgs:
    """Cluster resources per stage kind (defaults: the original BoLT code's slurm settings)."""

    cluster: str = "slurm"
    """submitit executor; ``local`` runs the same jobs as local processes (tests, dry runs)."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    extra_slurm: dict[str, str] = field(default_factory=dict)
    """More sbatch options, e.g. ``{constraint: h100, exclude: node12}``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run first in every job (``module load cuda``, ``source .venv/bin/activate``)."""
    log_dir: str = ""
    """submitit folders (scripts, logs, pickles), one per stage; empty: ``DUMP/slurm``."""
    poll_s: float = 60.0
    max_array_parallel: int = 256
    warmstart: Resources = field(default_factory=_gpu_job(4, 64, 256, 24 * 60))
    """The warmstart run (the reference: 4 GPUs, global batch 96 x 2048)."""
    train: Resources = field(default_factory=_gpu_job(8, 128, 512, 48 * 60))
    """M-step runs and raw baselines (the reference: 8 GPUs, global batch 192 x 2048)."""
    estep: EStepJobs = field(default_factory=EStepJobs)
    eval: Resources = field(default_factory=_gpu_job(1, 16, 64, 6 * 60))
    finetune: Resources = field(default_factory=_gpu_job(4, 64, 256, 12 * 60))
    """Finetuning evaluation of one model (``finetune_eval``; the reference: one node)."""
    teacher: TeacherJobs = field(default_factory=TeacherJobs)

    def validate(self) -> None:
        from lingua.launch import CLUSTERS

        if self.cluster not in CLUSTERS:
            raise ValueError(f"slurm.cluster must be one of {CLUSTERS}, got {self.cluster!r}")
        if self.poll_s <= 0:
            raise ValueError(f"slurm.poll_s must be > 0, got {self.poll_s}")


# ----------------------------------------------------------------------------- local executor
# In apps/bolt/em_local.py; re-exported here (the driver and older imports use this module).
from apps.bolt.em_local import (  # noqa: E402, F401
    LOCAL_SHARDS_RECORD, PROCESSES_RECORD, LocalArgs, LocalStages, _safe, _tail, cpu_cores, estep_shard_done,
    local_shard_count, on_gpu, run_processes,
)


class Branches:
    """Works started now, their results collected later by :meth:`wait`. With ``parallel``, each
    runs in a daemon thread from its start (threads that mostly wait on their processes or jobs;
    a killed driver leaves slurm jobs running, and its rerun re-attaches); without, they are
    queued and run one after another, in start order, by :meth:`wait`, so a sequential driver
    keeps its order. :meth:`wait` returns the results in start order; it raises the first failure
    (the caller's own ``error`` first) only once every started branch has ended, so the others'
    finished stages are recorded."""

    def __init__(self, parallel: bool):
        self.parallel = parallel
        self._works: list[Callable[[], Any]] = []
        self._results: list[Any] = []
        self._errors: list[BaseException | None] = []
        self._threads: list[threading.Thread] = []

    def start(self, work: Callable[[], Any]) -> int:
        i = len(self._works)
        self._works.append(work)
        self._results.append(None)
        self._errors.append(None)
        if self.parallel:
            self._threads.append(threading.Thread(target=self._run, args=(i,), daemon=True, name=f"em-branch-{i}"))
            self._threads[-1].start()
        return i

    def _run(self, i: int) -> None:
        try:
            self._results[i] = self._works[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised by wait() in the caller's thread
            self._errors[i] = e

    def wait(self, error: BaseException | None = None) -> list[Any]:
        if not self.parallel and error is None:
            for i in range(len(self._works)):
                self._run(i)
                if self._errors[i] is not None:
                    break  # one after another: nothing after a failure
        for th in self._threads:
            while th.is_alive():
                th.join(1.0)
        failed = [e for e in (error, *self._errors) if e is not None]
        for e in failed[1:]:
            logger.error("[em] also failed: %s", e)
        if failed:
            raise failed[0]
        return list(self._results)


# ----------------------------------------------------------------------------- slurm executor
class SlurmStages:
    """Every heavy stage as slurm jobs (see the module docstring).

    ``jobs`` is the job backend: anything with ``submit_jobs``, ``attach_jobs``, ``job_alive`` and
    ``wait_jobs`` as in :mod:`lingua.launch` (the default; tests pass a recording fake)."""

    parallel = True
    """The driver runs independent trials and branches concurrently (threads waiting on jobs)."""

    def __init__(self, root: Path, args: SlurmArgs, jobs: Any = None):
        import lingua.launch

        self.root = Path(root)
        self.args = args
        self.jobs = jobs if jobs is not None else lingua.launch
        self.log_dir = Path(args.log_dir) if args.log_dir else self.root / "slurm"

    # -- the stages ---------------------------------------------------------------------------
    def train(self, name: str, cfg: Any, kind: str) -> None:
        res: Resources = getattr(self.args, kind)
        path = self._dump(cfg, f"train_{name}")
        a = self._launch("apps.bolt.train", f"train_{name}", res.nodes, res.gpus_per_node, res.cpus_per_task,
                         res.mem_gb, res.time_min, nproc=max(1, res.gpus_per_node))
        self._run(f"train:{name}", a, [f"config={path}"], lambda: [] if training_status(cfg.dump_dir) else [None])

    def estep(self, name: str, cfg: Any) -> None:
        from apps.bolt import estep

        e = self.args.estep
        shard_cfg = dataclasses.replace(cfg, action="shard", shard=0, num_shards=e.shards)
        path = self._dump(shard_cfg, f"estep_{name}")
        shard_args = []
        if e.cache_per_shard and cfg.cache is None:
            shard_args = [f"cache={Path(cfg.out) / 'cache'}/samples.shard-{{shard:05d}}.db"]
        a = self._launch("apps.bolt.estep", f"estep_{name}", 1, e.gpus_per_shard, e.cpus_per_task, e.mem_gb,
                         e.time_min, shards=e.shards, shard_args=shard_args)

        def missing() -> list[int]:
            return [i for i in range(e.shards) if not estep_shard_done(cfg.out, i, e.shards)]

        if cfg.backend == "vllm" and missing():  # export here once, rather than in a shard while the others wait
            from lingua.vllm_backend import export_for_vllm

            logger.info("[em] estep:%s: exporting %s for vLLM (%s)", name, cfg.ckpt, cfg.dtype)
            export_for_vllm(cfg.ckpt, cfg.dtype)
        self._run(f"estep:{name}", a, [f"config={path}"], missing)
        logger.info("[em] estep:%s: merging %d shards here", name, e.shards)
        estep.run(dataclasses.replace(shard_cfg, action="merge"))

    def evaluate(self, name: str, cfg: Any) -> None:
        r = self.args.eval
        path = self._dump(cfg, f"eval_{name}")
        a = self._launch("apps.bolt.em_eval", f"eval_{name}", r.nodes, r.gpus_per_node, r.cpus_per_task, r.mem_gb, r.time_min)
        self._run(f"eval:{name}", a, [f"config={path}"], lambda: [] if is_done(cfg.out) else [None])

    def finetune(self, name: str, cfg: Any) -> None:
        r = self.args.finetune
        path = self._dump(cfg, f"finetune_{name}")
        a = self._launch("apps.bolt.finetune", f"finetune_{name}", r.nodes, r.gpus_per_node, r.cpus_per_task, r.mem_gb,
                         r.time_min, nproc=max(1, r.gpus_per_node))
        self._run(f"finetune:{name}", a, [f"config={path}"], lambda: [] if is_done(cfg.out) else [None])

    def teacher(self, cfg: Any) -> None:
        from apps.bolt import gen_latents

        t = self.args.teacher
        if t.where == "driver":
            gen_latents.run(cfg)
            return
        shard_cfg = dataclasses.replace(cfg, shard=None, num_shards=t.shards, merge=False, progress=False)
        path = self._dump(shard_cfg, "teacher")
        job = gen_latents.make_job(shard_cfg)
        a = self._launch("apps.bolt.gen_latents", "teacher", 1, 0, t.cpus_per_task, t.mem_gb, t.time_min, shards=t.shards)
        self._run("teacher", a, [f"config={path}"], lambda: [i for i in range(t.shards) if not is_done(job.shard_dir(i))])
        gen_latents.run(dataclasses.replace(shard_cfg, merge=True))

    # -- machinery ----------------------------------------------------------------------------
    def _dump(self, cfg: Any, stem: str) -> Path:
        path = self.root / "configs" / f"{stem}.yaml"
        dump_config(cfg, path)
        return path

    def _launch(self, module: str, job_name: str, nodes: int, gpus: int, cpus: int, mem_gb: int, time_min: int,
                nproc: int = 1, shards: int = 0, shard_args: Sequence[str] = ()) -> Any:
        from lingua.launch import LaunchArgs

        s = self.args
        return LaunchArgs(
            mode="launch", module=module, nproc=nproc, nodes=nodes, shards=shards, shard_args=list(shard_args),
            job_name=_safe(job_name), log_dir=str(self.log_dir), cluster=s.cluster, partition=s.partition,
            account=s.account, qos=s.qos, gpus=gpus, cpus_per_task=cpus, mem_gb=mem_gb, time_min=time_min,
            max_array_parallel=s.max_array_parallel, extra_slurm=dict(s.extra_slurm), setup=list(s.setup),
            poll_s=s.poll_s,
        )

    def _record_path(self, stage: str) -> Path:
        return self.root / "jobs" / f"{_safe(stage)}.json"

    def _run(self, stage: str, a: Any, argv: list[str], todo: Callable[[], list]) -> None:
        """Re-attach to live jobs of ``stage``, then submit what ``todo()`` (read from disk) still
        lists: shard indices, or ``[None]`` for a single job; wait; check the outputs."""
        from lingua.launch import commands

        record_path = self._record_path(stage)
        record = json.loads(record_path.read_text()) if record_path.is_file() else {"stage": stage, "submissions": []}
        live = [j for s in record["submissions"] for j in self.jobs.attach_jobs(s["cluster"], s["folder"], s["job_ids"])
                if self.jobs.job_alive(j)]
        if live:
            logger.info("[em] %s: re-attaching to %d running job(s): %s", stage, len(live), _ids(live))
            self._wait(stage, live)
        pending = todo()
        if not pending:
            return
        shard_ids = None if pending == [None] else pending
        cmds = commands(a, argv, shard_ids)
        jobs = self.jobs.submit_jobs(a, cmds)
        record["submissions"].append({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cluster": a.cluster, "folder": str(Path(a.log_dir) / a.job_name),
            "job_ids": [str(j.job_id) for j in jobs], "shards": shard_ids, "commands": cmds,
        })
        atomic_write_json(record_path, record)  # before waiting: a killed driver re-attaches from it
        logger.info("[em] %s: submitted %d job(s) %s; logs in %s", stage, len(jobs), _ids(jobs), Path(a.log_dir) / a.job_name)
        self._wait(stage, jobs)
        left = todo()
        if left:
            what = "the output is incomplete" if left == [None] else f"shards {left} have no output"
            raise RuntimeError(f"{stage}: its jobs succeeded but {what}; see the logs in {Path(a.log_dir) / a.job_name}")

    def _wait(self, stage: str, jobs: list) -> None:
        from lingua.jobs import JobsFailed

        failures = self.jobs.wait_jobs(jobs, self.args.poll_s, log=lambda m: logger.info("[em] %s: %s", stage, m))
        if failures:
            raise JobsFailed(f"{stage} (once fixed, rerun the driver: finished work is kept and only what is "
                             "missing is resubmitted)", failures)


def build_stages(executor: str, root: Path, slurm: SlurmArgs, jobs: Any = None,
                 local: LocalArgs | None = None, device: str = "cpu") -> LocalStages | SlurmStages:
    """``device``: the EM run's (the local executor's default ``jobs`` is 1 on a GPU)."""
    return LocalStages(root, local, device) if executor == "local" else SlurmStages(root, slurm, jobs)


# ----------------------------------------------------------------------------- outputs on disk
def training_status(run_dir: str | Path) -> dict | None:
    """A finished training run, read from its folder: the newest complete checkpoint, if it is at
    the run's last step (None otherwise: not started, or stopped early and resumable)."""
    from lingua.checkpoint import latest_checkpoint

    step_dir = latest_checkpoint(Path(run_dir) / "checkpoints")
    if step_dir is None:
        return None
    state = json.loads((step_dir / "train_state.json").read_text())
    total = state["scheduler"]["total_steps"]
    if state["step"] < total:
        return None
    return {"step": state["step"], "total_steps": total, "checkpoint": str(step_dir), "tokens_seen": state.get("tokens_seen")}


def final_consolidated(run_dir: str | Path) -> tuple[Path, dict]:
    """The consolidated folder of a finished run (written here when the run did not) and its status."""
    from lingua.checkpoint import consolidate

    status = training_status(run_dir)
    if status is None:
        raise RuntimeError(f"training run {run_dir} has not finished (no complete checkpoint at its last step); "
                           "rerun to resume it from its last checkpoint")
    folder = Path(status["checkpoint"]) / "consolidated"
    if not is_done(folder):
        logger.info("[em] consolidating %s", status["checkpoint"])
        folder = consolidate(status["checkpoint"])
    return folder, {**status, "consolidated": str(folder)}


def run_name_of(consolidated: str | Path) -> str:
    """The training run a consolidated model came from (``RUN/checkpoints/STEP/consolidated``,
    the layout :func:`final_consolidated` reads): its folder name, else the path as given."""
    path = Path(consolidated)
    if len(path.parents) > 2 and path.parent.parent.name == "checkpoints":
        return path.parents[2].name
    return str(path)


def _ids(jobs: Sequence[Any]) -> str:
    ids = [str(j.job_id) for j in jobs]
    return ", ".join(ids[:5]) + (f" ... ({len(ids)})" if len(ids) > 5 else "")
