"""SCAR on real PBMC data with a real ambient profile: lineage markers are cleaned outside, kept inside.

Data: 10x pbmc4k (2,170 filtered cells) with the ambient profile SoupX estimated from ~267k real empty droplets
(``shared/data/SOURCES.md``); skipped when the shared data are absent. ``benchmarks/real_pbmc.py`` prints the
full table (also for the ``"expected"`` reference method and for other settings).

Settings (chosen to run in about a minute on 2 CPU cores): genes detected in >= 400 cells plus the markers
(1,914 genes; the dropped genes carry 15.7% of the soup, the profile is renormalised on the kept genes),
binomial likelihood, softplus_sp, **sparsity 0.6**, 150 epochs, batch 128, seed 0 (about 40 s on 2 idle
cores). The scvi-tools default ``sparsity=0.9`` fails on these data: the mean noise ratio stays far above the
soup's ~0.06 (0.42 after 150 epochs, 0.28 after the default 400), and the split then keeps only 86% of the
in-lineage LYZ/S100A8/S100A9 and 78-87% of the in-lineage CD3E counts (``benchmarks/real_pbmc.py --sparsity 0.9
--epochs 400``). The scAR authors recommend 0.6-0.7 for a few thousand genes (Novartis/scar#59).

Measured with these settings (seeds 0 / 1 / 2, split method; mean noise ratio 0.070 / 0.071 / 0.069):

==================  ==================  ===================  ====================================
marker group        removed outside     kept inside          soup-implied share (outside / inside)
==================  ==================  ===================  ====================================
LYZ,S100A8,S100A9   96.1 / 96.3 / 97.9  96.7 / 97.4 / 96.7   100% / 2.1%  (outside: T, B, NK)
IGKC,CD79A          61.9 / 64.0 / 64.6  99.2 / 99.3 / 99.1   68% / 0.9%   (outside: T, NK, MNP)
CD3E                59.0 / 56.5 / 49.1  96.0 / 96.2 / 95.8   55% / 3.5%   (outside: B, MNP; NK excluded)
==================  ==================  ===================  ====================================

"Soup-implied share" is the share of the raw counts that the contamination implied by the soup explains (5.8%, a
SoupX-style marker estimate from LYZ/S100A8/S100A9 in T, B and NK cells, an upper bound). Outside B cells and T cells
the rest of the marker counts is not ambient (doublets, real expression), so removing ~2/3 and ~1/2 of them is
what a correct removal does. Inside, a correct removal keeps ~96.5% of CD3E: the 95% floor is close to the
physical limit there. HBB has no counts at all in these cells (0 outside, no own lineage), so only that is tested.

Calibrated denoising (the default, ``method="calibrated"``, ``n_neighbours=50``, knob 0.1; figures for seeds 0-2
beside ``CAL_MIN_REMOVED_OUT``): it keeps more inside than the split (97.8-98.1% of the in-lineage MNP markers,
i.e. all that a correct removal keeps) and removes less outside (80.6-85.8%). Its mean noise ratio is 0.058-0.060,
at the soup's 0.058. The iteration starts at a noise ratio of 0.01 (``calibration.START_NOISE_RATIO``): started
from the model's own 0.35 at ``sparsity=0.9`` it reached a wrong fixed point (0.74; kept inside 77 / 90 / 58%).

NK cells are excluded for CD3E: they carry CD3E at ~80-90% of the T-cell level per UMI, ~25x what the soup
explains, so their counts are native (NK cells transcribe CD3E; the cluster holds NKT-like cells) and belong to
neither side.
"""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

anndata = pytest.importorskip("anndata")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc4k_soupx_filtered_with_soup.h5ad"

pytestmark = pytest.mark.skipif(not DATA.is_file(), reason=f"shared real data not found: {DATA}")

MIN_CELLS, SPARSITY, EPOCHS, SEED = 400, 0.6, 150, 0

# marker genes, own lineage, cell types excluded from both sides ("?" is always excluded)
GROUPS = {
    "MNP": (["LYZ", "S100A8", "S100A9"], {"MNP"}, set()),
    "B": (["IGKC", "CD79A"], {"B"}, set()),
    "T": (["CD3E"], {"T_CD4", "T_CD8"}, {"NK"}),
}
# minimum fraction removed outside the lineage: a few points below the lowest of seeds 0-2 (see the docstring)
MIN_REMOVED_OUT = {"MNP": 0.93, "B": 0.55, "T": 0.45}
MIN_KEPT_IN = 0.95  # the criterion


