"""Latent quality against the synthetic oracle: scorer on hand-made cases, the tally's rates and
selector comparison with known weights, corruption, and the arithmetic drills."""

import math

import numpy as np
import pytest

from apps.bolt.latent_quality import ChunkQuality, QualityTally, scorer_for
from apps.bolt.synthetic.corpus import generate_corpus
from apps.bolt.synthetic.corrupt import corrupt_latent, corrupt_records
from apps.bolt.synthetic.facts import generate_drills
from apps.bolt.synthetic.oracle import chunk_latent
from apps.bolt.synthetic.quality import SyntheticScorer, equations, is_true

PREFIX = "Practice set 3\n\nSolve 3x + 7 = 31."
SUFFIX = " So x = 8.\nAva has 4 bags of 5 apples. Ava ends with 20 apples."
TRUTH = "31 - 7 = 24. 24 / 3 = 8. 4 * 5 = 20."


def test_the_oracle_latent_of_the_fixture():
    assert chunk_latent(PREFIX, SUFFIX)[0] == TRUTH


@pytest.mark.parametrize(
    "latent, correct, eqs, true, recalled",
    [
        (TRUTH, True, 3, 3, 3),  # exact
        ("31 - 7 = 24.  24 / 3 = 8.\n4 * 5 = 20.", True, 3, 3, 3),  # whitespace differs only
        ("31 - 7 = 24. 24 / 3 = 8.", False, 2, 2, 2),  # partial: one statement missing
        ("31 - 7 = 25. 25 / 3 = 8. 4 * 5 = 20.", False, 3, 1, 1),  # wrong arithmetic carried on
        ("31 + 7 = 38. 4 * 5 = 20.", False, 2, 2, 1),  # true but wrong steps
        ("", False, 0, 0, 0),  # empty where a thought is needed
        ("<|START_OF_LATENT|> 4 * 5 = 21.", False, 1, 0, 0),  # garbage
    ],
)
def test_scorer_hand_made_cases(latent, correct, eqs, true, recalled):
    q = SyntheticScorer().score(PREFIX, SUFFIX, [latent])
    assert q.has_thought and q.oracle_equations == 3
    assert q.correct == [correct] and q.equations == [eqs] and q.true_equations == [true] and q.recalled == [recalled]


def test_scorer_empty_truth_rewards_an_empty_latent():
    q = SyntheticScorer().score("", "Practice set 3\n\n", ["", "2 + 2 = 4."])
    assert not q.has_thought and q.correct == [True, False]


def test_equation_truth():
    assert [is_true(e) for e in equations("2 + 3 = 5. 9 - 4 = 6. 6 * 7 = 42. 24 / 3 = 8. 7 / 2 = 3.")] == [
        True, False, True, True, False]


def test_tally_selector_comparison_with_known_weights():
    t = QualityTally()
    # chunk 1: samples 0 and 2 right; weights log(0.6), log(0.1), log(0.2), log(0.1) -> SIR expects 0.8
    t.add(ChunkQuality(True, [True, False, True, False], [2, 2, 2, 2], [2, 1, 2, 0], [2, 1, 2, 0], 2),
          [math.log(x) for x in (0.6, 0.1, 0.2, 0.1)], selected=1)
    # chunk 2: all wrong, uniform weights
    t.add(ChunkQuality(True, [False] * 4, [1] * 4, [0] * 4, [0] * 4, 1), [0.0] * 4, selected=3)
    # chunk 3: no thought needed, kept sample empty (right)
    t.add(ChunkQuality(False, [True, False, True, True], [0, 1, 0, 0], [0, 1, 0, 0], [0] * 4, 0), [0.0] * 4, selected=0)
    s = t.summary()
    assert s["chunks"] == 3 and s["chunks_with_thought"] == 2
    assert s["selected_correct"] == 0.0 and s["selected_correct_all"] == pytest.approx(1 / 3)
    sel = s["selector"]
    assert sel["sir"] == pytest.approx(0.8 / 2) and sel["uniform"] == pytest.approx(0.5 / 2)
    assert sel["argmax"] == pytest.approx(1 / 2) and sel["best_of_k"] == pytest.approx(1 / 2)
    assert sel["sample"] == pytest.approx(1 / 2)
    # gap: right mean log(0.6), log(0.2) vs wrong log(0.1), log(0.1)
    gap = (math.log(0.6) + math.log(0.2)) / 2 - math.log(0.1)
    assert s["log_weight_gap"] == pytest.approx(gap) and s["gap_chunks"] == 1
    assert s["right_beats_wrong"] == pytest.approx(1.0)
    assert s["equation_truth"] == pytest.approx(1 / 3) and s["equation_recall"] == pytest.approx(1 / 3)
    # tallies add across shards
    both = QualityTally.from_dict(t.as_dict()) + t
    assert both.summary()["selector"]["sir"] == pytest.approx(sel["sir"]) and both.chunks == 6


