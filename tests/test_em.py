"""The EM driver end to end at toy size: stages, computed baseline budgets, report, skipping,
resume after a crash, and refusal to reuse a model whose inputs were redone."""

import json
from pathlib import Path

import pytest

from apps.bolt import em
from lingua.args import load_config

TINY = [
    "name=tiny",
    "local.jobs=1",  # stages one after another in this process (tests/test_em_parallel.py: jobs=2)
    "warmstart_tokens=4096",
    "mstep_tokens=6144",
    "iterations=1",
    "final_estep=false",
    "base.tokens=0",  # no base model (tests/test_base_model.py covers it)
    "baselines=[raw_token_match, raw_flops_match]",
    "estep_docs=4",
    "eval_val_docs=4",
    "eval_elbo_docs=1",
    'prepare.overrides=[source.num_docs=200, "subsets=[{name: warmstart, tokens: 12000}, {name: bootstrap, tokens: 20000}]", '
    '"extra=[{name: eval, builder: apps.bolt.synthetic.tasks:write_eval_files, options: {n_test: 8, n_dev: 2, seed: 0}}]"]',
    "train.overrides=[model.dim=64, model.n_layers=2, model.n_heads=4, model.n_kv_heads=2, model.hidden_dim=128, "
    "data.batch_size=4, data.seq_len=128, log_freq=5, data.prefetch=false]",
    'estep.overrides=[posterior.num_samples=2, "posterior.elbo_samples=[1,2]", posterior.max_latent_tokens=16, progress=false]',
    "eval.overrides=[harness.limit=3, harness.max_gen_tokens=16]",
]


def _cfg(tmp_path, *extra):
    return load_config(
        em.EMArgs, "apps/bolt/configs/em_synthetic.yaml",
        [*TINY, f"dump_dir={tmp_path / 'em'}", f"tokenizer_cache={tmp_path / 'tok'}", *extra],
    )


def _stages(root: Path) -> list[str]:
    return [json.loads(x)["stage"] for x in (root / "stages.jsonl").read_text().split("\n") if x]


@pytest.fixture
def em_run(tiny_em_run):
    return tiny_em_run  # tests/conftest.py: one run per session


def test_em_runs_every_stage_and_reports(em_run):
    tmp, cfg, result = em_run
    root = Path(cfg.dump_dir)
    assert _stages(root) == [
        "prepare", "subset:bootstrap_first4", "teacher", "train:warmstart_t0", "eval:warmstart_t0", "estep:iter1", "train:iter1_t0",
        "eval:iter1_t0", "train:raw_token_match_t0", "eval:raw_token_match_t0", "train:raw_flops_match_t0",
        "eval:raw_flops_match_t0",
    ]
    groups = [(ln["group"], ln["iteration"], ln["k"]) for ln in result["summary"]]
    assert groups == [("warmstart", 0, None), ("bootstrap", 1, 2), ("raw_token_match", None, None),
                      ("raw_flops_match", None, None)]
    for ln in result["summary"]:
        assert 0.0 <= ln["accuracy"] <= 1.0 and ln["val_nll_per_token"] > 0
        # the ELBO (1, 2, 4 samples, whatever the E-step's K) is reported for latent models only
        assert ("elbo_4_per_token" in ln) == ("elbo_1_per_token" in ln) == (ln["group"] in ("warmstart", "bootstrap"))
    # budgets are computed from the measured raw share of the latent data, not hand-set
    b = result["baseline_budgets"]
    assert 0.05 < b["raw_fraction"] < 0.95
    assert b["budgets"] == {"raw_token_match": int(6144 * b["raw_fraction"]), "raw_flops_match": 6144}
    seen = {r["run"]: json.loads((root / "runs" / r["run"] / "final_consolidated.json").read_text()) for r in result["rows"]}
    steps = {k: v["summary"]["step"] for k, v in seen.items()}
    assert steps["raw_flops_match_t0"] == 6144 // (4 * 128) == steps["iter1_t0"]
    assert steps["raw_token_match_t0"] == int(6144 * b["raw_fraction"]) // (4 * 128)
    assert (root / "accuracy.png").stat().st_size > 1000 and (root / "bootstrap.png").stat().st_size > 1000
    assert "| bootstrap" in (root / "results.md").read_text()
    # the E-step used the warmstart model, the lineage says so
    lineage = json.loads((root / "data" / "iter1_latents" / "lineage.json").read_text())
    assert lineage["model"] == str(seen["warmstart_t0"]["consolidated"]) and lineage["num_samples"] == 2
    # estep_docs=4: the E-step and the raw baselines read the same 4 documents (the first 4 of
    # the bootstrap corpus), so the M-step and the baselines see the same raw text
    first = [json.loads(x) for x in next((root / "data" / "bootstrap").glob("*.jsonl")).read_text().splitlines()[:4]]
    subset = root / "data" / "bootstrap_first4"
    assert [json.loads(x) for x in next(subset.glob("*.jsonl")).read_text().splitlines()] == first
    assert lineage["docs"] == 4 and lineage["src"] == str(subset)
    latents = [json.loads(x) for x in (root / "data" / "iter1_latents" / "latents.chunk.00.jsonl").read_text().splitlines()]
    assert [d["text"] for d in latents] == [d["text"] for d in first]
    for b in ("raw_token_match_t0", "raw_flops_match_t0"):
        assert seen[b]["inputs"]["data"] == em._stamp(subset)
        assert list(seen[b]["summary"]["tokens_seen"]) == ["bootstrap_first4"]


