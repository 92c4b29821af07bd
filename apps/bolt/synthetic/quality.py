"""The synthetic world's latent scorer: each sampled thought against the oracle's.

The true latent of a (prefix, suffix) pair is :func:`apps.bolt.synthetic.oracle.chunk_latent` of
that same pair, the derivations of the statements whose answers lie in the suffix (empty when
there are none). A sample is *correct* when it equals that text up to whitespace. Equations are
``a op b = c`` in the world's notation; one is *true* when the arithmetic holds, and *recalled*
when the true latent contains it (counted as a multiset, so a repeated step counts once per
occurrence). Registered as ``synthetic`` and picked automatically for records whose ``source``
is ``synthetic`` (:mod:`apps.bolt.latent_quality`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from apps.bolt.latent_quality import ChunkQuality, register_scorer
from apps.bolt.synthetic.oracle import DEFAULT_LATENT_STYLE, chunk_latent

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def normalize(text: str) -> str:
    return " ".join(text.split())


def equations(text: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(text)]


def is_true(eq: tuple[int, str, int, int]) -> bool:
    a, op, b, c = eq
    if op == "+":
        return a + b == c
    if op == "-":
        return a - b == c
    if op == "*":
        return a * b == c
    return b != 0 and a == b * c


class SyntheticScorer:
    def __init__(self, style: str = DEFAULT_LATENT_STYLE):
        self.style = style

    def truth(self, prefix: str, suffix: str) -> str:
        return normalize(chunk_latent(prefix, suffix, self.style)[0])

    def score(self, prefix: str, suffix: str, latents: Sequence[str]) -> ChunkQuality:
        truth = self.truth(prefix, suffix)
        want = Counter(equations(truth))
        q = ChunkQuality(has_thought=bool(truth), correct=[], oracle_equations=sum(want.values()))
        for z in latents:
            eqs = equations(z)
            q.correct.append(normalize(z) == truth)
            q.equations.append(len(eqs))
            q.true_equations.append(sum(map(is_true, eqs)))
            q.recalled.append(sum((Counter(eqs) & want).values()))
        return q


register_scorer("synthetic", SyntheticScorer, sources=("synthetic",))
