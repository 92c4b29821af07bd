"""From raw documents to teacher requests, and from responses back to latent dataset records.

Documents
    A source folder holds ``*.jsonl`` files, read in sorted name order. Non-blank lines are
    documents, numbered globally across files. Shard ``i`` of ``N`` owns the contiguous range
    ``[i*n//N, (i+1)*n//N)`` of that numbering, so shards are balanced, disjoint, cover every
    document, and keep file order (which makes the merge a concatenation).

Records (the latent dataset schema of ``apps/bolt/formats.py``)
    Chunked methods: every source field is kept, plus ``chunks`` (``suffix``, ``latent``,
    ``finish_reason``, ``output_tokens``, optionally ``prefix``; ``error`` when a request failed
    within the tolerated share), ``num_chunks`` and ``latent_source`` (method, backend, model,
    prompt id, repeat). Whole-document methods (WRAP) put ``latent``, ``finish_reason``,
    ``input_tokens`` and ``output_tokens`` at top level instead of ``chunks``. With R repeats a
    document yields R records, one per repeat.

Merge order
    Each source file becomes an output file of the same name holding R passes: pass 0 in source
    order, passes r >= 1 in a permutation drawn from ``(seed, r, file index)``, so repeated
    passes do not come in lockstep (the reference shuffles whole slices with ``rng(42)``; a
    document-level permutation is finer and independent of the shard count).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from apps.bolt.chunking import ChunkArgs, chunk_text
from apps.bolt.teachers.base import WHOLE_DOC, LatentRequest, LatentResponse
from lingua.io import Doc, jsonl_files, jsonl_lines, read_docs

logger = logging.getLogger(__name__)

Document = Doc
"""A source document: file index, file, 1-based line (for error messages and ordering), record."""


def list_source_files(src: str | Path) -> list[Path]:
    folder = Path(src)
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder not found: {folder}")
    return jsonl_files(folder)


def count_documents(files: Sequence[Path]) -> list[int]:
    """Non-blank lines per file."""
    counts = [0] * len(files)
    for file_idx, *_ in jsonl_lines(files):
        counts[file_idx] += 1
    return counts


def shard_range(total: int, shard: int, num_shards: int) -> tuple[int, int]:
    return total * shard // num_shards, total * (shard + 1) // num_shards


def read_documents(files: Sequence[Path], start: int, stop: int, text_key: str) -> Iterator[Document]:
    """Documents with global index in ``[start, stop)``; bad lines raise naming ``file:line``
    (:func:`lingua.io.read_docs` under ``strict``; blank text is a document, WRAP keeps it)."""
    return read_docs(files, text_key, start=start, stop=stop, strict=True, nonblank=False)


def doc_id(doc: Document, files: Sequence[Path]) -> str:
    """The record's ``id`` when it has one, else ``<file stem>:<line>`` (stable for a source)."""
    rid = doc.record.get("id")
    return str(rid) if rid is not None else f"{files[doc.file_idx].stem}:{doc.line}"


@dataclass
class Plan:
    """The requests of one shard and, per document, where its requests sit in the list."""

    requests: list[LatentRequest]
    spans: list[list[tuple[int, int]]]
    """``spans[d][r]``: (start, stop) into ``requests`` for document ``d``, repeat ``r``."""
    chunks: list[list[tuple[str, str]]]
    """``chunks[d]``: (prefix, suffix) per chunk (one whole-document pair for WRAP)."""


def plan_requests(
    docs: Sequence[Document], ids: Sequence[str], *, chunked: bool, chunk_args: ChunkArgs, num_repeats: int, text_key: str
) -> Plan:
    requests: list[LatentRequest] = []
    spans: list[list[tuple[int, int]]] = []
    all_chunks: list[list[tuple[str, str]]] = []
    for doc, did in zip(docs, ids):
        text = doc.record[text_key]
        if chunked:
            pairs = [(c.prefix, c.suffix) for c in chunk_text(text, chunk_args)]
            indexed = list(enumerate(pairs))
        else:
            pairs = [("", text)] if text else []
            indexed = [(WHOLE_DOC, p) for p in pairs]
        doc_spans = []
        for repeat in range(num_repeats):
            start = len(requests)
            requests.extend(LatentRequest(did, idx, prefix, suffix, repeat) for idx, (prefix, suffix) in indexed)
            doc_spans.append((start, len(requests)))
        spans.append(doc_spans)
        all_chunks.append(pairs)
    return Plan(requests, spans, all_chunks)


def build_records(
    docs: Sequence[Document],
    plan: Plan,
    responses: Sequence[LatentResponse],
    *,
    chunked: bool,
    provenance: dict,
    store_prefix: bool,
) -> Iterator[tuple[int, int, dict]]:
    """Yield ``(file index, repeat, record)`` per document and repeat, documents in order."""
    for d, doc in enumerate(docs):
        for repeat, (start, stop) in enumerate(plan.spans[d]):
            answers = responses[start:stop]
            record = dict(doc.record)
            record["latent_source"] = {**provenance, "repeat": repeat}
            if chunked:
                chunks = []
                for (prefix, suffix), response in zip(plan.chunks[d], answers):
                    chunk = {"prefix": prefix} if store_prefix else {}
                    chunk.update(suffix=suffix, latent=response.latent, finish_reason=response.finish_reason,
                                 output_tokens=int(response.usage.get("output_tokens", 0)))
                    if response.error is not None:
                        chunk["error"] = response.error
                    chunks.append(chunk)
                record["chunks"] = chunks
                record["num_chunks"] = len(chunks)
            else:
                response = answers[0] if answers else LatentResponse("", "empty_document", {})
                record.update(latent=response.latent, finish_reason=response.finish_reason,
                              input_tokens=int(response.usage.get("input_tokens", 0)),
                              output_tokens=int(response.usage.get("output_tokens", 0)))
                if response.error is not None:
                    record["error"] = response.error
            yield doc.file_idx, repeat, record


def merge_order(counts: dict[int, int], seed: int, file_idx: int) -> list[tuple[int, int]]:
    """Output order of one file's records as (repeat, position among that repeat's records, in
    document order), given the record count per repeat: pass 0 as is, later passes permuted by
    an RNG from (seed, repeat, file index)."""
    order = []
    for repeat in sorted(counts):
        n = counts[repeat]
        positions = range(n) if repeat == 0 else np.random.default_rng([seed, repeat, file_idx]).permutation(n)
        order.extend((repeat, int(p)) for p in positions)
    return order
