"""Calibrated denoising on real CITE-seq data: isotype controls removed, the other antibodies kept (issue 10).

Data: 87 ADTs, 2,872 cells + 8,005 empty droplets from 6 lanes, 4 isotype controls (``shared/data/SOURCES.md``);
skipped when the shared data are absent. ``method="calibrated"`` supports one ambient profile, so the profile is
**pooled**: estimated from the empty droplets of all lanes together (``prob=0.01``), one model for all cells
(no batch key), ``n_latent=10``, ``sparsity=1``, 60 epochs, seed 0 (as ``tests/test_ambient.py``).
``benchmarks/real_citeseq.py --per-lane`` also prints the lane-by-lane variant.

Measured (seed 0, pooled profile; ``benchmarks/real_citeseq.py``):

=======================  ===============  ==============  ================
method                   isotype removed  other ADT kept  mean noise ratio
=======================  ===============  ==============  ================
split (default)          100.0%           72.7%           0.276 (model)
calibrated, odds 1       88.3%            84.2%           0.180
calibrated, odds 0.1     91.3%            84.2%           0.180
=======================  ===============  ==============  ================

The isotype controls imply a contamination of 0.191 (isotype counts in cells / (library x their profile share)).
Lane by lane (one model and profile per lane): split 100.0 / 67.6, calibrated odds 1 95.2 / 80.7, odds 0.1
97.1 / 80.6, calibrated noise ratio 0.222. This is not the low-contamination regime (about a fifth of the ADT
counts are background); the calibration still keeps ~10 points more of the other antibodies than the split.
"""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

anndata = pytest.importorskip("anndata")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb_citeseq_87adt_cells_and_empty.h5ad"

pytestmark = [pytest.mark.skipif(not DATA.is_file(), reason=f"shared real data not found: {DATA}"), pytest.mark.slow]


# seed 0: 88.3% removed, 84.2% kept, noise ratio 0.180 (isotype-implied 0.191); the iteration starts at 0.01
ISO_REMOVED_MIN, OTHER_KEPT_MIN, NOISE_REL_TOL = 0.85, 0.78, 0.2


@pytest.fixture(scope="module")
def citeseq():
    from scar_jax import SCAR

    adt = anndata.read_h5ad(DATA)
    adt.X = sp.csr_matrix(adt.X)
    cells = adt[adt.obs["droplet"] == "cell"].copy()
    SCAR.setup_anndata(cells)
    SCAR.get_ambient_profile(cells, adt, prob=0.01)
    model = SCAR(cells, ambient_profile="ambient_profile", n_latent=10, sparsity=1.0, seed=0)
    model.train(max_epochs=60, enable_progress_bar=False)
    isotype = cells.var["isotype_control"].to_numpy().astype(bool)
    denoised = {
        odds: sp.csr_matrix(model.get_denoised_counts(method="calibrated", expressed_prior_odds=odds))
        for odds in (1.0, 0.1)
    }
    return cells, model, isotype, denoised


def _removed_kept(cells, isotype, denoised):
    x = cells.X
    return 1 - denoised[:, isotype].sum() / x[:, isotype].sum(), denoised[:, ~isotype].sum() / x[:, ~isotype].sum()


def test_calibrated_is_count_preserving(citeseq):
    cells, _, _, denoised = citeseq
    for den in denoised.values():
        assert den.shape == cells.shape and den.min() >= 0
        assert ((den - cells.X) > 0).nnz == 0
        assert ((den != 0) > (cells.X != 0)).nnz == 0


def test_isotype_controls_removed_other_antibodies_kept(citeseq):
    cells, _, isotype, denoised = citeseq
    removed, kept = _removed_kept(cells, isotype, denoised[1.0])
    assert removed >= ISO_REMOVED_MIN, removed
    assert kept >= OTHER_KEPT_MIN, kept


def test_knob_trades_removal_for_retention(citeseq):
    cells, _, isotype, denoised = citeseq
    removed_1, kept_1 = _removed_kept(cells, isotype, denoised[1.0])
    removed_01, kept_01 = _removed_kept(cells, isotype, denoised[0.1])
    assert removed_01 >= removed_1 - 0.005  # 91.3% vs 88.3%
    assert kept_01 <= kept_1 + 0.005  # 84.2% vs 84.2%


def test_calibrated_noise_ratio_matches_isotype_implied(citeseq):
    """The calibrated mean noise ratio is near what the isotype controls imply; the model's is higher."""
    cells, model, isotype, _ = citeseq
    noise = model.get_noise_ratio(calibrated=True)
    profile = np.asarray(cells.varm["ambient_profile"]).ravel()
    implied = cells.X[:, isotype].sum() / (cells.X.sum() * profile[isotype].sum())
    assert abs(noise.mean() / implied - 1) <= NOISE_REL_TOL, (noise.mean(), implied)  # 0.180 vs 0.191
    assert noise.mean() < model.get_noise_ratio().mean()  # the model's: 0.276
