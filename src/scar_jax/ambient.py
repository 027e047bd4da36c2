"""Ambient profile from raw droplets: which droplets are cell-free, and the profile as a posterior.

**Which droplets are cell-free.** By default (``prob=None``), the droplets below the steepest point of the
barcode-rank curve (:func:`rank_threshold`): ranked by total counts, cells sit on a plateau and cell-free
droplets on a long tail, and the cliff between them is where ``log10(total)`` falls fastest against
``log10(rank)`` among the droplets above 100 counts (the "inflection" of DropletUtils' ``barcodeRanks``, the
curve CellBender and SoupX also read). On the shared real data it falls at 591 counts on PBMC (every
filtered cell has more than 1,386) and at 1,410 on the 87-ADT CITE-seq (98% of its empty droplets below, 3%
of its cells). The rule does not depend on the number of features or the depth. With ``prob``
given, the EmptyDrops-like iteration of scvi-tools and the original scAR below, whose threshold grows with
the number of features (at ``prob=0.995`` it finds no droplet over 400 genes; 87 ADTs need ``prob=0.01``).

**The profile as a posterior.** The pooled counts ``c_g`` (total ``C``) of the cell-free droplets are a
multinomial sample of the ambient profile ``a``. A gene never seen in them gets ``a_g = 0`` from the pooled
profile ``c / C`` (the reference's estimate), and a count whose ambient probability is zero can only be
native, though the gene may simply be rare in a shallow sample (a few UMIs per droplet: on PBMC, 50,000
soup UMIs leave 27,330 of 33,694 genes at zero, and they carry 5.5% of the cells' counts). The total
probability of the genes a sample has not seen is estimated by Good and Turing's ``M = n_1 / C``, ``n_1`` the
number of genes seen exactly once (an empirical-Bayes estimate, Robbins 1968; on PBMC soup subsampled to
50,000 UMIs it gives 0.054 where the full soup puts 0.055 on the unseen genes, and on the simulated barnyard
0.0199 against a true 0.0198). The profile is the mean of the Dirichlet posterior ``Dirichlet(c + alpha0 m)``
whose prior puts its mass on the unseen genes, in proportion to the pooled profile ``m`` of all droplets
(the cells', which the ambient mixes), with the strength that gives them exactly that probability:

.. code-block:: text

    a_g = (c_g + alpha0 m_g [c_g = 0]) / (C + alpha0),   alpha0 = C M / (1 - M),  M = min(n_1 / C, 1/2)

``alpha0 = 0`` is the reference's pooled profile (zeros kept). Zeros remain only on genes seen in no droplet
at all. A user can also set ``alpha0``.

The reference's iteration: with droplets ``j`` (totals ``N_j >= min_raw_counts``, genes matched to the cells'
genes) and a current profile ``a`` (start: the pooled profile of all those droplets)::

    log p_j = log Gamma(N_j + 1) - sum_g log Gamma(x_jg + 1) + sum_g x_jg log max(a_g, eps)   (multinomial)
    cell-free droplets:  log p_j >= n_genes * log(prob)
    a <- pooled profile of the cell-free droplets                                            (repeat)

(``prob=0``: every droplet with ``>= min_raw_counts`` counts is cell-free, as in scvi-tools, where the threshold
is ``-inf``). Everything stays sparse: the log-probabilities are one sparse matrix-vector product plus a sum of
``gammaln`` over the stored entries, so memory stays a small multiple of the raw matrix (the reference
densifies chunks of droplets and runs out of memory on ordinary 10x raw matrices).
"""

from __future__ import annotations

import dataclasses
from numbers import Real

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

PROBS_EPS = float(np.finfo(np.float32).eps)  # torch's clamp in Multinomial(probs=...)
MIN_CELL_FREE = 50


