r"""Calibrated noise ratio and native shares for low contamination, as pure functions over arrays.

The derivation, and why the reference model over-estimates the noise ratio (``eps`` is identified only by
the genes a cell does not express, and the decoder's sparse activation sets some expressed genes to zero),
are in docs/model.md, section "Calibration"; the measured accuracy, speed and memory are in
docs/benchmarks.md. The contract:

:func:`calibrate` ``(counts, latent, ambient, ...)`` -> ``(noise_ratio (n,), share)``: neighbourhoods are the
``k`` cells closest in counts among the ``2k`` nearest in the latent space (:func:`count_checked_neighbours`);
:func:`calibrated_native_share` fits the
empirical-Bayes posterior below on the pooled counts; :func:`scar_jax.denoise.calibrated_split` draws
``Binomial(x, share)``.

The model (an empirical-Bayes posterior on pooled neighbourhoods)
-----------------------------------------------------------------
For cell ``i`` with neighbourhood ``J(i)`` (its ``k`` nearest cells, itself included), pool the counts
``X_ig = sum_{j in J(i)} x_jg`` and split the pooled library into its native and ambient parts
``T_i = sum_j (1 - eps_j) N_j`` and ``B_i = sum_j eps_j N_j``. Each gene is either *off* in the
neighbourhood (no native expression) or *on*, with the spike-and-slab model

.. code-block:: text

    off (prob 1 - pi_i):  X_ig ~ Poisson(B_i a_g)
    on  (prob pi_i):      X_ig ~ NB(mean mu_ig = (T_i s_i + B_i) a_g, shape alpha)

The posterior probability that the gene is on is

.. code-block:: text

    q_ig = pi_i L_on / (pi_i L_on + (1 - pi_i) L_off),
    log L_on  = lgamma(X + alpha) - lgamma(alpha) - lgamma(X + 1)
                + alpha log(alpha / (alpha + mu)) + X log(mu / (alpha + mu))
    log L_off = X log(B a) - B a - lgamma(X + 1)

and, given on, the posterior mean rate is ``lambda_hat = (alpha + X) / (alpha / mu + 1)``, whose
native part ``theta_ig = max(lambda_hat - B_i a_g, 0) / T_i`` is the neighbourhood's native frequency.
A count of gene ``g`` in cell ``i`` is native with probability

.. code-block:: text

    w_ig = q'_ig (1 - eps_i) theta_ig / ((1 - eps_i) theta_ig + eps_i a_g),   q' = c q / (c q + 1 - q)

(``c``: ``expressed_prior_odds``; 1 where ``a_g = 0``). The updates, until no noise ratio changes by more
than a relative ``tol``:

.. code-block:: text

    pi_i = mean_{g in E} q_ig,   s_i = 1 / sum_g q_ig a_g,
    eps_i = sum_{g in E} (1 - q_ig) x_ig / (N_i sum_{g in E} (1 - q_ig) a_g)

over the estimating genes ``E = {g : a_g median_i(sum_{j in J(i)} N_j) >= 10}`` (``MIN_EXPECTED_POOLED_COUNT``;
all genes if none passes): a gene expected to hold fewer than 10 counts in a pooled neighbourhood cannot tell on
from off, and many such genes bias the estimate upward (docs/model.md, "Which genes estimate the noise ratio").
The share is computed for every gene.

with ``1 - q`` below ``OFF_PROBABILITY_FLOOR`` (2^-53) taken as zero, and every cell starting at
``START_NOISE_RATIO``. With one ambient profile per batch, ``B_i a_g`` becomes
``bg_ig = sum_{j in J(i)} eps_j N_j a_{b(j) g}`` and cell ``i``'s slab, share and noise ratio use
``a_{b(i)}``. The loop runs in float32 on the default JAX device (:mod:`.loop`), over the stored entries
spilled to a temporary directory and read back in blocks of ``BLOCK_ENTRIES`` (:mod:`.blocks`), so its memory
is bounded by a block, not by the cells (the contract: :func:`memory_needed`, checked by :func:`calibrate`
before it allocates); :func:`neighbourhood_posterior` is its float64 oracle.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import scipy.sparse as sp

from ..denoise import calibrated_split  # noqa: F401 (re-exported)
from .blocks import BLOCK_ENTRIES, CHUNK_ENTRIES, ENTRY_BYTES  # noqa: F401 (re-exported)
from .knn import (  # noqa: F401 (re-exported)
    EXACT_KNN_MAX_CELLS,
    NEIGHBOUR_CANDIDATES,
    _check_metric,
    _pool,
    count_checked_neighbours,
    hellinger_affinity,
    knn_indices,
    pool_counts,
)
from .loop import MIN_EXPECTED_POOLED_COUNT, OFF_PROBABILITY_FLOOR  # noqa: F401 (re-exported)
from .memory import (
    available_memory,
    check_disk,
    check_memory,
    memory_needed,
    memory_terms,
    release_freed_memory,
)
from .oracle import neighbourhood_posterior
from .share import calibrated_native_share, estimating_genes  # noqa: F401 (re-exported)

__all__ = [
    "calibrate",
    "calibrated_native_share",
    "calibrated_split",
    "available_memory",
    "check_memory",
    "check_disk",
    "memory_needed",
    "memory_terms",
    "count_checked_neighbours",
    "hellinger_affinity",
    "knn_indices",
    "neighbourhood_posterior",
    "pool_counts",
]

# calibrate warns above this mean noise ratio: most counts are then called ambient, which happens when the latent
# neighbourhoods mix cell types (e.g. a model trained too few epochs; docs/benchmarks.md)
IMPLAUSIBLE_NOISE_RATIO = 0.5
START_NOISE_RATIO = 0.01  # where calibrate starts the iteration (the lowest self-consistent point is wanted)
# The removal/retention knob's default for users (calibrate, SCAR.get_denoised_counts): c < 1 removes more of the
# contamination at a small cost in retention; chosen on the measurements of docs/benchmarks.md ("Calibration").
DEFAULT_EXPRESSED_PRIOR_ODDS = 0.1


def calibrate(
    counts: np.ndarray | sp.spmatrix,
    latent: np.ndarray,
    ambient: np.ndarray,
    batch_index: np.ndarray | None = None,
    n_neighbours: int = 50,
    n_iter: int = 50,
    alpha: float = 1.0,
    expressed_prior_odds: float = DEFAULT_EXPRESSED_PRIOR_ODDS,
    share_at: Literal["all", "observed"] = "all",
    metric: Literal["cosine", "euclidean"] = "cosine",
    neighbour_candidates: int = NEIGHBOUR_CANDIDATES,
    *,
    block_entries: int = BLOCK_ENTRIES,
    chunk_entries: int = CHUNK_ENTRIES,
) -> tuple[np.ndarray, np.ndarray | sp.csr_matrix]:
    """Calibrated noise ratio ``(n,)`` and native share of counts ``(n, G)`` with latent vectors ``(n, d)``.

    Neighbourhoods are the ``n_neighbours`` cells (capped at ``n``) closest in counts among the
    ``neighbour_candidates * n_neighbours`` nearest in ``latent`` (:func:`count_checked_neighbours`; ``metric``:
    see :func:`knn_indices`; ``neighbour_candidates=1``: the latent neighbours alone, the earlier default).
    At 100 cells every cell is a candidate and the neighbourhoods (50 cells) are chosen by counts; at 1,000
    and 100,000 cells by counts among the 100 latent candidates (exact up to ``EXACT_KNN_MAX_CELLS``,
    approximate above). The noise ratio starts at ``START_NOISE_RATIO`` for every cell, not at a model's estimate, whose
    over-estimate can lead the iteration to a spurious high fixed point. ``ambient``: ``(G,)``, or
    ``(n_batches, G)`` with ``batch_index`` ``(n,)`` (one profile per batch). Returns
    :func:`calibrated_native_share`'s noise ratio and share (dense, or CSR at the stored counts with
    ``share_at="observed"``); :func:`scar_jax.denoise.calibrated_split` is the count-preserving split, ``x * share``
    its mean. Warns when the mean noise ratio is above ``IMPLAUSIBLE_NOISE_RATIO``.

    ``block_entries``, ``chunk_entries``: :func:`calibrated_native_share` (its memory contract). Before any
    large allocation :func:`check_memory` compares :func:`memory_needed` with what the process can use.
    """
    _check_metric(metric)
    _preflight(counts, n_neighbours, neighbour_candidates, block_entries, chunk_entries, ambient, share_at)
    neighbours = count_checked_neighbours(latent, counts, n_neighbours, neighbour_candidates, metric=metric)
    release_freed_memory()  # the search's temporaries, before the spill and the rounds
    eps, share = calibrated_native_share(
        counts,
        neighbours,
        ambient,
        np.full(counts.shape[0], START_NOISE_RATIO),
        n_iter,
        alpha,
        expressed_prior_odds=expressed_prior_odds,
        share_at=share_at,
        batch_index=batch_index,
        block_entries=block_entries,
        chunk_entries=chunk_entries,
    )
    del neighbours
    release_freed_memory()  # the rounds' temporaries, before the caller's split
    _warn_if_implausible(eps)
    return eps, share


def _warn_if_implausible(eps: np.ndarray) -> None:
    """A ``UserWarning`` when the mean calibrated noise ratio is above ``IMPLAUSIBLE_NOISE_RATIO``."""
    if float(np.mean(eps)) > IMPLAUSIBLE_NOISE_RATIO:
        warnings.warn(
            f"the calibrated mean noise ratio is {np.mean(eps):.2f}: most counts are called ambient. This "
            f"happens when the latent neighbourhoods do not separate cell types (their pooled profile is then "
            f"the ambient profile itself), e.g. after too few epochs: train longer (the default max_epochs), "
            f"check the ambient profile, or use method='split'",
            UserWarning,
            stacklevel=3,
        )


def _preflight(counts, n_neighbours, neighbour_candidates, block_entries, chunk_entries, ambient, share_at) -> None:
    """:func:`check_memory` of :func:`memory_needed` for these counts, from their sizes only, with the copy of
    counts that are not canonical CSR (:func:`calibrated_native_share` works on one)."""
    n_cells, n_genes = np.shape(counts) if not sp.issparse(counts) else counts.shape
    nnz = counts.nnz if sp.issparse(counts) else n_cells * n_genes
    sparse_observed = share_at == "observed" and sp.issparse(counts)
    profiles = np.asarray(ambient).reshape(-1, n_genes) if np.size(ambient) % max(n_genes, 1) == 0 else None
    terms = memory_terms(
        n_cells,
        n_genes,
        nnz,
        n_neighbours,
        neighbour_candidates=neighbour_candidates,
        block_entries=block_entries,
        chunk_entries=chunk_entries,
        n_batches=np.shape(ambient)[0] if np.ndim(ambient) == 2 else 1,
        share_at="observed" if sparse_observed else "all",
        ambient_gaps=profiles is not None and bool((profiles.max(0) <= 0).any()),
    )
    terms["canonical copy of the counts"] = _copy_bytes(counts, nnz)
    check_memory(sum(terms.values()), terms=terms)


def _copy_bytes(counts, nnz: int) -> int:
    """Bytes of the canonical CSR copy the calibration makes of ``counts`` (0 when they are canonical CSR)."""
    if sp.issparse(counts) and counts.format == "csr" and counts.has_canonical_format:
        return 0
    itemsize = np.dtype(counts.dtype).itemsize
    return int(nnz) * (itemsize + 8) + (np.shape(counts)[0] + 1) * 8  # values, int64 indices at most, indptr
