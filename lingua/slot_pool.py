"""Continuous batching for decoding: KV-cache rows that sequences join and leave between steps.

A static batch decodes until its longest sequence ends; sampled sequences end at very different
lengths (latent thoughts stop at ``<|END_OF_LATENT|>`` after 10 to 96 tokens), so most of a static
batch's row-steps are spent on rows that already finished, or, with finished rows dropped, on
ever narrower forwards whose fixed cost is the same. A :class:`SlotPool` keeps the batch full:
finished rows leave (:meth:`drop`) and queued prompts join (:meth:`admit`) between decode steps.

Layout. All live rows decode in lockstep: one forward (:meth:`step`) writes every row's next key
and value at the same cache slot ``pos`` (as in a left-padded batch), and row ``r`` attends over
slots ``[pad[r], pos]`` through an additive key mask; its token positions are ``slot - pad[r]``.
A joining prompt of ``L`` tokens is prefilled apart (:func:`lingua.batching.left_padded_prefill`,
in length buckets, with one prefill per prompt shared by all its samples) and copied into slots
``[pos - L, pos)`` of its rows, so its first generated token lands at ``pos`` like everyone
else's. That needs ``pos >= L`` (callers queue prompts longest first, and a shift never moves
``pos`` below a joining prompt's length) and ``pos + max_new <= cache_len``. When the slots after ``pos`` run short, every row is
shifted left by as much as the rows' pads allow (:meth:`_shift`: one copy of the used slots); if
that is not enough the prompt waits until old rows finish, and an empty pool takes any prompt
that fits the cache at all.

Slots outside a row's span hold stale but finite values from earlier rows (the cache starts
zeroed), which the mask hides: finite matters, as 0 * NaN would poison the row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lingua.batching import left_padded_prefill
from lingua.transformer import Transformer, additive_mask


class SlotPool:
    """``capacity`` rows of ``cache_len`` KV slots each; live rows are ``[0, n)``."""

    def __init__(self, model: Transformer, capacity: int, cache_len: int, device: torch.device):
        if capacity < 1 or cache_len < 2:
            raise ValueError(f"a slot pool needs capacity >= 1 and cache_len >= 2, got {capacity}, {cache_len}")
        self.model, self.capacity, self.cache_len, self.device = model, capacity, cache_len, device
        self.cache = model.new_cache(capacity, cache_len, device=device)
        self._k = [layer.k for layer in self.cache]  # whole buffers; the layers see views [:n]
        self._v = [layer.v for layer in self.cache]
        self.n = 0
        self.pos = 0  # the slot the next step writes
        self.pad = torch.zeros(0, dtype=torch.long, device=device)
        self.shifts = 0  # how often the rows were moved left (a measure of cache pressure)
        self._views()

    @property
    def free(self) -> int:
        return self.capacity - self.n

    def can_admit(self, width: int, max_new: int) -> bool:
        """Whether prompts of at most ``width`` tokens that generate at most ``max_new`` fit now."""
        return self._shift_for(width, max_new) is not None

    def _shift_for(self, width: int, max_new: int) -> int | None:
        """Slots to shift every row left by before such prompts join (0 for an empty pool, whose
        prompts start at slot 0), or None if they cannot join now."""
        if self.n == 0:
            return 0 if width + max_new <= self.cache_len else None
        most = min(int(self.pad.min()), self.pos - width)  # keep every row's tokens; room for the prompt
        need = max(0, self.pos + max_new - self.cache_len)
        if most < need:
            return None
        # shifting as far as allowed makes room for longer, so shifts stay rare
        return most if need > 0 else 0

    def admit(self, prompts: Sequence[Sequence[int]], counts: Sequence[int], max_new: int) -> torch.Tensor:
        """Prompt ``i`` joins as ``counts[i]`` rows (samples sharing one prefill), after the live
        rows and in order. Returns their next-token logits ``[sum(counts), V]``."""
        width = max(len(p) for p in prompts)
        rows = sum(counts)
        if rows > self.free:
            raise ValueError(f"{rows} rows do not fit the {self.free} free rows of the pool")
        shift = self._shift_for(width, max_new)
        if shift is None:
            raise ValueError(f"prompts of {width} tokens with {max_new} new tokens do not fit the cache now")
        if self.n == 0:
            self.pos = width
        elif shift:
            self._shift(shift)
        sub, logits, sub_pad = left_padded_prefill(self.model, prompts, width, self.device)
        index = torch.repeat_interleave(torch.arange(len(prompts), device=self.device),
                                        torch.tensor(list(counts), device=self.device))  # fmt: skip
        a, b, start = self.n, self.n + rows, self.pos - width
        for k, v, layer in zip(self._k, self._v, sub):
            k[a:b, :, start : self.pos] = layer.k[index]
            v[a:b, :, start : self.pos] = layer.v[index]
        self.pad = torch.cat([self.pad, start + sub_pad[index]])
        self.n = b
        self._views()
        return logits[index]

    def drop(self, keep: Sequence[int]) -> None:
        """Keep only live rows ``keep`` (ascending), which move down to ``[0, len(keep))``."""
        for layer in self.cache:
            layer.keep(keep, self.pos)  # moves rows within the whole buffers, leaves views [:len(keep)]
        index = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        self.pad, self._bias = self.pad[index], self._bias[index]
        self.n = len(keep)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode forward of token ``tokens[r]`` for every live row at slot ``pos``; returns
        next-token logits ``[n, V]``."""
        pos = self.pos
        logits = self.model(
            tokens[:, None],
            positions=(pos - self.pad)[:, None],
            attn_mask=self._bias[..., : pos + 1],
            cache=self.cache,
            cache_pos=pos,
        )[:, -1]
        self.pos += 1
        return logits

    def _shift(self, s: int) -> None:
        """Move every live row's slots ``[s, pos)`` to ``[0, pos - s)``."""
        n, pos = self.n, self.pos
        for buf in (*self._k, *self._v):
            buf[:n, :, : pos - s] = buf[:n, :, s:pos].clone()  # source and target overlap
        self.pad -= s
        self.pos -= s
        self.shifts += 1
        self._views()

    def _views(self) -> None:
        for layer, k, v in zip(self.cache, self._k, self._v):
            layer.k, layer.v = k[: self.n], v[: self.n]
        slots = torch.arange(self.cache_len, device=self.device)
        self._bias = additive_mask(slots[None] >= self.pad[:, None])[:, None, None]  # [n, 1, 1, cache_len]
