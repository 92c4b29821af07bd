"""The part of every API teacher that is not about transport: prompts, dedup, cache, ordering.

:class:`ApiTeacher.complete` renders each request into a chat body and its cache key, answers
what it can from the cache, hands the rest (each distinct key once) to the backend's ``_send``,
and returns one response per request in request order. Backends only implement ``_send``; they
write each success into the cache as soon as they have it, so a killed job loses nothing it
already paid for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from apps.bolt.teachers.api import ApiArgs, PriceArgs, Redactor, UsageMeter, resolve_api_key, usage_from_completion
from apps.bolt.teachers.base import LatentRequest, LatentResponse
from apps.bolt.teachers.cache import ResponseCache
from apps.bolt.teachers.prompts import PromptSpec, RequestBuilder, Sampling
from lingua.io import atomic_write_json

logger = logging.getLogger(__name__)


class ApiTeacher:
    """Base of the OpenAI backends. Subclasses implement :meth:`_send`."""

    backend = "api"

    def __init__(
        self,
        *,
        prompt: PromptSpec,
        sampling: Sampling,
        api: ApiArgs,
        cache_path: str | Path,
        work_dir: str | Path,
        prices: PriceArgs | None = None,
        seed: int = 42,
        system_role: str = "auto",
        progress: bool = True,
    ):
        self.builder = RequestBuilder(prompt, sampling, seed=seed, system_role=system_role)
        self.api = api
        self.prices = prices or PriceArgs()
        self.cache = ResponseCache(cache_path)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self._key: str | None = None
        self.redact = Redactor()
        self.last_report: dict = {}

    @property
    def key(self) -> str:
        """The API key, resolved on first use: a rerun answered from the cache needs none."""
        if self._key is None:
            self._key = resolve_api_key(self.api)
            self.redact = Redactor(self._key)
        return self._key

    def complete(self, requests: Sequence[LatentRequest]) -> list[LatentResponse]:
        keyed = self.builder.keyed_bodies(list(requests))
        meter = UsageMeter(prices=self.prices, requests=len(keyed))
        unique = dict(keyed)
        meter.unique = len(unique)
        results: dict[str, LatentResponse] = self.cache.get_many(list(unique))
        for response in results.values():
            meter.add_cached(response.usage)
        pending = {key: body for key, body in unique.items() if key not in results}
        if pending:
            logger.info(
                "%s: %d requests, %d distinct, %d cached, sending %d",
                self.backend, len(keyed), len(unique), len(results), len(pending),
            )
            results.update(self._send(pending, meter))
        else:
            logger.info("%s: all %d requests answered from the cache; nothing sent", self.backend, len(keyed))
        responses = [
            results.get(key) or LatentResponse("", "error", {}, error="no response received")
            for key, _ in keyed
        ]
        self.last_report = {"backend": self.backend, **meter.report(), **self._extra_report()}
        atomic_write_json(self.work_dir / f"{self.backend}_report.json", self.last_report)
        return responses

    def _send(self, pending: dict[str, dict], meter: UsageMeter) -> dict[str, LatentResponse]:
        """Answer every key of ``pending`` (key -> chat body): a success (also written to the
        cache) or an error response. Update ``meter``."""
        raise NotImplementedError

    def _extra_report(self) -> dict:
        return {}

    def close(self) -> None:
        self.cache.close()


def error_response(message: str) -> LatentResponse:
    return LatentResponse(latent="", finish_reason="error", usage={}, error=message)


def completion_to_response(body: dict) -> LatentResponse:
    """A chat.completion JSON body to our response (the content may legitimately be empty)."""
    choices = body.get("choices") or []
    if not choices:
        return error_response(f"completion without choices: {json.dumps(body)[:200]}")
    choice = choices[0]
    message = choice.get("message") or {}
    return LatentResponse(
        latent=message.get("content") or "",
        finish_reason=choice.get("finish_reason") or "unknown",
        usage=usage_from_completion(body),
    )
