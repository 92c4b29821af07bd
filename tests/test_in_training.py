"""Evaluation during training: the schedule (``eval.every``, ``eval.must_eval_steps``, the final
step), checkpoints of must-evaluate steps, pending-evaluation records and cleanup, the resumed
evaluation of an interrupted step, launch mode from config with its per-checkpoint job, and the
``step`` / ``tokens`` of every metrics row."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from apps.bolt.evaluation import in_training as T
from apps.bolt.train import BoltTrainArgs, run
from lingua.args import ConfigError, load_config
from lingua.checkpoint import (
    EVAL_PENDING,
    CheckpointArgs,
    CheckpointManager,
    clear_eval_pending,
    list_checkpoints,
    load_model,
    mark_eval_pending,
    pending_evals,
    read_eval_pending,
    step_folder,
)
from lingua.consolidated import load_tokenizer
from lingua.distributed import DistEnv
from lingua.io import mark_done
from lingua.trainer import train
from tests.test_train_app import _latent_corpus
from tests.test_trainer import DEBUG_YAML, debug_cfg, read_metrics, write_corpus

CONFIGS = Path(__file__).resolve().parents[1] / "apps" / "bolt" / "configs"
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STEP_TOKENS = 2 * 64  # data.batch_size x data.seq_len below


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _latent_corpus(tmp_path_factory.mktemp("data"))


def bolt_cfg(data: Path, run_dir: Path, *extra: str, layout: str = "raw") -> BoltTrainArgs:
    return load_config(BoltTrainArgs, DEBUG_YAML, [
        f"dump_dir={run_dir}", f"data.root_dir={data}", "data.sources={latent: 1.0}", "data.batch_size=2",
        "data.seq_len=64", "val.source=", "log_freq=100", "checkpoint.consolidate=false", f"layout.name={layout}",
        '''tokenizer.special_tokens=["<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>", "<|POSTERIOR_PREFIX|>"]''',
        f"eval.val_docs={data / 'heldout'}", *extra,
    ])


def steps_of(folder: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(folder / "checkpoints")]


def nll_of_checkpoint(run_dir: Path, step: int, data: Path) -> float:
    """The held-out NLL of a saved checkpoint, computed apart from the trainer."""
    tok = load_tokenizer(run_dir)
    docs = T.load_documents(data / "heldout", 1000)
    model = load_model(step_folder(run_dir / "checkpoints", step)).eval()
    return T.ValidationNLL(docs, tok)(model, step, run_dir)["val/heldout/nll_per_token"]


# ------------------------------------------------------------------------------ in process
def test_must_eval_steps_are_evaluated_and_their_checkpoints_kept(data, tmp_path):
    """every=4 and must_eval_steps=[3, 5] on an 8-step run: evaluations at 3, 4, 5 and the final
    step 8; checkpoints at 3 and 5 (none at 4: checkpoint.every=0) survive keep=1; no record is
    left pending; each row has step and tokens; the logged NLL is the checkpoint's."""
    run_dir = tmp_path / "run"
    summary = run(bolt_cfg(data, run_dir, "steps=8", "eval.every=4", "eval.must_eval_steps=[3,5]",
                           "checkpoint.every=0", "checkpoint.keep=1"))
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    evaluated = sorted(s for s, r in rows.items() if "val/heldout/nll_per_token" in r)
    assert evaluated == [3, 4, 5, 8]
    assert all(r["tokens"] == s * STEP_TOKENS for s, r in rows.items())
    assert steps_of(run_dir) == [3, 5, 8]
    assert pending_evals(run_dir / "checkpoints") == []
    assert rows[5]["val/heldout/nll_per_token"] == pytest.approx(nll_of_checkpoint(run_dir, 5, data), rel=1e-6)
    assert summary["eval"]["val/heldout/nll_per_token"] == rows[8]["val/heldout/nll_per_token"]
    curve = T.eval_curve(run_dir)
    assert [(c["step"], c["tokens"]) for c in curve] == [(s, s * STEP_TOKENS) for s in (3, 4, 5, 8)]

    # keep_checkpoints=false: evaluated all the same, then removed by cleanup like any other
    other = tmp_path / "other"
    run(bolt_cfg(data, other, "steps=8", "eval.every=4", "eval.must_eval_steps=[3,5]", "eval.keep_checkpoints=false",
                 "checkpoint.every=0", "checkpoint.keep=1"))
    assert sorted(r["step"] for r in read_metrics(other) if "val/heldout/nll_per_token" in r) == [3, 4, 5, 8]
    assert steps_of(other) == [8]


