"""OpenAI Batch API backend: half the price of live calls, results within the completion window.

Flow for the requests the cache cannot answer:

1. Write the request JSONL (``custom_id`` = the request's cache key: stable for a chunk and
   repeat, and the key we file the answer under), cut into parts at the API limits (requests and
   bytes per input file, configurable).
2. ``files.create`` then ``batches.create`` per part. Each id is appended to the ledger
   ``batches.jsonl`` (fsynced) the moment it exists. A process killed at any point resumes from
   the ledger: open batches are polled, not paid for twice; a part whose upload is recorded but
   whose batch is not is matched to an existing batch by its input file id before a new batch is
   created (that also covers a create call that succeeded server-side but failed on the wire).
3. Poll with backoff until every batch is terminal; download its output and error files and join
   on ``custom_id`` (results arrive in any order). Successes go straight to the cache.
4. Requests that failed, or were left unanswered by an expired, cancelled or failed batch, are
   resubmitted, only those, for up to ``max_rounds`` rounds. A batch that failed validation
   halves the part size of later rounds (the reference's fix for oversized files).
5. The report counts requests, failures, tokens and the estimated cost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from apps.bolt.teachers.api import UsageMeter, call_with_retries, make_client, progress_bar
from apps.bolt.teachers.base import LatentResponse, register_teacher
from apps.bolt.teachers.remote import ApiTeacher, completion_to_response, error_response

logger = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINT = "/v1/chat/completions"


@dataclass
class BatchArgs:
    """Batch API settings. The API allows 50,000 requests and 200 MB per input file."""

    max_requests_per_batch: int = 20_000
    """The reference's batch size."""
    max_bytes_per_batch: int = 190_000_000
    completion_window: str = "24h"
    poll_interval_s: float = 30.0
    """First wait between polls; grows 1.5x per poll without progress, up to the max."""
    poll_max_interval_s: float = 300.0
    max_rounds: int = 4
    """Submission rounds: the first, then resubmissions of failed or expired requests."""
    max_open_batches: int = 0
    """Batches in flight at once (0: no limit); keeps under the enqueued-token limit of an org."""
    max_wait_s: float = 0.0
    """Give up polling after this long (0: wait; the API itself expires a batch after its
    window). The ledger keeps the ids, so a rerun resumes polling."""
    delete_input_files: bool = True
    delete_output_files: bool = False

    def validate(self) -> None:
        if self.max_requests_per_batch < 1 or self.max_bytes_per_batch < 1024:
            raise ValueError("max_requests_per_batch >= 1 and max_bytes_per_batch >= 1024 are required")
        if self.poll_interval_s < 0 or self.poll_max_interval_s < self.poll_interval_s:
            raise ValueError("need 0 <= poll_interval_s <= poll_max_interval_s")
        if self.max_rounds < 1 or self.max_open_batches < 0:
            raise ValueError("max_rounds >= 1 and max_open_batches >= 0 are required")


class BatchLedger:
    """Append-only JSONL record of parts, uploads, batches and collections (fsynced per line)."""

    def __init__(self, path: Path):
        self.path = path
        self.parts: dict[str, dict] = {}
        lines = path.read_text(encoding="utf-8").split("\n") if path.is_file() else []  # not splitlines: U+2028 may sit inside a record
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                if lineno != len(lines):  # only the last line can be torn by a kill
                    raise ValueError(f"{path}:{lineno}: corrupt ledger line") from None
                logger.warning("%s:%d: ignoring a torn last line", path, lineno)
                continue
            self.parts.setdefault(event["part"], {}).update(event)

    def append(self, event: dict) -> None:
        self.parts.setdefault(event["part"], {}).update(event)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def next_part_name(self) -> str:
        return f"part{len(self.parts):05d}"

    def open_parts(self) -> list[str]:
        """Parts written (maybe uploaded, maybe with a batch) but not collected, in order."""
        return [p for p, s in self.parts.items() if "collected_status" not in s]


