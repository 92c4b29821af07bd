"""The OpenAI backends end to end through the official client against a local fake server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apps.bolt.chunking import ChunkArgs, chunk_text
from apps.bolt.gen_latents import GenLatentsArgs, main, run
from apps.bolt.synthetic.corpus import generate_corpus
from apps.bolt.teachers import LatentRequest
from apps.bolt.teachers.api import ApiArgs
from apps.bolt.teachers.openai_batch import BatchArgs
from apps.bolt.teachers.prompts import PromptSpec, RequestBuilder, Sampling

from tests.fake_openai import FakeOpenAI, default_reply

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-SECRET-4f1d2c3b5a69788796a5b4c3d2e1f0"
MODEL = "gpt-4o-mini-2024-07-18"


@pytest.fixture
def fake(monkeypatch):
    server = FakeOpenAI(api_key=KEY)
    server.start()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    yield server
    server.stop()


def synthetic_source(folder: Path, num_docs: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for doc in generate_corpus(num_docs, seed=3):
            f.write(json.dumps(doc) + "\n")
    return folder


def cfg_for(tmp_path: Path, fake: FakeOpenAI, name: str, backend: str = "openai_batch", **kw) -> GenLatentsArgs:
    batch = BatchArgs(poll_interval_s=0.01, poll_max_interval_s=0.05, **kw.pop("batch", {}))
    api = ApiArgs(base_url=fake.base_url, backoff_initial_s=0.01, backoff_max_s=0.05, timeout_s=20, **kw.pop("api", {}))
    cfg = GenLatentsArgs(src=str(kw.pop("src", tmp_path / "src")), out=str(tmp_path / name), backend=backend,
                         api=api, batch=batch, progress=False, **kw)
    cfg.validate()
    return cfg


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()]


def expected_latents(recs: list[dict], model: str = MODEL) -> list[list[str]]:
    """What the fake server answers for every chunk: a function of the exact request body."""
    builder = RequestBuilder(PromptSpec.for_method("latent_thoughts"), Sampling(model, 6000, 0.7))
    out = []
    for rec in recs:
        chunks = chunk_text(rec["text"], ChunkArgs())
        out.append([default_reply(builder.body(LatentRequest(rec["id"], i, c.prefix, c.suffix))) for i, c in enumerate(chunks)])
    return out


def test_batch_flow_resubmits_failed_expired_and_invalid_batches(tmp_path, fake):
    synthetic_source(tmp_path / "src")
    fake.batch_modes = ["partial", "expire", "fail"]
    # transient API errors on the way are retried (not counted as request failures)
    fake.route_faults = {"POST /v1/files": [429], "GET /v1/batches/{id}": [500, 503], "GET /v1/files/{id}/content": [502]}
    cfg = cfg_for(tmp_path, fake, "out", batch={"max_requests_per_batch": 4})
    lineage = run(cfg)["lineage"]
    recs = records(tmp_path / "out")
    assert [[c["latent"] for c in r["chunks"]] for r in recs] == expected_latents(recs)
    n = sum(r["num_chunks"] for r in recs)
    assert 8 < n <= 12  # three parts in the first round
    report = json.loads((tmp_path / "out" / "_work" / "shard_00000_of_00001" / "openai_batch_report.json").read_text())
    assert report["requests"] == report["succeeded"] == n and report["failed"] == 0 and report["cache_hits"] == 0
    assert report["batch_statuses"]["expired"] == 1 and report["batch_statuses"]["failed"] == 1
    assert report["rounds"] == 2 and report["sent"] > n  # the failed ones were sent twice
    assert not any(fake.route_faults.values()) and report["api_retries"] == 4  # each fault hit once, retried
    # Only the failed / unanswered requests were resubmitted, in parts halved after the failure.
    first_round = sum(b["request_counts"]["total"] for b in list(fake.batches.values())[:3])
    resent = sum(b["request_counts"]["total"] for b in list(fake.batches.values())[3:])
    assert first_round == n and resent == report["sent"] - n and resent < n
    assert max(b["request_counts"]["total"] for b in list(fake.batches.values())[3:]) <= 2
    # Every request is answered once, tokens and cost add up.
    lines = [json.loads(x) for b in fake.batches.values() if b["output_file_id"]
             for x in fake.files[b["output_file_id"]]["data"].splitlines()]
    assert len(lines) == n  # each request answered exactly once over all batches
    assert report["output_tokens"] == sum(x["response"]["body"]["usage"]["completion_tokens"] for x in lines)
    assert report["input_tokens"] == sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in lines)
    assert report["estimated_cost_usd"] == pytest.approx((report["input_tokens"] * 0.075 + report["output_tokens"] * 0.30) / 1e6, abs=1e-6)
    assert lineage["teacher_totals"]["output_tokens"] == report["output_tokens"]
    # Input files were deleted after use; the ledger holds every batch id.
    inputs = [b["input_file_id"] for b in fake.batches.values()]
    assert not any(f in fake.files for f in inputs)
    ledger = [json.loads(x) for x in (tmp_path / "out" / "_work" / "shard_00000_of_00001" / "batches.jsonl").read_text().splitlines()]
    assert sorted(e["batch_id"] for e in ledger if e["event"] == "created") == sorted(fake.batches)


def test_batch_parts_respect_request_and_byte_limits(tmp_path, fake):
    synthetic_source(tmp_path / "src", 4)
    for name, limits in (("by_count", {"max_requests_per_batch": 3}), ("by_bytes", {"max_bytes_per_batch": 4000})):
        first = len(fake.batches)
        run(cfg_for(tmp_path, fake, name, batch={**limits, "delete_input_files": False}))
        parts = [fake.files[b["input_file_id"]]["data"] for b in list(fake.batches.values())[first:]]
        counts = [len(p.splitlines()) for p in parts]
        assert sum(counts) == sum(r["num_chunks"] for r in records(tmp_path / name))
        if name == "by_count":
            assert counts[:-1] == [3] * (len(counts) - 1) and 1 <= counts[-1] <= 3
        else:  # each part is as full as the byte limit allows
            assert all(len(p) <= 4000 for p in parts) and len(parts) >= 3
            lines = [p.splitlines(keepends=True) for p in parts]
            assert all(len(p) + len(nxt[0]) > 4000 for p, nxt in zip(parts, lines[1:]))


def test_killed_client_resumes_polling_and_pays_once(tmp_path, fake):
    synthetic_source(tmp_path / "src", 3)
    fake.release.clear()  # batches stay in progress
    out = tmp_path / "out"
    args = [f"src={tmp_path / 'src'}", f"out={out}", "backend=openai_batch", f"api.base_url={fake.base_url}",
            "batch.poll_interval_s=0.05", "batch.poll_max_interval_s=0.1", "progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "apps.bolt.gen_latents", *args], cwd=ROOT,
                            env={**os.environ, "OPENAI_API_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ledger = out / "_work" / "shard_00000_of_00001" / "batches.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and fake.calls["GET /v1/batches/{id}"] < 2:
        time.sleep(0.05)
    assert fake.calls["GET /v1/batches/{id}"] >= 2, proc.stderr.read().decode() if proc.poll() is not None else "no polls"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert '"event": "created"' in ledger.read_text() and not (out / "COMPLETE").exists()
    (batch_id,) = fake.batches
    fake.release.set()
    run(cfg_for(tmp_path, fake, "out"))
    assert list(fake.batches) == [batch_id] and fake.calls["POST /v1/batches"] == 1 and fake.calls["POST /v1/files"] == 1
    recs = records(out)
    assert [[c["latent"] for c in r["chunks"]] for r in recs] == expected_latents(recs)
    report = json.loads((out / "_work" / "shard_00000_of_00001" / "openai_batch_report.json").read_text())
    assert report["batches_resumed"] == 1 and report["batches_created"] == 0


def test_batch_created_but_response_lost_is_adopted_not_duplicated(tmp_path, fake):
    synthetic_source(tmp_path / "src", 2)
    fake.drop_create_responses = 1
    run(cfg_for(tmp_path, fake, "out"))
    assert len(fake.batches) == 1 and fake.calls["POST /v1/batches"] == 1
    report = json.loads((tmp_path / "out" / "_work" / "shard_00000_of_00001" / "openai_batch_report.json").read_text())
    assert report["batches_adopted"] == 1 and report["batches_created"] == 0 and report["failed"] == 0


def test_chat_retries_rate_limits_and_server_errors(tmp_path, fake):
    synthetic_source(tmp_path / "src", 3)
    fake.chat_faults = [429, 500, 503]
    cfg = cfg_for(tmp_path, fake, "out", backend="openai_chat")
    run(cfg)
    recs = records(tmp_path / "out")
    n = sum(r["num_chunks"] for r in recs)
    assert [[c["latent"] for c in r["chunks"]] for r in recs] == expected_latents(recs)
    report = json.loads((tmp_path / "out" / "_work" / "shard_00000_of_00001" / "openai_chat_report.json").read_text())
    assert report["retried"] == 3 and report["succeeded"] == n and fake.calls["POST /v1/chat/completions"] == n + 3


def test_chat_failure_fails_shard_and_rerun_sends_only_the_failed_request(tmp_path, fake):
    synthetic_source(tmp_path / "src", 3)
    fake.chat_faults = [400]  # not retryable
    cfg = cfg_for(tmp_path, fake, "out", backend="openai_chat")
    with pytest.raises(RuntimeError, match=r"1 of \d+ requests failed .*BadRequestError"):
        run(cfg)
    sent = fake.calls["POST /v1/chat/completions"]
    run(cfg)
    assert fake.calls["POST /v1/chat/completions"] == sent + 1
    recs = records(tmp_path / "out")
    assert [[c["latent"] for c in r["chunks"]] for r in recs] == expected_latents(recs)


@pytest.mark.parametrize("backend", ["openai_chat", "openai_batch"])
def test_unreachable_server_fails_fast_with_one_line_naming_the_url(tmp_path, monkeypatch, capfd, backend):
    """Fault 7: connection refused was retried 8 times with backoff per request (200 s for 4
    requests) and ended in ``APIConnectionError: Connection error.`` without the URL."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    synthetic_source(tmp_path / "src", 4)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'out'}", f"backend={backend}", f"api.base_url={url}", "progress=false"])
    assert time.monotonic() - t0 < 15 and e.value.code == 1
    err = [line for line in capfd.readouterr().err.splitlines() if "error" in line.lower()]
    assert err == [f"apps.bolt.gen_latents: error: cannot connect to the teacher server at {url} "
                   "(connection refused, 3 attempt(s)); is it running, and is api.base_url right?"], err


