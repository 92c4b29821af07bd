"""Corpus sources for dataset preparation: a registry of readers by ``kind``.

A reader turns a :class:`SourceArgs` into a stream of ``(record, where, reason)`` items: good
records come with ``reason == ""``; bad input comes as ``(None, where, reason)`` so the caller
can count it and name it (``where`` is ``file:line``, ``file:row N`` or ``generator:index``).
Kinds: ``jsonl`` and ``parquet`` (local files), ``hf`` (a Hugging Face dataset by name, needs the
network), ``synthetic`` (any generator function, by default the embedded synthetic world).
Add a kind with :func:`register_source`.
"""

from __future__ import annotations

import glob
import importlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from lingua.io import file_listing, jsonl_lines, parse_doc, text_problem


class SourceError(RuntimeError):
    """A source the user must fix (missing files, offline hub, bad generator path)."""


@dataclass
class SourceArgs:
    """Where documents come from; ``kind`` selects a reader from :data:`SOURCE_KINDS`."""

    kind: str = "jsonl"
    """``jsonl`` | ``parquet`` (local ``path``) | ``hf`` (hub ``name``) | ``synthetic`` (``generator``)."""
    path: str = ""
    """jsonl/parquet: a file, a folder (its matching files, sorted) or a glob."""
    name: str = ""
    """hf: dataset name, e.g. ``HuggingFaceTB/finemath``."""
    config: str = ""
    """hf: configuration, e.g. ``finemath-4plus``."""
    split: str = "train"
    """hf: split."""
    text_key: str = "text"
    """Field that must hold the document text (a non-blank string)."""
    generator: str = "apps.bolt.synthetic.corpus:generate_corpus"
    """synthetic: ``module:function`` called as ``fn(num_docs=, seed=, **options)`` -> records."""
    num_docs: int = 0
    """synthetic: number of documents to generate."""
    seed: int = 0
    """synthetic: generator seed."""
    options: dict[str, Any] = field(default_factory=dict)
    """synthetic: extra keyword arguments, checked by the generator itself."""


# A reader yields (record, where, "") for good input and (None, where, reason) for bad input,
# where = "file:line" (or a row/index for non-line sources).
Item = tuple[dict | None, str, str]
SourceReader = Callable[[SourceArgs], Iterator[Item]]
SOURCE_KINDS: dict[str, SourceReader] = {}


def register_source(kind: str, reader: SourceReader) -> None:
    SOURCE_KINDS[kind] = reader


def source_files(path: str, suffix: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    found = p.rglob(f"*{suffix}") if p.is_dir() else map(Path, glob.glob(path, recursive=True))
    files = sorted(f for f in found if f.is_file())
    if not files:
        raise SourceError(f"no {suffix} files found at {path!r}")
    return files


def _check_text(record: Any, key: str, where: str) -> Item:
    reason = text_problem(record, key)
    return (None if reason else record), where, reason


def read_jsonl_source(src: SourceArgs) -> Iterator[Item]:
    for _, f, lineno, raw in jsonl_lines(source_files(src.path, ".jsonl")):
        record, reason = parse_doc(raw, src.text_key)
        yield (None if reason else record), f"{f}:{lineno}", reason


def read_parquet_source(src: SourceArgs) -> Iterator[Item]:
    import pyarrow.parquet as pq

    for f in source_files(src.path, ".parquet"):
        pf = pq.ParquetFile(f)
        if src.text_key not in pf.schema_arrow.names:
            raise SourceError(f"{f}: no column {src.text_key!r} (columns: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield _check_text(record, src.text_key, f"{f}:row {row}")
                row += 1


def read_hf_source(src: SourceArgs) -> Iterator[Item]:
    what = f"{src.name}" + (f" ({src.config})" if src.config else "")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise SourceError(
            f"source kind 'hf' needs the Hugging Face Hub to read {what}, but this machine is offline "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1); download the parquet files elsewhere and use "
            "source.kind=parquet source.path=<folder>"
        )
    try:
        import datasets

        ds = datasets.load_dataset(src.name, src.config or None, split=src.split, streaming=True)
        for row, record in enumerate(ds):
            yield _check_text(record, src.text_key, f"{what}/{src.split}:row {row}")
    except (OSError, ValueError) as e:  # network errors are OSErrors; unknown configs ValueErrors
        raise SourceError(f"cannot read {what} from the Hugging Face Hub: {str(e).splitlines()[0][:200]}") from e


def import_callable(spec: str, what: str) -> Callable:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SourceError(f"{what} {spec!r} is not importable (expected 'module:function'): {e}") from e


def read_generator_source(src: SourceArgs) -> Iterator[Item]:
    fn = import_callable(src.generator, "source.generator")
    for i, record in enumerate(fn(num_docs=src.num_docs, seed=src.seed, **src.options)):
        yield _check_text(record, src.text_key, f"{src.generator}:{i}")


register_source("jsonl", read_jsonl_source)
register_source("parquet", read_parquet_source)
register_source("hf", read_hf_source)
register_source("synthetic", read_generator_source)


def source_fingerprint(src: SourceArgs) -> dict:
    """The source config plus (for local files) each input file's size and mtime: editing the
    inputs invalidates the staged copy."""
    fp: dict = {"source": asdict(src)}
    if src.kind in ("jsonl", "parquet"):
        suffix = "." + src.kind
        fp["files"] = file_listing(source_files(src.path, suffix))
    return fp


__all__ = [
    "SOURCE_KINDS",
    "SourceArgs",
    "SourceError",
    "import_callable",
    "register_source",
    "source_files",
    "source_fingerprint",
]
