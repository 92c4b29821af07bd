"""A local stand-in for the OpenAI HTTP API, for tests that drive the official ``openai`` client.

Implements, on 127.0.0.1 with a random port, the endpoints our teachers use, with the shapes the
real API returns: ``POST /v1/chat/completions``, ``POST /v1/files`` (multipart upload),
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``,
``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (list, newest first) and
``POST /v1/batches/{id}/cancel``.

Behaviour is scripted through attributes:

* ``batch_modes``: how each successive batch ends: ``ok``, ``partial`` (requests chosen by
  ``fails`` get a 500 in the error file), ``expire`` (status ``expired``; the first half of the
  requests is in the output file, the rest in the error file as ``batch_expired``) or ``fail``
  (validation failure, no output). Batches beyond the list end ``ok``.
* ``polls_to_complete``: retrieves a batch needs before it is terminal (``validating`` ->
  ``in_progress`` -> ``finalizing`` -> terminal), while ``release`` is set. Clear ``release`` to
  keep batches in progress (to kill a client mid-poll).
* ``chat_faults``: HTTP statuses returned by the next chat requests, one per request (429s
  carry ``retry-after``).
* ``reply``: function of a request body returning the completion text.
* ``route_faults``: route (as counted in ``calls``, e.g. ``"POST /v1/files"``) -> HTTP statuses
  returned by its next requests, one per request.
* ``drop_create_responses``: the next N ``POST /v1/batches`` create the batch but answer 502, as
  when a response is lost on the wire.

Counters in ``calls`` (per endpoint) and the created batches in ``batches`` let tests assert
what the client did. A wrong key gets a 401 whose message contains the key verbatim (worse than
the real API, which masks it), to prove that our code redacts it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def default_reply(body: dict) -> str:
    """Deterministic text that depends on the whole prompt."""
    digest = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()[:12]
    return f"Latent thought {digest}: the suffix follows from the prefix by simple arithmetic."


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeOpenAI:
    def __init__(self, api_key: str = "sk-test-fake-0123456789abcdef", polls_to_complete: int = 2):
        self.api_key = api_key
        self.polls_to_complete = polls_to_complete
        self.batch_modes: list[str] = []
        self.fails: Callable[[int, str], bool] = lambda index, custom_id: index % 3 == 0
        self.chat_faults: list[int] = []
        self.drop_create_responses = 0
        self.route_faults: dict[str, list[int]] = {}
        self.reply: Callable[[dict], str] = default_reply
        self.release = threading.Event()
        self.release.set()
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.calls: Counter = Counter()
        self.chat_bodies: list[dict] = []
        self._lock = threading.Lock()
        self._ids = Counter()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "FakeOpenAI":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        self._ids[prefix] += 1
        return f"{prefix}_{self._ids[prefix]:06d}"

    def completion(self, body: dict) -> dict:
        """A chat.completion object for a request body (truncated at max_tokens like the API)."""
        text = self.reply(body)
        finish = "stop"
        limit = body.get("max_tokens")
        if limit is not None and _tokens(text) > limit:
            text, finish = text[: 4 * limit], "length"
        prompt = "".join(m.get("content") or "" for m in body.get("messages", []))
        prompt_tokens, completion_tokens = _tokens(prompt), _tokens(text)
        return {
            "id": self.new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": "fp_fake",
        }

    def add_file(self, filename: str, purpose: str, data: bytes) -> dict:
        file_id = self.new_id("file")
        obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed"}
        self.files[file_id] = {"meta": obj, "data": data}
        return obj

    def advance(self, batch: dict) -> None:
        """One retrieve moves a batch one step along its life cycle."""
        state = batch["_state"]
        if batch["status"] in ("completed", "failed", "expired", "cancelled") or not self.release.is_set():
            return
        state["polls"] += 1
        if state["mode"] == "fail":
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "token_limit_exceeded", "message": "Enqueued token limit reached; input file too large.", "param": None, "line": None}]})
            return
        if state["polls"] < self.polls_to_complete:
            batch["status"] = "in_progress" if state["polls"] else "validating"
            batch["request_counts"]["completed"] = state["n"] * state["polls"] // (self.polls_to_complete + 1)
            return
        self._finish(batch)

    def _finish(self, batch: dict) -> None:
        mode = batch["_state"]["mode"]
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]]["data"].decode().splitlines() if x.strip()]
        out, err = [], []
        for i, req in enumerate(lines):
            rid = self.new_id("batch_req")
            if mode == "expire" and i >= len(lines) // 2:
                err.append({"id": rid, "custom_id": req["custom_id"], "response": None, "error": {
                    "code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
            elif mode == "partial" and self.fails(i, req["custom_id"]):
                err.append({"id": rid, "custom_id": req["custom_id"], "response": {"status_code": 500, "request_id": rid, "body": {"error": {
                    "message": "The server had an error while processing your request.", "type": "server_error", "param": None, "code": None}}}, "error": None})
            else:
                out.append({"id": rid, "custom_id": req["custom_id"], "response": {"status_code": 200, "request_id": rid, "body": self.completion(req["body"])}, "error": None})
        out.reverse()  # results arrive in no particular order
        if out:
            batch["output_file_id"] = self.add_file("batch_output.jsonl", "batch_output", "".join(json.dumps(x) + "\n" for x in out).encode())["id"]
        if err:
            batch["error_file_id"] = self.add_file("batch_errors.jsonl", "batch_output", "".join(json.dumps(x) + "\n" for x in err).encode())["id"]
        batch["status"] = "expired" if mode == "expire" else "completed"
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        batch["completed_at" if mode != "expire" else "expired_at"] = int(time.time())

    @staticmethod
    def public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, obj: dict | bytes, headers: dict | None = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(obj, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}, headers)

    def _fault(self, route: str) -> bool:
        """Answer with the next scripted fault of ``route``, if any."""
        faults = self.server_state.route_faults.get(route)
        if not faults:
            return False
        status = faults.pop(0)
        self._error(status, f"fake fault {status}", None, {"retry-after": "0"} if status == 429 else None)
        return True

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        fake = self.server_state
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if given != fake.api_key:
            self._error(401, f"Incorrect API key provided: {given}. You can find your API key at https://platform.openai.com/account/api-keys.", "invalid_api_key")
            return False
        return True

    def do_POST(self) -> None:
        fake = self.server_state
        body = self._body()
        if not self._authorized():
            return
        path = self.path.split("?")[0]
        with fake._lock:
            route = f"POST {re.sub(r'batch_[0-9]+', '{id}', path)}"
            fake.calls[route] += 1
            if self._fault(route):
                return
            if path == "/v1/chat/completions":
                request = json.loads(body)
                fake.chat_bodies.append(request)
                if fake.chat_faults:
                    status = fake.chat_faults.pop(0)
                    headers = {"retry-after": "0"} if status == 429 else None
                    return self._error(status, f"fake fault {status}", "rate_limit_exceeded" if status == 429 else None, headers)
                return self._send(200, fake.completion(request))
            if path == "/v1/files":
                fields = _parse_multipart(self.headers.get("Content-Type", ""), body)
                if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
                    return self._error(400, "expected a file and purpose=batch")
                filename, data = fields["file"]
                return self._send(200, fake.add_file(filename or "upload.jsonl", "batch", data))
            if path == "/v1/batches":
                request = json.loads(body)
                if request.get("input_file_id") not in fake.files:
                    return self._error(404, f"No such File object: {request.get('input_file_id')}")
                if request.get("endpoint") != "/v1/chat/completions" or request.get("completion_window") != "24h":
                    return self._error(400, "bad endpoint or completion_window")
                n = sum(1 for x in fake.files[request["input_file_id"]]["data"].splitlines() if x.strip())
                mode = fake.batch_modes[len(fake.batches)] if len(fake.batches) < len(fake.batch_modes) else "ok"
                batch_id = fake.new_id("batch")
                fake.batches[batch_id] = {
                    "id": batch_id, "object": "batch", "endpoint": request["endpoint"], "errors": None,
                    "input_file_id": request["input_file_id"], "completion_window": "24h", "status": "validating",
                    "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                    "request_counts": {"total": n, "completed": 0, "failed": 0}, "metadata": request.get("metadata"),
                    "_state": {"mode": mode, "polls": 0, "n": n},
                }
                if fake.drop_create_responses:
                    fake.drop_create_responses -= 1
                    return self._error(502, "Bad gateway")
                return self._send(200, fake.public(fake.batches[batch_id]))
            m = re.fullmatch(r"/v1/batches/([\w-]+)/cancel", path)
            if m and m.group(1) in fake.batches:
                batch = fake.batches[m.group(1)]
                batch["status"] = "cancelled"
                return self._send(200, fake.public(batch))
        self._error(404, f"unknown route POST {path}")

    def do_GET(self) -> None:
        fake = self.server_state
        if not self._authorized():
            return
        path = self.path.split("?")[0]
        with fake._lock:
            route = f"GET {re.sub(r'(batch|file)_[0-9]+', '{id}', path)}"
            fake.calls[route] += 1
            if self._fault(route):
                return
            if path == "/v1/batches":
                data = [fake.public(b) for b in reversed(list(fake.batches.values()))][:100]
                return self._send(200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                        "last_id": data[-1]["id"] if data else None, "has_more": False})
            m = re.fullmatch(r"/v1/batches/([\w-]+)", path)
            if m:
                if m.group(1) not in fake.batches:
                    return self._error(404, f"No batch found with id '{m.group(1)}'.")
                batch = fake.batches[m.group(1)]
                fake.advance(batch)
                return self._send(200, fake.public(batch))
            m = re.fullmatch(r"/v1/files/([\w-]+)(/content)?", path)
            if m:
                if m.group(1) not in fake.files:
                    return self._error(404, f"No such File object: {m.group(1)}")
                entry = fake.files[m.group(1)]
                return self._send(200, entry["data"] if m.group(2) else entry["meta"])
        self._error(404, f"unknown route GET {path}")

    def do_DELETE(self) -> None:
        fake = self.server_state
        if not self._authorized():
            return
        m = re.fullmatch(r"/v1/files/([\w-]+)", self.path.split("?")[0])
        with fake._lock:
            fake.calls["DELETE /v1/files/{id}"] += 1
            if m and fake.files.pop(m.group(1), None) is not None:
                return self._send(200, {"id": m.group(1), "object": "file", "deleted": True})
        self._error(404, "No such File object")


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Fields of a multipart/form-data body: name -> (filename, bytes)."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields
