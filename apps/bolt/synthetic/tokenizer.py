"""A small BPE tokenizer trained on the synthetic corpus, with the four latent tokens reserved.

The world has a few hundred distinct words, and both trainers split digits one per token, so a
512-entry vocabulary covers it with whole-word pieces. That keeps the embedding tables of the
tiny models small and every number a digit sequence (arithmetic is learnable digit by digit).

Built on the fly and cached: the cache folder name is a hash of the exact training texts and the
trainer settings, so a change to the generator or the knobs trains a new tokenizer instead of
reusing a stale one. The folder is filled under a temporary name and renamed into place with its
``COMPLETE`` marker already inside, so a crashed or concurrent build never leaves a half-written
tokenizer where a reader would take it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from apps.bolt.formats import SPECIAL_TOKENS
from apps.bolt.synthetic.corpus import WorldArgs, generate_corpus, make_world_args
from lingua.io import atomic_dir, atomic_write_json, is_done, mark_done
from lingua.tokenizer import TokenizerArgs, train_tokenizer

ARGS_FILE = "tokenizer_args.json"


def tokenizer_texts(num_docs: int, seed: int, args: WorldArgs) -> list[str]:
    """What the tokenizer learns from: the documents and their derivations (the latent text)."""
    texts = []
    for doc in generate_corpus(num_docs, seed, args=args):
        texts.append(doc["text"])
        texts.append(" ".join(p["derivation"] for p in doc["problems"]))
    return texts


def get_synthetic_tokenizer(
    cache_dir: str | Path,
    *,
    vocab_size: int = 512,
    kind: str = "sp",
    num_docs: int = 1000,
    seed: int = 0,
    args: WorldArgs | None = None,
    **knobs,
) -> TokenizerArgs:
    """Args of the cached synthetic tokenizer (trained into ``cache_dir`` when missing)."""
    world = make_world_args(args, **knobs)
    texts = tokenizer_texts(num_docs, seed, world)
    settings = {"kind": kind, "vocab_size": vocab_size, "special_tokens": list(SPECIAL_TOKENS)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    final = Path(cache_dir) / f"synthetic-{kind}{vocab_size}-{digest.hexdigest()[:16]}"
    if not is_done(final):
        _build(final, texts, settings)
    return _load_args(final)


def _build(final: Path, texts: list[str], settings: dict) -> None:
    with atomic_dir(final, clear=_clear_stale) as tmp:
        trained = train_tokenizer(texts, tmp, settings["kind"], settings["vocab_size"], settings["special_tokens"])
        atomic_write_json(
            tmp / ARGS_FILE,
            {"name": trained.name, "file": Path(trained.path).name, "special_tokens": trained.special_tokens, "settings": settings},
        )
        mark_done(tmp)


def _clear_stale(final: Path) -> bool:
    """A complete cache folder (a concurrent build of the same content won) is kept; a stale one
    without its marker is removed to make way."""
    if is_done(final):
        return False
    shutil.rmtree(final)
    return True


def _load_args(folder: Path) -> TokenizerArgs:
    meta = json.loads((folder / ARGS_FILE).read_text())
    return TokenizerArgs(meta["name"], str(folder / meta["file"]), list(meta["special_tokens"]))
