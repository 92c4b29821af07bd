"""Problems and the worlds that write and read them.

A *problem* is one terse statement of the synthetic corpus: a question sentence that sets up a
multi-step computation ("Solve 3x + 7 = 31.") and an answer sentence that states the result
without the work ("So x = 8."). The omitted work is the list of recorded :class:`Step` s
("31 - 7 = 24. 24 / 3 = 8."): the latent thought the oracle restores.

A *world* is a family of problems (linear equations, unit conversions, ...). Every world can
``sample`` a problem with a given number of steps and ``parse`` a question back into the same
problem, using one grammar for both directions. Most worlds are a list of fixed-shape
:class:`Template` s (:class:`TemplateWorld`); the shopping world chains a variable number of
clauses (:class:`ChainWorld`). The concrete templates live in :mod:`.templates`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from apps.bolt.synthetic.arith import Calc, Pattern, Reject, Step

LATENT_STYLES = ("steps", "restate")
"""How a problem's latent thought is written: ``steps`` = the derivation only ("31 - 7 = 24.
24 / 3 = 8."); ``restate`` = the question first, then the derivation, so the thought ties the
numbers it uses to the sentence they come from."""

_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Problem:
    """One statement: question sentence + answer sentence, and the steps the text leaves out."""

    world: str
    template: str
    question: str
    answer_sentence: str
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    @property
    def line(self) -> str:
        """The statement as it appears in a document."""
        return f"{self.question} {self.answer_sentence}"

    @property
    def derivation(self) -> str:
        return " ".join(step.text() for step in self.steps)

    @property
    def key(self) -> str:
        """The computation itself, independent of wording: the train/eval split hashes this, so
        no evaluation problem's chain of steps appears anywhere in the training corpus."""
        return ";".join(step.key() for step in self.steps)

    @property
    def answer_offset(self) -> int:
        """Offset of the answer number inside :attr:`answer_sentence` (its only number)."""
        m = _NUMBER.search(self.answer_sentence)
        assert m is not None and int(m.group()) == self.answer, self.answer_sentence
        return m.start()

    def latent(self, style: str = "steps") -> str:
        if style == "steps":
            return self.derivation
        if style == "restate":
            return f"{self.question} {self.derivation}"
        raise ValueError(f"unknown latent style {style!r}; expected one of {LATENT_STYLES}")


class Sampler:
    """Draws the free numbers of a problem from one seeded generator.

    Free operands are whole numbers in ``[2, 10**digits - 1]``: never 0 or 1, so no step is
    trivial and every noun stays plural. Stated numbers built from them (an equation's right-hand
    side, a price) may go up to ``limit``.
    """

    def __init__(self, rng: np.random.Generator, digits: int, limit: int):
        self.rng = rng
        self.lo, self.hi = 2, 10**digits - 1
        self.limit = limit
        """The largest number the problem may state (``WorldArgs.max_value``)."""

    def num(self, lo: int | None = None, hi: int | None = None) -> int:
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        if hi < lo:
            raise Reject(f"empty range [{lo}, {hi}]")
        return int(self.rng.integers(lo, hi + 1))

    def pick(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]


Program = Callable[[Calc, dict], int]
SlotSampler = Callable[[Sampler, int], dict]


@dataclass(frozen=True)
class Template:
    """A fixed-shape problem: question/answer patterns, a program, and a slot sampler.

    ``sample(sampler, n_steps)`` returns question slots meant to produce ``n_steps`` steps (it
    may raise :class:`Reject`); ``program(calc, slots)`` computes the answer on ``calc``.
    ``step_counts`` and ``ops`` declare what the template can produce, so the generator can pick
    templates that fit the difficulty knobs without trying them.
    """

    name: str
    question: Pattern
    answer: Pattern
    program: Program
    sample: SlotSampler
    step_counts: frozenset[int]
    ops: frozenset[str]


class World:
    """A family of problems; subclasses implement sampling and parsing."""

    name: str

    def step_counts(self, ops: str) -> set[int]:
        """Step counts this world can produce using only the operations in ``ops``."""
        raise NotImplementedError

    def sample(self, sampler: Sampler, n_steps: int, ops: str) -> Problem:
        """A problem with exactly ``n_steps`` steps, no value above ``sampler.limit``; may raise
        :class:`Reject` (the caller draws again)."""
        raise NotImplementedError

    def parse(self, question: str) -> Problem | None:
        """The problem whose question is exactly ``question``, or None."""
        raise NotImplementedError


