"""Lossless text units and the chunking that decides where latent thoughts go.

A document is cut into *units* (sentences, paragraphs or words), the units are grouped into
*chunks*, and every chunk gets one latent thought. Two invariants hold for every input string:

* the units concatenate back to the exact input (whitespace between units is attached to the
  start of the next unit, trailing whitespace to the last unit, leading whitespace and leading
  newlines to the first unit);
* the chunk suffixes concatenate back to the exact input.

Differences from the reference (``apps/main/gen_utils/chunk_gen.py`` of BoLT), all deliberate:

* The reference paragraph regex drops leading ``\\n``/``\\r`` of a document (and a ``\\r`` that
  starts a paragraph) and its word regex drops trailing whitespace. Here nothing is dropped.
* The reference splits sentences with an *untrained* nltk Punkt model. Its data cannot be
  downloaded here, and untrained Punkt splits after every abbreviation ("Dr." | "Smith").
  :func:`split_sentences` is a small rule-based splitter instead; ``docs/data.md`` lists where
  it differs from untrained Punkt.
* Empty documents have zero units and zero chunks; whitespace-only documents have one unit and
  one chunk (the whitespace). The reference crashes on both.
* The first chunk's prefix is ``""`` (the reference writes ``"N/A"`` and maps it back to an empty
  prefix in the E-step).

Random chunk boundaries reproduce the reference exactly for the same units: a per-document RNG
``default_rng((int(md5(text)) + seed) & 0xFFFFFFFF)`` (independent of sharding and order) draws
lengths ``min(Poisson(avg - min) + min, max, remaining)`` until the units run out.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

SPLIT_MODES = ("sentence", "paragraph", "word")

# A blank line: a newline, any whitespace, a newline. ``\s*`` is greedy, so the match ends at the
# last newline of a whitespace run and indentation of the next paragraph stays with it.
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A cut between words sits right after a non-space that is followed by whitespace then more text.
_WORD_BREAK = re.compile(r"\S(?=\s+\S)")
# Candidate sentence end: terminal punctuation, optional closing quotes/brackets, whitespace, and
# more text. The cut goes before the whitespace (whitespace starts the next unit).
_SENTENCE_END = re.compile(r"(?P<punct>[.!?\u2026]+)(?P<close>[\"'\u201d\u2019)\]}\u00bb]*)(?=\s+(?P<next>\S))")
_ONLY_SPACE = re.compile(r"\s*")
# A line-start enumerator such as "1." "b." "iv." (list items, multiple-choice options).
_ENUMERATOR = re.compile(r"(?:\d{1,3}|[A-Za-z]|[ivxlcIVXLC]{1,5})")

# Abbreviations after which a period never ends a sentence (compared lowercased, without the
# final period). Kept short on purpose: words like "etc." often do end sentences.
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt rev gen col lt sgt capt hon
    fig figs eq eqs eqn eqns vol vols ch chap sec secs thm lem prop cor def defn ex exs
    pp approx ca cf vs viz resp al e.g i.e a.k.a w.r.t
    jan feb mar apr jun jul aug sep sept oct nov dec
    """.split()
)
NUMBER_ABBREVIATIONS = frozenset({"no", "nos"})
"""Abbreviations only before a number ("No. 5"); "No." before a word ends a sentence."""
_SENTENCE_STARTERS = "\"'\u201c\u2018([{$\\"


def _is_space(s: str) -> bool:
    return _ONLY_SPACE.fullmatch(s) is not None


