"""Checkpoint-and-requeue on the time-limit signal: a training process that gets SIGUSR2 (the
signal submitit asks slurm for) saves a checkpoint at the end of its current step and exits with
EXIT_REQUEUE; rerun, it ends with the same weights as a run that was never interrupted. Then the
same through a submitit job (local executor): the job wrapper passes the signal on, waits, and
submitit requeues the job, which resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lingua import jobs, launch
from lingua.checkpoint import list_checkpoints, load_model
from lingua.trainer import EXIT_REQUEUE, requeue_signal
from tests.test_trainer import DEBUG_YAML, overrides, write_corpus

REPO = Path(__file__).resolve().parents[1]
STEPS = 120


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _argv(corpus: Path, run_dir: Path) -> list[str]:
    return [f"config={DEBUG_YAML}", *overrides(corpus, run_dir, steps=STEPS, **{"checkpoint.every": 0, "val.every": 0})]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="offline")
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    return env


def _train_cmd(corpus: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "apps.bolt.train", *_argv(corpus, run_dir)]


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return steps


def _wait_for_step(run_dir: Path, step: int, alive, timeout: float = 120.0) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        steps = _logged_steps(run_dir)
        if steps and steps[-1] >= step:
            return steps[-1]
        assert alive(), "the run ended before it was signalled"
        time.sleep(0.01)
    raise AssertionError(f"no step {step} logged in {timeout} s")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (step, folder), = [c for c in list_checkpoints(run_dir / "checkpoints") if c[0] == STEPS]
    return load_model(folder).state_dict()


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_train_cmd(corpus, run_dir), env=_env(), check=True, capture_output=True, cwd=REPO)
    return _final_weights(run_dir)


def _assert_same(weights: dict, reference: dict) -> None:
    assert weights.keys() == reference.keys()
    for k in reference:
        assert torch.equal(weights[k], reference[k]), k


def test_signal_name_comes_from_submitits_variable(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert requeue_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "TERM")
    assert requeue_signal() == signal.SIGTERM
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "none")
    assert requeue_signal() is None
    assert launch.EXIT_REQUEUE == EXIT_REQUEUE == 75


def test_signalled_training_checkpoints_exits_75_and_resumes_to_the_same_weights(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(corpus, run_dir), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = _wait_for_step(run_dir, 3, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    (saved, folder), = list_checkpoints(run_dir / "checkpoints")
    logged = _logged_steps(run_dir)
    assert seen <= saved < STEPS and logged[-1] == saved  # it stopped at the end of the signalled step
    assert "SIGUSR2 received: checkpoint saved" in (run_dir / "train.log").read_text()
    assert not (folder / "consolidated").exists()

    rerun = subprocess.run(_train_cmd(corpus, run_dir), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _logged_steps(run_dir) == list(range(1, STEPS + 1))  # no step twice, none missing
    _assert_same(_final_weights(run_dir), reference)


@pytest.mark.slow
def test_submitit_job_is_requeued_on_the_signal_and_resumes(corpus, reference, tmp_path, monkeypatch):
    """The local executor runs the job wrapper in a task process; the test sends that process
    the time-limit signal as slurm would. The wrapper forwards it to the training, which saves
    and exits 75; submitit requeues (restarts) the task and the training resumes."""
    monkeypatch.chdir(REPO)
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "run"
    a = launch.load_config(launch.LaunchArgs, None, ["mode=launch", "module=apps.bolt.train", "cluster=local",
                                                     f"log_dir={tmp_path / 'logs'}", "job_name=requeue"])
    (job,) = launch.submit_jobs(a, [launch.stage_command(a, _argv(corpus, run_dir))])
    _wait_for_step(run_dir, 3, lambda: not job.done())
    tasks = [p for p in launch._child_pids(int(job.job_id)) if p != int(job.job_id)]
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)
    assert jobs.wait_jobs([job], poll_s=0.2) == []
    log = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "Requeued job" in log
    steps = _logged_steps(run_dir)
    assert steps == list(range(1, STEPS + 1))
    assert "resuming from" in (run_dir / "train.log").read_text()
    _assert_same(_final_weights(run_dir), reference)


def test_an_evaluation_due_at_the_signalled_step_runs_after_the_resume(corpus, tmp_path, monkeypatch):
    """In process: an eval hook sends the signal at step 3; step 4 (a must-evaluate step) is the
    signalled one, so its checkpoint is saved with a pending evaluation and train() raises
    TrainingRequeued (exit status 75) without evaluating; the rerun evaluates step 4 first."""
    from lingua.trainer import TrainingRequeued, train
    from tests.test_trainer import debug_cfg

    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls = []

    def hook(model, step, run_dir):
        calls.append(step)
        if step == 3 and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        return {"probe": float(step)}

    cfg = debug_cfg(corpus, tmp_path / "run", steps=8, **{"eval.must_eval_steps": [3, 4], "checkpoint.every": 0, "val.every": 0})
    previous = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(TrainingRequeued) as stopped:
        train(cfg, eval_hooks=[hook])
    assert stopped.value.code == EXIT_REQUEUE and stopped.value.step == 4 and calls == [3]
    assert signal.getsignal(signal.SIGUSR2) == previous  # the handler is removed again
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3, 4]
    summary = train(cfg, eval_hooks=[hook])
    assert calls == [3, 4, 8] and summary["step"] == 8
