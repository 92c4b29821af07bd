"""Seeded numpy RNG streams whose full state fits in a JSON dict.

Every random choice of the data pipeline draws from its own ``numpy.random.Generator`` built
from a tuple of non-negative integers such as ``(seed, rank, world_size)``; no wall clock is
ever involved. The PCG64 state holds 128-bit integers, which many JSON readers round to
doubles, so :func:`rng_state` writes them as hexadecimal strings.
"""

from __future__ import annotations

import zlib

import numpy as np


def make_rng(*seed_parts: int) -> np.random.Generator:
    """A generator seeded by the integer tuple ``seed_parts`` (via ``SeedSequence``)."""
    if any(int(p) < 0 for p in seed_parts):
        raise ValueError(f"seed parts must be non-negative integers, got {seed_parts}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(p) for p in seed_parts])))


def name_seed(name: str) -> int:
    """A stable integer for a string (for seeding per-source streams); never ``hash()``,
    which is salted per process."""
    return zlib.crc32(name.encode("utf-8"))


def rng_state(rng: np.random.Generator) -> dict:
    """JSON-able snapshot of ``rng``; :func:`rng_from_state` restores it exactly."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise ValueError(f"only PCG64 generators are supported, got {st['bit_generator']}")
    return {
        "state": format(st["state"]["state"], "x"),
        "inc": format(st["state"]["inc"], "x"),
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def rng_from_state(state: dict) -> np.random.Generator:
    bit_gen = np.random.PCG64()
    bit_gen.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(state["state"], 16), "inc": int(state["inc"], 16)},
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }
    return np.random.Generator(bit_gen)
