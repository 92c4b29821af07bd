"""The teacher interface: what every latent-thought backend (oracle, OpenAI Batch, chat) implements.

A *teacher* turns work items (one chunk of one document, or a whole document for the unchunked
WRAP methods) into latent texts. Backends differ wildly in how they get there (an in-process
oracle, a 24-hour OpenAI batch, a local vLLM server), so the contract is deliberately small:

* :class:`LatentRequest`: one unit of work. ``doc_id`` and ``chunk_idx`` locate it in the dataset,
  ``prefix``/``suffix`` are the texts the prompt is built from, ``repeat`` distinguishes repeated
  generations of the same unit (WRAP methods draw several paraphrases per document).
  For the unchunked WRAP methods the whole document is the ``suffix``, ``prefix`` is ``""`` and
  ``chunk_idx`` is :data:`WHOLE_DOC` (-1), so a request can never be mistaken for chunk 0.
* :class:`LatentResponse`: the generated text, the backend's finish reason (``"stop"`` when the
  model ended on its own), token usage (``{"input_tokens": int, "output_tokens": int}``; a backend
  with nothing to count reports zeros) and an ``error`` string when the request failed for good.
  A failed response has ``latent == ""`` and is never cached.
* :class:`Teacher`: ``complete(requests) -> list[LatentResponse]``, one response per request,
  **in request order**, whatever order the backend finished them in.

Backends are looked up by name through a registry. ``register_teacher(name, factory)`` adds one;
``build_teacher(name, **kwargs)`` calls the factory with keyword arguments only. Backends that
live in other packages are registered *lazily by import path* (:data:`_LAZY_MODULES`): the first
``build_teacher("oracle")`` imports ``apps.bolt.synthetic.oracle``, whose import registers the
name. This module therefore never imports the synthetic package (or ``openai``) itself.

Keyword arguments that ``apps.bolt.gen_latents`` passes to factories other than the OpenAI
backends: ``method`` (the generation method: ``latent_thoughts``, ``wrap_baseline`` or
``wrap_cot``), ``src`` (the source dataset directory, as a string) and ``seed`` (int), plus
whatever the user put under ``teacher_kwargs`` in the config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

WHOLE_DOC = -1
"""``chunk_idx`` of a request that covers a whole, unchunked document (WRAP methods)."""


@dataclass(frozen=True)
class LatentRequest:
    """One unit of teacher work: a (prefix, suffix) chunk of a document, for one repeat."""

    doc_id: str
    chunk_idx: int
    prefix: str
    suffix: str
    repeat: int = 0


@dataclass
class LatentResponse:
    """The teacher's answer to one :class:`LatentRequest`."""

    latent: str
    finish_reason: str
    usage: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Teacher(Protocol):
    """Anything that answers latent requests; responses come back in request order."""

    def complete(self, requests: Sequence[LatentRequest]) -> list[LatentResponse]: ...


TeacherFactory = Callable[..., Teacher]

_REGISTRY: dict[str, TeacherFactory] = {}

_LAZY_MODULES: dict[str, str] = {
    "oracle": "apps.bolt.synthetic.oracle",
    "openai_batch": "apps.bolt.teachers.openai_batch",
    "openai_chat": "apps.bolt.teachers.openai_chat",
}
"""Backends registered by importing a module; the import must call :func:`register_teacher`."""


def register_teacher(name: str, factory: TeacherFactory) -> None:
    """Make ``build_teacher(name, ...)`` call ``factory(...)``. Re-registering a name replaces it
    (module reloads in tests re-run the registration)."""
    if not name or not callable(factory):
        raise ValueError(f"register_teacher needs a name and a callable, got {name!r}, {factory!r}")
    _REGISTRY[name] = factory


def available_teachers() -> list[str]:
    """Every name ``build_teacher`` may accept (registered now, or importable on demand)."""
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def build_teacher(name: str, **kwargs) -> Teacher:
    """Build the teacher registered as ``name``, importing its module first if needed."""
    if name not in _REGISTRY and name in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[name])
        if name not in _REGISTRY:
            raise KeyError(f"importing {_LAZY_MODULES[name]} did not register teacher '{name}'")
    if name not in _REGISTRY:
        raise KeyError(f"unknown teacher '{name}'; available: {', '.join(available_teachers())}")
    teacher = _REGISTRY[name](**kwargs)
    if not isinstance(teacher, Teacher):
        raise TypeError(f"factory of teacher '{name}' returned {type(teacher).__name__}, which has no complete()")
    return teacher


def check_responses(requests: Sequence[LatentRequest], responses: Sequence[LatentResponse], who: str) -> None:
    """Fail loudly when a backend breaks the one-response-per-request contract."""
    if len(responses) != len(requests):
        raise RuntimeError(f"teacher '{who}' returned {len(responses)} responses for {len(requests)} requests")
