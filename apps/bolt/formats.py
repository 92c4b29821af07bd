"""Every string layout that involves latent thoughts, in one place.

Training layouts, the E-step prompt, the joint-scoring text and the eval prompts are all built
here, so the formats used to train a model and to query it cannot drift apart.

Special tokens (exact strings, in this id order): ``<|START_OF_LATENT|>`` (SOL),
``<|END_OF_LATENT|>`` (EOL), ``<|PRIOR_PREFIX|>`` (PRIOR), ``<|POSTERIOR_PREFIX|>`` (POST).

Latent dataset record schema (one JSON object per line)::

    {
      "text": str,                 # the raw document (field name: LayoutArgs.text_key)
      "chunks": [                  # in document order; the suffixes concatenate to "text" exactly
        {"suffix": str,            # this chunk's text
         "latent": str,            # its latent thought (may be "")
         "prefix": str,            # optional: the context the latent was inferred from
         ...}                      # optional per-chunk extras, e.g. "elbo_4", "num_suffix_token_truncated"
      ],
      "num_chunks": int,
      "id": str | int,             # stable document id
      ...                          # provenance: every source field is kept, plus e.g. "teacher",
                                   # "chunk_args", "latent_source"; summed "elbo_*" keys if computed
    }

WRAP-style records (whole-document rewrites) carry a top-level ``"latent"`` string instead of
``chunks``; only the ``pure`` layout reads it.

Training layouts (``LayoutArgs.name``, registered with the core data pipeline as
``data.format=<name>`` on import; reference name in brackets):

* ``raw`` [null]: the document text.
* ``prior`` [prior_only]: per chunk ``SOL{latent}EOL{suffix}`` (no PRIOR token, as in the reference).
* ``posterior`` [posterior_only]: per chunk ``{suffix}SOL{latent}EOL`` (no POST token, no marker).
* ``random`` [random]: per chunk, a fair coin from the loader's RNG picks prior
  ``SOL PRIOR{latent}EOL{suffix}`` or posterior ``SOL EOL{suffix}SOL POST{latent}EOL`` (the empty
  ``SOL EOL`` pair marks the chunk boundary).
* ``pure`` [pure]: thoughts only: the record's ``latent`` field, else the chunk latents joined by
  ``LayoutArgs.pure_separator`` (the reference joins with the decoded EOS+BOS strings; pass those
  as the separator to get its behaviour).

RNG draw order (matches the reference, so a seeded loader reproduces it): one
``rng.random() < mix_in_raw_ratio`` draw per document, only when the ratio is > 0 and the layout
is not ``raw``; then, for ``random``, one ``rng.random() < 0.5`` (True = prior) per chunk. A record
that falls back to raw consumes no coin draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Sequence

import numpy as np

from lingua.args import from_dict
from lingua.data.formatting import BadRecord, FormatOutput, Formatter, register_format

SOL = "<|START_OF_LATENT|>"
EOL = "<|END_OF_LATENT|>"
PRIOR = "<|PRIOR_PREFIX|>"
POST = "<|POSTERIOR_PREFIX|>"
SPECIAL_TOKENS: tuple[str, ...] = (SOL, EOL, PRIOR, POST)
"""The four latent tokens in the reference's id order (append them to a tokenizer in this order)."""

LAYOUTS = ("raw", "prior", "posterior", "random", "pure")

Spans = list[tuple[str, bool]]


class LayoutError(BadRecord):
    """A record cannot be laid out (no chunks, no latent) and ``fall_back_to_raw`` is off.
    The data pipeline counts and skips such records (fatal under ``data.strict``)."""


@dataclass
class LayoutArgs:
    """How latent records become training text (the formatter options)."""

    name: str = "random"
    """One of ``raw``, ``prior``, ``posterior``, ``random``, ``pure``."""
    mix_in_raw_ratio: float = 0.0
    """Per document, use the raw text with this probability whatever the layout."""
    fall_back_to_raw: bool = False
    """Use the raw text when a record has no chunks or a chunk has no latent (else raise)."""
    latent_loss: bool = True
    """Latent spans (latent tokens, thoughts and boundary markers) count in the loss. False trains
    on the document text only, with thoughts as context (new; the reference always counts them)."""
    pure_separator: str = "\n\n"
    """``pure`` layout: the string between chunk latents when there is no ``latent`` field."""
    text_key: str = "text"
    """Record field holding the raw document (the pipeline passes ``data.text_key``)."""

    def validate(self) -> None:
        if self.name not in LAYOUTS:
            raise ValueError(f"layout name must be one of {LAYOUTS}, got {self.name!r}")
        if not 0.0 <= self.mix_in_raw_ratio <= 1.0:
            raise ValueError(f"mix_in_raw_ratio must be in [0, 1], got {self.mix_in_raw_ratio}")
        if self.name == "pure" and not self.latent_loss:
            raise ValueError("latent_loss=False leaves nothing to train on with the pure layout")


