"""The embedded synthetic world: corpus, oracle teacher, evaluation tasks, tokenizer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.bolt.chunking import ChunkArgs, chunk_text
from apps.bolt.formats import SPECIAL_TOKENS
from apps.bolt.synthetic import tokenizer as synth_tokenizer
from apps.bolt.synthetic.arith import Calc, Pattern, Reject
from apps.bolt.synthetic.corpus import WorldArgs, find_problems, generate_corpus, make_world_args, parse_question, split_of
from apps.bolt.synthetic.oracle import OracleTeacher, chunk_latent, oracle_records
from apps.bolt.synthetic.stats import corpus_stats
from apps.bolt.synthetic.tasks import (
    DESCRIPTION,
    build_prompt,
    extract_answer,
    generate_eval_problems,
    grade,
    stop_strings,
    write_eval_files,
)
from apps.bolt.synthetic.templates import WORLDS
from apps.bolt.teachers.base import LatentRequest, build_teacher
from lingua.io import is_done, read_jsonl
from lingua.tokenizer import build_tokenizer

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


# --- building blocks ----------------------------------------------------------------------------
def test_pattern_renders_and_parses_the_same_grammar():
    p = Pattern("Solve {a}{v} + {b} = {c}{v} + {d}.", v="var")
    text = p.render({"a": 6, "v": "y", "b": 8, "c": 2, "d": 24})
    assert text == "Solve 6y + 8 = 2y + 24."
    assert p.fullmatch(text) == {"a": 6, "v": "y", "b": 8, "c": 2, "d": 24}
    assert p.fullmatch("Solve 6y + 8 = 2x + 24.") is None  # the variable must repeat
    assert p.fullmatch("Solve 06y + 8 = 2y + 24.") is None  # not a number this world writes
    assert p.fullmatch(text + " extra") is None


def test_calc_records_steps_and_rejects_what_the_world_cannot_state():
    calc = Calc(limit=99)
    assert calc.sub(calc.mul(4, 7), 5) == 23
    assert [s.text() for s in calc.steps] == ["4 * 7 = 28.", "28 - 5 = 23."]
    for bad in (lambda: calc.div(7, 2), lambda: calc.sub(3, 5), lambda: calc.mul(10, 10), lambda: calc.div(4, 0)):
        with pytest.raises(Reject):
            bad()
    assert Calc(limit=None).mul(10, 10) == 100


def test_world_args_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown"):
        make_world_args(worlds=["nope"])
    with pytest.raises(ValueError, match="ops"):
        make_world_args(ops="+%")
    with pytest.raises(ValueError, match="min_steps"):
        make_world_args(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="no world"):
        make_world_args(worlds=["ages"], min_steps=3, max_steps=3)
    with pytest.raises(TypeError):
        make_world_args(nonsense=1)


# --- corpus -------------------------------------------------------------------------------------
def test_corpus_is_deterministic_by_seed_and_independent_of_how_it_is_sliced():
    a = list(generate_corpus(12, seed=5))
    assert a == list(generate_corpus(12, seed=5))
    assert a[4:] == list(generate_corpus(8, seed=5, start=4))
    b = list(generate_corpus(12, seed=6))
    assert [d["text"] for d in a] != [d["text"] for d in b]
    assert len({d["id"] for d in a + b}) == 24
    np.random.seed(0)  # the global RNG is neither used nor advanced
    expected = np.random.random()
    np.random.seed(0)
    docs = list(generate_corpus(3, seed=1))
    assert np.random.random() == expected
    np.random.seed(123)
    assert list(generate_corpus(3, seed=1)) == docs


def test_documents_look_like_worksheets_and_are_chunkable():
    for doc in generate_corpus(40, seed=2):
        text = doc["text"]
        title, body = text.split("\n\n", 1)
        assert title and "." not in title and "\n" not in title
        assert body.split("\n") == [p["line"] for p in doc["problems"]]
        assert 4 <= len(doc["problems"]) <= 8
        assert not any(tok in text for tok in SPECIAL_TOKENS) and "<|" not in text and "\r" not in text
        for mode in ("sentence", "word", "paragraph"):
            chunks = chunk_text(text, ChunkArgs(split_mode=mode))
            assert "".join(c.suffix for c in chunks) == text
        # sentence units: the title, then a question and an answer per statement
        units = chunk_text(text, ChunkArgs(units_per_chunk=2, max_units_per_chunk=1))
        assert len(units) == 1 + 2 * len(doc["problems"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    digits=st.integers(1, 2),
    steps=st.tuples(st.integers(1, 4), st.integers(0, 2)),
    ops=st.sets(st.sampled_from("+-*/"), min_size=2).map(lambda s: "".join(sorted(s))),
    max_value=st.sampled_from([50, 99, 500]),
)
def test_every_derivation_recomputes_its_stated_answer(seed, digits, steps, ops, max_value):
    knobs = dict(digits=digits, min_steps=steps[0], max_steps=steps[0] + steps[1], ops=ops, max_value=max_value)
    try:
        args = make_world_args(**knobs)
    except ValueError:
        return  # no world fits these knobs (validated separately)
    for doc in generate_corpus(3, seed=seed, args=args):
        for line, record in zip(doc["text"].split("\n")[2:], doc["problems"]):
            problem = parse_question(line[: line.index(". ") + 1])
            assert problem is not None and problem.line == line == record["line"]
            assert problem.derivation == record["derivation"]
            known = set(_numbers(problem.question))
            for step in problem.steps:
                assert step.op in ops
                assert _OPS[step.op](step.a, step.b) == step.result and step.result >= 0
                assert step.op != "/" or step.a % step.b == 0
                assert max(step.a, step.b, step.result) <= max_value
                # the work uses only numbers stated in the question, earlier results and unit
                # constants (2 for perimeters, 60 minutes per hour, the percent's denominator)
                assert step.a in known or step.b in known or step.b in (2, 3, 4, 5, 7, 10, 12, 16, 24, 60)
                known.add(step.result)
            assert args.min_steps <= len(problem.steps) <= args.max_steps
            assert problem.answer == record["answer"] == _numbers(problem.answer_sentence)[0]
            assert len(_numbers(problem.answer_sentence)) == 1


def test_all_worlds_and_step_counts_appear_with_the_default_knobs():
    seen = {(p["world"], len(p["derivation"].split(". "))) for d in generate_corpus(150, seed=0) for p in d["problems"]}
    assert {w for w, _ in seen} == set(WORLDS)
    assert {n for _, n in seen} == {2, 3}


def test_no_tail_of_a_question_is_itself_a_question():
    """Why a window that starts mid-statement can never be misread as another statement."""
    for doc in generate_corpus(60, seed=7):
        for p in doc["problems"]:
            question = p["line"][: p["line"].index(". ") + 1]
            for m in re.finditer(r"\s\S", question):
                assert parse_question(question[m.start() + 1 :]) is None, question


# --- oracle -------------------------------------------------------------------------------------
def _line_chunks(text: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Random chunks made of whole lines (whole statements), with all previous text as prefix."""
    lines = text.split("\n")
    cuts = sorted(set(rng.integers(1, len(lines), size=3).tolist()))
    pieces = ["\n".join(lines[a:b]) for a, b in zip([0, *cuts], [*cuts, len(lines)])]
    pieces = [p if i == 0 else "\n" + p for i, p in enumerate(pieces)]
    assert "".join(pieces) == text
    return [("".join(pieces[:i]), piece) for i, piece in enumerate(pieces)]


