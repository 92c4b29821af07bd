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


def test_every_stage_config_is_checked_before_the_first_stage(tmp_path):
    """A bad stage setting fails in seconds, before prepare or any training (it used to fail when
    its stage started: a K ablation of 0 after the warmstart had trained)."""
    from lingua.args import ConfigError

    with pytest.raises(ConfigError, match="k_ablation"):
        _cfg(tmp_path, "k_ablation=[2,0]")
    cases = {
        "train.overrides=[optim.lrr=0.1]": "train stage .*optim.lrr",
        "estep.overrides=[posterior.selection=best]": "estep stage .*selection",
        "eval.overrides=[harness.nope=1]": "eval stage .*harness.nope",
        "base.overrides=[model.dimm=8]": "train stage .*model.dimm",
    }
    for override, message in cases.items():
        cfg = _cfg(tmp_path, override, f"dump_dir={tmp_path / 'em'}", "base.tokens=1000")
        with pytest.raises(ConfigError, match=message):
            em.run(cfg)
        assert not (tmp_path / "em" / "data").exists(), override  # nothing ran


def test_stage_configs_are_derived_with_typed_values(tmp_path):
    d = em.EMDriver(_cfg(tmp_path, "k_ablation=[3]", "estep.overrides=[posterior.num_samples=4]"))
    d.tokenizer_changes = {"tokenizer.name": "bytes", "tokenizer.path": None, "tokenizer.special_tokens": ["<a>", "<b>"]}
    t = d.train_config("iter1_t1", {"iter1_latents": 0.5, "x,y": 0.5}, "random", 1234, 1, "some/init")
    assert (t.name, t.num_tokens, t.seed, t.data.seed, t.model.seed, t.layout.name) == ("iter1_t1", 1234, 1, 1, 1, "random")
    assert dict(t.data.sources) == {"iter1_latents": 0.5, "x,y": 0.5}  # a name no dotlist could carry
    assert t.tokenizer.special_tokens == ["<a>", "<b>"] and t.checkpoint.init_ckpt_path == "some/init"
    e = d.estep_config("iter1_k3", "CKPT", 3, {"limit_docs": 7})
    assert (e.posterior.num_samples, e.posterior.elbo_samples, e.limit_docs, e.ckpt) == (3, [1, 2], 7, "CKPT")
    assert e.out == str(d.data / "iter1_k3_latents")
    k_main = d.estep_config("iter1", "CKPT").posterior.num_samples
    assert k_main == 4 and d.loaded("estep") is d.loaded("estep") and d.loaded("estep").posterior.num_samples == k_main  # loaded once, not changed


def test_results_table_has_a_column_per_benchmark_with_n_and_se():
    from apps.bolt.em_report import aggregate, binomial_se, format_table

    def row(trial, gsm, math_):
        return {"group": "bootstrap", "iteration": 1, "k": 4, "trial": trial, "run": f"iter1_t{trial}",
                "accuracy": (gsm + math_) / 2, "accuracy_by_task": {"gsm8k_cot": gsm, "hendrycks_math_cot": math_},
                "n_problems": 300, "n_by_task": {"latent_gsm8k_cot": 100, "latent_hendrycks_math_cot": 200}}

    (one,) = aggregate([row(0, 0.30, 0.10)])
    g, m = one["accuracy_by_task"]["gsm8k_cot"], one["accuracy_by_task"]["hendrycks_math_cot"]
    assert (g["n"], m["n"]) == (100, 200)
    assert g["accuracy_se"] == pytest.approx(binomial_se(0.30, 100)) and m["accuracy_se"] == pytest.approx(binomial_se(0.10, 200))
    table = format_table([one])
    assert "gsm8k_cot (n)" in table and f"0.300 ± {binomial_se(0.30, 100):.3f} (100)" in table
    (three,) = aggregate([row(0, 0.30, 0.10), row(1, 0.34, 0.12), row(2, 0.32, 0.14)])
    g = three["accuracy_by_task"]["gsm8k_cot"]
    assert g["accuracy"] == pytest.approx(0.32) and g["accuracy_se"] == pytest.approx(0.02 / 3**0.5)  # std 0.02 over 3 trials
    single = aggregate([{**row(0, 0.3, 0.1), "accuracy_by_task": {"gsm8k_cot": 0.3}}])[0]
    assert "accuracy_by_task" not in single  # one benchmark: the accuracy column is it
