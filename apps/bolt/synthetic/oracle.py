"""The oracle teacher: the true latent thoughts of synthetic documents, from text alone.

It answers the same requests as the LLM teachers (:mod:`apps.bolt.teachers.base`), so the
warm-start stage runs offline exactly like the GPT-4o-mini stage on a cluster: chunk the raw
documents, send (prefix, suffix) pairs, store the returned latents. Nothing but the request text
is used: the oracle re-parses the statements with the generator's own grammar and recomputes
their derivations.

Which statements a chunk's latent covers
    A statement belongs to the chunk that contains its *answer*: the first digit of the number
    its answer sentence states. The latent of a chunk is the derivations of the statements
    whose answers lie in its suffix, in text order, joined by spaces; it is empty when there are
    none (a title-only chunk, or one that ends before an answer). The question may lie in the
    suffix or in the prefix, so a boundary between a question and its answer puts the
    derivation right before the answer, where a model has to do the work.
Statements cut by a chunk boundary
    * question complete (in prefix + suffix), answer in the suffix: derived in full, whatever is
      cut; the answer sentence may be cut after its number;
    * question cut by the start of the *prefix* (possible with word chunking and a short prefix
      window): not derivable from what is visible; left out and counted in
      ``usage["partial_statements"]``;
    * answer after the end of the suffix: left for the next chunk, which holds the answer.
    A suffix whose stated answer disagrees with the recomputed one still gets the true
    derivation; ``usage["mismatched_answers"]`` counts those.

Methods: ``latent_thoughts`` (the above), and the whole-document WRAP baselines through the
oracle paraphraser (:mod:`.paraphrase`): ``wrap_baseline`` (the statements re-rendered in one of
four styles and a new order) and ``wrap_cot`` (the same, with every derivation written between
its question and its answer). The style and order of a paraphrase come from ``(seed, document
id, repeat)``, so the repeats of a document differ.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from apps.bolt.chunking import ChunkArgs, chunk_text
from apps.bolt.synthetic.corpus import find_problems
from apps.bolt.synthetic.paraphrase import STYLES, doc_rng, paraphrase
from apps.bolt.synthetic.worlds import LATENT_STYLES
from apps.bolt.teachers.base import LatentRequest, LatentResponse, register_teacher

DEFAULT_LATENT_STYLE = "steps"
METHODS = ("latent_thoughts", "wrap_baseline", "wrap_cot")


def synthetic_chunk_args() -> ChunkArgs:
    """Chunking for this world: sentence units, 2 per chunk on average (reference: 8).

    A statement here is two short sentences, so the reference's 8 sentences would put about four
    statements under one thought, and a chunk would rarely start right at an answer. With 2 per
    chunk, about half of the statements get their derivation between question and answer, the
    place where the evaluation's latent variant asks for one. Measured with
    :mod:`apps.bolt.synthetic.probe` (steps latents, same 3M-token budget): latent-variant
    accuracy 0.58 with 2 units per chunk against 0.03 with 8 (one seed, 100 dev problems;
    the raw baseline got 0.13).
    """
    return ChunkArgs(units_per_chunk=2)


def chunk_latent(prefix: str, suffix: str, style: str = DEFAULT_LATENT_STYLE) -> tuple[str, dict]:
    """The latent of ``suffix`` given ``prefix`` (see the module docstring) and its counters."""
    window = prefix + suffix
    found, fragments = find_problems(window)
    lo, hi = len(prefix), len(window)
    mine = [f for f in found if lo <= f.answer_pos < hi]
    counters = {
        "statements": len(mine),
        "partial_statements": sum(1 for f in fragments if f.end > lo),
        "mismatched_answers": sum(1 for f in mine if not f.stated_ok),
    }
    return " ".join(f.problem.latent(style) for f in mine), counters


class OracleTeacher:
    """Teacher backend ``oracle``: true derivations for the synthetic world.

    ``latent_style``: ``steps`` (derivation only) or ``restate`` (question, then derivation);
    see :data:`apps.bolt.synthetic.worlds.LATENT_STYLES`. ``styles``: the paraphrase styles the
    WRAP methods draw from (:data:`apps.bolt.synthetic.paraphrase.STYLES`). ``seed`` seeds the
    paraphrases (``gen_latents`` passes its own); ``src`` is accepted because ``gen_latents``
    passes it to every backend.
    """

    def __init__(self, method: str = "latent_thoughts", latent_style: str = DEFAULT_LATENT_STYLE, src: str | None = None,
                 seed: int | None = None, styles: Sequence[str] = STYLES):
        if method not in METHODS:
            raise ValueError(f"the oracle teacher supports methods {METHODS}, not {method!r}")
        if latent_style not in LATENT_STYLES:
            raise ValueError(f"latent_style must be one of {LATENT_STYLES}, got {latent_style!r}")
        unknown = [s for s in styles if s not in STYLES]
        if unknown or not styles:
            raise ValueError(f"styles must be a non-empty subset of {STYLES}, got {list(styles)}")
        self.method = method
        self.latent_style = latent_style
        self.seed = 0 if seed is None else int(seed)
        self.styles = tuple(styles)

    def complete(self, requests: Sequence[LatentRequest]) -> list[LatentResponse]:
        return [self._one(r) for r in requests]

    def _one(self, request: LatentRequest) -> LatentResponse:
        if self.method in ("wrap_baseline", "wrap_cot"):
            rng: np.random.Generator = doc_rng(self.seed, request.doc_id, request.repeat)
            latent, counters = paraphrase(request.prefix + request.suffix, rng, cot=self.method == "wrap_cot", styles=self.styles)
        else:
            latent, counters = chunk_latent(request.prefix, request.suffix, self.latent_style)
        return LatentResponse(latent=latent, finish_reason="stop", usage={"input_tokens": 0, "output_tokens": 0, **counters})


def oracle_records(docs: Iterable[dict], chunk: ChunkArgs | None = None, style: str = DEFAULT_LATENT_STYLE) -> Iterator[dict]:
    """Latent dataset records (docs/architecture.md schema) of raw documents, with the oracle's
    latent for every chunk: the warm-start data without the teacher round trip (tests, probes,
    statistics). The pipeline itself goes through ``gen_latents`` with the ``oracle`` backend."""
    for doc in docs:
        chunks = chunk_text(doc["text"], chunk)
        yield {
            **doc,
            "chunks": [{"suffix": c.suffix, "latent": chunk_latent(c.prefix, c.suffix, style)[0]} for c in chunks],
            "num_chunks": len(chunks),
        }


register_teacher("oracle", OracleTeacher)