def test_oracle_recovers_the_generator_latents_for_whole_statement_chunks():
    teacher = OracleTeacher()
    rng = np.random.default_rng(0)
    for doc in generate_corpus(40, seed=11):
        pairs = _line_chunks(doc["text"], rng)
        requests = [LatentRequest(doc["id"], i, prefix, suffix) for i, (prefix, suffix) in enumerate(pairs)]
        responses = teacher.complete(requests)
        for (prefix, suffix), response in zip(pairs, responses):
            want = [p["derivation"] for p in doc["problems"] if p["line"] in suffix]
            assert response.latent == " ".join(want)
            assert response.finish_reason == "stop" and response.ok
            assert response.usage["statements"] == len(want) and response.usage["partial_statements"] == 0


@pytest.mark.parametrize("mode,prefix_chunks,max_misses", [("sentence", 1, 0), ("word", 100, 0), ("word", 3, 5)])
def test_oracle_with_the_real_chunker_puts_each_derivation_before_its_answer(mode, prefix_chunks, max_misses):
    teacher = build_teacher("oracle", method="latent_thoughts", src="unused", seed=3)
    misses = 0
    for doc in generate_corpus(30, seed=12):
        found, _ = find_problems(doc["text"])
        chunks = chunk_text(doc["text"], ChunkArgs(split_mode=mode, prefix_chunks=prefix_chunks))
        responses = teacher.complete([LatentRequest(doc["id"], i, c.prefix, c.suffix) for i, c in enumerate(chunks)])
        for c, r in zip(chunks, responses):
            want = " ".join(f.problem.derivation for f in found if c.start <= f.answer_pos < c.end)
            misses += r.latent != want
            if r.latent != want:  # only a question cut off by a short prefix window may be lost
                assert r.usage["partial_statements"] > 0
    # sentence units never cut a statement, and all previous text always holds its question;
    # word chunks with a 3-chunk prefix window rarely lose one
    assert misses <= max_misses