def _problem(world: str, template: str, question: str, answer: Pattern, slots: dict, calc: Calc, ans: int) -> Problem:
    return Problem(world, template, question, answer.render({**slots, "ans": ans}), tuple(calc.steps))


class TemplateWorld(World):
    def __init__(self, name: str, templates: Sequence[Template]):
        self.name = name
        self.templates = list(templates)

    def _usable(self, ops: str) -> list[Template]:
        return [t for t in self.templates if t.ops <= set(ops)]

    def step_counts(self, ops: str) -> set[int]:
        return set().union(*(t.step_counts for t in self._usable(ops)))

    def sample(self, sampler: Sampler, n_steps: int, ops: str) -> Problem:
        options = [t for t in self._usable(ops) if n_steps in t.step_counts]
        if not options:
            raise Reject(f"world {self.name} has no {n_steps}-step template using ops {ops!r}")
        template = sampler.pick(options)
        slots = template.sample(sampler, n_steps)
        calc = Calc(sampler.limit)
        ans = template.program(calc, slots)
        if len(calc.steps) != n_steps:  # a template bug, not bad luck
            raise AssertionError(f"{template.name} made {len(calc.steps)} steps, asked for {n_steps}")
        return _problem(self.name, template.name, template.question.render(slots), template.answer, slots, calc, ans)

    def parse(self, question: str) -> Problem | None:
        for template in self.templates:
            slots = template.question.fullmatch(question)
            if slots is None:
                continue
            calc = Calc()
            try:
                ans = template.program(calc, slots)
            except (Reject, KeyError):
                continue
            return _problem(self.name, template.name, question, template.answer, slots, calc, ans)
        return None


@dataclass(frozen=True)
class Clause:
    """One modifier of a chain problem ("gives away {c}"): ``steps`` operations, some ``ops``."""

    name: str
    pattern: Pattern
    steps: int
    ops: frozenset[str]
    final_only: bool = False
    """Changes what is counted (packing into bags), so nothing may follow it."""
    needs_groups: bool = False
    """Refers to the group size ``b`` of a product start ("buys 3 more boxes")."""