def test_gen_latents_prints_each_console_line_once(tmp_path):
    """Fault 7: every console line of gen_latents appeared twice (the root logger's console
    handler printed what the run's own handler had already printed)."""
    synthetic_source(tmp_path / "src", 3)
    proc = subprocess.run([sys.executable, "-m", "apps.bolt.gen_latents", f"src={tmp_path / 'src'}",
                           f"out={tmp_path / 'out'}", "backend=oracle", "progress=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = (proc.stdout + proc.stderr).splitlines()
    assert len([line for line in both if "merged 1 shard(s) into" in line]) == 1, both
    assert len([line for line in both if "shard 0/1 done" in line]) == 1, both


def test_wrap_methods_through_the_chat_backend(tmp_path, fake):
    synthetic_source(tmp_path / "src", 12)
    run(cfg_for(tmp_path, fake, "wrap", backend="openai_chat", method="wrap_baseline", num_repeats=2))
    recs = records(tmp_path / "wrap")
    assert len(recs) == 24 and [r["latent_source"]["repeat"] for r in recs] == [0] * 12 + [1] * 12
    assert len(fake.chat_bodies) == 24 and all(b["max_tokens"] == 5000 and len(b["messages"]) == 1 for b in fake.chat_bodies)
    styles = {b["messages"][0]["content"].split(".")[0] for b in fake.chat_bodies}
    assert len(styles) >= 3  # several of the four WRAP-Orig styles were drawn
    by_text = {(b["messages"][0]["content"].split("## Website\n", 1)[1], default_reply(b)) for b in fake.chat_bodies}
    assert {(r["text"], r["latent"]) for r in recs} == by_text  # each paraphrase filed under its document
    assert all(r["output_tokens"] > 0 and r["input_tokens"] > 0 and "chunks" not in r for r in recs)


def test_cache_hits_on_rerun_send_nothing_across_backends(tmp_path, fake, monkeypatch):
    synthetic_source(tmp_path / "src", 3)
    run(cfg_for(tmp_path, fake, "first"))
    before = sum(fake.calls.values())
    monkeypatch.delenv("OPENAI_API_KEY")  # answered from the cache: no key needed
    cache = str(tmp_path / "first" / "_work" / "cache.sqlite")
    for name, backend in (("again_batch", "openai_batch"), ("again_chat", "openai_chat")):
        run(cfg_for(tmp_path, fake, name, backend=backend, cache_path=cache))
        assert records(tmp_path / name) == [
            {**r, "latent_source": {**r["latent_source"], "backend": backend}} for r in records(tmp_path / "first")
        ]
    assert sum(fake.calls.values()) == before  # not a single HTTP request
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # a changed sampling parameter misses the cache
    run(cfg_for(tmp_path, fake, "hotter", backend="openai_chat", cache_path=cache, temperature=1.0))
    assert fake.calls["POST /v1/chat/completions"] == sum(r["num_chunks"] for r in records(tmp_path / "first"))


def test_api_key_is_never_written_or_logged(tmp_path, fake, monkeypatch, capfd):
    synthetic_source(tmp_path / "src", 2)
    run(cfg_for(tmp_path, fake, "batch"))
    # key from a .env file instead of the environment
    monkeypatch.delenv("OPENAI_API_KEY")
    dotenv = tmp_path / "secrets" / ".env"
    dotenv.parent.mkdir()
    dotenv.write_text(f"OPENAI_API_KEY={KEY}\n")
    run(cfg_for(tmp_path, fake, "chat", backend="openai_chat", api={"dotenv_path": str(dotenv)}))
    assert not os.environ.get("OPENAI_API_KEY")  # read without exporting it
    # A wrong key: the fake's 401 quotes it verbatim; the CLI's error output must not.
    wrong = "sk-wrong-0000111122223333444455556666"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    with pytest.raises(SystemExit):
        main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'denied'}", "backend=openai_batch",
              f"api.base_url={fake.base_url}", "progress=false"])
    captured = capfd.readouterr()
    assert "Incorrect API key provided: <redacted>" in captured.err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != dotenv]
    assert len(written) > 20
    for secret in (KEY, wrong, KEY[10:30]):
        assert secret not in captured.out and secret not in captured.err
        assert not [str(p) for p in written if secret.encode() in p.read_bytes()]


