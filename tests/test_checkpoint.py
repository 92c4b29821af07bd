"""Checkpoint folders: exact save/load, RNG state, keep-last-k cleanup, incomplete folders, a
kill -9 in the middle of a write, and consolidation."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lingua.args import to_dict
from lingua.checkpoint import (
    PAUSE_ENV,
    CheckpointArgs,
    CheckpointManager,
    capture_rng,
    consolidate,
    latest_checkpoint,
    list_checkpoints,
    restore_rng,
    step_folder,
)
from lingua.consolidated import load_consolidated
from lingua.distributed import DistEnv
from lingua.io import is_done, mark_done
from lingua.optim import OptimArgs, build_optimizer
from lingua.tokenizer import ByteTokenizer
from lingua.trainer import train
from lingua.transformer import TransformerArgs, build_model
from tests.test_trainer import DEBUG_YAML, REPO, debug_cfg, overrides, read_metrics, write_corpus

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def fake_folder(root: Path, step: int, complete: bool = True) -> Path:
    folder = step_folder(root, step)
    folder.mkdir(parents=True)
    if complete:
        mark_done(folder)
    return folder


def test_latest_ignores_incomplete_and_cleanup_keeps_last_k_plus_keep_steps(tmp_path):
    for step in (1, 3, 4, 5, 6):
        fake_folder(tmp_path, step)
    fake_folder(tmp_path, 2, complete=False)  # debris of an old crash
    fake_folder(tmp_path, 7, complete=False)  # newest, interrupted
    (tmp_path / "notes").mkdir()  # not a step folder: never touched
    assert latest_checkpoint(tmp_path) == step_folder(tmp_path, 6)
    manager = CheckpointManager(tmp_path, CheckpointArgs(keep=2, keep_steps=[3]), ENV)
    removed = manager.cleanup()
    assert sorted(p.name for p in removed) == [f"{s:010d}" for s in (1, 2, 4)]
    assert [s for s, _ in list_checkpoints(tmp_path, complete_only=False)] == [3, 5, 6, 7]
    assert (tmp_path / "notes").is_dir()
    assert CheckpointManager(tmp_path, CheckpointArgs(resume=False), ENV).latest() is None
    assert CheckpointManager(tmp_path, CheckpointArgs(keep=0), ENV).cleanup() == []  # keep=0 keeps all


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(capture_rng()))
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    restore_rng(state)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


def _tiny_model_and_optimizer():
    model = build_model(TransformerArgs(dim=32, n_layers=1, n_heads=2, vocab_size=258, max_seqlen=16))
    return model, build_optimizer(model, OptimArgs(lr=1e-2))


def test_save_then_load_restores_model_and_optimizer_exactly(tmp_path):
    model, opt = _tiny_model_and_optimizer()
    for _ in range(2):
        model(torch.randint(0, 258, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    manager = CheckpointManager(tmp_path, CheckpointArgs(keep=3), ENV)
    state = {"step": 2, "data": {"0": {"pos": 5}}}
    folder = manager.save(2, model, opt, state, "name: x\n", to_dict(model.args))
    assert is_done(folder) and (folder / ".metadata").is_file()
    assert json.loads((folder / "params.json").read_text())["dim"] == 32
    assert (folder / "config.yaml").read_text() == "name: x\n"

    model2, opt2 = _tiny_model_and_optimizer()
    torch.manual_seed(99)
    model2.init_weights(seed=99)
    assert manager.load(folder, model2, opt2) == state
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name]), (k, name)

    out = consolidate(folder, ByteTokenizer())
    loaded, tok = load_consolidated(out)
    assert tok.vocab_size == 258 and json.loads((out / "extra.json").read_text())["step"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        manager.load(fake_folder(tmp_path, 9, complete=False), model2, opt2)


def test_kill_9_during_checkpoint_write_resumes_from_previous_complete(tmp_path):
    """A run killed after the step-6 shards and train state were written, before the marker:
    resuming ignores that folder, continues from step 3 and reproduces the uninterrupted run."""
    corpus = write_corpus(tmp_path / "corpus")
    reference = train(debug_cfg(corpus, tmp_path / "ref", **{"checkpoint.consolidate": False}))

    run = tmp_path / "killed"
    args = [f"config={DEBUG_YAML}", *overrides(corpus, run, **{"checkpoint.consolidate": False})]
    env = {**os.environ, PAUSE_ENV: "6:300", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "apps.bolt.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    step6 = step_folder(run / "checkpoints", 6)
    deadline = time.monotonic() + 120
    try:
        while not (step6 / "train_state.json").is_file():
            assert proc.poll() is None, "training exited before reaching the paused checkpoint"
            assert time.monotonic() < deadline, "timed out waiting for the step-6 checkpoint write"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not is_done(step6) and (step6 / ".metadata").is_file()
    assert latest_checkpoint(run / "checkpoints") == step_folder(run / "checkpoints", 3)

    resumed = train(debug_cfg(corpus, run, **{"checkpoint.consolidate": False}))
    assert resumed["resumed_from"] == str(step_folder(run / "checkpoints", 3))
    for step in range(4, 13):
        assert resumed["losses"][step] == reference["losses"][step], step
    assert is_done(step6)  # rewritten cleanly
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))  # steps 4-6 not logged twice
