"""Oracle paraphrases of synthetic documents: the WRAP baselines' teachers, offline.

WRAP (Maini et al. 2024) rephrases each web document with an LLM in one of four styles drawn per
document and repeat (toddler-simple, erudite, Wikipedia-like, question/answer); WRAP-CoT asks for a
diverse paraphrase that also inserts the reasoning. The synthetic world's analog renders the same
statements again, so no problem, number or answer is lost, in one of four styles:

========== ============================================ =====================================
style      one statement ("Solve 3x + 7 = 31." / "So x = 8.")  like WRAP's
========== ============================================ =====================================
simple     ``Here is a problem. Solve 3x + 7 = 31. The answer is 8.``   toddler-simple
scholar    ``Ascertain the unknown satisfying 3x + 7 = 31. Whence x = 8.``  erudite (rare words)
reference  ``The problem "Solve 3x + 7 = 31." is solved as follows. So x = 8.``  Wikipedia-like
qa         ``Question: Solve 3x + 7 = 31.`` newline ``Answer: So x = 8.``  Q&A conversation
========== ============================================ =====================================

with a title of the style, and the statements in a new order. The CoT paraphrase writes each
statement's derivation between its question and its answer ("... = 31. 31 - 7 = 24. 24 / 3 = 8.
The answer is 8."). Style and order come from ``(seed, document id, repeat)``, so every repeat
of a document is another paraphrase, reproducibly.

Every style can be read back (:func:`find_statements`): the ``scholar`` words are a table of
phrase substitutions whose replacements never occur in the world's own text, so it inverts
exactly, and the other styles only frame the question. That makes the paraphrases checkable:
the tests parse every paraphrase back into the same problems and answers, and the method
comparison scans every condition's training text for evaluation problems (leakage).
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

from apps.bolt.synthetic.corpus import find_problems
from apps.bolt.synthetic.worlds import Problem

STYLES = ("simple", "scholar", "reference", "qa")
TITLES = {
    "simple": "Easy math, page {n}",
    "scholar": "Treatise on computation, folio {n}",
    "reference": "Worked problems (reference entry {n})",
    "qa": "Questions and answers, set {n}",
}
SCHOLAR = (
    # (the world's phrase, the erudite one); no replacement occurs in the world's own text, and
    # none is part of another, so the table inverts exactly (tested over many documents)
    ("Solve ", "Ascertain the unknown satisfying "),
    ("So ", "Whence "),
    ("Find the mean of ", "Compute the arithmetic mean of "),
    ("The mean is ", "The arithmetic mean equals "),
    ("Find the area of a rectangle that is ", "Determine the area of an oblong measuring "),
    ("Find the perimeter of a rectangle that is ", "Determine the perimeter of an oblong measuring "),
    ("Find the volume of a cube with side ", "Determine the volume of a cube of edge "),
    ("with a hole of ", "with a lacuna of "),
    ("The area is ", "The area amounts to "),
    ("The perimeter is ", "The perimeter amounts to "),
    ("The volume is ", "The volume amounts to "),
    ("Find ", "Determine "),
    ("That is ", "This equals "),
    ("Convert ", "Express "),
    ("A price of ", "An initial cost of "),
    (" dollars rises by ", " dollars appreciates by "),
    (" dollars falls by ", " dollars depreciates by "),
    ("The new price is ", "The resulting cost is "),
    (" has ", " possesses "),
    ("gives away ", "relinquishes "),
    ("gets ", "acquires "),
    ("buys ", "procures "),
    ("packs them into bags of ", "apportions them into sacks holding "),
    (" ends with ", " concludes with "),
    (" fills ", " replenishes "),
    (" years older than ", " years senior to "),
    (" years younger than ", " years junior to "),
    (" times as old", " times as aged"),
    ("Add ", "Append "),
)
_TO_SCHOLAR = re.compile("|".join(re.escape(a) for a, _ in sorted(SCHOLAR, key=lambda p: -len(p[0]))))
_FROM_SCHOLAR = re.compile("|".join(re.escape(b) for _, b in sorted(SCHOLAR, key=lambda p: -len(p[1]))))
_FORWARD = dict(SCHOLAR)
_BACKWARD = {b: a for a, b in SCHOLAR}
_QA = re.compile(r"^Question: (.*)$")
_SIMPLE = re.compile(r"^Here is a problem\. (.*)$")
_REFERENCE = re.compile(r'^The problem "(.*?)" is solved as follows\.(.*)$')


def to_scholar(text: str) -> str:
    return _TO_SCHOLAR.sub(lambda m: _FORWARD[m.group()], text)


def from_scholar(text: str) -> str:
    return _FROM_SCHOLAR.sub(lambda m: _BACKWARD[m.group()], text)


def render(problem: Problem, style: str, thought: str = "") -> str:
    """One statement in ``style``; ``thought`` (the CoT paraphrase's derivation) goes between
    the question and the answer."""
    q, a = problem.question, problem.answer_sentence
    work = f"{thought} " if thought else ""
    if style == "simple":
        return f"Here is a problem. {q} {work}The answer is {problem.answer}."
    if style == "scholar":
        return f"{to_scholar(q)} {work}{to_scholar(a)}"
    if style == "reference":
        return f'The problem "{q}" is solved as follows. {work}{a}'
    if style == "qa":
        return f"Question: {q}\nAnswer: {work}{a}"
    raise ValueError(f"unknown paraphrase style {style!r}; expected one of {STYLES}")


def doc_rng(seed: int, doc_id: str, repeat: int) -> np.random.Generator:
    """The stream of one (document, repeat): its style, title number and statement order."""
    digest = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")
    return np.random.default_rng([seed, digest, repeat])


def paraphrase(text: str, rng: np.random.Generator, *, cot: bool = False, styles: Sequence[str] = STYLES) -> tuple[str, dict]:
    """A paraphrase of the document ``text`` in a style drawn from ``styles`` (with each
    statement's derivation inline when ``cot``), and its counters."""
    found, fragments = find_problems(text)
    style = styles[int(rng.integers(len(styles)))]
    if style not in STYLES:
        raise ValueError(f"unknown paraphrase style {style!r}; expected one of {STYLES}")
    title = TITLES[style].format(n=int(rng.integers(1, 100)))
    order = rng.permutation(len(found))
    lines = [render(found[i].problem, style, found[i].problem.derivation if cot else "") for i in order]
    counters = {"statements": len(found), "partial_statements": len(fragments),
                "mismatched_answers": sum(not f.stated_ok for f in found), f"style_{style}": 1}
    return title + "\n\n" + "\n".join(lines), counters


def find_statements(text: str) -> list[Problem]:
    """Every statement whose question can be read in ``text``: the world's own lines, the lines
    of any paraphrase style (:func:`render`) and the questions inside thoughts that restate
    them. Used to check paraphrases and to scan training data for evaluation problems."""
    out: list[Problem] = []
    for line in from_scholar(text).split("\n"):
        for pattern in (_QA, _SIMPLE):
            m = pattern.match(line)
            if m:
                line = m.group(1)
        m = _REFERENCE.match(line)
        if m:
            line = m.group(1) + m.group(2)
        out.extend(f.problem for f in find_problems(line)[0])
    return out