# ------------------------------------------------------------------------------ training layouts
# Layouts first build "parts": (text, is_latent) pairs. is_latent covers the special tokens and
# the thoughts; the document text (suffixes, raw text) is the only non-latent part.


def raw_text(record: dict, text_key: str = "text") -> str:
    """The raw document of a record."""
    if isinstance(record.get(text_key), str):
        return record[text_key]
    raise LayoutError(f"record {_record_id(record)} has no string field {text_key!r}")


def _record_id(record: dict) -> str:
    return repr(record.get("id", "<no id>"))


def _chunks(record: dict) -> list[dict] | None:
    """The record's chunks if every one has a string suffix and latent, else None."""
    chunks = record.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        return None
    ok = all(isinstance(c, dict) and isinstance(c.get("suffix"), str) and isinstance(c.get("latent"), str) for c in chunks)
    return chunks if ok else None


def prior_parts(latent: str, suffix: str, marker: bool = True) -> Spans:
    """``SOL PRIOR{latent}EOL{suffix}``; without ``marker`` the reference's prior_only form."""
    return [(SOL + (PRIOR if marker else "") + latent + EOL, True), (suffix, False)]


def posterior_parts(latent: str, suffix: str, marker: bool = True) -> Spans:
    """``SOL EOL{suffix}SOL POST{latent}EOL``; without ``marker`` the posterior_only form
    ``{suffix}SOL{latent}EOL``."""
    if marker:
        return [(SOL + EOL, True), (suffix, False), (SOL + POST + latent + EOL, True)]
    return [(suffix, False), (SOL + latent + EOL, True)]


def layout_parts(record: dict, rng: np.random.Generator, args: LayoutArgs) -> Spans:
    """The (text, is_latent) parts of one record under ``args`` (draws from ``rng`` as documented)."""
    if args.name == "raw" or (args.mix_in_raw_ratio > 0.0 and rng.random() < args.mix_in_raw_ratio):
        return [(raw_text(record, args.text_key), False)]
    if args.name == "pure":
        if isinstance(record.get("latent"), str):
            return [(record["latent"], True)]
        chunks = _chunks(record)
        if chunks is not None:
            return [(args.pure_separator.join(c["latent"] for c in chunks), True)]
    else:
        chunks = _chunks(record)
    if chunks is None:
        if args.fall_back_to_raw:
            return [(raw_text(record, args.text_key), False)]
        what = "a 'latent' field or chunks" if args.name == "pure" else "chunks"
        raise LayoutError(
            f"record {_record_id(record)}: layout {args.name!r} needs {what} with string 'suffix' and "
            "'latent' (set fall_back_to_raw=true to train on its raw text instead)"
        )
    parts: Spans = []
    for c in chunks:
        if args.name == "prior":
            parts += prior_parts(c["latent"], c["suffix"], marker=False)
        elif args.name == "posterior":
            parts += posterior_parts(c["latent"], c["suffix"], marker=False)
        elif rng.random() < 0.5:
            parts += prior_parts(c["latent"], c["suffix"])
        else:
            parts += posterior_parts(c["latent"], c["suffix"])
    return parts


def to_spans(parts: Spans, latent_loss: bool) -> Spans:
    """Loss spans ``(text, counts_in_loss)``: empty parts dropped, equal neighbours merged."""
    out: Spans = []
    for text, is_latent in parts:
        counts = latent_loss or not is_latent
        if not text:
            continue
        if out and out[-1][1] == counts:
            out[-1] = (out[-1][0] + text, counts)
        else:
            out.append((text, counts))
    return out


def make_layout(name: str = "random", **options: Any) -> Formatter:
    """A formatter ``fn(record, rng) -> str | spans`` for layout ``name``.

    ``options`` are the other :class:`LayoutArgs` fields. The formatter returns plain text when
    every token counts in the loss, and ``(text, counts_in_loss)`` spans when ``latent_loss`` is
    off; span borders always fall on special tokens, so tokenizing span by span gives the same
    ids as tokenizing the joined text.
    """
    args = from_dict(LayoutArgs, {"name": name, **options}, where=f"layout {name!r}")

    def formatter(record: dict, rng: np.random.Generator) -> FormatOutput:
        parts = layout_parts(record, rng, args)
        if args.latent_loss:
            return "".join(text for text, _ in parts)
        return to_spans(parts, latent_loss=False)

    return formatter


_FACTORIES = {name: partial(make_layout, name) for name in LAYOUTS}


def register_layouts() -> None:
    """Register every layout with the core data pipeline as ``data.format=<name>`` (idempotent;
    done when this module is imported)."""
    for name, factory in _FACTORIES.items():
        register_format(name, factory)


register_layouts()


# ------------------------------------------------------------------------------------- E-step
ESTEP_STOP = EOL
"""Posterior sampling stops at this string; it is not part of the latent."""


