"""Tests of ``scar_jax.readers``: 10x h5 (v3 multi-feature-type, v2), 10x mtx folders and .h5ad.

Oracle: the counts, barcodes and feature names written by the test (``_tenx``, h5py/scipy in the
documented 10x layouts) must come back exactly; errors are one-line ``ValueError``s naming the file.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _tenx import write_mtx, write_v2_h5, write_v3_h5

from scar_jax import readers

N_DROPLETS = 40
TYPES = ["Gene Expression"] * 6 + ["Antibody Capture"] * 3 + ["CRISPR Guide Capture"] * 2 + ["Multiplexing Capture"]
# "CD4" is both a gene and an antibody, "MT-1" repeats within the genes: names are not unique in the file
NAMES = ["CD4", "LYZ", "MT-1", "MT-1", "CD3E", "HBB", "CD4", "CD8", "IgG1", "sg_A", "sg_B", "CMO301"]


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(N_DROPLETS, len(NAMES))) * (rng.random((N_DROPLETS, len(NAMES))) < 0.6)
    x[3] = 0  # an empty droplet, as raw matrices have
    x[5, 0] = 70_000  # a large count survives (10x stores int32; scanpy reads float32)
    return x.astype(np.int64)


@pytest.fixture(scope="module")
def barcodes():
    return [f"AAACCTG{i:05d}-1" for i in range(N_DROPLETS)]


@pytest.fixture(scope="module")
def v3(tmp_path_factory, counts, barcodes):
    return write_v3_h5(tmp_path_factory.mktemp("v3") / "raw_feature_bc_matrix.h5", counts, barcodes, NAMES, TYPES)


def _dense(a):
    return a.toarray() if sp.issparse(a) else np.asarray(a)


def _cols(types):
    return [i for i, t in enumerate(TYPES) if t in types]


def test_v3_h5_round_trip_all_features(v3, counts, barcodes):
    adata = readers.read(v3)
    assert adata.shape == counts.shape
    assert sp.isspmatrix_csr(adata.X)
    np.testing.assert_array_equal(_dense(adata.X), counts)
    assert list(adata.obs_names) == barcodes
    assert adata.var_names.is_unique
    # repeats get -1, -2 ... in file order (anndata's var_names_make_unique)
    assert list(adata.var_names[:4]) == ["CD4", "LYZ", "MT-1", "MT-1-1"]
    assert list(adata.var["feature_types"]) == TYPES
    assert list(adata.var["gene_ids"]) == [f"ID{i:05d}" for i in range(len(NAMES))]
    assert (adata.var["genome"] == "GRCh38").all()


@pytest.mark.parametrize(
    ("feature_type", "expected_type", "tenx"),
    [
        ("mRNA", "mRNA", ["Gene Expression"]),
        ("Gene Expression", "mRNA", ["Gene Expression"]),
        ("ADT", "ADT", ["Antibody Capture"]),
        ("antibody capture", "ADT", ["Antibody Capture"]),
        ("sgRNA", "sgRNA", ["CRISPR Guide Capture"]),
        ("sgrna", "sgRNA", ["CRISPR Guide Capture"]),
        ("CRISPR Guide Capture", "sgRNA", ["CRISPR Guide Capture"]),
        ("CMO", "CMO", ["Multiplexing Capture"]),
        ("tag", "tag", ["Multiplexing Capture"]),
        ("Multiplexing Capture", "CMO", ["Multiplexing Capture"]),
    ],
)
def test_v3_h5_feature_type_subsetting(v3, counts, feature_type, expected_type, tenx):
    adata = readers.read(v3, feature_type=feature_type)
    cols = _cols(tenx)
    np.testing.assert_array_equal(_dense(adata.X), counts[:, cols])
    assert set(adata.var["feature_types"]) == set(tenx)
    assert adata.var_names.is_unique
    assert readers.resolve_feature_type(feature_type)[0] == expected_type


def test_names_made_unique_within_the_selected_type(v3):
    # the antibody CD4 keeps its name when only antibodies are read; the repeated gene gets a suffix
    assert list(readers.read(v3, feature_type="ADT").var_names) == ["CD4", "CD8", "IgG1"]
    assert list(readers.read(v3, feature_type="mRNA").var_names) == ["CD4", "LYZ", "MT-1", "MT-1-1", "CD3E", "HBB"]


def test_v2_h5_round_trip(tmp_path, counts, barcodes):
    genes = [f"gene{i}" for i in range(6)]
    path = write_v2_h5(tmp_path / "filtered_gene_bc_matrices_h5.h5", counts[:, :6], barcodes, genes)
    assert readers.detect_format(path) == "10x_h5"
    adata = readers.read(path)
    np.testing.assert_array_equal(_dense(adata.X), counts[:, :6])
    assert list(adata.obs_names) == barcodes and list(adata.var_names) == genes
    assert (adata.var["feature_types"] == "Gene Expression").all()  # v2 holds gene expression only
    np.testing.assert_array_equal(_dense(readers.read(path, feature_type="mRNA").X), counts[:, :6])
    with pytest.raises(ValueError, match=r"has no ADT features \('Antibody Capture'\)"):
        readers.read(path, feature_type="ADT")


def test_v3_mtx_folder_round_trip(tmp_path, counts, barcodes):
    folder = write_mtx(tmp_path / "filtered_feature_bc_matrix", counts, barcodes, NAMES, TYPES)
    assert readers.detect_format(folder) == "10x_mtx"
    adata = readers.read(folder)
    np.testing.assert_array_equal(_dense(adata.X), counts)
    assert list(adata.obs_names) == barcodes
    assert list(adata.var["feature_types"]) == TYPES
    assert adata.var_names.is_unique
    sg = readers.read(folder, feature_type="sgRNA")
    np.testing.assert_array_equal(_dense(sg.X), counts[:, _cols(["CRISPR Guide Capture"])])
    assert list(sg.var_names) == ["sg_A", "sg_B"]
    # the matrix file itself reads its folder
    np.testing.assert_array_equal(_dense(readers.read(folder / "matrix.mtx.gz").X), counts)


def test_v2_mtx_folder_round_trip(tmp_path, counts, barcodes):
    genes = [f"gene{i}" for i in range(6)]
    folder = write_mtx(tmp_path / "hg19", counts[:, :6], barcodes, genes)
    adata = readers.read(folder, feature_type="mRNA")
    np.testing.assert_array_equal(_dense(adata.X), counts[:, :6])
    assert list(adata.var_names) == genes and list(adata.obs_names) == barcodes


def test_h5ad_round_trip_with_and_without_feature_types(tmp_path, counts, barcodes):
    var = pd.DataFrame({"feature_types": TYPES}, index=[f"f{i}" for i in range(len(NAMES))])
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=barcodes), var=var).write_h5ad(path)
    assert readers.detect_format(path) == "h5ad"
    np.testing.assert_array_equal(_dense(readers.read(path).X), counts)
    adt = readers.read(path, feature_type="ADT")
    np.testing.assert_array_equal(_dense(adt.X), counts[:, _cols(["Antibody Capture"])])
    # without a feature-type column the file is taken to hold the requested type only
    plain = tmp_path / "plain.h5ad"
    anndata.AnnData(counts.astype(np.float32)).write_h5ad(plain)
    assert readers.read(plain, feature_type="sgRNA").shape == counts.shape


def test_write_10x_h5_reads_back(tmp_path, v3, counts):
    original = readers.read(v3)
    path = tmp_path / "copy.h5"
    readers.write_10x_h5(original, path)
    again = readers.read(path)
    np.testing.assert_array_equal(_dense(again.X), counts)
    assert list(again.var["feature_types"]) == TYPES
    assert list(again.obs_names) == list(original.obs_names)
    with pytest.raises(ValueError, match="integer counts"):
        readers.write_10x_h5(anndata.AnnData(np.full((2, 2), 0.5)), tmp_path / "bad.h5")


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as exc:
        fn(*args, **kwargs)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_errors_are_one_line_value_errors(tmp_path, v3):
    _one_line_error("no such file or directory", readers.read, tmp_path / "missing.h5")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    assert str(text) in _one_line_error("not an HDF5 file", readers.read, text)
    _one_line_error("a folder without matrix.mtx", readers.read, tmp_path)
    other = tmp_path / "other.h5"
    import h5py

    with h5py.File(other, "w") as f:
        f.create_dataset("something", data=np.arange(3))
    _one_line_error("neither a 10x", readers.read, other)
    broken = tmp_path / "broken.h5"
    with h5py.File(broken, "w") as f:
        f.create_group("matrix").create_dataset("barcodes", data=np.array([b"A"]))
    _one_line_error("not a readable 10x h5 file", readers.read, broken)
    bad_mtx = tmp_path / "bad_mtx"
    bad_mtx.mkdir()
    (bad_mtx / "matrix.mtx.gz").write_bytes(b"garbage")
    _one_line_error("not a readable 10x mtx folder", readers.read, bad_mtx)
    message = _one_line_error("unknown feature type 'protein'", readers.read, v3, feature_type="protein")
    assert "mRNA" in message and "Antibody Capture" in message
    message = _one_line_error("has no ATAC features", readers.read, v3, feature_type="ATAC")
    assert "'Gene Expression'" in message and "'CRISPR Guide Capture'" in message


def test_resolve_feature_type():
    assert readers.resolve_feature_type("adt") == ("ADT", ("Antibody Capture",))
    assert readers.resolve_feature_type("Custom") == ("tag", ("Custom",))
    assert readers.resolve_feature_type("tag") == ("tag", ("Multiplexing Capture", "Custom"))
    with pytest.raises(ValueError, match="unknown feature type"):
        readers.resolve_feature_type("RNA velocity")
