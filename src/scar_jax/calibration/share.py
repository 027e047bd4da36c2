"""The calibrated noise ratio and native share of every cell, from counts and neighbourhoods."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from ..denoise import canonical_csr
from .blocks import BLOCK_ENTRIES, CHUNK_ENTRIES, ENTRY_BYTES, EntryStore, stored_entries_bound
from .loop import _DTYPE, MIN_EXPECTED_POOLED_COUNT, _Cells, _fit, _parameters, _share_dense, _shares
from .memory import check_disk

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
    block_entries: int = BLOCK_ENTRIES,
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
    stores an entry, CSR float32 with the pattern of ``x`` (duplicates summed, indices sorted; the index arrays of
    ``x``'s canonical form, shared, not copied). Memory (the contract; :func:`scar_jax.calibration.memory_needed`
    in bytes): the stored pooled entries are spilled once to a
    temporary directory (``ENTRY_BYTES`` = 21 an entry) and read back each round in blocks of ``block_entries``.
    Beyond ``x`` (not copied when canonical CSR) and the result, it holds the per-cell vectors (``n x (k + c)``
    words), at most three blocks (``3 x 21`` bytes an entry on the host, about 64 of device temporaries),
    float32 chunks of rows of ``chunk_entries`` cells x genes, and one building chunk of rows (bounded by
    constants). The result does not depend on the two sizes (up to float32 rounding).
    Returns the noise ratio ``(n,)`` float64 and ``w`` at the fitted parameters.
    """
    odds, sparse_input = _check_knobs(expressed_prior_odds, share_at), sp.issparse(x)
    x, neighbours = _canonical(x), np.asarray(neighbours)
    n, n_genes = x.shape
    profiles, batch_index = _profiles_and_batches(ambient, batch_index, n, n_genes)
    support = profiles.max(0) > 0  # genes no profile can produce are native wherever counted
    library, full_library = _producible_library(x, profiles, batch_index)
    with _spill(x, neighbours, support, alpha) as store:
        cells = _cells(library, neighbours, profiles[:, support], batch_index)
        block = max(1, min(_positive(block_entries, "block_entries"), store.n_entries))
        chunk = max(1, min(n, _positive(chunk_entries, "chunk_entries") // max(n_genes, 1)))
        eps, pi, s, _ = _fit(*_start(noise_ratio, n, pi0), cells, store, alpha, tol, int(n_iter), chunk, block)
        fitted = (eps, _parameters(eps, pi, s, cells), cells, store, alpha, odds)
        if share_at == "observed" and sparse_input:
            w = _observed_share(fitted, block, x, support)
        else:
            w = _dense_share(fitted, block, chunk, x.shape, support)
    eps = np.asarray(eps, np.float64) * np.where(full_library > 0, library / np.maximum(full_library, _TINY), 1.0)
    return eps, w


def _spill(x: sp.csr_matrix, neighbours: np.ndarray, support: np.ndarray, alpha: float) -> EntryStore:
    """The stored entries of ``x`` at the ``support`` genes (:class:`EntryStore`), once the disk is checked."""
    check_disk(stored_entries_bound(x, neighbours, int(support.sum())) * ENTRY_BYTES)
    return EntryStore(x, neighbours, None if support.all() else np.flatnonzero(support), alpha)


def _start(noise_ratio: np.ndarray, n: int, pi0: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The starting ``(eps, pi, s)`` ``(n,)`` each, float32."""
    eps = jnp.asarray(np.clip(np.asarray(noise_ratio, np.float64).ravel(), 1e-6, 1 - 1e-6), dtype=_DTYPE)
    return eps, jnp.full(n, pi0, _DTYPE), jnp.ones(n, _DTYPE)


def _positive(value: int, name: str) -> int:
    """``value`` as a positive int, or a ValueError naming ``name``."""
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _canonical(x: np.ndarray | sp.spmatrix) -> sp.csr_matrix:
    """``x`` as canonical CSR (sorted indices, no duplicates; the pattern of the "observed" share), in its own
    dtype: not copied when it already is one, otherwise one copy."""
    return canonical_csr(x) if sp.issparse(x) else sp.csr_matrix(np.asarray(x))


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


def _cells(library, neighbours, profiles, batch_index) -> _Cells:
    """The per-cell device arrays of the calibration (:class:`_Cells`)."""
    return _Cells(
        library=jnp.asarray(library, _DTYPE),
        neighbours=jnp.asarray(neighbours, jnp.int32),
        batch=jnp.asarray(batch_index, jnp.int32),
        profiles=jnp.asarray(profiles, _DTYPE),
        estimates=jnp.asarray(estimating_genes(profiles, library, neighbours), _DTYPE),
    )


def estimating_genes(profiles: np.ndarray, library: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """``(G,)`` bool: the genes that estimate the noise ratio and ``pi``, ``max_b a_bg * median_i(sum_{j in J(i)}
    N_j) >= MIN_EXPECTED_POOLED_COUNT`` (:mod:`.loop`); all genes when none passes (a tiny data set)."""
    pooled_library = float(np.median(np.asarray(library, np.float64)[np.asarray(neighbours)].sum(1)))
    expected = np.asarray(profiles, np.float64).max(0) * pooled_library
    passes = expected >= MIN_EXPECTED_POOLED_COUNT
    return passes if passes.any() else np.ones_like(passes)


def _dense_share(fitted: tuple, block: int, chunk: int, shape, support: np.ndarray) -> np.ndarray:
    """The share ``(n, G)`` float64 at the fitted parameters: the zero-count share everywhere, the stored entries
    overwritten block by block, and 1 on the genes no ambient profile can produce (not in ``support``)."""
    eps, p, cells, store, alpha, odds = fitted
    w = np.array(_share_dense(eps, p, cells, alpha, odds, chunk), np.float64)  # writable
    for entries, shares, size in _shares(eps, p, cells, store, alpha, odds, block):
        w[entries["row"][:size], entries["col"][:size]] = shares[:size]
    if support.all():
        return w
    w_full = np.ones(shape)
    w_full[:, support] = w
    return w_full


def _observed_share(fitted: tuple, block: int, x: sp.csr_matrix, support: np.ndarray) -> sp.csr_matrix:
    """The share at the entries of canonical CSR ``x`` (its pattern: float32 values and ``x``'s own index arrays,
    shared, not copied), block by block, and 1 at the counts of genes no ambient profile can produce (not in
    ``support``)."""
    eps, p, cells, store, alpha, odds = fitted
    data = np.ones(x.nnz, np.float32)  # the shares are float32 on the device: float64 would only double the result
    producible = None if support.all() else support[x.indices]
    values = data if producible is None else np.empty(int(np.count_nonzero(producible)), np.float32)
    at = 0
    for entries, shares, size in _shares(eps, p, cells, store, alpha, odds, block):
        got = shares[:size][entries["own"][:size].astype(bool)]
        values[at : at + got.size] = got
        at += got.size
    if producible is not None:
        data[producible] = values
    return sp.csr_matrix((data, x.indices, x.indptr), shape=x.shape)  # x's index arrays, shared (not copied)


def _producible_library(
    x: sp.csr_matrix, profiles: np.ndarray, batch_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``N'_i = sum_g x_ig [a_{b(i) g} > 0]`` ``(n,)``, the counts of each cell that its own ambient can produce,
    and ``N_i`` ``(n,)``, float64, in chunks of rows (no float64 copy of ``x``)."""
    n, n_genes = x.shape
    library, full = np.empty(n), np.empty(n)
    partial = np.flatnonzero((profiles <= 0).any(1))  # batches whose profile has zeros
    step = max(1, CHUNK_ENTRIES // max(n_genes, 1))
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        sub = sp.csr_matrix(x[rows], dtype=np.float64)
        full[rows] = library[rows] = np.asarray(sub.sum(1)).ravel()
        for b in partial:
            in_b = np.flatnonzero(batch_index[rows] == b)
            if in_b.size:
                library[start + in_b] = np.asarray(sub[in_b][:, profiles[b] > 0].sum(1)).ravel()
    return library, full
