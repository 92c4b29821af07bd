"""harness.limit=N scores a seeded, stratified subset (apps/bolt/evaluation/subset.py): counts per
stratum, determinism, the YAML's stratification fields, and an end-to-end eval on a tiny model
that must score exactly the chosen documents."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.bolt.eval import EvalArgs, eval_id, run
from apps.bolt.evaluation.options import HarnessOptions
from apps.bolt.evaluation.subset import (
    allocate,
    choose,
    describe,
    leaf_tasks,
    plan,
    record,
    samples_arg,
    stratified_indices,
    stratify_fields,
)
from apps.bolt.evaluation.tasks import TaskLibrary
from apps.bolt.formats import SPECIAL_TOKENS
from lingua.generation import Engine
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model

ASSETS = Path(__file__).parent / "assets" / "eval_data"
FIELDS = ["world", "steps"]
N_TEST = 500


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """The synthetic world's eval files at their prepared size (500 test problems)."""
    from apps.bolt.synthetic.tasks import write_eval_files

    root = tmp_path_factory.mktemp("synthetic")
    write_eval_files(root / "eval", n_test=N_TEST, n_dev=1)
    return root


@pytest.fixture(scope="module")
def docs(synthetic_root):
    return [json.loads(x) for x in (synthetic_root / "eval" / "test.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lib(synthetic_root):
    return TaskLibrary(data_root=synthetic_root)


def _stratum(doc):
    return doc["world"], doc["steps"]


def _max_deviation(docs, ids):
    """Largest |count - N * size / total| over the strata of ``docs``."""
    sizes, got = Counter(map(_stratum, docs)), Counter(_stratum(docs[i]) for i in ids)
    return max(abs(got[k] - len(ids) * s / len(docs)) for k, s in sizes.items())


# ----------------------------------------------------------------- allocation
def test_largest_remainder_allocation():
    rng = np.random.default_rng(0)
    assert allocate([5, 3, 2], 5, rng) in ([3, 1, 1], [2, 2, 1])  # quotas 2.5, 1.5, 1.0
    assert allocate([4, 4, 2], 5, rng) == [2, 2, 1]
    assert allocate([7, 1], 0, rng) == [0, 0] and allocate([7, 1], 8, rng) == [7, 1]
    for _ in range(200):
        sizes = rng.integers(0, 40, size=int(rng.integers(1, 12))).tolist()
        if sum(sizes) == 0:
            continue
        n = int(rng.integers(0, sum(sizes) + 1))
        counts = allocate(sizes, n, rng)
        assert sum(counts) == n
        for c, s in zip(counts, sizes):
            quota = n * s / sum(sizes)
            assert np.floor(quota) <= c <= np.ceil(quota) and c <= s
    with pytest.raises(ValueError, match="cannot allocate"):
        allocate([2, 3], 6, rng)


def test_equal_remainders_are_broken_by_the_seed():
    """Ten strata of 3 items, N=5: which five strata get an item depends on the seed only."""
    keys = [k for k in range(10) for _ in range(3)]
    picks = {seed: tuple(stratified_indices(keys, 5, seed)) for seed in range(8)}
    for seed, ids in picks.items():
        assert sorted(Counter(keys[i] for i in ids).values()) == [1] * 5
        assert stratified_indices(keys, 5, seed) == list(ids)
    assert len({tuple(sorted({keys[i] for i in ids})) for ids in picks.values()}) > 1


# ----------------------------------------------------------------- the synthetic test file
@pytest.mark.parametrize("n", [1, 37, 200, 499])
def test_stratified_subset_is_proportional(docs, n):
    ids = choose(docs, n, seed=0, stratify=FIELDS).doc_ids
    assert len(ids) == len(set(ids)) == n and ids == sorted(ids)
    assert _max_deviation(docs, ids) < 1


def test_first_n_is_not_proportional_on_this_file(docs):
    """Why the rule exists: the file is ordered, so its head is a different mix."""
    first = choose(docs, 200, rule="first", stratify=FIELDS)
    assert first.doc_ids == list(range(200)) and first.rule == "first"
    assert _max_deviation(docs, first.doc_ids) > 10


def test_subset_is_seeded(docs):
    a = choose(docs, 50, seed=0, stratify=FIELDS)
    assert choose(docs, 50, seed=0, stratify=FIELDS) == a
    b = choose(docs, 50, seed=1, stratify=FIELDS)
    assert b.doc_ids != a.doc_ids and len(b.doc_ids) == 50 and _max_deviation(docs, b.doc_ids) < 1
    assert (a.rule, a.seed, a.n, a.total, a.strata) == ("stratified", 0, 50, N_TEST, len(set(map(_stratum, docs))))


def test_no_strata_is_a_seeded_uniform_sample(docs):
    picks = [choose(docs, 20, seed=s).doc_ids for s in range(4)]
    assert all(len(p) == 20 and p == sorted(p) for p in picks)
    assert picks[0] == choose(docs, 20, seed=0).doc_ids
    assert len({tuple(p) for p in picks}) == 4 and picks[0] != list(range(20))
    assert choose(docs, 20, seed=0).strata == 1


def test_limits_at_or_above_the_size_and_errors(docs):
    for limit in (None, N_TEST, N_TEST + 7):
        whole = choose(docs, limit, seed=3, stratify=FIELDS)
        assert whole.rule == "all" and whole.doc_ids == list(range(N_TEST)) and whole.n == N_TEST
    with pytest.raises(KeyError, match="'level'"):
        choose(docs, 5, stratify=["world", "level"], task="synthetic_cot")
    with pytest.raises(ValueError, match="subset must be"):
        choose(docs, 5, rule="random")
    for bad in (HarnessOptions(subset="random"), HarnessOptions(limit=0), HarnessOptions(subset_seed=-1)):
        with pytest.raises(ValueError):
            bad.validate()


def test_record_and_samples_argument(docs):
    cut, whole = choose(docs, 9, seed=2, stratify=FIELDS, task="a"), choose(docs[:5], 9, seed=2, stratify=FIELDS, task="b")
    assert samples_arg({"a": cut, "b": whole}) == {"a": cut.doc_ids}  # "b" is scored in full
    assert samples_arg({"b": whole}) is None
    rec = record({"a": cut, "b": whole}, 9, "stratified", 2)
    assert (rec["rule"], rec["seed"], rec["tasks"]["a"]["n"], rec["tasks"]["a"]["doc_ids"]) == ("stratified", 2, 9, cut.doc_ids)
    assert (rec["tasks"]["b"]["rule"], rec["tasks"]["b"]["n"], rec["tasks"]["b"]["doc_ids"]) == ("all", 5, None)
    full = record({"a": choose(docs, None, task="a")}, None, "stratified", 0)
    assert (full["rule"], full["seed"], full["tasks"]["a"]["n"], full["tasks"]["a"]["total"]) == ("all", None, N_TEST, N_TEST)
    assert describe(rec) == ["a: 9 of 500 documents (stratified by world, steps, seed 2)", "b: 5 of 5 documents (all)"]


def test_task_yamls_name_their_strata(lib, docs):
    """The synthetic tasks stratify by world and steps, MATH subjects by level, the others not;
    the plan over lm-eval's own documents equals the choice over the file."""
    assert stratify_fields(*lib.build(["synthetic_cot"])) == FIELDS
    assert stratify_fields(*lib.build(["latent_synthetic_cot"])) == FIELDS
    bench = TaskLibrary(data_root=ASSETS)
    for task in leaf_tasks(bench.build(["hendrycks_math_cot", "latent_hendrycks_math_cot"])):
        assert stratify_fields(task) == ["level"], task.config.task
    for task in leaf_tasks(bench.build(["gsm8k_cot", "latent_gsm8k_cot", "mmlu_stem_cot"])):
        assert stratify_fields(task) == [], task.config.task
    planned = plan(lib.build(["synthetic_cot"]), 37, seed=5)["bolt_synthetic_cot"]
    assert planned.doc_ids == choose(docs, 37, seed=5, stratify=FIELDS).doc_ids


# ----------------------------------------------------------------- end to end
class Recording:
    """An engine that remembers every prompt it was asked to continue."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []
        self.tokenizer, self.max_seq_len = engine.tokenizer, engine.max_seq_len

    def generate(self, prompts, params):
        self.prompts += prompts
        return self.engine.generate(prompts, params)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    model = build_model(TransformerArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seqlen=128, multiple_of=32))
    return Engine(model.eval(), tok)


def _scored(out_dir, seed):
    lines = (out_dir / f"samples_seed{seed}.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_eval_with_limit_scores_exactly_the_chosen_documents(engine, synthetic_root, docs, tmp_path, capsys):
    n = 12
    expected = choose(docs, n, seed=0, stratify=FIELDS).doc_ids
    assert expected != list(range(n))
    backend = Recording(engine)
    cfg = EvalArgs(tasks="synthetic_cot", variant="raw", data_root=str(synthetic_root), out_dir=str(tmp_path / "s"),
                   metrics_file="none", harness=HarnessOptions(limit=n, seeds=[0, 1], max_gen_tokens=4))
    summary = run(cfg, backend=backend)

    for seed in (0, 1):  # every seed scores the same documents
        scored = _scored(tmp_path / "s", seed)
        assert [s["doc_id"] for s in scored] == expected
        assert [s["doc"]["id"] for s in scored] == [docs[i]["id"] for i in expected]
        res = json.loads((tmp_path / "s" / f"results_seed{seed}.json").read_text())
        assert res["n-samples"]["bolt_synthetic_cot"] == {"original": N_TEST, "effective": n}
        assert res["subset"] == summary["subset"]
    # what the model was actually asked: the chosen questions, once per seed
    asked = Counter(next(i for i in range(N_TEST) if p.endswith(docs[i]["query_raw"])) for p in backend.prompts)
    assert asked == {i: 2 for i in expected}

    rec = summary["subset"]
    assert (rec["limit"], rec["rule"], rec["seed"]) == (n, "stratified", 0)
    task = rec["tasks"]["bolt_synthetic_cot"]
    assert (task["n"], task["total"], task["rule"], task["stratify"], task["doc_ids"]) == (n, N_TEST, "stratified", FIELDS, expected)
    assert "documents: bolt_synthetic_cot: 12 of 500 documents (stratified by world, steps, seed 0)" in capsys.readouterr().out

    # the old rule, on request: the first N documents, under another eval id
    first = EvalArgs(**{**cfg.__dict__, "out_dir": str(tmp_path / "f"),
                        "harness": HarnessOptions(limit=n, subset="first", max_gen_tokens=4)})
    assert eval_id(first, "raw") != eval_id(cfg, "raw")
    got = run(first, backend=Recording(engine))
    assert [s["doc_id"] for s in _scored(tmp_path / "f", 0)] == list(range(n))
    assert got["subset"]["rule"] == "first" and got["subset"]["seed"] is None
    assert got["subset"]["tasks"]["bolt_synthetic_cot"]["doc_ids"] == list(range(n))


def test_eval_id_ignores_the_subset_rule_without_a_limit():
    a = EvalArgs(harness=HarnessOptions())
    b = EvalArgs(harness=HarnessOptions(subset="first", subset_seed=4))
    assert eval_id(a, "raw") == eval_id(b, "raw")
    assert eval_id(EvalArgs(harness=HarnessOptions(limit=5)), "raw") != eval_id(EvalArgs(harness=HarnessOptions(limit=5, subset_seed=1)), "raw")