def test_oracle_on_statements_cut_by_chunk_boundaries():
    line = "Solve 3x + 7 = 31. So x = 8."
    doc = "Practice set 3\n\n" + line + "\nFind the mean of 4, 8 and 9. The mean is 7."
    d1, d2 = "31 - 7 = 24. 24 / 3 = 8.", "4 + 8 = 12. 12 + 9 = 21. 21 / 3 = 7."
    cut = doc.index(" So x")
    # boundary between question and answer: the derivation goes right before the answer
    assert chunk_latent(doc[:cut], doc[cut:]) == (d1 + " " + d2, {"statements": 2, "partial_statements": 0, "mismatched_answers": 0})
    assert chunk_latent("", doc[:cut])[0] == ""
    # boundary inside the answer sentence, before or after the number
    before, after = doc.index("8.\nFind"), doc.index(".\nFind")
    assert chunk_latent(doc[:before], doc[before:])[0] == d1 + " " + d2
    assert chunk_latent(doc[:after], doc[after:])[0] == d2
    assert chunk_latent("", doc[:after])[0] == d1
    # the question is cut by the start of the window: not derivable, counted as partial
    latent, counters = chunk_latent("", doc[doc.index("x + 7"):])
    assert latent == d2 and counters["partial_statements"] == 1
    # the window ends inside the next question: that statement waits for its own chunk
    assert chunk_latent("", doc[: doc.index(", 8 and")])[0] == d1
    # a wrong stated answer still gets the true derivation, and is counted
    latent, counters = chunk_latent("", doc.replace("So x = 8.", "So x = 9."))
    assert latent == d1 + " " + d2 and counters["mismatched_answers"] == 1
    # "restate" style puts the question before its derivation
    assert chunk_latent("", line, "restate")[0] == "Solve 3x + 7 = 31. " + d1


def test_oracle_wrap_methods_paraphrase_each_repeat_differently():
    doc = next(generate_corpus(1, seed=4))
    requests = [LatentRequest(doc["id"], -1, "", doc["text"], repeat=r) for r in range(4)]
    cot = OracleTeacher(method="wrap_cot", seed=3).complete(requests)
    plain = OracleTeacher(method="wrap_baseline", seed=3).complete(requests)
    for p in doc["problems"]:  # every derivation inline in the CoT paraphrases, none in the plain ones
        assert all(p["derivation"] in r.latent for r in cot)
        assert not any(p["derivation"] in r.latent for r in plain)
    assert len({r.latent for r in cot}) > 1 and all(r.usage["statements"] == len(doc["problems"]) for r in cot)
    again = OracleTeacher(method="wrap_cot", seed=3).complete(requests)
    assert [r.latent for r in again] == [r.latent for r in cot]  # (seed, doc, repeat) fixes a paraphrase
    with pytest.raises(ValueError, match="styles"):
        OracleTeacher(method="wrap_baseline", styles=["limerick"])
    with pytest.raises(ValueError, match="latent_style"):
        OracleTeacher(latent_style="poetry")


def test_oracle_records_follow_the_latent_dataset_schema():
    docs = list(generate_corpus(10, seed=8))
    for doc, record in zip(docs, oracle_records(docs, ChunkArgs(units_per_chunk=3))):
        assert record["id"] == doc["id"] and record["num_chunks"] == len(record["chunks"]) >= 2
        assert "".join(c["suffix"] for c in record["chunks"]) == record["text"]
        assert " ".join(c["latent"] for c in record["chunks"] if c["latent"]) == " ".join(p["derivation"] for p in doc["problems"])


