"""Importance-sampling math of the E-step (pure functions, no model).

For one chunk with K posterior samples Z_1..Z_K drawn from q(Z | X):

* log importance weight  ``log w_k = log p(Z_k, X_suffix | prefix) - log q(Z_k | X)``;
* self-normalized weights ``w_k / sum_j w_j`` (softmax of the log weights);
* effective sample size   ``ESS = 1 / sum_k wbar_k^2`` in [1, K];
* the n-sample ELBO (IWAE bound) ``log (1/n) sum_{k<=n} w_k`` = ``logsumexp(log w[:n]) - log n``,
  which lower-bounds ``log p(X_suffix | prefix)`` and tightens as n grows;
* selection of the kept latent: sampling-importance-resampling (``sir``, the reference's
  default: one draw from the normalized weights), ``argmax`` or ``uniform`` (ablations).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SELECTION_RULES = ("sir", "argmax", "uniform")


def logsumexp(x: Sequence[float]) -> float:
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError("logsumexp of an empty sequence")
    m = float(a.max())
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.exp(a - m).sum()))


def normalized_weights(log_w: Sequence[float]) -> np.ndarray:
    a = np.asarray(log_w, dtype=np.float64)
    return np.exp(a - logsumexp(a))


def effective_sample_size(log_w: Sequence[float]) -> float:
    w = normalized_weights(log_w)
    return float(1.0 / np.square(w).sum())


def elbo(log_w: Sequence[float], n: int) -> float:
    """IWAE bound with the first ``n`` samples (in sample order, so cached ones come first)."""
    if not 1 <= n <= len(log_w):
        raise ValueError(f"need 1 <= n <= {len(log_w)} samples for elbo_{n}")
    return logsumexp(log_w[:n]) - math.log(n)


def select(log_w: Sequence[float], rule: str, rng: np.random.Generator) -> int:
    """Index of the kept sample under ``rule`` (one of :data:`SELECTION_RULES`)."""
    k = len(log_w)
    if k == 0:
        raise ValueError("cannot select from zero samples")
    if rule == "sir":
        return int(rng.choice(k, p=normalized_weights(log_w))) if k > 1 else 0
    if rule == "argmax":
        return int(np.argmax(np.asarray(log_w)))
    if rule == "uniform":
        return int(rng.integers(k))
    raise ValueError(f"unknown selection rule {rule!r}; choose one of {SELECTION_RULES}")


def summarize(values: Sequence[float]) -> dict:
    """Distribution summary used in lineage files (mean and quantiles)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    q = np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "p05": float(q[0]),
        "p25": float(q[1]),
        "median": float(q[2]),
        "p75": float(q[3]),
        "p95": float(q[4]),
    }
