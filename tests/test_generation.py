"""Generation and scoring engine: numbers against full forwards, HF generate, and independent math."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from lingua.batching import length_buckets
from lingua.generation import Engine, GenerationBackend
from lingua.sampling import SamplingParams, processed_logprobs, sample_inverse_cdf, stream_key, stream_uniforms
from lingua.transformer import TransformerArgs, build_model

PROMPTS = ["hello world", "a", "the quick brown fox jumps over", "0123456789"]


class CharTokenizer:
    """Stand-in with the Tokenizer contract: printable ASCII, one id per character when encoding,
    plus a few multi-character pieces the model can emit (so decoded pieces need not be 1:1)."""

    PIECES = ["th", "ing", " the"]

    def __init__(self, eos_id: int | None = None):
        self.pieces = [chr(c) for c in range(32, 127)] + self.PIECES
        self.bos_id = len(self.pieces)
        self.eos_id = self.bos_id + 1 if eos_id is None else eos_id
        self.pad_id = None
        self.vocab_size = len(self.pieces) + 2
        self._index = {c: i for i, c in enumerate(self.pieces)}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self._index[c] for c in text]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids if i < len(self.pieces) and i != self.eos_id)


TOK = CharTokenizer()


def tiny_model(seed: int = 0, max_seqlen: int = 64, vocab: int = TOK.vocab_size):
    args = TransformerArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, max_seqlen=max_seqlen, multiple_of=16, seed=seed
    )
    return build_model(args)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def engine(model):
    return Engine(model, TOK, max_batch_tokens=4096)


def full_forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def greedy(n: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, **kw)


def ref_processed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent float64 reference of temperature -> top-k -> top-p (kept while mass-before < p)."""
    x = logits.astype(np.float64) / temperature
    if top_k:
        x[x < np.sort(x)[-top_k]] = -np.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if top_p < 1:
        keep = np.zeros_like(probs, dtype=bool)
        mass = 0.0
        for idx in np.argsort(-probs, kind="stable"):
            keep[idx] = True
            mass += probs[idx]
            if mass >= top_p:
                break
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    with np.errstate(divide="ignore"):
        return np.log(probs)


# --------------------------------------------------------------------------------------------
# sampling math


def test_processed_logprobs_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 3
    for t, k, p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 10, 1.0), (0.8, 0, 0.9), (0.6, 15, 0.5)]:
        got = processed_logprobs(logits, t, k, p).double().numpy()
        for row in range(5):
            want = ref_processed(logits[row].numpy(), t, k, p)
            assert np.array_equal(np.isinf(got[row]), np.isinf(want)), (t, k, p)
            finite = np.isfinite(want)
            assert np.abs(got[row][finite] - want[finite]).max() < 1e-5


def test_inverse_cdf_sampling_frequencies_match_probabilities():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])
    n = 20000
    u = torch.from_numpy(stream_uniforms([stream_key(3, [1, 2], s) for s in range(n)], step=0))
    assert 0.49 < float(u.mean()) < 0.51 and len(set(u.tolist())) == n
    tokens = sample_inverse_cdf(probs.log().expand(n, -1), u)
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert freq[5] == 0  # zero-probability tokens are never drawn
    assert (freq - probs.double()).abs().max() < 4 * math.sqrt(0.25 / n)


