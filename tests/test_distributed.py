"""Distributed training: a 2-process gloo FSDP2 run equals a 1-process run with the same global
batch, and its checkpoint resumes in one process; plus the single-process building blocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lingua.args import ConfigError
from lingua.distributed import DistEnv, DistributedArgs, parallelize
from lingua.trainer import _resolve_shards, train
from lingua.transformer import TransformerArgs, build_model
from tests.test_trainer import DEBUG_YAML, REPO, debug_cfg, overrides, read_metrics, write_corpus

# Relative tolerance between the 1- and 2-process losses. The batches, the loss normalisation
# and the gradient sum are identical; what differs is float summation order (the gradient norm
# is a sum of per-shard partial sums, FSDP sums the two ranks' gradients in a reduce-scatter),
# i.e. ~1e-7 relative per step, which a dozen Adam steps grow to a few 1e-7. 1e-5 leaves margin
# while catching any real mistake (a mean instead of a sum over ranks moves losses by >1e-3).
REL_TOL = 1e-5


def test_two_process_fsdp_run_matches_one_process_and_resumes_in_one(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    # global batch 4 = 2 shards x 2 micro-batches of 1 row: also exercises the no-sync micro-steps
    common = {"distributed.data_shards": 2, "data.batch_size": 1, "grad_acc_steps": 2, "checkpoint.consolidate": False}
    single = train(debug_cfg(corpus, tmp_path / "single", **common))

    run = tmp_path / "fsdp"
    args = [f"config={DEBUG_YAML}", *overrides(corpus, run, stop_at_step=6, **common)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "apps.bolt.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = read_metrics(run)
    assert records[-1]["tokens/source/train"] == 6 * 4 * 32  # gathered over both ranks
    two = {r["step"]: r["loss/train"] for r in records}
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    for step, loss in two.items():
        assert loss == pytest.approx(single["losses"][step], rel=REL_TOL), step
    state = json.loads((run / "checkpoints" / f"{6:010d}" / "train_state.json").read_text())
    assert state["world_size"] == 2 and sorted(state["data"]) == ["0", "1"] and len(state["rng"]) == 2
    assert "[rank1]" in (run / "train.log").read_text()

    # resume the 2-process checkpoint in one process: it reads both data shards itself
    resumed = train(debug_cfg(corpus, run, **{**common, "distributed.data_shards": 0}))
    assert resumed["resumed_from"].endswith(f"{6:010d}") and sorted(resumed["losses"]) == list(range(7, 13))
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(single["losses"][step], rel=REL_TOL), step
    assert resumed["tokens_seen"] == single["tokens_seen"]


def test_data_shards_must_divide_and_match_the_checkpoint():
    assert _resolve_shards(0, 2, None) == 2
    assert _resolve_shards(0, 1, {"data_shards": 4}) == 4
    with pytest.raises(ConfigError, match="not a multiple"):
        _resolve_shards(3, 2, None)
    with pytest.raises(ConfigError, match="written with 2"):
        _resolve_shards(4, 1, {"data_shards": 2})


def test_activation_checkpointing_keeps_loss_and_gradients():
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    margs = TransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seqlen=16)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for ac in (False, True):
        model = parallelize(build_model(margs), DistributedArgs(activation_checkpointing=ac), env)
        model(tokens).logsumexp(-1).mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()  # state-dict keys unchanged by the wrapping
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_cuda_bf16_mixed_precision_debug_run(tmp_path):
    """On a GPU: the debug run trains in bf16 autocast with fp32 master weights; loss falls."""
    corpus = write_corpus(tmp_path / "corpus")
    summary = train(debug_cfg(corpus, tmp_path / "run", **{"checkpoint.consolidate": False}))
    assert summary["losses"][12] < summary["losses"][1] - 1.0
    metrics = read_metrics(tmp_path / "run")
    assert metrics[-1]["memory/max_allocated_gib"] > 0


def test_engine_scores_and_generates_on_an_fsdp_sharded_model(tmp_path):
    """The in-training evaluation hooks score the live (sharded) model: scores and greedy tokens
    must equal the unsharded model's (FSDP gathers the weights in its forward hooks)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "helpers" / "fsdp_score.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("greedy same True") == 2
