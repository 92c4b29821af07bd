"""Building blocks of the synthetic world: recorded arithmetic steps and two-way text patterns.

Two ideas keep the generator and the oracle from ever disagreeing:

* A problem's answer is computed by a small *program* that runs on a :class:`Calc`. Every
  operation is recorded as a :class:`Step` (``"4 * 7 = 28."``); the recorded steps are the
  derivation that the document leaves out and that the latent thought restores. The generator
  and the oracle run the same program, the generator on the numbers it sampled, the oracle on the
  numbers it parsed back out of the text.
* Sentences are written from :class:`Pattern` format strings (``"Solve {a}{v} + {b} = {c}."``)
  and parsed back with a regex compiled from the same string, so the grammar exists once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

OPS = "+-*/"
"""The four operations a step may use (also the alphabet of ``WorldArgs.ops``)."""


class Reject(ValueError):
    """Sampled numbers break a constraint (inexact division, negative or too large result)."""


@dataclass(frozen=True)
class Step:
    """One recorded operation ``a op b = result``."""

    op: str
    a: int
    b: int
    result: int

    def text(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result}."

    def key(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.result}"


class Calc:
    """Arithmetic on non-negative integers that records every step.

    ``limit`` bounds every intermediate value (the generator's ``max_value`` knob); the oracle
    passes ``None`` because it must derive whatever the text states. Subtraction must not go
    below zero and division must be exact in both cases, since the world only has whole numbers.
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.steps: list[Step] = []

    def _record(self, op: str, a: int, b: int, result: int) -> int:
        if result < 0:
            raise Reject(f"{a} {op} {b} is negative")
        if self.limit is not None and result > self.limit:
            raise Reject(f"{a} {op} {b} = {result} exceeds {self.limit}")
        self.steps.append(Step(op, a, b, result))
        return result

    def add(self, a: int, b: int) -> int:
        return self._record("+", a, b, a + b)

    def sub(self, a: int, b: int) -> int:
        return self._record("-", a, b, a - b)

    def mul(self, a: int, b: int) -> int:
        return self._record("*", a, b, a * b)

    def div(self, a: int, b: int) -> int:
        if b == 0 or a % b:
            raise Reject(f"{a} / {b} is not a whole number")
        return self._record("/", a, b, a // b)

    def apply(self, op: str, a: int, b: int) -> int:
        return {"+": self.add, "-": self.sub, "*": self.mul, "/": self.div}[op](a, b)


# Slot kinds of a pattern: the regex each kind of placeholder matches.
_KIND_REGEX = {"num": r"\d+", "word": r"[A-Za-z]+", "var": r"[a-z]"}
_FIELD = re.compile(r"\{(\w+)\}")


class Pattern:
    """A sentence template that renders with ``str.format`` and parses with a regex.

    ``Pattern("Solve {a}{v} + {b} = {c}.", v="var")``: every placeholder is a number unless its
    kind is given (``word``: a capitalised or plain word, ``var``: one lowercase letter). A
    placeholder used twice must hold the same text both times (a regex back-reference).
    """

    def __init__(self, template: str, **kinds: str):
        self.template = template
        self.fields = list(dict.fromkeys(_FIELD.findall(template)))
        unknown = set(kinds) - set(self.fields)
        if unknown:
            raise ValueError(f"pattern {template!r} has no field(s) {sorted(unknown)}")
        self.kinds = {f: kinds.get(f, "num") for f in self.fields}
        parts, seen, pos = [], set(), 0
        for m in _FIELD.finditer(template):
            parts.append(re.escape(template[pos : m.start()]))
            name = m.group(1)
            if name in seen:
                parts.append(f"(?P={name})")
            else:
                seen.add(name)
                parts.append(f"(?P<{name}>{_KIND_REGEX[self.kinds[name]]})")
            pos = m.end()
        parts.append(re.escape(template[pos:]))
        self.regex = re.compile("".join(parts))

    def render(self, slots: Mapping[str, object]) -> str:
        return self.template.format(**slots)

    def match(self, text: str, pos: int = 0) -> tuple[dict[str, int | str], int] | None:
        """Parse the pattern at ``text[pos:]``; return the slots (numbers as ints) and the end."""
        m = self.regex.match(text, pos)
        if m is None:
            return None
        slots = {k: int(v) if self.kinds[k] == "num" else v for k, v in m.groupdict().items()}
        if any(self.kinds[k] == "num" and str(slots[k]) != m.group(k) for k in self.fields):
            return None  # "07" is not a number this world writes
        return slots, m.end()

    def fullmatch(self, text: str) -> dict[str, int | str] | None:
        found = self.match(text)
        if found is None or found[1] != len(text):
            return None
        return found[0]

    def __repr__(self) -> str:
        return f"Pattern({self.template!r})"
