"""The oracle paraphrasers (the WRAP and WRAP-CoT teachers of the synthetic world): every
paraphrase keeps every problem and answer, changes the wording of every statement, and reads back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from apps.bolt.synthetic.corpus import generate_corpus
from apps.bolt.synthetic.paraphrase import SCHOLAR, STYLES, doc_rng, find_statements, from_scholar, paraphrase, to_scholar

DOCS = list(generate_corpus(300, seed=5))


def _problems(text: str) -> list[tuple[str, int]]:
    return sorted((p.key, p.answer) for p in find_statements(text))


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, len(DOCS) - 1), seed=st.integers(0, 2**31 - 1), repeat=st.integers(0, 7), cot=st.booleans())
def test_paraphrase_keeps_every_problem_and_answer_and_changes_every_statement(index, seed, repeat, cot):
    doc = DOCS[index]
    text, counters = paraphrase(doc["text"], doc_rng(seed, doc["id"], repeat), cot=cot)
    want = sorted((p.key, p.answer) for p in find_statements(doc["text"]))
    assert len(want) == len(doc["problems"]) == counters["statements"]
    assert _problems(text) == want  # the same problems, and each one's stated answer is its answer
    for p in doc["problems"]:
        assert p["line"] not in text  # no statement kept in its original wording
        assert (p["derivation"] in text) == cot  # the CoT paraphrase writes every derivation out
        assert str(p["answer"]) in text
    assert text.split("\n", 1)[0] != doc["text"].split("\n", 1)[0]  # a title of the style


def test_every_style_is_drawn_and_repeats_differ():
    doc = DOCS[0]
    titles = {paraphrase(doc["text"], doc_rng(0, doc["id"], r))[0].split(",", 1)[0].split(" (")[0] for r in range(40)}
    assert len(titles) == len(STYLES)
    texts = {paraphrase(doc["text"], doc_rng(0, doc["id"], r))[0] for r in range(8)}
    assert len(texts) == 8
    assert paraphrase(doc["text"], doc_rng(0, doc["id"], 3))[0] == paraphrase(doc["text"], doc_rng(0, doc["id"], 3))[0]


def test_scholar_words_invert_exactly_and_never_occur_in_the_world():
    replacements = [b for _, b in SCHOLAR]
    for doc in DOCS:
        assert from_scholar(to_scholar(doc["text"])) == doc["text"]
        assert not any(b in doc["text"] for b in replacements), doc["id"]
        for line in doc["text"].split("\n")[2:]:
            assert to_scholar(line) != line  # every template has a phrase the scholar style replaces
