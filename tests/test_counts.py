"""Tests of the device count containers (``scar_jax.counts``) against dense NumPy oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

import scar_jax.counts as counts_module
from scar_jax.counts import CsrCounts, DenseCounts, EllCounts, csr_to_device, csr_to_ell, to_device


def ell_to_dense(cols: np.ndarray, vals: np.ndarray, n_genes: int) -> np.ndarray:
    """NumPy oracle: scatter-add the padded (col, val) entries of every row into a dense matrix."""
    out = np.zeros((cols.shape[0], n_genes), np.float64)
    rows = np.broadcast_to(np.arange(cols.shape[0])[:, None], cols.shape)
    np.add.at(out, (rows.ravel(), cols.ravel()), vals.ravel().astype(np.float64))
    return out


def random_counts(n_cells: int = 12, n_genes: int = 9, density: float = 0.3, seed: int = 0) -> np.ndarray:
    """Integer counts with some all-zero rows (rows 2 and 7) and one full row (row 4)."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    x[2] = 0
    x[7] = 0
    x[4] = rng.integers(1, 5, n_genes)
    return x.astype(np.float32)


# ---------------------------------------------------------------- csr_to_ell


def test_csr_to_ell_round_trip_exact():
    dense = random_counts()
    cols, vals = csr_to_ell(sp.csr_matrix(dense))
    # width = max non-zeros per row (row 4 is full)
    assert cols.shape == vals.shape == (dense.shape[0], dense.shape[1])
    assert cols.dtype == np.int32 and vals.dtype == np.float32
    np.testing.assert_array_equal(ell_to_dense(cols, vals, dense.shape[1]), dense)


def test_csr_to_ell_zero_rows_are_padding_only():
    dense = random_counts()
    cols, vals = csr_to_ell(sp.csr_matrix(dense))
    for r in (2, 7):  # all-zero rows: only (column 0, value 0) padding
        np.testing.assert_array_equal(cols[r], 0)
        np.testing.assert_array_equal(vals[r], 0)
    # every row: exactly its non-zeros are non-zero values, the rest is (0, 0) padding
    nnz = (dense != 0).sum(axis=1)
    np.testing.assert_array_equal((vals != 0).sum(axis=1), nnz)
    np.testing.assert_array_equal(cols[vals == 0], 0)


def test_csr_to_ell_width_is_max_row_nnz():
    dense = np.zeros((4, 10), np.float32)
    dense[1, [2, 5, 9]] = [1, 2, 3]
    dense[3, 0] = 7
    cols, vals = csr_to_ell(sp.csr_array(dense))
    assert cols.shape == (4, 3)
    np.testing.assert_array_equal(cols[1], [2, 5, 9])
    np.testing.assert_array_equal(vals[1], [1, 2, 3])
    np.testing.assert_array_equal(cols[3], [0, 0, 0])
    np.testing.assert_array_equal(vals[3], [7, 0, 0])
    np.testing.assert_array_equal(ell_to_dense(cols, vals, 10), dense)


def test_csr_to_ell_sums_duplicates():
    # CSR with repeated (row, col) entries: 2+3 at (0, 1), 1+1+1 at (2, 4); row 1 empty
    cols_in = np.array([1, 1, 3, 4, 4, 4])
    data = np.array([2.0, 3.0, 4.0, 1.0, 1.0, 1.0])
    x = sp.csr_matrix((data, cols_in, np.array([0, 3, 3, 6])), shape=(3, 5))
    assert x.nnz == 6  # duplicates stored, not yet summed
    expected = np.zeros((3, 5))
    expected[0, 1], expected[0, 3], expected[2, 4] = 5.0, 4.0, 3.0
    cols, vals = csr_to_ell(x)
    assert cols.shape == (3, 2)  # after summing: 2 non-zeros in row 0, 1 in row 2
    np.testing.assert_array_equal(ell_to_dense(cols, vals, 5), expected)
    np.testing.assert_array_equal(x.toarray(), expected)  # the input still represents the same matrix


