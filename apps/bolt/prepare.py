"""Dataset preparation: ``python -m apps.bolt.prepare config=FILE.yaml key=value ...``.

From one corpus source (local jsonl or parquet files, a Hugging Face dataset by name, or a
generator such as the embedded synthetic world) this builds, under ``out_dir``:

* ``<val.name>/``: the validation split (``ceil(val.fraction * N)`` docs, at least
  ``val.min_docs``; the reference holds out 1/1000);
* one folder per entry of ``subsets``, e.g. ``warmstart`` and ``bootstrap``: disjoint sets
  selected by raw-token (or document) budget;
* one folder per entry of ``extra``: a whole second source (e.g. the synthetic eval tasks).

Selection is a seeded permutation of the N usable source documents. The validation split takes
the first positions, then every subset takes the following positions in config order until its
budget is met, so the sets are disjoint and each is a uniform sample. Raw tokens are counted with
``tokenizer`` (no BOS/EOS). Each folder holds ``<name>.chunk.<i>.jsonl`` shards
(``docs_per_shard`` documents each), ``lineage.json`` (source, selection rule, seed, counts,
tokenizer) and, written last, the ``COMPLETE`` marker with the folder's recipe hash.

Stages and restarts: the source is first *staged*, i.e. streamed once into
``out_dir/.staging/<key>/docs.jsonl`` (valid records only, an ``id`` added where missing) with a
byte-offset index; bad input (malformed JSON, non-object lines, missing or blank text) is
counted per reason and reported with ``file:line``. Every file is written atomically and every
stage ends with its marker, so a killed run restarts cleanly: finished stages are skipped (their
recipe must match, else a clear error; ``overwrite=true`` rebuilds), unfinished ones are redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from apps.bolt.sources import SOURCE_KINDS, SourceArgs, SourceError, import_callable, source_fingerprint
from lingua.args import cli_config, dump_config
from lingua.errors import entry_point
from lingua.io import DONE_MARKER, atomic_dir, atomic_open, atomic_write_json, is_done, mark_done
from lingua.locks import RunLock
from lingua.logger import Every, format_count, format_duration
from lingua.tokenizer import TokenizerArgs, build_tokenizer

logger = logging.getLogger("apps.bolt.prepare")

MAX_REPORTED = 20
PROGRESS_SECONDS = 30.0
"""A progress line this often while staging a source or writing a set (large corpora take hours)."""
"""Bad inputs quoted by name (``file:line``) in the log and the lineage; all are counted."""


class PrepareError(SourceError):
    """A problem the user must fix (printed as one line by ``main``, like source errors)."""


@dataclass
class ValArgs:
    name: str = "validation"
    fraction: float = 0.001
    """Share of the documents held out (the reference: 1/1000)."""
    min_docs: int = 1


@dataclass
class SubsetArgs:
    """A named set taken from the shuffled pool after the validation split and earlier subsets."""

    name: str = ""
    tokens: int = 0
    """Raw-token budget: take documents until their tokens reach it (the last one may cross it)."""
    docs: int = 0
    """Document budget (instead of tokens). Both 0: every remaining document."""


@dataclass
class ExtraArgs:
    """A set outside the corpus split: a whole second ``source`` written as shards in source
    order, or a folder written by ``builder`` (e.g. the synthetic eval tasks in lm-eval form)."""

    name: str = ""
    source: SourceArgs = field(default_factory=SourceArgs)
    builder: str = ""
    """``module:function`` called as ``fn(out_dir, **options)``; it writes the folder's files.
    The folder is built aside and renamed into place, so it is either complete or absent."""
    options: dict[str, Any] = field(default_factory=dict)
    """builder: keyword arguments, checked by the builder itself."""


@dataclass
class PrepareArgs:
    out_dir: str = ""
    source: SourceArgs = field(default_factory=SourceArgs)
    seed: int = 42
    """Seed of the document permutation."""
    val: ValArgs = field(default_factory=ValArgs)
    subsets: list[SubsetArgs] = field(default_factory=list)
    extra: list[ExtraArgs] = field(default_factory=list)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    """Counts raw tokens for budgets and lineage (bytes by default)."""
    docs_per_shard: int = 50_000
    allow_short: bool = False
    """A subset whose budget the remaining documents cannot meet is written short (else an error)."""
    strict: bool = False
    """The first bad input line is an error instead of a counted skip."""
    overwrite: bool = False
    """Rebuild finished sets whose recipe differs from the config (else an error)."""
    keep_staging: bool = True
    """Keep the staged source after success (later runs with new subsets skip re-reading it)."""
    num_workers: int = 1
    """Processes counting tokens (worth it for real tokenizers on large corpora)."""

    def validate(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir is required")
        if not 0.0 <= self.val.fraction < 1.0 or self.val.min_docs < 0:
            raise ValueError(f"val.fraction must be in [0, 1) and val.min_docs >= 0, got {self.val}")
        names = [self.val.name] + [s.name for s in self.subsets] + [e.name for e in self.extra]
        for n in names:
            if not n or n.startswith(".") or "/" in n:
                raise ValueError(f"dataset names must be non-empty folder names, got {n!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be distinct, got {names}")
        for s in self.subsets:
            if s.tokens < 0 or s.docs < 0 or (s.tokens and s.docs):
                raise ValueError(f"subset {s.name!r}: set one of tokens/docs (>= 0), not both")
        if self.docs_per_shard < 1:
            raise ValueError("docs_per_shard must be >= 1")
        for src in [self.source] + [e.source for e in self.extra if not e.builder]:
            if src.kind not in SOURCE_KINDS:
                raise ValueError(f"source kind {src.kind!r} is unknown; known: {sorted(SOURCE_KINDS)}")


# ----------------------------------------------------------------------------------- helpers


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reset_folder(folder: Path) -> None:
    """Remove an unfinished (or outdated) set folder, refusing to touch foreign files."""
    if not folder.exists():
        return
    ours = {"lineage.json", "offsets.npy", DONE_MARKER}
    foreign = [p.name for p in folder.iterdir() if not (p.name in ours or p.name.endswith((".jsonl", ".tmp")))]
    if foreign:
        raise PrepareError(f"{folder} holds files prepare did not write ({foreign[:3]}); move them away first")
    shutil.rmtree(folder)


def _finished(folder: Path, recipe: str, overwrite: bool) -> dict | None:
    """The COMPLETE info of a finished folder with this recipe; None when it must be (re)built."""
    if not is_done(folder):
        return None
    info = json.loads((folder / DONE_MARKER).read_text())
    if info.get("recipe") == recipe:
        return info
    if not overwrite:
        raise PrepareError(
            f"{folder} was built from a different recipe ({info.get('recipe')} != {recipe}); "
            "delete it or pass overwrite=true"
        )
    return None


# ----------------------------------------------------------------------------------- staging


@dataclass
class Staged:
    """A source copied to one jsonl file with a byte-offset index for random access."""

    folder: Path
    offsets: np.ndarray
    info: dict

    def __len__(self) -> int:
        return len(self.offsets)

    def lines(self, indices: Sequence[int]) -> Iterator[str]:
        with open(self.folder / "docs.jsonl", "rb") as fh:
            for i in indices:
                fh.seek(int(self.offsets[i]))
                yield fh.readline().decode("utf-8").rstrip("\n")


def stage(src: SourceArgs, root: Path, strict: bool) -> Staged:
    fingerprint = source_fingerprint(src)
    key = _hash(fingerprint)
    folder = root / ".staging" / f"{src.kind}-{key}"
    if not is_done(folder):
        _reset_folder(folder)
        bad: dict[str, int] = {}
        reported: list[str] = []
        offsets = array("q")  # compact: one int64 per document
        pos = 0
        clock = Every(PROGRESS_SECONDS)
        with atomic_open(folder / "docs.jsonl", "w", encoding="utf-8") as out:
            for record, where, reason in SOURCE_KINDS[src.kind](src):
                if clock.due():
                    logger.info("staging %s source: %s documents (%s bytes) in %s, %d bad inputs so far", src.kind,
                                format_count(len(offsets)), format_count(pos), format_duration(clock.elapsed()), sum(bad.values()))
                if record is None:
                    if strict:
                        raise PrepareError(f"bad input at {where}: {reason} (strict=true)")
                    bad[reason] = bad.get(reason, 0) + 1
                    if len(reported) < MAX_REPORTED:
                        reported.append(f"{where}: {reason}")
                        logger.warning("skipping bad input at %s: %s", where, reason)
                    continue
                record.setdefault("id", where)
                line = json.dumps(record, ensure_ascii=False) + "\n"
                offsets.append(pos)
                pos += len(line.encode("utf-8"))
                out.write(line)
        np.save(folder / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
        info = {"fingerprint": fingerprint, "num_docs": len(offsets), "bad": bad, "bad_examples": reported}
        mark_done(folder, info)
        if bad:
            logger.warning("%s: %d bad inputs skipped %s (first: %s)", src.kind, sum(bad.values()), bad, reported[:3])
        logger.info("staged %d documents from %s source into %s", len(offsets), src.kind, folder)
    info = json.loads((folder / DONE_MARKER).read_text())
    return Staged(folder, np.load(folder / "offsets.npy"), info)


# ----------------------------------------------------------------------------------- writing


class SetWriter:
    """Writes one set: shards of ``docs_per_shard`` lines, then lineage, then COMPLETE."""

    def __init__(self, folder: Path, name: str, docs_per_shard: int, tokenizer):
        self.folder, self.name, self.per_shard, self.tok = folder, name, docs_per_shard, tokenizer
        self.shards: list[dict] = []
        self.num_docs = self.num_tokens = self.num_chars = 0
        self._buf: list[str] = []

    def add(self, line: str, text: str, tokens: int) -> None:
        self._buf.append(line)
        self.num_docs += 1
        self.num_tokens += tokens
        self.num_chars += len(text)
        if len(self._buf) == self.per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        name = f"{self.name}.chunk.{len(self.shards):02d}.jsonl"
        with atomic_open(self.folder / name, "w", encoding="utf-8") as fh:
            fh.writelines(line + "\n" for line in self._buf)
        self.shards.append({"file": name, "docs": len(self._buf)})
        self._buf = []

    def finish(self, lineage: dict, recipe: str, extra_done: dict | None = None) -> dict:
        self._flush()
        lineage = {
            "name": self.name,
            **lineage,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "num_chars": self.num_chars,
            "shards": self.shards,
            "recipe": recipe,
        }
        atomic_write_json(self.folder / "lineage.json", lineage)
        done = {"recipe": recipe, "num_docs": self.num_docs, "num_tokens": self.num_tokens, **(extra_done or {})}
        mark_done(self.folder, done)
        logger.info("wrote %s: %d docs, %d tokens, %d shards", self.folder, self.num_docs, self.num_tokens, len(self.shards))
        return done


def _tokenizer_info(args: TokenizerArgs, tok) -> dict:
    return {**asdict(args), "vocab_size": tok.vocab_size}


def _source_info(staged: Staged) -> dict:
    return {
        "config": staged.info["fingerprint"]["source"],
        "input_files": staged.info["fingerprint"].get("files"),
        "usable_docs": len(staged),
        "bad_inputs": staged.info["bad"],
        "bad_examples": staged.info["bad_examples"],
    }


_worker_tok = None


def _init_worker(args: dict) -> None:
    global _worker_tok
    _worker_tok = build_tokenizer(TokenizerArgs(**args))


def _count(text: str) -> int:
    return len(_worker_tok.encode(text))


def _write_docs(writer: SetWriter, staged: Staged, indices: np.ndarray, text_key: str, token_budget: int, pool) -> int:
    """Write the staged documents ``indices`` in order, stopping once ``token_budget`` (if > 0)
    is reached; returns how many were written. Tokens are counted in blocks, in ``pool`` if any."""
    written = 0
    lines = staged.lines(indices)
    clock = Every(PROGRESS_SECONDS)
    while True:
        block = [line for _, line in zip(range(1024), lines)]
        if not block:
            return written
        if clock.due():
            goal = f" of {format_count(token_budget)} ({100 * writer.num_tokens / token_budget:.0f}%)" if token_budget else ""
            logger.info("%s: %s documents, %s tokens%s in %s", writer.folder.name, format_count(written),
                        format_count(writer.num_tokens), goal, format_duration(clock.elapsed()))
        texts = [json.loads(line)[text_key] for line in block]
        counts = pool.map(_count, texts, chunksize=16) if pool else [len(writer.tok.encode(t)) for t in texts]
        for line, text, k in zip(block, texts, counts):
            writer.add(line, text, k)
            written += 1
            if token_budget and writer.num_tokens >= token_budget:
                return written


# ----------------------------------------------------------------------------------- run


def run(cfg: PrepareArgs) -> dict:
    """Build every set of ``cfg``; returns ``{set name: COMPLETE info}``. The whole build holds
    ``out_dir``'s lock (:class:`lingua.locks.RunLock`): a second ``prepare`` there fails at once."""
    root = Path(cfg.out_dir)
    with RunLock(root, "prepare"):
        return _build_all(cfg, root)


