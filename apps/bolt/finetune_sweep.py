"""A finetuning sweep: every upstream trial (a checkpoint) x every downstream seed, as one command.

    python -m apps.bolt.finetune_sweep config=apps/bolt/configs/finetune_sweep_synthetic.yaml \
        out=OUT "trials={t0: RUN0, t1: RUN1, t2: RUN2}"
    bin/finetune_sweep.sh run -- config=... out=... executor=slurm slurm.partition=gpu

The reference finetuned each of 3 upstream trials with 5 downstream seeds (42-46) and reported
the mean. Each run is :func:`apps.bolt.finetune.run` with the stage config ``finetune.config``
(+ ``finetune.overrides``) and ``ckpt``, ``seed``, ``out=OUT/runs/<trial>_seed<seed>`` set, so each has its
own ``result.json`` and ``COMPLETE``. ``executor: local`` runs them here one after another;
``slurm`` submits one job per run (``slurm.*`` resources; the reference: 1 GPU, 90 minutes),
records the job ids in ``OUT/jobs.json`` and waits; ``slurm.cluster: local`` runs the same jobs as
local processes. A rerun skips complete runs and re-attaches to jobs still queued or running.

Then ``OUT/results.csv``: one ``run`` row per run (its accuracy and binomial SE, pass@k, maj@k),
one ``trial`` row per upstream trial (mean over its seeds) and one ``all`` row (mean over every
run); aggregate rows give ``<metric>_se`` = std(ddof=1) / sqrt(runs). ``OUT/summary.json`` holds
the same, ``OUT/COMPLETE`` is written last.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from apps.bolt.evaluation.results import mean_se
from apps.bolt.finetune import RESULT, FinetuneArgs
from lingua.args import cli_config, dc_replace, dump_config, load_config
from lingua.errors import entry_point
from lingua.io import atomic_write_json, atomic_write_text, is_done, mark_done

logger = logging.getLogger("apps.bolt.finetune")

EXECUTORS = ("local", "slurm")
CSV_FILE = "results.csv"


@dataclass
class SweepSlurmArgs:
    """Resources of one finetuning job (defaults: the reference's, 1 GPU for 90 minutes)."""

    cluster: str = "slurm"
    """submitit executor; ``local`` runs the jobs as local processes."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus: int = 1
    cpus_per_task: int = 16
    mem_gb: int = 64
    time_min: int = 90
    extra_slurm: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    log_dir: str = ""
    """submitit folder; empty: ``OUT/slurm``."""
    poll_s: float = 60.0


@dataclass
class FinetuneStage:
    """The finetuning stage's YAML and overrides; the sweep sets ``ckpt``, ``seed`` and ``out``."""

    config: str = "apps/bolt/configs/finetune_synthetic.yaml"
    """Empty: the stage's defaults."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the stage config."""


@dataclass
class SweepArgs:
    out: str = ""
    trials: dict[str, str] = field(default_factory=dict)
    """Upstream trial name -> checkpoint (as ``apps.bolt.finetune``'s ``ckpt``)."""
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44, 45, 46])
    """Downstream seeds (the reference's)."""
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    executor: str = "local"
    slurm: SweepSlurmArgs = field(default_factory=SweepSlurmArgs)

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list without repeats, got {self.seeds}")
        bad = [n for n in self.trials if not n or "/" in n or n != n.strip()]
        if bad:
            raise ValueError(f"trial names must be non-empty, without '/' or surrounding spaces: {bad}")


def run_configs(cfg: SweepArgs) -> dict[str, FinetuneArgs]:
    """Every run's finetuning config, by run name ``<trial>_seed<seed>`` (trial-major order)."""
    base = load_config(FinetuneArgs, cfg.finetune.config or None, cfg.finetune.overrides)
    root = Path(cfg.out) / "runs"
    return {f"{t}_seed{s}": dc_replace(base, ckpt=ckpt, seed=s, out=str(root / f"{t}_seed{s}"))
            for t, ckpt in cfg.trials.items() for s in cfg.seeds}


def _run_local(configs: dict[str, FinetuneArgs]) -> list[str]:
    from apps.bolt.finetune import run

    failed = []
    for name, rc in configs.items():
        logger.info("[sweep] %s: finetuning %s (seed %d)", name, rc.ckpt, rc.seed)
        try:
            run(rc)
        except Exception as e:  # noqa: BLE001 - the other runs go on; the sweep fails at the end
            logger.error("[sweep] %s failed: %s", name, e)
            failed.append(f"{name}: {e}")
    return failed


