"""The data-condition comparison end to end at toy size: every condition trains the same budget,
ratios and effective raw tokens are measured from the data, no evaluation problem is in any
condition's data, and the driver resumes after it was stopped between stages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from apps.bolt import compare, compare_data
from lingua.args import load_config
from lingua.io import read_jsonl

TOKENS, PER_STEP = 4096, 4 * 128
TINY = [
    "trials=1", f"train_tokens={TOKENS}", "eval_tokens=[2048]", "base.tokens=0", "local.jobs=1",
    'prepare.overrides=[source.num_docs=200, "subsets=[{name: warmstart, tokens: 8000}, {name: bootstrap, tokens: 2000}]", '
    '"extra=[{name: eval, builder: apps.bolt.synthetic.tasks:write_eval_files, options: {n_test: 8, n_dev: 2, seed: 0}}, '
    '{name: fresh, source: {kind: synthetic, generator: apps.bolt.synthetic.corpus:generate_corpus, num_docs: 40, seed: 1}}]"]',
    "train.overrides=[model.dim=64, model.n_layers=2, model.n_heads=4, model.n_kv_heads=2, model.hidden_dim=128, "
    "data.batch_size=4, data.seq_len=128, log_freq=5, data.prefetch=false, eval.harness.limit=3, eval.harness.max_gen_tokens=16]",
]


def _cfg(tmp_path: Path, *extra: str) -> compare.CompareArgs:
    return load_config(compare.CompareArgs, "apps/bolt/configs/compare_synthetic.yaml",
                       [*TINY, f"dump_dir={tmp_path / 'cmp'}", f"tokenizer_cache={tmp_path / 'tok'}", *extra])


def _stages(root: Path) -> list[str]:
    return [json.loads(x)["stage"] for x in (root / "stages.jsonl").read_text().splitlines() if x]


@pytest.fixture(scope="module")
def stopped_then_resumed(tmp_path_factory):
    """A run stopped before its third training run (the first two are complete), then rerun."""
    tmp = tmp_path_factory.mktemp("compare")
    cfg = _cfg(tmp)
    calls = []
    original = compare.CompareDriver.train

    def train(self, condition, trial):
        calls.append(condition)
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped between stages")
        return original(self, condition, trial)

    compare.CompareDriver.train = train
    try:
        with pytest.raises(KeyboardInterrupt):
            compare.run(cfg)
    finally:
        compare.CompareDriver.train = original
    before = _stages(Path(cfg.dump_dir))
    return cfg, before, compare.run(cfg)


def test_resume_skips_every_complete_stage(stopped_then_resumed):
    cfg, before, _ = stopped_then_resumed
    assert before == ["prepare", "teacher:latent_thoughts", "teacher:wrap_orig", "teacher:wrap_cot", "scan",
                      "train:latent_thoughts_t0", "train:raw_repeat_t0"]
    after = _stages(Path(cfg.dump_dir))
    assert after[: len(before)] == before  # nothing redone
    assert after[len(before):] == ["train:raw_fresh_t0", "train:wrap_orig_t0", "train:wrap_cot_t0",
                                   "eval:raw_repeat_t0:synthetic_inline_cot", "eval:raw_fresh_t0:synthetic_inline_cot",
                                   "eval:wrap_orig_t0:synthetic_inline_cot", "eval:wrap_cot_t0:synthetic_cot"]


def test_final_models_on_the_other_prompt(stopped_then_resumed):
    cfg, _, result = stopped_then_resumed
    got = {(o["condition"], o["tasks"]) for o in result["other_prompts"]}
    assert got == {(c, t) for c, t in cfg.final_tasks.items()}
    assert all(0.0 <= o["accuracy"] <= 1.0 and o["trials"] == 1 for o in result["other_prompts"])
    saved = json.loads((Path(cfg.dump_dir) / "evals" / "wrap_cot_t0-synthetic_cot" / "summary.json").read_text())
    assert saved["variant"] == "raw" and list(saved["summary"]) == ["synthetic_cot/exact_match/answer"]
    assert "another prompt" in (Path(cfg.dump_dir) / "results.md").read_text()


def test_every_condition_trains_the_same_budget_and_is_evaluated_at_each_checkpoint(stopped_then_resumed):
    cfg, _, result = stopped_then_resumed
    root = Path(cfg.dump_dir)
    for cond in cfg.conditions:
        run = root / "runs" / f"{cond}_t0"
        summary = json.loads((run / "final_consolidated.json").read_text())["summary"]
        assert summary["step"] == TOKENS // PER_STEP
        evals = [ln["step"] for ln in read_jsonl(run / "metrics.eval.jsonl")]
        assert evals == [2048 // PER_STEP, TOKENS // PER_STEP]
    tokens = {(r["condition"], r["train_tokens"]) for r in result["rows"]}
    assert tokens == {(c, t) for c in cfg.conditions for t in (2048, TOKENS)}  # 4096 tokens: exactly 8 steps
    # wrap_cot is asked with its own chain-of-thought prompt, the latent model with the latent variant
    saved = json.loads(next((root / "runs" / "wrap_cot_t0" / "evals").glob("*/*/results_seed0.json")).read_text())
    assert "bolt_synthetic_inline_cot" in json.dumps(saved)
    latent = json.loads(next((root / "runs" / "latent_thoughts_t0" / "evals").glob("*/*/results_seed0.json")).read_text())
    assert "bolt_latent_synthetic_cot" in json.dumps(latent)


def test_ratios_and_effective_raw_tokens_are_measured_from_the_data(stopped_then_resumed):
    cfg, _, result = stopped_then_resumed
    data = result["data"]["conditions"]
    assert data["raw_repeat"]["ratio"] == data["raw_fresh"]["ratio"] == 1.0
    # thoughts and written-out derivations lengthen the text; the numbers are the data's own
    assert 1.3 < data["latent_thoughts"]["ratio"] < 4 and data["wrap_cot"]["ratio"] > data["wrap_orig"]["ratio"] > 1.0
    for c in ("latent_thoughts", "raw_repeat", "wrap_orig", "wrap_cot"):  # built from the same documents
        assert data[c]["unique_raw_tokens"] == data["raw_repeat"]["raw_tokens"]
        assert data[c]["packed_tokens"] == pytest.approx(data[c]["ratio"] * data[c]["raw_tokens"])
    assert data["wrap_orig"]["raw_tokens"] == 5 * data["raw_repeat"]["raw_tokens"]  # 5 repeats, 4 for CoT
    assert data["wrap_cot"]["raw_tokens"] == 4 * data["raw_repeat"]["raw_tokens"]
    rows = list(csv.DictReader(open(Path(cfg.dump_dir) / "conditions.csv")))
    for row in rows:
        ratio = data[row["condition"]]["ratio"]
        assert float(row["effective_raw_tokens"]) == pytest.approx(float(row["train_tokens"]) / ratio)
    assert (Path(cfg.dump_dir) / "compare.png").stat().st_size > 1000
    assert "| wrap_cot |" in (Path(cfg.dump_dir) / "results.md").read_text()


def test_no_evaluation_problem_in_any_condition_and_a_planted_one_is_found(stopped_then_resumed, tmp_path):
    cfg, _, result = stopped_then_resumed
    for cond, d in result["data"]["conditions"].items():
        assert d["leakage"]["statements"] > 0 and d["leakage"]["eval_problems_found"] == 0, cond
    data = Path(cfg.dump_dir) / "data"
    scan = compare_data.synthetic_leakage(data / "eval")
    item = next(read_jsonl(data / "eval" / "test.jsonl"))
    assert scan(f"Homework\n\n{item['question']} {item['answer_sentence']}") == (1, [item["id"]])
    # ... in every paraphrase style too
    from apps.bolt.synthetic.paraphrase import STYLES, find_statements, render
    from apps.bolt.synthetic.corpus import parse_question

    problem = parse_question(item["question"])
    for style in STYLES:
        assert scan(render(problem, style, problem.derivation))[1] == [item["id"]]
    assert len(find_statements(render(problem, "qa"))) == 1


def test_bad_settings_fail_before_any_stage(tmp_path):
    with pytest.raises(ValueError, match="conditions"):
        _cfg(tmp_path, "conditions=[latent_thoughts, raw_twice]").validate()
    with pytest.raises(ValueError, match="eval_tokens"):
        _cfg(tmp_path, f"eval_tokens=[{TOKENS}]").validate()
    with pytest.raises(Exception, match="teachers.wrap_orig"):
        compare.CompareDriver(_cfg(tmp_path, "teachers.wrap_orig.overrides=[num_repeats=0]")).check()
    assert not (tmp_path / "cmp").exists()


def test_labels_name_conditions_in_the_csv(tmp_path):
    from apps.bolt.compare_report import write_csv

    rows = [{"condition": "latent_thoughts", "train_tokens": 10, "raw_tokens": 5, "effective_raw_tokens": 5.0,
             "accuracy": 0.5, "accuracy_se": None, "trials": 1}]
    write_csv(tmp_path / "c.csv", rows, {"latent_thoughts": "latent (1-sentence chunks)"})
    (row,) = csv.DictReader(open(tmp_path / "c.csv"))
    assert row["condition"] == "latent (1-sentence chunks)" and row["accuracy_se"] == ""
    assert _cfg(tmp_path, "labels.latent_thoughts=x").labels == {"latent_thoughts": "x"}
    with pytest.raises(ValueError, match="labels"):
        _cfg(tmp_path, "labels.latent=x").validate()