def test_csr_to_ell_all_zero_matrix():
    cols, vals = csr_to_ell(sp.csr_matrix((5, 6), dtype=np.float32))
    assert cols.shape == vals.shape == (5, 1)  # width at least 1
    np.testing.assert_array_equal(cols, 0)
    np.testing.assert_array_equal(vals, 0)
    counts = to_device(sp.csr_matrix((5, 6), dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(counts.take(jnp.arange(5))), np.zeros((5, 6)))


def test_csr_to_ell_accepts_csc():
    dense = random_counts(seed=3)
    cols, vals = csr_to_ell(sp.csc_matrix(dense))
    np.testing.assert_array_equal(ell_to_dense(cols, vals, dense.shape[1]), dense)


# ---------------------------------------------------------------- EllCounts.take


@pytest.fixture(scope="module")
def dense_and_ell():
    dense = random_counts(n_cells=15, n_genes=11, seed=1)
    cols, vals = csr_to_ell(sp.csr_matrix(dense))
    return dense, EllCounts(jnp.asarray(cols), jnp.asarray(vals), n_genes=dense.shape[1])


@pytest.mark.parametrize(
    "rows",
    [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [14, 2, 7, 4],
        [3, 3, 2, 3, 7, 7],  # repeated rows, including an all-zero one
        [9],
    ],
)
def test_ell_take_equals_dense_rows(dense_and_ell, rows):
    dense, counts = dense_and_ell
    assert isinstance(counts, EllCounts)
    got = counts.take(jnp.asarray(rows, jnp.int32))
    assert got.shape == (len(rows), dense.shape[1]) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), dense[rows])


def test_ell_take_inside_jit(dense_and_ell):
    dense, counts = dense_and_ell
    rows = np.array([5, 0, 5, 7, 14, 2], np.int32)
    got = jax.jit(lambda c, r: c.take(r))(counts, jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(got), dense[rows])
    # EllCounts is a pytree whose n_genes is static: jit over it with other rows works too
    got2 = jax.jit(lambda c, r: c.take(r).sum(axis=1))(counts, jnp.asarray(rows[::-1].copy()))
    np.testing.assert_array_equal(np.asarray(got2), dense[rows[::-1]].sum(axis=1))


def test_dense_take_equals_rows():
    dense = random_counts(seed=2)
    counts = to_device(dense)
    rows = np.array([1, 1, 0, 11], np.int32)
    np.testing.assert_array_equal(np.asarray(counts.take(jnp.asarray(rows))), dense[rows])
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda c, r: c.take(r))(counts, jnp.asarray(rows))), dense[rows])


# ---------------------------------------------------------------- to_device / n_cells


def test_to_device_dense_input():
    dense = random_counts().astype(np.int64)
    counts = to_device(dense)
    assert isinstance(counts, DenseCounts)
    assert counts.x.dtype == jnp.float32
    assert counts.n_cells == dense.shape[0] == 12
    np.testing.assert_array_equal(np.asarray(counts.x), dense)


@pytest.mark.parametrize("fmt", [sp.csr_matrix, sp.csc_matrix, sp.csr_array, sp.csc_array])
def test_to_device_sparse_input(fmt):
    dense = random_counts(n_cells=13, n_genes=8, seed=4)
    counts = to_device(fmt(dense))
    assert isinstance(counts, CsrCounts)
    assert counts.n_cells == 13
    assert counts.n_genes == 8
    assert counts.max_row_nnz == int((dense != 0).sum(axis=1).max()) == 8
    np.testing.assert_array_equal(np.asarray(counts.take(jnp.arange(13))), dense)


def test_n_cells_of_device_containers():
    assert to_device(np.ones((3, 2))).n_cells == 3
    assert to_device(sp.csr_matrix(np.eye(7, 4))).n_cells == 7


# ---------------------------------------------------------------- CsrCounts (the sparse default)


