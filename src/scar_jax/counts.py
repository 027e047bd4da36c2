"""Count matrices resident on an XLA device, densified one minibatch at a time.

A dense input stays a dense ``(n_cells, n_genes)`` float32 array. A sparse input stays CSR on the
device (:class:`CsrCounts`: ``indptr``, ``indices``, ``data`` in narrow exact dtypes, i.e. 4 bytes per
non-zero on droplet data, half the host CSR, with no padding). Taking a minibatch of rows gathers
their entries into ``len(rows) * max_row_nnz`` slots (a static shape; the same work as the padded
format) and scatters them into a ``(batch, n_genes)`` dense block inside the compiled step, so the
full matrix is never densified. The padded row format (:class:`EllCounts`, every row padded to the
longest) costs ``8 * n_cells * max_row_nnz`` bytes, 1.8-3x the CSR on droplet data; it remains for
matrices with 2**31 or more non-zeros, whose offsets do not fit the int32 indices JAX uses by default.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp


class DenseCounts(flax.struct.PyTreeNode):
    x: jax.Array  # (n_cells, n_genes) float32

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]

    def take(self, rows: jax.Array) -> jax.Array:
        """Dense ``(len(rows), n_genes)`` float32 block of the given rows."""
        return self.x[rows]


class EllCounts(flax.struct.PyTreeNode):
    cols: jax.Array  # (n_cells, max_row_nnz) int32, padding column 0
    vals: jax.Array  # (n_cells, max_row_nnz) float32, padding value 0
    n_genes: int = flax.struct.field(pytree_node=False)

    @property
    def n_cells(self) -> int:
        return self.cols.shape[0]

    def take(self, rows: jax.Array) -> jax.Array:
        """Dense ``(len(rows), n_genes)`` float32 block of the given rows."""
        cols, vals = self.cols[rows], self.vals[rows]
        out = jnp.zeros((rows.shape[0], self.n_genes), jnp.float32)
        row_ids = jnp.broadcast_to(jnp.arange(rows.shape[0])[:, None], cols.shape)
        return out.at[row_ids, cols].add(vals)


class CsrCounts(flax.struct.PyTreeNode):
    indptr: jax.Array  # (n_cells + 1,) int32 row offsets
    indices: jax.Array  # (nnz,) column of every stored entry: uint16 up to 65,536 genes, else int32
    data: jax.Array  # (nnz,) stored counts: uint16 when all are <= 65,535, else float32 (cast per minibatch)
    n_genes: int = flax.struct.field(pytree_node=False)
    max_row_nnz: int = flax.struct.field(pytree_node=False)  # non-zeros of the longest row

    @property
    def n_cells(self) -> int:
        return self.indptr.shape[0] - 1

    def take(self, rows: jax.Array) -> jax.Array:
        """Dense ``(len(rows), n_genes)`` float32 block of the given rows.

        Row ``r``'s entries are ``indptr[rows[r]] + j`` for ``j < max_row_nnz``, valid where ``j`` is below
        the row's length: a ``(len(rows), max_row_nnz)`` gather (the padded format's work, without storing
        the padding) written into the dense block; invalid slots point past the last column and are dropped.
        The write is a scatter with unique, sorted indices: each stored row's columns must be unique and
        increasing (canonical CSR, as :func:`to_device` and the streamed blocks make it).
        """
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        slot = jnp.arange(max(self.max_row_nnz, 1), dtype=starts.dtype)
        valid = slot[None, :] < lengths[:, None]
        entry = jnp.where(valid, starts[:, None] + slot[None, :], 0)
        vals = self.data[entry].astype(jnp.float32)
        cols = jnp.where(valid, self.indices[entry].astype(jnp.int32), self.n_genes)
        row_ids = jnp.broadcast_to(jnp.arange(rows.shape[0])[:, None], entry.shape)
        out = jnp.zeros((rows.shape[0], self.n_genes), jnp.float32)
        return out.at[row_ids, cols].set(vals, mode="drop", unique_indices=True, indices_are_sorted=True)


HOST_CHUNK_ENTRIES = 1 << 24  # entries converted per step on the host (bounds every temporary)


def aligned_empty(n: int, dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised 1-d array of ``n`` entries whose data start on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + n * dtype.itemsize].view(dtype)


def aligned_copy(values: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """A 64-byte aligned copy of a 1-d array in ``dtype``, filled in chunks of ``HOST_CHUNK_ENTRIES``.

    On XLA's CPU backend ``jax.device_put`` aliases 64-byte aligned host arrays instead of copying them, so
    the device array *is* this buffer there; elsewhere it is a staging copy freed after the transfer.
    """
    out = aligned_empty(values.size, dtype)
    for start in range(0, values.size, HOST_CHUNK_ENTRIES):
        out[start : start + HOST_CHUNK_ENTRIES] = values[start : start + HOST_CHUNK_ENTRIES]
    return out


def max_value(values: np.ndarray) -> float:
    """Largest entry of a 1-d array (0 when empty), computed in chunks."""
    return max(
        (float(values[s : s + HOST_CHUNK_ENTRIES].max()) for s in range(0, values.size, HOST_CHUNK_ENTRIES)),
        default=0.0,
    )


def narrow_dtypes(n_genes: int, max_count: float) -> tuple[type, type]:
    """Exact device dtypes of the column indices and counts: uint16 where they fit, else int32 / float32."""
    index_dtype = np.uint16 if n_genes <= 2**16 else np.int32
    data_dtype = np.uint16 if max_count <= np.iinfo(np.uint16).max else np.float32
    return index_dtype, data_dtype


def csr_to_device(
    x: sp.csr_matrix, device: jax.Device | jax.sharding.Sharding | None = None, max_count: float | None = None
) -> CsrCounts:
    """Move a canonical CSR matrix of counts to the device as :class:`CsrCounts`, in narrow exact dtypes.

    Column indices are stored as uint16 when there are at most 65,536 genes (else int32) and counts as
    uint16 when none exceeds 65,535 (else float32, exact for integers up to 2**24), so the device copy
    takes 4 bytes per non-zero on droplet data, half the host CSR (int32 indices + 4-byte values). The
    narrow copies are made in chunks into 64-byte aligned buffers (:func:`aligned_copy`): on the CPU
    backend they become the device arrays without another copy. The input is not modified. ``max_count``
    (the largest count, when the caller knows it) saves a pass over the values.
    """
    if x.nnz >= 2**31:
        raise ValueError(f"{x.nnz} non-zeros do not fit int32 offsets; use the padded format (EllCounts)")
    index_dtype, data_dtype = narrow_dtypes(x.shape[1], max_value(x.data) if max_count is None else max_count)
    if x.nnz == 0:  # one never-read entry, so that the gathers have an array to index
        indices, data = np.zeros(1, index_dtype), np.zeros(1, data_dtype)
    else:
        indices, data = aligned_copy(x.indices, index_dtype), aligned_copy(x.data, data_dtype)
    return CsrCounts(
        jax.device_put(aligned_copy(x.indptr, np.int32), device),
        jax.device_put(indices, device),
        jax.device_put(data, device),
        n_genes=x.shape[1],
        max_row_nnz=int(np.diff(x.indptr).max(initial=0)),
    )


ELL_CHUNK_ENTRIES = 1 << 22  # padded entries filled per chunk of rows (bounds the temporaries)


def csr_to_ell(x: sp.csr_matrix | sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """Padded ``(cols, vals)`` arrays, each ``(n_cells, max_row_nnz)``, of a CSR matrix (host side).

    Filled in chunks of rows, so the index temporaries are bounded by ``ELL_CHUNK_ENTRIES`` instead of
    several ``nnz``-long int64 arrays; the input is not modified (a non-canonical matrix, with duplicate or
    unsorted entries, is canonicalised on a copy).
    """
    x = sp.csr_matrix(x)
    if not x.has_canonical_format:
        x = x.copy()
        x.sum_duplicates()
    indptr = x.indptr
    row_nnz = np.diff(indptr)
    n_cells = x.shape[0]
    width = max(int(row_nnz.max(initial=0)), 1)
    cols = np.zeros((n_cells, width), np.int32)
    vals = np.zeros((n_cells, width), np.float32)
    step = max(1, ELL_CHUNK_ENTRIES // width)
    for start in range(0, n_cells, step):
        stop = min(start + step, n_cells)
        first, last = int(indptr[start]), int(indptr[stop])
        counts = row_nnz[start:stop]
        rows = np.repeat(np.arange(start, stop, dtype=np.int64), counts)
        pos = np.arange(last - first, dtype=np.int64) - np.repeat(indptr[start:stop] - first, counts)
        cols[rows, pos] = x.indices[first:last]
        vals[rows, pos] = x.data[first:last]
    return cols, vals


def to_device(
    x: np.ndarray | sp.spmatrix | sp.sparray,
    device: jax.Device | jax.sharding.Sharding | None = None,
    max_count: float | None = None,
) -> DenseCounts | CsrCounts | EllCounts:
    """Move a host count matrix to the device: dense stays dense, sparse becomes :class:`CsrCounts`
    (:class:`EllCounts` from 2**31 non-zeros on). The input is not modified (a non-canonical matrix, with
    duplicate or unsorted entries, is canonicalised on a copy)."""
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        if not x.has_canonical_format:
            x = x.copy()
            x.sum_duplicates()
            max_count = None  # summed duplicates can exceed the largest stored value
        if x.nnz < 2**31:
            return csr_to_device(x, device, max_count)
        cols, vals = csr_to_ell(x)
        return EllCounts(jax.device_put(cols, device), jax.device_put(vals, device), n_genes=x.shape[1])
    return DenseCounts(jax.device_put(np.asarray(x, np.float32), device))