def _pieces(text: str, cuts: Sequence[int]) -> list[str]:
    """Cut ``text`` at increasing positions; whitespace-only pieces join their neighbour (the next
    one, or the previous one at the end) so that only whitespace-only documents have them."""
    if not text:
        return []
    out: list[str] = []
    pending = ""
    last = 0
    for cut in [*cuts, len(text)]:
        if cut <= last:
            continue
        piece = pending + text[last:cut]
        last = cut
        if _is_space(piece):
            pending = piece
            continue
        out.append(piece)
        pending = ""
    if pending:
        if out:
            out[-1] += pending
        else:
            out.append(pending)
    return out


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs end after a blank line (the whole blank-line run belongs to the paragraph)."""
    return _pieces(text, [m.end() for m in _PARAGRAPH_BREAK.finditer(text)])


def split_words(text: str) -> list[str]:
    """Each unit is one whitespace-delimited word with the whitespace before it."""
    return _pieces(text, [m.end() for m in _WORD_BREAK.finditer(text)])


def _can_start_sentence(ch: str) -> bool:
    """Sentences do not start lowercase or with an operator ("1 + 2 + ... + n", "n! = 120").
    Letters of caseless scripts (alphabetic, neither upper nor lower) may start one."""
    return ch.isupper() or ch.isdigit() or ch in _SENTENCE_STARTERS or (ch.isalpha() and not ch.islower())


def _ends_sentence(para: str, m: re.Match) -> bool:
    punct, nxt = m.group("punct"), m.group("next")
    if not _can_start_sentence(nxt):
        return False
    if punct != ".":
        if set(punct) <= {".", "\u2026"}:  # an ellipsis ends a sentence only before a capital
            return nxt.isupper() or nxt in _SENTENCE_STARTERS
        return True  # "?" "!" "?!" ...
    start = m.start()
    while start > 0 and not para[start - 1].isspace():
        start -= 1
    token = para[start : m.start()].lstrip("\"'\u201c\u2018([{")
    if token.lower() in ABBREVIATIONS or (token.lower() in NUMBER_ABBREVIATIONS and nxt.isdigit()):
        return False
    line_start = para.rfind("\n", 0, start) + 1
    if _ENUMERATOR.fullmatch(token) and _is_space(para[line_start:start]):
        return False  # "1. First item" / "A. 42" at the start of a line
    return True


def _sentence_cuts(para: str) -> list[int]:
    return [m.end() for m in _SENTENCE_END.finditer(para) if _ends_sentence(para, m)]


def split_sentences(text: str) -> list[str]:
    """Paragraphs first, then sentence ends inside each paragraph.

    A sentence ends at ``.``, ``!``, ``?`` or an ellipsis (plus closing quotes/brackets) followed
    by whitespace and a character that can start a sentence (uppercase letter, digit, opening
    quote/bracket, ``$`` or ``\\``). Not a sentence end: decimals (``3.14``: no whitespace),
    a following lowercase word or operator, known abbreviations (``Dr.``, ``Fig.``, ``e.g.``),
    line-start enumerators (``1.``, ``b.``), and an ellipsis before a digit.
    """
    units: list[str] = []
    for para in split_paragraphs(text):
        units.extend(_pieces(para, _sentence_cuts(para)))
    return units


_SPLITTERS: dict[str, Callable[[str], list[str]]] = {
    "sentence": split_sentences,
    "paragraph": split_paragraphs,
    "word": split_words,
}


def split_units(text: str, mode: str) -> list[str]:
    """Units of ``text`` under ``mode`` (one of :data:`SPLIT_MODES`)."""
    try:
        return _SPLITTERS[mode](text)
    except KeyError:
        raise ValueError(f"unknown split mode {mode!r}; expected one of {SPLIT_MODES}") from None


@dataclass
class ChunkArgs:
    """How documents are cut into chunks (reference defaults: sentences, 8/1/20, seed 42)."""

    split_mode: str = "sentence"
    """Unit kind: ``sentence``, ``paragraph`` or ``word``."""
    units_per_chunk: int = 8
    """Average units per chunk (random) or target chunk size (uniform)."""
    min_units_per_chunk: int = 1
    """Random chunking only: lengths are ``Poisson(avg - min) + min``."""
    max_units_per_chunk: int | None = 20
    """Random chunking only: cap on a chunk's length; ``None`` means no cap."""
    random: bool = True
    """Random lengths (data generation) or uniform chunks (ELBO evaluation)."""
    seed: int = 42
    """Added to the document hash to seed the per-document RNG."""
    prefix_chunks: int = 1
    """Prefix context = this many previous *chunks* (reference: 1 for teachers, 3 for the E-step)."""
    all_prefix: bool = False
    """Prefix context = all previous text (ELBO evaluation); overrides ``prefix_chunks``."""

    def validate(self) -> None:
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {self.split_mode!r}")
        if self.random and not 0 < self.min_units_per_chunk < self.units_per_chunk:
            raise ValueError(
                "random chunking needs 0 < min_units_per_chunk < units_per_chunk, got "
                f"{self.min_units_per_chunk} and {self.units_per_chunk}"
            )
        if self.units_per_chunk < 1:
            raise ValueError(f"units_per_chunk must be >= 1, got {self.units_per_chunk}")
        if self.max_units_per_chunk is not None and self.max_units_per_chunk < max(1, self.min_units_per_chunk):
            raise ValueError(f"max_units_per_chunk ({self.max_units_per_chunk}) is below min_units_per_chunk")
        if self.prefix_chunks < 1 and not self.all_prefix:
            raise ValueError(f"prefix_chunks must be >= 1, got {self.prefix_chunks}")


