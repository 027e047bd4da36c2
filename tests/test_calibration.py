"""Tests for :mod:`scar_jax.calibration` against independent float64 NumPy/SciPy versions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from scar_jax.calibration import calibrated_native_share, knn_indices, neighbourhood_posterior, pool_counts
from scar_jax.datasets import simulate_species_mixture
from scar_jax.metrics import species_mixture_metrics


def test_neighbourhood_posterior_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    m, G, alpha = 7, 40, 0.7
    a = rng.dirichlet(np.ones(G))
    T, B = rng.uniform(1e3, 1e5, m), rng.uniform(10, 1e3, m)
    pi, s = rng.uniform(0.1, 0.9, m), rng.uniform(0.5, 3, m)
    X = rng.poisson(rng.uniform(0, 30, (m, G))).astype(float)
    q, theta = neighbourhood_posterior(X, T, B, a, pi, s, alpha)
    for i in range(m):
        for g in range(G):
            mu = (T[i] * s[i] + B[i]) * a[g]
            on = stats.nbinom.pmf(X[i, g], alpha, alpha / (alpha + mu))  # NB(mean mu, shape alpha)
            off = stats.poisson.pmf(X[i, g], B[i] * a[g])
            want_q = pi[i] * on / (pi[i] * on + (1 - pi[i]) * off)
            assert q[i, g] == pytest.approx(want_q, rel=1e-9, abs=1e-12)
            # Gamma(alpha, rate alpha / mu) prior, Poisson observation: posterior mean (alpha + X) / (alpha / mu + 1)
            rate = stats.gamma(alpha + X[i, g], scale=1.0 / (alpha / mu + 1.0)).mean()
            assert theta[i, g] == pytest.approx(max(rate - B[i] * a[g], 0.0) / T[i], rel=1e-9, abs=1e-15)


def test_neighbourhood_posterior_extremes() -> None:
    a = np.array([0.5, 0.5 - 1e-12, 1e-12])
    q, theta = neighbourhood_posterior(np.array([[50.0, 5000.0, 3.0]]), [1e4], [100.0], a, [0.5], [1.0])
    assert np.isfinite(q).all() and np.isfinite(theta).all()
    assert q[0, 1] > 0.999 and q[0, 0] < 0.01  # far above the ambient expectation (50): on; at it: off
    assert 0 <= q.min() and q.max() <= 1


def test_knn_and_pooling() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(60, 3))
    nb = knn_indices(z, 5, chunk=7)
    assert (nb[:, 0] == np.arange(60)).all()
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nb[:, 1:], np.argsort(d, axis=1, kind="stable")[:, 1:5])
    x = rng.poisson(1.0, (60, 9))
    want = np.stack([x[nb[i]].sum(0) for i in range(60)])
    np.testing.assert_array_equal(pool_counts(x, nb), want)
    np.testing.assert_array_equal(pool_counts(sp.csr_matrix(x), nb), want)


def test_calibration_on_species_mixture() -> None:
    """Oracle neighbourhoods (same species): noise ratio calibrated, real expression kept, foreign removed."""
    a = simulate_species_mixture(n_cells=200, n_genes=3000, seed=2)
    species = a.obs["species"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    nb = np.stack(
        [
            np.r_[i, rng.choice(np.flatnonzero((species == species[i]) & (np.arange(200) != i)), 49, False)]
            for i in range(200)
        ]
    )
    truth = a.obs["noise_ratio"].to_numpy()
    eps, w = calibrated_native_share(a.X, nb, a.varm["true_ambient_profile"][:, 0], np.full(200, 0.06))
    assert w.shape == a.shape and w.min() >= 0 and w.max() <= 1
    assert 1 / 1.5 < eps.mean() / truth.mean() < 1.5
    assert np.corrcoef(eps, truth)[0, 1] > 0.5
    m = species_mixture_metrics(a, a.X.toarray() * w)
    assert m["native_kept"] > 0.995 and m["foreign_removed"] > 0.85
