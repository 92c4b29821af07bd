"""Arithmetic drills: the world's background knowledge, for pretraining a base model.

The paper bootstraps from TinyLlama, a model that already knows arithmetic and language before
it ever sees a latent thought; its thoughts are right often enough for importance resampling to
have something to select. A freshly initialized toy model knows nothing, so its first thoughts
are almost never right (measured: docs/science.md). The synthetic analog of that pretrained
knowledge is a drill corpus of the arithmetic facts the world uses, one per line::

    Arithmetic drill 17

    24 / 3 = 8.
    9 * 3 = 27.
    36 + 5 = 41.

Facts are the steps of *training* problems (drawn exactly like the corpus's problems, from the
training share of the instance hash, so the step distribution is the world's), shuffled within a
document and stripped of their questions: a drill says what ``24 / 3`` is, never which steps a
question needs. No evaluation problem is ever drawn, and a single fact carries no problem's
computation (the split hashes a problem's whole chain of steps).

Document ``i`` of seed ``s`` comes from its own stream ``SeedSequence([s, FACTS_STREAM, i])``, so
drills do not depend on how many are drawn, and never coincide with the corpus's streams.
"""

from __future__ import annotations

from collections.abc import Iterator

from apps.bolt.synthetic.corpus import (
    WorldArgs,
    make_world_args,
    sample_problem,
    stream,
)

FACTS_STREAM = 7
"""Random stream ids of the drills: this one for the facts, the next for titles and lengths (the
corpus uses 0, the evaluation splits 1-3)."""

TITLES = ("Arithmetic drill {n}", "Facts to know, set {n}", "Mental math {n}", "Times and sums {n}")

# Reading drills: a phrase that names two numbers and an operation, then the equation it means.
# The phrasings are generic (none is a sentence of the world's templates); what they teach is
# to find numbers in text and put them in the right order in an equation, which a pretrained LM
# brings to its first thoughts and a fresh toy model has to learn from the thoughts themselves.
PHRASES = {
    "+": ("Put {b} with {a}", "Add {a} and {b}", "{b} more than {a}", "Start at {a} and count on {b}"),
    "-": ("Take {b} from {a}", "{a} minus {b}", "{b} less than {a}", "From {a}, remove {b}"),
    "*": ("{a} groups of {b}", "Multiply {a} by {b}", "{a} rows of {b}", "{b} taken {a} times"),
    "/": ("Share {a} among {b}", "Divide {a} by {b}", "Split {a} into {b} equal parts", "How many {b}s are in {a}"),
}


def fact_lines(index: int, seed: int, args: WorldArgs, facts: int, words: float = 0.0) -> list[str]:
    """The ``facts`` lines of drill ``index``: steps of fresh training problems, shuffled; a share
    ``words`` of them written as reading drills ("Take 5 from 31: 31 - 5 = 26.")."""
    rng = stream(seed, FACTS_STREAM, index)
    steps = []
    while len(steps) < facts:
        steps.extend(sample_problem(rng, args).steps)
    steps = steps[:facts]
    order = rng.permutation(len(steps))
    lines = []
    for i in order:
        step = steps[i]
        if words > 0 and rng.random() < words:
            phrase = PHRASES[step.op][int(rng.integers(len(PHRASES[step.op])))].format(a=step.a, b=step.b)
            lines.append(f"{phrase}: {step.text()}")
        else:
            lines.append(step.text())
    return lines


def generate_drill(index: int, seed: int, args: WorldArgs, min_facts: int = 12, max_facts: int = 24,
                   words: float = 0.0) -> dict:
    """Drill document ``index`` (``{"id", "text", "source", "seed", "facts"}``)."""
    rng = stream(seed, FACTS_STREAM + 1, index)  # title and length: a stream apart from the facts
    title = TITLES[int(rng.integers(len(TITLES)))].format(n=int(rng.integers(1, 100)))
    lines = fact_lines(index, seed, args, int(rng.integers(min_facts, max_facts + 1)), words)
    return {"id": f"drill-{seed}-{index:07d}", "text": title + "\n\n" + "\n".join(lines), "source": "synthetic_drill",
            "seed": seed, "facts": len(lines)}


def generate_drills(num_docs: int, seed: int = 0, *, start: int = 0, min_facts: int = 12, max_facts: int = 24,
                    words: float = 0.0, args: WorldArgs | None = None, **knobs) -> Iterator[dict]:
    """Drill documents ``start .. start + num_docs - 1`` (a ``source.generator`` for prepare);
    ``words``: share of lines written as reading drills (:data:`PHRASES`); ``knobs`` are the
    world's difficulty knobs (:class:`~apps.bolt.synthetic.corpus.WorldArgs`), which must match
    the corpus's so the drills teach the arithmetic the corpus uses."""
    if not 1 <= min_facts <= max_facts:
        raise ValueError(f"need 1 <= min_facts <= max_facts, got {min_facts}, {max_facts}")
    if not 0.0 <= words <= 1.0:
        raise ValueError(f"words must be in [0, 1], got {words}")
    world = make_world_args(args, **knobs)
    for index in range(start, start + num_docs):
        yield generate_drill(index, seed, world, min_facts, max_facts, words)
