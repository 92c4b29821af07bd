"""Weighted choice of the source each next document comes from."""

from __future__ import annotations

import numpy as np

from lingua.data.rng import make_rng, rng_from_state, rng_state


class SourceMixer:
    """Draws a source name per document with probability proportional to its weight.

    The stream is seeded by ``(seed, rank, world_size)`` as in the reference, so ranks mix
    independently and the choice sequence is reproducible; exactly one uniform draw is made per
    document, whatever the number of sources. Sources of weight 0 are never drawn.
    """

    def __init__(self, weights: dict[str, float], *, seed: int, rank: int, world_size: int, state: dict | None = None):
        active = {name: float(w) for name, w in weights.items() if w > 0}
        if not active:
            raise ValueError(f"no source has a positive weight: {weights}")
        self.names = sorted(active)
        probs = np.array([active[n] for n in self.names], dtype=np.float64)
        self.probs = probs / probs.sum()
        self._cdf = np.cumsum(self.probs)
        self._cdf[-1] = 1.0
        self._rng = rng_from_state(state) if state is not None else make_rng(seed, rank, world_size)

    def choose(self) -> str:
        return self.names[int(np.searchsorted(self._cdf, self._rng.random(), side="right"))]

    def state(self) -> dict:
        return rng_state(self._rng)
