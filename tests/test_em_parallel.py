"""The local executor on the whole machine (``local.jobs``): training and evaluation as
subprocesses, independent trials and branches at once, every heavy process in one semaphore of
``jobs`` slots; the same results as one stage after another; failures name their logs."""

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from apps.bolt import em
from apps.bolt.em_exec import Branches, LocalArgs, LocalStages, cpu_cores, run_processes
from apps.bolt.em_local import PROCESSES_RECORD
from lingua.args import load_config
from tests.test_em import _cfg

# both runs: two E-step shard processes, whatever the core count (float noise otherwise)
BOTH = ["local.estep_procs=2"]
METRICS = ("accuracy", "val_nll_per_token", "elbo_", "thought_correct")


def _ledger(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "stages.jsonl").read_text().splitlines() if x]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


class ChildWatcher:
    """Counts, every 20 ms from /proc, this process's children running ``-m apps.bolt.*``: an
    observation of the heavy processes independent of the executor's own bookkeeping."""

    def __init__(self):
        self.peak, self.seen, self._stop = 0, set(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _children(self) -> set[int]:
        me, found = str(os.getpid()), set()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = stat.rsplit(")", 1)[1].split()[1]
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue  # ended meanwhile
            if ppid == me and b"-m" in cmd and cmd[cmd.index(b"-m") + 1].startswith(b"apps.bolt."):
                found.add(int(d))
        return found

    def _watch(self) -> None:
        while not self._stop.is_set():
            kids = self._children()
            self.seen |= kids
            self.peak = max(self.peak, len(kids))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_em_run):
    """The tiny EM loop twice: ``local.jobs=1`` (the session's run, tests/conftest.py) and
    ``local.jobs=2`` (watched from /proc)."""
    _, seq, r_seq = tiny_em_run
    tmp = tmp_path_factory.mktemp("em_par")
    par = _cfg(tmp, *BOTH, f"dump_dir={tmp / 'two'}", "local.jobs=2")
    t1 = time.perf_counter()
    with ChildWatcher() as watch:
        r_par = em.run(par)
    print(f"\ntiny EM run: local.jobs=2 {time.perf_counter() - t1:.1f}s")
    return tmp, (Path(seq.dump_dir), r_seq), (Path(par.dump_dir), r_par), watch


@pytest.mark.slow
def test_two_jobs_give_the_same_results_in_the_same_order(runs):
    _, (_, one), (_, two), _ = runs
    key = lambda r: (r["group"], r["iteration"], r["k"], r["trial"], r["run"])  # noqa: E731
    assert [key(r) for r in two["rows"]] == [key(r) for r in one["rows"]] == [
        ("warmstart", 0, None, 0, "warmstart_t0"), ("bootstrap", 1, 2, 0, "iter1_t0"),
        ("raw_token_match", None, None, 0, "raw_token_match_t0"), ("raw_flops_match", None, None, 0, "raw_flops_match_t0")]
    for a, b in zip(two["rows"], one["rows"]):
        assert set(a) == set(b)
        metrics = sorted(k for k in b if k.startswith(METRICS) and isinstance(b[k], float))
        assert "accuracy" in metrics and "val_nll_per_token" in metrics
        assert any(k.startswith("elbo_") for k in metrics) == (b["group"] not in ("raw_token_match", "raw_flops_match"))
        assert {k: a[k] for k in metrics} == pytest.approx({k: b[k] for k in metrics}, abs=1e-6), b["run"]
    assert [ln["group"] for ln in two["summary"]] == [ln["group"] for ln in one["summary"]]
    assert two["baseline_budgets"] == one["baseline_budgets"]


