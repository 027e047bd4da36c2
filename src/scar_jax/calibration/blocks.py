"""The stored entries of a calibration (the union of the counts' and the pooled counts' patterns), spilled to disk.

The entries are built once on the host, in chunks of rows, and written to a temporary directory; each round of
the loop reads them back in blocks of a fixed number of entries. Recomputing them each round instead (a sparse
product over ``k`` neighbours' rows, the union of two patterns and ``lgamma`` per entry) costs the whole build
again every round, several times the round itself, while reading a block back is a sequential read that the
page cache usually serves: the spill is kept. Each block is read into freshly allocated arrays
(``numpy.fromfile``, not a memory map, whose pages would count in the resident memory), so the host holds only
the blocks in flight.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

from .knn import _pool

CHUNK_ENTRIES = 1 << 20  # cells x genes per chunk of rows of the loop's zero-count sums (float32 temporaries)
BLOCK_ENTRIES = 1 << 21  # stored entries per block read back and processed by one compiled call
_HOST_ENTRIES = 1 << 20  # cells x genes per chunk of rows when the stored entries are built on the host
_GATHER_ENTRIES = 1 << 23  # stored counts of the neighbours' rows gathered per chunk of rows when pooling
# What each stored entry keeps on disk: row and column (int32), the pooled count, lgamma(X + alpha) - lgamma(alpha)
# (computed in float64) and the cell's own count (float32), and whether it is an entry of the counts (uint8).
FIELDS = {
    "row": np.int32,
    "col": np.int32,
    "pooled": np.float32,
    "lgamma_ratio": np.float32,
    "counts": np.float32,
    "own": np.uint8,
}
ENTRY_BYTES = sum(np.dtype(t).itemsize for t in FIELDS.values())  # 21


class EntryStore:
    """The stored entries of counts ``x`` and of their pooled counts, row-major, in a temporary directory.

    Use as a context manager (the directory is removed on exit). :meth:`blocks` yields them as dicts of
    :data:`FIELDS` arrays ``(block,)``, the last block padded with ``(row, col) = (n - 1, 0)`` and zeros
    (which adds exactly zero to every sum of the loop), with the number of real entries."""

    def __init__(self, x: sp.csr_matrix, neighbours: np.ndarray, columns: np.ndarray | None, alpha: float):
        """Build the entries of canonical CSR ``x`` ``(n, G)`` with ``neighbours`` ``(n, k)``; ``columns``: the
        genes kept (``None``: all), renumbered from 0."""
        self.n_cells = x.shape[0]
        self.n_genes = x.shape[1] if columns is None else columns.size
        self._dir = tempfile.TemporaryDirectory(prefix="scar_jax_calibration_")
        self.n_entries = 0
        files = {name: open(self._path(name), "wb") for name in FIELDS}
        try:
            for start, stop in _build_chunks(x, neighbours.shape[1]):
                entries = _chunk_entries(x, neighbours, columns, alpha, start, stop)
                for name, dtype in FIELDS.items():
                    np.ascontiguousarray(entries[name], dtype).tofile(files[name])
                self.n_entries += entries["row"].size
        finally:
            for f in files.values():
                f.close()

    def _path(self, name: str) -> str:
        return os.path.join(self._dir.name, name)

    def __enter__(self) -> EntryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary directory."""
        self._dir.cleanup()

    def blocks(self, block: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """The entries in blocks of ``block`` (at least one block), each with its number of real entries."""
        files = {name: open(self._path(name), "rb") for name in FIELDS}
        try:
            for start in range(0, max(self.n_entries, 1), block):
                size = min(block, self.n_entries - start)
                out = {name: np.fromfile(files[name], dtype, count=size) for name, dtype in FIELDS.items()}
                if size < block:
                    fill = {"row": self.n_cells - 1}
                    out = {name: np.r_[a, np.full(block - size, fill.get(name, 0), a.dtype)] for name, a in out.items()}
                yield out, size
        finally:
            for f in files.values():
                f.close()


def _build_chunks(x: sp.csr_matrix, k: int) -> Iterator[tuple[int, int]]:
    """Row ranges of at most ``_HOST_ENTRIES`` cells x genes whose neighbours' rows hold at most
    ``_GATHER_ENTRIES`` stored counts (at least one row each)."""
    n, n_genes = x.shape
    widest = int(np.diff(x.indptr).max()) if n and x.nnz else 1
    rows = max(1, min(_HOST_ENTRIES // max(n_genes, 1), _GATHER_ENTRIES // max(k * widest, 1)))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _chunk_entries(x, neighbours, columns, alpha: float, start: int, stop: int) -> dict[str, np.ndarray]:
    """The stored entries of rows ``start:stop`` (:data:`FIELDS`). A cell is its own neighbour (as
    :func:`knn_indices` makes it), so the union is usually the pooled pattern; otherwise entries are looked up."""
    n_genes = x.shape[1] if columns is None else columns.size
    own = sp.csr_matrix(x[start:stop], dtype=np.float64)
    pooled = sp.csr_matrix(_pool(x, neighbours[start:stop], columns))
    if columns is not None:
        own = sp.csr_matrix(own[:, columns])
    pooled.sum_duplicates()
    union = sp.csr_matrix(pooled + own)  # both non-negative: the union of the two patterns
    union.sum_duplicates()
    local_row = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(union.indptr))
    key = local_row * n_genes + union.indices  # increasing

    def positions(m: sp.csr_matrix) -> np.ndarray:
        m_row = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
        return np.searchsorted(key, m_row * n_genes + m.indices)

    if union.nnz == pooled.nnz:  # the same pattern: the pooled counts are aligned with the union
        X = pooled.data
    else:
        X = np.zeros(union.nnz)
        X[positions(pooled)] = pooled.data
    own_at = positions(own)
    counts = np.zeros(union.nnz, np.float32)
    counts[own_at] = own.data
    flag = np.zeros(union.nnz, np.uint8)
    flag[own_at] = 1
    return {
        "row": local_row + start,
        "col": union.indices,
        "pooled": X,
        "lgamma_ratio": gammaln(X + alpha) - gammaln(alpha),
        "counts": counts,
        "own": flag,
    }


def stored_entries_bound(x: sp.csr_matrix, neighbours: np.ndarray, n_genes: int) -> int:
    """An upper bound of the number of stored entries: ``sum_i min(G, nnz_i + sum_{j in J(i)} nnz_j)``."""
    per_row = np.diff(x.indptr).astype(np.int64)
    bound = 0
    for start in range(0, neighbours.shape[0], 1 << 16):
        rows = neighbours[start : start + (1 << 16)]
        bound += int(np.minimum(per_row[rows].sum(1) + per_row[start : start + rows.shape[0]], n_genes).sum())
    return bound
