"""Continuous batching (lingua/slot_pool.py, Engine's decode loop) and length-bucketed scoring.

The pool must change only how work is scheduled, never what is computed: samples equal static
batches and one-prompt-at-a-time runs, and the pool's rows (after joins, drops and shifts) see
exactly their own tokens, as a plain forward over each sequence does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lingua import scoring
from lingua.generation import Engine
from lingua.sampling import SamplingParams, stream_key, stream_uniforms
from lingua.slot_pool import SlotPool
from tests.test_generation import TOK, _reference_score, full_forward_logits, tiny_model

PROMPTS = ["hello world", "a", "the quick brown fox jumps", "0123456789", "xyz", "lorem ipsum dolor",
           "b", "one two three", "!!", "sit amet"]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_seqlen=128)


def _sampled(max_new: int = 20) -> SamplingParams:
    # stop tokens make samples end at very different steps, as latents do
    return SamplingParams(temperature=1.0, max_new_tokens=max_new, n=3, seed=7, stop_token_ids=list(range(0, 95, 12)))


def test_refills_give_the_samples_of_static_batches_and_of_single_runs(model, monkeypatch):
    live_at_join: list[list[int]] = []  # per call, the live rows at each admission (> 0: joined mid-decode)
    admit = SlotPool.admit
    monkeypatch.setattr(SlotPool, "admit", lambda pool, *a: live_at_join[-1].append(pool.n) or admit(pool, *a))
    params = _sampled()
    budget = 6 * (len(TOK.encode(PROMPTS[2], add_bos=True)) + 20 + 10)  # a pool of a few rows
    prompts = [p + suffix for suffix in ("", " 2", " three") for p in PROMPTS]
    cont = Engine(model, TOK, max_batch_tokens=budget, refill=True)
    static = Engine(model, TOK, max_batch_tokens=budget, refill=False)
    live_at_join.append([])
    a = cont.generate(prompts, params)
    live_at_join.append([])
    b = static.generate(prompts, params)
    lengths = [len(r.token_ids) for s in a for r in s]
    assert len(set(lengths)) > 5 and min(lengths) < 20 <= max(lengths)
    for i, prompt in enumerate(prompts):
        alone = Engine(model, TOK).generate([prompt], params)[0]
        for x, y, z in zip(a[i], b[i], alone):
            assert x.token_ids == y.token_ids == z.token_ids
            assert np.allclose(x.logprobs, z.logprobs, atol=1e-5) and np.allclose(x.sampled_logprobs, z.sampled_logprobs, atol=1e-5)
            assert x.finish_reason == z.finish_reason
    # the same tokens with fewer, wider forwards: rows joined while others were decoding
    assert cont.stats.decode_rows == static.stats.decode_rows == sum(n - 1 for n in lengths)
    joined, static_joined = live_at_join
    assert sum(n > 0 for n in joined) > 5 and set(static_joined) == {0} and len(static_joined) > 1
    assert cont.stats.decode_steps < static.stats.decode_steps


def test_greedy_and_budget_smaller_than_one_prompt(model):
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    many = Engine(model, TOK, max_batch_tokens=1).generate(PROMPTS, params)  # one row at a time
    wide = Engine(model, TOK, refill=True).generate(PROMPTS, params)
    assert [s[0].token_ids for s in many] == [s[0].token_ids for s in wide]
    assert Engine(model, TOK).refill is False  # static batches are the CPU default (measured faster there)


def _seq(seed: int, n: int) -> list[int]:
    return torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy_steps(model, pool: SlotPool, seqs: list[list[int]], logits: torch.Tensor, steps: int) -> torch.Tensor:
    """Decode ``steps`` greedy tokens for the pool's rows (``seqs``: their tokens so far, extended);
    after each step every row's logits must equal a plain forward over its whole sequence."""
    for _ in range(steps):
        nxt = logits.argmax(-1)
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        logits = pool.step(nxt)
        for s, row in zip(seqs, logits):
            assert torch.allclose(row, full_forward_logits(model, s)[-1], atol=1e-4)
    return logits


@torch.inference_mode()
def test_pool_rows_see_only_their_own_tokens_across_joins_drops_and_shifts(model):
    a, c, b = _seq(1, 10), _seq(2, 4), _seq(3, 5)
    pool = SlotPool(model, capacity=2, cache_len=16, device=torch.device("cpu"))
    logits = pool.admit([a, c], [1, 1], max_new=6)
    assert pool.pos == 10 and pool.pad.tolist() == [0, 6]
    seqs = [list(a), list(c)]
    logits = _greedy_steps(model, pool, seqs, logits, 2)
    pool.drop([1])  # a leaves; c stays with pad 6
    assert not pool.can_admit(13, 6)  # the prompt would not fit left of pos
    # b (5 tokens, 6 new) needs 12 + 6 - 16 = 2 free slots at the end: every row moves left by 6
    assert pool.can_admit(5, 6)
    new = pool.admit([b], [1], max_new=6)
    assert pool.shifts == 1 and pool.pos == 6 and pool.pad.tolist() == [0, 1]
    logits = torch.cat([logits[1:], new])
    _greedy_steps(model, pool, [seqs[1], list(b)], logits, 5)


def test_pool_refuses_what_does_not_fit():
    model = tiny_model()
    pool = SlotPool(model, capacity=2, cache_len=12, device=torch.device("cpu"))
    assert not pool.can_admit(8, 5) and pool.can_admit(8, 4)
    with pytest.raises(ValueError, match="3 rows do not fit the 2 free rows"):
        pool.admit([[1, 2]], [3], max_new=2)
    with pytest.raises(ValueError, match="do not fit the cache"):
        pool.admit([[1] * 8], [1], max_new=5)
    with pytest.raises(ValueError, match="capacity >= 1"):
        SlotPool(model, capacity=0, cache_len=12, device=torch.device("cpu"))


def test_stream_uniforms_take_one_step_per_row():
    keys = [stream_key(1, [2, 3], s) for s in range(4)]
    steps = [0, 5, 2, 9]
    per_row = stream_uniforms(keys, steps)
    assert per_row.tolist() == [stream_uniforms([k], t)[0] for k, t in zip(keys, steps)]
    assert stream_uniforms(keys, 3).tolist() == stream_uniforms(keys, [3] * 4).tolist()
    with pytest.raises(ValueError, match="4 keys but 2 steps"):
        stream_uniforms(keys, [1, 2])


def test_shared_context_continuations_run_in_length_buckets(model, monkeypatch):
    """Continuations of 1 to 60 tokens on one context: several forwards, each padded only to its
    own bucket's longest, and every score equal to a full forward."""
    calls = []
    run = scoring._continuations
    monkeypatch.setattr(scoring, "_continuations", lambda m, members, *a: calls.append(
        [len(c) for _, c, _ in members]) or run(m, members, *a))  # fmt: skip
    ctx = [TOK.bos_id] + TOK.encode("a shared context")
    conts = [_seq(10 + n, n) for n in (1, 3, 4, 40, 60, 2, 58)]
    other = [TOK.bos_id] + TOK.encode("other")
    pairs = [(ctx, c) for c in conts] + [(other, _seq(5, 30)), (other, _seq(6, 2))]
    got = Engine(model, TOK).score(pairs)
    for (c, k), s in zip(pairs, got):
        assert np.allclose(s.token_logprobs, _reference_score(model, c, k), atol=1e-4)
    assert sorted(n for bucket in calls for n in bucket) == sorted(len(k) for _, k in pairs)
    assert len(calls) >= 3 and max(max(b) - min(b) for b in calls) < 30  # no bucket pads 2 to 60