@pytest.mark.slow
def test_subprocesses_have_logs_and_configs(runs):
    _, (seq_root, one), (root, two), watch = runs
    for r in two["rows"]:
        for stage, module in (("train", "apps.bolt.train"), ("eval", "apps.bolt.em_eval")):
            log = root / "logs" / f"{stage}_{r['run']}.log"
            config = root / "configs" / f"{stage}_{r['run']}.yaml"
            assert config.is_file()
            assert f"-m {module} config={config}" in log.read_text().splitlines()[0]
    assert all((root / "logs" / f"estep_iter1.shard-{i}.log").is_file() for i in range(2))
    # jobs=1: training and evaluation in the driver's process (no logs), only E-step shards
    assert not list((seq_root / "logs").glob("train_*")) and not list((seq_root / "logs").glob("eval_*"))
    procs = [json.loads(x) for x in (seq_root / "logs" / PROCESSES_RECORD).read_text().splitlines()]
    assert [p["stage"] for p in procs] == ["estep:iter1"] * 2
    # 4 models x (train + eval) + 2 E-step shards, each one process, each seen from /proc
    assert len(watch.seen) == 10


@pytest.mark.slow
def test_at_most_jobs_heavy_processes_at_once_and_branches_overlap(runs):
    _, (seq_root, _), (root, _), watch = runs
    procs = [json.loads(x) for x in (root / "logs" / PROCESSES_RECORD).read_text().splitlines()]
    stages = sorted(p["stage"] for p in procs)
    runs_ = ["iter1_t0", "raw_flops_match_t0", "raw_token_match_t0", "warmstart_t0"]
    assert stages == sorted([f"{s}:{r}" for s in ("train", "eval") for r in runs_] + ["estep:iter1"] * 2)
    assert all(p["exit"] == 0 for p in procs)
    # the executor's record (process start to reaped) and the /proc watcher: never more than 2
    assert _max_overlap([(p["start"], p["end"]) for p in procs]) == 2
    assert 1 <= watch.peak <= 2
    # the baselines ran beside iteration 1's M-step (ledger times: waiting for a slot included)
    led = {r["stage"]: r for r in _ledger(root)}

    def overlap(a: str, b: str) -> bool:
        return led[a]["start"] < led[b]["end"] and led[b]["start"] < led[a]["end"]

    assert overlap("train:raw_token_match_t0", "train:raw_flops_match_t0")
    assert overlap("train:iter1_t0", "train:raw_token_match_t0") or overlap("train:iter1_t0", "train:raw_flops_match_t0")
    # jobs=1: one stage after another
    seq = _ledger(seq_root)
    assert all(a["end"] <= b["start"] for a, b in zip(seq, seq[1:]))


@pytest.mark.slow
def test_a_failed_training_process_names_its_log(runs):
    tmp, _, (root, _), _ = runs
    bad = tmp / "bad"
    shutil.copytree(root / "data", bad / "data")  # prepared data and teacher latents: not redone
    cfg = _cfg(tmp, f"dump_dir={bad}", "local.jobs=2",
               "train.overrides=[model.dim=64, model.n_layers=2, model.n_heads=4, model.n_kv_heads=2, "
               "model.hidden_dim=128, data.batch_size=4, data.seq_len=128, data.prefetch=false, data.text_key=nope]")
    log = bad / "logs" / "train_warmstart_t0.log"
    with pytest.raises(RuntimeError, match=rf"(?s)train:warmstart_t0: its process failed \(exit status 1\); "
                                           rf"log {log}.*apps.bolt.train: error: .*no valid document.*missing_key"):
        em.run(cfg)
    # the console log has the one error line; the traceback is in the run's own log
    assert "Traceback" not in log.read_text() and "DataError" in (bad / "runs" / "warmstart_t0" / "train.log").read_text()
    assert not (bad / "stages.jsonl").exists()  # no stage finished (the data stages were complete)


# ------------------------------------------------------------------------------- unit level
def _sleeper(seconds: float, code: int = 0) -> list[str]:
    return [sys.executable, "-c", f"import time, sys; time.sleep({seconds}); sys.exit({code})"]


