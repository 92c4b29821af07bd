"""The document-formatter hook: how a JSON record becomes the text that is tokenized.

A *formatter* is ``fn(record, rng) -> str | list[tuple[str, bool]]``. It returns the document
text, or a list of ``(text span, counts_in_loss)`` spans, so a layout can keep spans in the
input while excluding them from the loss. ``rng`` is the pipeline's seeded formatter stream
(its state is saved with the data position), and must be the only randomness a formatter uses.
A formatter that finds a record unusable raises :class:`BadRecord`; the record is then counted
and skipped like other bad input (fatal under ``data.strict``).

Formatters are registered by name as *factories* (``factory(**kwargs) -> formatter``) so a
config can select one with ``data.format=<name>``. The pipeline builds it with
``get_format(name, text_key=data.text_key)`` when the factory declares a ``text_key``
parameter, else with ``get_format(name)``; an application that needs other options passes its
configured formatter as ``format_fn`` instead. Applications (e.g. latent layouts) register
their own; the core only ships ``text``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Union

import numpy as np

Span = tuple[str, bool]
FormatOutput = Union[str, list[Span]]
Formatter = Callable[[dict, np.random.Generator], FormatOutput]
FormatterFactory = Callable[..., Formatter]

_REGISTRY: dict[str, FormatterFactory] = {}


class BadRecord(ValueError):
    """Raised by a formatter for a record it cannot format; the pipeline counts and skips it."""


def register_format(name: str, factory: FormatterFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``data.format=name``.

    Registering the same factory twice is a no-op (modules may be imported more than once);
    a different factory under a taken name needs ``replace=True``.
    """
    old = _REGISTRY.get(name)
    if old is not None and old is not factory and not replace:
        raise ValueError(f"document format '{name}' is already registered (by {old.__module__}.{old.__qualname__})")
    _REGISTRY[name] = factory


def get_format(name: str, **kwargs) -> Formatter:
    """Build the formatter registered as ``name``; ``kwargs`` go to its factory."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown document format '{name}'; registered: {sorted(_REGISTRY)}") from None
    return factory(**kwargs)


def registered_formats() -> list[str]:
    return sorted(_REGISTRY)


def factory_accepts(name: str, keyword: str) -> bool:
    """Whether the factory of ``name`` declares a parameter called ``keyword``. A bare
    ``**kwargs`` does not count: such factories often forward options to a strict config."""
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return any(p.name == keyword and p.kind is not inspect.Parameter.VAR_KEYWORD for p in params)


def text_format(text_key: str = "text") -> Formatter:
    """The default formatter: the record's text, all of it in the loss."""

    def format_text(record: dict, rng: np.random.Generator) -> str:
        return record[text_key]

    return format_text


register_format("text", text_format)


def to_spans(output: FormatOutput) -> list[Span]:
    """Normalise a formatter's output to spans; a type error (a bug in the formatter, not bad
    data) raises ``TypeError``."""
    if isinstance(output, str):
        return [(output, True)]
    if not isinstance(output, (list, tuple)):
        raise TypeError(f"a formatter must return str or a list of (str, bool) spans, got {type(output).__name__}")
    spans: list[Span] = []
    for item in output:
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], (bool, np.bool_))
        ):
            raise TypeError(f"a formatter span must be a (str, bool) pair, got {item!r:.80}")
        spans.append((item[0], bool(item[1])))
    return spans


def truncate_spans(spans: list[Span], max_chars: int) -> list[Span]:
    """The longest prefix of ``spans`` with at most ``max_chars`` characters in total."""
    out: list[Span] = []
    left = max_chars
    for text, in_loss in spans:
        if left <= 0:
            break
        out.append((text[:left], in_loss))
        left -= len(text)
    return out
