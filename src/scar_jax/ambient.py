"""Ambient profile from raw droplets: the EmptyDrops-like iteration of scvi-tools and the original scAR.

With droplets ``j`` (totals ``N_j >= min_raw_counts``, genes matched to the cells' genes) and a current
profile ``a`` (start: the pooled profile of all those droplets)::

    log p_j = log Gamma(N_j + 1) - sum_g log Gamma(x_jg + 1) + sum_g x_jg log max(a_g, eps)   (multinomial)
    cell-free droplets:  log p_j >= n_genes * log(prob)
    a <- pooled profile of the cell-free droplets                                            (repeat)

Everything stays sparse: the log-probabilities are one sparse matrix-vector product plus a sum of
``gammaln`` over the stored entries, so memory stays a small multiple of the raw matrix (the reference
densifies chunks of droplets and runs out of memory on ordinary 10x raw matrices).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

PROBS_EPS = float(np.finfo(np.float32).eps)  # torch's clamp in Multinomial(probs=...)
MIN_CELL_FREE = 50


@dataclasses.dataclass
class AmbientEstimate:
    """Result of :func:`estimate_ambient_profile` for one group of droplets.

    profile: ``(n_genes,)`` float64 summing to 1; droplets: ``(n_used,)`` positions in the raw matrix of
    the droplets scored; log_prob: their multinomial log-probabilities under the final profile;
    cell_free: ``(n_used,)`` bool, the droplets classified cell-free in the last iteration.
    """

    profile: np.ndarray
    droplets: np.ndarray
    log_prob: np.ndarray
    cell_free: np.ndarray


def pooled_profile(x: sp.csr_matrix) -> np.ndarray:
    """``sum_j x_j / sum_jg x_jg`` over the rows of ``x``, ``(n_genes,)`` float64."""
    totals = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
    return totals / totals.sum()


def multinomial_log_prob(x: sp.csr_matrix, profile: np.ndarray, chunk_size: int = 100_000) -> np.ndarray:
    """Multinomial log-probability of each row of a sparse count matrix under ``profile``, ``(n_rows,)``.

    Probabilities are clamped below at float32 epsilon, as ``torch.distributions.Multinomial`` does,
    so a count of a gene with zero ambient mass gives a low but finite score. Rows are processed in
    chunks so that the per-entry temporaries stay bounded.
    """
    log_p = np.log(np.maximum(np.asarray(profile, np.float64), PROBS_EPS))
    out = np.empty(x.shape[0], np.float64)
    for start in range(0, x.shape[0], chunk_size):
        block = x[start : start + chunk_size].astype(np.float64)
        log_factorials = block.copy()
        log_factorials.data = gammaln(block.data + 1.0)
        totals = np.asarray(block.sum(axis=1)).ravel()
        out[start : start + len(totals)] = (
            gammaln(totals + 1.0) - np.asarray(log_factorials.sum(axis=1)).ravel() + block @ log_p
        )
    return out


def estimate_ambient_profile(
    raw: sp.csr_matrix,
    prob: float = 0.995,
    min_raw_counts: int = 2,
    iterations: int = 3,
    sample: int | None = 50000,
    seed: int = 0,
    chunk_size: int = 100_000,
) -> AmbientEstimate:
    """Iteratively estimate the ambient profile from raw droplets ``(n_droplets, n_genes)`` (CSR).

    Droplets with fewer than ``min_raw_counts`` counts are dropped; if more than ``sample`` remain, a
    seeded random sample of ``sample`` droplets is scored. Raises ``ValueError`` when fewer than 50
    droplets are cell-free (lower ``prob``).
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    raw = sp.csr_matrix(raw)
    totals = np.asarray(raw.sum(axis=1)).ravel()
    droplets = np.flatnonzero(totals >= min_raw_counts)
    if sample is not None and len(droplets) > sample:
        droplets = np.sort(np.random.default_rng(seed).choice(droplets, size=int(sample), replace=False))
    if len(droplets) < MIN_CELL_FREE:
        raise ValueError(
            f"only {len(droplets)} raw droplets have >= {min_raw_counts} counts in these genes; "
            "lower min_raw_counts or pass the unfiltered (raw) droplet matrix"
        )
    x = raw if len(droplets) == raw.shape[0] else raw[droplets]
    profile = pooled_profile(x)
    threshold = x.shape[1] * np.log(prob)
    for _ in range(iterations):
        log_prob = multinomial_log_prob(x, profile, chunk_size)
        cell_free = log_prob >= threshold
        if cell_free.sum() < MIN_CELL_FREE:
            raise ValueError(
                f"only {int(cell_free.sum())} cell-free droplets found (at least {MIN_CELL_FREE} are needed); "
                f"lower prob (now {prob})"
            )
        profile = pooled_profile(x[cell_free])
    return AmbientEstimate(profile, droplets, multinomial_log_prob(x, profile, chunk_size), cell_free)
