"""The EM driver's cluster path without a cluster: the slurm executor against a recording fake
cluster (resources, commands, waiting, reading outputs from disk, re-attaching after a driver
crash), end to end through submitit's local executor, and the shipped cluster configs."""

import importlib
import json
from pathlib import Path

import pytest

from apps.bolt import em
from apps.bolt.em_exec import SlurmArgs, SlurmStages
from lingua.args import load_config
from lingua.jobs import JobFailure, JobsFailed
from tests.test_em import TINY

CONFIGS = Path(__file__).parents[1] / "apps" / "bolt" / "configs"

SLURM = [
    "executor=slurm",
    "iterations=1",
    "baselines=[]",
    "slurm.partition=gpu",
    "slurm.account=acct",
    "slurm.qos=high",
    "slurm.poll_s=0.05",
    *[f"slurm.warmstart.{k}={v}" for k, v in dict(gpus_per_node=2, cpus_per_task=3, mem_gb=5, time_min=7).items()],
    *[f"slurm.train.{k}={v}" for k, v in dict(gpus_per_node=4, cpus_per_task=6, mem_gb=9, time_min=11).items()],
    *[f"slurm.estep.{k}={v}" for k, v in dict(shards=2, gpus_per_shard=1, mem_gb=13, time_min=17).items()],
    "slurm.eval.time_min=19",
    "slurm.teacher.where=job",
    "slurm.teacher.shards=2",
]


class SimulatedCrash(Exception):
    pass


class FakeJob:
    def __init__(self, job_id: str, command: list[str]):
        self.job_id, self.command, self.state = job_id, command, "PENDING"


class FakeCluster:
    """Records submissions; a job runs (in this process, through its module's ``main``) when it
    is waited for, as if the cluster had run it meanwhile. ``crash_waiting_for`` makes the first
    wait on that job name raise, as a killed driver would, leaving its jobs pending."""

    def __init__(self, crash_waiting_for: str = "", fail_shard: int | None = None):
        self.submissions: list[tuple] = []
        self.jobs: dict[str, FakeJob] = {}
        self.attached: list[str] = []
        self.crash_waiting_for = crash_waiting_for
        self.fail_shard = fail_shard

    def submit_jobs(self, a, cmds):
        jobs = [FakeJob(str(1000 + len(self.jobs) + i), cmd) for i, cmd in enumerate(cmds)]
        self.jobs.update({j.job_id: j for j in jobs})
        self.submissions.append((a, cmds, jobs))
        return jobs

    def attach_jobs(self, cluster, folder, job_ids):
        self.attached += job_ids
        return [self.jobs[i] for i in job_ids]

    def job_alive(self, job):
        return job.state == "PENDING"

    def wait_jobs(self, jobs, poll_s, log=None):
        names = {a.job_name for a, _, js in self.submissions if set(js) & set(jobs)}
        if self.crash_waiting_for in names:
            self.crash_waiting_for = ""
            raise SimulatedCrash("driver killed while waiting")
        failures = []
        for job in jobs:
            if job.state == "PENDING":
                cmd = job.command
                at = cmd.index("-m")
                if self.fail_shard is not None and f"shard={self.fail_shard}" in cmd:
                    self.fail_shard, job.state = None, "FAILED"
                else:
                    importlib.import_module(cmd[at + 1]).main(cmd[at + 2 :])
                    job.state = "COMPLETED"
            if job.state == "FAILED":
                failures.append(JobFailure(job.job_id, "FAILED", f"/logs/{job.job_id}.out", f"/logs/{job.job_id}.err", "boom"))
        return failures

    def by_name(self, prefix: str) -> list[tuple]:
        return [(a, cmds) for a, cmds, _ in self.submissions if a.job_name.startswith(prefix)]


def _cfg(tmp_path, *extra):
    return load_config(em.EMArgs, CONFIGS / "em_synthetic.yaml",
                       [*TINY, *SLURM, f"dump_dir={tmp_path / 'em'}", f"tokenizer_cache={tmp_path / 'tok'}", *extra])


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    """The tiny EM loop on the fake cluster; the driver is killed while waiting for the E-step
    jobs, then rerun."""
    tmp = tmp_path_factory.mktemp("emc")
    cfg = _cfg(tmp)
    fake = FakeCluster(crash_waiting_for="estep_iter1")
    with pytest.raises(SimulatedCrash):
        em.run(cfg, jobs=fake)
    crashed_at = len(fake.submissions)
    result = em.run(cfg, jobs=fake)
    return cfg, fake, crashed_at, result


