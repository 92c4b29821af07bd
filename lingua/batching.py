"""Shared mechanics of generation and scoring batches: truncation, packing, left-padded prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from lingua.transformer import KVCache, Transformer

T = TypeVar("T")


@dataclass
class EngineStats:
    """Cumulative work counters (what was computed, not what was returned)."""

    prefill_tokens: int = 0  # tokens run through full-sequence forwards (padding excluded)
    decode_rows: int = 0  # sum over one-token decoding forwards of the rows in the batch
    decode_steps: int = 0  # one-token decoding forwards (decode_rows / decode_steps: mean batch width)
    generated_tokens: int = 0
    batches: int = 0  # generation / scoring batches run (after splitting by the token budget)


def truncate_left(ids: list[int], limit: int, bos_id: int | None) -> tuple[list[int], int]:
    """Keep the last ``limit`` tokens, and a leading BOS if there was one. Returns (ids, dropped).

    The reference let vLLM cut the BOS off long prompts; models always saw BOS first in
    training, so we keep it (when ``limit >= 2``) and drop the oldest tokens after it.
    """
    if len(ids) <= limit:
        return ids, 0
    if bos_id is not None and ids and ids[0] == bos_id and limit >= 2:
        kept = [ids[0]] + ids[len(ids) - (limit - 1) :]
    else:
        kept = ids[len(ids) - limit :]
    return kept, len(ids) - len(kept)


def pack(
    items: Sequence[T], rows: Callable[[T], int], dims: Callable[[T], tuple[int, int]], budget: int
) -> list[list[T]]:
    """Greedy, order-preserving packing: a batch's total rows x (max a + max b) stays <= budget.

    ``dims(item) = (a, b)``, e.g. (prompt length, new tokens) for a KV cache of width a + b.
    An item over budget on its own forms a batch alone. Callers sort items by size first so
    batches hold similar lengths.
    """
    batches: list[list[T]] = []
    n = a_max = b_max = 0
    for item in items:
        a, b = dims(item)
        r, am, bm = n + rows(item), max(a_max, a), max(b_max, b)
        if batches and r * (am + bm) <= budget:
            batches[-1].append(item)
            n, a_max, b_max = r, am, bm
        else:
            batches.append([item])
            n, a_max, b_max = rows(item), a, b
    return batches


def length_buckets(lengths: Sequence[int], max_waste: float = 0.25, min_gap: int = 16) -> list[list[int]]:
    """Group row indices (longest first) so padding inside a group stays small.

    A new group starts when a row is shorter than the group's longest by more than ``max_waste``
    of it and by at least ``min_gap`` tokens (tiny savings are not worth an extra forward).
    """
    groups: list[list[int]] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if groups and not (n < (1 - max_waste) * longest and longest - n >= min_gap):
            groups[-1].append(i)
        else:
            groups.append([i])
            longest = n
    return groups


def left_padded_prefill(
    model: Transformer, prompts: Sequence[Sequence[int]], cache_len: int, device: torch.device
) -> tuple[list[KVCache], torch.Tensor, torch.Tensor]:
    """Fill a fresh KV cache with prompts right-aligned at slot ``max(len)`` (left padding).

    Returns (cache, last-token logits [P, V], pad lengths [P]). Prompts of very different
    lengths are prefilled in length buckets (:func:`length_buckets`), so the padding of the
    decoding layout costs no prefill compute. A bucket of consecutive rows (prompts sorted
    longest first) is prefilled in place, through a window of the cache; other buckets are
    prefilled apart and copied in. Slots left of a bucket's window are zeroed (they are read,
    masked); the cache beyond ``max(len)`` is left for decoding to write.
    """
    lens = [len(p) for p in prompts]
    width = max(lens)
    pad = torch.tensor([width - n for n in lens], device=device)
    cache = model.new_cache(len(prompts), cache_len, zero=False)
    parts: list[tuple[list[int], torch.Tensor]] = []
    for rows in length_buckets(lens):
        start = width - lens[rows[0]]
        bucket = [prompts[i] for i in rows]
        if rows == list(range(rows[0], rows[-1] + 1)):
            span = slice(rows[0], rows[-1] + 1)
            parts.append((rows, _prefill(model, bucket, [layer.window(span, start) for layer in cache], device)))
            for layer in cache:
                layer.k[span, :, :start] = 0
                layer.v[span, :, :start] = 0
            continue
        sub_cache = model.new_cache(len(rows), width - start, zero=False)
        parts.append((rows, _prefill(model, bucket, sub_cache, device)))
        idx = torch.tensor(rows, device=device)
        for layer, sub in zip(cache, sub_cache):
            layer.k[idx, :, :start] = 0
            layer.v[idx, :, :start] = 0
            layer.k[idx, :, start:width] = sub.k
            layer.v[idx, :, start:width] = sub.v
    if len(parts) == 1:
        return cache, parts[0][1], pad
    logits = parts[0][1].new_empty(len(prompts), parts[0][1].shape[-1])
    for rows, part in parts:
        logits[torch.tensor(rows, device=device)] = part
    return cache, logits, pad


def _prefill(
    model: Transformer, prompts: Sequence[Sequence[int]], cache: list[KVCache], device: torch.device
) -> torch.Tensor:
    """One left-padded forward into ``cache`` from slot 0; returns last-token logits [P, V].

    Rows see only their own tokens. A pad query attends to itself alone: some SDPA kernels
    return NaN for a fully masked query row, and NaN keys/values in the cache would poison real
    rows through 0 * NaN.
    """
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    tokens, pad = tokens.to(device), (width - lens).to(device)
    if bool((pad == 0).all()):
        logits = model(tokens, cache=cache, cache_pos=0, last_only=True)
    else:
        ar = torch.arange(width, device=device)
        positions = (ar[None] - pad[:, None]).clamp(min=0)
        key_ok = ar[None, None, :] >= pad[:, None, None]  # [P, 1, T]
        causal = ar[:, None] >= ar[None, :]  # [S, T]
        mask = (causal[None] & key_ok) | torch.eye(width, dtype=torch.bool, device=device)[None]
        logits = model(tokens, positions=positions, attn_mask=mask[:, None], cache=cache, cache_pos=0, last_only=True)
    return logits[:, -1]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and target == argmax, for logits [..., V] and targets [...].

    Gathers before normalising, so no second [..., V] tensor is allocated.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1), logits.argmax(dim=-1) == targets