def test_rerun_skips_everything_and_resumes_after_a_crash(em_run, monkeypatch):
    tmp, cfg, first = em_run
    root = Path(cfg.dump_dir)
    n = len(_stages(root))
    again = em.run(cfg)
    assert len(_stages(root)) == n  # nothing redone
    assert again["summary"] == first["summary"]

    # a crash in a late stage: earlier stages are not redone when the run is restarted
    import shutil

    from apps.bolt import em_eval

    shutil.rmtree(root / "evals" / "raw_flops_match_t0")
    real = em_eval.evaluate_model

    def boom(cfg):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(em_eval, "evaluate_model", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        em.run(cfg)
    monkeypatch.setattr(em_eval, "evaluate_model", real)
    em.run(cfg)
    assert _stages(root)[n:] == ["eval:raw_flops_match_t0"]


def test_models_are_not_reused_when_their_inputs_were_redone(em_run):
    tmp, cfg, _ = em_run
    marker = Path(cfg.dump_dir) / "data" / "iter1_latents" / "COMPLETE"
    saved = marker.read_text()
    marker.write_text(json.dumps({"docs": 4, "recipe": "something-else"}))
    try:
        with pytest.raises(RuntimeError, match="trained on other inputs"):
            em.run(cfg)
    finally:
        marker.write_text(saved)


def test_em_config_errors(tmp_path):
    from lingua.args import ConfigError

    with pytest.raises(ConfigError, match="unknown baselines"):
        _cfg(tmp_path, "baselines=[raw_repeat]")
    with pytest.raises(ConfigError, match="mstep_init"):
        _cfg(tmp_path, "mstep_init=last")


def test_finetune_eval_adds_its_columns(em_run):
    """``finetune_eval``: every model is finetuned and sample-evaluated; its accuracy (binomial SE
    for one trial) joins the model's row and the table."""
    from apps.bolt.em_report import aggregate, format_table

    tmp, cfg, result = em_run
    cfg2 = _cfg(tmp, f"dump_dir={cfg.dump_dir}", "finetune_eval=true", "finetune.overrides=[data.synthetic_train=40, "
                "data.synthetic_test=6, train.epochs=1, eval.n=2, eval.max_new_tokens=24, eval.context_window=0]")
    d = em.EMDriver(cfg2)
    d.check_stages()
    row = next(r for r in result["rows"] if r["run"] == "iter1_t0")
    ck = Path(json.loads((Path(cfg.dump_dir) / "runs" / "iter1_t0" / "final_consolidated.json").read_text())["consolidated"])
    got = d.finetune_eval("iter1_t0", ck)
    assert got["finetune_n_problems"] == 6 and got["finetune_samples_per_problem"] == 2
    assert 0.0 <= got["finetune_accuracy"] <= 1.0 and {"finetune_pass@2", "finetune_maj@2"} <= set(got)
    assert d.finetune_eval("iter1_t0", ck) == got  # complete: read back, not redone
    assert _stages(Path(cfg.dump_dir)).count("finetune:iter1_t0") == 1
    lines = aggregate([{**row, **got}])
    assert lines[0]["finetune_accuracy"] == got["finetune_accuracy"]
    assert lines[0]["finetune_accuracy_se"] == pytest.approx(got["finetune_accuracy_se"])
    assert "finetuned accuracy" in format_table(lines) and "finetuned accuracy" not in format_table(aggregate([row]))


def test_model_eval_computes_every_metric_with_the_configured_backend(em_run, monkeypatch, tmp_path):
    """em_eval builds one backend from ``tasks.backend`` (vLLM in the cluster configs) and takes
    accuracy, NLL and ELBO from it; here the vLLM request is recorded and served by the engine,
    so the metrics must equal the driver's own evaluation of the same model."""
    import dataclasses

    from apps.bolt import em_eval
    from lingua import backends

    _, cfg, _ = em_run
    done = Path(cfg.dump_dir) / "evals" / "iter1_t0"
    saved = load_config(em_eval.ModelEvalArgs, done / "config.yaml")
    asked, real = [], backends.build_backend

    def recording(kind, ckpt, **kw):
        asked.append((kind, str(ckpt)))
        return real("engine", ckpt, **kw)

    monkeypatch.setattr(backends, "build_backend", recording)
    tasks = dataclasses.replace(saved.tasks, backend="vllm", out_dir="")
    again = em_eval.evaluate_model(dataclasses.replace(saved, tasks=tasks, out=str(tmp_path / "again")))
    assert asked == [("vllm", saved.ckpt)]  # one backend, the configured kind, for every metric
    first = json.loads((done / em_eval.RESULT).read_text())
    for key in (em_eval.ACCURACY, em_eval.NLL, "elbo_1_per_token", "elbo_2_per_token"):
        assert again[key] == pytest.approx(first[key], rel=1e-6), key


def test_vllm_stages_need_vllm_installed_before_anything_runs(monkeypatch, tmp_path):
    import importlib.util

    from lingua.args import ConfigError
    from lingua.backends import require_installed

    require_installed({"estep.backend": "engine", "eval.backend": "engine"})  # nothing to check
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    require_installed({"estep.backend": "engine"})
    # the cluster config asks vLLM for both: the driver stops before its first stage
    cfg = load_config(em.EMArgs, "apps/bolt/configs/em_finemath.yaml", [f"dump_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"estep.backend, eval.backend: vllm, which is not installed.*"
                                          r"estep.overrides=\[backend=engine\] eval.overrides=\[backend=engine\]"):
        em.run(cfg)
    assert not (tmp_path / "config.yaml").exists()