def _build_all(cfg: PrepareArgs, root: Path) -> dict:
    dump_config(cfg, root / "prepare_config.yaml")
    tok = build_tokenizer(cfg.tokenizer)
    tok_info = _tokenizer_info(cfg.tokenizer, tok)
    pool = None
    if cfg.num_workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(cfg.num_workers, _init_worker, (asdict(cfg.tokenizer),))
    try:
        results = _build_corpus_sets(cfg, root, tok, tok_info, pool)
        for ex in cfg.extra:
            results[ex.name] = _build_extra(cfg, ex, root, tok, tok_info, pool)
    finally:
        if pool is not None:
            pool.terminate()
    if not cfg.keep_staging:
        shutil.rmtree(root / ".staging", ignore_errors=True)
    return results


def _build_corpus_sets(cfg: PrepareArgs, root: Path, tok, tok_info: dict, pool) -> dict[str, dict]:
    staged = stage(cfg.source, root, cfg.strict)
    n = len(staged)
    if n == 0:
        raise PrepareError(f"the source has no usable documents (bad inputs: {staged.info['bad']})")
    n_val = min(n, max(cfg.val.min_docs, math.ceil(cfg.val.fraction * n)))
    perm = np.random.default_rng(cfg.seed).permutation(n)
    base = {"source": staged.info["fingerprint"], "seed": cfg.seed, "val": asdict(cfg.val),
            "tokenizer": tok_info, "docs_per_shard": cfg.docs_per_shard}
    common = {"source": _source_info(staged), "seed": cfg.seed, "tokenizer": tok_info}
    key = cfg.source.text_key
    results: dict[str, dict] = {}

    # The validation split: the first n_val positions of the permutation.
    folder, recipe = root / cfg.val.name, _hash(base)
    if (done := _finished(folder, recipe, cfg.overwrite)) is None:
        _reset_folder(folder)
        writer = SetWriter(folder, cfg.val.name, cfg.docs_per_shard, tok)
        _write_docs(writer, staged, perm[:n_val], key, 0, pool)
        rule = (f"validation: permutation positions [0, {n_val}) of N={n}, "
                f"n = max({cfg.val.min_docs}, ceil({cfg.val.fraction} * N))")
        selection = {"rule": rule, "positions": [0, n_val]}
        done = writer.finish({**common, "role": "validation", "selection": selection}, recipe, {"positions": [0, n_val]})
    results[cfg.val.name] = done

    # Subsets: consecutive permutation positions after the validation split, hence disjoint.
    cursor = n_val
    for i, sub in enumerate(cfg.subsets):
        folder = root / sub.name
        recipe = _hash({**base, "subsets": [asdict(s) for s in cfg.subsets[: i + 1]]})
        if (done := _finished(folder, recipe, cfg.overwrite)) is None:
            _reset_folder(folder)
            writer = SetWriter(folder, sub.name, cfg.docs_per_shard, tok)
            pool_left = perm[cursor : cursor + sub.docs] if sub.docs else perm[cursor:]
            end = cursor + _write_docs(writer, staged, pool_left, key, sub.tokens, pool)
            short = writer.num_tokens < sub.tokens or writer.num_docs < sub.docs
            budget: Any = {"tokens": sub.tokens} if sub.tokens else {"docs": sub.docs} if sub.docs else "all remaining"
            if short and not cfg.allow_short:
                _reset_folder(folder)
                raise PrepareError(
                    f"subset {sub.name!r} needs {budget} but only {writer.num_docs} docs with "
                    f"{writer.num_tokens} tokens remain after the earlier sets ({n} usable docs); "
                    "lower the budget, add data, or pass allow_short=true"
                )
            rule = (f"subset: permutation positions [{cursor}, {end}) of N={n}, after the validation split "
                    f"and the subsets {[s.name for s in cfg.subsets[:i]]}; budget {budget}")
            selection = {"rule": rule, "positions": [cursor, end], "budget": budget, "budget_met": not short}
            done = writer.finish({**common, "role": "subset", "selection": selection}, recipe, {"positions": [cursor, end]})
        cursor = done["positions"][1]
        results[sub.name] = done
    return results


