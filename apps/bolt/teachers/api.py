"""What the OpenAI backends share: settings, API keys, retries, usage and cost accounting.

API keys are read from the environment or a ``.env`` file and live only in memory: configs hold
the *name* of the variable (``api_key_env``), never its value, and :class:`Redactor` scrubs the
key (and anything shaped like an OpenAI key) out of every error message and log line we write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlparse

from lingua.errors import ExpectedError

logger = logging.getLogger(__name__)
T = TypeVar("T")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
OPENAI_URL = "https://api.openai.com/v1"
CONNECT_RETRIES = 2
"""Quick retries (0.5 s, 1 s) of a call whose connection could not be made at all (refused, unknown
host): a server that is not there fails in seconds, not after ``max_retries`` long backoffs."""
_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9_\-*.]{6,}")


@dataclass
class ApiArgs:
    """How to reach an OpenAI-compatible API."""

    base_url: str = ""
    """Empty: the official OpenAI endpoint. Otherwise e.g. ``http://127.0.0.1:8000/v1`` (vLLM,
    ``transformers serve``)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable (or ``.env`` entry) holding the key. Never the key."""
    dotenv_path: str = ""
    """``.env`` file to read when the variable is not set; empty: search from the working
    directory upwards."""
    timeout_s: float = 600.0
    """Per-request timeout."""
    max_retries: int = 8
    """Retries of one call on 408/409/429/5xx, timeouts and dropped connections. A connection that
    cannot be made (refused, unknown host) is retried only ``CONNECT_RETRIES`` times, then the
    run stops with an error naming the server."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 120.0

    def validate(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_initial_s < 0:
            raise ValueError("timeout_s > 0, max_retries >= 0 and backoff_initial_s >= 0 are required")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")

    @property
    def is_local(self) -> bool:
        return bool(self.base_url) and (urlparse(self.base_url).hostname or "") in LOCAL_HOSTS


@dataclass
class PriceArgs:
    """USD per million tokens. Defaults: gpt-4o-mini through the Batch API (half the sync price
    of 0.15 / 0.60). Used for the cost estimates in reports only."""

    input_per_mtok: float = 0.075
    output_per_mtok: float = 0.30

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


def resolve_api_key(args: ApiArgs) -> str:
    """The key from the environment, else from ``.env``; a local server gets a placeholder.

    The ``.env`` file is read without touching ``os.environ``, so the key does not leak into
    subprocesses we start."""
    key = os.environ.get(args.api_key_env, "")
    if not key:
        from dotenv import dotenv_values, find_dotenv

        path = args.dotenv_path or find_dotenv(usecwd=True)
        if args.dotenv_path and not Path(args.dotenv_path).is_file():
            raise FileNotFoundError(f"dotenv_path {args.dotenv_path} does not exist")
        if path:
            key = dotenv_values(path).get(args.api_key_env) or ""
    if key:
        return key
    if args.is_local:
        return "local-server-no-key"  # the client insists on a non-empty key; local servers ignore it
    raise RuntimeError(
        f"no API key: set {args.api_key_env} in the environment or in a .env file "
        f"(api.api_key_env names the variable; api.dotenv_path points to the file)"
    )


class Redactor:
    """Removes secrets from text before it is logged, stored or raised."""

    def __init__(self, *secrets: str):
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def __call__(self, text: object) -> str:
        out = str(text)
        for s in self.secrets:
            out = out.replace(s, "<redacted>")
        return _KEY_SHAPE.sub("sk-<redacted>", out)


class RedactingFilter(logging.Filter):
    """Logging filter that redacts every record passing through a handler."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redactor(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def make_client(args: ApiArgs, key: str, *, use_async: bool = False):
    """An ``openai`` client with its own retries off: :func:`call_with_retries` does them, so
    they are counted, logged and configurable."""
    import openai

    cls = openai.AsyncOpenAI if use_async else openai.OpenAI
    return cls(api_key=key, base_url=args.base_url or None, timeout=args.timeout_s, max_retries=0)


def retry_delay(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (Retry-After), when it said so."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def is_retryable(exc: BaseException) -> bool:
    """Transient failures: rate limits, server errors, timeouts, dropped connections."""
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


class TeacherUnreachable(ExpectedError):
    """No connection to the teacher server could be made."""


def _connect_failure(exc: BaseException) -> str | None:
    """Why the connection itself could not be made (refused, unknown host, no route), or None for
    anything else (a timeout, a connection dropped mid-request, an HTTP error)."""
    import openai

    if not isinstance(exc, openai.APIConnectionError) or isinstance(exc, openai.APITimeoutError):
        return None
    chain, cause = [], exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 20:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    # By name: the transport's ConnectError (httpx's, httpcore's, or a vendored copy's).
    if not any(type(c).__name__ == "ConnectError" or isinstance(c, ConnectionRefusedError) for c in chain):
        return None
    if any(isinstance(c, ConnectionRefusedError) for c in chain):
        return "connection refused"
    os_errors = [c for c in chain if isinstance(c, OSError) and c.strerror]
    return os_errors[-1].strerror if os_errors else str(chain[-1]) or type(chain[-1]).__name__


def _retry_wait(e: Exception, attempt: int, args: ApiArgs, what: str, redact: Redactor, delays) -> float:
    """Seconds to wait before retrying a failed call, or raise: ``e`` when it is not transient or
    the retries are spent, :class:`TeacherUnreachable` when the server cannot be reached."""
    reason = _connect_failure(e)
    if reason is not None:
        if attempt >= min(CONNECT_RETRIES, args.max_retries):
            url = args.base_url or OPENAI_URL
            raise TeacherUnreachable(
                f"cannot connect to the teacher server at {url} ({redact(reason)}, {attempt + 1} attempt(s)); "
                "is it running, and is api.base_url right?"
            ) from e
        return 0.5 * 2**attempt
    if attempt == args.max_retries or not is_retryable(e):
        raise e
    wait = min(args.backoff_max_s, retry_delay(e) or next(delays))
    logger.warning("%s failed (%s); retry %d/%d in %.1fs", what, redact(e), attempt + 1, args.max_retries, wait)
    return wait


def _delays(args: ApiArgs, rng: random.Random):
    """Exponential backoff with full jitter (spreads retries of many concurrent requests)."""
    attempt = 0
    while True:
        cap = min(args.backoff_max_s, args.backoff_initial_s * 2**attempt)
        yield rng.uniform(cap / 2, cap)
        attempt += 1


def call_with_retries(
    fn: Callable[[], T], args: ApiArgs, what: str, redact: Redactor, on_retry: Callable[[], None] | None = None
) -> T:
    """Call ``fn``; on a transient failure wait (Retry-After, else backoff) and call again."""
    delays = _delays(args, random.Random())
    for attempt in range(args.max_retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by _retry_wait
            wait = _retry_wait(e, attempt, args, what, redact, delays)
            if on_retry is not None:
                on_retry()
            time.sleep(wait)
    raise AssertionError("unreachable")


async def acall_with_retries(
    fn: Callable[[], Awaitable[T]], args: ApiArgs, what: str, redact: Redactor, on_retry: Callable[[], None] | None = None
) -> T:
    """Async twin of :func:`call_with_retries`."""
    delays = _delays(args, random.Random())
    for attempt in range(args.max_retries + 1):
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001 - filtered by _retry_wait
            wait = _retry_wait(e, attempt, args, what, redact, delays)
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


@dataclass
class UsageMeter:
    """Counts of one teacher call: requests, where answers came from, tokens and cost."""

    prices: PriceArgs = field(default_factory=PriceArgs)
    requests: int = 0
    unique: int = 0
    cached: int = 0
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    truncated: int = 0
    retried: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cached_output_tokens: int = 0

    def add_result(self, usage: dict, finish_reason: str) -> None:
        self.succeeded += 1
        self.input_tokens += int(usage.get("input_tokens", 0))
        self.output_tokens += int(usage.get("output_tokens", 0))
        self.truncated += finish_reason == "length"

    def add_cached(self, usage: dict) -> None:
        self.cached += 1
        self.cached_input_tokens += int(usage.get("input_tokens", 0))
        self.cached_output_tokens += int(usage.get("output_tokens", 0))

    @property
    def cost_usd(self) -> float:
        """Estimated cost of what this run sent (cache hits are free)."""
        return self.prices.cost(self.input_tokens, self.output_tokens)

    def postfix(self) -> dict:
        return {"in_tok": self.input_tokens, "out_tok": self.output_tokens, "cost": f"${self.cost_usd:.4f}"}

    def report(self) -> dict:
        return {
            "requests": self.requests,
            "unique_requests": self.unique,
            "cache_hits": self.cached,
            "sent": self.sent,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "truncated": self.truncated,
            "retried": self.retried,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cached_output_tokens": self.cached_output_tokens,
            "estimated_cost_usd": round(self.cost_usd, 6),
            "prices_usd_per_mtok": {"input": self.prices.input_per_mtok, "output": self.prices.output_per_mtok},
        }


def usage_from_completion(body: dict) -> dict:
    """Our usage dict from an OpenAI chat.completion body (missing counts read as 0)."""
    usage = body.get("usage") or {}
    return {"input_tokens": int(usage.get("prompt_tokens") or 0), "output_tokens": int(usage.get("completion_tokens") or 0)}


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (requests done / total, with tokens and cost in the postfix)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, dynamic_ncols=True, mininterval=1.0)