def test_oracle_and_openai_backends_produce_the_same_schema(tmp_path, fake):
    synthetic_source(tmp_path / "src", 4)
    outs = {}
    for backend in ("oracle", "openai_batch", "openai_chat"):
        run(cfg_for(tmp_path, fake, backend, backend=backend))
        outs[backend] = records(tmp_path / backend)
    oracle = outs["oracle"]
    assert sum(bool(c["latent"]) for r in oracle for c in r["chunks"]) > len(oracle)  # true derivations found
    for backend, recs in outs.items():
        assert [sorted(r) for r in recs] == [sorted(r) for r in oracle], backend
        assert [[sorted(c) for c in r["chunks"]] for r in recs] == [[sorted(c) for c in r["chunks"]] for r in oracle], backend
        assert [[c["suffix"] for c in r["chunks"]] for r in recs] == [[c["suffix"] for c in r["chunks"]] for r in oracle]
        assert all("".join(c["suffix"] for c in r["chunks"]) == r["text"] for r in recs)
        assert sorted(recs[0]["latent_source"]) == ["backend", "method", "model", "prompt", "repeat"]


def _serving_deps_missing() -> str | None:
    import importlib.util

    missing = [m for m in ("uvicorn", "fastapi", "accelerate") if importlib.util.find_spec(m) is None]
    return f"transformers serve needs {', '.join(missing)}" if missing else None


