"""The synthetic corpus: difficulty knobs, the train/eval instance split, documents, and the
parser that finds the statements of a document (or of any window of one) again.

A document reads like a terse worksheet from the web: a title line, a blank line, then one
statement per line, each a question sentence and an answer sentence without the work::

    Practice set 12

    Solve 3x + 7 = 31. So x = 8.
    Mia has 4 boxes of 7 pens, then gives away 5. Mia ends with 23 pens.
    Convert 3 feet 5 inches to inches. That is 41 inches.

Why two sentences per statement: the chunker cuts at sentence ends, so a chunk boundary often
falls between a question and its answer (about half the time with the world's chunking,
:func:`apps.bolt.synthetic.oracle.synthetic_chunk_args`). The latent thought of the chunk that
starts with the answer then sits exactly where a model needs the work ("...= 31.<thought> So
x = 8."), which is also the shape of the latent variant of the evaluation task (:mod:`.tasks`).

Records are raw documents ``{"id", "text", "source", "seed", "problems"}``; ``problems`` lists
what the generator wrote (world, template, line, answer, derivation) for tests and statistics.
The latent records (``chunks``) are made downstream by chunking ``text`` and asking the oracle
teacher (:mod:`.oracle`), exactly like the LLM-teacher path.

Determinism: document ``i`` of seed ``s`` is drawn from its own stream
``SeedSequence([s, CORPUS_STREAM, i])``, so it does not depend on how many documents are drawn
or in which shard. No global random state is touched.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from apps.bolt.synthetic.arith import OPS, Reject
from apps.bolt.synthetic.templates import WORLDS
from apps.bolt.synthetic.worlds import Problem, Sampler

CORPUS_STREAM = 0
EVAL_STREAMS = {"fewshot": 1, "dev": 2, "test": 3}
# Each evaluation split owns a fixed slice of the evaluation share of the hash range, so the
# three are disjoint from each other (and from training) for any seeds.
EVAL_SPLITS = {"fewshot": (0.0, 0.1), "dev": (0.1, 0.4), "test": (0.4, 1.0)}
MAX_TRIES = 2000
PROBES = 500

TITLES = (
    "Practice set {n}",
    "Worked answers, part {n}",
    "Homework {n}: answers",
    "Quick facts #{n}",
    "Review sheet {n}",
    "Math drills, day {n}",
)


@dataclass
class WorldArgs:
    """Difficulty knobs of the synthetic world (shared by the corpus and the eval tasks)."""

    worlds: list[str] = field(default_factory=lambda: list(WORLDS))
    """Problem families to draw from (see :mod:`.templates`)."""
    min_steps: int = 2
    """Fewest derivation steps per statement."""
    max_steps: int = 3
    """Most derivation steps per statement."""
    digits: int = 1
    """Free operands have at most this many digits (they are drawn from 2 .. 10**digits - 1)."""
    max_value: int = 99
    """No stated number, intermediate value or answer exceeds this."""
    ops: str = "+-*/"
    """Operations a derivation may use."""
    min_problems: int = 4
    """Fewest statements per document."""
    max_problems: int = 8
    """Most statements per document."""
    eval_fraction: float = 0.1
    """Share of problem instances (hashed by their computation) reserved for evaluation; the
    corpus never contains them. Evaluation must use a share no larger than the corpus's."""

    def validate(self) -> None:
        unknown = [w for w in self.worlds if w not in WORLDS]
        if unknown or not self.worlds:
            raise ValueError(f"worlds: unknown {unknown} (available: {list(WORLDS)})")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 1 <= self.digits <= 4:
            raise ValueError(f"digits must be in 1..4, got {self.digits}")
        if self.max_value < 10:
            raise ValueError(f"max_value must be at least 10, got {self.max_value}")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"ops must be a non-empty subset of {OPS!r}, got {self.ops!r}")
        if not 1 <= self.min_problems <= self.max_problems:
            raise ValueError(f"need 1 <= min_problems <= max_problems, got {self.min_problems}, {self.max_problems}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not self.step_options():
            raise ValueError(
                f"no world in {self.worlds} makes {self.min_steps}-{self.max_steps} step problems with ops {self.ops!r}"
            )

    def step_options(self) -> dict[str, list[int]]:
        """World name -> the step counts it can make within the knobs (worlds with none dropped)."""
        return _step_options(tuple(self.worlds), self.min_steps, self.max_steps, self.digits, self.max_value, self.ops)


@functools.lru_cache(maxsize=64)
def _step_options(worlds: tuple[str, ...], lo: int, hi: int, digits: int, max_value: int, ops: str) -> dict[str, list[int]]:
    """Step counts a world's grammar allows, kept only if a probe actually draws one: the bounds
    on values can rule out a shape the grammar allows (four subtractions from a one-digit
    number)."""
    out = {}
    for name in worlds:
        counts = []
        for n in sorted(WORLDS[name].step_counts(ops) & set(range(lo, hi + 1))):
            sampler = Sampler(np.random.default_rng(n), digits, max_value)
            for _ in range(PROBES):
                try:
                    problem = WORLDS[name].sample(sampler, n, ops)
                except Reject:
                    continue
                if _within(problem, max_value):
                    counts.append(n)
                    break
        if counts:
            out[name] = counts
    return out


def _within(problem: Problem, max_value: int) -> bool:
    """Stated numbers are bounded too, not just results (an equation's right-hand side)."""
    return max(max(s.a, s.b) for s in problem.steps) <= max_value


def make_world_args(args: WorldArgs | None = None, **knobs) -> WorldArgs:
    """``args`` with ``knobs`` applied (unknown knob names are a TypeError), validated."""
    base = asdict(args) if args is not None else {}
    out = WorldArgs(**{**base, **knobs})
    out.validate()
    return out


def hash_unit(key: str) -> float:
    """A stable number in [0, 1) for a problem key (blake2b; no dependence on PYTHONHASHSEED)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"bolt-synth").digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(problem: Problem, eval_fraction: float) -> str:
    """``train`` or the evaluation split (``fewshot``/``dev``/``test``) this instance belongs to."""
    u = hash_unit(problem.key)
    if u >= eval_fraction:
        return "train"
    u /= eval_fraction
    return next(name for name, (lo, hi) in EVAL_SPLITS.items() if lo <= u < hi)


def sample_problem(rng: np.random.Generator, args: WorldArgs, split: str = "train", world: str | None = None) -> Problem:
    """A problem of ``split`` (rejection-sampled against the hash split), from ``world`` or a
    uniformly chosen one, with a step count drawn uniformly from those the world can make."""
    options = args.step_options()
    if world is not None and world not in options:
        raise ValueError(f"world {world!r} makes no problems within the knobs ({options})")
    sampler = Sampler(rng, args.digits, args.max_value)
    names = list(options)
    for _ in range(MAX_TRIES):
        name = world or sampler.pick(names)
        try:
            problem = WORLDS[name].sample(sampler, sampler.pick(options[name]), args.ops)
        except Reject:
            continue
        if _within(problem, args.max_value) and split_of(problem, args.eval_fraction) == split:
            return problem
    raise RuntimeError(f"no {split} problem found in {MAX_TRIES} draws for world={world} and knobs {args}")


def stream(seed: int, stream_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream_id, index]))


def generate_document(index: int, seed: int, args: WorldArgs) -> dict:
    """Document ``index`` of the corpus with ``seed`` (see the module docstring for the layout)."""
    rng = stream(seed, CORPUS_STREAM, index)
    title = TITLES[int(rng.integers(len(TITLES)))].format(n=int(rng.integers(1, 100)))
    problems = [sample_problem(rng, args) for _ in range(int(rng.integers(args.min_problems, args.max_problems + 1)))]
    return {
        "id": f"synth-{seed}-{index:07d}",
        "text": title + "\n\n" + "\n".join(p.line for p in problems),
        "source": "synthetic",
        "seed": seed,
        "problems": [
            {"world": p.world, "template": p.template, "line": p.line, "answer": p.answer, "derivation": p.derivation}
            for p in problems
        ],
    }


def generate_corpus(num_docs: int, seed: int = 0, *, start: int = 0, args: WorldArgs | None = None, **knobs) -> Iterator[dict]:
    """Raw documents ``start .. start + num_docs - 1``; ``knobs`` override fields of ``args``."""
    world = make_world_args(args, **knobs)
    for index in range(start, start + num_docs):
        yield generate_document(index, seed, world)


# --- finding statements in text -----------------------------------------------------------------
@dataclass(frozen=True)
class Located:
    """A statement found in a text window."""

    problem: Problem
    line_start: int
    answer_pos: int
    """Window offset of the answer number's first digit (where the statement's result is)."""
    stated_ok: bool
    """The visible text after the question agrees with the recomputed answer sentence."""


@dataclass(frozen=True)
class Fragment:
    """A piece of a line in the window that looks like part of a statement but does not parse
    (typically a statement whose question lies before the window)."""

    start: int
    end: int


_LINE = re.compile(r"[^\n]*")


def parse_question(question: str) -> Problem | None:
    """The problem posed by ``question`` in any world, or None."""
    for world in WORLDS.values():
        problem = world.parse(question)
        if problem is not None:
            return problem
    return None


def find_problems(window: str) -> tuple[list[Located], list[Fragment]]:
    """Every statement whose question is complete in ``window``, and the unparsed fragments.

    A statement's question is the text from a line start to its first sentence end (". " or
    the end of the window); its answer sentence follows after one space, possibly cut by the
    window end. A question cut by the window start never parses: no proper tail of a question of
    this world is itself a question (tested), so a cut statement is never misread.
    """
    found: list[Located] = []
    fragments: list[Fragment] = []
    for m in _LINE.finditer(window):
        line, start = m.group(), m.start()
        if not line.strip():
            continue
        cut = line.find(". ")
        q_end = cut + 1 if cut >= 0 else (len(line) if line.endswith(".") else -1)
        problem = parse_question(line[:q_end]) if q_end > 0 else None
        if problem is None:
            if q_end > 0:
                fragments.append(Fragment(start, m.end()))
            continue
        rest = line[q_end:]
        expected = " " + problem.answer_sentence
        ok = expected.startswith(rest) if len(rest) < len(expected) else rest.startswith(expected)
        found.append(Located(problem, start, start + q_end + 1 + problem.answer_offset, ok))
    return found, fragments
