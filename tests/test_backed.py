"""Out-of-core counts (``scar_jax.backed``): reading by rows, prefetching, block plans, streamed training,
and denoised counts written block by block, each checked against the in-memory computation."""

from __future__ import annotations

import hashlib
import threading
import warnings

import anndata
import jax
import numpy as np
import pytest
import scipy.sparse as sp

from scar_jax import SCAR, backed, predict
from scar_jax.backed import BackedCounts, plan_blocks, prefetch, read_backed
from scar_jax.datasets import simulate


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same simulated cells in memory (CSR), in an .h5ad file and in a zarr store."""
    folder = tmp_path_factory.mktemp("backed")
    adata = simulate(n_cells=300, n_genes=60, seed=3)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.write_h5ad(folder / "cells.h5ad")
    adata.write_zarr(folder / "cells.zarr")
    return adata, folder / "cells.h5ad", folder / "cells.zarr"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("store", ["h5ad", "zarr"])
def test_backed_counts_rows_equal_memory(files, store):
    adata, h5ad, zarr_path = files
    backed = read_backed(h5ad if store == "h5ad" else zarr_path)
    counts = BackedCounts(backed.X)
    x = adata.X
    assert counts.shape == x.shape and counts.nnz == x.nnz
    np.testing.assert_array_equal(counts.indptr, x.indptr)
    for rows in (slice(0, 300), slice(17, 45), slice(10, 10), slice(5, 50, 7)):
        np.testing.assert_array_equal(counts[rows].toarray(), x[rows].toarray())
    for rows in (np.array([5, 3, 3, 250]), np.array([7]), np.arange(300) % 7 == 0):
        np.testing.assert_array_equal(counts[rows].toarray(), x[rows].toarray())
    assert counts[np.array([], int)].shape == (0, 60)


def test_backed_counts_refuses_a_dense_or_csc_matrix(files, tmp_path):
    adata, _, _ = files
    with pytest.raises(TypeError, match="CSR matrix on disk"):
        BackedCounts(np.zeros((2, 2)))
    csc = anndata.AnnData(sp.csc_matrix(adata.X))
    csc.write_h5ad(tmp_path / "csc.h5ad")
    backed = read_backed(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSC matrix on disk"):
        SCAR.setup_anndata(backed)


def test_read_backed_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_backed(tmp_path / "nothing.h5ad")
    (tmp_path / "empty.zarr").mkdir()
    import zarr

    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(ValueError, match="has no X"):
        read_backed(tmp_path / "empty.zarr")


# ---------------------------------------------------------------------------------------------- prefetch
def test_prefetch_keeps_order_and_reads_ahead():
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    for item in prefetch(items(), depth=3):
        seen.append(item)
    assert seen == list(range(20)) == produced


def test_prefetch_raises_the_producers_error_at_its_item():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert threading.active_count() == before


# ---------------------------------------------------------------------------------------------- plans
def test_plan_blocks_capacities_are_the_largest_spans():
    rng = np.random.default_rng(0)
    indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 9, 100))])
    rows = np.sort(rng.choice(100, 61, replace=False))
    plan = plan_blocks(indptr, rows[::-1], block_cells=16)  # unsorted input is sorted
    # a block spans about 16 file rows: ceil(16 x 61 / 100) = 10 selected cells
    assert [len(g) for g in plan.groups] == [10, 10, 10, 10, 10, 10, 1]
    np.testing.assert_array_equal(np.concatenate(plan.groups), rows)
    spans = [(g[0], g[-1] + 1) for g in plan.groups]
    assert plan.row_capacity == max(b - a for a, b in spans)
    assert plan.nnz_capacity == max(indptr[b] - indptr[a] for a, b in spans)
    # training blocks hold whole minibatches: a multiple of the batch size, only the last one partial
    assert [len(g) for g in plan_blocks(indptr, rows, block_cells=16, multiple=4).groups] == [12] * 5 + [1]
    assert len(plan_blocks(indptr, rows, block_cells=1000).groups) == 1


# ---------------------------------------------------------------------------------------------- training
def trained(adata, epochs: int = 2, **train_kwargs) -> SCAR:
    SCAR.setup_anndata(adata)
    model = SCAR(adata, n_hidden=32, n_latent=5)
    model.train(max_epochs=epochs, enable_progress_bar=False, **train_kwargs)
    return model


def max_difference(a: SCAR, b: SCAR) -> float:
    diffs = jax.tree.map(lambda u, v: float(np.abs(np.asarray(u) - np.asarray(v)).max()), a.variables, b.variables)
    return max(jax.tree.leaves(diffs))


@pytest.fixture(scope="module")
def in_memory_model(files):
    adata, _, _ = files
    return trained(adata.copy())


@pytest.mark.parametrize("store", ["h5ad", "zarr"])
def test_streamed_training_with_one_block_equals_in_memory(files, in_memory_model, store):
    adata, h5ad, zarr_path = files
    before = digest(h5ad)
    backed = read_backed(h5ad if store == "h5ad" else zarr_path)
    model = trained(backed)
    # one block holds every training cell: the same minibatches, so the same parameters, bit for bit
    assert max_difference(model, in_memory_model) == 0.0
    np.testing.assert_array_equal(
        model.history["elbo_train"].to_numpy(), in_memory_model.history["elbo_train"].to_numpy()
    )
    # validation cells get other sampling keys when streamed (local rows): same quantity, close values
    np.testing.assert_allclose(
        model.history["elbo_validation"].to_numpy(), in_memory_model.history["elbo_validation"].to_numpy(), rtol=0.05
    )
    assert digest(h5ad) == before  # the user's file is not modified


def test_streamed_blocks_equal_for_disk_and_memory_and_train(files, in_memory_model, monkeypatch):
    adata, h5ad, _ = files
    rows_read = []  # the rows of every block whose parameter-free log-likelihood is computed
    compute = backed.cell_log_constants
    monkeypatch.setattr(
        backed, "cell_log_constants", lambda law, x, *a: rows_read.append(x.shape[0]) or compute(law, x, *a)
    )
    from_disk = trained(read_backed(h5ad), block_cells=64)
    # once per block, not every epoch: the training and the validation spans cover the file at most once each
    assert 0 < sum(rows_read) <= 2 * adata.n_obs, rows_read
    from_memory = trained(adata.copy(), block_cells=64)
    assert max_difference(from_disk, from_memory) == 0.0  # the block plan and order depend on the rows only
    assert max_difference(from_disk, in_memory_model) > 0.0  # minibatches within blocks differ from one pool
    losses = from_disk.history["elbo_train"].to_numpy().ravel()
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_block_cells_needs_sparse_counts(files):
    adata, _, _ = files
    dense = anndata.AnnData(adata.X.toarray())
    SCAR.setup_anndata(dense)
    model = SCAR(dense, n_hidden=16, n_latent=3)
    with pytest.raises(ValueError, match="block_cells streams sparse counts"):
        model.train(max_epochs=1, block_cells=50, enable_progress_bar=False)
    with pytest.raises(ValueError, match="block_cells"):
        trained(adata.copy(), epochs=1, block_cells=0)


def test_backed_counts_are_validated(tmp_path):
    x = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, np.nan]], np.float32))
    anndata.AnnData(x).write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(ValueError, match="adata.X contains NaN"):
        SCAR.setup_anndata(read_backed(tmp_path / "nan.h5ad"))


# ---------------------------------------------------------------------------------------------- inference
def test_inference_on_backed_counts_equals_in_memory(files, in_memory_model):
    adata, h5ad, _ = files
    backed = read_backed(h5ad)
    SCAR.setup_anndata(backed)
    np.testing.assert_array_equal(
        in_memory_model.get_latent_representation(backed), in_memory_model.get_latent_representation()
    )
    np.testing.assert_array_equal(
        in_memory_model.get_denoised_counts(backed).toarray(), in_memory_model.get_denoised_counts().toarray()
    )


@pytest.mark.parametrize("method", ["split", None])  # None: the default, "calibrated" for mRNA
def test_write_denoised_counts_block_by_block(files, in_memory_model, tmp_path, method):
    adata, h5ad, _ = files
    before = digest(h5ad)
    backed = read_backed(h5ad)
    SCAR.setup_anndata(backed)
    out = tmp_path / "denoised.h5ad"
    options = {"n_samples": 3, "seed": 4, "method": method}
    in_memory_model.write_denoised_counts(out, backed, block_cells=70, **options, progress_bar=False)
    written = anndata.read_h5ad(out)
    expected = in_memory_model.get_denoised_counts(**options)  # in memory, whole: the same numbers
    assert written.X is None and list(written.layers) == ["denoised"]
    assert list(written.obs_names) == list(adata.obs_names) and list(written.var_names) == list(adata.var_names)
    layer = written.layers["denoised"]
    assert sp.issparse(layer) and layer.shape == adata.shape
    np.testing.assert_array_equal(layer.toarray(), expected.toarray())
    assert (layer <= adata.X).toarray().all()  # never above the observed counts
    if method is None:  # the calibration removes something, and less than the model's split
        split = in_memory_model.get_denoised_counts(**{**options, "method": "split"})
        assert split.sum() < layer.sum() < adata.X.sum()
    with pytest.raises(ValueError, match="already exists"):
        in_memory_model.write_denoised_counts(out, backed, progress_bar=False)
    assert not list(tmp_path.glob("*.partial")) and digest(h5ad) == before


def test_write_denoised_counts_leaves_no_partial_file_on_error(files, in_memory_model, tmp_path, monkeypatch):
    adata, _, _ = files

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(predict, "split_counts", broken)
    monkeypatch.setattr(predict, "calibrated_split", broken)
    for method in ("split", "calibrated"):
        with warnings.catch_warnings(), pytest.raises(OSError, match="disk full"):
            in_memory_model.write_denoised_counts(tmp_path / "x.h5ad", method=method, progress_bar=False)
        assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="method must be 'calibrated' or 'split'"):
        in_memory_model.write_denoised_counts(tmp_path / "y.h5ad", method="expected", progress_bar=False)
    with pytest.raises(ValueError, match="layer must be"):
        in_memory_model.write_denoised_counts(tmp_path / "y.h5ad", layer="", progress_bar=False)