def test_one_semaphore_bounds_the_processes_of_concurrent_stages(tmp_path):
    stages = LocalStages(tmp_path, LocalArgs(jobs=2))
    assert stages.parallel and stages.jobs == 2
    errors = []

    def stage(name: str, n: int, fail: int | None = None) -> None:
        cmds = {i: _sleeper(0.4, 3 if i == fail else 0) for i in range(n)}
        logs = {i: tmp_path / "logs" / f"{name}.{i}.log" for i in range(n)}
        try:  # each stage alone would run all its processes at once (procs=n)
            run_processes(name, cmds, logs, n, os.environ.copy(), poll_s=0.02, slots=stages.slots,
                          record=stages._record, what="shard" if n > 1 else "process")
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=stage, args=a) for a in (("a", 3), ("b", 2, 1), ("c", 1))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    procs = [json.loads(x) for x in (tmp_path / "logs" / PROCESSES_RECORD).read_text().splitlines()]
    assert len(procs) == 6 and _max_overlap([(p["start"], p["end"]) for p in procs]) == 2
    assert sorted(p["exit"] for p in procs) == [0, 0, 0, 0, 0, 3]
    assert len(errors) == 1 and "b: 1 of 2 shard process(es) failed" in errors[0] and str(tmp_path / "logs" / "b.1.log") in errors[0]
    # every slot was given back, the failed process's too
    assert all(stages.slots.acquire(blocking=False) for _ in range(2)) and not stages.slots.acquire(blocking=False)


def test_after_a_failed_shard_no_other_starts(tmp_path):
    cmds = {0: _sleeper(0, 2), 1: _sleeper(0), 2: _sleeper(0)}
    logs = {i: tmp_path / f"s{i}.log" for i in cmds}
    with pytest.raises(RuntimeError, match=r"(?s)x: 1 of 3 shard.*not started: shards \[1, 2\].*shard 0 \(exit status 2\)"):
        run_processes("x", cmds, logs, 1, os.environ.copy(), poll_s=0.02)
    assert not logs[1].exists() and not logs[2].exists()


def test_a_failed_process_error_quotes_its_log(tmp_path):
    log = tmp_path / "x.log"
    cmd = [sys.executable, "-c", "print('line one'); raise SystemExit('it broke here')"]
    with pytest.raises(RuntimeError, match=rf"(?s)train:x: its process failed \(exit status 1\); log {log}.*it broke here"):
        run_processes("train:x", {0: cmd}, {0: log}, 1, os.environ.copy(), poll_s=0.02, what="process")


def test_branches_raise_the_first_failure_after_every_branch_ended():
    ended = []

    def slow():
        time.sleep(0.5)
        ended.append("slow")
        return "slow"

    def fails():
        raise ValueError("first")

    b = Branches(parallel=True)
    b.start(fails)
    b.start(slow)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="first"):
        b.wait()
    assert ended == ["slow"] and time.perf_counter() - t0 > 0.3
    # the caller's own failure comes first, still after the branches ended
    b = Branches(parallel=True)
    b.start(slow)
    with pytest.raises(KeyError):
        b.wait(KeyError("main"))
    assert ended == ["slow", "slow"]
    # without parallel: queued, run in start order by wait(), nothing after a failure
    order = []
    b = Branches(parallel=False)
    b.start(lambda: order.append(1) or 1)
    b.start(lambda: order.append(2) or 2)
    assert order == [] and b.wait() == [1, 2] and order == [1, 2]
    b = Branches(parallel=False)
    b.start(fails)
    b.start(lambda: order.append(3))
    with pytest.raises(ValueError):
        b.wait()
    assert order == [1, 2]


def test_default_jobs_and_driver_wiring(tmp_path):
    assert LocalStages(tmp_path, LocalArgs()).jobs == cpu_cores()
    assert LocalStages(tmp_path, LocalArgs(), device="cuda").jobs == 1  # one GPU: one at a time
    one = LocalStages(tmp_path, LocalArgs(jobs=1))
    assert not one.parallel and one.slots is None
    cfg = load_config(em.EMArgs, None, [f"dump_dir={tmp_path}", "local.jobs=3"])
    assert em.EMDriver(cfg).stages.jobs == 3 and em.EMDriver(cfg).stages.parallel
    with pytest.raises(Exception, match="local.jobs >= 0"):
        load_config(em.EMArgs, None, ["local.jobs=-1"])


