"""E-step: the model writes its own latent thoughts for a raw corpus.

    python -m apps.bolt.estep config=FILE.yaml ckpt=MODEL_DIR src=RAW_DIR out=OUT_DIR [shard=i num_shards=N]
    python -m apps.bolt.estep config=FILE.yaml ... action=merge

Every document of ``src`` (``*.jsonl`` shards, sorted) is chunked (reference defaults: sentences,
8/1/20, seed 42, prefix = previous 3 chunks); :class:`~apps.bolt.posterior.PosteriorSampler`
draws K latents per chunk, scores them and keeps one. Shard ``i`` of ``N`` processes a contiguous
slice of the global document order and writes ``OUT/work/shard-i-of-N.jsonl`` plus a marker;
``action=merge`` checks that every shard is complete and made by the same recipe, concatenates
them in order into ``OUT/latents.chunk.00.jsonl`` and writes ``OUT/lineage.json`` (model
fingerprint, K, selection rule, counts, ESS and ELBO summaries, timing) and ``OUT/COMPLETE``.
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
from lingua.args import ConfigError, cli_config, dump_config, to_dict
from lingua.io import atomic_write_json, is_done, mark_done, write_jsonl
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
    dtype: str = "float32"
    """Weights and KV cache of the sampler/scorer: float32 | bfloat16 | float16. Log-probabilities
    are always taken in float32 from the logits; bfloat16 is the fast choice on GPU (the reference
    samples with vLLM in bf16), float32 keeps CPU and GPU E-steps comparable."""
    limit_docs: int | None = None
    """Debug: only the first N documents of the corpus."""
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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


# ------------------------------------------------------------------------------------ inputs


def list_docs(src: str | Path, text_key: str = "text", limit: int | None = None) -> Iterator[tuple[str, dict]]:
    """``(doc_key, record)`` in global order: sorted ``*.jsonl`` files, then line order.

    Malformed lines and records without text are skipped, counted and logged with file:line.
    """
    folder = Path(src)
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in dataset folder {folder}")
    n, bad = 0, 0
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                        raise ValueError(f"missing string field {text_key!r}")
                except (ValueError, UnicodeDecodeError) as e:
                    bad += 1
                    if bad <= 5:
                        logger.warning("%s:%d: skipped bad record (%s)", f, lineno, str(e)[:120])
                    continue
                yield str(rec.get("id", f"{f.name}:{lineno}")), rec
                n += 1
                if limit is not None and n >= limit:
                    return
    if bad:
        logger.warning("skipped %d bad records in %s", bad, folder)


def shard_bounds(n_docs: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous slice of the global order for one shard (sizes differ by at most one)."""
    return shard * n_docs // num_shards, (shard + 1) * n_docs // num_shards