def test_slurm_path_submits_each_stage_with_its_resources(slurm_run):
    cfg, fake, _, result = slurm_run
    root = Path(cfg.dump_dir)
    names = [a.job_name for a, _, _ in fake.submissions]
    assert names == ["teacher", "train_warmstart_t0", "eval_warmstart_t0", "estep_iter1", "train_iter1_t0", "eval_iter1_t0"]
    for a, _, _ in fake.submissions:
        assert (a.mode, a.cluster, a.partition, a.account, a.qos) == ("launch", "slurm", "gpu", "acct", "high")
        assert a.log_dir == str(root / "slurm")
    (warm, [cmd]), = fake.by_name("train_warmstart")
    assert (warm.nodes, warm.nproc, warm.gpus, warm.cpus_per_task, warm.mem_gb, warm.time_min) == (1, 2, 2, 3, 5, 7)
    assert cmd == ["torchrun", "--nproc_per_node=2", "--standalone", "-m", "apps.bolt.train",
                   f"config={root / 'configs' / 'train_warmstart_t0.yaml'}"]
    (mstep, [cmd]), = fake.by_name("train_iter1")
    assert (mstep.nproc, mstep.gpus, mstep.cpus_per_task, mstep.mem_gb, mstep.time_min) == (4, 4, 6, 9, 11)
    (estep, cmds), = fake.by_name("estep")
    assert (estep.shards, estep.gpus, estep.mem_gb, estep.time_min) == (2, 1, 13, 17)
    cache = root / "data" / "iter1_latents" / "cache"
    assert [c[-3:] for c in cmds] == [["shard=0", "num_shards=2", f"cache={cache}/samples.shard-00000.db"],
                                      ["shard=1", "num_shards=2", f"cache={cache}/samples.shard-00001.db"]]
    assert all(c[:3] == [cmds[0][0], "-m", "apps.bolt.estep"] for c in cmds)  # one GPU each: no torchrun
    (ev, [cmd]), = fake.by_name("eval_iter1")
    assert (ev.gpus, ev.time_min, cmd[-2:]) == (1, 19, ["apps.bolt.em_eval", f"config={root / 'configs' / 'eval_iter1_t0.yaml'}"])
    (teacher, cmds), = fake.by_name("teacher")  # CPU jobs (slurm.teacher.where=job), merged here
    assert (teacher.gpus, teacher.shards, cmds[1][-3:]) == (0, 2, ["config=" + str(root / "configs" / "teacher.yaml"),
                                                                   "shard=1", "num_shards=2"])
    assert json.loads((root / "data" / "warmstart_latents" / "lineage.json").read_text())["num_shards"] == 2


def test_stage_configs_are_dumped_resolved_and_outputs_read_from_disk(slurm_run):
    cfg, fake, _, result = slurm_run
    root = Path(cfg.dump_dir)
    from apps.bolt.estep import EStepArgs
    from apps.bolt.train import BoltTrainArgs

    train = load_config(BoltTrainArgs, root / "configs" / "train_iter1_t0.yaml")
    assert (train.num_tokens, train.data.sources, train.layout.name) == (6144, {"iter1_latents": 1.0}, "random")
    shard = load_config(EStepArgs, root / "configs" / "estep_iter1.yaml")
    assert (shard.action, shard.num_shards, shard.posterior.num_samples) == ("shard", 2, 2)
    # the driver found each model from its run folder and merged the E-step shards itself
    final = json.loads((root / "runs" / "iter1_t0" / "final_consolidated.json").read_text())
    assert final["summary"]["step"] == final["summary"]["total_steps"] == 6144 // (4 * 128)
    assert final["consolidated"].endswith(f"checkpoints/{final['summary']['step']:010d}/consolidated")
    lineage = json.loads((root / "data" / "iter1_latents" / "lineage.json").read_text())
    assert lineage["num_shards"] == 2 and lineage["docs"] == 4
    assert sorted(p.name for p in (root / "data" / "iter1_latents" / "cache").glob("*.db")) == [
        "samples.shard-00000.db", "samples.shard-00001.db"]
    groups = [(ln["group"], ln["iteration"]) for ln in result["summary"]]
    assert groups == [("warmstart", 0), ("bootstrap", 1)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["val_nll_per_token"] > 0 for r in result["rows"])


def test_a_rerun_reattaches_to_running_jobs_instead_of_resubmitting(slurm_run):
    cfg, fake, crashed_at, _ = slurm_run
    root = Path(cfg.dump_dir)
    # killed while waiting on the E-step array; the rerun waited on those two jobs, did not resubmit
    assert [a.job_name for a, _, _ in fake.submissions[:crashed_at]][-1] == "estep_iter1"
    assert len(fake.by_name("estep")) == 1
    estep_ids = [j.job_id for j in fake.submissions[crashed_at - 1][2]]
    assert fake.attached == estep_ids
    record = json.loads((root / "jobs" / "estep_iter1.json").read_text())
    assert [s["job_ids"] for s in record["submissions"]] == [estep_ids]
    assert record["submissions"][0]["shards"] == [0, 1]
    # everything complete: a third run submits nothing (stage markers)
    n = len(fake.submissions)
    em.run(cfg, jobs=fake)
    assert len(fake.submissions) == n


