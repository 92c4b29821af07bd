"""Importance weights, ELBO and SIR on a toy model where p and q are known in closed form."""

import math

import numpy as np
import pytest

from apps.bolt import importance as imp

# Toy world: latent Z in {0..3}; joint p(Z, X=x_obs) and proposal q(Z | X) as explicit tables.
P_JOINT = np.array([0.02, 0.10, 0.05, 0.03])  # p(z, x); p(x) = 0.2
LOG_PX = math.log(P_JOINT.sum())
POSTERIOR = P_JOINT / P_JOINT.sum()
Q = np.array([0.4, 0.3, 0.2, 0.1])


def _draw(rng, k, q=Q):
    z = rng.choice(len(q), size=k, p=q)
    return z, np.log(P_JOINT[z]) - np.log(q[z])


def test_weights_of_exact_posterior_are_constant_and_elbo_is_exact():
    rng = np.random.default_rng(0)
    z, log_w = _draw(rng, 8, q=POSTERIOR)
    assert np.allclose(log_w, LOG_PX)
    for n in (1, 2, 4, 8):
        assert imp.elbo(log_w, n) == pytest.approx(LOG_PX, abs=1e-12)
    assert imp.effective_sample_size(log_w) == pytest.approx(8.0)


def test_elbo_is_a_bound_that_tightens_with_more_samples():
    rng = np.random.default_rng(1)
    trials = 20000
    means = {}
    for n in (1, 2, 4, 16):
        vals = [imp.elbo(_draw(rng, n)[1], n) for _ in range(trials)]
        means[n] = float(np.mean(vals))
    # E[elbo_1] = KL-gap below log p(x): computed exactly from the tables
    exact_elbo1 = float((Q * (np.log(P_JOINT) - np.log(Q))).sum())
    assert means[1] == pytest.approx(exact_elbo1, abs=0.02)
    assert means[1] < means[2] < means[4] < means[16] < LOG_PX + 0.01
    assert LOG_PX - means[16] < 0.1 * (LOG_PX - means[1])


def test_sir_selection_frequencies_match_normalized_weights():
    log_w = np.log([0.1, 0.2, 0.3, 0.4]) + 5.0  # shift must not matter
    rng = np.random.default_rng(1234)
    n = 40000
    counts = np.bincount([imp.select(log_w, "sir", rng) for _ in range(n)], minlength=4)
    expected = imp.normalized_weights(log_w) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001
    assert np.allclose(imp.normalized_weights(log_w), [0.1, 0.2, 0.3, 0.4])


def test_sir_recovers_the_posterior_from_a_bad_proposal():
    rng = np.random.default_rng(7)
    picks = []
    for _ in range(20000):
        z, log_w = _draw(rng, 16)
        picks.append(z[imp.select(log_w, "sir", rng)])
    freq = np.bincount(picks, minlength=4) / len(picks)
    assert np.abs(freq - POSTERIOR).max() < 0.03
    # while the proposal itself is far from it
    assert np.abs(Q - POSTERIOR).max() > 0.15


def test_argmax_uniform_and_errors():
    rng = np.random.default_rng(0)
    assert imp.select([-3.0, -1.0, -2.0], "argmax", rng) == 1
    picks = {imp.select([-3.0, -1.0, -2.0], "uniform", rng) for _ in range(200)}
    assert picks == {0, 1, 2}
    with pytest.raises(ValueError, match="unknown selection rule"):
        imp.select([0.0], "best", rng)
    with pytest.raises(ValueError, match="need 1 <= n"):
        imp.elbo([0.0, 0.0], 4)


def test_ess_bounds_and_summary():
    assert imp.effective_sample_size([0.0, -1000.0, -1000.0]) == pytest.approx(1.0)
    assert imp.effective_sample_size([0.0] * 4) == pytest.approx(4.0)
    s = imp.summarize([1.0, 2.0, 3.0, 4.0])
    assert s["count"] == 4 and s["mean"] == 2.5 and s["median"] == 2.5
    assert imp.summarize([]) == {"count": 0}
