"""Tests for :mod:`scar_jax.feature_datasets` (seeded guide and ADT simulators, empty droplets)."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scar_jax.datasets import raw_droplets
from scar_jax.feature_datasets import simulate_adt, simulate_feature_empty_droplets, simulate_guides


@pytest.fixture(scope="module")
def guides() -> anndata.AnnData:
    return simulate_guides(n_cells=2000, n_guides=40, dual_fraction=0.3, seed=2)


@pytest.fixture(scope="module")
def adt() -> anndata.AnnData:
    return simulate_adt(n_cells=2000, n_proteins=30, n_cell_types=4, n_isotype_controls=3, seed=2)


def _is_int32_csr(m: object) -> bool:
    return sp.issparse(m) and m.format == "csr" and m.dtype == np.int32 and m.has_canonical_format


def _check_common(adata: anndata.AnnData, shape: tuple[int, int]) -> None:
    assert adata.shape == shape
    for m in (adata.X, adata.layers["native"], adata.layers["ambient"]):
        assert _is_int32_csr(m) and m.shape == shape
        assert m.data.min() > 0  # only true non-zeros stored
    # native + ambient == X exactly, every cell has at least one count
    assert (adata.layers["native"] + adata.layers["ambient"] - adata.X).count_nonzero() == 0
    total = np.asarray(adata.X.sum(axis=1)).ravel()
    assert total.min() > 0
    # realised noise ratio is the ambient fraction of the observed counts
    amb = np.asarray(adata.layers["ambient"].sum(axis=1)).ravel()
    np.testing.assert_allclose(adata.obs["noise_ratio"].to_numpy(), amb / total, rtol=1e-12)
    for col in ("noise_ratio", "noise_ratio_parameter", "library_size"):
        assert adata.obs[col].dtype == np.float64
    assert list(adata.obs["batch"].cat.categories) == ["batch_0"]
    profile = adata.varm["true_ambient_profile"]
    assert profile.shape == (shape[1], 1) and profile.dtype == np.float64
    assert profile.min() > 0 and abs(profile.sum() - 1) < 1e-12
    assert adata.obs_names.is_unique and adata.var_names.is_unique and adata.obs_names[0] == "cell_00000"
    json.dumps(adata.uns["simulation"])  # JSON-serialisable


def test_guides_structure(guides: anndata.AnnData) -> None:
    _check_common(guides, (2000, 40))
    assert guides.var_names[0] == "sg_00" and guides.var_names[-1] == "sg_39"
    assert guides.var["abundance"].dtype == np.float64 and abs(guides.var["abundance"].sum() - 1) < 1e-12
    k = guides.obs["n_true_guides"].to_numpy()
    assert set(np.unique(k)) == {1, 2}
    assert abs(np.mean(k == 2) - 0.3) < 0.03  # Bernoulli(0.3) over 2000 cells: sd 0.010
    assert guides.uns["simulation"]["n_dual_cells"] == int(np.sum(k == 2))
    for s, kk in zip(guides.obs["true_guides"], k, strict=True):
        parts = s.split(",")
        assert len(parts) == kk == len(set(parts)) and parts == sorted(parts)


def test_guides_native_only_on_true_guides(guides: anndata.AnnData) -> None:
    col = {name: j for j, name in enumerate(guides.var_names)}
    mask = np.zeros(guides.shape, dtype=bool)
    for i, s in enumerate(guides.obs["true_guides"]):
        mask[i, [col[g] for g in s.split(",")]] = True
    native = guides.layers["native"].toarray()
    assert native[~mask].sum() == 0
    # the true guides carry most of the counts (library ~300, share of a dual guide ~ Beta(4, 4))
    assert np.mean(native[mask] > 0) > 0.99
    observed = guides.X.toarray()
    assert np.mean(observed[mask].reshape(-1)) > 20 * np.mean(observed[~mask])


def test_ambient_profile_follows_guide_pool(guides: anndata.AnnData) -> None:
    # ambient guides come from the native guide pool (plus a 2% floor)
    native_pool = np.asarray(guides.layers["native"].sum(axis=0)).ravel()
    assert np.corrcoef(native_pool, guides.varm["true_ambient_profile"][:, 0])[0, 1] > 0.98


def test_adt_structure(adt: anndata.AnnData) -> None:
    _check_common(adt, (2000, 30))
    iso = adt.var["isotype_control"].to_numpy()
    assert adt.var["isotype_control"].dtype == bool and iso.sum() == 3 and iso[-3:].all()
    assert list(adt.var_names[-3:]) == ["isotype_0", "isotype_1", "isotype_2"]
    assert isinstance(adt.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert list(adt.obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2", "type_3"]
    nat_profile = adt.varm["true_native_profile"]
    assert nat_profile.shape == (30, 4)
    np.testing.assert_allclose(nat_profile.sum(axis=0), 1.0, rtol=1e-12)
    assert np.all(nat_profile[iso] == 0)


def test_adt_isotype_controls_only_ambient(adt: anndata.AnnData) -> None:
    iso = adt.var["isotype_control"].to_numpy()
    assert adt.layers["native"][:, iso].count_nonzero() == 0
    assert adt.layers["ambient"][:, iso].sum() > 0
    assert adt.X[:, iso].sum() == adt.layers["ambient"][:, iso].sum()


def test_adt_markers_are_type_specific(adt: anndata.AnnData) -> None:
    native = adt.layers["native"].toarray()
    frac = native / native.sum(axis=1, keepdims=True)
    types = adt.obs["cell_type"].astype(str).to_numpy()
    for j, label in enumerate(adt.var["marker_of"]):
        if label.startswith("type_"):
            inside = frac[types == label, j].mean()
            outside = frac[types != label, j].mean()
            assert inside > 5 * outside, (adt.var_names[j], inside, outside)


@pytest.mark.parametrize(("make", "mean"), [(simulate_guides, 0.1), (simulate_adt, 0.2)])
def test_noise_ratio_near_parameter(make, mean) -> None:
    adata = make(n_cells=2000, seed=4)
    nr = adata.obs["noise_ratio"].to_numpy()
    # eps ~ Beta(20 m, 20 (1 - m)): sd of the mean over 2000 cells ~0.002; measured 0.103 and 0.200 (seed 4)
    assert abs(nr.mean() - mean) < 0.01
    assert np.corrcoef(nr, adata.obs["noise_ratio_parameter"])[0, 1] > 0.8


@pytest.mark.parametrize("make", [simulate_guides, simulate_adt])
def test_seeds(make) -> None:
    a = make(n_cells=300, seed=7)
    b = make(n_cells=300, seed=7)
    c = make(n_cells=300, seed=8)
    assert (a.X != b.X).nnz == 0 and (a.layers["native"] != b.layers["native"]).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.varm["true_ambient_profile"], b.varm["true_ambient_profile"])
    assert (a.X != c.X).nnz > 0


@pytest.mark.parametrize("which", ["guides", "adt"])
def test_empty_droplets(which, guides, adt) -> None:
    adata = guides if which == "guides" else adt
    empty = simulate_feature_empty_droplets(adata, n_droplets=5000, library_size_mean=20.0, seed=1)
    assert empty.shape == (5000, adata.n_vars)
    assert _is_int32_csr(empty.X)
    assert empty.var_names.equals(adata.var_names)
    assert empty.obs_names[0] == "empty_00000"
    assert list(empty.obs["batch"].cat.categories) == ["batch_0"]
    json.dumps(empty.uns["simulation"])
    totals = np.asarray(empty.X.sum(axis=1)).ravel()
    assert abs(totals.mean() - 20.0) < 1.0  # about 100 000 counts in all
    pooled = np.asarray(empty.X.sum(axis=0)).ravel()
    assert np.corrcoef(pooled, adata.varm["true_ambient_profile"][:, 0])[0, 1] > 0.99  # measured > 0.999
    # seeded
    again = simulate_feature_empty_droplets(adata, n_droplets=5000, library_size_mean=20.0, seed=1)
    assert (again.X != empty.X).nnz == 0
    # usable with scar_jax.datasets.raw_droplets
    raw = raw_droplets(adata, empty)
    assert raw.shape == (adata.n_obs + 5000, adata.n_vars) and raw.obs["is_cell"].sum() == adata.n_obs


def test_validation(guides) -> None:
    with pytest.raises(ValueError, match="n_cells"):
        simulate_guides(n_cells=0)
    with pytest.raises(ValueError, match="n_guides"):
        simulate_guides(n_guides=1)
    with pytest.raises(ValueError, match="dual_fraction"):
        simulate_guides(dual_fraction=1.5)
    with pytest.raises(ValueError, match="dual_fraction"):
        simulate_guides(dual_fraction=-0.1)
    with pytest.raises(ValueError, match="noise_ratio_mean"):
        simulate_guides(noise_ratio_mean=1.0)
    with pytest.raises(ValueError, match="noise_ratio_mean"):
        simulate_adt(noise_ratio_mean=0.0)
    with pytest.raises(ValueError, match="library_size_mean"):
        simulate_guides(library_size_mean=-1.0)
    with pytest.raises(ValueError, match="seed"):
        simulate_guides(seed=-1)
    with pytest.raises(ValueError, match="n_cells"):
        simulate_adt(n_cells=True)
    with pytest.raises(ValueError, match="n_proteins"):
        simulate_adt(n_proteins=3, n_isotype_controls=3)
    with pytest.raises(ValueError, match="n_isotype_controls"):
        simulate_adt(n_isotype_controls=-1)
    with pytest.raises(ValueError, match="n_cell_types"):
        simulate_adt(n_cell_types=0)
    with pytest.raises(ValueError, match="n_droplets"):
        simulate_feature_empty_droplets(guides, n_droplets=0)
    with pytest.raises(ValueError, match="library_size_mean"):
        simulate_feature_empty_droplets(guides, library_size_mean=0.0)
    with pytest.raises(ValueError, match="library_size_sd_log"):
        simulate_feature_empty_droplets(guides, library_size_sd_log=-1.0)
    with pytest.raises(ValueError, match="true_ambient_profile"):
        simulate_feature_empty_droplets(anndata.AnnData(np.ones((2, 3))))
    with pytest.raises(ValueError, match="adata"):
        simulate_feature_empty_droplets(np.ones((2, 3)))


def test_small_edge_cases() -> None:
    a = simulate_guides(n_cells=1, n_guides=2, dual_fraction=1.0, library_size_mean=5.0, seed=0)
    assert a.obs["true_guides"].iloc[0] == "sg_00,sg_01"
    b = simulate_adt(n_cells=5, n_proteins=2, n_cell_types=3, n_isotype_controls=0, seed=0)
    assert b.shape == (5, 2) and not b.var["isotype_control"].any()