def _shard(cmd: list[str]) -> int:
    return next(int(c.split("=")[1]) for c in cmd if c.startswith("shard="))


def test_failed_jobs_are_reported_and_only_missing_shards_resubmitted(tmp_path):
    from lingua.launch import LaunchArgs

    done: set[int] = set()

    def shard_1_times_out(jobs, poll_s, log=None):
        for j in jobs:
            j.state = "TIMEOUT" if _shard(j.command) == 1 else "COMPLETED"
            done.update([_shard(j.command)] if j.state == "COMPLETED" else [])
        return [JobFailure(j.job_id, j.state, "/l/o", "/l/e", "no result") for j in jobs if j.state == "TIMEOUT"]

    def all_succeed(jobs, poll_s, log=None):
        for j in jobs:
            j.state = "COMPLETED"
            done.add(_shard(j.command))
        return []

    fake = FakeCluster()
    stages = SlurmStages(tmp_path, SlurmArgs(poll_s=0.01), jobs=fake)
    a = LaunchArgs(mode="launch", module="jobmod", shards=3, job_name="x", log_dir=str(tmp_path))
    missing = lambda: [i for i in range(3) if i not in done]  # noqa: E731 - outputs "on disk"
    fake.wait_jobs = shard_1_times_out
    with pytest.raises(JobsFailed, match=r"(?s)estep:x.*1 job\(s\) failed.*TIMEOUT.*logs: /l/e"):
        stages._run("estep:x", a, ["config=c.yaml"], missing)
    assert done == {0, 2}
    fake.wait_jobs = all_succeed
    stages._run("estep:x", a, ["config=c.yaml"], missing)
    assert [_shard(c) for c in fake.submissions[-1][1]] == [1]  # only the missing shard went again
    record = json.loads((tmp_path / "jobs" / "estep_x.json").read_text())
    assert [s["shards"] for s in record["submissions"]] == [[0, 1, 2], [1]]


def test_outputs_missing_after_successful_jobs_is_an_error(tmp_path):
    from lingua.launch import LaunchArgs

    fake = FakeCluster()
    fake.wait_jobs = lambda jobs, poll_s, log=None: []
    stages = SlurmStages(tmp_path, SlurmArgs(), jobs=fake)
    with pytest.raises(RuntimeError, match="succeeded but the output is incomplete"):
        stages._run("eval:m", LaunchArgs(mode="launch", module="m", job_name="e"), [], lambda: [None])


@pytest.mark.slow
def test_end_to_end_through_submitit_local_jobs_matches_the_in_process_run(slurm_run, tmp_path):
    """Every heavy stage a separate process through submitit's local executor (70-100 s on the
    shared 2-core machine: each job starts a fresh interpreter and torch); same numbers as
    running the configs in process (the fake cluster above)."""
    cpu = [f"slurm.{kind}.gpus_per_node=0" for kind in ("warmstart", "train", "eval")]
    cfg = _cfg(tmp_path, "slurm.cluster=local", "slurm.estep.gpus_per_shard=0", "slurm.poll_s=0.2", *cpu)
    result = em.run(cfg)
    root = Path(cfg.dump_dir)
    assert sorted(p.name for p in (root / "jobs").glob("*.json")) == [
        "estep_iter1.json", "eval_iter1_t0.json", "eval_warmstart_t0.json", "teacher.json", "train_iter1_t0.json",
        "train_warmstart_t0.json"]
    log = next((root / "slurm" / "train_iter1_t0").glob("*_log.out")).read_text()
    assert f"-m apps.bolt.train config={root / 'configs' / 'train_iter1_t0.yaml'}" in log
    for got, want in zip(result["rows"], slurm_run[3]["rows"], strict=True):
        numbers = {k for k, v in want.items() if isinstance(v, float)}
        assert {k: v for k, v in got.items() if k not in numbers | {"ckpt"}} == {
            k: v for k, v in want.items() if k not in numbers | {"ckpt"}}
        assert {k: got[k] for k in numbers} == pytest.approx({k: want[k] for k in numbers}, rel=1e-6)
    records = {p.name: p.read_text() for p in (root / "jobs").glob("*.json")}
    em.run(cfg)  # complete: nothing submitted again
    assert {p.name: p.read_text() for p in (root / "jobs").glob("*.json")} == records


