"""Scoring: log p(continuation | context) for batches of pairs, sharing work between equal contexts.

Tokenization: a pair of strings is tokenized jointly (the model saw joint text in training) and
split after ``len(encode(context))`` tokens, as lm-eval does; a context string gets BOS when
``add_bos``; a continuation string is encoded without BOS. Token-id inputs are used as given.

Context window rule (``max_len``): when ``len(context) + len(continuation) > max_len``, context
tokens are dropped from the left (a leading BOS is kept when two or more context tokens fit) and
the count is reported as ``tokens_dropped``. Each pair is truncated on its own, so a pair's score
never depends on the other pairs of the call. A continuation that does not fit together with at
least one context token raises ``ValueError`` naming the pair: silently cutting the text being
scored would change the quantity asked for. Callers that want the reference E-step rule (cut the
suffix end) truncate token ids themselves before calling.

Two paths: pairs whose (truncated) context is unique run as right-padded causal forwards over
length buckets (little padding); pairs that share a context prefill it once (left-padded with
other contexts), fan the KV cache out to every continuation, and run the continuations together
on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from lingua.batching import (
    EngineStats,
    left_padded_prefill,
    length_buckets,
    pack,
    token_logprobs,
    truncate_left,
)
from lingua.transformer import Transformer

Text = Union[str, Sequence[int]]


@dataclass
class ScoreResult:
    """Log-probability of one continuation given its (possibly truncated) context."""

    sum_logprob: float
    token_logprobs: list[float]
    num_tokens: int
    is_greedy: bool  # every continuation token was the argmax
    tokens_dropped: int = 0  # context tokens dropped from the left to fit the window


def encode_pair(tokenizer: Any, context: Text, continuation: Text, add_bos: bool) -> tuple[list[int], list[int]]:
    if isinstance(context, str) and isinstance(continuation, str):
        n_ctx = len(tokenizer.encode(context, add_bos=add_bos))
        whole = tokenizer.encode(context + continuation, add_bos=add_bos)
        return whole[:n_ctx], whole[n_ctx:]
    ctx = tokenizer.encode(context, add_bos=add_bos) if isinstance(context, str) else [int(t) for t in context]
    cont = tokenizer.encode(continuation) if isinstance(continuation, str) else [int(t) for t in continuation]
    return ctx, cont


def fit_pair(ctx: list[int], cont: list[int], max_len: int, bos_id: int | None, index: int) -> tuple[list[int], int]:
    """Apply the context window rule (module docstring) to one pair: (context, tokens dropped)."""
    if not ctx:
        raise ValueError(f"pair {index}: empty context; the first continuation token needs one (e.g. BOS)")
    if len(cont) + 1 > max_len:
        raise ValueError(
            f"pair {index}: continuation has {len(cont)} tokens; with one context token it exceeds "
            f"max_len={max_len}. Truncate the continuation or raise max_len."
        )
    return truncate_left(ctx, max_len - len(cont), bos_id)


def score_pairs(
    model: Transformer,
    tokenizer: Any,
    pairs: Sequence[tuple[Text, Text]],
    *,
    max_len: int,
    max_batch_tokens: int,
    add_bos: bool = True,
    stats: EngineStats | None = None,
) -> list[ScoreResult]:
    """Score every pair (see the module docstring for tokenization and truncation rules)."""
    stats = stats if stats is not None else EngineStats()
    vocab = model.args.vocab_size
    results: list[ScoreResult | None] = [None] * len(pairs)
    groups: dict[tuple[int, ...], list[tuple[int, list[int], int]]] = {}
    for i, (context, continuation) in enumerate(pairs):
        ctx, cont = encode_pair(tokenizer, context, continuation, add_bos)
        if any(t < 0 or t >= vocab for t in ctx + cont):
            raise ValueError(f"pair {i}: token ids outside [0, {vocab})")
        ctx, dropped = fit_pair(ctx, cont, max_len, getattr(tokenizer, "bos_id", None), i)
        if not cont:
            results[i] = ScoreResult(0.0, [], 0, True, dropped)
        else:
            groups.setdefault(tuple(ctx), []).append((i, cont, dropped))
    single = [(list(c), m[0]) for c, m in groups.items() if len(m) == 1]
    shared = [(list(c), m) for c, m in groups.items() if len(m) > 1]
    device = next(model.parameters()).device
    for bucket in length_buckets([len(c) + len(m[1]) for c, m in single]):  # padding costs compute
        items = [single[i] for i in bucket]
        for batch in pack(items, lambda s: 1, lambda s: (len(s[0]) + len(s[1][1]), 0), max_batch_tokens):
            _score_flat(model, batch, results, device, stats)
    for batch in pack(_split_groups(shared, max_batch_tokens), lambda g: len(g[1]),
                      lambda g: (len(g[0]), max(len(m[1]) for m in g[1])), max_batch_tokens):
        _score_shared(model, batch, results, device, stats)
    return results  # type: ignore[return-value]


def _split_groups(groups: list, budget: int) -> list:
    """Split groups too wide for the budget, then sort by cache width (widest first)."""
    out = []
    for ctx, members in groups:
        width = len(ctx) + max(len(m[1]) for m in members)
        cap = max(1, budget // width)
        out.extend((ctx, members[s : s + cap]) for s in range(0, len(members), cap))
    return sorted(out, key=lambda g: -(len(g[0]) + max(len(m[1]) for m in g[1])))


def _result(lp: torch.Tensor, greedy: torch.Tensor, dropped: int) -> ScoreResult:
    values = lp.tolist()
    return ScoreResult(float(sum(values)), values, len(values), bool(greedy.all()), dropped)


def _logits_at(model: Transformer, where: torch.Tensor, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Logits [N, V] of the flattened (row * seq_len + position) states ``where`` of a forward.

    A plain model projects only those states (``Transformer.hidden`` + ``logits``). A sharded
    (FSDP) model, e.g. the live model of an in-training evaluation, must run its full
    ``forward``: only that runs the hooks that gather its weights.
    """
    if all(type(p) is torch.nn.Parameter for p in model.parameters()):
        return model.logits(model.hidden(tokens, **kwargs).flatten(0, 1)[where])
    return model(tokens, **kwargs).flatten(0, 1)[where]


