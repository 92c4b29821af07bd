"""Wrong thoughts on purpose: oracle latents with a controlled share of arithmetic errors.

How good must the E-step's thoughts be for an M-step to learn from them? The corruption study
(:mod:`apps.bolt.synthetic.corruption`) answers it by training M-steps on oracle latents of which
a share ``rate`` of the chunks with a thought is made wrong the way a model's thought goes
wrong: one step's result is off by a little (1-3), and the later steps that use that result carry
the error forward, so the thought ends at a wrong value while the text states the right answer.

Which chunks are corrupted, which step and by how much come from one generator seeded by
(seed, document id, chunk index), so a dataset does not depend on file order or sharding, and the
chunks corrupted at rate r are a subset of those corrupted at any larger rate (the draws are
compared against the rate, not consumed by it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import numpy as np

_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if b else 0


def corrupt_latent(latent: str, rng: np.random.Generator) -> str:
    """``latent`` with one step's result shifted by 1-3 and the shift carried into the later
    steps that use it (recomputed); unchanged when it has no equation."""
    steps = [m for m in _STEP.finditer(latent)]
    if not steps:
        return latent
    parsed = [(int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))) for m in steps]
    j = int(rng.integers(len(parsed)))
    shift = int(rng.integers(1, 4)) * (1 if parsed[j][3] < 3 or rng.random() < 0.5 else -1)
    wrong = {parsed[j][3]: parsed[j][3] + shift}
    out = []
    for i, (a, op, b, c) in enumerate(parsed):
        if i == j:
            c = wrong[c]
        elif i > j and (a in wrong or b in wrong):
            a, b = wrong.get(a, a), wrong.get(b, b)
            new = max(0, _apply(op, a, b))
            wrong[c] = new
            c = new
        out.append(f"{a} {op} {b} = {c}.")
    pieces, pos = [], 0
    for m, text in zip(steps, out):
        pieces += [latent[pos : m.start()], text]
        pos = m.end()
    pieces.append(latent[pos:])
    return "".join(pieces)


def _rng(seed: int, doc_id: str, chunk: int) -> np.random.Generator:
    h = int.from_bytes(hashlib.blake2b(f"{doc_id}".encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, h, chunk])


def corrupt_records(records: Iterable[dict], rate: float, seed: int = 0) -> Iterator[dict]:
    """Latent records (``chunks`` with ``latent``) with a share ``rate`` of their non-empty
    latents corrupted; each chunk gets ``corrupted: bool``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    for rec in records:
        chunks = []
        for i, ch in enumerate(rec["chunks"]):
            rng = _rng(seed, str(rec.get("id", "")), i)
            hit = bool(ch["latent"]) and rng.random() < rate
            latent = corrupt_latent(ch["latent"], rng) if hit else ch["latent"]
            chunks.append({**ch, "latent": latent, "corrupted": hit and latent != ch["latent"]})
        yield {**rec, "chunks": chunks}