def test_must_eval_tokens_become_steps_of_the_run(data, tmp_path):
    """Evaluation points given in tokens land on the step whose tokens reach them (2.5 and 5.9
    steps' worth -> steps 2 and 5), whatever the batch; their checkpoints are kept."""
    run_dir = tmp_path / "run"
    run(bolt_cfg(data, run_dir, "steps=8", f"eval.must_eval_tokens=[{int(2.5 * STEP_TOKENS)},{int(5.9 * STEP_TOKENS)}]",
                 "checkpoint.every=0", "checkpoint.keep=1"))
    rows = read_metrics(run_dir)
    assert sorted(r["step"] for r in rows if "val/heldout/nll_per_token" in r) == [2, 5, 8]
    assert steps_of(run_dir) == [2, 5, 8]


def test_final_elbo_is_logged_with_elbo_every(data, tmp_path):
    """The ELBO runs every elbo_every=4 steps, at the must-evaluate step 3 and at the final step 5
    (which build_hooks never told the hook before); the NLL at every evaluation (2, 3, 4, 5)."""
    run_dir = tmp_path / "run"
    run(bolt_cfg(data, run_dir, "steps=5", "eval.every=2", "eval.must_eval_steps=[3]", "eval.elbo_every=4",
                 "eval.elbo_samples=[1,2]", "checkpoint.every=0", layout="random"))
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    assert sorted(s for s, r in rows.items() if "val/heldout/nll_per_token" in r) == [2, 3, 4, 5]
    assert sorted(s for s, r in rows.items() if "val/heldout/elbo_2_per_token" in r) == [3, 4, 5]
    assert rows[5]["val/heldout/elbo_1_per_token"] < 0 and rows[5]["tokens"] == 5 * STEP_TOKENS


def test_must_eval_step_beyond_the_run_is_an_error(data, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.must_eval_steps \[9\] lie beyond the run's last step 4"):
        run(bolt_cfg(data, tmp_path / "run", "steps=4", "eval.must_eval_steps=[2,9]"))
    with pytest.raises(ConfigError, match="mode must be one of"):
        bolt_cfg(data, tmp_path / "run", "eval.mode=later")


def test_cleanup_never_removes_a_checkpoint_whose_evaluation_is_pending(tmp_path):
    for step in (1, 2, 3, 4):
        mark_done(step_folder(tmp_path, step))
    mark_eval_pending(step_folder(tmp_path, 2), {"step": 2, "mode": "launch", "launched": True})
    manager = CheckpointManager(tmp_path, CheckpointArgs(keep=1), ENV, keep_steps=[3])
    assert [p.name for p in manager.cleanup()] == [f"{1:010d}"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3, 4]
    assert read_eval_pending(step_folder(tmp_path, 2))["launched"] is True
    assert [s for s, _ in pending_evals(tmp_path)] == [2]
    assert clear_eval_pending(step_folder(tmp_path, 2)) and not clear_eval_pending(step_folder(tmp_path, 2))
    assert [p.name for p in manager.cleanup()] == [f"{2:010d}"]  # evaluated: an ordinary checkpoint now
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_a_run_killed_before_its_evaluation_was_recorded_evaluates_that_step_on_resume(tmp_path):
    """The hook dies at the must-evaluate step 3, after the checkpoint was saved: the checkpoint
    keeps its pending record (and survives keep=1 cleanup), and the rerun evaluates step 3 first,
    then goes on; every step is evaluated once in metrics.jsonl."""
    corpus = write_corpus(tmp_path / "corpus")
    calls: list[int] = []
    fail = {3}

    def hook(model, step, run_dir):
        if step in fail:
            fail.discard(step)
            raise RuntimeError("killed while evaluating")
        calls.append(step)
        return {"score": float(step)}

    cfg = debug_cfg(corpus, tmp_path / "run", steps=6, **{"eval.must_eval_steps": [3], "eval.every": 4,
                                                          "checkpoint.every": 2, "checkpoint.keep": 1})
    with pytest.raises(RuntimeError, match="killed while evaluating"):
        train(cfg, eval_hooks=[hook])
    ckpt3 = step_folder(tmp_path / "run" / "checkpoints", 3)
    assert read_eval_pending(ckpt3) == {"step": 3, "mode": "inprocess", "launched": False}
    summary = train(cfg, eval_hooks=[hook])
    assert summary["resumed_from"] == str(ckpt3)
    assert calls == [3, 4, 6]
    rows = read_metrics(tmp_path / "run")
    assert [(r["step"], r["tokens"]) for r in rows if "eval/score" in r] == [(s, s * 4 * 32) for s in (3, 4, 6)]
    assert not (ckpt3 / EVAL_PENDING).exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3, 6]  # 3: must-eval, kept