def _score_flat(model: Transformer, batch: list, results: list, device: torch.device, stats: EngineStats) -> None:
    """One causal forward over right-padded context+continuation rows (padding sits after the text).

    Logits are computed only where a continuation token is predicted (context and padding
    positions need none): the output projection and log-softmax shrink accordingly.
    """
    seqs = [ctx + cont for ctx, (_, cont, _) in batch]
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, : len(s)] = torch.tensor(s)
    # flat index (row * width + position) of the state predicting each continuation token
    where = torch.tensor([r * width + p for r, (ctx, (_, cont, _)) in enumerate(batch)
                          for p in range(len(ctx) - 1, len(ctx) + len(cont) - 1)], dtype=torch.long)  # fmt: skip
    targets = torch.tensor([t for _, (_, cont, _) in batch for t in cont], dtype=torch.long)
    logits = _logits_at(model, where.to(device), tokens.to(device))
    stats.prefill_tokens += sum(len(s) for s in seqs)
    stats.batches += 1
    lp, greedy = token_logprobs(logits, targets.to(device))
    lp, greedy = lp.cpu(), greedy.cpu()
    at = 0
    for _, (i, cont, dropped) in batch:
        results[i] = _result(lp[at : at + len(cont)], greedy[at : at + len(cont)], dropped)
        at += len(cont)


def _score_shared(model: Transformer, batch: list, results: list, device: torch.device, stats: EngineStats) -> None:
    """Prefill each context once, copy its cache rows to its continuations, run them on top.

    Contexts are prefilled longest first (the order :func:`left_padded_prefill` fills in place).
    Continuations (E-step joint texts: a latent of 10 to 96 tokens plus its chunk) differ a lot
    in length, so they are ordered longest first and run in length buckets
    (:func:`lingua.batching.length_buckets`), each a contiguous block of cache rows: one forward
    over all of them padded to the longest spent half its compute on padding in an E-step.
    """
    batch = sorted(batch, key=lambda g: -len(g[0]))
    contexts = [ctx for ctx, _ in batch]
    order = sorted(((g, m) for g, (_, ms) in enumerate(batch) for m in ms), key=lambda gm: -len(gm[1][1]))
    members = [m for _, m in order]
    width = max(len(c) for c in contexts)
    cache, last, pad = left_padded_prefill(model, contexts, width + len(members[0][1]), device)
    ctx_rows = torch.tensor([g for g, _ in order], device=device)
    for layer in cache:
        layer.select(ctx_rows)
    last, pad = last[ctx_rows], pad[ctx_rows]
    stats.prefill_tokens += sum(len(c) for c in contexts) + sum(len(m[1]) for m in members)
    stats.batches += 1
    first = torch.tensor([cont[0] for _, cont, _ in members], device=device)
    first_lp, first_greedy = (t.cpu() for t in token_logprobs(last, first))
    for rows in length_buckets([len(m[1]) for m in members]):  # ascending, contiguous: members are sorted
        a, b = rows[0], rows[-1] + 1
        rest_lp, rest_greedy = _continuations(model, members[a:b], [layer.window(slice(a, b), 0) for layer in cache],
                                              pad[a:b], width, device)  # fmt: skip
        at = 0
        for r, (i, cont, dropped) in enumerate(members[a:b], start=a):
            n = len(cont) - 1
            lp = torch.cat([first_lp[r : r + 1], rest_lp[at : at + n]])
            greedy = torch.cat([first_greedy[r : r + 1], rest_greedy[at : at + n]])
            results[i] = _result(lp, greedy, dropped)
            at += n


def _continuations(model: Transformer, members: list, cache: list, pad: torch.Tensor, width: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Log-probs and greedy flags of tokens 1.. of each continuation (flattened, in order), run
    on top of ``cache`` (its contexts right-aligned at slot ``width``, left pads ``pad``)."""
    span = max(len(cont) for _, cont, _ in members)
    tokens = torch.zeros(len(members), span, dtype=torch.long)
    for r, (_, cont, _) in enumerate(members):
        tokens[r, : len(cont)] = torch.tensor(cont)
    tokens = tokens.to(device)
    ar = torch.arange(span, device=device)
    mask = None
    if bool((pad > 0).any()):
        ctx_ok = (torch.arange(width, device=device)[None] >= pad[:, None])[:, None, :].expand(-1, span, -1)
        causal = (ar[:, None] >= ar[None, :])[None].expand(len(members), -1, -1)
        mask = torch.cat([ctx_ok, causal], dim=-1)[:, None]
    # token 0 of each continuation is predicted by the prefill's last logits, token j > 0 by the
    # continuation state j - 1: only those states get logits
    where = torch.tensor([r * span + p for r, (_, cont, _) in enumerate(members) for p in range(len(cont) - 1)],
                         dtype=torch.long)  # fmt: skip
    rest = torch.tensor([t for _, cont, _ in members for t in cont[1:]], dtype=torch.long, device=device)
    if len(rest) == 0:  # every continuation is one token long
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    logits = _logits_at(model, where.to(device), tokens, positions=(width - pad)[:, None] + ar[None],
                        attn_mask=mask, cache=cache, cache_pos=width)  # fmt: skip
    return tuple(t.cpu() for t in token_logprobs(logits, rest))  # type: ignore[return-value]
