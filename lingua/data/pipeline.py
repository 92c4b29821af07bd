"""The assembled pipeline: sources -> mixing -> formatting -> tokenize -> pack -> shuffle -> batch.

Randomness (every stream seeded from integers only):
* source choice per document: ``(seed, rank, world_size)``, as in the reference;
* window shuffle: ``(seed + 1, rank, world_size)``;
* formatter: ``(seed + 2, rank, world_size)``;
* document order of a source in a reshuffled epoch ``e``: ``(seed, crc32(source), e, rank, world_size)``.

State (JSON-able, travels with every batch; treat it as read-only)::

    {"version": 1,
     "fingerprint": {...},         # what must not change for an exact resume (checked on rebuild)
     "batches": int,               # batches produced on this rank
     "tokens_by_source": {...},    # cumulative input tokens per source on this rank
     "stats": {source: {"epoch": int, "counts": {...}}},   # read-ahead position, informational
     "position": {"packer": {"docs": {"sources": {name: reader state},
                                      "mix_rng": ..., "format_rng": ...},
                             "skip": int},
                  "rng": ..., "pos": int}}

``position`` is the exact restart point; ``stats`` reflects how far the pipeline has read
(which can be up to a shuffle block ahead of the batches produced).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lingua.data.args import DataArgs
from lingua.data.formatting import BadRecord, Formatter, factory_accepts, get_format, to_spans, truncate_spans
from lingua.data.mixing import SourceMixer
from lingua.data.packing import Doc, Packer, TokenizerLike, tokenize_spans
from lingua.data.prefetch import Prefetcher, WindowShuffler
from lingua.data.readers import DataError, ShardReader, list_shards
from lingua.data.rng import make_rng, rng_from_state, rng_state

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_TOKENIZER_PROBE = "Packing probe: The quick brown fox, 0123456789 (\u00e9\u00e8 \u4e2d\u6587)."

Batch = dict[str, Any]


class DataStateMismatch(DataError):
    """A saved data state does not fit the current data, config or rank layout, so the stream
    cannot continue exactly. Callers that accept a different stream may catch it and start fresh."""


class DocumentStream:
    """Mixed, formatted, tokenized documents of one rank; see :class:`lingua.data.packing.DocStream`."""

    def __init__(
        self,
        args: DataArgs,
        tokenizer: TokenizerLike,
        shards: dict[str, list[Path]],
        format_fn: Formatter,
        *,
        rank: int,
        world_size: int,
        state: dict | None,
    ) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.format_fn = format_fn
        self.mixer = SourceMixer(
            args.sources, seed=args.seed, rank=rank, world_size=world_size, state=state["mix_rng"] if state else None
        )
        self.source_index = {name: i for i, name in enumerate(self.mixer.names)}
        self.readers = {
            name: ShardReader(
                name,
                shards[name],
                rank=rank,
                world_size=world_size,
                seed=args.seed,
                text_key=args.text_key,
                reshuffle=args.reshuffle_each_epoch,
                strict=args.strict,
                state=state["sources"][name] if state else None,
            )
            for name in self.mixer.names
        }
        self.format_rng = rng_from_state(state["format_rng"]) if state else make_rng(args.seed + 2, rank, world_size)

    def state(self) -> dict:
        return {
            "sources": {name: r.state() for name, r in self.readers.items()},
            "mix_rng": self.mixer.state(),
            "format_rng": rng_state(self.format_rng),
        }

    def next_doc(self) -> Doc:
        while True:
            name = self.mixer.choose()
            doc = self._make_doc(self.readers[name], self.source_index[name])
            if doc is not None:
                return doc

    def _make_doc(self, reader: ShardReader, source: int) -> Doc | None:
        record, where = reader.next_record()
        try:
            spans = to_spans(self.format_fn(record, self.format_rng))
        except BadRecord as e:
            return reader.problem("format_error", where, f"formatter rejected the record: {e}")
        except Exception as e:  # a bug, not bad data: fail, but say which record triggered it
            e.add_note(f"while formatting {where} (source '{reader.source}')")
            raise
        n_chars = sum(len(text) for text, _ in spans)
        if not any(text.strip() for text, _ in spans):
            return reader.problem("empty_text", where, "formatter returned empty text")
        limit = self.args.max_doc_chars
        if limit and n_chars > limit:
            if self.args.long_doc_policy == "skip":
                return reader.problem(
                    "long_skipped", where, f"{n_chars} characters > data.max_doc_chars={limit}; skipped",
                    fatal_in_strict=False,
                )
            reader.problem(
                "long_truncated", where, f"{n_chars} characters > data.max_doc_chars={limit}; truncated",
                fatal_in_strict=False,
            )
            spans = truncate_spans(spans, limit)
        tokens, loss = tokenize_spans(spans, self.tokenizer, add_bos=self.args.add_bos, add_eos=self.args.add_eos)
        if len(tokens) == 0:
            return reader.problem("empty_text", where, "document has no tokens")
        return Doc(tokens, loss, source)

    def stats(self) -> dict:
        return {name: {"epoch": r.epoch, "counts": dict(r.counts)} for name, r in self.readers.items()}

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


class BatchMaker:
    """The synchronous pipeline of one rank: windows from the shuffler, stacked into batches."""

    def __init__(
        self,
        args: DataArgs,
        tokenizer: TokenizerLike,
        shards: dict[str, list[Path]],
        format_fn: Formatter,
        fingerprint: dict,
        *,
        rank: int,
        world_size: int,
        state: dict | None,
    ) -> None:
        self.args = args
        self.fingerprint = fingerprint
        self.names = sorted(shards)  # = the mixer's source order, which ``Window.src`` indexes
        self._batches = int(state["batches"]) if state else 0
        saved_tokens = state["tokens_by_source"] if state else {}
        self._tokens = {name: int(saved_tokens.get(name, 0)) for name in self.names}

        def make_packer(packer_state: dict | None) -> Packer:
            self.docs = DocumentStream(
                args, tokenizer, shards, format_fn,
                rank=rank, world_size=world_size, state=packer_state["docs"] if packer_state else None,
            )  # fmt: skip
            return Packer(self.docs, args.seq_len, skip=packer_state["skip"] if packer_state else 0)

        self.docs: DocumentStream
        self._shuffler = WindowShuffler(
            make_packer,
            block=max(1, args.shuffle_buffer) * args.batch_size,
            shuffle=args.shuffle_buffer > 0,
            seed_parts=(args.seed + 1, rank, world_size),
            state=state["position"] if state else None,
        )

    def __call__(self) -> tuple[Batch, dict]:
        windows = [self._shuffler.next_window() for _ in range(self.args.batch_size)]
        tok = np.stack([w.tokens for w in windows])
        src = np.stack([w.src[:-1] for w in windows])
        counts = np.bincount(src.ravel(), minlength=len(self.names))
        by_source = {name: int(counts[i]) for i, name in enumerate(self.names)}
        batch: Batch = {
            "input": torch.from_numpy(np.ascontiguousarray(tok[:, :-1])),
            "target": torch.from_numpy(np.ascontiguousarray(tok[:, 1:])),
            "loss_mask": torch.from_numpy(np.stack([w.loss[1:] for w in windows])),
        }
        if self.args.doc_mask:
            batch["doc_ids"] = torch.from_numpy(np.stack([w.doc[:-1] for w in windows]))
        batch["tokens_by_source"] = by_source
        self._batches += 1
        for name, n in by_source.items():
            self._tokens[name] += n
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "batches": self._batches,
            "tokens_by_source": dict(self._tokens),
            "stats": self.docs.stats(),
            "position": self._shuffler.state(),
        }
        return batch, json.loads(json.dumps(state))  # a private, provably JSON-able copy

    def close(self) -> None:
        self.docs.close()


class DataIterator(Iterator[tuple[Batch, dict]]):
    """Yields ``(batch, state)`` forever; see :func:`build_data_iterator`.

    Close it (or use it as a context manager) to stop the prefetch thread and close files; an
    iterator that is simply dropped is closed when garbage-collected (the thread holds only
    the inner :class:`BatchMaker`, never this object).
    """

    def __init__(
        self,
        args: DataArgs,
        tokenizer: TokenizerLike,
        *,
        rank: int,
        world_size: int,
        state: dict | None = None,
        format_fn: Formatter | None = None,
    ) -> None:
        self._prefetcher: Prefetcher | None = None
        self._maker: BatchMaker | None = None
        args.validate()
        if not args.sources:
            raise DataError("data.sources is empty: name at least one source folder under data.root_dir")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        for flag, attr in (("add_bos", "bos_id"), ("add_eos", "eos_id")):
            if getattr(args, flag) and getattr(tokenizer, attr, None) is None:
                raise DataError(f"data.{flag}=true but the tokenizer has no {attr}")
        shards = {name: list_shards(args.root_dir, name) for name, w in sorted(args.sources.items()) if w > 0}
        format_fn = format_fn if format_fn is not None else _lookup_format(args)
        self.fingerprint = _fingerprint(args, tokenizer, shards, rank, world_size)
        if state is not None:
            _check_state(state, self.fingerprint)
        self._maker = BatchMaker(
            args, tokenizer, shards, format_fn, self.fingerprint, rank=rank, world_size=world_size, state=state
        )
        if args.prefetch:
            self._prefetcher = Prefetcher(self._maker, args.prefetch_depth)
        logger.info(
            "data rank %d/%d: %s; %s",
            rank, world_size,
            ", ".join(f"{name} ({len(files)} shard(s), weight {args.sources[name]:g})" for name, files in shards.items()),
            f"resuming after batch {state['batches']}" if state else "starting fresh",
        )  # fmt: skip

    def __next__(self) -> tuple[Batch, dict]:
        if self._prefetcher is not None:
            return self._prefetcher.get()
        if self._maker is None:
            raise RuntimeError("the data iterator is closed")
        return self._maker()

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        if self._maker is not None:
            self._maker.close()
            self._maker = None

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def build_data_iterator(
    args: DataArgs,
    tokenizer: TokenizerLike,
    *,
    rank: int,
    world_size: int,
    state: dict | None = None,
    format_fn: Formatter | None = None,
) -> DataIterator:
    """An endless iterator of ``(batch, state)`` for this rank.

    ``batch`` holds ``input`` and ``target`` (int64 ``[batch_size, seq_len]``), ``loss_mask``
    (bool, False where the target token lies in a span the formatter excluded from the loss),
    ``doc_ids`` (int64, only when ``args.doc_mask``: index of each input token's document
    within its row) and ``tokens_by_source`` (input tokens of this batch per source).
    ``state`` is the position after this batch; passing it back continues with exactly the
    batches that would have followed. ``format_fn`` overrides the ``args.format`` lookup
    (applications pass a configured formatter).
    """
    return DataIterator(args, tokenizer, rank=rank, world_size=world_size, state=state, format_fn=format_fn)


def data_metrics(state: dict) -> dict[str, float]:
    """Flat metrics of a data state for logging: tokens, epoch and problem counts per source."""
    out: dict[str, float] = {}
    for name, n in state["tokens_by_source"].items():
        out[f"data/tokens/{name}"] = n
    for name, st in state["stats"].items():
        out[f"data/epoch/{name}"] = st["epoch"]
        for key, n in st["counts"].items():
            out[f"data/{key}/{name}"] = n
    return out


def _lookup_format(args: DataArgs) -> Formatter:
    kwargs = {"text_key": args.text_key} if _accepts_text_key(args.format) else {}
    return get_format(args.format, **kwargs)


def _accepts_text_key(name: str) -> bool:
    try:
        return factory_accepts(name, "text_key")
    except KeyError:
        return False  # unknown name: get_format raises the helpful error


def _fingerprint(
    args: DataArgs, tokenizer: TokenizerLike, shards: dict[str, list[Path]], rank: int, world_size: int
) -> dict:
    """Everything an exact resume depends on, in a form whose differences are readable."""
    probe = tokenizer.encode(_TOKENIZER_PROBE, add_bos=False, add_eos=False)
    files = {
        name: hashlib.sha1(json.dumps([[p.name, p.stat().st_size] for p in paths]).encode()).hexdigest()[:16]
        for name, paths in shards.items()
    }
    return {
        "rank": rank,
        "world_size": world_size,
        "files": files,
        "tokenizer": hashlib.sha1(json.dumps([probe, tokenizer.bos_id, tokenizer.eos_id]).encode()).hexdigest()[:16],
        "config": {
            "sources": {k: float(v) for k, v in sorted(args.sources.items())},
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "seed": args.seed,
            "add_bos": args.add_bos,
            "add_eos": args.add_eos,
            "format": args.format,
            "text_key": args.text_key,
            "shuffle_buffer": args.shuffle_buffer,
            "reshuffle_each_epoch": args.reshuffle_each_epoch,
            "max_doc_chars": args.max_doc_chars,
            "long_doc_policy": args.long_doc_policy,
        },
    }


def _check_state(state: dict, expected: dict) -> None:
    if state.get("version") != STATE_VERSION:
        raise DataStateMismatch(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
    found = state.get("fingerprint", {})
    diffs = [f"{k}: saved {found.get(k)!r}, now {v!r}" for k, v in expected.items() if found.get(k) != v and k != "config"]
    saved_cfg = found.get("config", {})
    diffs += [
        f"data.{k}: saved {saved_cfg.get(k)!r}, now {v!r}" for k, v in expected["config"].items() if saved_cfg.get(k) != v
    ]
    if diffs:
        raise DataStateMismatch("cannot resume the data stream exactly; it changed since the state was saved: " + "; ".join(diffs))