@dataclass(frozen=True)
class Chunk:
    """One chunk: its context (``prefix``), its text (``suffix``) and where the suffix sits."""

    prefix: str
    suffix: str
    start: int
    """Character offset of the suffix in the document."""
    end: int


def document_rng(text: str, seed: int) -> np.random.Generator:
    """The reference's per-document RNG: depends only on the text and the seed."""
    digest = int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)
    return np.random.default_rng((digest + seed) & 0xFFFFFFFF)


def random_chunk_lengths(
    num_units: int, rng: np.random.Generator, avg: int = 8, min_units: int = 1, max_units: int | None = 20
) -> list[int]:
    """Draw ``min(Poisson(avg - min) + min, max, remaining)`` until ``num_units`` are used."""
    lengths: list[int] = []
    remaining = num_units
    while remaining > 0:
        length = int(rng.poisson(avg - min_units)) + min_units
        if max_units:  # the reference treats 0 like None
            length = min(length, max_units)
        length = min(length, remaining)
        lengths.append(length)
        remaining -= length
    return lengths


def uniform_boundaries(num_units: int, avg: int = 8) -> list[int]:
    """``ceil(units / avg)`` chunks with ``linspace`` boundaries (sizes differ by at most one)."""
    n = math.ceil(num_units / avg)
    return [int(b) for b in np.linspace(0, num_units, n + 1).astype(int)]


def chunk_boundaries(text: str, num_units: int, args: ChunkArgs) -> list[int]:
    """Unit indices ``[0, b_1, ..., num_units]`` of the chunk boundaries (``[0]`` for no units)."""
    if not args.random:
        return uniform_boundaries(num_units, args.units_per_chunk)
    rng = document_rng(text, args.seed)
    lengths = random_chunk_lengths(
        num_units, rng, args.units_per_chunk, args.min_units_per_chunk, args.max_units_per_chunk
    )
    return [0, *np.cumsum(lengths, dtype=np.int64).tolist()]


def prefixes(suffixes: Sequence[str], prefix_chunks: int = 1, all_prefix: bool = False) -> list[str]:
    """Prefix of each chunk from the suffixes alone (records need not store prefixes)."""
    out = []
    for i in range(len(suffixes)):
        first = 0 if all_prefix else max(0, i - prefix_chunks)
        out.append("".join(suffixes[first:i]))
    return out


def chunk_text(text: str, args: ChunkArgs | None = None) -> list[Chunk]:
    """Cut ``text`` into chunks with their prefix context; the suffixes concatenate to ``text``."""
    args = args or ChunkArgs()
    units = split_units(text, args.split_mode)
    bounds = chunk_boundaries(text, len(units), args)
    offsets = np.cumsum([0, *map(len, units)]).tolist()
    suffixes = ["".join(units[a:b]) for a, b in zip(bounds, bounds[1:])]
    pres = prefixes(suffixes, args.prefix_chunks, args.all_prefix)
    return [
        Chunk(prefix=p, suffix=s, start=offsets[a], end=offsets[b])
        for p, s, a, b in zip(pres, suffixes, bounds, bounds[1:])
    ]


__all__ = [
    "ABBREVIATIONS",
    "NUMBER_ABBREVIATIONS",
    "Chunk",
    "ChunkArgs",
    "SPLIT_MODES",
    "chunk_boundaries",
    "chunk_text",
    "document_rng",
    "prefixes",
    "random_chunk_lengths",
    "split_paragraphs",
    "split_sentences",
    "split_units",
    "split_words",
    "uniform_boundaries",
]
