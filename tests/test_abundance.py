"""Aggregated posterior, differential abundance, importance weights and feature correlation vs float64 oracles."""

import jax
import numpy as np
import pandas as pd
import pytest
import scipy.special
import scipy.stats

from scar_jax import abundance as ab


def _mixture_log_prob(points, means, scales, dof=None):
    """float64 oracle: log (1/n) sum_i prod_d k(points_d; means_id, scales_id), (Q,)."""
    points, means, scales = (np.asarray(a, np.float64) for a in (points, means, scales))
    if dof is None:
        comp = scipy.stats.norm.logpdf(points[:, None, :], means[None], scales[None])
    else:
        comp = scipy.stats.t.logpdf(points[:, None, :], dof, means[None], scales[None])
    return scipy.special.logsumexp(comp.sum(-1), axis=1) - np.log(means.shape[0])


def _moments(rng, n, d, spread=2.0):
    means = rng.normal(0.0, spread, (n, d)).astype(np.float32)
    variances = rng.uniform(0.05, 1.5, (n, d)).astype(np.float32)
    return means, variances


# ------------------------------------------------------------------ aggregated posterior
# one shape for every aggregated-posterior test: numpyro builds the mixture op by op, each shape compiles anew
_AP_MEANS, _AP_VARIANCES = _moments(np.random.default_rng(0), 40, 5)
_AP_POINTS = np.random.default_rng(1).normal(0.0, 2.5, (17, 5)).astype(np.float32)


@pytest.mark.parametrize("dof", [None, 3.0, 7.5])
def test_aggregated_posterior_log_prob_matches_scipy_mixture(dof):
    ap = ab.aggregated_posterior(_AP_MEANS, _AP_VARIANCES, dof=dof)
    assert ap.batch_shape == () and ap.event_shape == (5,)
    expected = _mixture_log_prob(_AP_POINTS, _AP_MEANS, np.sqrt(_AP_VARIANCES), dof)
    np.testing.assert_allclose(np.asarray(jax.jit(ap.log_prob)(_AP_POINTS)), expected, rtol=1e-5)
    # a single point and a (2, 3, D) batch of points
    np.testing.assert_allclose(float(jax.jit(ap.log_prob)(_AP_POINTS[0])), expected[0], rtol=1e-5)
    batched = np.asarray(jax.jit(ap.log_prob)(_AP_POINTS[:6].reshape(2, 3, 5)))
    np.testing.assert_allclose(batched, expected[:6].reshape(2, 3), rtol=1e-5)


def test_aggregated_posterior_variance_as_scale_reproduces_scvi_quirk():
    ap = ab.aggregated_posterior(_AP_MEANS, _AP_VARIANCES, dof=3.0, variance_as_scale=True)
    expected = _mixture_log_prob(_AP_POINTS, _AP_MEANS, _AP_VARIANCES, 3.0)
    np.testing.assert_allclose(np.asarray(jax.jit(ap.log_prob)(_AP_POINTS)), expected, rtol=1e-5)


def test_aggregated_posterior_samples_follow_the_mixture():
    # mixture mean = mean of the means; variance = mean of (variances + means^2) - mean^2
    ap = ab.aggregated_posterior(_AP_MEANS, _AP_VARIANCES)
    draws = np.asarray(jax.jit(lambda k: ap.sample(k, (4000,)))(jax.random.key(0)))
    assert draws.shape == (4000, 5)
    m, v = _AP_MEANS.astype(np.float64), _AP_VARIANCES.astype(np.float64)
    mix_mean, mix_var = m.mean(0), (v + m**2).mean(0) - m.mean(0) ** 2
    np.testing.assert_allclose(draws.mean(0), mix_mean, atol=4 * np.sqrt(mix_var / 4000).max())
    np.testing.assert_allclose(draws.var(0), mix_var, rtol=0.1)


