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

Calibrated denoising (issue 10; ``method="calibrated"``, ``n_neighbours=50``, ``expressed_prior_odds=1``, same fit,
seed 0; ``benchmarks/real_pbmc.py --calibrated``): removed outside / kept inside MNP 88.7% / 97.16%, B 66.2% /
98.96%, CD3E 58.4% / 96.23% (split: 96.4 / 96.60, 60.6 / 98.89, 60.9 / 95.85), calibrated mean noise ratio 0.071
(model 0.068). ``expressed_prior_odds=0.1`` gives the same figures to 0.1 point here. Inside the lineage the soup
explains 2.1% (MNP) and 3.5% (CD3E) of the counts, so keeping >= 99% there is not what a correct removal does.
The iteration starts at a noise ratio of 0.01 (``calibration.START_NOISE_RATIO``): started from the model's own
0.35 at ``sparsity=0.9`` it reached a wrong fixed point (0.74; kept inside 77 / 90 / 58%); from 0.01 that fit gives
0.072 and 90.5 / 97.2, 61.5 / 99.3, 50.3 / 96.5.

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


# method="calibrated" (issue 10), seed 0: removed outside / kept inside 88.7 / 97.16, 66.2 / 98.96, 58.4 / 96.23
# CD3E outside T cells: 58.4% removed when measured first (2026-11-25), 49.7% on 2026-12-03 with the same code and
# package versions on another machine (floating-point differences of XLA's CPU code change the fit; MNP 87.3%,
# B 65.4% there): the floor for T is the split's (seeds 0-2 removed 49-59%). Cosine neighbourhoods (the default
# since 2026-12-03; the figures above are Euclidean), same machine: MNP 87.2 / 97.75, B 61.7 / 99.16, T 52.8 / 96.38.
# B: 0.555 measured on another machine (issue 19) and here on 2026-12-05 with the soup's zeros honoured (the counts of
# genes the soup never saw are kept); floor 0.50. Still to do (issue 19): floors from three seeds with a stated margin.
CAL_MIN_REMOVED_OUT = {"MNP": 0.85, "B": 0.50, "T": 0.45}
CAL_MIN_KEPT_IN = {"MNP": 0.955, "B": 0.985, "T": 0.955}


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
    assert kept >= CAL_MIN_KEPT_IN[group], f"{group}: kept {kept:.4f} inside"
    _, _, _, split_in = _in_out(adata, split, group)
    # margin 0.01: another machine measured T 0.9569 against the split's 0.9642 (issue 19); three-seed floors to do
    assert kept >= split_in / raw_in - 0.01


@pytest.mark.slow
def test_calibrated_noise_ratio(calibrated):
    """Calibrated mean noise ratio 0.071 (seed 0) against 0.058 implied by the soup (an upper bound) and 0.068."""
    _, noise = calibrated
    assert 0.05 <= noise.mean() <= 0.11, noise.mean()