def test_find_problems_reports_offsets_of_answers():
    doc = next(generate_corpus(1, seed=9))
    found, fragments = find_problems(doc["text"])
    assert not fragments and len(found) == len(doc["problems"])
    for f in found:
        assert doc["text"][f.answer_pos :].startswith(str(f.problem.answer)) and f.stated_ok


# --- evaluation tasks ---------------------------------------------------------------------------
def test_eval_problems_are_disjoint_from_training_and_from_each_other():
    train_keys = set()
    for doc in generate_corpus(300, seed=0):
        for p in doc["problems"]:
            problem = parse_question(p["line"][: p["line"].index(". ") + 1])
            assert split_of(problem, WorldArgs().eval_fraction) == "train"
            train_keys.add(problem.key)
    splits = {s: generate_eval_problems(n, seed=1, split=s) for s, n in (("fewshot", 8), ("dev", 60), ("test", 120))}
    keys = {s: [item.problem.key for item in items] for s, items in splits.items()}
    for s, ks in keys.items():
        assert len(set(ks)) == len(ks), f"duplicates in {s}"
        assert not set(ks) & train_keys, f"{s} overlaps training"
        assert {split_of(item.problem, 0.1) for item in splits[s]} == {s}
    assert not set(keys["test"]) & set(keys["dev"]) and not set(keys["test"]) & set(keys["fewshot"])
    assert {item.problem.world for item in splits["test"]} == set(WORLDS)  # every world takes turns
    assert generate_eval_problems(20, seed=1, split="test") == splits["test"][:20]  # prefix-stable
    with pytest.raises(ValueError, match="split"):
        generate_eval_problems(1, split="train")


def test_prompts_match_the_training_layout():
    test = generate_eval_problems(2, seed=0, split="test")
    shots = generate_eval_problems(2, seed=0, split="fewshot")
    raw = build_prompt(test[0], shots, "raw")
    assert raw == DESCRIPTION + "".join(s.problem.line + "\n" for s in shots) + test[0].problem.question
    latent = build_prompt(test[0], shots, "latent")
    sol, eol, prior = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
    first = shots[0].problem
    assert latent.startswith(DESCRIPTION + first.question + sol + prior + first.derivation + eol + " " + first.answer_sentence + "\n")
    assert latent.endswith(test[0].problem.question + sol + prior)
    assert stop_strings("raw")[0] == "\n" and sol in stop_strings("latent")


@pytest.mark.parametrize(
    "text,gold,variant,ok",
    [
        (" So x = 8.", "8", "raw", True),
        (" So x = 8.\nSolve 2x = 6. So x = 3.", "8", "raw", True),
        (" So x = 9.\nSo x = 8.", "8", "raw", False),  # only the first line counts
        (" So x = 08.", "8", "raw", True),
        (" That is 8.0 minutes.", "8", "raw", True),
        (" That is 8.5 minutes.", "8", "raw", False),
        (" The mean is 18.", "8", "raw", False),  # no substring matches
        (" Ava ends with -3 eggs.", "-3", "raw", True),
        (" Ava ends with 3 eggs.", "-3", "raw", False),
        (" Nothing to see.", "8", "raw", False),
        ("\nSo x = 8.", "8", "raw", False),
        ("31 - 7 = 24. 24 / 3 = 8.<|END_OF_LATENT|> So x = 8.", "8", "latent", True),
        ("31 - 7 = 24. 24 / 3 = 8.<|END_OF_LATENT|> So x = 7.", "8", "latent", False),
        ("31 - 7 = 24. 24 / 3 = 8. So x = 8.", "8", "latent", False),  # thought never closed
        ("8<|END_OF_LATENT|> So x = 8.<|END_OF_LATENT|> So x = 5.", "8", "latent", True),
        ("1 + 7 = 8.<|END_OF_LATENT|>", "8", "latent", False),  # no answer after the thought
    ],
)
def test_grader(text, gold, variant, ok):
    assert grade(text, gold, variant) is ok


def test_grader_rejects_unknown_variants():
    assert extract_answer(" So x = 8.") == "8"
    with pytest.raises(ValueError, match="variant"):
        grade("8", "8", "cot")


