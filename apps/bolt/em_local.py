"""The EM driver's local executor (``executor: local``): every heavy stage on this machine.

``local.jobs`` (default 0: one per CPU core this process may use, or 1 when the models run on a
GPU) is how many heavy processes run at once. With ``jobs`` 1, training, evaluation and the
teacher run in the driver's process, one stage after another (the old path). With ``jobs`` > 1,
training and evaluation run as subprocesses (``python -m apps.bolt.train config=DUMP/configs/
train_<name>.yaml``, ``python -m apps.bolt.em_eval config=DUMP/configs/eval_<name>.yaml``, each
with ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = ``local.threads_per_proc`` and its output
appended to ``DUMP/logs/<stage>.log``), the driver runs independent branches in threads
(:class:`apps.bolt.em_exec.Branches`), and every heavy process (a training run, an evaluation,
each E-step shard process, an in-process E-step) first takes a slot of one counting semaphore of
size ``jobs`` owned by :class:`LocalStages`: at most ``jobs`` of them run at once, whatever the
driver runs concurrently. Each one's start and end are appended to ``DUMP/logs/processes.jsonl``.
A failed process raises, once the stage's other processes have ended, an error naming its log
and quoting its last lines.

The E-step runs as ``local.estep_procs`` shard processes (0: one per core when on the CPU, 1 on
a GPU; 1: in the driver's process): the shard config goes to ``DUMP/configs/estep_<name>.yaml``,
each shard runs ``python -m apps.bolt.estep config=... shard=i num_shards=N
cache=OUT/cache/samples.shard-XXXXX.db`` with its output in ``DUMP/logs/estep_<name>.shard-i.log``,
and the shards are merged here exactly as after a slurm array. The shard count N is recorded in
``OUT/work/local_shards.json`` before the first shard starts: a rerun runs only the shards still
missing and keeps that N even if the core count changed (delete ``OUT/work`` to re-split).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from lingua.args import dump_config
from lingua.io import atomic_write_json, is_done

logger = logging.getLogger("apps.bolt.em")

LOCAL_SHARDS_RECORD = "local_shards.json"
"""``OUT/work/<this>``: the shard count a local E-step chose for ``OUT``, kept for its reruns."""
PROCESSES_RECORD = "processes.jsonl"
"""``DUMP/logs/<this>``: one line per heavy subprocess that ended (stage, log, start, end, exit)."""

_LIVE: set[subprocess.Popen] = set()
"""Processes started by :func:`run_processes` still running: terminated when the driver exits
(e.g. interrupted in its main thread while branch threads wait on them)."""


@atexit.register
def _terminate_live() -> None:
    for p in list(_LIVE):
        if p.poll() is None:
            p.terminate()


@dataclass
class LocalArgs:
    """How the local executor runs the heavy stages (``local.*`` in the EM config)."""

    estep_procs: int = 0
    """E-step shards (run at once as local processes): 0 = one per CPU core this process may use
    (``os.sched_getaffinity``) when the E-step runs on the CPU, 1 when it runs on a GPU (processes
    would share it); 1 = in this process (the old path); N > 1 = N processes. Each process loads
    its own copy of the model: with a large model on a small machine, set 1 or 2."""
    threads_per_proc: int = 1
    """``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of each subprocess (one thread per core)."""
    jobs: int = 0
    """Heavy stages at once: 0 = one per CPU core (as for ``estep_procs``: 1 when the models run
    on a GPU); 1 = the old behaviour: training and evaluation in the driver's process, every stage
    one after another (the E-step still runs ``estep_procs`` shard processes at a time); N > 1 =
    training and evaluation as subprocesses, independent trials and branches concurrently, and at
    most N heavy processes (training runs, evaluations, E-step shards) at any moment."""

    def validate(self) -> None:
        if self.estep_procs < 0 or self.threads_per_proc < 1 or self.jobs < 0:
            raise ValueError("local.estep_procs >= 0, local.threads_per_proc >= 1 and local.jobs >= 0 are "
                             f"required, got {self}")


class LocalStages:
    """Every stage on this machine (see the module docstring). ``device``: the EM run's device,
    which decides the defaults of ``jobs`` (one per core on the CPU, else 1)."""

    def __init__(self, root: Path, args: LocalArgs | None = None, device: str = "cpu"):
        self.root = Path(root)
        self.args = args if args is not None else LocalArgs()
        self.jobs = self.args.jobs or (1 if on_gpu(device) else cpu_cores())
        self.slots: Optional[threading.BoundedSemaphore] = threading.BoundedSemaphore(self.jobs) if self.jobs > 1 else None
        """The one semaphore every heavy process takes a slot of (None with ``jobs`` 1)."""
        self._record_lock = threading.Lock()

    @property
    def parallel(self) -> bool:
        """The driver may run independent stages concurrently (``jobs`` > 1)."""
        return self.jobs > 1

    def train(self, name: str, cfg: Any, kind: str) -> None:
        if self.parallel:
            self._subprocess(f"train:{name}", "apps.bolt.train", cfg, f"train_{name}")
            return
        from apps.bolt import train

        train.run(cfg)

    def evaluate(self, name: str, cfg: Any) -> None:
        if self.parallel:
            self._subprocess(f"eval:{name}", "apps.bolt.em_eval", cfg, f"eval_{name}")
            return
        from apps.bolt import em_eval

        em_eval.run(cfg)

    def finetune(self, name: str, cfg: Any) -> None:
        if self.parallel:
            self._subprocess(f"finetune:{name}", "apps.bolt.finetune", cfg, f"finetune_{name}")
            return
        from apps.bolt import finetune

        finetune.run(cfg)

    def teacher(self, cfg: Any) -> None:
        from apps.bolt import gen_latents

        gen_latents.run(cfg)

    def estep(self, name: str, cfg: Any) -> None:
        from apps.bolt import estep

        out = Path(cfg.out)
        if is_done(out):
            logger.info("[em] estep:%s: %s is complete", name, out)
            return
        procs = self._procs(cfg)
        if procs > 1:  # no more shards than documents
            procs = min(procs, max(1, sum(1 for _ in estep.list_docs(cfg.src, cfg.text_key, cfg.limit_docs))))
        num_shards = local_shard_count(out, procs)
        if num_shards == 1:
            with self.slot():  # the driver's process is the heavy one
                estep.run(cfg)
            return
        shard_cfg = dataclasses.replace(cfg, action="shard", shard=0, num_shards=num_shards)
        path = self.root / "configs" / f"estep_{_safe(name)}.yaml"
        dump_config(shard_cfg, path)
        cache = None if cfg.cache is not None else Path(cfg.out) / "cache"
        cmds = {}
        for i in range(num_shards):
            if estep_shard_done(out, i, num_shards):
                continue
            cmd = [sys.executable, "-m", "apps.bolt.estep", f"config={path}", f"shard={i}", f"num_shards={num_shards}"]
            cmds[i] = cmd + ([f"cache={cache}/samples.shard-{i:05d}.db"] if cache is not None else [])
        procs = min(procs, num_shards)
        logs = {i: self.root / "logs" / f"estep_{_safe(name)}.shard-{i}.log" for i in cmds}
        logger.info("[em] estep:%s: %d of %d shards to run, %d at a time%s, %d thread(s) each; logs in %s", name,
                    len(cmds), num_shards, procs, f" (slots shared by {self.jobs} jobs)" if self.slots else "",
                    self.args.threads_per_proc, self.root / "logs")
        if cmds:
            run_processes(f"estep:{name}", cmds, logs, procs, self._env(), slots=self.slots, record=self._record)
        left = [i for i in range(num_shards) if not estep_shard_done(out, i, num_shards)]
        if left:
            raise RuntimeError(f"estep:{name}: shards {left} exited cleanly but have no output; see "
                               + ", ".join(str(logs.get(i, "?")) for i in left))
        logger.info("[em] estep:%s: merging %d shards", name, num_shards)
        estep.run(dataclasses.replace(shard_cfg, action="merge"))

    # -- machinery ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one heavy-process slot (nothing to hold with ``jobs`` 1)."""
        if self.slots is None:
            yield
            return
        self.slots.acquire()
        try:
            yield
        finally:
            self.slots.release()

    def _subprocess(self, stage: str, module: str, cfg: Any, stem: str) -> None:
        """Run ``python -m module config=DUMP/configs/<stem>.yaml`` in a slot, its output appended
        to ``DUMP/logs/<stem>.log``; raises naming that log when it fails."""
        path = self.root / "configs" / f"{_safe(stem)}.yaml"
        dump_config(cfg, path)
        log = self.root / "logs" / f"{_safe(stem)}.log"
        logger.info("[em] %s: a subprocess (%d thread(s)); log %s", stage, self.args.threads_per_proc, log)
        run_processes(stage, {0: [sys.executable, "-m", module, f"config={path}"]}, {0: log}, 1, self._env(),
                      slots=self.slots, record=self._record, what="process")

    def _record(self, rec: dict) -> None:
        path = self.root / "logs" / PROCESSES_RECORD
        with self._record_lock, open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _procs(self, cfg: Any) -> int:
        if self.args.estep_procs > 0:
            return self.args.estep_procs
        return 1 if on_gpu(cfg.device) else cpu_cores()  # one GPU: one process

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        threads = str(self.args.threads_per_proc)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
        repo = str(Path(__file__).resolve().parents[2])  # the folder holding apps/ and lingua/
        env["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [env.get("PYTHONPATH")])])
        return env


def on_gpu(device: str) -> bool:
    """Whether stages with this ``device`` setting run on a GPU (``auto``: when CUDA is there)."""
    if device == "cpu":
        return False
    if device != "auto":
        return True
    import torch

    return torch.cuda.is_available()


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask; all cores where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_shard_count(out: str | Path, wanted: int) -> int:
    """The shard count of a local E-step into ``out``: the one recorded (or found in complete
    shards) by an earlier run, so a rerun with another core count resumes the same shard set
    instead of mixing two; ``wanted`` for a fresh folder. Recorded before any shard starts."""
    work = Path(out) / "work"
    record = work / LOCAL_SHARDS_RECORD
    found = {int(m.group(1)) for p in (work.glob("shard-*-of-*.done.json") if work.is_dir() else [])
             if (m := re.fullmatch(r"shard-\d+-of-(\d+)\.done\.json", p.name))}
    if record.is_file():
        found.add(int(json.loads(record.read_text())["num_shards"]))
    if len(found) > 1:
        raise RuntimeError(f"{work} holds shards of several splits (num_shards {sorted(found)}); delete that "
                           "folder (and the sample caches in its cache/ folder, if unwanted) to start over")
    n = found.pop() if found else max(1, int(wanted))
    if n != wanted:
        logger.info("[em] %s was split into %d shards by an earlier run: resuming that split (%d wanted now; "
                    "delete %s to re-split)", out, n, wanted, work)
    if not record.is_file():
        atomic_write_json(record, {"num_shards": n})
    return n


def run_processes(stage: str, cmds: dict[int, list[str]], logs: dict[int, Path], procs: int,
                  env: dict[str, str], poll_s: float = 0.2, slots: Optional[threading.Semaphore] = None,
                  record: Optional[Callable[[dict], None]] = None, what: str = "shard") -> None:
    """Run ``cmds`` (index: argv), at most ``procs`` at a time and each only once it got a slot of
    ``slots`` (when given; released when it ends), each with its output appended to ``logs[i]``;
    ``record`` gets each ended one's stage, index, log, start, end and exit status. After a failure
    no new one starts; once every started process has ended, a RuntimeError names the failed ones,
    their logs and last lines. Interrupted (Ctrl-C, an error here), it terminates what it started.
    ``what``: ``shard`` (an E-step's shards) or ``process`` (a stage's single process)."""
    queue, running, failed = sorted(cmds), {}, {}

    def ended(i: int, rc: int) -> None:
        p, fh, t0 = running.pop(i)
        _LIVE.discard(p)
        fh.close()
        if slots is not None:
            slots.release()
        if record is not None:
            record({"stage": stage, "index": i, "log": str(logs[i]), "start": t0, "end": time.time(), "exit": rc})

    try:
        while running or (queue and not failed):
            while queue and len(running) < procs and not failed and (slots is None or slots.acquire(blocking=False)):
                i, fh = queue.pop(0), None
                try:
                    logs[i].parent.mkdir(parents=True, exist_ok=True)
                    fh = open(logs[i], "a")
                    fh.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmds[i])}\n")
                    fh.flush()
                    running[i] = (subprocess.Popen(cmds[i], stdout=fh, stderr=subprocess.STDOUT, env=env), fh, time.time())
                    _LIVE.add(running[i][0])
                except BaseException:  # not started: give its slot back
                    if fh is not None:
                        fh.close()
                    if slots is not None:
                        slots.release()
                    raise
            time.sleep(poll_s)
            for i, (p, fh, t0) in list(running.items()):
                if p.poll() is None:
                    continue
                ended(i, p.returncode)
                label = f"shard {i}" if what == "shard" else "process"
                if p.returncode != 0:
                    failed[i] = p.returncode
                    logger.error("[em] %s: %s failed (exit status %d); log: %s", stage, label, p.returncode, logs[i])
                else:
                    logger.info("[em] %s: %s done in %.1fs (%d of %d left)", stage, label, time.time() - t0,
                                len(queue) + len(running), len(cmds))
    finally:
        for p, _, _ in running.values():  # only on an exception: the loop above empties it
            p.terminate()
        for i, (p, _, _) in list(running.items()):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            ended(i, p.returncode)
    if failed and what != "shard":
        (i, rc), = failed.items()
        raise RuntimeError(f"{stage}: its process failed (exit status {rc}); log {logs[i]} (once fixed, rerun the "
                           f"driver: finished stages are kept). Its last lines:\n{_tail(logs[i], 12)}")
    if failed:
        lines = [f"shard {i} (exit status {rc}): log {logs[i]}\n{_tail(logs[i])}" for i, rc in sorted(failed.items())]
        skipped = f"; not started: shards {queue}" if queue else ""
        raise RuntimeError(f"{stage}: {len(failed)} of {len(cmds)} shard process(es) failed{skipped} (once fixed, "
                           "rerun: complete shards are kept)\n" + "\n".join(lines))


def _tail(path: Path, n: int = 5) -> str:
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines() if path.is_file() else []
    return "\n".join("    " + ln for ln in [x for x in lines if x.strip()][-n:])


def estep_shard_done(out: str | Path, shard: int, num_shards: int) -> bool:
    from apps.bolt.estep import shard_paths

    data, done = shard_paths(Path(out), shard, num_shards)
    return done.is_file() and data.is_file()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
