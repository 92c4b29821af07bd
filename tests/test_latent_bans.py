"""Banned tokens: never drawn (sampling or greedy), log q renormalized over the allowed tokens, the
engine's checks, and the E-step's latent sampler banning the latent markers, BOS and EOS."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from apps.bolt.formats import EOL, POST, PRIOR, SOL, SPECIAL_TOKENS
from apps.bolt.posterior import ChunkInput, PosteriorArgs, PosteriorSampler
from lingua.generation import Engine
from lingua.sample_store import SampleStore, make_key
from lingua.sampling import SamplingParams, draw
from lingua.tokenizer import TokenizerArgs, build_tokenizer
from lingua.transformer import TransformerArgs, build_model
from tests.test_generation import PROMPTS, TOK, full_forward_logits, ref_processed, tiny_model

CONFIGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.8, 30, 0.9), (1.0, 3, 1.0)]  # temperature, top_k, top_p


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, TOK, max_batch_tokens=4096)


@pytest.fixture(scope="module")
def frequent(engine):
    """The 12 tokens the model samples most often from PROMPTS: banning them matters."""
    params = SamplingParams(temperature=1.0, max_new_tokens=24, n=8, seed=3, ignore_eos=True)
    counts = Counter(t for s in engine.generate(PROMPTS, params) for r in s for t in r.token_ids)
    banned = sorted(t for t, _ in counts.most_common(12))
    assert sum(counts[t] for t in banned) > 0.2 * sum(counts.values())  # the bans below have work to do
    return banned


def _allowed_reference(logits: np.ndarray, banned: list[int], t: float, k: int, p: float) -> np.ndarray:
    """Independent float64 log q: temperature/top-k/top-p, then banned ids at 0, renormalized;
    a row whose filters kept only banned tokens filters the allowed tokens instead."""
    probs = np.exp(ref_processed(logits, t, k, p))
    probs[banned] = 0.0
    if probs.sum() == 0.0:
        masked = logits.astype(np.float64).copy()
        masked[banned] = -np.inf
        probs = np.exp(ref_processed(masked, t, k, p))
    with np.errstate(divide="ignore"):
        return np.log(probs / probs.sum())


# --------------------------------------------------------------------------------------------
# lingua: sampling math and engine


def test_banned_ids_are_validated():
    for bad in ([-1], [3, -2], ["7"], [1.0]):
        with pytest.raises(ValueError, match="banned_token_ids must be ints >= 0"):
            SamplingParams(banned_token_ids=bad).validate()
    with pytest.raises(ValueError, match="both banned and stop"):
        SamplingParams(banned_token_ids=[4, 5], stop_token_ids=[5]).validate()
    SamplingParams(banned_token_ids=[0, 4], stop_token_ids=[5]).validate()


@pytest.mark.parametrize("t,k,p", CONFIGS)
def test_sampling_never_draws_banned_tokens(engine, frequent, t, k, p):
    params = SamplingParams(temperature=t, top_k=k, top_p=p, max_new_tokens=24, n=8, seed=3, ignore_eos=True)
    free = [tok for s in engine.generate(PROMPTS, params) for r in s for tok in r.token_ids]
    assert set(free) & set(frequent)  # without bans these configs do draw them
    params.banned_token_ids = frequent
    drawn = [tok for s in engine.generate(PROMPTS, params) for r in s for tok in r.token_ids]
    assert len(drawn) == len(free) and not set(drawn) & set(frequent)


def test_greedy_takes_the_argmax_of_the_allowed_tokens(model, engine):
    free = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True))
    banned = sorted({t for s in free for t in s[0].token_ids})  # every token greedy decoding chose
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True, banned_token_ids=banned)
    for prompt, samples in zip(PROMPTS, engine.generate(PROMPTS, params)):
        r = samples[0]
        assert len(r.token_ids) == 16 and not set(r.token_ids) & set(banned)
        ids = TOK.encode(prompt, add_bos=True) + r.token_ids
        logits = full_forward_logits(model, ids)[r.prompt_len - 1 : -1]
        raw = torch.log_softmax(logits, -1)
        allowed = logits.clone()
        allowed[:, banned] = float("-inf")
        assert r.token_ids == allowed.argmax(-1).tolist()
        assert all(r.is_greedy) and r.sampled_logprobs == [0.0] * 16
        want = raw.gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
        assert (want - torch.tensor(r.logprobs)).abs().max() < 1e-4  # raw log p, not renormalized


@pytest.mark.parametrize("t,k,p", CONFIGS)
def test_sampled_logprobs_are_renormalized_over_allowed_tokens(model, engine, frequent, t, k, p):
    params = SamplingParams(
        temperature=t, top_k=k, top_p=p, max_new_tokens=20, n=3, seed=9, ignore_eos=True, banned_token_ids=frequent
    )
    worst_p = worst_q = 0.0
    gaps = []
    for prompt, samples in zip(PROMPTS, engine.generate(PROMPTS, params)):
        for r in samples:
            ids = TOK.encode(prompt, add_bos=True) + r.token_ids
            logits = full_forward_logits(model, ids)[r.prompt_len - 1 : -1]
            raw = torch.log_softmax(logits, -1)
            for step, tok in enumerate(r.token_ids):
                q = _allowed_reference(logits[step].numpy(), frequent, t, k, p)
                unbanned = ref_processed(logits[step].numpy(), t, k, p)
                worst_q = max(worst_q, abs(q[tok] - r.sampled_logprobs[step]))
                worst_p = max(worst_p, abs(float(raw[step, tok]) - r.logprobs[step]))
                gaps.append(abs(q[tok] - unbanned[tok]))
            allowed = logits.clone()
            allowed[:, frequent] = float("-inf")
            assert r.is_greedy == (allowed.argmax(-1) == torch.tensor(r.token_ids)).tolist()
    assert worst_q < 1e-4 and worst_p < 1e-4
    assert max(gaps) > 1e-2  # the renormalization is visible: log q without it would fail above


def test_filters_that_keep_only_banned_tokens_fall_back_to_the_allowed_ones():
    torch.manual_seed(0)
    logits = torch.randn(4, 20)
    logits[:3, 0] = 12.0  # rows 0-2: token 0 holds almost all the mass; row 3: it does not
    u = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    for k, p in [(1, 1.0), (0, 0.5), (2, 0.3)]:
        d = draw(logits, SamplingParams(top_k=k, top_p=p, banned_token_ids=[0]), u)
        assert (d.tokens != 0).all() and torch.isfinite(d.sampled_logprobs).all()
        for row in range(4):
            q = _allowed_reference(logits[row].numpy(), [0], 1.0, k, p)
            assert abs(q[int(d.tokens[row])] - float(d.sampled_logprobs[row])) < 1e-5
        if k == 1:  # top-1 of the allowed tokens: a point mass on their argmax
            assert d.tokens[:3].tolist() == (logits[:3, 1:].argmax(-1) + 1).tolist()
            assert d.sampled_logprobs[:3].abs().max() < 1e-6 and d.is_greedy[:3].all()


def test_engine_refuses_banned_stop_tokens_and_bad_ids(model):
    engine = Engine(model, TOK)
    base = dict(temperature=1.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="both banned and stop"):
        engine.generate(["a"], SamplingParams(**base, stop_token_ids=[7], banned_token_ids=[7]))
    # EOS stops generation by default, so banning it needs ignore_eos
    with pytest.raises(ValueError, match=rf"\[{TOK.eos_id}\] are both banned and stop.*ignore_eos"):
        engine.generate(["a"], SamplingParams(**base, banned_token_ids=[TOK.eos_id]))
    ok = engine.generate(["a"], SamplingParams(**base, ignore_eos=True, banned_token_ids=[TOK.eos_id]))
    assert TOK.eos_id not in ok[0][0].token_ids
    with pytest.raises(ValueError, match="outside"):
        engine.generate(["a"], SamplingParams(**base, ignore_eos=True, banned_token_ids=[TOK.vocab_size]))
    with pytest.raises(ValueError, match="whole vocabulary"):
        engine.generate(["a"], SamplingParams(**base, ignore_eos=True, banned_token_ids=list(range(TOK.vocab_size))))


# --------------------------------------------------------------------------------------------
# apps/bolt: the E-step's latent sampler


class RecordingBackend:
    """Forwards to an engine and keeps every generated token id."""

    def __init__(self, engine: Engine):
        self.engine, self.generated = engine, []

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_seq_len(self):
        return self.engine.max_seq_len

    def generate(self, prompts, params):
        res = self.engine.generate(prompts, params)
        self.generated += [r.token_ids for s in res for r in s]
        return res

    def score(self, pairs, max_len=None, *, add_bos=True):
        return self.engine.score(pairs, max_len, add_bos=add_bos)


@pytest.fixture(scope="module")
def latent_world():
    tok = build_tokenizer(TokenizerArgs(name="bytes", special_tokens=list(SPECIAL_TOKENS)))
    torch.manual_seed(0)
    args = TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seqlen=256)
    model = build_model(args)
    banned = sorted([tok.special_ids[s] for s in (SOL, PRIOR, POST)] + [tok.bos_id, tok.eos_id])
    with torch.no_grad():  # make the forbidden tokens common, so that unbanned sampling draws them
        model.output.weight[banned] *= 4.0
    return tok, Engine(model, tok), banned


def test_posterior_latents_never_contain_markers_bos_or_eos(latent_world, tmp_path):
    tok, engine, banned = latent_world
    eol = tok.special_ids[EOL]
    chunks = [ChunkInput("Some prefix text.", f"Chunk number {i} says hi.", "doc", i) for i in range(6)]
    store = SampleStore(tmp_path / "samples.db")

    def sampler(ban: bool):
        backend = RecordingBackend(engine)
        args = PosteriorArgs(num_samples=4, max_latent_tokens=16, ban_special_tokens=ban)
        return backend, PosteriorSampler(backend, args, model_fingerprint="fp", store=store)

    # without bans (the old behaviour): the forbidden tokens show up, and these samples get cached
    free_backend, free = sampler(False)
    free_posts = free.run(chunks)
    assert free.banned_ids == [] and free.stats.samples_drawn == 24
    assert sum(t in banned for ids in free_backend.generated for t in ids) > 10
    assert any(m in z for p in free_posts for z in p.latents for m in (SOL, PRIOR, POST, "<|bos|>", "<|eos|>"))

    # with bans: the cached unbanned samples are not reused, and no latent holds a forbidden token
    backend, banned_sampler = sampler(True)
    assert banned_sampler.banned_ids == banned and eol not in banned
    posts = banned_sampler.run(chunks)
    assert banned_sampler.stats.samples_cached == 0 and banned_sampler.stats.samples_drawn == 24
    assert len(backend.generated) == 24
    for ids in backend.generated:
        assert not set(ids) & set(banned)
        assert eol not in ids[:-1]  # EoL stays allowed: it ends the thought
    assert any(ids[-1] == eol for ids in backend.generated)
    for p in posts:
        for z in p.latents:
            assert not any(m in z for m in (SOL, EOL, PRIOR, POST, "<|bos|>", "<|eos|>"))
        assert np.isfinite(p.log_q).all() and np.isfinite(p.log_p).all()

    prompt = "any prompt"
    assert banned_sampler._sample_key(prompt) != free._sample_key(prompt)
    # ban_special_tokens=false keeps the cache keys of samples written before bans existed
    old = make_key(kind="posterior", model="fp", prompt=prompt, temperature=1.0, top_p=1.0, top_k=0,
                   max_latent_tokens=16, max_ctx=256, seed=42)
    assert free._sample_key(prompt) == old

    # a second banned run replays its own cache
    _, again = sampler(True)
    replay = again.run(chunks)
    assert again.stats.samples_drawn == 0 and again.stats.samples_cached == 24
    assert [p.latents for p in replay] == [p.latents for p in posts]