@pytest.mark.parametrize("seed", range(6))
def test_csr_take_equals_dense_rows_random(seed):
    """Random shapes and densities (empty rows, a matrix of all zeros), random rows with repeats, in jit."""
    rng = np.random.default_rng(seed)
    n, g = int(rng.integers(1, 40)), int(rng.integers(1, 30))
    dense = (rng.poisson(2, (n, g)) * (rng.random((n, g)) < rng.random())).astype(np.float32)
    if seed == 0:
        dense[:] = 0
    counts = to_device(sp.csr_matrix(dense))
    assert isinstance(counts, CsrCounts)
    take = jax.jit(lambda c, r: c.take(r))
    for m in (1, 2, 5, 17, 64):
        rows = rng.integers(0, n, m)
        got = take(counts, jnp.asarray(rows, jnp.int32))
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), dense[rows])


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.int32, np.float32, np.uint16])
def test_csr_to_device_stores_narrow_exact_dtypes(dtype):
    dense = random_counts(n_cells=9, n_genes=7, seed=5).astype(dtype)
    x = sp.csr_matrix(dense)
    counts = csr_to_device(x)
    # <= 65,536 genes and counts <= 65,535: 2 + 2 bytes per non-zero, half of the host CSR's 8
    assert counts.indptr.dtype == jnp.int32
    assert counts.indices.dtype == counts.data.dtype == jnp.uint16
    assert counts.indices.shape == (x.nnz,)  # no padding stored
    np.testing.assert_array_equal(np.asarray(counts.take(jnp.arange(9))), dense.astype(np.float32))


def test_csr_to_device_widens_for_large_counts_and_many_genes():
    x = sp.csr_matrix((np.array([70_000.0, 3.0, 65_535.0]), np.array([1, 69_999, 5]), np.array([0, 2, 3])), (2, 70_000))
    counts = csr_to_device(x)
    assert counts.indices.dtype == jnp.int32  # 70,000 genes do not fit uint16 columns
    assert counts.data.dtype == jnp.float32  # a count above 65,535
    got = np.asarray(counts.take(jnp.array([1, 0], jnp.int32)))
    np.testing.assert_array_equal(got[1, [1, 69_999]], [70_000, 3])
    np.testing.assert_array_equal(got[0, 5], 65_535)
    assert got.sum() == 70_000 + 3 + 65_535


def test_aligned_copy_is_aligned_exact_and_chunked(monkeypatch):
    monkeypatch.setattr(counts_module, "HOST_CHUNK_ENTRIES", 7)  # several chunks and a partial last one
    values = np.arange(50, dtype=np.int64) * 3
    out = counts_module.aligned_copy(values, np.uint16)
    assert out.ctypes.data % 64 == 0 and out.dtype == np.uint16
    np.testing.assert_array_equal(out, values)
    assert counts_module.max_value(values) == 147 and counts_module.max_value(values[:0]) == 0


def test_csr_to_device_does_not_modify_a_non_canonical_input():
    x = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([2, 0, 2]), np.array([0, 3, 3])), shape=(2, 4))
    before = (x.data.copy(), x.indices.copy(), x.indptr.copy())
    counts = to_device(x)
    np.testing.assert_array_equal(np.asarray(counts.take(jnp.arange(2))), [[2, 0, 4, 0], [0, 0, 0, 0]])
    for a, b in zip((x.data, x.indices, x.indptr), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_duplicates_summed_past_uint16_are_not_truncated():
    """A non-canonical matrix whose summed duplicates exceed 65,535: the caller's max_count (of the stored
    values) must not pick uint16."""
    x = sp.csr_matrix((np.array([40_000.0, 40_000.0]), np.array([1, 1]), np.array([0, 2])), shape=(1, 3))
    counts = to_device(x, max_count=40_000.0)
    assert counts.data.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(counts.take(jnp.arange(1))), [[0, 80_000, 0]])
