"""Every count-preserving share and split of observed counts, as functions over arrays.

A count ``x_ig`` is native with a share ``w_ig`` in ``[0, 1]``; a count-preserving denoising keeps
``Binomial(x_ig, w_ig)`` of it (or its mean ``x_ig w_ig``), so ``0 <= denoised <= x`` and zeros stay zero.

- :func:`native_share`: the model's share ``w = (1 - eps) phi / ((1 - eps) phi + eps a)`` (JAX).
- :func:`binomial_split`: the split of the model's shares at the stored counts, one NumPy stream per cell
  (``method="split"`` of :meth:`scar_jax.SCAR.get_denoised_counts`).
- :func:`calibrated_split`: the split of the calibrated shares (:mod:`scar_jax.calibration`), one NumPy
  stream over all stored counts (``method="calibrated"``, the default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

__all__ = ["binomial_split", "calibrated_split", "native_share"]


def native_share(native_frequencies: jax.Array, noise_ratio: jax.Array, ambient: jax.Array) -> jax.Array:
    """Posterior native share of each observed count, ``(n, G)`` in [0, 1].

    ``w = (1 - eps) phi / ((1 - eps) phi + eps a)``, and 1 where the ambient mass ``eps a`` is 0: a count the
    ambient cannot produce is native, even where the decoder's sparse ``phi`` is 0 too.
    ``ambient`` is the per-cell profile ``(n, G)`` or one profile ``(1, G)``.
    """
    native = (1.0 - noise_ratio) * native_frequencies
    background = noise_ratio * ambient
    return jnp.where(background > 0, native / jnp.where(background > 0, native + background, 1.0), 1.0)


def binomial_split(counts: sp.csr_matrix, share: sp.csr_matrix, cells: np.ndarray, seed: int, draw: int) -> np.ndarray:
    """``Binomial(x, w)`` for every stored count, on the host, ``(nnz,)`` aligned with ``counts.data``.

    ``counts`` and ``share`` are CSR with the same pattern (canonical: sorted indices, no stored zeros;
    see :func:`scar_jax.posterior.native_share_at_counts`); row ``i`` is the cell ``cells[i]`` and draws from
    its own stream ``numpy.random.default_rng([seed, draw, cells[i]])``, so a cell's result depends neither on
    the chunking nor on which other cells are denoised. NumPy's binomial sampler on the stored counts is used
    rather than ``jax.random.binomial`` over dense chunks, zeros included (see docs/benchmarks.md).
    """
    if share.nnz != counts.nnz or not np.array_equal(share.indptr, counts.indptr):
        raise ValueError("share must have the same sparsity pattern as counts (see native_share_at_counts)")
    n = np.rint(counts.data).astype(np.int64)
    p = np.clip(share.data.astype(np.float64), 0.0, 1.0)
    out = np.empty(counts.nnz, np.float32)
    indptr = counts.indptr
    for i, cell in enumerate(np.asarray(cells, np.int64)):
        start, stop = indptr[i], indptr[i + 1]
        if stop > start:
            out[start:stop] = np.random.default_rng([seed, draw, int(cell)]).binomial(n[start:stop], p[start:stop])
    return out


_SPLIT_ENTRIES = 1 << 22  # calibrated_split: stored counts drawn per call (bounds its int64 and float64 copies)


def canonical_csr(x: sp.spmatrix) -> sp.csr_matrix:
    """``x`` as canonical CSR (sorted indices, no duplicates) in its own dtype: a view of the same arrays when it
    already is one (nothing copied), otherwise one copy."""
    if x.format == "csr" and x.has_canonical_format:
        return sp.csr_matrix(x)
    x = sp.csr_matrix(x, copy=True)
    x.sum_duplicates()
    return x


def _sparse_calibrated_split(x: sp.csr_matrix, share: np.ndarray | sp.csr_matrix, rng) -> sp.csr_matrix:
    """``Binomial(x, share)`` at the stored counts of canonical CSR ``x``, CSR float32 without zeros.

    The draws are made ``_SPLIT_ENTRIES`` counts at a time from the one stream ``rng``, in row order: the same
    values as one call over all counts (NumPy's binomial sampler keeps no state between calls beyond the bit
    generator's), with the integer counts and the float64 shares held a chunk at a time."""
    p = _share_at_counts(x, share)
    data = np.empty(x.nnz, np.float32)
    for start in range(0, x.nnz, _SPLIT_ENTRIES):
        part = slice(start, min(x.nnz, start + _SPLIT_ENTRIES))
        data[part] = rng.binomial(np.rint(x.data[part]).astype(np.int64), p[part])
    out = sp.csr_matrix((data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    out.eliminate_zeros()
    return out


def _share_at_counts(x: sp.csr_matrix, share: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """The share at each stored entry of canonical CSR ``x`` ``(nnz,)``: ``share.data`` when ``share`` has the
    pattern of ``x``, otherwise looked up entry by entry."""
    same = sp.issparse(share) and np.array_equal(share.indptr, x.indptr)
    if same and np.array_equal(share.indices, x.indices):
        return share.data
    row_of = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    return np.asarray(share[row_of, x.indices]).ravel()


def calibrated_split(
    x: np.ndarray | sp.spmatrix,
    share: np.ndarray | sp.csr_matrix,
    seed: int | np.random.Generator = 0,
    return_sparse: bool | None = None,
) -> np.ndarray | sp.csr_matrix:
    """The count-preserving split ``Binomial(x, share)`` of counts ``x`` ``(n, G)`` with native shares ``share``.

    ``share`` as :func:`scar_jax.calibration.calibrate` returns it: dense ``(n, G)``, or for sparse ``x`` CSR at
    the observed entries (``share_at="observed"``; looked up entry by entry if its layout differs from the
    canonical form of ``x``). One ``numpy.random.default_rng(seed)`` stream over the stored entries in
    row order, so the result is reproducible from ``seed``; a ``Generator`` passed as ``seed`` is continued, so
    splitting consecutive row blocks with one generator gives the numbers of one call over all rows (what
    ``write_denoised_counts`` does). Integer, ``0 <= out <= x``, zeros stay zero. ``return_sparse``: CSR output
    (default: when ``x`` is sparse). This is what :meth:`scar_jax.SCAR.get_denoised_counts` returns for
    ``method="calibrated"`` with the same seed.
    """
    rng = np.random.default_rng(seed)
    if sp.issparse(x):
        out = _sparse_calibrated_split(canonical_csr(x), share, rng)
        return out if return_sparse is None or return_sparse else out.toarray()
    out = rng.binomial(np.rint(np.asarray(x)).astype(np.int64), share).astype(np.float32)
    return sp.csr_matrix(out) if return_sparse else out
