"""Neighbourhoods in the latent space and their pooled counts (arrays only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import scipy.sparse as sp

EXACT_KNN_MAX_CELLS = 50_000  # knn_indices: exact neighbours up to this many cells, approximate (pynndescent) above
_KNN_DISTANCE_ENTRIES = 1 << 22  # exact neighbours: distances held per chunk of rows (32 MB of float64)
_AFFINITY_ENTRIES = 1 << 22  # hellinger_affinity: cells x genes per chunk of rows (bounds its float64 copies)
NEIGHBOUR_CANDIDATES = 2  # count_checked_neighbours: latent candidates per neighbour kept (1: the latent ones)


def knn_indices(
    latent: np.ndarray,
    k: int,
    chunk: int = 2048,
    metric: Literal["cosine", "euclidean"] = "cosine",
    *,
    exact_max_cells: int = EXACT_KNN_MAX_CELLS,
    seed: int = 0,
) -> np.ndarray:
    """Indices of the ``k`` nearest cells (the cell itself first), ``(n, k)`` int64.

    ``metric="cosine"`` (default): Euclidean distance between the latent vectors scaled to unit length,
    i.e. the angle between them: in the SCAR latent space the direction separates cell types and the
    length varies within a type (docs/benchmarks.md compares the two metrics on the species mixture).
    ``"euclidean"``: the plain distance. Cells whose latent vector is zero are left at zero.

    Up to ``exact_max_cells`` cells (default 50,000) the neighbours are exact, computed over chunks of
    at most ``chunk`` rows and 2^22 distances; the cost grows as ``n^2``. Above it they are approximate:
    nearest-neighbour descent (``pynndescent``, what ``scanpy.pp.neighbors`` uses), seeded by ``seed`` so
    that the result is reproducible.
    """
    _check_metric(metric)
    z = np.asarray(latent, dtype=np.float64)
    if metric == "cosine":
        length = np.linalg.norm(z, axis=1, keepdims=True)
        z = z / np.where(length > 0, length, 1.0)
    n = z.shape[0]
    k = min(int(k), n)
    if n > int(exact_max_cells):
        return _approximate_knn(z, k, seed)
    chunk = max(1, min(int(chunk), _KNN_DISTANCE_ENTRIES // max(n, 1)))
    sq = (z**2).sum(1)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        d, product = sq[rows, None] + sq[None, :], z[rows] @ z.T
        product *= 2.0
        d -= product  # the same values as sq + sq - 2 z z^T, two chunk arrays instead of four
        del product
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = -np.inf  # self first
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
        out[rows] = np.take_along_axis(part, order, 1)
    return out


def _check_metric(metric: str) -> None:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def _approximate_knn(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` approximate Euclidean neighbours of the rows of ``z`` (pynndescent), the cell itself first."""
    from pynndescent import NNDescent

    n = z.shape[0]
    index = NNDescent(z.astype(np.float32), metric="euclidean", n_neighbors=k, random_state=int(seed))
    found = index.neighbor_graph[0].astype(np.int64)
    del index  # its graph, forest and data, before the fix-ups below
    unfilled = np.nonzero(found < 0)
    found[unfilled] = unfilled[0]  # a neighbour the search did not fill: the cell itself
    own = np.arange(n)
    for i in np.flatnonzero(found[:, 0] != own):  # duplicates of a vector can come before the cell itself
        others = found[i][found[i] != i]
        found[i] = np.r_[i, others[: k - 1], np.full(max(0, k - 1 - others.size), i)]
    return found


def count_checked_neighbours(
    latent: np.ndarray,
    counts: np.ndarray | sp.spmatrix,
    k: int,
    candidates: int = NEIGHBOUR_CANDIDATES,
    metric: Literal["cosine", "euclidean"] = "cosine",
    *,
    seed: int = 0,
) -> np.ndarray:
    """The ``k`` cells closest in counts among the ``candidates * k`` nearest in the latent space, ``(n, k)``.

    The latent neighbours (:func:`knn_indices`, the cell itself first) are checked against the cell's own
    counts: they are ranked by the Hellinger affinity of the count profiles,
    ``h_ij = sum_g sqrt(x_ig / N_i * x_jg / N_j)`` (1 for proportional profiles, 0 for disjoint ones), and the
    ``k`` with the highest affinity are kept, the cell itself first, ties in latent order. A candidate of
    another population that the latent space put close (a latent space that does not separate every cell)
    then drops out, while the neighbourhood stays in the cell's latent region. ``candidates=1`` returns the
    latent neighbours unchanged. ``k`` and the candidate count are capped at ``n``; with ``n <= candidates * k``
    every cell is a candidate and the neighbourhoods are chosen by counts alone.

    Cost: the latent search for ``candidates * k`` neighbours, then ``O(candidates * k * nnz)`` for the
    affinities (one sparse product per candidate rank); memory: the ``(n, candidates * k)`` latent candidates
    and the ``(n, k)`` result; the float64 affinities, their order and the float64 copies of the counts for one
    chunk of rows at a time (:func:`hellinger_affinity`).
    """
    n = np.shape(latent)[0]
    k = min(int(k), n)
    if int(candidates) < 1:
        raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
    pool = knn_indices(latent, min(n, int(candidates) * k), metric=metric, seed=seed)
    if pool.shape[1] == k:
        return pool
    out = np.empty((n, k), dtype=pool.dtype)
    for rows, affinity in _affinity_chunks(counts, pool):  # ranked chunk by chunk: no (n, m) affinity or order
        affinity[:, 0] = np.inf  # the cell itself first
        order = np.argsort(-affinity, axis=1, kind="stable")[:, :k]
        out[rows] = np.take_along_axis(pool[rows], order, 1)
    return out


