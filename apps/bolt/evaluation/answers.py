"""Answer extraction and grading for the CoT evaluation tasks (one place, table-tested).

Every task YAML points its filters and ``process_results`` here (through
:mod:`apps.bolt.evaluation.task_functions`), so the regexes that decide accuracy are the ones the
answer-extraction test table exercises, not copies pasted into YAML.

Extraction styles, as in the reference harness (the original BoLT code's lm-eval task files):

* ``strict``: the number right after "answer is" (the exemplars end with
  "The final answer is N. I hope it is correct."); the first such phrase wins.
* ``flexible``: the last number anywhere in the generation.
* ``latent_*``: the same two, applied to the latent thought only, i.e. the text before the first
  ``<|END_OF_LATENT|>``; a generation that never closes its thought has no latent answer.
* MATH: math-verify equivalence between the gold answer and the final answer of the generation.
* multiple choice: ``(X)`` after "answer is" (strict) or the last ``(X)`` (flexible).

Numbers are normalised before comparison (``$``, thousands separators, a trailing period and
trailing zero decimals are removed), so "$1,200.00" and "1200" compare equal.
"""

from __future__ import annotations

import re
import threading

from apps.bolt.formats import EOL, split_latent_generation

INVALID = "[invalid]"
"""What a filter returns when it finds no answer (lm-eval's convention)."""


# digits with optional thousands groups ("1,234" but not "3,4") and an optional decimal part
_DIGITS = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
STRICT_NUMBER_RE = re.compile(r"answer is:?\s*\$?\s?(-?" + _DIGITS + ")", re.IGNORECASE)
FLEXIBLE_NUMBER_RE = re.compile(r"(?:(?<!\w)-)?\$?" + _DIGITS)  # "3-5" is not "-5"
STRICT_CHOICE_RE = re.compile(r"answer is:?\s*\(([A-J])\)", re.IGNORECASE)
FLEXIBLE_CHOICE_RE = re.compile(r"\(([A-J])\)", re.IGNORECASE)
_MATH_FINAL_RE = re.compile(r"final answer is:?\s*(.+?)\.?\s*I hope it is correct", re.IGNORECASE | re.DOTALL)


def normalize_number(text: str) -> str:
    """Canonical text of a number: no ``$``, spaces or thousands commas, no trailing period, and
    integral decimals written as integers ("12.50" -> "12.5", "3.0" -> "3"). Non-numbers pass
    through stripped."""
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not re.fullmatch(r"-?[0-9]+(?:\.[0-9]+)?", s):
        return text.strip()
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def latent_part(text: str) -> str | None:
    """The latent thought of a latent-variant generation: the text before the first
    ``<|END_OF_LATENT|>``, or None when the thought was never closed."""
    return split_latent_generation(text)[0]


def strict_number(text: str) -> str:
    """The number after the first "answer is", normalised; :data:`INVALID` when absent."""
    m = STRICT_NUMBER_RE.search(text)
    return normalize_number(m.group(1)) if m else INVALID


def flexible_number(text: str) -> str:
    """The last number in ``text``, normalised; :data:`INVALID` when there is none."""
    found = FLEXIBLE_NUMBER_RE.findall(text)
    return normalize_number(found[-1]) if found else INVALID


def strict_choice(text: str) -> str:
    """``(X)`` after the first "answer is"; :data:`INVALID` when absent."""
    m = STRICT_CHOICE_RE.search(text)
    return f"({m.group(1).upper()})" if m else INVALID


def flexible_choice(text: str) -> str:
    """The last ``(X)`` in ``text``; :data:`INVALID` when there is none."""
    found = FLEXIBLE_CHOICE_RE.findall(text)
    return f"({found[-1].upper()})" if found else INVALID


def on_latent(extract, text: str) -> str:
    """Apply an extractor to the latent thought only (``latent-*`` filters)."""
    part = latent_part(text)
    return INVALID if part is None else extract(part)


def gsm8k_gold(answer_field: str) -> str:
    """Gold number of a GSM8K record: the text after ``####`` (the whole field when absent)."""
    return normalize_number(answer_field.split("####")[-1])


# ---------------------------------------------------------------------------------- MATH
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def math_gold(solution: str) -> str:
    """Gold answer of a MATH record: the last boxed expression of its solution."""
    boxed = last_boxed(solution)
    if boxed is None:
        raise ValueError(f"MATH solution has no \\boxed{{}} answer: {solution[:80]!r}")
    return boxed


def math_final_answer(generation: str) -> str:
    """The part of a generation that states the final answer, for math-verify.

    Order: the sentence "The final answer is X. I hope it is correct." (the exemplars' format),
    else the last ``\\boxed{}``, else the text after the latent thought, else everything.
    """
    m = _MATH_FINAL_RE.findall(generation)
    if m:
        return m[-1].strip()
    boxed = last_boxed(generation)
    if boxed is not None:
        return boxed
    cut = generation.rfind(EOL)
    return generation[cut + len(EOL) :] if cut >= 0 else generation


def _as_math(expr: str) -> str:
    """Wrap a bare expression in ``$...$`` so math-verify's LaTeX extractor sees it whole."""
    s = expr.strip()
    return s if s.startswith("$") or "\\boxed" in s else f"${s}$"


def math_equal(gold: str, predicted: str) -> bool:
    """math-verify equivalence of two answer expressions (e.g. ``\\frac12`` and ``0.5``).

    math-verify enforces its timeouts with SIGALRM, which only works in the main thread; off the
    main thread the timeouts are disabled rather than crashing."""
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    limit = 5 if main else None
    g = parse(_as_math(gold), parsing_timeout=limit)
    p = parse(_as_math(predicted), parsing_timeout=limit)
    if not g or not p:
        return normalize_number(gold) == normalize_number(predicted)
    return bool(verify(g, p, timeout_seconds=limit))


def grade_math(gold_answer: str, generation: str) -> bool:
    """Is the final answer of ``generation`` equivalent to ``gold_answer``?"""
    return math_equal(gold_answer, math_final_answer(generation))
