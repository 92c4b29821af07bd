"""EM driver options: one warmstart for several trials, budgets computed from the data, and the
held-out ELBO on the E-step's chunking."""

import json
from pathlib import Path

import pytest

from apps.bolt import em
from apps.bolt.chunking import ChunkArgs, chunk_text
from lingua.args import load_config
from tests.test_em import TINY, _cfg


def test_one_warmstart_for_two_trials_and_epoch_budgets(tmp_path):
    cfg = _cfg(tmp_path, "trials=2", "warmstart_trials=1", "mstep_epochs=1.5", "baselines=[raw_token_match]")
    result = em.run(cfg)
    root = Path(cfg.dump_dir)
    stages = [json.loads(x)["stage"] for x in (root / "stages.jsonl").read_text().splitlines()]
    assert "train:warmstart_t0" in stages and "train:warmstart_t1" not in stages
    assert {"train:iter1_t0", "train:iter1_t1"} <= set(stages)
    groups = {(ln["group"], ln["trials"]) for ln in result["summary"]}
    assert ("warmstart", 1) in groups and ("bootstrap", 2) in groups
    # the M-step budget is 1.5 passes over the measured latent data; the token-matched baseline
    # sees the same passes over the raw text
    budgets = json.loads((root / "budgets.json").read_text())["iter1_latents"]
    assert budgets["tokens"] == round(1.5 * budgets["packed_tokens_per_epoch"])
    for t in (0, 1):
        state = json.loads(max((root / "runs" / f"iter1_t{t}" / "checkpoints").glob("*/train_state.json")).read_text())
        assert state["scheduler"]["total_steps"] == budgets["tokens"] // (4 * 128)  # batch 4 x 128 (TINY)
    base = json.loads((root / "baseline_budgets.json").read_text())
    assert base["budgets"]["raw_flops_match"] == budgets["tokens"]
    assert base["budgets"]["raw_token_match"] == int(budgets["tokens"] * base["raw_fraction"])


def test_warmstart_trials_is_validated(tmp_path):
    with pytest.raises(Exception, match="warmstart_trials"):
        _cfg(tmp_path, "trials=2", "warmstart_trials=3")


def test_held_out_elbo_uses_the_estep_chunking(tmp_path):
    cfg = load_config(em.EMArgs, "apps/bolt/configs/em_synthetic.yaml", [*TINY, f"dump_dir={tmp_path / 'em'}"])
    d = em.EMDriver(cfg)
    ecfg = d.eval_config("x", tmp_path / "ckpt", latent=True)
    est = d.estep_config("x", tmp_path / "ckpt")
    assert ecfg.chunk == est.chunk and ecfg.chunk.units_per_chunk == 2 and ecfg.chunk.prefix_chunks == 3
    text = "Practice set 1\n\nSolve 3x + 7 = 31. So x = 8.\nFind 60% of 45. That is 27.\nSolve x / 2 + 3 = 7. So x = 8."
    assert len(chunk_text(text, ecfg.chunk)) > len(chunk_text(text, ChunkArgs(random=False, all_prefix=True)))
