"""Shard result files and the merge that turns them into the dataset.

A finished shard folder holds ``records_rRR.jsonl`` (its records for repeat RR, documents in
order), ``index.json`` (per document: the source file index; per repeat: the byte offsets of
the records) and a ``COMPLETE`` marker written last. The merge reads only the indexes, then
copies record bytes in the final order, so memory stays small whatever the dataset size.
Both the shard writer and the merge write to temp files and rename, so a kill never leaves a
half-written file under a final name.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

from apps.bolt.teachers.dataset import merge_order
from lingua.io import atomic_open, atomic_write_json


def write_shard_records(folder: Path, records: Iterable[tuple[int, int, dict]], num_repeats: int) -> dict:
    """Write ``(file_idx, repeat, record)`` items (repeats of one document adjacent, documents
    in order) and the index; returns simple statistics of the records."""
    paths = [folder / f"records_r{r:02d}.jsonl" for r in range(num_repeats)]
    offsets: list[list[int]] = [[0] for _ in paths]
    files: list[int] = []
    stats = {"latents": 0, "latent_chars": 0, "truncated": 0}
    with ExitStack() as stack:  # every file renamed into place only when all were written
        handles = [stack.enter_context(atomic_open(p, "wb")) for p in paths]
        for file_idx, repeat, record in records:
            if repeat == 0:
                files.append(file_idx)
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            handles[repeat].write(line)
            offsets[repeat].append(offsets[repeat][-1] + len(line))
            units = record["chunks"] if "chunks" in record else [record]
            stats["latents"] += len(units)
            stats["latent_chars"] += sum(len(u["latent"]) for u in units)
            stats["truncated"] += sum(u.get("finish_reason") == "length" for u in units)
    atomic_write_json(folder / "index.json", {"files": files, "offsets": offsets}, indent=None)
    return stats


def merge_shards(shard_dirs: list[Path], source_names: list[str], out: Path, num_repeats: int, seed: int) -> dict[str, int]:
    """Write one output file per source file (same name) from complete shards; returns the
    record count per output file. Order: see :func:`apps.bolt.teachers.dataset.merge_order`."""
    # (shard, start byte, stop byte) of every record, per source file and repeat, in document order.
    pointers = {f: {r: [] for r in range(num_repeats)} for f in range(len(source_names))}
    for s, folder in enumerate(shard_dirs):
        index = json.loads((folder / "index.json").read_text())
        for r in range(num_repeats):
            offsets = index["offsets"][r]
            for k, file_idx in enumerate(index["files"]):
                pointers[file_idx][r].append((s, offsets[k], offsets[k + 1]))
    written = {}
    for file_idx, name in enumerate(source_names):
        per_repeat = pointers[file_idx]
        order = merge_order({r: len(p) for r, p in per_repeat.items()}, seed, file_idx)
        written[name] = _copy_records(shard_dirs, out / name, per_repeat, order)
    return written


def _copy_records(shard_dirs: list[Path], target: Path, pointers: dict, order: list[tuple[int, int]]) -> int:
    readers: dict[tuple[int, int], object] = {}
    try:
        with atomic_open(target, "wb") as out:
            for repeat, pos in order:
                shard, start, stop = pointers[repeat][pos]
                if (shard, repeat) not in readers:
                    readers[(shard, repeat)] = open(shard_dirs[shard] / f"records_r{repeat:02d}.jsonl", "rb")
                f = readers[(shard, repeat)]
                f.seek(start)
                out.write(f.read(stop - start))
    finally:
        for f in readers.values():
            f.close()
    return len(order)