def test_tally_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        QualityTally().add(ChunkQuality(True, [True, False]), [0.0], 0)


def test_scorer_registry():
    assert scorer_for("none", [{"source": "synthetic"}]) is None
    assert scorer_for("auto", [{"source": "finemath"}]) is None
    assert scorer_for("auto", [{"source": "synthetic"}])[0] == "synthetic"
    with pytest.raises(ValueError, match="unknown latent quality scorer"):
        scorer_for("nope")


def test_corruption_makes_the_thought_wrong_and_keeps_its_shape():
    scorer = SyntheticScorer()
    for seed in range(30):
        bad = corrupt_latent(TRUTH, np.random.default_rng(seed))
        q = scorer.score(PREFIX, SUFFIX, [bad])
        assert not q.correct[0] and q.equations == [3] and q.true_equations[0] < 3


def test_corruption_rate_and_nesting():
    docs = list(generate_corpus(60, seed=1))
    recs = [{"id": d["id"], "text": d["text"], "chunks": [{"suffix": "x", "latent": p["derivation"]} for p in d["problems"]]}
            for d in docs]
    hit = {}
    for rate in (0.0, 0.3, 0.6, 1.0):
        out = list(corrupt_records(recs, rate, seed=0))
        hit[rate] = {(r["id"], i) for r in out for i, c in enumerate(r["chunks"]) if c["corrupted"]}
    total = sum(len(r["chunks"]) for r in recs)
    assert not hit[0.0] and len(hit[1.0]) == total
    assert abs(len(hit[0.3]) / total - 0.3) < 0.08 and abs(len(hit[0.6]) / total - 0.6) < 0.08
    assert hit[0.3] <= hit[0.6] <= hit[1.0]


def test_drills_are_true_training_facts_and_deterministic():
    a = list(generate_drills(20, seed=3))
    assert a == list(generate_drills(20, seed=3)) and a[5] == next(iter(generate_drills(1, seed=3, start=5)))
    assert a != list(generate_drills(20, seed=4))
    for d in a:
        title, _, body = d["text"].partition("\n\n")
        eqs = equations(body)
        assert title and len(eqs) == d["facts"] == len(body.split("\n")) and 12 <= d["facts"] <= 24
        assert all(is_true(e) for e in eqs)
    with pytest.raises(ValueError):
        list(generate_drills(1, min_facts=5, max_facts=2))



def test_estep_scores_synthetic_chunks_and_merges_the_tally(tmp_path):
    """The E-step calls the world's scorer for synthetic records: each chunk gets its K grades,
    shard tallies add up in the lineage, and a corpus of another source gets none."""
    import json

    import torch

    from apps.bolt import estep
    from apps.bolt.formats import SPECIAL_TOKENS
    from lingua.args import load_config
    from lingua.consolidated import save_consolidated
    from lingua.tokenizer import TokenizerArgs, build_tokenizer
    from lingua.transformer import TransformerArgs, build_model

    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    torch.manual_seed(0)
    model = build_model(TransformerArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, max_seqlen=512))
    ckpt = save_consolidated(model, tok, tmp_path / "model")
    docs = list(generate_corpus(3, seed=0))
    for name, source in (("synth", "synthetic"), ("web", "web")):
        src = tmp_path / name
        src.mkdir()
        (src / "d.jsonl").write_text("".join(json.dumps({**d, "source": source}) + "\n" for d in docs))
        common = [f"ckpt={ckpt}", f"src={src}", "posterior.max_latent_tokens=8", "posterior.num_samples=3",
                  "progress=false", "chunk.units_per_chunk=2"]
        for shard in (0, 1):
            estep.run(load_config(estep.EStepArgs, None, [*common, f"out={tmp_path / name / 'out'}", "action=shard",
                                                          f"shard={shard}", "num_shards=2"]))
        lineage = estep.run(load_config(estep.EStepArgs, None, [*common, f"out={tmp_path / name / 'out'}", "action=merge",
                                                                "num_shards=2"]))
        recs = [json.loads(x) for x in (tmp_path / name / "out" / "latents.chunk.00.jsonl").read_text().splitlines()]
        chunks = [c for r in recs for c in r["chunks"]]
        if source == "web":
            assert "quality" not in lineage and all("correct" not in c for c in chunks)
            continue
        q = lineage["quality"]
        assert q["scorer"] == "synthetic" and q["chunks"] == len(chunks) == lineage["stats"]["chunks"]
        assert q["chunks_with_thought"] == sum(c["has_thought"] for c in chunks) > 0
        assert all(len(c["correct"]) == 3 for c in chunks)
        # a random model writes no right thought where one is needed
        assert q["selected_correct"] == 0.0 and q["selector"]["best_of_k"] == 0.0
