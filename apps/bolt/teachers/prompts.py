"""Teacher prompts: loaded from versioned YAML files, rendered into chat messages and request bodies.

Prompt texts live in ``apps/bolt/configs/prompts/<method>.yaml``, never in code, so they can be
read, diffed and versioned like any config. A file holds:

* ``name``, ``version``: reported in lineage files;
* ``chunked``: true when the method works per (prefix, suffix) chunk (templates use ``{prefix}``
  and ``{suffix}``), false for whole-document methods (templates use ``{text}``);
* ``system``: the system prompt, or null;
* ``templates``: one or more user-message templates; with several, one is drawn per document
  and repeat (:meth:`PromptSpec.template_index`);
* ``empty_prefix``: what fills ``{prefix}`` for a document's first chunk (the reference: "N/A");
* ``defaults``: the reference's model, max_tokens, temperature and number of repeats.

The cache key of a request hashes the *rendered* messages (:class:`RequestBuilder`), so any edit
to a prompt text changes the key: stale responses are never reused for a new prompt.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from apps.bolt.teachers.base import LatentRequest
from lingua.sample_store import make_key

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "configs" / "prompts"
METHODS = ("latent_thoughts", "wrap_baseline", "wrap_cot")
SYSTEM_ROLES = ("auto", "system", "user")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_KEYS = {"name", "version", "chunked", "system", "templates", "empty_prefix", "defaults"}
_DEFAULT_KEYS = {"model", "max_tokens", "temperature", "num_repeats"}


@dataclass(frozen=True)
class MethodDefaults:
    """The reference's generation settings for a method (overridable in the gen config)."""

    model: str
    max_tokens: int
    temperature: float
    num_repeats: int


@dataclass(frozen=True)
class PromptSpec:
    name: str
    version: int
    chunked: bool
    system: str | None
    templates: tuple[str, ...]
    empty_prefix: str
    defaults: MethodDefaults
    path: str
    sha256: str
    """Content hash of the prompt file, for lineage."""

    @property
    def fields(self) -> set[str]:
        return {"prefix", "suffix"} if self.chunked else {"text"}

    @property
    def ident(self) -> str:
        return f"{self.name}@v{self.version}"

    @classmethod
    def for_method(cls, method: str) -> "PromptSpec":
        if method not in METHODS:
            raise ValueError(f"unknown generation method '{method}'; choose one of {', '.join(METHODS)}")
        return cls.load(PROMPTS_DIR / f"{method}.yaml")

    @classmethod
    def load(cls, path: str | Path) -> "PromptSpec":
        """Read and validate a prompt file; every problem names the file and the key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        raw = path.read_bytes()
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        for key in ("name", "version", "chunked", "templates", "defaults"):
            if key not in data:
                raise ValueError(f"{path}: missing key '{key}'")
        templates = data["templates"]
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise ValueError(f"{path}: 'templates' must be a non-empty list of strings")
        defaults = data["defaults"]
        if not isinstance(defaults, dict) or set(defaults) != _DEFAULT_KEYS:
            raise ValueError(f"{path}: 'defaults' must have exactly the keys {sorted(_DEFAULT_KEYS)}")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{path}: 'system' must be a string or null")
        spec = cls(
            name=str(data["name"]),
            version=int(data["version"]),
            chunked=bool(data["chunked"]),
            system=system,
            templates=tuple(templates),
            empty_prefix=str(data.get("empty_prefix", "")),
            defaults=MethodDefaults(
                model=str(defaults["model"]),
                max_tokens=int(defaults["max_tokens"]),
                temperature=float(defaults["temperature"]),
                num_repeats=int(defaults["num_repeats"]),
            ),
            path=str(path),
            sha256=hashlib.sha256(raw).hexdigest(),
        )
        for i, template in enumerate(spec.templates):
            found = set(_PLACEHOLDER.findall(template))
            if found != spec.fields:
                raise ValueError(
                    f"{path}: templates[{i}] has placeholders {sorted(found)}, expected {sorted(spec.fields)}"
                )
        return spec

    def template_index(self, req: LatentRequest, seed: int) -> int:
        """Which template a request uses. Drawn from an RNG seeded by (seed, repeat, hash of the
        document text), so the choice differs per repeat but never depends on sharding, file
        order or document ids (the reference seeds by workload index instead)."""
        if len(self.templates) == 1:
            return 0
        text_hash = int.from_bytes(hashlib.sha256(req.suffix.encode("utf-8")).digest()[:8], "little")
        rng = np.random.default_rng([seed, req.repeat, text_hash])
        return int(rng.integers(0, len(self.templates)))

    def user_message(self, req: LatentRequest, seed: int) -> str:
        if self.chunked:
            values = {"prefix": req.prefix if req.prefix else self.empty_prefix, "suffix": req.suffix}
        else:
            values = {"text": req.suffix}
        template = self.templates[self.template_index(req, seed)]
        # One pass with a function: braces inside document text are never read as placeholders.
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)

    def messages(self, req: LatentRequest, *, seed: int, system_role: str, model: str) -> list[dict]:
        """Chat messages for one request. ``system_role``: ``system`` sends the system prompt as a
        system message; ``user`` prepends it to the user message (separated by a blank line);
        ``auto`` does what the reference does: system role for GPT models, prepend otherwise."""
        if system_role not in SYSTEM_ROLES:
            raise ValueError(f"system_role must be one of {SYSTEM_ROLES}, got {system_role!r}")
        user = self.user_message(req, seed)
        if self.system is None:
            return [{"role": "user", "content": user}]
        if system_role == "system" or (system_role == "auto" and "gpt" in model.lower()):
            return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
        return [{"role": "user", "content": f"{self.system}\n\n{user}"}]


@dataclass(frozen=True)
class Sampling:
    """What is sent with every request besides the messages (no seed: the reference sends none)."""

    model: str
    max_tokens: int
    temperature: float


class RequestBuilder:
    """Turns :class:`LatentRequest` into a chat-completions body and its cache key.

    The key hashes (model, full messages, sampling params, repeat index): two requests share a
    key exactly when they would sample from the same distribution for the same repeat slot.
    Batch and chat backends build identical keys, so they share one cache.
    """

    def __init__(self, spec: PromptSpec, sampling: Sampling, *, seed: int = 42, system_role: str = "auto"):
        self.spec = spec
        self.sampling = sampling
        self.seed = seed
        self.system_role = system_role

    def body(self, req: LatentRequest) -> dict:
        return {
            "model": self.sampling.model,
            "messages": self.spec.messages(req, seed=self.seed, system_role=self.system_role, model=self.sampling.model),
            "max_tokens": self.sampling.max_tokens,
            "temperature": self.sampling.temperature,
        }

    def key(self, body: dict, repeat: int) -> str:
        return make_key(
            model=body["model"],
            messages=body["messages"],
            sampling={"max_tokens": body["max_tokens"], "temperature": body["temperature"]},
            repeat=repeat,
        )

    def keyed_bodies(self, requests: list[LatentRequest]) -> list[tuple[str, dict]]:
        out = []
        for req in requests:
            body = self.body(req)
            out.append((self.key(body, req.repeat), body))
        return out
