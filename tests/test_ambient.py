"""Ambient profile from raw droplets: multinomial scores, recovery of simulated truth, batches, real data."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

from scar_jax import SCAR
from scar_jax.ambient import (
    estimate_ambient_profile,
    multinomial_log_prob,
    posterior_profile,
    prior_strength,
    rank_threshold,
)
from scar_jax.datasets import raw_droplets, simulate, simulate_empty_droplets

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CITESEQ = SHARED / "dsb_citeseq_87adt_cells_and_empty.h5ad"
PBMC = SHARED / "pbmc4k_soupx_filtered_with_soup.h5ad"


def test_multinomial_log_prob_matches_scipy():
    rng = np.random.default_rng(0)
    profile = rng.dirichlet(np.ones(12))
    x = rng.poisson(2.0, size=(30, 12))
    x[3] = 0  # an empty droplet: log p = 0
    expected = [scipy.stats.multinomial.logpmf(row, row.sum(), profile) for row in x]
    got = multinomial_log_prob(sp.csr_matrix(x), profile, chunk_size=7)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_zero_probability_genes_are_clamped_like_torch():
    profile = np.array([0.5, 0.5, 0.0])
    x = sp.csr_matrix(np.array([[1, 1, 1]]))
    # log 3! + 2 log 0.5 + log(float32 eps)
    expected = np.log(6) + 2 * np.log(0.5) + np.log(float(np.finfo(np.float32).eps))
    np.testing.assert_allclose(multinomial_log_prob(x, profile), [expected], rtol=1e-12)


@pytest.fixture(scope="module")
def droplets():
    cells = simulate(n_cells=1000, n_genes=300, n_batches=2, seed=2)
    empty = simulate_empty_droplets(cells, n_droplets=20000, library_size_mean=100, seed=3)
    return cells, raw_droplets(cells, empty)


def test_recovers_the_simulated_ambient_profile(droplets):
    cells, raw = droplets
    cells = cells[cells.obs["batch"] == "batch_0"].copy()
    raw = raw[raw.obs["batch"] == "batch_0"].copy()
    profile = SCAR.get_ambient_profile(cells, raw, prob=0.3)
    truth = cells.varm["true_ambient_profile"][:, 0]
    assert profile.shape == (300, 1) and np.isclose(profile.sum(), 1.0)
    l1 = np.abs(profile[:, 0] - truth).sum()
    cells_mean = np.asarray(cells.X.sum(0)).ravel() / cells.X.sum()
    assert l1 < 0.03, l1  # measured 0.015; the mean profile of the cells is 0.07 away
    assert l1 < 0.5 * np.abs(cells_mean - truth).sum()
    np.testing.assert_array_equal(cells.varm["ambient_profile"], profile)


def test_per_batch_profiles_from_each_batch_s_droplets(droplets):
    cells, raw = droplets
    cells = cells.copy()
    SCAR.setup_anndata(cells, batch_key="batch")
    profile = SCAR.get_ambient_profile(cells, raw, prob=0.3)
    truth = cells.varm["true_ambient_profile"]
    assert profile.shape == (300, 2)
    for b in range(2):
        own = np.abs(profile[:, b] - truth[:, b]).sum()
        other = np.abs(profile[:, b] - truth[:, 1 - b]).sum()
        assert own < 0.04 and own < 0.5 * other, (b, own, other)


def test_genes_are_matched_by_name_and_droplet_sample_is_seeded(droplets):
    cells, raw = droplets
    shuffled = raw[:, np.random.default_rng(0).permutation(raw.n_vars)].copy()
    a = SCAR.get_ambient_profile(cells.copy(), raw, prob=0.3, batch_key=None, sample=5000, seed=1)
    b = SCAR.get_ambient_profile(cells.copy(), shuffled, prob=0.3, batch_key=None, sample=5000, seed=1)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    c = SCAR.get_ambient_profile(cells.copy(), raw, prob=0.3, batch_key=None, sample=5000, seed=2)
    assert not np.allclose(a, c)


def test_errors(droplets):
    cells, raw = droplets
    with pytest.raises(ValueError, match="lower prob"):
        SCAR.get_ambient_profile(cells.copy(), raw, prob=0.999999)
    with pytest.raises(ValueError, match="not in raw_adata.var_names"):
        SCAR.get_ambient_profile(cells.copy(), raw[:, :100].copy(), prob=0.3)
    with pytest.raises(ValueError, match="prob"):
        estimate_ambient_profile(raw.X, prob=1.5)
    only_b0 = raw[raw.obs["batch"] == "batch_0"].copy()
    with pytest.raises(ValueError, match="no droplets of batch"):
        SCAR.get_ambient_profile(cells.copy(), only_b0, prob=0.3, batch_key="batch")


def test_does_not_densify_and_leaves_raw_unchanged(droplets):
    cells, raw = droplets
    before = raw.X.copy()
    estimate = estimate_ambient_profile(raw.X, prob=0.3, chunk_size=1000)
    assert (raw.X != before).nnz == 0
    assert estimate.cell_free.sum() > 15000  # most of the 20,000 empty droplets
    is_cell = raw.obs["is_cell"].to_numpy()[estimate.droplets]
    assert not estimate.cell_free[is_cell].any()  # no real cell is called cell-free


@pytest.mark.skipif(not CITESEQ.exists(), reason="shared CITE-seq data not available")
def test_real_citeseq_per_lane_profiles_and_isotype_controls_reduced():
    adt = ad.read_h5ad(CITESEQ)
    cells = adt[adt.obs["droplet"] == "cell"].copy()
    SCAR.setup_anndata(cells, batch_key="lane")
    # The threshold is n_features * log(prob): with 87 ADTs and ~500 counts per empty droplet the reference's
    # prob=0.995 (-0.44) calls nothing cell-free; prob=0.01 (-400) separates empties (median -235) from cells
    # (median -2082, 99th percentile -658), measured on this file.
    profile = SCAR.get_ambient_profile(cells, adt, prob=0.01, batch_key="lane")
    lanes = cells.obs["lane"].astype("category").cat.categories
    assert profile.shape == (cells.n_vars, len(lanes))
    np.testing.assert_allclose(profile.sum(0), 1.0, rtol=1e-10)
    isotype = cells.var["isotype_control"].to_numpy().astype(bool)
    # isotype controls are enriched in empty droplets (0.51% of their counts vs 0.10% in cells)
    assert profile[isotype].sum(0).mean() > 2 * cells.X[:, isotype].sum() / cells.X.sum()
    model = SCAR(cells, ambient_profile="ambient_profile", n_latent=10, sparsity=1.0)
    model.train(max_epochs=20, enable_progress_bar=False)  # 20 epochs keep 5.8% of the isotype counts, 82.7% of all
    denoised = model.get_denoised_counts()
    raw_iso = cells.X[:, isotype].sum()
    kept = denoised[:, isotype].sum() / raw_iso
    assert kept < 0.5, kept  # isotype-control counts are ambient: most are removed (measured in README)
    assert denoised.sum() / cells.X.sum() > 0.5


def test_prior_strength_is_the_good_turing_missing_mass():
    counts = np.array([1.0, 1.0, 2.0, 0.0, 0.0, 5.0])  # C = 9, two genes seen once: M = 2/9
    assert prior_strength(counts) == pytest.approx(9 * (2 / 9) / (1 - 2 / 9), rel=1e-12)  # alpha0 = C M / (1 - M)
    assert prior_strength(np.array([2.0, 3.0, 0.0])) == 0.0  # nothing seen once: nothing is missing
    assert prior_strength(np.array([1.0, 2.0, 4.0])) == 0.0  # no unseen gene
    # against the truth: a multinomial sample of a heavy-tailed profile (log-normal, sd 2), 20,000 draws
    rng = np.random.default_rng(5)
    truth = rng.lognormal(0.0, 2.0, 20_000)
    truth /= truth.sum()
    sample = rng.multinomial(20_000, truth).astype(float)
    profile, alpha = posterior_profile(sample, np.ones(sample.size))
    unseen = sample == 0
    assert unseen.mean() > 0.3
    assert profile[unseen].sum() == pytest.approx(truth[unseen].sum(), rel=0.1)  # measured 3% apart


def test_posterior_profile_is_the_dirichlet_posterior_mean():
    counts, prior_mean = np.array([5.0, 0.0, 3.0, 0.0, 0.0]), np.array([0.4, 0.1, 0.2, 0.3, 0.0])
    profile, alpha = posterior_profile(counts, prior_mean, 2.0)
    # (c + 2 m') / (8 + 2), m' = the prior mean on the unseen genes renormalised there: (0.25, 0.75, 0)
    np.testing.assert_allclose(profile, [5 / 10, 0.5 / 10, 3 / 10, 1.5 / 10, 0.0], rtol=1e-12)
    assert alpha == 2.0
    np.testing.assert_allclose(posterior_profile(counts, prior_mean, 0.0)[0], counts / 8.0)  # the reference's
    auto, alpha = posterior_profile(np.array([1.0, 0.0, 3.0, 0.0]), np.array([0.2, 0.3, 0.5, 0.0]))
    assert alpha == pytest.approx(prior_strength(np.array([1.0, 0.0, 3.0, 0.0])))
    assert auto[1] > 0 and auto[3] == 0  # zero only where no droplet saw the gene


def test_rank_rule_finds_the_cliff_between_cells_and_cell_free_droplets(droplets):
    cells, raw = droplets
    totals = np.asarray(raw.X.sum(1)).ravel()
    threshold = rank_threshold(totals)
    is_cell = raw.obs["is_cell"].to_numpy()
    assert (totals[is_cell] >= threshold).mean() > 0.99  # measured: 1.0
    estimate = estimate_ambient_profile(raw.X)  # prob=None: the rank rule
    assert estimate.threshold == threshold
    assert estimate.cell_free[is_cell[estimate.droplets]].mean() < 0.01  # a few of the smallest cells (0.2%)
    assert estimate.cell_free[~is_cell[estimate.droplets]].mean() > 0.99
    # it works where the reference's threshold does not: 400 genes (the quick start), prob=0.995 finds nothing
    small = simulate(n_cells=1500, n_genes=400, seed=0)
    small_raw = raw_droplets(small, simulate_empty_droplets(small, seed=1))
    with pytest.raises(ValueError, match="lower prob"):
        estimate_ambient_profile(small_raw.X, prob=0.995)
    profile = SCAR.get_ambient_profile(small, small_raw)[:, 0]
    truth = small.varm["true_ambient_profile"][:, 0]
    assert np.abs(profile - truth).sum() < 0.1


def test_prob_zero_takes_every_droplet_and_bad_prob_is_refused(droplets):
    _, raw = droplets
    estimate = estimate_ambient_profile(raw.X, prob=0.0, prior_counts=0)
    assert estimate.cell_free.all()  # the reference's -inf threshold
    for bad in (-0.1, 1.0, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="prob"):
            estimate_ambient_profile(raw.X, prob=bad)
    with pytest.raises(ValueError, match="prior_counts"):
        estimate_ambient_profile(raw.X, prior_counts=-1)


@pytest.mark.skipif(not PBMC.exists(), reason="shared PBMC data not available")
def test_real_pbmc_rank_threshold_and_shallow_soup():
    pbmc = ad.read_h5ad(PBMC)
    threshold = rank_threshold(np.asarray(pbmc.uns["nDropUMIs"]))
    # all 272,442 raw barcodes: the cut sits below every filtered cell and above SoupX's soup range (<= 100 UMIs)
    assert 100 < threshold < pbmc.X.sum(1).min(), threshold
    soup = pbmc.var["soup_counts"].to_numpy().astype(float)
    shallow = np.random.default_rng(0).multinomial(50_000, soup / soup.sum()).astype(float)
    cells = np.asarray(pbmc.X.sum(0)).ravel().astype(float)
    unseen = shallow == 0
    assert cells[unseen].sum() / cells.sum() > 0.05  # the trap: 5.5% of the cells' counts on genes the soup missed
    profile, _ = posterior_profile(shallow, cells / cells.sum())
    assert (profile[cells > 0] > 0).all()
    full = soup / soup.sum()
    assert profile[unseen].sum() == pytest.approx(full[unseen].sum(), rel=0.05)  # Good-Turing 0.054, soup 0.055
    assert np.abs(profile - full).sum() < np.abs(shallow / shallow.sum() - full).sum()


@pytest.mark.skipif(not CITESEQ.exists(), reason="shared CITE-seq data not available")
def test_real_citeseq_rank_rule_without_prob():
    adt = ad.read_h5ad(CITESEQ)
    estimate = estimate_ambient_profile(adt.X)  # 87 ADTs: the reference's rule needs prob=0.01 here
    is_cell = (adt.obs["droplet"] == "cell").to_numpy()[estimate.droplets]
    assert estimate.cell_free[~is_cell].mean() > 0.95 and estimate.cell_free[is_cell].mean() < 0.05  # 98.3%, 3.1%
    isotype = adt.var["isotype_control"].to_numpy().astype(bool)
    cells = adt.X[(adt.obs["droplet"] == "cell").to_numpy()]
    # isotype controls: 0.10% of the cells' counts, 0.51% of the empty droplets'; the profile has 0.52%
    assert estimate.profile[isotype].sum() > 4 * cells[:, isotype].sum() / cells.sum()
