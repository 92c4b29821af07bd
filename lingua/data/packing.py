"""Tokenize formatted documents and pack them into fixed windows of ``seq_len + 1`` tokens.

Packing follows the reference: documents (each ``[BOS] + tokens + [EOS]`` when enabled) are
concatenated into one stream that is cut into windows of ``seq_len + 1`` tokens; window ``k``
holds stream tokens ``[k*seq_len, (k+1)*seq_len]``, so the last token of a window is the first
of the next and every stream token is a target exactly once. Inputs are ``window[:-1]`` and
targets ``window[1:]``.

Alongside the tokens every window carries, per position:
* ``loss``: whether the token counts in the loss (False inside spans a formatter marked so;
  BOS and EOS always count);
* ``doc``: the document index within the window (0 for the document the window starts in,
  then 1, 2, ...), from which a block-diagonal attention mask can be built;
* ``src``: the index of the source the token came from (for token accounting).

Exact resume without storing tokens: after a window is cut, the unconsumed rest of the stream
always lies inside the *last* document pulled (a new document is only pulled while fewer than
``seq_len + 1`` tokens are buffered). So the packer's position is the document stream's state
just before that document plus how many of its tokens were already consumed; restoring pulls
that document again, deterministically, and drops those tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...


@dataclass
class Doc:
    """One tokenized document: ids, per-token loss flags, and the index of its source."""

    tokens: np.ndarray
    loss: np.ndarray
    source: int


@dataclass
class Window:
    """``seq_len + 1`` consecutive stream positions (see the module docstring)."""

    tokens: np.ndarray
    loss: np.ndarray
    doc: np.ndarray
    src: np.ndarray


class DocStream(Protocol):
    def next_doc(self) -> Doc: ...

    def state(self) -> dict: ...


def tokenize_spans(
    spans: Sequence[tuple[str, bool]], tokenizer: TokenizerLike, *, add_bos: bool, add_eos: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss flags of a document given as ``(text, counts_in_loss)`` spans.

    Spans are encoded separately, so a subword merge never crosses a span boundary; layouts put
    special tokens at their boundaries, where tokenizers split anyway.
    """
    pieces = [tokenizer.encode(text, add_bos=False, add_eos=False) for text, _ in spans]
    head = [tokenizer.bos_id] if add_bos else []
    tail = [tokenizer.eos_id] if add_eos else []
    lengths = [len(head), *map(len, pieces), len(tail)]
    tokens = np.fromiter(itertools.chain(head, *pieces, tail), dtype=np.int64, count=sum(lengths))
    if all(in_loss for _, in_loss in spans):
        return tokens, np.ones(len(tokens), dtype=np.bool_)
    flags = np.array([True, *(in_loss for _, in_loss in spans), True], dtype=np.bool_)
    return tokens, np.repeat(flags, lengths)


class Packer:
    """Cuts the document stream into overlapping windows; see the module docstring.

    ``docs`` is positioned at the saved ``state["docs"]`` by the caller, and ``skip`` (the
    saved ``state["skip"]``) tokens of the first document pulled are dropped.
    """

    def __init__(self, docs: DocStream, seq_len: int, *, skip: int = 0) -> None:
        self.docs = docs
        self.width = seq_len + 1
        self._skip = skip
        self._last_doc_state = docs.state()
        self._last_doc_len = 0
        self._doc_counter = 0
        self._tok = np.zeros(0, np.int64)
        self._loss = np.zeros(0, np.bool_)
        self._doc = np.zeros(0, np.int64)
        self._src = np.zeros(0, np.int16)

    def state(self) -> dict:
        """Position between windows: stream state before the last document, tokens of it used."""
        if self._last_doc_len == 0:  # nothing pulled since construction
            return {"docs": self._last_doc_state, "skip": self._skip}
        return {"docs": self._last_doc_state, "skip": self._last_doc_len - len(self._tok)}

    def next_window(self) -> Window:
        while len(self._tok) < self.width:
            self._pull()
        w = self.width
        window = Window(self._tok[:w], self._loss[:w], self._doc[:w] - self._doc[0], self._src[:w])
        rest = slice(w - 1, None)  # the last token of this window starts the next one
        self._tok, self._loss, self._doc, self._src = self._tok[rest], self._loss[rest], self._doc[rest], self._src[rest]
        return window

    def _pull(self) -> None:
        self._last_doc_state = self.docs.state()
        doc = self.docs.next_doc()
        tokens, loss = doc.tokens, doc.loss
        if self._skip:
            if self._skip >= len(tokens):
                raise RuntimeError(
                    f"cannot resume packing: the saved position skips {self._skip} tokens of a "
                    f"{len(tokens)}-token document (data or tokenizer changed since the state was saved?)"
                )
            tokens, loss = tokens[self._skip :], loss[self._skip :]
            self._last_doc_len = len(doc.tokens)
            self._skip = 0
        else:
            self._last_doc_len = len(tokens)
        n = len(tokens)
        self._tok = np.concatenate([self._tok, tokens])
        self._loss = np.concatenate([self._loss, loss])
        self._doc = np.concatenate([self._doc, np.full(n, self._doc_counter, np.int64)])
        self._src = np.concatenate([self._src, np.full(n, doc.source, np.int16)])
        self._doc_counter += 1


def steps_for_token_budget(num_tokens: int, global_batch: int, seq_len: int) -> int:
    """Optimizer steps that consume ``num_tokens`` packed tokens (raw text, latents, special
    tokens, BOS/EOS all count): ``num_tokens // (global_batch * seq_len)``, as in the reference.
    ``global_batch`` is in sequences (all ranks and accumulation steps)."""
    if num_tokens < 0 or global_batch < 1 or seq_len < 1:
        raise ValueError(f"bad token budget arguments: {num_tokens=}, {global_batch=}, {seq_len=}")
    return num_tokens // (global_batch * seq_len)
