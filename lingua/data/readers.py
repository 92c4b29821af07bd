"""Reading one source: its ``*.jsonl`` shards, this rank's share of their lines, epoch after epoch.

Which lines a rank reads
    The shards of a source are taken in sorted file-name order and their physical lines are
    numbered globally (line 0 is the first line of the first shard; numbering continues across
    shards). Rank ``r`` of ``world_size`` owns the lines whose global number ``i`` satisfies
    ``i % world_size == r``. The shares of the ranks are therefore disjoint and together cover
    every line, and they are the same in every epoch. Blank lines are not documents and are
    skipped silently (they still take a line number).

Order within a share
    Epoch 0 reads the share in file order, streaming, and its position is an exact byte offset
    (the reference behaviour; prepared datasets are globally shuffled already). With
    ``reshuffle`` on, every later epoch ``e`` reads the same share in a permutation drawn from
    ``(seed, crc32(source), e, rank, world_size)``; the byte offsets of the share are indexed
    once, on entering the first reshuffled epoch, and the position is the index into that
    permutation. With ``reshuffle`` off every epoch repeats the file order.

Bad input
    A line that is not UTF-8, not a JSON object, lacks the text key, or has empty text is a
    *problem*. Problems are counted per reason in the reader state and logged with ``file:line``
    (the first few in full, then only running totals at 10, 100, 1000, ...); a bad line is
    counted again in every epoch that reads it. With ``strict`` the first one raises
    :class:`DataError` naming ``file:line``. An epoch that yields no valid document is an error,
    because looping over it would never end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lingua.data.rng import make_rng, name_seed

logger = logging.getLogger(__name__)

LOG_IN_FULL = 5
"""Problems logged with their full message per source; later ones only update the totals."""


class DataError(ValueError):
    """Unusable training data: a missing or empty source, or bad input under ``strict``."""


def list_shards(root_dir: str | Path, source: str) -> list[Path]:
    """The sorted ``*.jsonl`` files of ``root_dir/source``; a clear error if there are none."""
    if not str(root_dir):
        raise DataError("data.root_dir is not set")
    root = Path(root_dir)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    folder = root / source
    if not folder.is_dir():
        raise DataError(f"source '{source}': folder not found: {folder}")
    shards = sorted(p for p in folder.glob("*.jsonl") if p.is_file())
    if not shards:
        raise DataError(f"source '{source}': no *.jsonl files in {folder}")
    if all(p.stat().st_size == 0 for p in shards):
        raise DataError(f"source '{source}': all *.jsonl files in {folder} are empty")
    return shards


class ShardReader:
    """Yields ``(record, "file:line")`` for one source and one rank, forever.

    ``state()`` is a small JSON-able dict; a reader built with it continues exactly where the
    one that produced it stood.
    """

    def __init__(
        self,
        source: str,
        files: list[Path],
        *,
        rank: int,
        world_size: int,
        seed: int,
        text_key: str = "text",
        reshuffle: bool = True,
        strict: bool = False,
        state: dict | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.source = source
        self.files = list(files)
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.text_key = text_key
        self.reshuffle = reshuffle
        self.strict = strict
        state = state or {}
        self._epoch = int(state.get("epoch", 0))
        # file-order cursor: shard index, byte offset in it, lines read in it, global line number
        self._file = int(state.get("file", 0))
        self._offset = int(state.get("offset", 0))
        self._file_line = int(state.get("file_line", 0))
        self._line = int(state.get("line", 0))
        # permuted cursor: index into this epoch's permutation of the share
        self._pos = int(state.get("pos", 0))
        self._good = int(state.get("good", 0))
        self.counts: dict[str, int] = dict(state.get("counts", {}))
        self._handles: dict[int, BinaryIO] = {}
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._order: np.ndarray | None = None

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {
            "epoch": self._epoch,
            "file": self._file,
            "offset": self._offset,
            "file_line": self._file_line,
            "line": self._line,
            "pos": self._pos,
            "good": self._good,
            "counts": dict(self.counts),
        }

    @property
    def epoch(self) -> int:
        return self._epoch

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    # ------------------------------------------------------------------ reading

    def next_record(self) -> tuple[dict, str]:
        """The next valid record of this rank's share and where it came from."""
        while True:
            raw, where = self._next_line()
            record = self._parse(raw, where)
            if record is not None:
                self._good += 1
                self.counts["records"] = self.counts.get("records", 0) + 1
                return record, where

    def _permuted_epoch(self) -> bool:
        return self.reshuffle and self._epoch > 0

    def _next_line(self) -> tuple[bytes, str]:
        while True:
            if self._permuted_epoch():
                got = self._next_permuted()
            else:
                got = self._next_in_file_order()
            if got is not None:
                return got

    def _next_in_file_order(self) -> tuple[bytes, str] | None:
        if self._file >= len(self.files):
            self._end_epoch()
            return None
        fh = self._handles.get(self._file)
        if fh is None:  # (re)opened: position at the saved byte offset, then read on
            fh = self._handle(self._file)
            fh.seek(self._offset)
        raw = fh.readline()
        if not raw:
            self._close_handle(self._file)
            self._file, self._offset, self._file_line = self._file + 1, 0, 0
            return None
        self._offset += len(raw)
        self._file_line += 1
        line, self._line = self._line, self._line + 1
        if line % self.world_size != self.rank or not raw.strip():
            return None
        return raw, f"{self.files[self._file]}:{self._file_line}"

    def _next_permuted(self) -> tuple[bytes, str] | None:
        files, offsets, linenos = self._share_index()
        order = self._epoch_order()
        if self._pos >= len(order):
            self._end_epoch()
            return None
        i = int(order[self._pos])
        self._pos += 1
        fh = self._handle(int(files[i]))
        fh.seek(int(offsets[i]))
        return fh.readline(), f"{self.files[int(files[i])]}:{int(linenos[i])}"

    def _end_epoch(self) -> None:
        if self._good == 0:
            raise DataError(
                f"source '{self.source}': no valid document for rank {self.rank} of {self.world_size} "
                f"in {len(self.files)} file(s) under {self.files[0].parent} (problems so far: {self._problem_summary()})"
            )
        self._epoch += 1
        self._good = 0
        self._file = self._offset = self._file_line = self._line = self._pos = 0
        self._order = None

    def _handle(self, file_idx: int) -> BinaryIO:
        fh = self._handles.get(file_idx)
        if fh is None:
            fh = self._handles[file_idx] = open(self.files[file_idx], "rb")
        return fh

    def _close_handle(self, file_idx: int) -> None:
        fh = self._handles.pop(file_idx, None)
        if fh is not None:
            fh.close()

    def _share_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard index, byte offset, 1-based line) of every non-blank line this rank owns."""
        if self._index is None:
            files: list[int] = []
            offsets: list[int] = []
            linenos: list[int] = []
            line = 0
            for f_idx, path in enumerate(self.files):
                offset = 0
                with open(path, "rb") as fh:
                    for lineno, raw in enumerate(fh, 1):
                        if line % self.world_size == self.rank and raw.strip():
                            files.append(f_idx)
                            offsets.append(offset)
                            linenos.append(lineno)
                        offset += len(raw)
                        line += 1
            self._index = (np.asarray(files, np.int32), np.asarray(offsets, np.int64), np.asarray(linenos, np.int64))
        return self._index

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            n = len(self._share_index()[0])
            rng = make_rng(self.seed, name_seed(self.source), self._epoch, self.rank, self.world_size)
            self._order = rng.permutation(n)
        return self._order

    # ------------------------------------------------------------------ validation

    def _parse(self, raw: bytes, where: str) -> dict | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self.problem("invalid_utf8", where, f"invalid UTF-8 ({e.reason} at byte {e.start})")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            return self.problem("malformed_json", where, f"malformed JSON ({e.msg}, column {e.colno})")
        if not isinstance(record, dict):
            return self.problem("not_object", where, f"expected a JSON object, got {type(record).__name__}")
        value = record.get(self.text_key)
        if value is None:
            return self.problem("missing_key", where, f"missing key '{self.text_key}'")
        if not isinstance(value, str):
            return self.problem("missing_key", where, f"key '{self.text_key}' is {type(value).__name__}, not a string")
        if not value.strip():
            return self.problem("empty_text", where, f"empty text in key '{self.text_key}'")
        return record

    def problem(self, reason: str, where: str, detail: str, *, fatal_in_strict: bool = True) -> None:
        """Count (and log, or under ``strict`` raise) a problem with the record at ``where``.

        ``fatal_in_strict=False`` is for policy outcomes such as truncating a long document,
        which are counted but are not bad input.
        """
        if self.strict and fatal_in_strict:
            raise DataError(f"{where}: {detail} (source '{self.source}', data.strict=true)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        total = sum(n for k, n in self.counts.items() if k != "records")
        if total <= LOG_IN_FULL:
            action = "; record skipped" if fatal_in_strict else ""
            suffix = "; later problems are only counted" if total == LOG_IN_FULL else ""
            logger.warning("%s: %s%s (source '%s')%s", where, detail, action, self.source, suffix)
        elif _is_power_of_ten(total):
            logger.warning("source '%s': %d problem records so far (%s)", self.source, total, self._problem_summary())
        return None

    def _problem_summary(self) -> str:
        items = [f"{k}={n}" for k, n in sorted(self.counts.items()) if k != "records"]
        return ", ".join(items) or "none"


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