def estep_prompt(prefix: str, suffix: str) -> str:
    """Prompt for sampling Z ~ q(Z | prefix, suffix): ``{prefix}SOL EOL{suffix}SOL POST``.

    With an empty prefix (the first chunk) it is ``{suffix}SOL POST``: no boundary marker, as in
    the reference. The prefix is raw text (earlier chunks carry no latents here), which differs
    slightly from the training posterior layout (reference quirk 5, kept).
    """
    if not prefix:
        return suffix + SOL + POST
    return prefix + SOL + EOL + suffix + SOL + POST


class JointText(NamedTuple):
    """The joint-scoring string and where scoring starts.

    ``text[:split]`` is the conditioning prefix; ``text[split:]`` (it starts with SOL) is scored.
    Score the continuation ``scored`` given ``context``: log p(SOL PRIOR Z EOL suffix | prefix)
    then includes log p(SOL | prefix), which the reference skips by an off-by-one.
    """

    text: str
    split: int

    @property
    def context(self) -> str:
        return self.text[: self.split]

    @property
    def scored(self) -> str:
        return self.text[self.split :]


def joint_text(prefix: str, latent: str, suffix: str) -> JointText:
    """``{prefix}SOL PRIOR{latent}EOL{suffix}`` split after the prefix."""
    return JointText(prefix + SOL + PRIOR + latent + EOL + suffix, len(prefix))


# ---------------------------------------------------------------------------------- eval prompts


@dataclass(frozen=True)
class EvalFormat:
    """Few-shot question -> answer prompts in a raw variant and a latent variant (reference §5).

    Raw: ``{query}{target_delimiter}{thought} {answer}`` (a written-out derivation, if any, then
    the answer sentence). Latent: the query ends in ``SOL PRIOR``, the model writes its thought,
    closes it with ``EOL`` and then answers: ``{latent_query}{thought}EOL {answer}``.
    """

    question_template: str = "Question: {question}\n\nFinal Answer:"
    """Raw query (reference ``gsm8k_cot_synthetic_alt``)."""
    latent_question_template: str | None = None
    """Latent query; None = the raw query followed by ``SOL PRIOR`` (GSM8K style)."""
    target_delimiter: str = " "
    """Between the raw query and its target (the latent variant uses none)."""
    answer_delimiter: str = " "
    """Between a thought (or its closing EOL) and the answer sentence."""
    fewshot_delimiter: str = "\n\n"
    """Between exemplars, and between the last exemplar and the query."""
    stop: tuple[str, ...] = ("Question:",)
    """Stop strings of both variants (a new question starting)."""

    def query(self, question: str, latent: bool = False) -> str:
        if not latent:
            return self.question_template.format(question=question)
        if self.latent_question_template is None:
            return self.question_template.format(question=question) + SOL + PRIOR
        return self.latent_question_template.format(question=question)

    def target(self, answer: str, thought: str = "", latent: bool = False) -> str:
        """What follows the query in an exemplar (and what the model should generate)."""
        if latent:
            return thought + EOL + self.answer_delimiter + answer
        body = thought + self.answer_delimiter + answer if thought else answer
        return self.target_delimiter + body

    def prompt(self, question: str, exemplars: Sequence[tuple[str, str, str]] = (), latent: bool = False) -> str:
        """Few-shot prompt; ``exemplars`` are ``(question, thought, answer)`` triples."""
        shots = [self.query(q, latent) + self.target(a, t, latent) for q, t, a in exemplars]
        return self.fewshot_delimiter.join([*shots, self.query(question, latent)])

    def stop_strings(self, latent: bool = False) -> list[str]:
        """Raw: also stop at EOL; latent: also stop at SOL (a new thought would start)."""
        return [*self.stop, SOL if latent else EOL]

    def banned_strings(self, latent: bool = False) -> list[str]:
        """Raw models must not emit latent tokens (reference ``bad_words``); latent ones may."""
        return [] if latent else list(SPECIAL_TOKENS)


GSM8K_STYLE = EvalFormat()
MATH_STYLE = EvalFormat(
    question_template="Problem:\n{question}\n\nSolution:",
    latent_question_template="Problem:\n{question}\n" + SOL + PRIOR,
    stop=("Problem:",),
)


def split_latent_generation(generation: str) -> tuple[str | None, str]:
    """``(thought, answer_text)`` of a latent-variant generation; thought is None when the model
    never closed it with EOL (then the whole generation is returned as the answer text)."""
    thought, sep, rest = generation.partition(EOL)
    return (thought, rest) if sep else (None, generation)


__all__ = [
    "EOL",
    "ESTEP_STOP",
    "GSM8K_STYLE",
    "LAYOUTS",
    "MATH_STYLE",
    "POST",
    "PRIOR",
    "SOL",
    "SPECIAL_TOKENS",
    "EvalFormat",
    "JointText",
    "LayoutArgs",
    "LayoutError",
    "estep_prompt",
    "joint_text",
    "layout_parts",
    "make_layout",
    "posterior_parts",
    "prior_parts",
    "raw_text",
    "register_layouts",
    "split_latent_generation",
    "to_spans",
]
