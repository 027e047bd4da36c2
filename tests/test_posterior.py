"""Tests of evaluation-mode inference (``scar_jax.posterior`` through the ``SCAR`` methods).

Oracles: the same quantity at other chunk sizes, NumPy/SciPy re-computations from the functional core
(``scar_jax.vae.forward`` with the per-cell keys ``fold_in(fold_in(predict_key, seed), cell)``), and
properties (ranges, sums, orderings).
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

import scar_jax
from scar_jax import analysis, posterior
from scar_jax.datasets import simulate
from scar_jax.vae import Batch, forward

N_CELLS, N_GENES, N_LATENT = 200, 40, 4


@pytest.fixture(scope="module")
def adata(trained_model):
    ad, _ = trained_model  # conftest: simulate(n_cells=N_CELLS, n_genes=N_GENES, seed=0), set up
    assert ad.shape == (N_CELLS, N_GENES)
    return ad


@pytest.fixture(scope="module")
def model(trained_model):
    return trained_model[1]  # conftest: n_hidden=16, n_latent=4, 2 epochs; shared: not to be changed


@pytest.fixture(scope="module")
def ln_model(model):
    """A logistic-normal model with the trained encoder of ``model`` (saves a second training compile).

    The encoder, q(z | x) and the per-cell keys do not depend on ``latent_distribution``; only the
    latent summary (softmax of z) and the decoder input do.
    """
    m = copy.copy(model)
    m.config = dataclasses.replace(model.config, latent_distribution="ln")
    m._net = m.config.make_net()
    return m


def dense_x(adata) -> np.ndarray:
    return np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, np.float32)


def cell_keys(model, rows, seed: int = 0) -> jax.Array:
    """The per-cell keys the model's chunk driver uses: ``fold_in(fold_in(predict_key, seed), row)``."""
    key = jax.random.fold_in(model._predict_key, seed)
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(rows, jnp.uint32))


def forward_eval(model, x: np.ndarray, keys: jax.Array):
    return forward(model._net, model.variables, jnp.asarray(x), keys, train=False)[0]