@pytest.fixture(scope="module")
def pbmc():
    from scar_jax import SCAR

    adata = anndata.read_h5ad(DATA)
    markers = [g for genes, _, _ in GROUPS.values() for g in genes] + ["HBB"]
    detected = np.diff(sp.csc_matrix(adata.X).indptr)
    keep = (detected >= MIN_CELLS) | adata.var_names.isin(markers)
    soup = adata.var["soup_est"].to_numpy(np.float64)[keep]
    adata = adata[:, keep].copy()
    adata.X = sp.csr_matrix(adata.X)
    SCAR.setup_anndata(adata)
    model = SCAR(adata, ambient_profile=soup / soup.sum(), sparsity=SPARSITY, seed=SEED)
    model.train(max_epochs=EPOCHS, enable_progress_bar=False)
    return adata, model, model.get_denoised_counts(method="split")


def _in_out(adata, denoised, group):
    """Raw and denoised counts of a marker group outside and inside its lineage."""
    genes, own, excluded = GROUPS[group]
    labels = adata.obs["Annotation"].astype(str).to_numpy()
    cols = [adata.var_names.get_loc(g) for g in genes]
    raw = np.asarray(adata.X[:, cols].sum(axis=1)).ravel()
    den = np.asarray(denoised[:, cols].sum(axis=1)).ravel()
    usable = (labels != "?") & ~np.isin(labels, list(excluded))
    inside = usable & np.isin(labels, list(own))
    outside = usable & ~inside
    return raw[outside].sum(), den[outside].sum(), raw[inside].sum(), den[inside].sum()


def test_split_is_count_preserving(pbmc):
    adata, _, denoised = pbmc
    assert sp.issparse(denoised) and denoised.shape == adata.shape
    assert denoised.min() >= 0
    assert ((denoised - adata.X) > 0).nnz == 0  # never above the observed count
    assert ((denoised != 0) > (adata.X != 0)).nnz == 0  # zeros stay zero


@pytest.mark.parametrize("group", list(GROUPS))
def test_markers_kept_inside_their_lineage(pbmc, group):
    adata, _, denoised = pbmc
    _, _, raw_in, den_in = _in_out(adata, denoised, group)
    assert raw_in > 1000
    assert den_in / raw_in >= MIN_KEPT_IN, f"{group}: kept {den_in / raw_in:.3f} of in-lineage counts"


@pytest.mark.parametrize("group", list(GROUPS))
def test_markers_removed_outside_their_lineage(pbmc, group):
    adata, _, denoised = pbmc
    raw_out, den_out, _, _ = _in_out(adata, denoised, group)
    assert raw_out > 100
    removed = 1 - den_out / raw_out
    assert removed >= MIN_REMOVED_OUT[group], f"{group}: removed {removed:.3f} of out-of-lineage counts"


def test_hbb_absent_from_cells(pbmc):
    """HBB is in the soup (1.5e-6) but has no counts in these cells: nothing to remove, nothing created."""
    adata, _, denoised = pbmc
    j = adata.var_names.get_loc("HBB")
    assert adata.X[:, j].sum() == 0 and denoised[:, j].sum() == 0


def test_noise_ratio_near_soup_estimate(pbmc):
    """Mean noise ratio ~0.07 (seeds 0-2: 0.069-0.071) vs 0.060 implied by the soup (an upper bound)."""
    _, model, _ = pbmc
    noise = model.get_noise_ratio()
    assert 0.03 <= noise.mean() <= 0.12


# method="calibrated" (the default; knob 0.1, count-checked neighbourhoods), seeds 0 / 1 / 2 on 2 CPU cores
# (2026-12-05, ``benchmarks/real_pbmc.py --calibrated --odds 0.1 --seed S``): removed outside / kept inside
#   MNP 80.6 / 85.8 / 85.2  |  97.78 / 98.01 / 98.09   (soup explains 100% outside, 2.1% inside)
#   B   53.8 / 53.9 / 57.3  |  99.49 / 99.22 / 99.33   (68% / 0.9%)
#   T   46.0 / 51.6 / 49.1  |  97.18 / 96.57 / 97.03   (55% / 3.5%)
# The same code and seed differ across machines (XLA's CPU code changes the fit: T 43.5% removed for seed 0 on the
# project's CI machine), so the floors sit 6 points below the worst seed. Inside, issue 19's restated criterion:
# keep at least 99% of what a correct removal keeps, kept / (1 - soup_in) >= 0.99 (seeds: >= 0.9992 for every
# group); a kept share of 0.99 itself is not what a correct removal does where the soup explains 2-3.5%.
CAL_MIN_REMOVED_OUT = {"MNP": 0.74, "B": 0.47, "T": 0.40}
CAL_MIN_KEPT_OF_NATIVE = 0.99