def test_sampling_params_validation():
    bads = [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(n=0), dict(max_new_tokens=0)]
    for bad in bads + [dict(stop_strings=[""]), dict(max_prompt_tokens=0)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()


def test_length_buckets_bound_padding():
    lens = [31, 2, 12, 11, 60, 58, 40]
    groups = length_buckets(lens)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    assert [[lens[i] for i in g] for g in groups] == [[60, 58], [40, 31], [12, 11, 2]]
    # the generation tests below prefill PROMPTS in two buckets
    assert length_buckets([len(TOK.encode(p, add_bos=True)) for p in PROMPTS]) == [[2], [0, 3, 1]]


# --------------------------------------------------------------------------------------------
# generation numbers


def test_empty_requests(engine):
    assert engine.generate([], greedy(4)) == [] and engine.score([]) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate(["a", ""], SamplingParams(add_bos=False))
    with pytest.raises(ValueError, match="prompt 0 has token ids outside"):
        engine.generate([[TOK.vocab_size]], greedy(4))


def test_engine_is_a_backend(engine):
    assert isinstance(engine, GenerationBackend)


def test_logprobs_match_full_forward_and_sampled_distribution(model, engine):
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, max_new_tokens=20, n=2, seed=7, ignore_eos=True)
    results = engine.generate(PROMPTS, params)
    worst = worst_q = 0.0
    for prompt, samples in zip(PROMPTS, results):
        assert len(samples) == 2
        for r in samples:
            assert len(r.token_ids) == len(r.logprobs) == len(r.sampled_logprobs) == len(r.is_greedy) == 20
            ids = TOK.encode(prompt, add_bos=True) + r.token_ids
            logits = full_forward_logits(model, ids)[r.prompt_len - 1 : -1]
            full = torch.log_softmax(logits, -1)
            want = full.gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
            worst = max(worst, (want - torch.tensor(r.logprobs)).abs().max().item())
            assert r.is_greedy == (full.argmax(-1) == torch.tensor(r.token_ids)).tolist()
            for t, tok in enumerate(r.token_ids):
                q = ref_processed(logits[t].numpy(), 0.8, 30, 0.9)
                worst_q = max(worst_q, abs(q[tok] - r.sampled_logprobs[t]))
            assert r.finish_reason == "length" and r.stop_reason is None and r.text == TOK.decode(r.token_ids)
    assert worst < 1e-4 and worst_q < 1e-4
    # sampled log q differs from the untempered log p: the E-step needs the former
    assert any(abs(a - b) > 1e-3 for s in results for r in s for a, b in zip(r.logprobs, r.sampled_logprobs))


def test_greedy_batched_equals_one_at_a_time(engine):
    batched = engine.generate(PROMPTS, greedy(24))
    for prompt, samples in zip(PROMPTS, batched):
        alone = engine.generate([prompt], greedy(24))[0][0]
        assert samples[0].token_ids == alone.token_ids
        assert np.allclose(samples[0].logprobs, alone.logprobs, atol=1e-5)
        assert all(samples[0].is_greedy) and samples[0].sampled_logprobs == [0.0] * 24


def test_n_samples_share_prefill_and_equal_independent_runs(engine):
    prompt = PROMPTS[2]
    n_prompt = len(TOK.encode(prompt, add_bos=True))
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=11, ignore_eos=True)
    before = engine.stats.prefill_tokens
    many = engine.generate([prompt], params)[0]
    assert engine.stats.prefill_tokens - before == n_prompt  # one prefill for 4 samples
    assert len({tuple(r.token_ids) for r in many}) == 4
    for j, r in enumerate(many):
        one = engine.generate([prompt], replace(params, n=1, sample_offset=j))
        assert one[0][0].token_ids == r.token_ids
    # the same prompt twice with n=2 continues the sample indices: samples 0,1 then 2,3
    twice = engine.generate([prompt, prompt], replace(params, n=2))
    assert [r.token_ids for s in twice for r in s] == [r.token_ids for r in many]


def test_seeds_reproducible_across_batch_compositions(model):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, n=2, seed=5, ignore_eos=True)
    a = Engine(model, TOK, max_batch_tokens=4096).generate(PROMPTS, params)
    # other neighbours, other order, and a budget so small every prompt runs in its own batch
    small = Engine(model, TOK, max_batch_tokens=40)
    b = small.generate(["zzz", PROMPTS[2], PROMPTS[0]], params)
    assert [r.token_ids for r in b[1]] == [r.token_ids for r in a[2]]
    assert [r.token_ids for r in b[2]] == [r.token_ids for r in a[0]]
    assert np.allclose(b[1][0].logprobs, a[2][0].logprobs, atol=1e-5)
    assert small.stats.batches >= 3  # really split into several batches
    other_seed = Engine(model, TOK).generate([PROMPTS[0]], replace(params, n=1, seed=6))
    assert other_seed[0][0].token_ids != a[0][0].token_ids


def _first_prefix_containing(tokens: list[int], needle: str) -> int:
    for k in range(1, len(tokens) + 1):
        if needle in TOK.decode(tokens[:k]):
            return k
    raise AssertionError("needle not generated")


