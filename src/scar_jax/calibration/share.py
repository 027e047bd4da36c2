"""The calibrated noise ratio and native share of every cell, from counts and neighbourhoods."""

from __future__ import annotations

import functools
from typing import Literal

import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .blocks import CHUNK_ENTRIES, _blocks_of, _stored_entries
from .loop import _DTYPE, MIN_EXPECTED_POOLED_COUNT, _fit, _Problem, _share_at, _share_dense

_TINY = 1e-300


def calibrated_native_share(
    x: np.ndarray | sp.spmatrix,
    neighbours: np.ndarray,
    ambient: np.ndarray,
    noise_ratio: np.ndarray,
    n_iter: int = 50,
    alpha: float = 1.0,
    pi0: float = 0.5,
    tol: float = 1e-4,
    expressed_prior_odds: float = 1.0,
    *,
    share_at: Literal["all", "observed"] = "all",
    chunk_entries: int = CHUNK_ENTRIES,
    batch_index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | sp.csr_matrix]:
    """Calibrated noise ratio ``(n,)`` and native share ``w`` ``(n, G)`` of every cell (:mod:`scar_jax.calibration`).

    ``x``: ``(n, G)`` counts, dense or sparse. ``neighbours``: ``(n, k)`` neighbourhood of each cell, itself
    included (:func:`knn_indices`). ``ambient``: ``(G,)``, or ``(n_batches, G)`` one per batch with
    ``batch_index`` ``(n,)`` (cell ``j``'s ambient counts follow ``a_{b(j)}``). ``noise_ratio``: ``(n,)`` start
    of the iteration, which can have several fixed points: :func:`calibrate` starts low (``START_NOISE_RATIO``).
    At most ``n_iter`` rounds, stopping once no noise ratio changes by more than a relative ``tol``.
    ``alpha``, ``pi0``: the slab's Gamma shape and the starting prior probability that a gene is on.

    ``expressed_prior_odds`` ``c > 0``: the removal/retention knob (1: the derived posterior). The share uses
    ``q' = c q / (c q + 1 - q)``, the prior odds ``pi / (1 - pi)`` times ``c``; ``c > 1`` demands more evidence
    before a gene is called off in a neighbourhood (fewer real counts lost, less contamination removed),
    ``c < 1`` the reverse; ``w`` is non-decreasing in ``c``. It enters only the final share, not the fit.

    ``share_at="all"``: ``w`` dense ``(n, G)`` float64; ``"observed"``, for sparse ``x``: ``w`` only where ``x``
    stores an entry, CSR with the pattern of ``x`` (duplicates summed, indices sorted). ``chunk_entries``:
    cells x genes per chunk of rows and stored entries per block (float32 temporaries), so the memory beyond
    ``x``, its stored pooled entries (20 bytes each on the device) and the result does not grow with the
    number of cells (nor does the result, up to float32 rounding of the sums). Returns the
    noise ratio ``(n,)`` float64 and ``w`` at the fitted parameters.
    """
    odds = _check_knobs(expressed_prior_odds, share_at)
    sparse_input = sp.issparse(x)
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    x.sum_duplicates()  # canonical (sorted indices): the pattern of the "observed" share
    n, n_genes = x.shape
    profiles, batch_index = _profiles_and_batches(ambient, batch_index, n, n_genes)
    full, support = x, profiles.max(0) > 0  # genes no profile can produce are native wherever counted
    if not support.all():
        x, profiles = x[:, np.flatnonzero(support)], profiles[:, support]
    library = _producible_library(x, profiles, batch_index)
    problem, at_x, n_entries = _problem(x, neighbours, profiles, batch_index, library, alpha, chunk_entries)
    block = problem.row.shape[1]
    chunk = max(1, min(n, int(chunk_entries) // max(n_genes, 1)))
    start = jnp.asarray(np.clip(np.asarray(noise_ratio, np.float64).ravel(), 1e-6, 1 - 1e-6), dtype=_DTYPE)
    eps, pi, s, _ = _fit(start, jnp.full(n, pi0, _DTYPE), jnp.ones(n, _DTYPE), problem, alpha, tol, int(n_iter), chunk)
    fitted = (eps, pi, s, problem, alpha, odds)
    if share_at == "observed" and sparse_input:
        w = np.asarray(_share_at(*fitted[:4], _blocks_of(at_x, block), alpha, odds), np.float64)
        w = _with_unproducible(full, support, w.ravel()[: at_x.size])
    else:
        w = _dense_share(fitted, n_entries, block, chunk, full.shape, support)
    full_library = np.asarray(full.sum(1), np.float64).ravel()
    eps = np.asarray(eps, np.float64) * np.where(full_library > 0, library / np.maximum(full_library, _TINY), 1.0)
    return eps, w


def _check_knobs(expressed_prior_odds: float, share_at: str) -> float:
    """``expressed_prior_odds`` as a positive float; ``share_at`` checked."""
    odds = float(expressed_prior_odds)
    if not np.isfinite(odds) or odds <= 0:
        raise ValueError(f"expressed_prior_odds must be a positive number, got {expressed_prior_odds!r}")
    if share_at not in ("all", "observed"):
        raise ValueError(f"share_at must be 'all' or 'observed', got {share_at!r}")
    return odds


def _profiles_and_batches(ambient, batch_index, n: int, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """The ambient profiles ``(n_batches, G)``, each normalised to sum to one, and the batch of each cell ``(n,)``."""
    profiles = np.asarray(ambient, np.float64)
    profiles = profiles.reshape(1, -1) if profiles.ndim == 1 else profiles
    if profiles.ndim != 2 or profiles.shape[1] != n_genes:
        raise ValueError(f"ambient must have shape (n_genes,) or (n_batches, n_genes), got {np.shape(ambient)}")
    profiles = profiles / profiles.sum(1, keepdims=True)
    n_batches = profiles.shape[0]
    if n_batches == 1:
        return profiles, np.zeros(n, np.int64)
    if batch_index is None:
        raise ValueError(f"batch_index is needed with {n_batches} ambient profiles (one per batch)")
    batch_index = np.asarray(batch_index).ravel()
    if batch_index.shape != (n,) or batch_index.min() < 0 or batch_index.max() >= n_batches:
        raise ValueError(f"batch_index must be (n_cells,) = ({n},) integers in [0, {n_batches})")
    return profiles, batch_index


def _problem(x, neighbours, profiles, batch_index, library, alpha, chunk_entries) -> tuple[_Problem, np.ndarray, int]:
    """The device arrays of the calibration (:class:`_Problem`), the positions of the entries of ``x`` among its
    stored entries and their number (:func:`_stored_entries`)."""
    entries, at_x, n_entries = _stored_entries(x, neighbours, alpha, max(1, int(chunk_entries)))
    f32 = functools.partial(jnp.asarray, dtype=_DTYPE)
    problem = _Problem(
        library=f32(library),
        neighbours=jnp.asarray(neighbours, jnp.int32),
        batch=jnp.asarray(batch_index, jnp.int32),
        profiles=f32(profiles),
        estimates=f32(estimating_genes(profiles, library, neighbours)),
        **{name: jnp.asarray(entries.pop(name)) for name in ("row", "col", "pooled", "lgamma_ratio", "counts")},
    )
    return problem, at_x, n_entries


def estimating_genes(profiles: np.ndarray, library: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """``(G,)`` bool: the genes that estimate the noise ratio and ``pi``, ``max_b a_bg * median_i(sum_{j in J(i)}
    N_j) >= MIN_EXPECTED_POOLED_COUNT`` (:mod:`.loop`); all genes when none passes (a tiny data set)."""
    pooled_library = float(np.median(np.asarray(library, np.float64)[np.asarray(neighbours)].sum(1)))
    expected = np.asarray(profiles, np.float64).max(0) * pooled_library
    passes = expected >= MIN_EXPECTED_POOLED_COUNT
    return passes if passes.any() else np.ones_like(passes)


def _dense_share(fitted: tuple, n_entries: int, block: int, chunk: int, shape, support: np.ndarray) -> np.ndarray:
    """The share ``(n, G)`` float64 at the fitted parameters: the zero-count share everywhere, the stored entries
    overwritten, and 1 on the genes no ambient profile can produce (not in ``support``)."""
    eps, pi, s, problem, alpha, odds = fitted
    w = np.array(_share_dense(eps, pi, s, problem, alpha, odds, chunk), np.float64)  # writable
    at = _blocks_of(np.arange(n_entries), block)
    stored = np.asarray(_share_at(eps, pi, s, problem, at, alpha, odds), np.float64).ravel()[:n_entries]
    w[np.asarray(problem.row).ravel()[:n_entries], np.asarray(problem.col).ravel()[:n_entries]] = stored
    if support.all():
        return w
    w_full = np.ones(shape)
    w_full[:, support] = w
    return w_full


def _producible_library(x: sp.csr_matrix, profiles: np.ndarray, batch_index: np.ndarray) -> np.ndarray:
    """``N'_i = sum_g x_ig [a_{b(i) g} > 0]`` ``(n,)``: the counts of each cell that its own ambient can produce."""
    library = np.asarray(x.sum(1), np.float64).ravel()
    for b in np.flatnonzero((profiles <= 0).any(1)):  # a batch whose profile has zeros (one per batch at most)
        rows = np.flatnonzero(batch_index == b)
        library[rows] = np.asarray(x[rows][:, profiles[b] > 0].sum(1), np.float64).ravel()
    return library


def _with_unproducible(full: sp.csr_matrix, support: np.ndarray, share: np.ndarray) -> sp.csr_matrix:
    """The share at the entries of ``full`` (canonical CSR): ``share`` ``(m,)`` at the entries of the ``support``
    columns, in order, and 1 at the others (counts of genes no ambient profile can produce)."""
    data = np.ones(full.nnz)
    data[support[full.indices]] = share
    return sp.csr_matrix((data, full.indices.copy(), full.indptr.copy()), shape=full.shape)