def test_aggregated_posterior_validates_inputs():
    with pytest.raises(ValueError, match="n_cells, n_latent"):
        ab.aggregated_posterior(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="positive"):
        ab.aggregated_posterior(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="dof"):
        ab.aggregated_posterior(np.zeros((2, 2)), np.ones((2, 2)), dof=0.0)


# ------------------------------------------------------------------ differential abundance
def _two_sample_data(seed=0, n=300, d=4):
    """Sample A: 90% cluster 1; sample B: 90% cluster 2; clusters 6 apart in every latent dimension."""
    rng = np.random.default_rng(seed)
    labels = np.array(["A"] * (n // 2) + ["B"] * (n - n // 2))
    in_major = rng.uniform(size=n) < 0.9
    cluster = np.where(labels == "A", np.where(in_major, 1, 2), np.where(in_major, 2, 1))
    centres = {1: np.full(d, -3.0), 2: np.full(d, 3.0)}
    means = np.stack([centres[c] for c in cluster]) + rng.normal(0, 0.7, (n, d))
    variances = rng.uniform(0.1, 0.5, (n, d))
    order = rng.permutation(n)  # interleave the samples
    return labels[order], cluster[order], means[order].astype(np.float32), variances[order].astype(np.float32)


def test_differential_abundance_matches_oracle_and_scvi_layout():
    labels, _, means, variances = _two_sample_data()
    obs = pd.Index([f"cell{i}" for i in range(len(labels))])
    series = pd.Series(labels, index=obs)
    for dof in (None, 3.0):
        df = ab.differential_abundance(series, means, variances, dof=dof, chunk_size=64, component_chunk_size=50)
        assert list(df.columns) == list(pd.unique(labels)) and df.index.equals(obs)
        assert df.shape == (len(labels), 2) and df.dtypes.eq(np.float32).all()
        for s in df.columns:
            m = labels == s
            expected = _mixture_log_prob(means, means[m], np.sqrt(variances[m]), dof)
            np.testing.assert_allclose(df[s].to_numpy(), expected, rtol=1e-5)


def test_differential_abundance_separates_cluster_compositions():
    labels, cluster, means, variances = _two_sample_data()
    df = ab.differential_abundance(labels, means, variances)
    assert df.index.equals(pd.RangeIndex(len(labels)))
    diff = (df["A"] - df["B"]).to_numpy()
    assert np.mean(diff[cluster == 1] > 0) > 0.9
    assert np.mean(diff[cluster == 2] < 0) > 0.9
    # about log(0.9 / 0.1) nats in favour of the majority sample
    np.testing.assert_allclose(np.median(diff[cluster == 1]), np.log(9), atol=0.8)


def test_differential_abundance_chunking_invariant_and_seeded_subsampling():
    labels, _, means, variances = _two_sample_data(seed=3)
    ref = ab.differential_abundance(labels, means, variances, chunk_size=1000)
    for chunk in (1, 7, 64):
        out = ab.differential_abundance(labels, means, variances, chunk_size=chunk)
        np.testing.assert_allclose(out.to_numpy(), ref.to_numpy(), rtol=1e-6)
    sub = [ab.differential_abundance(labels, means, variances, num_cells_posterior=20, seed=s) for s in (5, 5, 6)]
    pd.testing.assert_frame_equal(sub[0], sub[1])
    assert not np.allclose(sub[0].to_numpy(), sub[2].to_numpy())
    # the subsample: 20 cells of each sample, reproducible from default_rng(seed) in column order
    rng = np.random.default_rng(5)
    for s in sub[0].columns:
        rows = np.sort(rng.choice(np.flatnonzero(labels == s), 20, replace=False))
        expected = _mixture_log_prob(means, means[rows], np.sqrt(variances[rows]))
        np.testing.assert_allclose(sub[0][s].to_numpy(), expected, rtol=1e-5)
    # more cells requested than available: no subsampling
    full = ab.differential_abundance(labels, means, variances, num_cells_posterior=10_000, seed=1)
    np.testing.assert_allclose(full.to_numpy(), ref.to_numpy(), rtol=1e-6)


def test_differential_abundance_far_apart_samples_do_not_underflow():
    # log densities hundreds of nats apart must stay finite (per-sample running max)
    means = np.array([[0.0], [0.1], [100.0], [100.2]], np.float32)
    variances = np.full((4, 1), 0.5, np.float32)
    df = ab.differential_abundance(["x", "x", "y", "y"], means, variances, component_chunk_size=1)
    assert np.isfinite(df.to_numpy()).all()
    for s, m in (("x", slice(0, 2)), ("y", slice(2, 4))):
        expected = _mixture_log_prob(means, means[m], np.sqrt(variances[m]))
        np.testing.assert_allclose(df[s].to_numpy(), expected, rtol=1e-5)


def test_differential_abundance_labels_points_and_errors():
    rng = np.random.default_rng(2)
    means, variances = _moments(rng, 6, 2)
    cat = pd.Series(pd.Categorical(["b", "a", "b", None, "a", "b"], categories=["c", "a", "b"]))
    df = ab.differential_abundance(cat, means, variances, obs_names=list("uvwxyz"))
    assert list(df.columns) == ["b", "a"] and list(df.index) == list("uvwxyz")  # missing label: no column
    points = rng.normal(size=(6, 2)).astype(np.float32)
    df = ab.differential_abundance(cat, means, variances, points=points)
    m = (cat == "a").to_numpy()
    np.testing.assert_allclose(df["a"], _mixture_log_prob(points, means[m], np.sqrt(variances[m])), rtol=1e-5)
    with pytest.raises(ValueError, match="entries"):
        ab.differential_abundance(["a"] * 5, means, variances)
    with pytest.raises(ValueError, match="chunk_size"):
        ab.differential_abundance(cat, means, variances, chunk_size=0)
    with pytest.raises(ValueError, match="num_cells_posterior"):
        ab.differential_abundance(cat, means, variances, num_cells_posterior=0)


# ------------------------------------------------------------------ importance weights
def test_importance_weights_normalised_and_equal_when_ratio_constant():
    rng = np.random.default_rng(0)
    n_samples, n_cells, n_anchors = 3, 5, 4
    log_qz = rng.normal(size=(n_samples, n_cells, n_anchors))
    log_pz = rng.normal(size=(n_samples, n_cells))
    log_px = rng.normal(size=n_anchors)
    # log p(z) + log p(x_a | z) - log p(x_a) - log q(z | x_a) = const for every draw and anchor
    log_px_z = 1.7 + log_qz - log_pz[..., None] + log_px
    w = ab.importance_weights(log_px_z, log_pz, log_qz, log_px)
    assert w.shape == (n_samples, n_cells)
    np.testing.assert_allclose(w, np.full(w.shape, 1 / w.size), rtol=1e-5)
    w = ab.importance_weights(rng.normal(size=log_qz.shape), log_pz, log_qz, log_px)
    assert np.all(w > 0)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)


def _hand_log_weights(log_px_z, log_pz, log_qz, log_px):
    out = []
    for k in range(len(log_pz)):
        num = np.log(sum(np.exp(log_pz[k] + log_px_z[k][a] - log_px[a]) for a in range(len(log_px))))
        den = np.log(sum(np.exp(q) for q in log_qz[k]))
        out.append(num - den)
    return np.array(out)


def test_importance_weights_hand_values_and_truncation():
    # 3 draws, 2 anchors
    log_px_z = np.array([[-1.0, -2.0], [-0.5, -4.0], [-3.0, -3.0]])
    log_pz = np.array([-1.0, -2.0, -0.5])
    log_qz = np.array([[-1.0, -1.0], [-2.0, -0.5], [-0.2, -3.0]])
    log_px = np.array([-0.3, -1.2])
    log_w = _hand_log_weights(log_px_z, log_pz, log_qz, log_px)
    expected = np.exp(log_w) / np.exp(log_w).sum()
    w = ab.importance_weights(log_px_z, log_pz, log_qz, log_px)
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    # a third draw's worth: hand arithmetic of the first entry
    lw0 = np.log(np.exp(-1 - 1 + 0.3) + np.exp(-1 - 2 + 1.2)) - np.log(2 * np.exp(-1.0))
    np.testing.assert_allclose(log_w[0], lw0)
    # truncation (scvi: clamp from below at the log of the mean weight)
    raw = np.exp(log_w)
    clamped = np.maximum(raw, raw.mean())
    assert (raw < raw.mean()).any()  # the rule changes something here
    w_trunc = ab.importance_weights(log_px_z, log_pz, log_qz, log_px, truncation=True)
    np.testing.assert_allclose(w_trunc, clamped / clamped.sum(), rtol=1e-5)
    np.testing.assert_allclose(w_trunc.sum(), 1.0, rtol=1e-6)


def test_importance_weights_shape_errors():
    with pytest.raises(ValueError, match="expected"):
        ab.importance_weights(np.zeros((3, 2)), np.zeros(3), np.zeros((3, 2)), np.zeros(3))


def test_anchor_log_qz_prior_and_anchor_selection():
    rng = np.random.default_rng(4)
    zs = rng.normal(size=(3, 7, 2)).astype(np.float32)
    means, variances = _moments(rng, 5, 2)
    out = ab.anchor_log_qz(zs, means, variances, chunk_size=4)
    expected = scipy.stats.norm.logpdf(zs[..., None, :], means, np.sqrt(variances)).sum(-1)
    assert out.shape == (3, 7, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ab.standard_normal_log_prob(zs)), scipy.stats.norm.logpdf(zs).sum(-1), rtol=1e-6
    )
    np.testing.assert_array_equal(ab.select_anchor_cells(10, 20), np.arange(10))
    anchors = ab.select_anchor_cells(100, 30, seed=2)
    assert len(np.unique(anchors)) == 30 and anchors.max() < 100
    np.testing.assert_array_equal(anchors, ab.select_anchor_cells(100, 30, seed=2))