def test_stop_strings_spanning_several_tokens(engine):
    free = engine.generate(PROMPTS, greedy(30))
    stops = []
    for samples in free:
        text = samples[0].text
        stops.append(text[6:9])  # 3 characters: at least 2 tokens, maybe mid-piece
    for i, prompt in enumerate(PROMPTS):
        stop = stops[i]
        neighbour = PROMPTS[(i + 1) % len(PROMPTS)]  # stop handling is per row inside a batch
        res = engine.generate([prompt, neighbour], greedy(30, stop_strings=[stop, "never-generated-#"]))
        r, full = res[0][0], free[i][0]
        k = _first_prefix_containing(full.token_ids, stop)
        assert k >= 2 and r.finish_reason == "stop" and r.stop_reason == stop
        assert r.token_ids == full.token_ids[:k] and len(r.logprobs) == k  # stop tokens recorded and scored
        assert r.text == full.text[: full.text.find(stop)]
        assert np.allclose(r.logprobs, full.logprobs[:k], atol=1e-5)


def test_stop_token_ids_and_eos(model):
    base = Engine(model, TOK).generate([PROMPTS[0]], greedy(20))[0][0]
    stop_tok = base.token_ids[4]
    k = base.token_ids.index(stop_tok) + 1
    r = Engine(model, TOK).generate([PROMPTS[0]], greedy(20, stop_token_ids=[stop_tok]))[0][0]
    assert r.finish_reason == "stop" and r.stop_reason == stop_tok and r.token_ids == base.token_ids[:k]
    assert r.text == TOK.decode(base.token_ids[: k - 1]) and len(r.logprobs) == k
    eos_tok = CharTokenizer(eos_id=stop_tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=20)
    assert Engine(model, eos_tok).generate([PROMPTS[0]], params)[0][0].token_ids == base.token_ids[:k]
    params.ignore_eos = True
    assert Engine(model, eos_tok).generate([PROMPTS[0]], params)[0][0].finish_reason == "length"


def test_finished_rows_leave_the_batch(engine):
    """Each decoding forward runs only live rows: rows x steps equals tokens minus first tokens."""
    params = SamplingParams(temperature=1.0, max_new_tokens=24, n=3, seed=2, stop_token_ids=list(range(0, 95, 3)))
    engine.stats.decode_rows = 0
    res = engine.generate(PROMPTS, params)
    lengths = [len(r.token_ids) for s in res for r in s]
    assert len(set(lengths)) > 3 and min(lengths) < 24  # rows really finish at different steps
    assert engine.stats.decode_rows == sum(n - 1 for n in lengths)


def test_left_truncation_is_explicit_and_reported(model, engine):
    long_prompt = "abcdefghij" * 5  # 51 tokens with BOS
    ids = TOK.encode(long_prompt, add_bos=True)
    r = engine.generate([long_prompt, "hi"], greedy(8, max_prompt_tokens=12))
    assert (r[0][0].prompt_len, r[0][0].prompt_tokens_dropped) == (12, len(ids) - 12)
    assert (r[1][0].prompt_len, r[1][0].prompt_tokens_dropped) == (3, 0)
    kept = [TOK.bos_id] + ids[-11:]  # BOS stays, oldest text goes
    assert engine.generate([kept], greedy(8))[0][0].token_ids == r[0][0].token_ids
    # prompts that only differ in the dropped part share a prefill but report their own drop
    twins = engine.generate([long_prompt, "zz" + long_prompt], greedy(8, max_prompt_tokens=12))
    assert [t[0].prompt_tokens_dropped for t in twins] == [len(ids) - 12, len(ids) - 10]
    with pytest.raises(ValueError, match="prompt 0 has 64 tokens.*max_prompt_tokens"):
        engine.generate(["x" * 63], greedy(4))
    capped = engine.generate(["x" * 60], greedy(10))[0][0]  # 61 prompt tokens, window 64
    assert len(capped.token_ids) == 3 and capped.finish_reason == "length"


# --------------------------------------------------------------------------------------------
# scoring


def _reference_score(model, ctx: list[int], cont: list[int]) -> list[float]:
    lp = torch.log_softmax(full_forward_logits(model, ctx + cont), -1)
    return [lp[len(ctx) - 1 + t, tok].item() for t, tok in enumerate(cont)]


