"""Size of the synthetic corpus and of its latent thoughts, in tokens of the synthetic tokenizer.

``python -m apps.bolt.synthetic.stats [num_docs=2000] [latent_styles=[steps,restate]] ...``

For each latent style it prints documents, characters, raw tokens, latent tokens (the chunk
thoughts alone) and two ratios to compare with the paper's GPT-4o-mini latents: latent/raw
(2.3 there) and augmented/raw, where "augmented" is the ``random`` training layout with its
special tokens (3.3 there, "+1 for the raw tokens"). ``in place``: the share of statements whose
thought sits between their question and their answer (a chunk boundary falls there), where the
evaluation's latent prompt asks for it; the rest get theirs before the question.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from apps.bolt.chunking import ChunkArgs
from apps.bolt.formats import make_layout
from apps.bolt.synthetic.corpus import WorldArgs, find_problems, generate_corpus, make_world_args
from apps.bolt.synthetic.oracle import oracle_records, synthetic_chunk_args
from apps.bolt.synthetic.tokenizer import get_synthetic_tokenizer
from lingua.args import parse_args
from lingua.errors import entry_point
from lingua.tokenizer import Tokenizer, build_tokenizer


@dataclass
class StatsArgs:
    num_docs: int = 2000
    seed: int = 0
    world: WorldArgs = field(default_factory=WorldArgs)
    chunk: ChunkArgs = field(default_factory=synthetic_chunk_args)
    latent_styles: list[str] = field(default_factory=lambda: ["steps", "restate"])
    cache_dir: str = ".cache/synthetic"
    vocab_size: int = 512


def in_place(record: dict) -> tuple[int, int]:
    """(statements whose question and answer a chunk boundary separates, statements) of a latent
    record: the thought of a statement goes before the chunk holding its answer."""
    bounds, pos = set(), 0
    for c in record["chunks"]:
        pos += len(c["suffix"])
        bounds.add(pos)
    found, _ = find_problems(record["text"])
    hits = 0
    for f in found:
        q_end = f.line_start + len(f.problem.question)
        a_start = f.answer_pos - f.problem.answer_offset
        hits += any(q_end <= b <= a_start for b in bounds)
    return hits, len(found)


def corpus_stats(docs: list[dict], tok: Tokenizer, chunk: ChunkArgs, style: str) -> dict:
    """Counts for ``docs`` with oracle latents of ``style``; token counts exclude BOS/EOS."""
    records = list(oracle_records(docs, chunk, style))
    layout = make_layout("random")
    rng = np.random.default_rng(0)
    raw = sum(len(tok.encode(r["text"])) for r in records)
    latent = sum(len(tok.encode(c["latent"])) for r in records for c in r["chunks"])
    augmented = sum(len(tok.encode(layout(r, rng))) for r in records)
    placed = [in_place(r) for r in records]
    return {
        "latent_style": style,
        "docs": len(records),
        "statements": sum(len(r["problems"]) for r in records),
        "chunks": sum(r["num_chunks"] for r in records),
        "chars": sum(len(r["text"]) for r in records),
        "raw_tokens": raw,
        "latent_tokens": latent,
        "latent_per_raw": latent / raw,
        "augmented_tokens": augmented,
        "augmented_per_raw": augmented / raw,
        "in_place": sum(h for h, _ in placed) / max(1, sum(n for _, n in placed)),
    }


def run(cfg: StatsArgs) -> list[dict]:
    world = make_world_args(cfg.world)
    tok = build_tokenizer(get_synthetic_tokenizer(cfg.cache_dir, vocab_size=cfg.vocab_size, args=world))
    docs = list(generate_corpus(cfg.num_docs, cfg.seed, args=world))
    rows = [corpus_stats(docs, tok, cfg.chunk, style) for style in cfg.latent_styles]
    print(f"tokenizer: {tok!r}")
    for row in rows:
        print(
            f"{row['latent_style']:8s} docs {row['docs']} statements {row['statements']} chunks {row['chunks']} "
            f"chars {row['chars']} raw tokens {row['raw_tokens']} latent tokens {row['latent_tokens']} "
            f"latent/raw {row['latent_per_raw']:.2f} augmented/raw {row['augmented_per_raw']:.2f} "
            f"in place {row['in_place']:.2f}"
        )
    return rows


@entry_point("apps.bolt.synthetic.stats")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(StatsArgs, argv))


if __name__ == "__main__":
    main()