def recipe_hash(cfg: EStepArgs, fingerprint: str) -> str:
    """Everything that determines the output, minus the shard index (shards must agree)."""
    d = to_dict(cfg)
    for k in ("shard", "action", "progress", "device", "batch_chunks", "max_batch_tokens", "cache"):
        d.pop(k, None)
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
    import os
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    n = 0
    try:
        with os.fdopen(fd, "wb") as w:
            for part in parts:
                with open(part, "rb") as r:
                    for line in r:  # binary iteration splits on b"\n" only
                        if line.strip():
                            w.write(line if line.endswith(b"\n") else line + b"\n")
                            n += 1
            w.flush()
            os.fsync(w.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


# ----------------------------------------------------------------------------------- running


def _load_backend(cfg: EStepArgs):
    import torch

    from lingua.consolidated import fingerprint, load_consolidated
    from lingua.generation import Engine

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_consolidated(cfg.ckpt, device=device)
    model = model.to(getattr(torch, cfg.dtype))
    return Engine(model, tok, device=device, max_batch_tokens=cfg.max_batch_tokens), fingerprint(cfg.ckpt)


def run_shard(cfg: EStepArgs, backend=None, fp: str | None = None) -> dict:
    out = Path(cfg.out)
    data_path, done_path = shard_paths(out, cfg.shard, cfg.num_shards)
    if backend is None:
        backend, fp = _load_backend(cfg)
    recipe = recipe_hash(cfg, fp)
    if done_path.is_file():
        info = json.loads(done_path.read_text())
        if info.get("recipe") == recipe:
            logger.info("shard %d/%d already complete, skipping", cfg.shard, cfg.num_shards)
            return info
        raise ConfigError(
            f"{done_path} was made with a different recipe ({info.get('recipe')} != {recipe}); "
            "use a new out folder or delete the work folder"
        )
    docs = list(list_docs(cfg.src, cfg.text_key, cfg.limit_docs))
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
            str(n): [r[f"elbo_{n}"] / max(1, r["suffix_tokens"]) for r in records if f"elbo_{n}" in r]
            for n in cfg.posterior.elbo_samples
        },
        "model_fingerprint": fp,
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
    """Run one shard and/or the merge, per ``cfg.action``; returns the shard info or lineage."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.action in ("all", "shard"):
        dump_config(cfg, out / "work" / f"config.shard-{cfg.shard:05d}.yaml")
        info = run_shard(cfg, backend, fingerprint)
        if cfg.action == "shard" or cfg.num_shards > 1:
            return info
    return merge(cfg)


def compute_elbo(
    backend,
    docs,
    *,
    num_samples=(1, 2, 4),
    chunking: str = "uniform",
    full_prefix: bool = True,
    seed: int = 0,
    max_latent_tokens: int | None = None,
    chunk: ChunkArgs | None = None,
) -> dict[str, float]:
    """n-sample ELBOs of held-out raw documents (the in-training evaluation of latent models).

    Documents are chunked uniformly (or randomly) with the whole previous text as prefix (as the
    reference's ELBO evaluation), K = max(num_samples) posterior samples per chunk, and
    ``elbo_n = sum over chunks of logsumexp(log w[:n]) - log n``, a lower bound on
    ``log p(document)`` under the model's latent-variable view. Returned per corpus on the
    log-likelihood scale (negative, higher is better): ``elbo_{n}_per_token`` (divided by the raw
    tokens of the documents), ``elbo_{n}_per_char`` and ``elbo_{n}_per_doc``.
    """
    ns = sorted({int(n) for n in num_samples})
    chunk = chunk or ChunkArgs(random=chunking == "random", all_prefix=full_prefix, seed=seed)
    max_latent = max_latent_tokens or max(16, min(1024, backend.max_seq_len // 4))
    args = PosteriorArgs(num_samples=max(ns), elbo_samples=ns, max_latent_tokens=max_latent, seed=seed)
    sampler = PosteriorSampler(backend, args, model_fingerprint="live")
    items, sizes, chars = [], [], 0
    for d, text in enumerate(docs):
        chunks = chunk_text(text, chunk)
        items.extend(ChunkInput(c.prefix, c.suffix, f"doc{d}", i) for i, c in enumerate(chunks))
        sizes.append(len(chunks))
        chars += len(text)
    posts = sampler.run(items) if items else []
    tokens = sum(p.suffix_tokens for p in posts)
    out: dict[str, float] = {}
    for n in ns:
        total = sum(p.elbo[n] for p in posts)
        out[f"elbo_{n}_per_token"] = total / max(1, tokens)
        out[f"elbo_{n}_per_char"] = total / max(1, chars)
        out[f"elbo_{n}_per_doc"] = total / max(1, len(sizes))
    return out


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


def main(argv: list[str] | None = None) -> None:
    result = run(cli_config(EStepArgs, argv, "apps.bolt.estep"))
    if "stats" in result:
        s = result["stats"]
        print(f"E-step done: {result.get('docs')} docs, {s['chunks']} chunks, "
              f"cost ratio vs sampling alone {s['cost_ratio_vs_sampling'] or float('nan'):.2f}")


if __name__ == "__main__":
    main()