def _run_slurm(cfg: SweepArgs, configs: dict[str, FinetuneArgs]) -> list[str]:
    from lingua.jobs import attach_jobs, job_alive, wait_jobs
    from lingua.launch import LaunchArgs, stage_command, submit_jobs

    out, s = Path(cfg.out), cfg.slurm
    la = LaunchArgs(mode="launch", module="apps.bolt.finetune", job_name="finetune", log_dir=s.log_dir or str(out / "slurm"),
                    cluster=s.cluster, partition=s.partition, account=s.account, qos=s.qos, gpus=s.gpus,
                    cpus_per_task=s.cpus_per_task, mem_gb=s.mem_gb, time_min=s.time_min, extra_slurm=dict(s.extra_slurm),
                    setup=list(s.setup), poll_s=s.poll_s)
    folder = Path(la.log_dir) / la.job_name
    ids_file = out / "jobs.json"
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    jobs = {}
    for name, job in zip(ids, attach_jobs(s.cluster, folder, list(ids.values())) if ids else []):
        if name in configs and job_alive(job):
            logger.info("[sweep] %s: re-attached to job %s", name, job.job_id)
            jobs[name] = job
    new = [n for n in configs if n not in jobs]
    for name in new:
        dump_config(configs[name], out / "configs" / f"{name}.yaml")
    cmds = [stage_command(la, [f"config={(out / 'configs' / f'{n}.yaml').resolve()}"]) for n in new]
    for name, job in zip(new, submit_jobs(la, cmds) if cmds else []):
        jobs[name] = job
        ids[name] = str(job.job_id)
    atomic_write_json(ids_file, ids)
    logger.info("[sweep] waiting for %d job(s) (logs in %s)", len(jobs), folder)
    names = {str(j.job_id): n for n, j in jobs.items()}
    return [f"{names.get(f.job_id, f.job_id)}: {f.error} (log {f.stderr})" for f in wait_jobs(list(jobs.values()), s.poll_s)]


def _metric_keys(results: list[dict]) -> list[str]:
    keys = {k for r in results for k, v in r["metrics"].items() if isinstance(v, (int, float)) and not k.endswith("_se")}
    head = [k for k in ("accuracy", "n_problems", "samples_per_problem") if k in keys]

    def order(k: str) -> tuple:
        kind, _, n = k.partition("@")
        return (kind, int(n) if n.isdigit() else 0)

    return head + sorted((k for k in keys if "@" in k), key=order)


def aggregate(results: dict[str, dict], trial_of: dict[str, str], seed_of: dict[str, int]) -> list[dict]:
    """The CSV rows: runs, then per trial, then over all runs (see the module docstring)."""
    keys = _metric_keys(list(results.values()))
    rows = []
    for name, r in results.items():
        row = {"row": "run", "trial": trial_of[name], "seed": seed_of[name], "runs": 1}
        row.update({k: r["metrics"].get(k) for k in keys})
        row["accuracy_se"] = r["metrics"].get("accuracy_se")
        rows.append(row)
    groups = {t: [n for n in results if trial_of[n] == t] for t in dict.fromkeys(trial_of[n] for n in results)}
    groups["all"] = list(results)
    for group, names in groups.items():
        overall = group == "all"
        row = {"row": "all" if overall else "trial", "trial": "" if overall else group, "seed": "", "runs": len(names)}
        for k in keys:
            mean, se = mean_se([float(results[n]["metrics"][k]) for n in names])
            row[k], row[f"{k}_se"] = mean, se
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    atomic_write_text(path, buf.getvalue())


def run(cfg: SweepArgs) -> dict[str, Any]:
    """Run (or finish) the sweep and write its CSV; returns ``summary.json``'s content."""
    if not cfg.out or not cfg.trials:
        raise ValueError("out=... and trials={name: ckpt, ...} are required")
    out = Path(cfg.out)
    dump_config(cfg, out / "config.yaml")
    configs = run_configs(cfg)
    todo = {n: c for n, c in configs.items() if not is_done(c.out)}
    logger.info("[sweep] %d run(s), %d to do", len(configs), len(todo))
    failed = (_run_slurm(cfg, todo) if cfg.executor == "slurm" else _run_local(todo)) if todo else []
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(configs)} finetuning run(s) failed (rerun to retry them): "
                           + " | ".join(failed))
    results = {n: json.loads((Path(c.out) / RESULT).read_text()) for n, c in configs.items()}
    trial_of = {f"{t}_seed{s}": t for t in cfg.trials for s in cfg.seeds}
    seed_of = {f"{t}_seed{s}": s for t in cfg.trials for s in cfg.seeds}
    rows = aggregate(results, trial_of, seed_of)
    write_csv(out / CSV_FILE, rows)
    summary = {"runs": {n: str(Path(c.out)) for n, c in configs.items()}, "rows": rows}
    atomic_write_json(out / "summary.json", summary)
    mark_done(out)
    overall = rows[-1]
    print(f"{out / CSV_FILE}: accuracy {overall['accuracy']:.4f}"
          + (f" +- {overall['accuracy_se']:.4f}" if overall.get("accuracy_se") is not None else "")
          + f" over {overall['runs']} run(s)", file=sys.stdout, flush=True)
    return summary


@entry_point("apps.bolt.finetune_sweep")
def main(argv: Sequence[str] | None = None) -> dict:
    return run(cli_config(SweepArgs, argv, "apps.bolt.finetune_sweep"))


if __name__ == "__main__":
    main()