# ------------------------------------------------------------------------- the shipped configs
def test_finemath_cluster_config_resolves_to_the_reference_setup(tmp_path):
    from apps.bolt.gen_latents import GenLatentsArgs
    from apps.bolt.prepare import PrepareArgs

    cfg = load_config(em.EMArgs, CONFIGS / "em_finemath.yaml", [f"dump_dir={tmp_path}"])
    assert (cfg.executor, cfg.iterations, cfg.trials, cfg.mstep_init, cfg.device) == ("slurm", 4, 3, "base", "cuda")
    d = em.EMDriver(cfg)
    s = cfg.slurm
    warm = d.train_config("warmstart_t0", "warmstart_latents", "random", cfg.warmstart_tokens, 0, cfg.base_ckpt)
    mstep = d.train_config("iter1_t1", "iter1_latents", "random", cfg.mstep_tokens, 1, cfg.base_ckpt)
    gpus = lambda r: r.nodes * r.gpus_per_node  # noqa: E731 - data shards = world size
    assert (gpus(s.warmstart), warm.global_batch(gpus(s.warmstart)), warm.data.seq_len) == (4, 96, 2048)
    assert (gpus(s.train), mstep.global_batch(gpus(s.train))) == (8, 192)
    assert warm.total_steps(4) == 4069 and mstep.total_steps(8) == 33060  # the reference's step counts
    o = mstep.optim
    assert (o.lr, o.weight_decay, o.warmup, o.scheduler, o.lr_min_ratio) == (1e-4, 0.01, 1000, "cosine", 1e-6)
    assert (mstep.model.dim, mstep.model.n_layers, mstep.model.vocab_size) == (2048, 22, 32004)
    assert mstep.checkpoint.init_ckpt_path == "data/ckpts/tinyllama" and mstep.seed == mstep.data.seed == 1
    assert len(mstep.tokenizer.special_tokens) == 4 and d.tokenizer_args() == mstep.tokenizer
    e = d.estep_config("iter1", "MODEL")
    p = e.posterior
    assert (p.num_samples, p.temperature, p.max_latent_tokens, p.max_context_tokens, p.selection) == (4, 1.0, 1024, 2048, "sir")
    assert (e.chunk.prefix_chunks, e.chunk.units_per_chunk, e.src) == (3, 8, str(tmp_path / "data" / "bootstrap"))
    assert (s.estep.shards, s.estep.gpus_per_shard, s.eval.gpus_per_node) == (200, 1, 1)
    ev = d.eval_config("iter1_t0", "MODEL", latent=True)
    assert (e.backend, e.dtype, ev.tasks.backend) == ("vllm", "bfloat16", "vllm")  # as the reference, on GPUs
    assert (ev.tasks.task_list(), ev.tasks.data_root, ev.tasks.variant) == (["gsm8k_cot", "hendrycks_math_cot"], "", "latent")
    prep = load_config(PrepareArgs, cfg.prepare.config, [*cfg.prepare.overrides, f"out_dir={tmp_path}"])
    assert [prep.val.name, *(x.name for x in prep.subsets)] == ["validation", "warmstart", "bootstrap"]
    assert [x.tokens for x in prep.subsets] == [480_000_000, 1_920_000_000]
    teacher = load_config(GenLatentsArgs, cfg.teacher.config, [*cfg.teacher.overrides, "src=a", "out=b"])
    assert (teacher.method, teacher.backend) == ("latent_thoughts", "openai_batch")
    assert teacher.sampling(teacher.prompt()).model.startswith("gpt-4o-mini")
    assert (s.teacher.where, s.teacher.shards) == ("job", 20)


def test_every_em_config_loads(tmp_path):
    for path in sorted(CONFIGS.glob("em_*.yaml")):
        cfg = load_config(em.EMArgs, path, [f"dump_dir={tmp_path}"])
        for section in (cfg.prepare, cfg.teacher, cfg.train, cfg.estep, cfg.eval):
            assert Path(section.config).is_file(), (path.name, section.config)
        em.EMDriver(cfg).eval_config("m", "MODEL", latent=False)  # every stage config resolves


def test_bad_executor_settings(tmp_path):
    from lingua.args import ConfigError

    with pytest.raises(ConfigError, match="executor must be one of"):
        _cfg(tmp_path, "executor=kubernetes")
    with pytest.raises(ConfigError, match="teacher.where must be driver or job"):
        _cfg(tmp_path, "slurm.teacher.where=cloud")
    with pytest.raises(ConfigError, match="slurm.cluster must be one of"):
        _cfg(tmp_path, "slurm.cluster=pbs")