class OpenAIBatchTeacher(ApiTeacher):
    backend = "openai_batch"

    def __init__(self, *, batch=None, **kwargs):
        super().__init__(**kwargs)
        self.batch = batch or BatchArgs()
        self.max_requests = self.batch.max_requests_per_batch
        self._client = None
        self.ledger = BatchLedger(self.work_dir / "batches.jsonl")
        self.requests_dir = self.work_dir / "requests"
        self.requests_dir.mkdir(exist_ok=True)
        self._stats = {"batches_created": 0, "batches_adopted": 0, "batches_resumed": 0, "rounds": 0, "api_retries": 0, "batch_statuses": {}}

    def _call(self, fn, what: str):
        """One API call with retries on transient errors (counted in the report)."""
        return call_with_retries(fn, self.api, what, self.redact, on_retry=self._count_retry)

    def _count_retry(self) -> None:
        self._stats["api_retries"] += 1

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.api, self.key)
        return self._client

    # -- the round loop ---------------------------------------------------------------------
    def _send(self, pending: dict[str, dict], meter: UsageMeter) -> dict[str, LatentResponse]:
        results: dict[str, LatentResponse] = {}
        errors: dict[str, str] = {}
        bar = progress_bar(len(pending), "teacher (batch)", self.progress)
        try:
            resumed = self.ledger.open_parts()
            if resumed:
                self._stats["batches_resumed"] = len(resumed)
                logger.info("resuming %d batch(es) from %s", len(resumed), self.ledger.path)
                self._run_parts(resumed, pending, results, errors, meter, bar)
            for round_idx in range(self.batch.max_rounds):
                todo = {k: b for k, b in pending.items() if k not in results}
                if not todo:
                    break
                self._stats["rounds"] += 1
                if round_idx:
                    logger.info("round %d: resubmitting %d failed or unanswered request(s)", round_idx, len(todo))
                parts = self._write_parts(todo, errors)
                self._run_parts(parts, pending, results, errors, meter, bar)
        finally:
            bar.close()
        for key in pending:
            if key not in results:
                meter.failed += 1
                results[key] = error_response(self.redact(errors.get(key, "not answered after all rounds")))
        return results

    def _write_parts(self, todo: dict[str, dict], errors: dict[str, str]) -> list[str]:
        """Cut ``todo`` into request files within the limits; returns the new part names."""
        parts, lines, size = [], [], 0

        def flush() -> None:
            nonlocal lines, size
            if lines:
                name = self.ledger.next_part_name()
                path = self.requests_dir / f"{name}.jsonl"
                path.write_bytes(b"".join(lines))
                self.ledger.append({"part": name, "event": "written", "requests_file": path.name, "n": len(lines)})
                parts.append(name)
            lines, size = [], 0

        for key, body in todo.items():
            line = (json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}) + "\n").encode()
            if len(line) > self.batch.max_bytes_per_batch:
                errors[key] = f"request of {len(line)} bytes exceeds max_bytes_per_batch"
                continue
            if len(lines) >= self.max_requests or size + len(line) > self.batch.max_bytes_per_batch:
                flush()
            lines.append(line)
            size += len(line)
        flush()
        return parts

    def _run_parts(self, parts, pending, results, errors, meter, bar) -> None:
        """Submit the parts (at most ``max_open_batches`` in flight) and collect them all."""
        waiting = list(parts)
        open_: list[str] = []
        limit = self.batch.max_open_batches or len(parts) or 1
        started = time.monotonic()
        interval = self.batch.poll_interval_s
        last_progress: dict[str, int] = {}
        while waiting or open_:
            while waiting and len(open_) < limit:
                part = waiting.pop(0)
                self._ensure_batch(part)
                open_.append(part)
            progressed = False
            for part in list(open_):
                batch = self._call(lambda: self.client.batches.retrieve(self.ledger.parts[part]["batch_id"]), "batches.retrieve")
                counts = getattr(batch, "request_counts", None)
                done = (getattr(counts, "completed", 0) or 0) + (getattr(counts, "failed", 0) or 0)
                if done != last_progress.get(part) or batch.status in TERMINAL:
                    progressed = True
                last_progress[part] = done
                if batch.status in TERMINAL:
                    self._collect(part, batch, pending, results, errors, meter, bar)
                    open_.remove(part)
            if not open_ and not waiting:
                break
            bar.set_postfix({**meter.postfix(), "open_batches": len(open_), "done_in_open": sum(last_progress.get(p, 0) for p in open_)})
            if self.batch.max_wait_s and time.monotonic() - started > self.batch.max_wait_s:
                ids = [self.ledger.parts[p]["batch_id"] for p in open_]
                raise TimeoutError(f"batches still running after {self.batch.max_wait_s}s: {ids}; rerun to resume polling")
            interval = self.batch.poll_interval_s if progressed else min(self.batch.poll_max_interval_s, interval * 1.5)
            if open_ and (not waiting or len(open_) >= limit):
                time.sleep(interval)

    # -- one part ---------------------------------------------------------------------------
    def _ensure_batch(self, part: str) -> None:
        """Make sure ``part`` has an uploaded file and a batch, recording each id at once."""
        import openai

        if "batch_id" in self.ledger.parts[part]:
            return
        for attempt in range(2):
            file_id = self._ensure_upload(part)
            try:
                batch, adopted = self._call(lambda: self._create_batch(part, file_id), "batches.create")
                break
            except openai.NotFoundError:
                if attempt:
                    raise
                # The recorded upload is gone (deleted, or expired on the server): upload again.
                logger.warning("%s: input file %s no longer exists; uploading again", part, file_id)
                self.ledger.append({"part": part, "event": "upload_lost", "file_id": None})
        self.ledger.append({"part": part, "event": "created", "batch_id": batch.id})
        self._stats["batches_adopted" if adopted else "batches_created"] += 1
        verb = "adopted (created before an interruption)" if adopted else "created"
        logger.info("%s: batch %s %s, %d requests", part, batch.id, verb, self.ledger.parts[part].get("n", 0))

    def _ensure_upload(self, part: str) -> str:
        state = self.ledger.parts[part]
        if not state.get("file_id"):
            data = (self.requests_dir / state["requests_file"]).read_bytes()
            uploaded = self._call(lambda: self.client.files.create(file=(f"{part}.jsonl", data, "application/jsonl"), purpose="batch"), "files.create")
            self.ledger.append({"part": part, "event": "uploaded", "file_id": uploaded.id, "bytes": len(data)})
        return self.ledger.parts[part]["file_id"]

    def _create_batch(self, part: str, file_id: str):
        """(batch, adopted): an existing batch made from ``file_id`` if there is one (a create
        that succeeded just before a kill or a dropped response), else a new one."""
        existing = self._find_batch_for_file(file_id)
        if existing is not None:
            return existing, True
        batch = self.client.batches.create(
            input_file_id=file_id,
            endpoint=ENDPOINT,
            completion_window=self.batch.completion_window,
            metadata={"description": f"bolt gen_latents {self.work_dir.name} {part}"},
        )
        return batch, False

    def _find_batch_for_file(self, file_id: str):
        """A batch already created from ``file_id`` among the most recent ones, if any."""
        page = self._call(lambda: self.client.batches.list(limit=100), "batches.list")
        for batch in page.data or []:
            if batch.input_file_id == file_id:
                return batch
        return None

    def _collect(self, part, batch, pending, results, errors, meter, bar) -> None:
        """Join a finished batch's output and error files with the part's requests."""
        import openai

        state = self.ledger.parts[part]
        keys = self._part_keys(state)
        status = batch.status
        self._stats["batch_statuses"][status] = self._stats["batch_statuses"].get(status, 0) + 1
        fresh: list[tuple[str, LatentResponse]] = []
        for file_id in (getattr(batch, "output_file_id", None), getattr(batch, "error_file_id", None)):
            if not file_id:
                continue
            try:
                text = self._call(lambda: self.client.files.content(file_id).text, "files.content")
            except openai.NotFoundError:
                # e.g. deleted by delete_output_files before a kill: its requests are resubmitted
                logger.warning("%s: result file %s is gone; its requests count as unanswered", part, file_id)
                continue
            for line in text.split("\n"):  # not splitlines: U+2028/U+0085 may sit inside a record
                if not line.strip():
                    continue
                key, response = parse_result_line(line)
                if key not in keys:
                    logger.warning("%s: result for unknown custom_id %s ignored", part, key[:16])
                    continue
                if response.ok:
                    fresh.append((key, response))
                else:
                    errors[key] = response.error or "failed"
        batch_error = _batch_error_text(batch)
        if status == "failed" and batch_error and any(w in batch_error.lower() for w in ("large", "limit", "size")):
            self.max_requests = max(1, min(self.max_requests, len(keys)) // 2)
            logger.warning("%s failed validation (%s); next parts hold at most %d requests", part, batch_error, self.max_requests)
        answered = {k for k, _ in fresh}
        for key in keys - answered:
            errors.setdefault(key, f"batch {status}" + (f": {batch_error}" if batch_error else ""))
        self.cache.put_many(fresh)
        new_in_pending = 0
        for key, response in fresh:
            if key in pending and key not in results:
                results[key] = response
                meter.add_result(response.usage, response.finish_reason)
                new_in_pending += 1
        meter.sent += len(keys)
        n_failed = len(keys) - len(answered)
        if n_failed:
            logger.warning("%s: batch %s: %d of %d requests failed or unanswered", part, status, n_failed, len(keys))
        truncated = sum(r.finish_reason == "length" for _, r in fresh)
        if truncated:
            logger.warning("%s: %d response(s) hit max_tokens (finish_reason=length); kept", part, truncated)
        bar.update(new_in_pending)
        bar.set_postfix(meter.postfix())
        self.ledger.append({"part": part, "event": "collected", "collected_status": status, "ok": len(answered), "failed": n_failed})
        self._cleanup(part, batch)

    def _part_keys(self, state: dict) -> set[str]:
        path = self.requests_dir / state["requests_file"]
        return {json.loads(line)["custom_id"] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()}

    def _cleanup(self, part: str, batch) -> None:
        """Delete what is no longer needed; failures here are harmless and only logged."""
        state = self.ledger.parts[part]
        targets = []
        if self.batch.delete_input_files and state.get("file_id"):
            targets.append(state["file_id"])
        if self.batch.delete_output_files:
            targets += [f for f in (batch.output_file_id, batch.error_file_id) if f]
        for file_id in targets:
            try:
                self.client.files.delete(file_id)
            except Exception as e:  # noqa: BLE001 - cleanup is best effort
                logger.warning("could not delete file %s: %s", file_id, self.redact(e))
        (self.requests_dir / state["requests_file"]).unlink(missing_ok=True)

    def _extra_report(self) -> dict:
        return {**self._stats, "ledger": str(self.ledger.path)}


def parse_result_line(line: str) -> tuple[str, LatentResponse]:
    """One line of a batch output or error file -> (custom_id, response or error response)."""
    obj = json.loads(line)
    key = obj.get("custom_id") or ""
    response = obj.get("response") or {}
    if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
        return key, completion_to_response(response["body"])
    error = obj.get("error") or ((response.get("body") or {}).get("error") if isinstance(response.get("body"), dict) else None)
    if isinstance(error, dict):
        message = f"{error.get('code') or 'error'}: {error.get('message') or ''}".strip()
    else:
        message = f"status {response.get('status_code')}"
    return key, error_response(message)


def _batch_error_text(batch) -> str | None:
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) if errors is not None else None
    if not data:
        return None
    return "; ".join(f"{getattr(e, 'code', None) or 'error'}: {getattr(e, 'message', None) or ''}" for e in data)


register_teacher("openai_batch", lambda **kwargs: OpenAIBatchTeacher(**kwargs))