@pytest.mark.slow
@pytest.mark.skipif(_serving_deps_missing() is not None, reason=str(_serving_deps_missing()))
def test_transformers_serve_tiny_exported_model_through_the_chat_backend(tmp_path, monkeypatch):
    """A real OpenAI-compatible server (``transformers serve``) on a 2-layer model exported by
    our HF exporter; latents come back through the sync backend (~25 s, mostly server start)."""
    import socket
    import urllib.request

    import torch

    from lingua.consolidated import save_consolidated
    from lingua.hf import export_hf
    from lingua.tokenizer import TokenizerArgs, build_tokenizer
    from lingua.transformer import TransformerArgs, build_model

    tok = build_tokenizer(TokenizerArgs(name="bytes"))
    torch.manual_seed(0)
    model = build_model(TransformerArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, multiple_of=16, max_seqlen=4096))
    hf_dir = export_hf(save_consolidated(model, tok, tmp_path / "ckpt"), tmp_path / "hf")
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", str(hf_dir), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--dtype", "float32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "transformers serve did not come up in 120 s"
                time.sleep(0.5)
        src = tmp_path / "src"
        src.mkdir()
        (src / "docs.jsonl").write_text(json.dumps({"id": "a", "text": "Solve 2x = 6. So x = 3."}) + "\n")
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
        cfg = GenLatentsArgs(src=str(src), out=str(tmp_path / "out"), backend="openai_chat", model=str(hf_dir),
                             max_tokens=8, progress=False, api=ApiArgs(base_url=f"http://127.0.0.1:{port}/v1", timeout_s=120))
        lineage = run(cfg)["lineage"]
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    (rec,) = records(tmp_path / "out")
    assert rec["num_chunks"] == len(rec["chunks"]) >= 1
    assert all(c["latent"] and c["finish_reason"] in ("length", "stop") for c in rec["chunks"])
    assert all(0 < c["output_tokens"] <= 8 for c in rec["chunks"])
    assert lineage["teacher_totals"]["input_tokens"] > 300  # the reference prompt, in byte tokens