def hellinger_affinity(counts: np.ndarray | sp.spmatrix, pairs: np.ndarray) -> np.ndarray:
    """``h_ij = sum_g sqrt(x_ig x_jg / (N_i N_j))`` for ``j = pairs[i, r]``, ``(n, m)`` float64; 0 for empty cells.

    Computed in chunks of rows of ``pairs``: the float64 square roots are made only for the rows a chunk
    reads (at most ``_AFFINITY_ENTRIES`` cells x genes per chunk and candidate rank), not for all counts."""
    out = np.empty(np.shape(pairs), dtype=np.float64)
    for rows, affinity in _affinity_chunks(counts, pairs):
        out[rows] = affinity
    return out


def _affinity_chunks(counts: np.ndarray | sp.spmatrix, pairs: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """:func:`hellinger_affinity` chunk of rows by chunk of rows: each chunk's rows of ``pairs`` and its
    ``(rows, m)`` float64 affinities."""
    x = counts if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
    x = sp.csr_matrix(x)
    n, n_genes = x.shape
    library, step = np.empty(n), max(1, _AFFINITY_ENTRIES // max(n_genes, 1))  # rows per chunk
    for start in range(0, n, step):
        stop = min(n, start + step)
        library[start:stop] = np.asarray(sp.csr_matrix(x[start:stop], dtype=np.float64).sum(axis=1)).ravel()
    scale = 1.0 / np.sqrt(np.where(library > 0, library, 1.0))

    def roots(rows: np.ndarray) -> sp.csr_matrix:  # sqrt(x_jg / N_j) at the rows
        m = sp.csr_matrix(x[rows], dtype=np.float64)
        m.data = np.sqrt(m.data) * np.repeat(scale[rows], np.diff(m.indptr))
        return m

    for start in range(0, pairs.shape[0], step):
        rows = slice(start, min(pairs.shape[0], start + step))
        own = roots(np.arange(rows.start, rows.stop))
        affinity = np.empty((rows.stop - rows.start, pairs.shape[1]), dtype=np.float64)
        for rank in range(pairs.shape[1]):
            affinity[:, rank] = np.asarray(own.multiply(roots(pairs[rows, rank])).sum(axis=1)).ravel()
        yield rows, affinity


def pool_counts(x: np.ndarray | sp.spmatrix, neighbours: np.ndarray) -> np.ndarray:
    """``X_ig = sum_{j in J(i)} x_jg`` for the rows of ``neighbours`` ``(m, k)``, dense float64 ``(m, G)``."""
    pooled = _pool(x, neighbours)
    return np.asarray(pooled.toarray() if sp.issparse(pooled) else pooled, dtype=np.float64)


def _pool(
    x: np.ndarray | sp.spmatrix, neighbours: np.ndarray, columns: np.ndarray | None = None
) -> np.ndarray | sp.csr_matrix:
    """Pooled counts as :func:`pool_counts`, CSR float64 when ``x`` is sparse (no dense ``(m, G)`` array); only
    the neighbours' rows are copied (to float64), and only the genes ``columns`` kept (``None``: all)."""
    m, k = neighbours.shape
    rows, inverse = np.unique(np.asarray(neighbours).ravel(), return_inverse=True)
    shape = (m, rows.size)
    indicator = sp.csr_matrix((np.ones(m * k), (np.repeat(np.arange(m), k), inverse.ravel())), shape=shape)
    if sp.issparse(x):
        sub = sp.csr_matrix(sp.csr_matrix(x)[rows], dtype=np.float64)
        sub = sub if columns is None else sp.csr_matrix(sub[:, columns])
        return sp.csr_matrix(indicator @ sub)
    sub = np.asarray(np.asarray(x)[rows], dtype=np.float64)
    return np.asarray(indicator @ (sub if columns is None else sub[:, columns]), dtype=np.float64)