def expected_and_uniform(model, x: np.ndarray, keys: jax.Array, draw: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``draw`` of denoised_counts_expected, rebuilt: E = N (1 - eps) phi and the rounding uniforms."""
    keys_s = jax.vmap(jax.random.fold_in, (0, None))(keys, draw)
    out = forward_eval(model, x, keys_s)
    library = x.sum(axis=1, keepdims=True).astype(np.float64)
    expected = (
        library * (1.0 - np.asarray(out.noise_ratio, np.float64)) * np.asarray(out.native_frequencies, np.float64)
    )
    round_keys = jax.vmap(jax.random.fold_in, (0, None))(keys_s, 1)
    uniform = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (x.shape[1],)))(round_keys), np.float64)
    return expected, uniform


# ---------------------------------------------------------------- map_chunks


def test_map_chunks_pads_and_keys_per_cell():
    # A probe fn returning row sums and the key data: padding (last chunk) is dropped, keys are per cell.
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (11, 5)).astype(np.float32)
    cells = posterior.HostCells(sp.csr_matrix(x), x.sum(1, keepdims=True), np.zeros(11, np.int32))
    rows = np.array([10, 0, 3, 3, 7, 1, 2])
    key = jax.random.key(3)
    calls = []

    def probe(batch, keys):
        calls.append(batch.x.shape[0])
        return batch.x.sum(axis=1), batch.library[:, 0], jax.random.key_data(keys)

    sums, library, key_data = posterior.map_chunks(probe, cells, rows, 3, key)
    assert calls == [3, 3, 3]  # fixed chunk shape: the last chunk (1 row) is padded to 3
    np.testing.assert_array_equal(sums, x[rows].sum(axis=1))
    np.testing.assert_array_equal(library, x[rows].sum(axis=1))
    expected_keys = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(key, r))) for r in rows])
    np.testing.assert_array_equal(key_data, expected_keys)


def test_elbo_does_not_depend_on_batch_size(model):
    # rtol 1e-5: only the float32 matmul blocking can differ between chunk shapes
    ref = model.get_elbo(return_mean=False, batch_size=1000)  # one chunk of all 200 cells
    assert ref.shape == (N_CELLS,) and np.isfinite(ref).all()
    for bs in (7, 64):  # 200 = 28 * 7 + 4 and 3 * 64 + 8: both pad their last chunk
        np.testing.assert_allclose(model.get_elbo(return_mean=False, batch_size=bs), ref, rtol=1e-5)


def test_denoised_counts_do_not_depend_on_batch_size(model):
    ref = model.get_denoised_counts(method="expected", batch_size=1000)
    for bs in (7, 64):
        np.testing.assert_array_equal(model.get_denoised_counts(method="expected", batch_size=bs), ref)


def test_last_chunk_padding_does_not_leak(model):
    full_elbo = model.get_elbo(return_mean=False)
    full_den = model.get_denoised_counts(method="expected")
    full_lat = model.get_latent_representation()
    # [5, 3]: one chunk of two cells; [5, 3, 9] at batch_size 2: the last chunk is [9, 9 (padding)]
    for indices, bs in (([5, 3], None), ([5, 3, 9], 2)):
        elbo = model.get_elbo(indices=indices, return_mean=False, batch_size=bs)
        np.testing.assert_allclose(elbo, full_elbo[indices], rtol=1e-5)
        den = model.get_denoised_counts(method="expected", indices=indices, batch_size=bs)
        np.testing.assert_array_equal(den, full_den[indices])
        lat = model.get_latent_representation(indices=indices, batch_size=bs)
        np.testing.assert_allclose(lat, full_lat[indices], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- denoised counts


def test_denoised_counts_are_a_rounding_of_the_expectation(model, adata):
    x = dense_x(adata)
    rows = np.arange(N_CELLS)
    denoised = model.get_denoised_counts(method="expected", n_samples=1, seed=0)
    assert denoised.shape == (N_CELLS, N_GENES)
    np.testing.assert_array_equal(denoised, np.round(denoised))  # integer valued
    assert denoised.min() >= 0

    expected, uniform = expected_and_uniform(model, x, cell_keys(model, rows, seed=0), draw=0)
    assert (expected >= 0).all()
    # every entry is floor(E) or floor(E) + 1; tol 1e-4 relative covers float32 rounding of E itself
    tol = 1e-4 * np.maximum(expected, 1.0)
    assert (denoised >= np.floor(expected - tol)).all()
    assert (denoised <= np.floor(expected + tol) + 1).all()
    # and exactly floor(E) + [u < E - floor(E)] where the Bernoulli decision is not within 1e-4 of a tie
    # (E == 0 exactly, from a zero native frequency, is never a tie: the count must be 0)
    frac = expected - np.floor(expected)
    clear = (expected == 0) | ((np.abs(frac - uniform) > 1e-4) & (frac > 1e-4) & (frac < 1 - 1e-4))
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(denoised[clear], (np.floor(expected) + (uniform < frac))[clear])
    # unbiased rounding: total within 5 sd of the total expectation (sd^2 = sum frac (1 - frac))
    sd = np.sqrt((frac * (1 - frac)).sum())
    assert abs(denoised.sum() - expected.sum()) < 5 * sd


def test_denoised_counts_seed_changes_draws(model):
    a = model.get_denoised_counts(method="expected", seed=0)
    # deterministic given the seed
    np.testing.assert_array_equal(model.get_denoised_counts(method="expected", seed=0), a)
    assert not np.array_equal(model.get_denoised_counts(method="expected", seed=1), a)


def test_denoised_median_lies_between_draws(model, adata):
    x = dense_x(adata)
    keys = cell_keys(model, np.arange(N_CELLS), seed=0)
    median = model.get_denoised_counts(method="expected", n_samples=5, seed=0)
    np.testing.assert_array_equal(median, np.round(median))  # median of 5 integers is an integer
    draws = []
    for s in range(5):
        expected, uniform = expected_and_uniform(model, x, keys, draw=s)
        draws.append(np.floor(expected) + (uniform < expected - np.floor(expected)))
    draws = np.stack(draws)
    # (the rebuild of draw 0 is checked against the n_samples=1 output in the test above)
    assert (median >= draws.min(axis=0)).all()
    assert (median <= draws.max(axis=0)).all()
    # and it equals the NumPy median of the rebuilt draws (all but ties within float32 noise: >= 99%)
    assert (median == np.median(draws, axis=0)).mean() > 0.99


# ---------------------------------------------------------------- latent space / decoder


def test_logistic_normal_mean_converges(ln_model, adata):
    rows = np.arange(0, N_CELLS, 5)  # 40 cells
    got = ln_model.get_latent_representation(indices=rows, mc_samples=4000, seed=0)
    assert got.shape == (len(rows), N_LATENT)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    mean, var = ln_model.get_latent_representation(indices=rows, return_dist=True)
    rng = np.random.default_rng(0)
    z = mean[None] + np.sqrt(var)[None] * rng.standard_normal((20000, *mean.shape))
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    oracle = (e / e.sum(axis=-1, keepdims=True)).mean(axis=0)
    # MC standard error <= 0.5/sqrt(4000) + 0.5/sqrt(20000) < 0.012: 0.02 is a loose absolute bound
    np.testing.assert_allclose(got, oracle, atol=0.02)


def test_ln_single_draw_is_on_the_simplex(ln_model):
    one = ln_model.get_latent_representation(give_mean=False, seed=1)
    assert (one > 0).all()
    np.testing.assert_allclose(one.sum(axis=1), 1.0, atol=1e-5)


def test_normal_latent_give_mean_false_is_a_draw(model):
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(model.get_latent_representation(), mean, rtol=0, atol=0)
    draw = model.get_latent_representation(give_mean=False, seed=0)
    standardized = (draw - mean) / np.sqrt(var)
    # 800 standard normal values: mean within 0.2 (> 5 se), variance within [0.7, 1.3]
    assert abs(standardized.mean()) < 0.2
    assert 0.7 < standardized.var() < 1.3


@pytest.mark.parametrize("which", ["model", "ln_model"])
def test_decode_at_mean_ranges(which, request, adata):
    m = request.getfixturevalue(which)
    native = m.get_native_frequencies()
    noise = m.get_noise_ratio()
    assert native.shape == (N_CELLS, N_GENES) and noise.shape == (N_CELLS,)
    assert ((noise >= 0) & (noise <= 1)).all()
    assert (native >= 0).all()
    assert (native.sum(axis=1) <= 1 + 1e-6).all()  # row-normalised with an eps in the denominator
    # same as the functional core on the dense counts (rtol 1e-5: only chunking may differ)
    nf, nr = posterior.decode_at_mean(m.config, m.variables, jnp.asarray(dense_x(adata)))
    np.testing.assert_allclose(native, np.asarray(nf), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(noise, np.asarray(nr)[:, 0], rtol=1e-5, atol=1e-7)


def test_encode_variances_positive(model, adata):
    mean, var = model.get_latent_representation(return_dist=True)
    assert mean.shape == var.shape == (N_CELLS, N_LATENT)
    assert np.isfinite(mean).all()
    assert (var >= 1e-4).all()  # exp(.) + 1e-4
    m2, v2 = posterior.encode(model.config, model.variables, jnp.asarray(dense_x(adata)))
    assert (np.asarray(v2) >= 1e-4).all()
    np.testing.assert_allclose(var, np.asarray(v2), rtol=1e-5)
    np.testing.assert_allclose(mean, np.asarray(m2), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- ELBO


def test_elbo_identity(model, adata):
    elbo = model.get_elbo(return_mean=False, seed=3)
    rec_ll = model.get_reconstruction_error(return_mean=False, seed=3)["reconstruction_loss"]
    assert elbo.shape == rec_ll.shape == (N_CELLS,)
    neg_kl = elbo - rec_ll
    # elbo = rec_ll - KL with KL >= 0; absolute slack 1e-3 for float32 cancellation at |elbo| ~ 1e3
    assert (neg_kl <= 1e-3).all()
    # KL(N(m, v) || N(0, 1)) = 0.5 sum (v + m^2 - 1 - log v), from encode() in float64
    mean, var = (a.astype(np.float64) for a in model.get_latent_representation(return_dist=True))
    kl = 0.5 * (var + mean**2 - 1 - np.log(var)).sum(axis=1)
    np.testing.assert_allclose(-neg_kl, kl, rtol=1e-3, atol=2e-3)
    # means agree with the per-cell values (rtol 1e-6)
    assert model.get_elbo(seed=3) == pytest.approx(float(elbo.mean()), rel=1e-6)
    assert model.get_reconstruction_error(seed=3)["reconstruction_loss"] == pytest.approx(
        float(rec_ll.mean()), rel=1e-6
    )


def test_reconstruction_is_binomial_log_likelihood(model, adata):
    # log p(x | z) of the ambient mixture, rebuilt with scipy from the same z draw (seed 3)
    x = dense_x(adata)
    out = forward_eval(model, x, cell_keys(model, np.arange(N_CELLS), seed=3))
    eps = np.asarray(out.noise_ratio, np.float64)
    p = (1 - eps) * np.asarray(out.native_frequencies, np.float64) + eps * model.ambient_profile.astype(np.float64)
    p = np.clip(p, np.finfo(np.float32).eps, 1 - np.finfo(np.float32).eps)
    library = x.sum(axis=1, keepdims=True)
    oracle = scipy.stats.binom.logpmf(x, library, p).sum(axis=1)
    rec_ll = model.get_reconstruction_error(return_mean=False, seed=3)["reconstruction_loss"]
    np.testing.assert_allclose(rec_ll, oracle, rtol=1e-4)


def test_elbo_seed_matters_and_is_reproducible(model):
    a = model.get_elbo(return_mean=False, seed=0)
    np.testing.assert_array_equal(model.get_elbo(return_mean=False, seed=0), a)
    assert not np.array_equal(model.get_elbo(return_mean=False, seed=1), a)


def test_functional_elbo_terms_match_method(model, adata):
    x = dense_x(adata)
    rows = np.arange(N_CELLS)
    batch = Batch(jnp.asarray(x), jnp.asarray(x.sum(1, keepdims=True)), jnp.zeros(N_CELLS, jnp.int32))
    rec, kl = posterior.elbo_terms(
        model.config, model.variables, batch, jnp.asarray(model.ambient_profile), cell_keys(model, rows, seed=2)
    )
    np.testing.assert_allclose(
        model.get_elbo(return_mean=False, seed=2), -(np.asarray(rec) + np.asarray(kl)), rtol=1e-5
    )


# ---------------------------------------------------------------- count-preserving split


def native_share(model, x: np.ndarray, keys: jax.Array, draw: int) -> np.ndarray:
    """w = (1 - eps) phi / ((1 - eps) phi + eps a) (1 where eps a = 0), rebuilt in float64 from the functional core."""
    keys_s = jax.vmap(jax.random.fold_in, (0, None))(keys, draw)
    out = forward_eval(model, x, keys_s)
    eps = np.asarray(out.noise_ratio, np.float64)
    native = (1.0 - eps) * np.asarray(out.native_frequencies, np.float64)
    background = eps * np.asarray(model.ambient_profile, np.float64)[:1]
    return np.where(background > 0, native / np.where(background > 0, native + background, 1.0), 1.0)


def test_split_mean_is_the_observed_count_times_the_native_share(model, adata):
    x = dense_x(adata)
    keys = cell_keys(model, np.arange(N_CELLS), seed=0)
    got = model.get_denoised_counts(method="split_mean", seed=0, return_sparse=False)
    np.testing.assert_allclose(got, x * native_share(model, x, keys, draw=0), rtol=1e-4, atol=1e-5)


def test_split_draws_are_binomial_subsets_of_the_observed_counts(model, adata):
    x = dense_x(adata)
    got = model.get_denoised_counts(seed=0, method="split")
    assert sp.isspmatrix_csr(got)  # sparse in, sparse out
    den = got.toarray()
    assert np.array_equal(den, np.round(den)) and den.min() >= 0
    assert (den <= x).all() and (den[x == 0] == 0).all()
    assert np.array_equal(model.get_denoised_counts(seed=0, batch_size=7, method="split").toarray(), den)
    # unbiased: the total is within 5 sd of sum x w (binomial variance sum x w (1 - w))
    w = native_share(model, x, cell_keys(model, np.arange(N_CELLS), seed=0), draw=0)
    sd = np.sqrt((x * w * (1 - w)).sum())
    assert abs(den.sum() - (x * w).sum()) < 5 * sd
    median = model.get_denoised_counts(n_samples=4, seed=0, method="split").toarray()
    assert (median <= x).all() and np.array_equal(median, np.round(median))


# ---------------------------------------------------------------- marginal likelihood, expression, sampling


@pytest.fixture(scope="module")
def tiny_latent():
    """A 1-d latent model on low-count data: its exact marginal likelihood is a 1-d integral."""
    ad = simulate(n_cells=300, n_genes=10, library_size_mean=30, seed=0)
    scar_jax.SCAR.setup_anndata(ad)
    m = scar_jax.SCAR(ad, n_hidden=16, n_latent=1)
    m.train(max_epochs=150, enable_progress_bar=False)
    return ad, m


def exact_log_marginal(model, x: np.ndarray) -> np.ndarray:
    """log p(x) = log int p(x | z) N(z; 0, 1) dz by the trapezoid-free Riemann sum on a fine grid."""
    from scar_jax.vae import Outputs, likelihood

    net, v = model._net, model.variables
    xj = jnp.asarray(x)
    batch = Batch(xj, xj.sum(1, keepdims=True), jnp.zeros(len(x), jnp.int32))
    grid = jnp.linspace(-12.0, 12.0, 24001)  # spacing 1e-3; the posterior sd here is > 0.05

    def log_joint(z):
        zz = jnp.full((len(x), 1), z)
        phi, eps, zi = net.apply(v, zz, method="decode")
        out = Outputs(zz, zz, zz, phi, eps, zi, net.apply(v, method="dispersion"))
        return likelihood(model.config, out, batch, jnp.asarray(model.ambient_profile)).log_prob(xj).sum(-1)

    lp = jax.lax.map(log_joint, grid, batch_size=1000) + jax.scipy.stats.norm.logpdf(grid)[:, None]
    return np.asarray(jax.scipy.special.logsumexp(lp, axis=0) + jnp.log(grid[1] - grid[0]))


def test_marginal_ll_converges_to_the_exact_integral(tiny_latent):
    ad, model = tiny_latent
    rows = np.arange(6)
    exact = exact_log_marginal(model, dense_x(ad)[rows])
    estimate = model.get_marginal_ll(indices=rows, n_mc_samples=5000, return_mean=False)
    np.testing.assert_allclose(estimate, exact, atol=0.25)  # measured |error| <= 0.16 nats at 2000 samples
    # E_q[ELBO] <= log p(x): the ELBO averaged over 20 draws of z stays below the exact value
    elbo = np.mean([model.get_elbo(indices=rows, return_mean=False, seed=s) for s in range(20)], axis=0)
    assert (elbo <= exact + 0.05).all(), (elbo, exact)


def test_marginal_ll_is_above_the_elbo_and_grows_with_samples(tiny_latent):
    _, model = tiny_latent
    few = model.get_marginal_ll(n_mc_samples=5, return_mean=True)
    many = model.get_marginal_ll(n_mc_samples=500, return_mean=True)
    assert many >= few >= model.get_elbo() - 0.5
    # bounded memory: per-cell values do not depend on the chunk size
    np.testing.assert_allclose(
        model.get_marginal_ll(n_mc_samples=50, return_mean=False, batch_size=7),
        model.get_marginal_ll(n_mc_samples=50, return_mean=False),
        rtol=1e-5,
    )


def test_normalized_expression_rows_sum_to_library_size(model, adata):
    frame = model.get_normalized_expression(library_size=1e4, n_samples=3)
    assert list(frame.columns) == list(adata.var_names) and list(frame.index) == list(adata.obs_names)
    np.testing.assert_allclose(frame.to_numpy().sum(1), 1e4, rtol=1e-4)
    draws = model.get_normalized_expression(n_samples=4, return_mean=False)
    assert draws.shape == (4, N_CELLS, N_GENES)
    np.testing.assert_allclose(
        draws.mean(0), model.get_normalized_expression(n_samples=4, return_numpy=True), rtol=1e-4
    )
    latent = model.get_normalized_expression(library_size="latent", return_numpy=True)
    x = dense_x(adata)
    noise = model.get_noise_ratio()
    assert (latent.sum(1) <= x.sum(1) + 1e-2).all()  # expected native counts: N (1 - eps) sum phi
    # (one draw of z against the noise ratio at the mean of z: close, not equal; measured r = 0.98)
    assert np.corrcoef(latent.sum(1), x.sum(1) * (1 - noise))[0, 1] > 0.95
    genes = list(adata.var_names[:3])
    assert list(model.get_normalized_expression(gene_list=genes).columns) == genes
    overall = model.get_normalized_expression(n_samples_overall=50, return_numpy=True)
    assert overall.shape == (50, N_GENES)
    with pytest.raises(ValueError, match="gene_list"):
        model.get_normalized_expression(gene_list=["nope"])
    with pytest.raises(ValueError, match="transform_batch"):
        model.get_normalized_expression(transform_batch="nope")


def test_posterior_predictive_matches_the_likelihood_moments(model, adata):
    x = dense_x(adata)
    params = model.get_likelihood_parameters(give_mean=True)
    draws = model.posterior_predictive_sample(n_samples=1, seed=0)
    assert sp.isspmatrix_csr(draws) and draws.shape == x.shape
    many = model.posterior_predictive_sample(n_samples=30, seed=1)
    assert many.shape == (N_CELLS, N_GENES, 30)
    np.testing.assert_array_equal(many, np.round(many))
    assert (many <= x.sum(1)[:, None, None]).all()  # binomial: each gene's draw is at most the library
    # E[x_hat] = E_z[mean of p(x | z)]: the draws' average per gene matches the likelihood mean averaged over
    # 30 draws of z (two Monte Carlo estimates of the same expectation)
    mean_over_z = np.mean([model.get_likelihood_parameters(seed=s)["mean"] for s in range(30)], axis=0)
    per_gene_draws, per_gene_mean = many.mean(axis=(0, 2)), mean_over_z.mean(0)
    big = per_gene_mean > 1
    np.testing.assert_allclose(per_gene_draws[big], per_gene_mean[big], rtol=0.05)
    assert params["mean"].shape == x.shape
    assert set(params) == {"mean"}  # binomial: no dispersion or dropout


# ---------------------------------------------------------------- importance weights


@pytest.mark.parametrize("gene_likelihood", ["b", "poisson", "nb"])
def test_anchor_log_likelihood_equals_the_models_likelihood(model, adata, gene_likelihood):
    """The matrix-product forms (binomial, Poisson) and the per-draw form (NB) equal ``likelihood(...).log_prob``."""
    from scar_jax.vae import Outputs, likelihood

    m = copy.copy(model)
    m.config = dataclasses.replace(model.config, gene_likelihood=gene_likelihood)
    m._net = m.config.make_net()
    rows, anchors = np.arange(30), np.arange(5, 17)
    mean, var = m.get_latent_representation(indices=rows, return_dist=True)
    zs = (mean + np.sqrt(var) * np.random.default_rng(0).standard_normal(mean.shape)).astype(np.float32)
    cells, _ = m._cells(None, None)
    got = analysis.anchor_log_likelihood(m.config, m.variables, m.ambient_profile, cells, anchors, zs)  # (30, 12)
    x = jnp.asarray(dense_x(adata)[anchors])
    batch = Batch(x, jnp.asarray(cells.library[anchors], jnp.float32), jnp.zeros(len(anchors), jnp.int32))
    want = np.empty_like(got)
    for k, z in enumerate(zs):
        zz = jnp.repeat(jnp.asarray(z)[None], len(anchors), 0)
        phi, eps, zi = m._net.apply(m.variables, zz, method="decode")
        out = Outputs(zz, zz, zz, phi, eps, zi, m._net.apply(m.variables, method="dispersion"))
        want[k] = likelihood(m.config, out, batch, jnp.asarray(m.ambient_profile)).log_prob(x).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 sums of ~1e3 nats: measured <= 1.3e-6 relative


def test_importance_weights_recover_the_exact_aggregate_posterior(tiny_latent):
    """Weighted draws of q estimate moments of (1/A) sum_a p(z | x_a), computed exactly on a grid (1-d z).

    The encoder's q is narrower than the true posterior for some cells (sd 0.46 vs 1.28), so the unweighted
    draws are biased; the self-normalised importance weights correct them.
    """
    ad, model = tiny_latent
    rows = np.arange(60)
    x = dense_x(ad)[rows]
    # exact posterior of each cell on a grid: log p(x | z) + log N(z; 0, 1)
    from scar_jax.vae import Outputs, likelihood

    net, v, xj = model._net, model.variables, jnp.asarray(x)
    batch = Batch(xj, xj.sum(1, keepdims=True), jnp.zeros(len(x), jnp.int32))
    grid = jnp.linspace(-12.0, 12.0, 24001)

    def log_joint(z):
        zz = jnp.full((len(x), 1), z)
        phi, eps, zi = net.apply(v, zz, method="decode")
        out = Outputs(zz, zz, zz, phi, eps, zi, net.apply(v, method="dispersion"))
        return likelihood(model.config, out, batch, jnp.asarray(model.ambient_profile)).log_prob(xj).sum(-1)

    lp = np.asarray(jax.lax.map(log_joint, grid, batch_size=1000) + jax.scipy.stats.norm.logpdf(grid)[:, None])
    post = np.exp(lp - lp.max(0))
    post /= post.sum(0)
    g = np.asarray(grid)[:, None]
    exact = np.array([(post * g).sum(0).mean(), (post * g**2).sum(0).mean()])
    mean, var = model.get_latent_representation(indices=rows, return_dist=True)
    zs = mean[None] + np.sqrt(var)[None] * np.random.default_rng(1).standard_normal((1000, *mean.shape))
    w = model.get_importance_weights(indices=rows, zs=zs.astype(np.float32), n_mc_samples=2000, seed=0)
    assert w.shape == (1000 * 60,) and (w >= 0).all() and abs(w.sum() - 1) < 1e-5
    z = zs.reshape(-1)
    weighted = np.array([(w * z).sum(), (w * z**2).sum()])
    uniform = np.array([z.mean(), (z**2).mean()])
    # measured: exact (-0.048, 3.26), weighted (-0.072, 3.22), uniform (-0.299, 2.59)
    assert (np.abs(weighted - exact) <= np.array([0.08, 0.25])).all(), (weighted, exact)
    assert (np.abs(weighted - exact) < 0.5 * np.abs(uniform - exact)).all(), (weighted, uniform, exact)
    # seeded: the same call gives the same weights; the anchors are a seeded subset when max_cells < n_cells
    again = model.get_importance_weights(indices=rows, zs=zs[:2].astype(np.float32), n_mc_samples=50, seed=3)
    np.testing.assert_array_equal(
        again, model.get_importance_weights(indices=rows, zs=zs[:2].astype(np.float32), n_mc_samples=50, seed=3)
    )
    few = model.get_importance_weights(indices=rows, zs=zs[:2].astype(np.float32), max_cells=10, n_mc_samples=50)
    assert few.shape == (120,) and abs(few.sum() - 1) < 1e-5


def test_importance_weighted_expression_and_de(model, adata):
    frame = model.get_normalized_expression(
        indices=np.arange(50),
        n_samples=2,
        n_samples_overall=300,
        weights="importance",
        library_size=1e4,
        n_mc_samples=20,
        seed=0,
    )
    assert frame.shape == (300, N_GENES)
    np.testing.assert_allclose(frame.to_numpy().sum(1), 1e4, rtol=1e-4)
    with pytest.raises(TypeError, match="get_importance_weights"):
        model.get_normalized_expression(indices=np.arange(5), weights="importance", n_samples_overall=5, foo=1)
    de = model.differential_expression(
        groupby="cell_type",
        group1="type_0",
        group2="type_1",
        weights="importance",
        importance_weighting_kwargs={"n_mc_samples": 10, "max_cells": 32},
        n_samples_overall=500,
        silent=True,
    )
    assert len(de) == N_GENES and np.isfinite(de["bayes_factor"]).all()
    with pytest.raises(TypeError, match="importance_weighting_kwargs"):
        model.differential_expression(
            groupby="cell_type", group1="type_0", weights="importance", importance_weighting_kwargs={"bad": 1}
        )


def test_binomial_split_on_the_host_is_per_cell_and_unbiased():
    """``binomial_split``: integer draws in [0, x] at the stored counts, each cell from its own stream (the same
    whichever other cells are split with it), with mean x * w (checked against 5 binomial standard deviations)."""
    rng = np.random.default_rng(0)
    x = sp.random(300, 50, density=0.3, random_state=1, format="csr", data_rvs=lambda n: rng.integers(1, 40, n))
    x = x.astype(np.float32)
    x.sort_indices()
    share = x.copy()
    share.data = rng.uniform(0.0, 1.0, x.nnz).astype(np.float32)
    cells = np.arange(1000, 1300)
    draws = posterior.binomial_split(x, share, cells, seed=7, draw=0)
    assert draws.shape == (x.nnz,) and (draws >= 0).all() and (draws <= x.data).all()
    assert np.array_equal(draws, np.round(draws))
    np.testing.assert_array_equal(draws, posterior.binomial_split(x, share, cells, seed=7, draw=0))
    sub = x[10:20]  # the same cells alone give the same draws
    np.testing.assert_array_equal(
        posterior.binomial_split(sub, share[10:20], cells[10:20], seed=7, draw=0), draws[x.indptr[10] : x.indptr[20]]
    )
    assert not np.array_equal(draws, posterior.binomial_split(x, share, cells, seed=8, draw=0))
    mean, var = (x.data * share.data).sum(), (x.data * share.data * (1 - share.data)).sum()
    assert abs(draws.sum() - mean) < 5 * np.sqrt(var)
    with pytest.raises(ValueError, match="sparsity pattern"):
        posterior.binomial_split(x, share[:, :-1], cells, seed=7, draw=0)


def test_split_denoising_matches_the_device_shares(model, adata):
    """The model's split draws Binomial(x, w) with w from native_share_at_counts: its mean over many seeds
    approaches split_mean (x * w, the same z draw), and it does not depend on batch_size."""
    a = model.get_denoised_counts(seed=3, method="split").toarray()
    np.testing.assert_array_equal(a, model.get_denoised_counts(seed=3, batch_size=17, method="split").toarray())
    x = dense_x(adata)
    assert (a <= x).all() and ((a > 0) <= (x > 0)).all()
    mean = np.mean([model.get_denoised_counts(seed=s, method="split").toarray().sum() for s in range(20)])
    expected = model.get_denoised_counts(method="split_mean").sum()
    assert abs(mean - expected) / expected < 0.01