def _soup_in(adata, group):
    """Share of the in-lineage raw counts the soup-implied contamination explains (``benchmarks/real_pbmc.py``)."""
    genes, own, _ = GROUPS[group]
    labels = adata.obs["Annotation"].astype(str).to_numpy()
    soup = adata.var["soup_est"].to_numpy(np.float64)  # the scale cancels
    cols = [adata.var_names.get_loc(g) for g in genes]
    mnp = [adata.var_names.get_loc(g) for g in GROUPS["MNP"][0]]
    lymphoid = np.isin(labels, ["T_CD4", "T_CD8", "B", "NK"])
    rho = adata.X[lymphoid][:, mnp].sum() / (adata.X[lymphoid].sum() * soup[mnp].sum())
    inside = np.isin(labels, list(own))
    return rho * adata.X[inside].sum() * soup[cols].sum() / adata.X[inside][:, cols].sum()


@pytest.fixture(scope="module")
def calibrated(pbmc):
    """The calibrated denoising (default knob) and noise ratio of the module's fit."""
    _, model, _ = pbmc
    denoised = model.get_denoised_counts(method="calibrated", n_neighbours=50)
    return denoised, model.get_noise_ratio(calibrated=True, n_neighbours=50)


@pytest.mark.slow
def test_calibrated_is_count_preserving(pbmc, calibrated):
    adata = pbmc[0]
    denoised, _ = calibrated
    assert sp.issparse(denoised) and denoised.shape == adata.shape and denoised.min() >= 0
    assert ((denoised - adata.X) > 0).nnz == 0
    assert ((denoised != 0) > (adata.X != 0)).nnz == 0


@pytest.mark.slow
@pytest.mark.parametrize("group", list(GROUPS))
def test_calibrated_markers(pbmc, calibrated, group):
    """Outside removal and inside retention of the calibrated split; inside it keeps at least what the split keeps."""
    adata, _, split = pbmc
    denoised, _ = calibrated
    raw_out, den_out, raw_in, den_in = _in_out(adata, denoised, group)
    removed, kept = 1 - den_out / raw_out, den_in / raw_in
    assert removed >= CAL_MIN_REMOVED_OUT[group], f"{group}: removed {removed:.3f} outside"
    native = 1 - _soup_in(adata, group)
    assert kept / native >= CAL_MIN_KEPT_OF_NATIVE, f"{group}: kept {kept:.4f} inside, {kept / native:.4f} of native"
    _, _, _, split_in = _in_out(adata, split, group)
    assert kept >= split_in / raw_in  # seeds 0-2: 0.5-1.5 points above the split


@pytest.mark.slow
def test_calibrated_noise_ratio(calibrated):
    """Calibrated mean noise ratio 0.058-0.060 (seeds 0-2) against 0.058 implied by the soup (an upper bound)."""
    _, noise = calibrated
    assert 0.04 <= noise.mean() <= 0.09, noise.mean()


@pytest.mark.slow
def test_calibrated_with_all_genes_and_the_soup_as_given(pbmc, calibrated):
    """Issue 19: every gene of the file (33,694; the soup is 0 on 18,181 of them) and the latent space of the
    module's fit, on every third cell. Without the estimating genes (``MIN_EXPECTED_POOLED_COUNT``) the thousands of
    rare genes drove the noise ratio to a spurious 0.68 (all cells), keeping 84 / 89 / 53% inside the lineages.
    Here it stays near the 1,914-gene figure and the markers keep what a correct removal keeps."""
    from scar_jax.calibration import calibrate

    adata, model, _ = pbmc
    cells = np.arange(0, adata.n_obs, 3)
    full = anndata.read_h5ad(DATA)[adata.obs_names[cells]].copy()
    full.X = sp.csr_matrix(full.X)
    soup = full.var["soup_est"].to_numpy(np.float64)
    latent = model.get_latent_representation(indices=cells)
    noise_all, share = calibrate(full.X, latent, soup / soup.sum(), share_at="observed")
    noise_kept = calibrated[1]  # the 1,914 genes, all cells
    # measured 0.064 against 0.058 (0.057 on these cells with 1,914 genes); the trap was 10x
    assert 0.8 <= noise_all.mean() / noise_kept.mean() <= 1.25, (noise_all.mean(), noise_kept.mean())
    denoised = full.X.multiply(share).tocsr()  # the split's expectation
    for group in GROUPS:
        _, _, raw_in, den_in = _in_out(full, denoised, group)
        native = 1 - _soup_in(full, group)
        assert den_in / raw_in / native >= CAL_MIN_KEPT_OF_NATIVE, (group, den_in / raw_in, native)
