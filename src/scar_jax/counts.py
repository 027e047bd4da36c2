"""Count matrices resident on an XLA device, densified one minibatch at a time.

A dense input stays a dense ``(n_cells, n_genes)`` float32 array. A sparse input is stored in a
padded row format (ELL): for every cell the column indices and values of its non-zero entries,
padded to the largest row with (column 0, value 0). Taking a minibatch of rows scatters those
entries into a ``(batch, n_genes)`` dense block inside the compiled step, so the full matrix is never
densified. ELL costs ``8 * n_cells * max_row_nnz`` bytes; CSR would be smaller but is not sliceable by
row inside ``jax.jit`` with static shapes.
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


def to_device(x: np.ndarray | sp.spmatrix | sp.sparray, device: jax.Device | None = None) -> DenseCounts | EllCounts:
    """Move a host count matrix to the device: dense stays dense, sparse becomes :class:`EllCounts`."""
    if sp.issparse(x):
        cols, vals = csr_to_ell(x)
        return EllCounts(jax.device_put(cols, device), jax.device_put(vals, device), n_genes=x.shape[1])
    return DenseCounts(jax.device_put(np.asarray(x, np.float32), device))