# ------------------------------------------------------------------- the driver's branches
def _fake_driver(tmp_path, monkeypatch, jobs: int, fail: str = ""):
    """A driver whose stages only record when they ran (no models): iterations=2, two K ablations,
    both baselines. Side branches finish in another order than they start."""
    from apps.bolt import em_report

    cfg = load_config(em.EMArgs, None, [f"dump_dir={tmp_path / f'j{jobs}'}", f"local.jobs={jobs}", "iterations=2",
                                        "k_ablation=[1,2]"])
    d = em.EMDriver(cfg)
    events, lock = [], threading.Lock()

    def log(what):
        with lock:
            events.append((what, time.perf_counter()))

    def estep_run(name, ckpt, k=None, changes=None):
        log(f"estep:{name}")
        time.sleep(0.1)
        return Path(f"/nowhere/{name}_latents")

    def trials(group, iteration, k, name, source, layout, tokens, init, n=None):
        log(f"start:{name}")
        time.sleep({"iter1_k1": 0.6, "raw_token_match": 0.45}.get(name, 0.3))
        if name == fail:
            raise RuntimeError(f"{name} failed")
        log(f"end:{name}")
        return [Path(name)], [{"group": group, "run": name}]

    for name in ("prepare", "tokenizer", "bootstrap", "teacher"):
        monkeypatch.setattr(d, name, lambda: None)
    monkeypatch.setattr(d, "base", lambda: "")
    monkeypatch.setattr(d, "budget", lambda latents, epochs, tokens: tokens)
    monkeypatch.setattr(d, "estep_run", estep_run)
    monkeypatch.setattr(d, "trials", trials)
    monkeypatch.setattr(em_report, "raw_fraction", lambda tokenizer, path: {"raw_fraction": 0.5, "ref": path.name})
    monkeypatch.setattr(em_report, "write_report", lambda root, name, rows, seconds: rows)
    return d, events


ORDER = ["warmstart", "iter1", "iter2", "iter1_k1", "iter1_k2", "raw_token_match", "raw_flops_match"]


def test_branches_beside_the_iterations_rows_in_a_fixed_order(tmp_path, monkeypatch):
    seq, seq_events = _fake_driver(tmp_path, monkeypatch, 1)
    assert [r["run"] for r in seq.run()] == ORDER
    # one after another, in the old order: iterations, ablations, baselines
    assert [e for e, _ in seq_events if not e.startswith("end:")] == [
        "start:warmstart", "estep:iter1", "start:iter1", "estep:iter2", "start:iter2", "estep:iter1_k1",
        "start:iter1_k1", "estep:iter1_k2", "start:iter1_k2", "start:raw_token_match", "start:raw_flops_match"]
    par, events = _fake_driver(tmp_path, monkeypatch, 2)
    assert [r["run"] for r in par.run()] == ORDER  # though the branches ended in another order
    at = {e: t for e, t in events}
    names = [e for e, _ in events]
    assert names.index("end:iter1_k1") > names.index("end:iter1_k2")
    # the ablations started right after the warmstart, beside iteration 1's E-step; the baselines
    # after iteration 1's E-step (their budgets), beside iteration 1's M-step, at once
    assert at["estep:iter1_k1"] < at["end:iter1"] and at["estep:iter1_k2"] < at["end:iter1"]
    for b in ("raw_token_match", "raw_flops_match"):
        assert at["estep:iter1"] < at[f"start:{b}"] < at["end:iter1"]
    assert json.loads((par.root / "baseline_budgets.json").read_text())["ref"] == "iter1_latents"


def test_a_failed_branch_is_raised_after_the_iterations_ended(tmp_path, monkeypatch):
    d, events = _fake_driver(tmp_path, monkeypatch, 2, fail="iter1_k1")
    with pytest.raises(RuntimeError, match="iter1_k1 failed"):
        d.run()
    names = [e for e, _ in events]
    assert {"end:iter2", "end:iter1_k2", "end:raw_token_match", "end:raw_flops_match"} <= set(names)
    # the main branch failing: raised once the branches beside it have ended too
    d, events = _fake_driver(tmp_path, monkeypatch, 2, fail="iter1")
    with pytest.raises(RuntimeError, match="iter1 failed"):
        d.run()
    names = [e for e, _ in events]
    assert "estep:iter2" not in names and {"end:iter1_k2", "end:raw_token_match", "end:raw_flops_match"} <= set(names)