@dataclasses.dataclass
class AmbientEstimate:
    """Result of :func:`estimate_ambient_profile` for one group of droplets.

    profile: ``(n_genes,)`` float64 summing to 1 (the posterior mean, or the pooled profile with
    ``prior_counts=0``); droplets: ``(n_used,)`` positions in the raw matrix of the droplets scored;
    log_prob: their multinomial log-probabilities under the final profile; cell_free: ``(n_used,)`` bool, the
    droplets classified cell-free (in the last iteration with ``prob``); prior_counts: the prior strength
    ``alpha0`` used; threshold: the total-count cut of the rank rule (``None`` with ``prob``).
    """

    profile: np.ndarray
    droplets: np.ndarray
    log_prob: np.ndarray
    cell_free: np.ndarray
    prior_counts: float = 0.0
    threshold: float | None = None


def rank_threshold(
    totals: np.ndarray, min_counts: int = 2, lower: float = 100.0, n_grid: int = 300, smooth: int = 9
) -> float:
    """The total count at the steepest fall of the barcode-rank curve (module docstring), a float.

    ``log10(total)`` of the droplets with more than ``lower`` counts (DropletUtils' ``barcodeRanks`` convention:
    at or below 100 every barcode is taken as empty; all droplets with ``>= min_counts`` when fewer than
    ``n_grid`` are above it), in decreasing order, is interpolated on ``n_grid`` points evenly spaced in
    ``log10(rank)``, smoothed by a moving average of ``smooth`` points and differentiated; the cut is the total
    at the most negative slope. Droplets with a smaller total are cell-free.
    """
    totals = np.asarray(totals, np.float64)
    above = totals[totals > lower]
    t = np.sort(above if above.size >= n_grid else totals[totals >= min_counts])[::-1]
    if t.size < 2:
        raise ValueError(f"only {t.size} droplets have >= {min_counts} counts; pass the unfiltered droplet matrix")
    x, y = np.log10(np.arange(1, t.size + 1)), np.log10(t)
    grid = np.linspace(0.0, x[-1], n_grid)
    kernel = np.ones(smooth) / smooth
    curve = np.convolve(np.pad(np.interp(grid, x, y), smooth // 2, mode="edge"), kernel, mode="valid")
    return float(10.0 ** curve[np.argmin(np.gradient(curve, grid))])


def prior_strength(counts: np.ndarray) -> float:
    """``alpha0 = C M / (1 - M)``, ``M = min(n_1 / C, 1/2)`` (Good-Turing, module docstring), for counts ``(G,)``.

    0 when no gene is seen exactly once or none is unseen (the sample then says nothing is missing)."""
    c = np.asarray(counts, np.float64)
    total = c.sum()
    if total <= 0 or not (c == 0).any():
        return 0.0
    missing = min(float((c == 1).sum()) / total, 0.5)  # all singletons would leave the seen genes nothing
    return total * missing / (1.0 - missing)


def posterior_profile(counts: np.ndarray, prior_mean: np.ndarray, prior_counts: float | str = "auto") -> tuple:
    """``a = (c + alpha0 m [c = 0]) / (C + alpha0)`` ``(G,)`` and ``alpha0`` (module docstring).

    ``prior_mean`` ``m`` ``(G,)`` is used on the genes with ``c_g = 0`` (renormalised there); ``prior_counts``:
    ``alpha0 >= 0``, or ``"auto"`` for :func:`prior_strength`; 0 gives the pooled profile ``c / C``."""
    c = np.asarray(counts, np.float64)
    m = np.where(c == 0, np.asarray(prior_mean, np.float64), 0.0)
    alpha = prior_strength(c) if isinstance(prior_counts, str) else float(prior_counts)
    if m.sum() <= 0:  # every unseen gene is unseen everywhere: nothing to give mass to
        alpha = 0.0
    a = c + (alpha * m / m.sum() if alpha > 0 else 0.0)
    return a / a.sum(), alpha


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
    prob: float | None = None,
    min_raw_counts: int = 2,
    iterations: int = 3,
    sample: int | None = 50000,
    seed: int = 0,
    chunk_size: int = 100_000,
    prior_counts: float | str = "auto",
) -> AmbientEstimate:
    """Estimate the ambient profile from raw droplets ``(n_droplets, n_genes)`` (CSR; module docstring).

    Droplets with fewer than ``min_raw_counts`` counts are dropped. ``prob=None`` (default): the cell-free
    droplets are those below :func:`rank_threshold` of all droplets' totals. ``prob`` in ``[0, 1)``: the
    reference's iteration; if more than ``sample`` droplets remain, a seeded random sample of ``sample`` is
    scored. ``prior_counts``: the Dirichlet prior strength on the unseen genes, ``"auto"`` (Good-Turing) or
    ``>= 0`` (0: the reference's pooled profile). Raises ``ValueError`` when fewer than 50 droplets are cell-free.
    """
    if prob is not None and (isinstance(prob, bool) or not isinstance(prob, Real) or not 0.0 <= prob < 1.0):
        raise ValueError(
            f"prob must be None (the rank rule) or a number in [0, 1), got {prob!r} (0: every droplet with "
            ">= min_raw_counts counts is cell-free, as in scvi-tools, whose default is 0.995)"
        )
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not (prior_counts == "auto" or (isinstance(prior_counts, Real) and 0.0 <= prior_counts < np.inf)):
        raise ValueError(f"prior_counts must be 'auto' or a finite number >= 0, got {prior_counts!r}")
    raw = sp.csr_matrix(raw)
    totals = np.asarray(raw.sum(axis=1)).ravel()
    droplets = np.flatnonzero(totals >= min_raw_counts)
    if len(droplets) < MIN_CELL_FREE:
        raise ValueError(
            f"only {len(droplets)} raw droplets have >= {min_raw_counts} counts in these genes; "
            "lower min_raw_counts or pass the unfiltered (raw) droplet matrix"
        )
    prior_mean = pooled_profile(raw[droplets])  # every scored droplet: the cells' profile, mixed with the ambient
    threshold = None
    if prob is None:
        threshold = rank_threshold(totals, min_raw_counts)
        cell_free = totals[droplets] < threshold
        _check_cell_free(int(cell_free.sum()), f"below the rank threshold {threshold:.0f}; pass prob=")
        x = raw[droplets]
    else:
        if sample is not None and len(droplets) > sample:
            droplets = np.sort(np.random.default_rng(seed).choice(droplets, size=int(sample), replace=False))
        x = raw if len(droplets) == raw.shape[0] else raw[droplets]
        cell_free = _reference_cell_free(x, prob, iterations, chunk_size)
    counts = np.asarray(x[cell_free].sum(axis=0), np.float64).ravel()
    profile, alpha = posterior_profile(counts, prior_mean, prior_counts)
    return AmbientEstimate(profile, droplets, multinomial_log_prob(x, profile, chunk_size), cell_free, alpha, threshold)


def _check_cell_free(n: int, advice: str) -> None:
    if n < MIN_CELL_FREE:
        raise ValueError(f"only {n} cell-free droplets found (at least {MIN_CELL_FREE} are needed) {advice}")


def _reference_cell_free(x: sp.csr_matrix, prob: float, iterations: int, chunk_size: int) -> np.ndarray:
    """The reference's iteration: droplets with ``log p_j >= n_genes log(prob)`` under the pooled profile of the
    previous ones (``prob=0``: all), ``(n_droplets,)`` bool."""
    profile = pooled_profile(x)
    threshold = -np.inf if prob == 0.0 else x.shape[1] * np.log(prob)  # scvi-tools: log(0) * n_genes = -inf
    for _ in range(iterations):
        cell_free = multinomial_log_prob(x, profile, chunk_size) >= threshold
        _check_cell_free(int(cell_free.sum()), f"; lower prob (now {prob})")
        profile = pooled_profile(x[cell_free])
    return cell_free
