"""Chat-completions backend for any OpenAI-compatible server (OpenAI, vLLM, ``transformers serve``).

Requests run on an asyncio loop with at most ``concurrency`` in flight. Each call has a timeout
and is retried with backoff on 408/409/429/5xx, timeouts and dropped connections (honouring
Retry-After); other errors (a 400 for an over-long prompt, say) fail that request only. Every
success is written to the cache the moment it arrives, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from apps.bolt.teachers.api import TeacherUnreachable, UsageMeter, acall_with_retries, make_client, progress_bar
from apps.bolt.teachers.base import LatentResponse, register_teacher
from apps.bolt.teachers.remote import ApiTeacher, completion_to_response, error_response

logger = logging.getLogger(__name__)


@dataclass
class ChatArgs:
    concurrency: int = 16
    """Requests in flight at once."""

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")


class OpenAIChatTeacher(ApiTeacher):
    backend = "openai_chat"

    def __init__(self, *, chat: ChatArgs | None = None, **kwargs):
        super().__init__(**kwargs)
        self.chat = chat or ChatArgs()

    def _send(self, pending: dict[str, dict], meter: UsageMeter) -> dict[str, LatentResponse]:
        return asyncio.run(self._send_all(pending, meter))

    async def _send_all(self, pending: dict[str, dict], meter: UsageMeter) -> dict[str, LatentResponse]:
        client = make_client(self.api, self.key, use_async=True)
        results: dict[str, LatentResponse] = {}
        bar = progress_bar(len(pending), "teacher (chat)", self.progress)

        def count_retry() -> None:
            meter.retried += 1

        async def one(key: str, body: dict) -> None:
            meter.sent += 1
            try:
                completion = await acall_with_retries(
                    lambda: client.chat.completions.create(**body), self.api, "chat.completions", self.redact, count_retry
                )
                response = completion_to_response(completion.model_dump())
            except TeacherUnreachable:  # no server: every request would fail the same way
                raise
            except Exception as e:  # noqa: BLE001 - one failed request must not sink the others
                response = error_response(f"{type(e).__name__}: {self.redact(e)}")
            if response.ok:
                self.cache.put_many([(key, response)])
                meter.add_result(response.usage, response.finish_reason)
                if response.finish_reason == "length":
                    logger.warning("response hit max_tokens (finish_reason=length); kept")
            else:
                meter.failed += 1
                logger.warning("request failed: %s", response.error)
            results[key] = response
            bar.update(1)
            bar.set_postfix(meter.postfix(), refresh=False)

        items = iter(pending.items())

        async def worker() -> None:
            # Workers share one iterator (safe: asyncio is single-threaded), so at most
            # ``concurrency`` requests are in flight and no coroutine exists per request.
            for key, body in items:
                await one(key, body)

        try:
            await asyncio.gather(*(worker() for _ in range(self.chat.concurrency)))
        finally:
            bar.close()
            await client.close()
        return results


register_teacher("openai_chat", lambda **kwargs: OpenAIChatTeacher(**kwargs))