def test_score_matches_full_forward_and_shares_contexts(model, engine):
    bos = TOK.bos_id
    pairs = [
        ("the cat", " sat on the mat"),  # strings: joint tokenization
        ([bos] + TOK.encode("shared context"), TOK.encode(" one")),
        ([bos] + TOK.encode("shared context"), TOK.encode(" and a longer two")),
        ([bos] + TOK.encode("shared context"), TOK.encode("3")),
        ([bos] + TOK.encode("other"), TOK.encode(" x")),
        ([bos] + TOK.encode("other"), TOK.encode(" yz")),
        ([bos, 5], []),
    ]
    before = engine.stats.prefill_tokens
    got = engine.score(pairs)
    for (c, k), s in zip(pairs, got):
        ctx = TOK.encode(c, add_bos=True) if isinstance(c, str) else c
        cont = TOK.encode(k) if isinstance(k, str) else k
        want = _reference_score(model, ctx, cont)
        assert s.num_tokens == len(cont) and s.tokens_dropped == 0
        assert np.allclose(s.token_logprobs, want, atol=1e-4) and abs(s.sum_logprob - sum(want)) < 1e-3
    assert got[-1].sum_logprob == 0.0 and got[-1].num_tokens == 0
    # each shared context ran once: 15 + 6 context tokens, not 3 * 15 + 2 * 6
    ran = engine.stats.prefill_tokens - before
    assert ran == (8 + 15) + 15 + (4 + 17 + 1) + 6 + (2 + 3)


def test_score_greedy_flag(model, engine):
    ctx = [TOK.bos_id] + TOK.encode("abc")
    cont = engine.generate([ctx], greedy(5))[0][0].token_ids
    assert engine.score([(ctx, cont)])[0].is_greedy
    assert not engine.score([(ctx, [(cont[0] + 1) % 90] + cont[1:])])[0].is_greedy


def test_score_context_window_rule(model, engine):
    ctx = [TOK.bos_id] + TOK.encode("0123456789" * 3)
    cont = TOK.encode("abcdef")
    s = engine.score([(ctx, cont), (ctx, cont[:2])], max_len=20)
    # each pair is cut on its own: BOS + the last 13 (resp. 17) context tokens
    assert (s[0].tokens_dropped, s[1].tokens_dropped) == (len(ctx) - 14, len(ctx) - 18)
    assert np.allclose(s[0].token_logprobs, _reference_score(model, [ctx[0]] + ctx[-13:], cont), atol=1e-4)
    assert np.allclose(s[1].token_logprobs, _reference_score(model, [ctx[0]] + ctx[-17:], cont[:2]), atol=1e-4)
    with pytest.raises(ValueError, match="pair 1: continuation has 20 tokens"):
        engine.score([(ctx, cont), (ctx, TOK.encode("x" * 20))], max_len=20)


def test_budget_splitting_does_not_change_scores(model):
    pairs = [([TOK.bos_id] + TOK.encode(p), TOK.encode(" tail " + p[:5])) for p in PROMPTS]
    pairs += [(pairs[0][0], TOK.encode(" shared"))]
    roomy = Engine(model, TOK, max_batch_tokens=4096)
    big = roomy.score(pairs)
    tiny = Engine(model, TOK, max_batch_tokens=8)
    small = tiny.score(pairs)
    # 3 unique contexts + 1 shared one with 2 continuations: every row alone when the budget is tiny
    assert tiny.stats.batches == 5 and roomy.stats.batches < 5
    for a, b in zip(big, small):
        assert np.allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


# --------------------------------------------------------------------------------------------
# HF transformers parity


def test_greedy_equals_hf_generate(model):
    hf = pytest.importorskip("lingua.hf")
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM(hf.to_llama_config(model.args)).eval()
    hf_model.load_state_dict(hf.lingua_to_hf_state_dict(model.state_dict(), model.args))
    encoded = [TOK.encode(p, add_bos=True) for p in PROMPTS]
    width = max(map(len, encoded))
    input_ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=20, do_sample=False,
            pad_token_id=0, eos_token_id=None, min_new_tokens=20,
        )
    ours = Engine(model, TOK).generate(PROMPTS, greedy(20))
    for row, samples in enumerate(ours):
        assert samples[0].token_ids == out[row, width:].tolist()


