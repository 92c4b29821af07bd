"""Fault injection for every stage that writes a folder (train, E-step, gen_latents, prepare):

* races: a second writer on the same folder (or shard) fails at once naming the holder, while
  the shards of one stage run side by side (:mod:`lingua.locks`);
* kills: ``kill -9`` in the middle of the work (while the lock is held), then the same command
  again resumes and completes; for training the kill hits the final consolidation, which the
  rerun rebuilds;
* a full disk: a small tmpfs (``unshare -rm`` + ``mount``) when the machine allows it, else a
  patched ``fsync`` raising ``ENOSPC``: one ``error:`` line that says no space is left and names
  the folder, and no half-written folder with a ``COMPLETE`` marker;
* resuming training with changed settings: refused with the changed keys, or recorded with
  ``checkpoint.allow_config_change``.

The stage subprocesses run ``tests/helpers/faults.py``, which plants the pause or the full disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tests.helpers.faults  # noqa: F401 - registers the pausing_echo teacher here too
from apps.bolt import estep, gen_latents, prepare
from apps.bolt.formats import SPECIAL_TOKENS
from apps.bolt.train import BoltTrainArgs
from apps.bolt.train import run as train_run
from lingua.args import ConfigError, load_config
from lingua.consolidated import is_complete, load_consolidated, save_consolidated
from lingua.io import is_done
from lingua.locks import LockHeldError, RunLock, read_holder
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model
from tests.test_trainer import DEBUG_YAML, REPO, read_metrics, write_corpus

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny training corpus, a tiny consolidated model and a raw source of three documents."""
    root = tmp_path_factory.mktemp("faults")
    write_corpus(root / "corpus", n_train=60, n_val=10)
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    torch.manual_seed(0)
    args = TransformerArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, max_seqlen=256)
    save_consolidated(build_model(args), tok, root / "model")
    (root / "raw").mkdir()
    texts = ["One. Two. Three.", "Four five. Six.", "Seven. Eight. Nine. Ten."]
    (root / "raw" / "raw.chunk.00.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                                                             for i, t in enumerate(texts)))
    return {"corpus": root / "corpus", "model": root / "model", "raw": root / "raw"}


def stage_args(stage: str, inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """The command line of a small run of ``stage`` writing ``out``."""
    base = {
        "train": [f"config={DEBUG_YAML}", f"data.root_dir={inputs['corpus']}", f"dump_dir={out}", "steps=2",
                  "checkpoint.every=0", "data.batch_size=2", "data.seq_len=32", "val.source=", "log_freq=1"],
        "estep": [f"ckpt={inputs['model']}", f"src={inputs['raw']}", f"out={out}", "posterior.max_latent_tokens=8",
                  "posterior.num_samples=2", "progress=false", "batch_chunks=1"],
        "gen_latents": ["backend=pausing_echo", f"src={inputs['raw']}", f"out={out}", "progress=false"],
        "prepare": [f"out_dir={out}", "source.kind=synthetic", "source.generator=tests.helpers.faults:corpus",
                    "source.num_docs=200", "subsets=[{name: warm}]", "docs_per_shard=40"],
    }[stage]
    return base + list(extra)


def run_here(stage: str, args: list[str]) -> dict:
    """Run a stage in this process, as its entry point would (without the error handler)."""
    path = None
    if args and args[0].startswith("config="):
        path, args = args[0].removeprefix("config="), args[1:]
    module, cls = {
        "train": (None, BoltTrainArgs), "estep": (estep, estep.EStepArgs),
        "gen_latents": (gen_latents, gen_latents.GenLatentsArgs), "prepare": (prepare, prepare.PrepareArgs),
    }[stage]
    cfg = load_config(cls, path, args)
    return train_run(cfg) if module is None else module.run(cfg)


def spawn(stage: str, args: list[str], log: Path, *opts: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.helpers.faults", stage, *opts, "--", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def wait_paused(proc: subprocess.Popen, log: Path) -> None:
    """Until the subprocess reports that it paused in the middle of its work."""
    for line in proc.stdout:
        if line.startswith("@@paused"):
            return
    proc.wait()
    pytest.fail(f"the stage exited (status {proc.returncode}) before pausing:\n{log.read_text()[-3000:]}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def assert_names_holder(e: pytest.ExceptionInfo, pid: int, lock: Path) -> None:
    msg = str(e.value)
    assert "\n" not in msg and f"host {HOST}, pid {pid}, since " in msg, msg
    assert f"delete {lock}" in msg, msg


# ------------------------------------------------------------------------------- the lock itself


def test_second_lock_is_refused_naming_the_holder_and_released_on_exit(tmp_path):
    with RunLock(tmp_path / "run", "train") as first:
        holder = read_holder(first.path)
        assert holder["pid"] == os.getpid() and holder["host"] == HOST and holder["what"] == "train"
        with pytest.raises(LockHeldError) as e:
            RunLock(tmp_path / "run", "train").acquire()
        assert_names_holder(e, os.getpid(), first.path)
        with RunLock(tmp_path / "run", "other", name="shard-1.lock"):  # another shard's lock is free
            pass
    assert not first.path.exists()  # removed on release
    with RunLock(tmp_path / "run"):  # and free again
        pass


def test_a_waiting_lock_is_taken_when_the_holder_releases_and_refused_after_its_wait(tmp_path):
    import threading
    import time

    folder = tmp_path / "export"
    first = RunLock(folder, "HF export").acquire()
    threading.Timer(0.3, first.release).start()
    t0 = time.monotonic()
    second = RunLock(folder, "HF export, shard 2").acquire(wait_s=30, poll_s=0.05)
    waited = time.monotonic() - t0
    assert 0.25 < waited < 10 and read_holder(second.path)["what"] == "HF export, shard 2"
    second.release()
    with RunLock(folder, "HF export"):
        t0 = time.monotonic()
        with pytest.raises(LockHeldError, match="in use by HF export"):
            RunLock(folder, "late").acquire(wait_s=0.2, poll_s=0.05)
        assert time.monotonic() - t0 >= 0.2


def test_without_flock_an_exclusive_file_is_used_and_dead_holders_are_cleared(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    with RunLock(folder, "prepare") as first:
        assert not first.use_flock and read_holder(first.path)["pid"] == os.getpid()
        with pytest.raises(LockHeldError) as e:
            RunLock(folder, "prepare").acquire()
        assert_names_holder(e, os.getpid(), first.path)
    assert not first.path.exists()
    # a lock file left by a process of this host that no longer runs is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": HOST, "pid": int(dead.stdout), "since": "yesterday", "what": "prepare", "command": "x"}
    (folder / ".lock").write_text(json.dumps(stale))
    with RunLock(folder, "prepare") as lock:
        assert read_holder(lock.path)["pid"] == os.getpid()
    # one of another host cannot be checked: the message says what to delete
    (folder / ".lock").write_text(json.dumps({**stale, "host": "elsewhere"}))
    with pytest.raises(LockHeldError, match=f"host elsewhere, pid {stale['pid']}.*delete {folder / '.lock'}"):
        RunLock(folder, "prepare").acquire()


# ------------------------------------------------------------------- races and kills, per stage


def test_train_race_then_kill_during_final_consolidation(inputs, tmp_path):
    """Two identical trainings on one dump_dir: the second stops at once (one error line naming
    the first); the first, killed while writing the final consolidated folder, is completed by
    the rerun, which rebuilds that folder (before: the rerun exited 0 without one)."""
    run = tmp_path / "run"
    args = stage_args("train", inputs, run)
    first = spawn("train", args, tmp_path / "first.log", "--pause")
    try:
        wait_paused(first, tmp_path / "first.log")  # step 2 checkpointed, consolidating
        rows = read_metrics(run)
        second = subprocess.run([sys.executable, "-m", "apps.bolt.train", *args], cwd=REPO, capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert second.returncode == 1
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("apps.bolt.train: error: ") and f"pid {first.pid}" in last, second.stderr[-2000:]
        with pytest.raises(LockHeldError) as e:
            run_here("train", args)
        assert_names_holder(e, first.pid, run / ".lock")
        assert read_metrics(run) == rows  # the second writer wrote nothing
    finally:
        kill(first)
    final = run / "checkpoints" / f"{2:010d}"
    assert is_done(final) and not is_complete(final / "consolidated")
    summary = run_here("train", args)
    assert summary["losses"] == {} and summary["consolidated"] == str(final / "consolidated")
    model, _ = load_consolidated(final / "consolidated")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


@pytest.mark.parametrize("stage", ["estep", "gen_latents"])
def test_shards_of_one_run_share_a_folder_but_not_a_shard(stage, inputs, tmp_path):
    """Shard 0 is killed while it works; meanwhile shard 1 of the same run completes beside it
    and a second shard-0 writer is refused; the rerun of shard 0 completes and the merge is whole."""
    out = tmp_path / "out"
    shard = ["action=shard", "num_shards=2"] if stage == "estep" else ["num_shards=2"]
    cache = [f"cache={out}/cache/samples.shard-{{}}.db"] if stage == "estep" else []

    def args(i: int) -> list[str]:
        return stage_args(stage, inputs, out, *shard, f"shard={i}", *[c.format(i) for c in cache])

    first = spawn(stage, args(0), tmp_path / "first.log", "--pause")
    try:
        wait_paused(first, tmp_path / "first.log")
        run_here(stage, args(1))
        with pytest.raises(LockHeldError) as e:
            run_here(stage, args(0))
        work = estep.shard_paths(out, 0, 2)[0] if stage == "estep" else out / "_work" / "shard_00000_of_00002"
        assert_names_holder(e, first.pid, work.with_suffix(".lock"))
    finally:
        kill(first)
    run_here(stage, args(0))
    if stage == "estep":
        lineage = run_here(stage, stage_args(stage, inputs, out, "action=merge", "num_shards=2"))
        assert lineage["docs"] == 3
    else:
        result = run_here(stage, stage_args(stage, inputs, out, "merge=true", "num_shards=2"))
        assert result["lineage"]["counts"]["documents"] == 3
    assert is_done(out) and not list(out.rglob("*.lock"))


def test_prepare_race_then_kill_while_staging(inputs, tmp_path):
    out = tmp_path / "data"
    args = stage_args("prepare", inputs, out)
    first = spawn("prepare", args, tmp_path / "first.log", "--pause")
    try:
        wait_paused(first, tmp_path / "first.log")
        with pytest.raises(LockHeldError) as e:
            run_here("prepare", args)
        assert_names_holder(e, first.pid, out / ".lock")
    finally:
        kill(first)
    results = run_here("prepare", args)
    assert sum(info["num_docs"] for info in results.values()) == 200
    assert all(is_done(out / name) for name in results) and not (out / ".lock").exists()


# ---------------------------------------------------------------------------------- a full disk


def _tmpfs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k none /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=4k none /tmp"], capture_output=True)
    return probe.returncode == 0


TMPFS = not os.environ.get("FAULTS_NO_TMPFS") and _tmpfs_available()  # set it to test the fallback
FULL_AT = {"train": "256k", "estep": "64k", "gen_latents": "32k", "prepare": "64k"}
"""tmpfs sizes that let each stage start and fill up in the middle of its output."""


@pytest.mark.parametrize("stage", ["train", "estep", "gen_latents", "prepare"])
def test_full_disk_is_one_line_naming_the_folder_and_leaves_no_complete_marker(stage, inputs, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "out"
    args = stage_args(stage, inputs, out)
    helper = [sys.executable, "-m", "tests.helpers.faults", stage, "--list", str(mnt)]
    if TMPFS:  # a real full file system, private to the subprocess
        cmd = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o "size=$0" none "$1" && shift && exec "$@"',
               FULL_AT[stage], str(mnt), *helper, "--", *args]
    else:
        cmd = [*helper, "--enospc", str(mnt), "--", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "No space left on device" in errors[0] and f"{out}" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and "inline_container" not in errors[0].split("(")[0]
    listing = json.loads(proc.stdout.split("@@listing ", 1)[1].splitlines()[0])
    assert "out/COMPLETE" not in listing, listing
    if stage == "train":  # the unfinished checkpoint folder is gone, not left without its marker
        assert not [f for f in listing if f.startswith("out/checkpoints/")], listing
    if stage == "prepare":  # the set being written when the disk filled (earlier ones may be finished)
        assert "out/warm/COMPLETE" not in listing, listing


# ------------------------------------------------------------------- resuming with other settings


def test_rerun_of_a_finished_run_rebuilds_a_corrupt_consolidated_folder(inputs, tmp_path):
    args = stage_args("train", inputs, tmp_path / "run")
    folder = Path(run_here("train", args)["consolidated"])
    (folder / "consolidated.pt").unlink()  # marker left, weights gone
    again = run_here("train", args)
    assert again["losses"] == {} and again["consolidated"] == str(folder) and is_complete(folder)
    load_consolidated(folder)


def test_resume_with_changed_settings_is_refused_or_recorded(inputs, tmp_path):
    run = tmp_path / "run"

    def args(*extra: str) -> list[str]:
        return stage_args("train", inputs, run, "steps=4", *extra)

    run_here("train", args("stop_at_step=1"))
    # how the run is watched or saved may change freely
    run_here("train", args("stop_at_step=2", "log_freq=2", "checkpoint.keep=1"))
    assert not (run / "config_changes.jsonl").exists()
    config = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        run_here("train", args("optim.lr=0.01", "optim.warmup=1", "stop_at_step=3"))
    msg = str(e.value)
    assert "\n" not in msg and "resumes at step 2" in msg and "optim.lr 0.003 -> 0.01" in msg
    assert "optim.warmup 10 -> 1" in msg and "checkpoint.allow_config_change=true" in msg and "log_freq" not in msg
    assert (run / "config.yaml").read_text() == config  # not overwritten
    summary = run_here("train", args("optim.lr=0.01", "optim.warmup=1", "checkpoint.allow_config_change=true"))
    assert sorted(summary["losses"]) == [3, 4]
    changes = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert len(changes) == 1 and changes[0]["step"] == 2
    assert changes[0]["changes"] == {"optim.lr": {"old": 0.003, "new": 0.01}, "optim.warmup": {"old": 10, "new": 1}}
    assert yaml.safe_load((run / "config.2.yaml").read_text())["optim"]["lr"] == 0.003
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.01
    # the new settings are the run's now: resuming with them needs no flag
    assert run_here("train", args("optim.lr=0.01", "optim.warmup=1"))["losses"] == {}


def test_disk_full_message_helper_names_the_folder(tmp_path):
    from lingua.locks import disk_full_error

    named = disk_full_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert named.errno == errno.ENOSPC and named.filename == str(tmp_path)
    assert disk_full_error(OSError(errno.ENOSPC, "x", "/some/file"), tmp_path) is None  # says where already
    if shutil.disk_usage(tmp_path).free > 64 << 20:  # torch's write failure with space left: not a full disk
        assert disk_full_error(RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos"), tmp_path) is None
