"""Tests for :mod:`scar_jax.datasets` (the seeded droplet simulator)."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scar_jax.datasets import raw_droplets, simulate, simulate_empty_droplets, simulate_species_mixture
from scar_jax.metrics import oracle_native_share


@pytest.fixture(scope="module")
def adata() -> anndata.AnnData:
    return simulate(n_cells=2000, n_genes=300, n_cell_types=4, seed=3)


@pytest.fixture(scope="module")
def adata2() -> anndata.AnnData:
    return simulate(n_cells=600, n_genes=200, n_cell_types=3, n_batches=2, seed=5)


def _is_int32_csr(m: object) -> bool:
    return sp.issparse(m) and m.format == "csr" and m.dtype == np.int32


def test_shapes_and_dtypes(adata: anndata.AnnData) -> None:
    assert adata.shape == (2000, 300)
    for m in (adata.X, adata.layers["native"], adata.layers["ambient"]):
        assert _is_int32_csr(m)
        assert m.has_canonical_format
        assert m.shape == (2000, 300)
        assert m.data.min() > 0  # only true non-zeros are stored
    assert adata.obs_names[0] == "cell_00000" and adata.obs_names[-1] == "cell_01999"
    assert adata.var_names[0] == "gene_0000" and adata.var_names[-1] == "gene_0299"
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    for col in ("noise_ratio", "noise_ratio_parameter", "library_size"):
        assert adata.obs[col].dtype == np.float64
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2", "type_3"]
    assert isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["batch"].cat.categories) == ["batch_0"]
    amb = adata.varm["true_ambient_profile"]
    nat = adata.varm["true_native_profile"]
    assert amb.shape == (300, 1) and amb.dtype == np.float64
    assert nat.shape == (300, 4) and nat.dtype == np.float64
    assert (adata.obs["library_size"] >= 200).all()


def test_components_add_up(adata: anndata.AnnData) -> None:
    diff = adata.layers["native"] + adata.layers["ambient"] - adata.X
    assert diff.count_nonzero() == 0
    assert np.asarray(adata.X.sum(axis=1)).min() > 0  # no empty cell


def test_noise_ratio(adata: anndata.AnnData) -> None:
    total = np.asarray(adata.X.sum(axis=1)).ravel()
    ambient = np.asarray(adata.layers["ambient"].sum(axis=1)).ravel()
    np.testing.assert_allclose(adata.obs["noise_ratio"].to_numpy(), ambient / total, rtol=0, atol=1e-15)
    assert abs(adata.obs["noise_ratio"].mean() - 0.15) < 0.03
    eps = adata.obs["noise_ratio_parameter"].to_numpy()
    assert ((eps > 0) & (eps < 1)).all()
    assert abs(eps.mean() - 0.15) < 0.03
    # the realised ratio tracks the parameter closely at ~3000 counts per cell
    assert np.corrcoef(eps, adata.obs["noise_ratio"])[0, 1] > 0.9


def test_library_size_mean() -> None:
    a = simulate(n_cells=2000, n_genes=100, library_size_mean=1000.0, library_size_sd_log=0.3, seed=1)
    assert abs(a.obs["library_size"].mean() / 1000.0 - 1) < 0.05
    assert abs(np.asarray(a.X.sum(axis=1)).mean() / 1000.0 - 1) < 0.05


def test_ambient_profile(adata: anndata.AnnData, adata2: anndata.AnnData) -> None:
    for a in (adata, adata2):
        prof = a.varm["true_ambient_profile"]
        np.testing.assert_allclose(prof.sum(axis=0), 1.0, rtol=0, atol=1e-12)
        assert (prof > 0).all()
    prof2 = adata2.varm["true_ambient_profile"]
    assert prof2.shape == (200, 2)
    assert not np.allclose(prof2[:, 0], prof2[:, 1])
    # same centre: the two batch profiles are still strongly correlated
    assert np.corrcoef(prof2[:, 0], prof2[:, 1])[0, 1] > 0.8


def test_native_profile_sparsity(adata: anndata.AnnData) -> None:
    prof = adata.varm["true_native_profile"]
    np.testing.assert_allclose(prof.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    assert (prof >= 0).all()
    expressed = prof > 0
    n_expr = expressed.sum(axis=0)
    assert (n_expr == round(0.3 * 300)).all()  # about expressed_fraction of the genes
    assert (~expressed).any(axis=0).all()  # every type has exact zeros
    # a shared housekeeping block plus type-specific genes
    assert expressed.all(axis=1).sum() == 45
    assert len({tuple(col) for col in expressed.T}) == 4
    # property: native counts are zero wherever the cell's type does not express the gene
    native = adata.layers["native"].tocoo()
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    assert expressed[native.col, codes[native.row]].all()
    # the ambient layer, in contrast, covers unexpressed genes too
    amb = adata.layers["ambient"].tocoo()
    assert (~expressed[amb.col, codes[amb.row]]).any()


def test_native_counts_follow_profile(adata: anndata.AnnData) -> None:
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    prof = adata.varm["true_native_profile"]
    for t in range(prof.shape[1]):
        pooled = np.asarray(adata.layers["native"][codes == t].sum(axis=0)).ravel()
        assert np.corrcoef(pooled / pooled.sum(), prof[:, t])[0, 1] > 0.99


def test_batches(adata2: anndata.AnnData) -> None:
    counts = adata2.obs["batch"].value_counts()
    assert counts["batch_0"] == counts["batch_1"] == 300
    assert list(adata2.obs["batch"].iloc[:300].unique()) == ["batch_0"]
    assert adata2.uns["simulation"]["batch_categories"] == ["batch_0", "batch_1"]


def test_uns_simulation_is_json(adata: anndata.AnnData) -> None:
    sim = adata.uns["simulation"]
    json.dumps(sim)
    assert sim["seed"] == 3
    assert sim["n_cells"] == 2000 and sim["n_genes"] == 300 and sim["n_cell_types"] == 4
    assert sim["noise_ratio_mean"] == 0.15
    assert sim["cell_type_categories"] == ["type_0", "type_1", "type_2", "type_3"]
    assert sim["batch_categories"] == ["batch_0"]
    for v in sim.values():
        assert isinstance(v, (int, float, str, bool, list))


def test_seed_reproducibility() -> None:
    kw = {"n_cells": 300, "n_genes": 120, "n_batches": 2}
    a, b, c = simulate(seed=7, **kw), simulate(seed=7, **kw), simulate(seed=8, **kw)
    for key in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(a.X, key), getattr(b.X, key))
        np.testing.assert_array_equal(getattr(a.layers["ambient"], key), getattr(b.layers["ambient"], key))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.varm["true_ambient_profile"], b.varm["true_ambient_profile"])
    assert a.X.nnz != c.X.nnz or not np.array_equal(a.X.data, c.X.data)
    assert not np.array_equal(a.varm["true_ambient_profile"], c.varm["true_ambient_profile"])


def test_overlapping_specific_blocks_and_single_type() -> None:
    # 10 types x 30 specific genes do not fit in 100 genes: random overlapping subsets are used
    a = simulate(n_cells=200, n_genes=100, n_cell_types=10, expressed_fraction=0.6, seed=0)
    assert a.uns["simulation"]["disjoint_type_specific_blocks"] is False
    assert ((a.varm["true_native_profile"] > 0).sum(axis=0) == 60).all()
    one = simulate(n_cells=50, n_genes=10, n_cell_types=1, expressed_fraction=1.0, seed=0)
    assert (one.varm["true_native_profile"] > 0).all()
    assert (one.obs["cell_type"] == "type_0").all()


def test_cell_profile_variation_keeps_zeros() -> None:
    a = simulate(n_cells=300, n_genes=100, cell_profile_sd_log=0.3, seed=2)
    expressed = a.varm["true_native_profile"] > 0
    native = a.layers["native"].tocoo()
    codes = a.obs["cell_type"].cat.codes.to_numpy()
    assert expressed[native.col, codes[native.row]].all()
    assert (a.layers["native"] + a.layers["ambient"] - a.X).count_nonzero() == 0


def test_tiny_library_sizes_have_no_empty_cells() -> None:
    a = simulate(n_cells=500, n_genes=20, library_size_mean=1.0, library_size_sd_log=0.0, seed=0)
    assert np.asarray(a.X.sum(axis=1)).min() >= 1
    assert np.isfinite(a.obs["noise_ratio"]).all()


def test_empty_droplets_match_ambient_profile() -> None:
    a = simulate(n_cells=100, n_genes=200, n_batches=2, seed=11)
    empty = simulate_empty_droplets(a, n_droplets=20000, library_size_mean=200.0, seed=4)
    assert empty.shape == (20000, 200)
    assert _is_int32_csr(empty.X)
    assert empty.var_names.equals(a.var_names)
    assert empty.obs_names[0] == "empty_00000" and empty.obs_names[-1] == "empty_19999"
    assert isinstance(empty.obs["batch"].dtype, pd.CategoricalDtype)
    assert list(empty.obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    assert (empty.obs["batch"].value_counts() == 10000).all()
    prof = a.varm["true_ambient_profile"]
    for b, name in enumerate(["batch_0", "batch_1"]):
        pooled = np.asarray(empty.X[(empty.obs["batch"] == name).to_numpy()].sum(axis=0)).ravel()
        assert np.corrcoef(pooled / pooled.sum(), prof[:, b])[0, 1] > 0.99
    assert abs(np.asarray(empty.X.sum(axis=1)).mean() / 200.0 - 1) < 0.05
    again = simulate_empty_droplets(a, n_droplets=20000, library_size_mean=200.0, seed=4)
    np.testing.assert_array_equal(again.X.data, empty.X.data)


def test_empty_droplets_allow_zero_counts(adata: anndata.AnnData) -> None:
    empty = simulate_empty_droplets(adata, n_droplets=2000, library_size_mean=2.0, seed=0)
    assert (np.asarray(empty.X.sum(axis=1)).ravel() == 0).any()


def test_raw_droplets(adata2: anndata.AnnData) -> None:
    empty = simulate_empty_droplets(adata2, n_droplets=1000, seed=1)
    raw = raw_droplets(adata2, empty)
    assert raw.shape == (1600, 200)
    assert _is_int32_csr(raw.X)
    assert raw.obs["is_cell"].dtype == bool
    assert raw.obs["is_cell"].iloc[:600].all() and not raw.obs["is_cell"].iloc[600:].any()
    assert list(raw.obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    assert (raw.obs["batch"].iloc[:600].to_numpy() == adata2.obs["batch"].to_numpy()).all()
    assert (raw.obs["batch"].iloc[600:].to_numpy() == empty.obs["batch"].to_numpy()).all()
    assert (raw.X[:600] != adata2.X).nnz == 0
    assert (raw.X[600:] != empty.X).nnz == 0
    assert list(raw.obs_names[:600]) == list(adata2.obs_names)
    assert not raw.layers


def test_h5ad_roundtrip_then_empty_droplets(adata2: anndata.AnnData, tmp_path) -> None:
    path = tmp_path / "sim.h5ad"
    adata2.write_h5ad(path)
    back = anndata.read_h5ad(path)
    empty = simulate_empty_droplets(back, n_droplets=100, seed=0)
    assert list(empty.obs["batch"].cat.categories) == ["batch_0", "batch_1"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_cells": 2.5}, "n_cells"),
        ({"n_genes": 1}, "n_genes"),
        ({"n_cell_types": 0}, "n_cell_types"),
        ({"n_batches": 0}, "n_batches"),
        ({"noise_ratio_mean": 0.0}, "noise_ratio_mean"),
        ({"noise_ratio_mean": 1.0}, "noise_ratio_mean"),
        ({"noise_ratio_concentration": 0.0}, "noise_ratio_concentration"),
        ({"library_size_mean": 0.5}, "library_size_mean"),
        ({"library_size_sd_log": -0.1}, "library_size_sd_log"),
        ({"expressed_fraction": 0.0}, "expressed_fraction"),
        ({"expressed_fraction": 1.5}, "expressed_fraction"),
        ({"ambient_concentration": -1.0}, "ambient_concentration"),
        ({"ambient_concentration": float("nan")}, "ambient_concentration"),
        ({"seed": -1}, "seed"),
        ({"cell_profile_sd_log": -1.0}, "cell_profile_sd_log"),
    ],
)
def test_simulate_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        simulate(**kwargs)


def test_empty_droplets_validation(adata2: anndata.AnnData) -> None:
    plain = anndata.AnnData(X=sp.csr_matrix(np.ones((3, 4), dtype=np.int32)))
    with pytest.raises(ValueError, match="true_ambient_profile"):
        simulate_empty_droplets(plain)
    with pytest.raises(ValueError, match="n_droplets"):
        simulate_empty_droplets(adata2, n_droplets=0)
    with pytest.raises(ValueError, match="library_size_mean"):
        simulate_empty_droplets(adata2, library_size_mean=0.0)
    with pytest.raises(ValueError, match="library_size_sd_log"):
        simulate_empty_droplets(adata2, library_size_sd_log=-1.0)


def test_raw_droplets_validation(adata: anndata.AnnData, adata2: anndata.AnnData) -> None:
    empty2 = simulate_empty_droplets(adata2, n_droplets=10, seed=0)
    with pytest.raises(ValueError, match="var_names"):
        raw_droplets(adata, empty2)
    with pytest.raises(ValueError, match="obs_names"):
        raw_droplets(adata2, adata2)


# --------------------------------------------------------------------------------------------------
# simulate_species_mixture: the low-contamination, disjoint-species regime
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def species() -> anndata.AnnData:
    return simulate_species_mixture(n_cells=300, n_genes=3001, seed=4)


def _foreign_mask(a: anndata.AnnData) -> np.ndarray:
    return a.obs["species"].cat.codes.to_numpy()[:, None] != a.var["species"].cat.codes.to_numpy()[None, :]


def test_species_shapes_and_fields(species: anndata.AnnData) -> None:
    a = species
    assert a.shape == (300, 3001)
    for m in (a.X, a.layers["native"], a.layers["ambient"]):
        assert _is_int32_csr(m) and m.has_canonical_format and m.data.min() > 0
    assert (a.layers["native"] + a.layers["ambient"] - a.X).count_nonzero() == 0
    assert list(a.obs["species"].cat.categories) == ["species_0", "species_1"]
    assert list(a.var["species"].cat.categories) == ["species_0", "species_1"]
    assert list(a.obs["cell_type"].cat.categories) == [
        "species_0_type_0",
        "species_0_type_1",
        "species_1_type_0",
        "species_1_type_1",
    ]
    assert list(a.obs["batch"].cat.categories) == ["batch_0"]
    assert a.varm["true_ambient_profile"].shape == (3001, 1)
    assert a.varm["true_native_profile"].shape == (3001, 4)
    # exact species counts (largest remainder of 0.64 / 0.36 of 300), each type within its species
    assert a.obs["species"].value_counts().sort_index().tolist() == [192, 108]
    type_species = a.obs["cell_type"].astype(str).str.rsplit("_type_", n=1).str[0]
    assert (type_species == a.obs["species"].astype(str)).all()
    # contiguous gene blocks whose sizes differ by at most one
    codes = a.var["species"].cat.codes.to_numpy()
    assert (np.diff(codes) >= 0).all() and np.bincount(codes).tolist() == [1501, 1500]
    assert np.asarray(a.X.sum(axis=1)).min() > 0
    json.dumps(a.uns["simulation"])
    assert a.uns["simulation"]["species_cell_counts"] == [192, 108]


def test_species_foreign_counts_are_all_ambient(species: anndata.AnnData) -> None:
    a = species
    foreign = _foreign_mask(a)
    native = a.layers["native"].toarray()
    assert native[foreign].sum() == 0  # a cell never expresses a gene of another species
    x = a.X.toarray()
    assert x[foreign].sum() > 0  # ...but observes some of them, all ambient
    assert (x[foreign] == a.layers["ambient"].toarray()[foreign]).all()


def test_species_profiles(species: anndata.AnnData) -> None:
    a = species
    rho = a.varm["true_native_profile"]
    np.testing.assert_allclose(rho.sum(axis=0), 1.0, rtol=1e-12)
    gene_species = a.var["species"].cat.codes.to_numpy()
    for t in range(4):
        on_block = gene_species == t // 2
        assert (rho[on_block, t] > 0).all() and (rho[~on_block, t] == 0).all()
    # ambient = the mixture of the type profiles weighted by the realised fractions of cells
    fractions = np.bincount(a.obs["cell_type"].cat.codes.to_numpy(), minlength=4) / a.n_obs
    amb = a.varm["true_ambient_profile"][:, 0]
    np.testing.assert_allclose(amb, rho @ fractions, rtol=1e-12)
    assert (amb > 0).all()
    np.testing.assert_allclose([amb[gene_species == 0].sum(), amb[gene_species == 1].sum()], [0.64, 0.36], rtol=1e-12)
    # the oracle split removes every foreign count and keeps > 99% of the counts of expressed genes
    share = oracle_native_share(a)
    foreign = _foreign_mask(a)
    x = a.X.toarray()
    assert (share[foreign] == 0).all() and (share[~foreign] > 0.5).all()
    assert (x * share)[~foreign].sum() / x[~foreign].sum() > 0.99


def test_species_noise_ratio(species: anndata.AnnData) -> None:
    a = species
    eps = a.obs["noise_ratio_parameter"].to_numpy()
    assert eps.min() >= 0.002 and eps.max() <= 0.02
    # log-uniform: log eps has mean (log lo + log hi) / 2 and sd log(hi / lo) / sqrt(12)
    log_eps = np.log(eps)
    se = np.log(10) / np.sqrt(12) / np.sqrt(a.n_obs)
    assert abs(log_eps.mean() - 0.5 * np.log(0.002 * 0.02)) < 4 * se
    assert abs(log_eps.std() - np.log(10) / np.sqrt(12)) < 0.1
    total = np.asarray(a.X.sum(axis=1)).ravel()
    ambient = np.asarray(a.layers["ambient"].sum(axis=1)).ravel()
    np.testing.assert_allclose(a.obs["noise_ratio"], ambient / total)
    # realised ambient fraction follows the parameter (Poisson noise on ~ 40 ambient counts per cell)
    assert np.corrcoef(a.obs["noise_ratio"], eps)[0, 1] > 0.8
    assert abs(ambient.sum() / total.sum() - np.average(eps, weights=a.obs["library_size"])) < 0.1 * eps.mean()


def test_species_heavy_tail_and_library(species: anndata.AnnData) -> None:
    a = species
    rho = a.varm["true_native_profile"][:, 0]
    on = rho[rho > 0]
    assert np.sort(on)[::-1][: on.size // 100].sum() > 0.15  # top 1% of the genes hold > 15% of the counts
    assert abs(np.log(a.obs["library_size"]).std() - 0.5) < 0.06
    total = np.asarray(a.X.sum(axis=1)).ravel()
    assert abs(total.mean() / a.obs["library_size"].mean() - 1) < 0.02


def test_species_seed_and_empty_droplets() -> None:
    kw = {"n_cells": 50, "n_genes": 400, "species_proportions": (1, 1, 2), "n_types_per_species": 1}
    a, b, c = (simulate_species_mixture(seed=s, **kw) for s in (3, 3, 4))
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0
    assert a.obs["species"].value_counts().sort_index().tolist() == [13, 12, 25]  # 12.5, 12.5, 25: ties to the first
    empty = simulate_empty_droplets(a, n_droplets=20000, library_size_mean=200.0, seed=0)
    pooled = np.asarray(empty.X.sum(axis=0)).ravel()
    amb = a.varm["true_ambient_profile"][:, 0]
    assert abs(pooled / pooled.sum() - amb).sum() < 0.05
    raw = raw_droplets(a, empty)
    assert raw.shape == (20050, 400)


def test_species_cell_profile_variation() -> None:
    a = simulate_species_mixture(n_cells=60, n_genes=500, cell_profile_sd_log=0.5, seed=1)
    assert a.layers["native"].toarray()[_foreign_mask(a)].sum() == 0
    assert (a.layers["native"] + a.layers["ambient"] - a.X).count_nonzero() == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_genes": 1}, "n_genes"),
        ({"species_proportions": (1.0,)}, "species_proportions"),
        ({"species_proportions": (1.0, 0.0)}, r"species_proportions\[1\]"),
        ({"species_proportions": "ab"}, "species_proportions"),
        ({"n_types_per_species": 0}, "n_types_per_species"),
        ({"noise_ratio_range": (0.02,)}, "noise_ratio_range"),
        ({"noise_ratio_range": (0.0, 0.1)}, r"noise_ratio_range\[0\]"),
        ({"noise_ratio_range": (0.1, 0.05)}, r"noise_ratio_range\[1\]"),
        ({"noise_ratio_range": (0.1, 1.0)}, r"noise_ratio_range\[1\]"),
        ({"library_size_mean": 0.5}, "library_size_mean"),
        ({"library_size_sd_log": -1.0}, "library_size_sd_log"),
        ({"gene_log_sd": -1.0}, "gene_log_sd"),
        ({"type_log_sd": float("nan")}, "type_log_sd"),
        ({"seed": -1}, "seed"),
        ({"cell_profile_sd_log": -0.5}, "cell_profile_sd_log"),
    ],
)
def test_species_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        simulate_species_mixture(**{"n_cells": 10, "n_genes": 20, **kwargs})