# ------------------------------------------------------------------ feature correlation
def test_feature_correlation_matches_numpy_and_scipy():
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.0, (4, 30, 1))
    samples = base * rng.gamma(1.0, 1.0, (4, 30, 5)) + rng.poisson(1.0, (4, 30, 5))  # ties in the ranks
    flat = samples.reshape(-1, 5)
    np.testing.assert_allclose(ab.feature_correlation(samples, "pearson"), np.corrcoef(flat, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(ab.feature_correlation(samples), scipy.stats.spearmanr(flat)[0], atol=1e-12)
    np.testing.assert_allclose(ab.feature_correlation(flat, "spearman"), ab.feature_correlation(samples), atol=1e-12)
    # monotone transforms leave Spearman unchanged
    np.testing.assert_allclose(ab.feature_correlation(np.log1p(samples)), ab.feature_correlation(samples), atol=1e-12)


def test_feature_correlation_edge_cases():
    x = np.array([[1.0, 2.0], [2.0, 4.1], [3.0, 5.9]])
    corr = ab.feature_correlation(x, "spearman")
    np.testing.assert_allclose(corr, np.ones((2, 2)))  # a (2, 2) matrix, not spearmanr's scalar
    x = np.column_stack([np.arange(5.0), np.full(5, 3.0), -np.arange(5.0)])
    corr = ab.feature_correlation(x, "pearson")
    assert np.isnan(corr[1]).all() and np.isnan(corr[:, 1]).all()
    np.testing.assert_allclose(corr[0, 2], -1.0)
    with pytest.raises(ValueError, match="Unknown correlation type"):
        ab.feature_correlation(x, "kendall")
    with pytest.raises(ValueError, match="two observations"):
        ab.feature_correlation(x[:1])