# ------------------------------------------------------------------------------ launch mode
def test_launch_mode_from_config_one_job_per_checkpoint(data, tmp_path, capsys):
    """eval.mode=launch with eval.launch.mode=cat: a checkpoint and a printed job at each
    evaluation step (2, 4 and the final 6) although checkpoint.every=0 and keep=1; each stays
    pending until its job ran. The job (run here in process) records the same NLL as in-process
    evaluation, with step and tokens, and drops the record; cleanup then removes the checkpoint."""
    run_dir = tmp_path / "run"
    run(bolt_cfg(data, run_dir, "steps=6", "eval.every=2", "eval.mode=launch", "eval.launch.mode=cat",
                 "eval.launch_args=[device=cpu]", "checkpoint.every=0", "checkpoint.keep=1"))
    ckpts = {s: step_folder((run_dir / "checkpoints").resolve(), s) for s in (2, 4, 6)}
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith(shlex.quote(sys.executable) + " -m ")]
    want = {s: shlex.join([sys.executable, "-m", "apps.bolt.evaluation.in_training", "device=cpu", f"ckpt={p}"]) for s, p in ckpts.items()}
    assert commands == [want[2], want[4], want[6]]
    assert steps_of(run_dir) == [2, 4, 6]
    for s, p in ckpts.items():
        record = read_eval_pending(p)
        assert (record["step"], record["mode"], record["launched"], record["command"]) == (s, "launch", True, want[s])
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    assert [(s, rows[s]["tokens"], rows[s]["eval/jobs_launched"]) for s in (2, 4, 6)] == [(s, s * STEP_TOKENS, 1.0) for s in (2, 4, 6)]
    assert "val/heldout/nll_per_token" not in rows[6]  # evaluated by the jobs, not in process

    line = T.main(["device=cpu", f"ckpt={ckpts[4]}"])
    assert (line["step"], line["tokens"], line["eval_id"]) == (4, 4 * STEP_TOKENS, "in_training")
    (saved,) = [json.loads(x) for x in (run_dir / "metrics.eval.jsonl").read_text().splitlines()]
    assert saved == line
    assert read_eval_pending(ckpts[4]) is None and read_eval_pending(ckpts[2]) is not None

    inproc = tmp_path / "inproc"
    run(bolt_cfg(data, inproc, "steps=6", "eval.every=2", "checkpoint.every=0"))
    want_nll = {r["step"]: r["val/heldout/nll_per_token"] for r in read_metrics(inproc) if "val/heldout/nll_per_token" in r}
    assert line["val/heldout/nll_per_token"] == pytest.approx(want_nll[4], rel=1e-6)
    assert [(c["step"], c["tokens"]) for c in T.eval_curve(run_dir)] == [(4, 4 * STEP_TOKENS)]

    CheckpointManager(run_dir / "checkpoints", CheckpointArgs(keep=1), ENV).cleanup()
    assert steps_of(run_dir) == [2, 6]  # 4 was evaluated; 2 still waits for its job


def test_failed_launch_leaves_the_record_unlaunched(tmp_path, monkeypatch):
    from lingua.launch import LaunchArgs

    folder = step_folder(tmp_path / "run" / "checkpoints", 3)
    mark_done(folder)
    mark_eval_pending(folder, {"step": 3, "mode": "launch", "launched": False})

    def no_slurm(args, argv):
        raise FileNotFoundError("sbatch: command not found")

    monkeypatch.setattr("lingua.launch.run", no_slurm)
    hook = T.LaunchEvalHook(LaunchArgs(mode="launch", module=T.EVAL_JOB_MODULE))
    assert hook(None, 3, tmp_path / "run") == {"eval/jobs_launched": 0.0}
    record = read_eval_pending(folder)
    assert record["launched"] is False and record["error"] == "FileNotFoundError: sbatch: command not found"
    assert record["command"].endswith(f"-m apps.bolt.evaluation.in_training ckpt={folder.resolve()}")


def test_cluster_template_evaluates_in_eval_jobs():
    cfg = load_config(BoltTrainArgs, CONFIGS / "train_tinyllama_cpt.yaml", ["dump_dir=x"])
    e = cfg.eval
    assert (e.mode, e.every, e.val_docs_source, e.launch.module, e.launch.gpus) == ("launch", cfg.checkpoint.every, "validation", T.EVAL_JOB_MODULE, 1)
    assert e.tasks == "gsm8k_cot,hendrycks_math_cot" and e.launch_args == ["device=cuda"]
    with pytest.raises(ConfigError, match="one process"):
        load_config(BoltTrainArgs, CONFIGS / "train_tinyllama_cpt.yaml", ["dump_dir=x", "eval.launch.nproc=2"])
