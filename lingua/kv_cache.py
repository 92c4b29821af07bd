"""Per-layer key/value cache for incremental decoding (used by :mod:`lingua.transformer`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: [B, n_kv_heads, max_len, head_dim].

    A slot that attention reads must hold finite values even where the mask hides it: its
    weight is exactly 0, but 0 * NaN would still poison the output. Hence zeros by default;
    ``zero=False`` leaves the memory uninitialised for callers that write (or zero) every slot
    before it is read.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device, *, zero: bool = True):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        alloc = torch.zeros if zero else torch.empty
        self.register_buffer("k", alloc(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", alloc(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = k.shape[2]
        self.k[:, :, pos : pos + s] = k
        self.v[:, :, pos : pos + s] = v
        return self.k[:, :, : pos + s], self.v[:, :, : pos + s]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows, e.g. to fan a shared prompt out to n samples."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)

    def keep(self, rows: Sequence[int], used: int) -> None:
        """Drop batch rows in place, keeping ``rows`` (ascending indices) in order.

        Each kept row moves down to its new index in the same buffers, and only its ``used``
        slots written so far move: no allocation, rows before the first dropped one stay put,
        and the unwritten tail is not copied (as :meth:`select` would). Slots from ``used`` on
        hold stale values and must be written before they are read, as decoding does. Ascending
        order makes the moves safe: a row's destination never holds a row still to be moved.
        """
        for new, old in enumerate(rows):
            if new != old:
                self.k[new, :, :used] = self.k[old, :, :used]
                self.v[new, :, :used] = self.v[old, :, :used]
        self.k, self.v = self.k[: len(rows)], self.v[: len(rows)]

    def window(self, rows: slice, start: int) -> KVCache:
        """A cache sharing this one's memory over batch ``rows`` and slots ``start:``: a forward
        writing the window at slot p writes this cache at slot ``start + p`` (in-place prefill)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[rows, :, start:], persistent=False)
        view.register_buffer("v", self.v[rows, :, start:], persistent=False)
        return view