def test_write_eval_files(tmp_path):
    paths = write_eval_files(tmp_path / "eval", n_test=30, n_dev=10, num_fewshot=3, seed=2)
    assert is_done(tmp_path / "eval")
    rows = {s: list(read_jsonl(paths[s])) for s in ("fewshot", "dev", "test")}
    assert [len(rows[s]) for s in ("fewshot", "dev", "test")] == [3, 10, 30]
    meta = json.loads(paths["meta"].read_text())
    assert meta["num_fewshot"] == 3 and meta["target_delimiter"] == "" and meta["latent_style"] == "steps"
    items = {s: generate_eval_problems(len(rows[s]), seed=2, split=s) for s in rows}
    for variant in ("raw", "latent"):
        # what lm-eval builds from the files equals build_prompt
        row = rows["test"][0]
        shots = "".join(r[f"query_{variant}"] + r[f"target_{variant}"] + meta["fewshot_delimiter"] for r in rows["fewshot"])
        assert meta["description"] + shots + row[f"query_{variant}"] == build_prompt(items["test"][0], items["fewshot"], variant)
        # a perfect generation is graded correct for every row
        for r in rows["test"]:
            assert grade(r[f"target_{variant}"], r["answer"], variant)
    assert set(rows["test"][0]) >= {"id", "question", "answer", "world", "steps", "latent", "answer_sentence"}


# --- tokenizer ----------------------------------------------------------------------------------
def test_synthetic_tokenizer_is_built_once_and_round_trips(tmp_path, monkeypatch):
    args = synth_tokenizer.get_synthetic_tokenizer(tmp_path, num_docs=150, vocab_size=400)
    tok = build_tokenizer(args)
    assert tok.vocab_size <= 400
    assert all(len(tok.encode(s)) == 1 for s in SPECIAL_TOKENS)
    item = generate_eval_problems(1, seed=0)[0]
    for text in [d["text"] for d in generate_corpus(5, seed=99)] + [build_prompt(item, [], "latent") + item.target("latent")]:
        assert tok.decode(tok.encode(text)) == text
    # the cache answers the second call without training; other settings train a new one
    monkeypatch.setattr(synth_tokenizer, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    assert synth_tokenizer.get_synthetic_tokenizer(tmp_path, num_docs=150, vocab_size=400) == args
    with pytest.raises(pytest.fail.Exception):
        synth_tokenizer.get_synthetic_tokenizer(tmp_path, num_docs=150, vocab_size=400, max_steps=4)
    assert [p.name for p in tmp_path.iterdir()] == [args.path.split("/")[-2]]  # no temp leftovers

    docs = list(generate_corpus(20, seed=0))
    steps, restate = (corpus_stats(docs, tok, ChunkArgs(), style) for style in ("steps", "restate"))
    assert steps["docs"] == 20 and steps["chars"] == sum(len(d["text"]) for d in docs)
    assert steps["raw_tokens"] == sum(len(tok.encode(d["text"])) for d in docs) == restate["raw_tokens"]
    assert 0 < steps["latent_tokens"] < restate["latent_tokens"]
    assert steps["augmented_tokens"] > steps["raw_tokens"] + steps["latent_tokens"]
    # one-sentence chunks put every thought between its question and its answer; 8-sentence ones
    # (ChunkArgs' default) rarely do
    aligned = corpus_stats(docs, tok, ChunkArgs(units_per_chunk=1, random=False), "steps")
    assert aligned["in_place"] == 1.0 and 0.0 < steps["in_place"] < 0.5


# --- probe --------------------------------------------------------------------------------------
def test_probe_runs_both_conditions_on_a_token_budget(tmp_path):
    from apps.bolt.synthetic.probe import ProbeArgs, run
    from lingua.transformer import TransformerArgs

    cfg = ProbeArgs(
        out_dir=str(tmp_path / "probe"),
        cache_dir=str(tmp_path / "cache"),
        num_docs=30,
        model=TransformerArgs(dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seqlen=512),
        train_tokens=2 * 4 * 64,
        seq_len=64,
        batch_size=4,
        n_eval=3,
        num_fewshot=1,
        log_every=1,
    )
    results = run(cfg)
    assert json.loads((tmp_path / "probe" / "results.json").read_text()) == results
    assert results["latent_layout_tokens"] > results["raw_tokens"] > 0
    runs = {r["condition"]: r for r in results["runs"]}
    assert set(runs) == {"raw", "latent"}
    assert set(runs["raw"]["eval"]) == {"raw", "raw_0shot"}
    assert set(runs["latent"]["eval"]) == {"latent", "latent_0shot", "raw"}
    for r in runs.values():
        for report in r["eval"].values():
            assert report["all"]["n"] == 3 and 0.0 <= report["all"]["accuracy"] <= 1.0