def _build_extra(cfg: PrepareArgs, ex: ExtraArgs, root: Path, tok, tok_info: dict, pool) -> dict:
    if ex.builder:
        return _run_builder(cfg, ex, root)
    staged = stage(ex.source, root, cfg.strict)
    folder = root / ex.name
    recipe = _hash({"source": staged.info["fingerprint"], "tokenizer": tok_info, "docs_per_shard": cfg.docs_per_shard})
    if (done := _finished(folder, recipe, cfg.overwrite)) is None:
        _reset_folder(folder)
        writer = SetWriter(folder, ex.name, cfg.docs_per_shard, tok)
        _write_docs(writer, staged, np.arange(len(staged)), ex.source.text_key, 0, pool)
        selection = {"rule": f"extra: all {len(staged)} usable documents of the source, in source order"}
        lineage = {"source": _source_info(staged), "seed": None, "tokenizer": tok_info, "role": "extra", "selection": selection}
        done = writer.finish(lineage, recipe)
    return done


def _run_builder(cfg: PrepareArgs, ex: ExtraArgs, root: Path) -> dict:
    folder = root / ex.name
    recipe = _hash({"builder": ex.builder, "options": ex.options})
    if (done := _finished(folder, recipe, cfg.overwrite)) is not None:
        return done
    fn = import_callable(ex.builder, f"extra {ex.name!r} builder")
    # a fixed temp name: a killed build's leftovers are ours by construction and removed first
    with atomic_dir(folder, tmp=root / f".{ex.name}.building", clear=_clear_built) as tmp:
        fn(tmp, **ex.options)
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != DONE_MARKER)
        docs = sum(p.read_bytes().count(b"\n") for p in files if p.suffix == ".jsonl")
        listing = [{"file": str(p.relative_to(tmp)), "bytes": p.stat().st_size,
                    "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files]
        atomic_write_json(tmp / "lineage.json", {"name": ex.name, "role": "extra", "builder": ex.builder,
                                                 "options": ex.options, "files": listing, "recipe": recipe})
        done = {"recipe": recipe, "builder": ex.builder, "num_docs": docs, "num_tokens": None}
        mark_done(tmp, done)
    logger.info("built %s with %s: %d files", folder, ex.builder, len(files))
    return done


def _clear_built(folder: Path) -> bool:
    """Make way for a rebuilt extra folder: an outdated build (overwrite=true) or an unfinished one."""
    if is_done(folder) and "builder" in json.loads((folder / DONE_MARKER).read_text()):
        shutil.rmtree(folder)
    else:
        _reset_folder(folder)
    return True


@entry_point("prepare")
def main(argv: Sequence[str] | None = None) -> None:
    results = run(cli_config(PrepareArgs, argv, "prepare"))
    for name, info in results.items():
        tokens = "" if info["num_tokens"] is None else f", {info['num_tokens']} tokens"
        print(f"{name}: {info['num_docs']} docs{tokens}")


if __name__ == "__main__":
    main()
