"""The stored entries of a calibration (the union of the counts' and the pooled counts' patterns), in blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

from .knn import _pool

CHUNK_ENTRIES = 1 << 20  # cells x genes per chunk of rows, and stored entries per block, of the loop's temporaries
_HOST_ENTRIES = 1 << 20  # cells x genes per chunk of rows when the stored entries are built on the host
_MAX_ENTRIES = np.iinfo(np.int32).max - 1  # stored entries: their positions and rows are int32 on the device


def _stored_entries(
    x: sp.csr_matrix, neighbours: np.ndarray, alpha: float, block: int
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """The union of the stored entries of canonical CSR counts ``x`` and of their pooled counts, row-major, in
    blocks of ``block`` entries (:class:`_Problem`; ``block`` is lowered to the number of entries if larger).

    Returns the arrays of :class:`_Problem`'s entries ``(n_blocks, block)`` (``row``, ``col`` int32; ``pooled``,
    ``counts`` and ``lgamma_ratio``, computed in float64, float32), the positions of the entries of ``x`` among
    them ``(x.nnz,)`` and the number of entries before padding. Built in chunks of rows, so the temporaries
    are bounded by a chunk. A cell is its own neighbour (as :func:`knn_indices` makes it), so the union is
    usually the pooled pattern; otherwise entries are looked up."""
    n, n_genes = x.shape
    rows_per_chunk = max(1, _HOST_ENTRIES // max(n_genes, 1))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("row", "col", "pooled", "counts", "lgamma_ratio")}
    at_x, offset = [], 0
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        own = x[start:stop]
        pooled = sp.csr_matrix(_pool(x, neighbours[start:stop]))
        pooled.sum_duplicates()
        union = sp.csr_matrix(pooled + own)  # both non-negative: the union of the two patterns
        union.sum_duplicates()
        if offset + union.nnz > _MAX_ENTRIES:
            raise ValueError(
                f"the calibration would hold more than {_MAX_ENTRIES:,} stored neighbourhood entries "
                f"({offset + union.nnz:,} in the first {stop:,} of {n:,} cells): use method='split', fewer genes "
                f"or fewer neighbours (n_neighbours)"
            )
        local_row = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(union.indptr))
        key = local_row * n_genes + union.indices  # increasing

        def positions(m: sp.csr_matrix, key=key) -> np.ndarray:
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
        parts["row"].append((local_row + start).astype(np.int32))
        parts["col"].append(union.indices.astype(np.int32))
        parts["pooled"].append(X.astype(np.float32))
        parts["counts"].append(counts)
        parts["lgamma_ratio"].append((gammaln(X + alpha) - gammaln(alpha)).astype(np.float32))
        at_x.append((own_at + offset).astype(np.int32))
        offset += union.nnz
    block = max(1, min(int(block), offset))
    dtypes = {"row": np.int32, "col": np.int32}
    padded = {
        name: _in_blocks(chunks, block, n - 1 if name == "row" else 0, dtypes.get(name, np.float32))
        for name, chunks in parts.items()
    }
    return padded, np.concatenate(at_x) if at_x else np.zeros(0, np.int32), offset


def _in_blocks(chunks: list[np.ndarray], block: int, fill, dtype) -> np.ndarray:
    """The arrays of ``chunks`` end to end as ``(n_blocks, block)`` (at least one block), the rest ``fill``.

    ``chunks`` is emptied as it is copied, so each chunk can be freed once copied."""
    size = sum(chunk.size for chunk in chunks)
    out = np.empty(max(1, -(-size // block)) * block, dtype)
    at = 0
    while chunks:
        chunk = chunks.pop(0)
        out[at : at + chunk.size] = chunk
        at += chunk.size
    out[at:] = fill
    return out.reshape(-1, block)


def _blocks_of(positions: np.ndarray, block: int) -> jax.Array:
    """``positions`` ``(m,)`` as ``(ceil(m / block), block)`` int32, the last block padded with position 0."""
    return jnp.asarray(_in_blocks([positions], block, 0, np.int32))