class ChainWorld(World):
    """Shopping stories: a start clause then modifiers joined by ", then ".

    "Mia has 4 boxes of 7 pens, then gives away 5, then gets 9 more." / "Mia ends with 32 pens."
    The start is a product ("4 boxes of 7 pens", one step) or a plain count (no step); each
    modifier adds one or two steps; packing into bags divides and may only come last (it changes
    what is being counted, hence its own answer sentence). Sampling and parsing share
    :meth:`_run`, so a parsed story recomputes exactly the steps it was written from.
    """

    JOIN = ", then "
    MAX_STEPS = 5

    def __init__(
        self,
        name: str,
        starts: Sequence[tuple[Pattern, int]],
        clauses: Sequence[Clause],
        answers: dict[str, Pattern],
        names: Sequence[str],
        goods: Sequence[tuple[str, str]],
        scale_verbs: dict[str, int],
    ):
        self.name = name
        self.starts = list(starts)  # (pattern, steps): steps is 1 for a product, 0 for a count
        self.clauses = list(clauses)
        self.answers = answers  # "count" and "bags"
        self.names = list(names)
        self.goods = list(goods)  # (container plural, item plural)
        self.scale_verbs = scale_verbs

    def _usable(self, ops: str) -> list[Clause]:
        return [c for c in self.clauses if c.ops <= set(ops)]

    def step_counts(self, ops: str) -> set[int]:
        usable = self._usable(ops)
        # states: (steps so far, started with a product) of chains that may still grow
        states = {(s, s > 0) for _, s in self.starts if s == 0 or "*" in ops}
        counts = {n for n, _ in states if n > 0}
        while states:
            grown = set()
            for n, groups in states:
                for c in usable:
                    if n + c.steps > self.MAX_STEPS or (c.needs_groups and not groups):
                        continue
                    counts.add(n + c.steps)
                    if not c.final_only:
                        grown.add((n + c.steps, groups))
            states = grown
        return counts

    def sample(self, sampler: Sampler, n_steps: int, ops: str) -> Problem:
        start_pat, start_steps = sampler.pick([s for s in self.starts if s[1] <= n_steps and (s[1] == 0 or "*" in ops)])
        container, item = sampler.pick(self.goods)
        slots = {"name": sampler.pick(self.names), "cs": container, "items": item, "a": sampler.num()}
        if start_steps:
            slots["b"] = sampler.num()
        calc = Calc(sampler.limit)
        value = self._start(slots, start_steps, calc)
        parts = [start_pat.render(slots)]
        final = "count"
        while len(calc.steps) < n_steps:
            left = n_steps - len(calc.steps)
            options = [
                c
                for c in self._usable(ops)
                if c.steps <= left and (not c.final_only or c.steps == left) and (not c.needs_groups or start_steps)
            ]
            if not options:
                raise Reject("no clause fits the remaining steps")
            clause = sampler.pick(options)
            cslots = self._sample_clause(clause, value, sampler)
            value = self._run(clause, value, slots, cslots, calc)
            parts.append(clause.pattern.render({**slots, **cslots}))
            final = "bags" if clause.final_only else final
        question = self.JOIN.join(parts) + "."
        return Problem(self.name, "chain", question, self.answers[final].render({**slots, "ans": value}), tuple(calc.steps))

    @staticmethod
    def _start(slots: dict, start_steps: int, calc: Calc) -> int:
        return calc.mul(slots["a"], slots["b"]) if start_steps else slots["a"]

    def _sample_clause(self, clause: Clause, value: int, sampler: Sampler) -> dict:
        """Numbers for ``clause`` that keep the story whole (nothing negative, exact packing)."""
        if clause.name == "scale":
            return {"verb": sampler.pick(sorted(self.scale_verbs))}
        if clause.name == "lose":
            return {"c": sampler.num(hi=min(sampler.hi, value - 1))}
        if clause.name == "pack":
            divisors = [d for d in range(sampler.lo, min(sampler.hi, value - 1) + 1) if value % d == 0]
            if not divisors:
                raise Reject(f"{value} has no divisor to pack by")
            return {"c": sampler.pick(divisors)}
        return {"c": sampler.num()}

    def _run(self, clause: Clause, value: int, slots: dict, cslots: dict, calc: Calc) -> int:
        if clause.name == "gain":
            return calc.add(value, cslots["c"])
        if clause.name == "lose":
            return calc.sub(value, cslots["c"])
        if clause.name == "buy_groups":
            return calc.add(value, calc.mul(cslots["c"], slots["b"]))
        if clause.name == "scale":
            return calc.mul(value, self.scale_verbs[cslots["verb"]])
        if clause.name == "pack":
            return calc.div(value, cslots["c"])
        raise AssertionError(f"clause {clause.name!r} has no program")

    def _match_first(self, options: list[tuple[Pattern, object]], body: str, pos: int) -> tuple[object, dict, int] | None:
        """The first option whose pattern matches at ``pos`` and ends a clause there (the end of
        the story or a join): "packs them into bags" must not stop at "{verb} them"."""
        for pattern, tag in options:
            got = pattern.match(body, pos)
            if got is not None and (got[1] == len(body) or body.startswith(self.JOIN, got[1])):
                return tag, got[0], got[1]
        return None

    def parse(self, question: str) -> Problem | None:
        if not question.endswith("."):
            return None
        body = question[:-1]
        found = self._match_first(self.starts, body, 0)
        if found is None:
            return None
        start_steps, slots, pos = found
        calc = Calc()
        final = "count"
        try:
            value = self._start(slots, start_steps, calc)
            while pos < len(body):
                if final == "bags" or not body.startswith(self.JOIN, pos):
                    return None
                got = self._match_first([(c.pattern, c) for c in self.clauses], body, pos + len(self.JOIN))
                if got is None:
                    return None
                clause, cslots, pos = got
                if cslots.pop("cs", slots.get("cs")) != slots.get("cs"):
                    return None
                value = self._run(clause, value, slots, cslots, calc)
                final = "bags" if clause.final_only else final
        except (Reject, KeyError):
            return None
        return Problem(self.name, "chain", question, self.answers[final].render({**slots, "ans": value}), tuple(calc.steps))