@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_decode_profile_replays_the_engine(mode):
    """benchmarks.decode_profile copies the packed-weights forward op for op; it asserts the copy
    decodes the same tokens as ``model(...)``, which this smoke run exercises at a tiny size."""
    pytest.importorskip("transformers")
    from benchmarks import decode_profile

    out = decode_profile.run(decode_profile.ProfileArgs(
        prompts=4, new_tokens=4, min_prompt_len=3, max_prompt_len=9, dim=32, n_layers=2, n_heads=2,
        vocab_size=64, repeats=1, mode=mode, threads=None,
    ))
    parts = out["per_step_ms"]
    assert {"attention (SDPA over cache)", "matmul: qkv", "sampling: draw()", "kv cache write"} <= set(parts)
    assert all(v >= 0 for v in parts.values())


# --------------------------------------------------------------------------------------------
# devices and CLI


@pytest.mark.gpu
def test_cuda_matches_cpu(model):
    cpu = Engine(model, TOK).generate(PROMPTS, greedy(16))
    gpu_engine = Engine(tiny_model(), TOK, device="cuda")
    gpu = gpu_engine.generate(PROMPTS, greedy(16))
    assert [s[0].token_ids for s in gpu] == [s[0].token_ids for s in cpu]
    sampled = SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=3, ignore_eos=True)
    a, b = Engine(model, TOK).generate(PROMPTS, sampled), gpu_engine.generate(PROMPTS, sampled)
    same = sum(x.token_ids == y.token_ids for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    assert same >= len(PROMPTS) * 2 - 1  # same streams; float noise may flip one boundary draw


def test_varying_shape_attention_is_a_no_op_on_cpu_and_leaves_cudnn_out_on_cuda():
    import contextlib

    from lingua.generation import varying_shape_attention

    assert isinstance(varying_shape_attention(torch.device("cpu")), contextlib.nullcontext)
    if torch.cuda.is_available():  # the backend list is only consulted on CUDA
        with varying_shape_attention(torch.device("cuda")):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.gpu
def test_bf16_generation_on_cuda_is_complete():
    """bf16 weights on CUDA (the E-step's GPU setting) decode every requested token and give
    finite log-probs; greedy tokens need not equal fp32's."""
    engine = Engine(tiny_model().to(torch.bfloat16), TOK, device="cuda")
    out = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=3, ignore_eos=True))
    assert all(len(r.token_ids) == 16 and all(map(math.isfinite, r.logprobs)) for rs in out for r in rs)


def test_cli_reads_prompt_files(tmp_path):
    from apps.bolt.generate import read_prompts

    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\nb"}\n"plain"\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a\nb", "plain"]
    (tmp_path / "bad.jsonl").write_text('"ok"\n{"text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompts(tmp_path / "bad.jsonl")


def test_cli_end_to_end_on_a_consolidated_checkpoint(tmp_path):
    consolidated = pytest.importorskip("lingua.consolidated")
    from apps.bolt.generate import main
    from lingua.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    consolidated.save_consolidated(tiny_model(vocab=tok.vocab_size), tok, tmp_path / "ckpt")
    (tmp_path / "prompts.txt").write_text("Hello\nWorld\n")
    out = tmp_path / "out.jsonl"
    main([f"ckpt={tmp_path / 'ckpt'}", f"prompts={tmp_path / 'prompts.txt'}", "sampling.temperature=0",
          "sampling.max_new_tokens=5", "sampling.n=2", "device=cpu", f"output={out}"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["prompt_len"] == 6 and len(r["token_ids"]) <= 5 for r in records)


def test_cli_interactive(tmp_path, capsys):
    consolidated = pytest.importorskip("lingua.consolidated")
    from apps.bolt.generate import GenerateArgs, run
    from lingua.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    consolidated.save_consolidated(tiny_model(vocab=tok.vocab_size), tok, tmp_path / "ckpt")
    cfg = GenerateArgs(ckpt=str(tmp_path / "ckpt"), device="cpu")
    cfg.sampling.max_new_tokens = 4
    out = io.StringIO()
    totals = run(cfg, stdin=io.StringIO("Hi there\n\nsecond\nexit\nnot read\n"), out=out)
    assert totals["prompts"] == 2 and 2 <= totals["generated_tokens"] <= 8
    assert "tokens/s" in out.getvalue()
