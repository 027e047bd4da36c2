r"""Calibrated noise ratio and native shares for low contamination (issue 10), as pure functions.

Why the reference model over-estimates the noise ratio
------------------------------------------------------
In ``p_ig = (1 - eps_i) phi_ig + eps_i a_g`` the noise ratio is identified only by genes the cell does
not express (``phi_ig = 0`` but ``a_g > 0``): on the genes it does express, the ambient profile (a
mixture of the cells' own profiles) has nearly the shape of ``phi`` and the two explanations compete.
The decoder's sparse activation sets to exactly zero many genes a cell does express (the long tail of
rarely detected genes; about 40% of a species' genes on the simulated barnyard), and their counts can
then only be explained as ambient, so ``eps`` grows until it covers them. Measured on
``simulate_species_mixture`` (200 cells x 5000 genes, true mean 0.78%): the learned mean is 6.5%,
its correlation with the per-cell fraction of native counts on genes the decoder set to zero is
0.95, and with the truth 0.09. With the true native profiles, the per-cell maximum-likelihood noise
ratio is 0.79% (r = 0.97 with the truth); with the decoder's profiles it is 3.2%. Without sparsity
(``scale_activation="softplus"``) the decoder puts native mass on genes the cell cannot express and
the noise ratio is under-estimated (0.36%) and only 55% of the foreign counts are removed.

The calibration (an empirical-Bayes posterior on pooled neighbourhoods)
----------------------------------------------------------------------
Cells that are neighbours in the SCAR latent space share a native profile ``theta``. For cell ``i``
with neighbourhood ``J(i)`` (its ``k`` nearest cells, itself included), pool the counts
``X_ig = sum_{j in J(i)} x_jg`` and split the pooled library into its native and ambient parts
``T_i = sum_j (1 - eps_j) N_j`` and ``B_i = sum_j eps_j N_j``. Each gene is either *off* in the
neighbourhood (no native expression) or *on*, with the spike-and-slab model

.. code-block:: text

    off (prob 1 - pi_i):  X_ig ~ Poisson(B_i a_g)
    on  (prob pi_i):      X_ig ~ NB(mean mu_ig = (T_i s_i + B_i) a_g, shape alpha)
                          (the pooled rate lambda_ig ~ Gamma(alpha, rate alpha / mu_ig), X ~ Poisson(lambda))

i.e. an expressed gene has, a priori, a native frequency proportional to its ambient frequency
(``s_i a_g``; the ambient profile is the mixture of the cells' profiles), with a broad Gamma
spread (``alpha = 1``: exponential) around it. The posterior probability that the gene is on is

.. code-block:: text

    q_ig = pi_i L_on / (pi_i L_on + (1 - pi_i) L_off),
    log L_on  = lgamma(X + alpha) - lgamma(alpha) - lgamma(X + 1)
                + alpha log(alpha / (alpha + mu)) + X log(mu / (alpha + mu))
    log L_off = X log(B a) - B a - lgamma(X + 1)

and, given on, the posterior mean rate is ``lambda_hat = (alpha + X) / (alpha / mu + 1)``, whose
native part ``theta_ig = max(lambda_hat - B_i a_g, 0) / T_i`` is the neighbourhood's native frequency.
A count of gene ``g`` in cell ``i`` is native with probability

.. code-block:: text

    w_ig = q_ig * (1 - eps_i) theta_ig / ((1 - eps_i) theta_ig + eps_i a_g)

(zero when the gene is off: then every count is ambient). The neighbourhood parameters are set by
EM-like updates, ``pi_i = mean_g q_ig`` and ``s_i = 1 / sum_g q_ig a_g`` (so that ``s_i a_g`` sums to
one over the genes that are on), and the noise ratio by its maximum-likelihood estimate from the
genes that are off,

.. code-block:: text

    eps_i = sum_g (1 - q_ig) x_ig / (N_i sum_g (1 - q_ig) a_g)

(counts of off genes are ``Poisson(N_i eps_i a_g)``; the genes that are on carry no information on
``eps`` because their native frequency is free, which is the non-identifiability above). An off
probability ``1 - q`` below ``OFF_PROBABILITY_FLOOR`` (2^-53) is taken as zero: a cell whose neighbourhood
expresses every gene beyond doubt (a small antibody panel) has no information on ``eps``, which then goes
to its floor 1e-6 rather than to the ratio of two vanishing sums. The EM
update of the split, ``eps_i = sum_g x_ig (1 - w_ig) / N_i``, was tried first: it moves
along that flat direction very slowly (6.5% -> 4.6% in 5 rounds for a truth of 0.78%). The
loop starts every cell at a low noise ratio (:func:`calibrate_model`: ``START_NOISE_RATIO`` = 0.01, not the
model's over-estimate) and runs until the noise ratios stop changing.

The computation (JAX, float32, one jit-compiled loop on the default device)
-------------------------------------------------------------------------
Everything is elementwise given the pooled counts, and where the pooled count is zero (most entries
for many genes) the log-odds is ``logit(pi_i) + alpha log(alpha / (alpha + mu_ig)) + bg_ig``, a function
of the row's parameters and the gene's ambient frequency only. Each round therefore sums the posterior
over all genes *as if* every pooled count were zero, in chunks of rows (nothing ``(n, G)`` is held), and
corrects the sums at the stored entries (the union of the entries of ``x`` and of its pooled counts;
``lgamma(X + alpha) - lgamma(alpha)`` is computed once, in float64, as it does not change). The stored
entries are held on the device in blocks of ``CHUNK_ENTRIES`` (int32 row and column, float32 pooled count,
lgamma term and own count: 20 bytes an entry) and each round adds their corrections block by block (a
``jax.lax.scan``), so its temporaries are bounded by a block; the host builds them in chunks of rows. The
rounds run in one ``jax.lax.while_loop``; the share is evaluated once, at the fitted parameters, block by
block. Agreement with the float64 NumPy derivation (``tests/test_calibration.py``): 1e-6 relative on the
noise ratio, 6e-7 on the share with one profile; 7e-5 and 2.5e-5 with two. Measured on 2 CPU cores
(``benchmarks/calibration_speed.py``): 300 cells x 20,000 genes, 50 rounds, 5.4 s once compiled against
28.9 s for that float64 derivation; 20,000 x 2,000 (24M stored entries), 10 rounds, 12.7 s and 1.31 GB at
peak (2.76 GB when the entries were one array and a round's temporaries spanned all of them); 100,000 x 2,000
(120M entries) 77 s and 5.3 GB (86 s and 13.4 GB), about 44 bytes per stored entry on a CPU, where the device
arrays and the host's construction share the memory.

One ambient profile per batch
-----------------------------
With profiles ``a_b`` and cell ``j`` in batch ``b(j)``, cell ``j``'s ambient counts follow ``a_{b(j)}``, so a
neighbourhood's expected ambient counts are ``bg_ig = sum_{j in J(i)} eps_j N_j a_{b(j) g}`` (replacing
``B_i a_g`` in ``L_off``, in ``mu`` and in ``theta``), and the slab, the share and the noise ratio of
cell ``i`` use its own batch's profile: ``mu_ig = T_i s_i a_{b(i) g} + bg_ig``,
``w_ig = q_ig (1 - eps_i) theta_ig / ((1 - eps_i) theta_ig + eps_i a_{b(i) g})``,
``eps_i = sum_g (1 - q_ig) x_ig / (N_i sum_g (1 - q_ig) a_{b(i) g})``, ``s_i = 1 / sum_g q_ig a_{b(i) g}``.
With one batch these are the formulas above.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from typing import Literal, NamedTuple

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

from .data import batch_index as batch_codes

__all__ = [
    "calibrate_model",
    "calibration_digest",
    "calibrated_native_share",
    "calibrated_split",
    "knn_indices",
    "neighbourhood_posterior",
    "pool_counts",
]

_TINY = 1e-300
_DTYPE = jnp.float32  # of the calibration loop on the device


EXACT_KNN_MAX_CELLS = 50_000  # knn_indices: exact neighbours up to this many cells, approximate (pynndescent) above
_KNN_DISTANCE_ENTRIES = 1 << 24  # exact neighbours: distances held per chunk of rows (128 MB of float64)


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
    i.e. the angle between them. In the SCAR latent space the direction separates cell types and the
    length varies within a type (on the simulated two-species mixture, 300 x 20,000, seed 1: the
    correlation of ``|z|`` with the noise ratio is -0.45 within the smaller species, whose cells furthest
    from the origin then have up to 17 of their 50 Euclidean neighbours in the other species; with the
    cosine metric no cell has a neighbour of the other species, and the calibrated split removes 91.5%
    of the foreign counts instead of 86.6%, keeping 99.57% of the expressed genes' counts either way).
    ``"euclidean"``: the plain distance. Cells whose latent vector is zero are left at zero.

    Up to ``exact_max_cells`` cells (default 50,000) the neighbours are exact, computed over chunks of
    at most ``chunk`` rows and 2^24 distances; the cost grows as ``n^2`` (measured 84 s for 60,000 cells
    on 2 cores). Above it they are approximate: nearest-neighbour descent (``pynndescent``, what
    ``scanpy.pp.neighbors`` uses), seeded by ``seed`` so that the result is reproducible (measured on
    60,000 random 15-dimensional vectors: 99.96% of the exact neighbours found, 4 s once compiled).
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
        d = sq[rows, None] + sq[None, :] - 2.0 * z[rows] @ z.T
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
    found = np.asarray(index.neighbor_graph[0], dtype=np.int64)
    own = np.arange(n)
    found = np.where(found < 0, own[:, None], found)  # a neighbour the search did not fill: the cell itself
    for i in np.flatnonzero(found[:, 0] != own):  # duplicates of a vector can come before the cell itself
        others = found[i][found[i] != i]
        found[i] = np.r_[i, others[: k - 1], np.full(max(0, k - 1 - others.size), i)]
    return found


def pool_counts(x: np.ndarray | sp.spmatrix, neighbours: np.ndarray) -> np.ndarray:
    """``X_ig = sum_{j in J(i)} x_jg`` for the rows of ``neighbours`` ``(m, k)``, dense float64 ``(m, G)``."""
    pooled = _pool(x, neighbours)
    return np.asarray(pooled.toarray() if sp.issparse(pooled) else pooled, dtype=np.float64)


def _pool(x: np.ndarray | sp.spmatrix, neighbours: np.ndarray) -> np.ndarray | sp.csr_matrix:
    """Pooled counts as :func:`pool_counts`, CSR float64 when ``x`` is sparse (no dense ``(m, G)`` array)."""
    m, k = neighbours.shape
    n = x.shape[0]
    indicator = sp.csr_matrix((np.ones(m * k), (np.repeat(np.arange(m), k), neighbours.ravel())), shape=(m, n))
    if sp.issparse(x):
        return sp.csr_matrix(indicator @ sp.csr_matrix(x, dtype=np.float64))
    return np.asarray(indicator @ np.asarray(x, dtype=np.float64), dtype=np.float64)


def neighbourhood_posterior(
    pooled: np.ndarray,
    native_library: np.ndarray,
    ambient_library: np.ndarray,
    ambient: np.ndarray,
    pi: np.ndarray,
    s: np.ndarray,
    alpha: float = 1.0,
    *,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior probability that each gene is on, ``q``, and the native frequency ``theta`` given on.

    The float64 NumPy statement of the posterior (dense ``(m, G)``), checked against ``scipy.stats`` in the
    tests and used there as the oracle of the compiled float32 loop of :func:`calibrated_native_share`.

    Parameters
    ----------
    pooled
        ``X``, ``(m, G)`` pooled counts of each cell's neighbourhood.
    native_library, ambient_library
        ``T`` and ``B``, ``(m,)``.
    ambient
        ``a``, ``(G,)``, sums to one; or ``(m, G)``, the ambient profile of each row's cell (per-batch
        profiles), which then scales the slab's mean ``T s a``.
    pi, s
        ``(m,)`` prior probability that a gene is on and the native-to-ambient frequency scale.
    alpha
        Gamma shape of the slab.
    background
        ``(m, G)`` expected ambient counts of each pooled neighbourhood, ``sum_j eps_j N_j a_{b(j)}`` with
        per-batch profiles; default ``B a``.

    Returns
    -------
    q, theta
        ``(m, G)`` each (formulas in the module docstring).
    """
    X = np.asarray(pooled, dtype=np.float64)
    T, B = np.asarray(native_library, np.float64)[:, None], np.asarray(ambient_library, np.float64)[:, None]
    a = np.asarray(ambient, np.float64)
    a = a[None, :] if a.ndim == 1 else a
    if background is None:
        background = B * a
        mu = (T * np.asarray(s, np.float64)[:, None] + B) * a
    else:
        background = np.asarray(background, np.float64)
        mu = T * np.asarray(s, np.float64)[:, None] * a + background
    log_on = (
        gammaln(X + alpha)
        - gammaln(alpha)
        + alpha * (np.log(alpha) - np.log(alpha + mu))
        + X * (np.log(np.maximum(mu, _TINY)) - np.log(alpha + mu))
    )
    log_off = X * np.log(np.maximum(background, _TINY)) - background
    p = np.clip(np.asarray(pi, np.float64)[:, None], 1e-12, 1 - 1e-12)
    log_odds = np.log(p) - np.log1p(-p) + log_on - log_off
    q = 0.5 * (1.0 + np.tanh(0.5 * log_odds))  # the logistic function, without overflow
    rate = (alpha + X) / (alpha / np.maximum(mu, _TINY) + 1.0)
    theta = np.maximum(rate - background, 0.0) / np.maximum(T, _TINY)
    return q, theta


CHUNK_ENTRIES = 1 << 20  # cells x genes per chunk of rows, and stored entries per block, of the loop's temporaries
_HOST_ENTRIES = 1 << 20  # cells x genes per chunk of rows when the stored entries are built on the host
_MAX_ENTRIES = np.iinfo(np.int32).max - 1  # stored entries: their positions and rows are int32 on the device
# calibrate_model warns above this mean noise ratio: measured on PBMC, a model trained 5 epochs (latent
# neighbourhoods that mix cell types) gives 0.91, a trained one 0.07 (soup-implied at most 0.058)
IMPLAUSIBLE_NOISE_RATIO = 0.5
# A gene whose probability of being off is below this is on beyond doubt: its counts carry no information on the
# noise ratio, which is estimated from the genes that are off. Without the floor a neighbourhood in which every
# gene is on (an 87-ADT panel) would take its noise ratio from the ratio of two vanishing sums, dominated by the
# least certain expressed gene (measured on CITE-seq: mean 0.26 against 0.18 with it, the isotypes imply 0.19).
# The float64 loop of earlier versions had it implicitly (1 - q rounds to 0 below 1.1e-16); it is that value.
OFF_PROBABILITY_FLOOR = 2.0**-53
START_NOISE_RATIO = 0.01  # where calibrate_model starts the iteration (the lowest self-consistent point is wanted)
# The removal/retention knob's default for users (calibrate_model, SCAR.get_denoised_counts): at 0.1, on the
# simulated mixtures (seed 0) 99.60% / 99.58% of expressed-gene counts are kept and 99.1% / 91.1% of the foreign
# counts removed at 120 x 1,500 / 300 x 20,000 (at 1: 99.61% / 99.64% kept, 96.9% / 77.9% removed); CITE-seq
# isotypes 91.3% removed (1: 88.3%) with the other ADTs' retention unchanged; PBMC unchanged to 0.1 point.
# With cosine neighbourhoods (2026-12-03), at 0.1: 99.61% / 99.5% at 120 x 1,500; 300 x 20,000 seeds 0 / 1
# 99.57% / 90.4% and 99.57% / 91.5% (at 1: 99.63% / 78.0%, 99.63% / 78.1%).
DEFAULT_EXPRESSED_PRIOR_ODDS = 0.1


class _Problem(NamedTuple):
    """The device arrays of one calibration: cells, their neighbourhoods, and the stored entries.

    The entries are the union of the stored entries of the counts ``x`` and of their pooled counts, as
    ``(row, col)`` in row-major order with the pooled count ``pooled`` and the cell's own count ``counts``, in
    blocks of a fixed number of entries ``(n_blocks, block)`` (the last padded with ``(n - 1, 0)`` and
    ``pooled = counts = lgamma_ratio = 0``, which adds exactly zero to every sum). The rounds and the share go
    over the blocks one at a time, so their temporaries are bounded by a block, not by the entries."""

    library: jax.Array  # (n,) N_i
    neighbours: jax.Array  # (n, k)
    batch: jax.Array  # (n,) row of ``profiles`` of each cell
    profiles: jax.Array  # (n_batches, G), rows sum to one
    row: jax.Array  # (n_blocks, block)
    col: jax.Array  # (n_blocks, block)
    pooled: jax.Array  # (n_blocks, block) X_ig
    lgamma_ratio: jax.Array  # (n_blocks, block) lgamma(X_ig + alpha) - lgamma(alpha)
    counts: jax.Array  # (n_blocks, block) x_ig


def _log_odds(X, lgamma_ratio, mu, background, logit_pi, alpha):
    """``logit(pi) + log L_on - log L_off`` elementwise (module docstring; the ``lgamma(X + 1)`` of both cancels).

    ``lgamma_ratio = lgamma(X + alpha) - lgamma(alpha)``, a constant of the entries computed once. At ``X = 0``
    (``lgamma_ratio = 0``) it is ``logit(pi) + alpha log(alpha / (alpha + mu)) + background`` exactly."""
    tiny = jnp.finfo(mu.dtype).tiny
    return (
        logit_pi
        + lgamma_ratio
        + alpha * (jnp.log(alpha) - jnp.log(alpha + mu))
        + X * (jnp.log(jnp.maximum(mu, tiny)) - jnp.log(alpha + mu) - jnp.log(jnp.maximum(background, tiny)))
        + background
    )


def _on_off(log_odds):
    """``q = sigmoid(log_odds)`` and ``1 - q`` (one ``exp``, no overflow), ``1 - q`` set to zero below
    ``OFF_PROBABILITY_FLOOR``."""
    small = jnp.exp(-jnp.abs(log_odds))
    big = 1.0 / (1.0 + small)
    small = small * big
    positive = log_odds >= 0
    off = jnp.where(positive, small, big)
    return jnp.where(positive, big, small), jnp.where(off < OFF_PROBABILITY_FLOOR, 0.0, off)


def _native_share(X, mu, background, native_library, eps, cell_a, log_odds, alpha, odds):
    """``w = q' (1 - eps) theta / ((1 - eps) theta + eps a)``, ``q' = c q / (c q + 1 - q)``, elementwise."""
    tiny = jnp.finfo(mu.dtype).tiny
    rate = (alpha + X) / (alpha / jnp.maximum(mu, tiny) + 1.0)
    native = (1.0 - eps) * jnp.maximum(rate - background, 0.0) / jnp.maximum(native_library, tiny)
    total = native + eps * cell_a
    q, off = _on_off(log_odds)
    share = odds * q / (odds * q + off) * jnp.where(total > 0, native / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.clip(share, 0.0, 1.0)  # float32 division on XLA can round a ratio of equals to 1 + 2^-23


def _libraries(eps, problem: _Problem) -> tuple[jax.Array, jax.Array]:
    """``T`` ``(n,)`` and each neighbourhood's ambient library by the batch it comes from ``(n, n_batches)``."""
    ambient = eps * problem.library
    native = ((problem.library - ambient)[problem.neighbours]).sum(1)
    n_batches = problem.profiles.shape[0]
    if n_batches == 1:
        return native, ambient[problem.neighbours].sum(1)[:, None]
    by_batch = [jnp.where(problem.batch == b, ambient, 0.0)[problem.neighbours].sum(1) for b in range(n_batches)]
    return native, jnp.stack(by_batch, 1)


def _background(by_batch, profiles, cols=None):
    """Expected ambient counts ``sum_b by_batch[:, b] a_b`` (``(m, G)``, or at ``cols`` ``(m,)``), no matmul
    (a float32 matmul can run at reduced precision on accelerators)."""
    terms = [
        by_batch[:, b, None] * profiles[b, None] if cols is None else by_batch[:, b] * profiles[b, cols]
        for b in range(profiles.shape[0])
    ]
    return functools.reduce(jnp.add, terms)


def _by_row_chunks(fn, arrays: tuple, n: int, chunk: int):
    """``fn`` over chunks of ``chunk`` rows of the ``(n, ...)`` arrays (padded with row 0), rows concatenated."""
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n

    def split(a):
        a = jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]) if pad else a
        return a.reshape((n_chunks, chunk) + a.shape[1:])

    out = jax.lax.map(lambda args: fn(*args), tuple(split(a) for a in arrays))
    return jax.tree_util.tree_map(lambda o: o.reshape((n_chunks * chunk,) + o.shape[2:])[:n], out)


def _round(eps, pi, s, problem: _Problem, alpha, chunk: int):
    """One update of ``(eps, pi, s)`` (module docstring): the posterior at every zero pooled count is a
    function of the row's parameters and the gene's ambient frequencies (row chunks, nothing ``(n, G)`` held);
    the stored entries correct it."""
    n, n_genes = problem.library.shape[0], problem.profiles.shape[1]
    native_library, by_batch = _libraries(eps, problem)
    logit_pi = jnp.log(pi) - jnp.log1p(-pi)
    scale = native_library * s

    def zero_counts(scale, logit_pi, by_batch, batch):  # (c,) sums over all genes as if every X were 0
        cell_a = problem.profiles[batch]
        background = _background(by_batch, problem.profiles)
        log_odds = _log_odds(0.0, 0.0, scale[:, None] * cell_a + background, background, logit_pi[:, None], alpha)
        q, off = _on_off(log_odds)
        return q.sum(1), (q * cell_a).sum(1), (off * cell_a).sum(1)

    q_sum, q_ambient, off_ambient = _by_row_chunks(zero_counts, (scale, logit_pi, by_batch, problem.batch), n, chunk)

    def stored(sums, block):  # the corrections at one block of stored entries, added row by row
        row, col, pooled, lgamma_ratio, counts = block
        mu, background, cell_a = _entry_terms(scale, by_batch, problem, row, col)
        q, off = _on_off(_log_odds(pooled, lgamma_ratio, mu, background, logit_pi[row], alpha))
        q0, off0 = _on_off(_log_odds(0.0, 0.0, mu, background, logit_pi[row], alpha))
        terms = (q - q0, (q - q0) * cell_a, (off - off0) * cell_a, off * counts)
        added = (total.at[row].add(term, indices_are_sorted=True) for total, term in zip(sums, terms, strict=True))
        return tuple(added), None

    blocks = (problem.row, problem.col, problem.pooled, problem.lgamma_ratio, problem.counts)
    sums, _ = jax.lax.scan(stored, (q_sum, q_ambient, off_ambient, jnp.zeros(n, eps.dtype)), blocks)
    q_sum, q_ambient, off_ambient, off_counts = sums
    tiny = jnp.finfo(eps.dtype).tiny
    new_eps = jnp.clip(off_counts / jnp.maximum(problem.library * off_ambient, tiny), 1e-6, 1 - 1e-6)
    return new_eps, jnp.clip(q_sum / n_genes, 1e-6, 1 - 1e-6), 1.0 / jnp.maximum(q_ambient, 1e-12)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _fit(eps, pi, s, problem: _Problem, alpha, tol, n_iter, chunk: int):
    """Rounds of :func:`_round` until no noise ratio changes by more than a relative ``tol`` (at most ``n_iter``)."""

    def keep_going(carry):
        done, _, _, _, change = carry
        return (done < n_iter) & (change >= tol)

    def step(carry):
        done, eps, pi, s, _ = carry
        new_eps, pi, s = _round(eps, pi, s, problem, alpha, chunk)
        return done + 1, new_eps, pi, s, jnp.max(jnp.abs(new_eps - eps) / eps)

    done, eps, pi, s, _ = jax.lax.while_loop(
        keep_going, step, (jnp.int32(0), eps, pi, s, jnp.asarray(jnp.inf, eps.dtype))
    )
    return eps, pi, s, done


def _entry_terms(scale, by_batch, problem: _Problem, row, col):
    """``mu = T s a + bg``, the background ``bg`` and the cell's ambient frequency ``a`` at entries ``(row, col)``,
    from ``scale = T s`` ``(n,)`` and the ambient libraries by batch ``(n, n_batches)``."""
    cell_a = problem.profiles[problem.batch[row], col]
    background = _background(by_batch[row], problem.profiles, col)
    return scale[row] * cell_a + background, background, cell_a


@jax.jit
def _share_at(eps, pi, s, problem: _Problem, at, alpha, odds):
    """The native share at the stored entries ``at`` ``(m_blocks, block)`` (positions in the flattened
    ``problem.row``), one block at a time."""
    native_library, by_batch = _libraries(eps, problem)
    scale = native_library * s
    logit_pi = jnp.log(pi) - jnp.log1p(-pi)

    def block(at):
        row, col, pooled = problem.row.ravel()[at], problem.col.ravel()[at], problem.pooled.ravel()[at]
        mu, background, cell_a = _entry_terms(scale, by_batch, problem, row, col)
        log_odds = _log_odds(pooled, problem.lgamma_ratio.ravel()[at], mu, background, logit_pi[row], alpha)
        return _native_share(pooled, mu, background, native_library[row], eps[row], cell_a, log_odds, alpha, odds)

    return jax.lax.map(block, at)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _share_dense(eps, pi, s, problem: _Problem, alpha, odds, chunk: int):
    """The native share ``(n, G)`` with every pooled count at zero (the stored entries are then overwritten)."""
    native_library, by_batch = _libraries(eps, problem)
    logit_pi = jnp.log(pi) - jnp.log1p(-pi)

    def rows(native_library, s, logit_pi, eps, by_batch, batch):
        cell_a = problem.profiles[batch]
        background = _background(by_batch, problem.profiles)
        mu = (native_library * s)[:, None] * cell_a + background
        log_odds = _log_odds(0.0, 0.0, mu, background, logit_pi[:, None], alpha)
        return _native_share(0.0, mu, background, native_library[:, None], eps[:, None], cell_a, log_odds, alpha, odds)

    arrays = (native_library, s, logit_pi, eps, by_batch, problem.batch)
    return _by_row_chunks(rows, arrays, problem.library.shape[0], chunk)


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
    """Calibrated noise ratio ``(n,)`` and native share ``w`` ``(n, G)`` of every cell (module docstring).

    Parameters
    ----------
    x
        ``(n, G)`` observed counts (dense or sparse).
    neighbours
        ``(n, k)`` neighbourhood of each cell (e.g. :func:`knn_indices` on the SCAR latent), itself included.
    ambient
        ``(G,)`` ambient profile, or ``(n_batches, G)`` one per batch with ``batch_index``: cell ``j``'s
        ambient counts then follow its own batch's profile, so a neighbourhood's expected ambient counts
        are ``sum_j eps_j N_j a_{b(j)}``, and a cell's noise ratio and shares use ``a_{b(i)}``.
    batch_index
        ``(n,)`` batch of each cell (rows of ``ambient``); needed with more than one profile.
    noise_ratio
        ``(n,)`` starting noise ratio (e.g. the model's).
    n_iter, tol
        At most ``n_iter`` rounds of the updates of ``eps``, ``pi`` and ``s``; stop once no cell's
        noise ratio changes by more than a relative ``tol``. The iteration can have several fixed
        points: on simulated data starting at 0.4 or at 0.01 gives the same result (within 20 rounds),
        but on real PBMC data a model trained at sparsity 0.9 (noise ratio 0.35) leads from its own
        noise ratio to a spurious 0.74, and from 0.01 to 0.071 (the soup implies at most 0.058).
        :func:`calibrate_model` therefore starts low (``START_NOISE_RATIO``), which also reaches 0.20 and
        0.05 on simulations with 20% and 5% contamination.
    alpha, pi0
        Gamma shape of the slab and the starting prior probability that a gene is on.
    expressed_prior_odds
        The removal/retention knob ``c > 0`` (default 1: the posterior as derived above). The share
        uses ``q' = c q / (c q + 1 - q)``, the posterior on-probability with the prior odds
        ``pi / (1 - pi)`` multiplied by ``c``, in ``w = q' (1 - eps) theta / ((1 - eps) theta + eps a)``.
        ``c > 1`` demands more evidence before a gene is called off in a neighbourhood (all its
        counts removed): fewer real counts are lost (the false-removal rate falls) and less
        contamination is removed; ``c < 1`` the reverse. ``w`` is non-decreasing in ``c`` entry by
        entry. The knob enters only the final share, not the fit: the noise ratio, ``pi`` and ``s``
        are those of ``c = 1`` whatever ``c``.
    share_at
        ``"all"``: ``w`` dense ``(n, G)``. ``"observed"``, for sparse ``x``: ``w`` only where ``x`` stores
        an entry, as a CSR matrix with the pattern of ``x`` (duplicates summed, indices sorted), which
        is all a count-preserving split needs; the memory is then that of the sparse matrices.
    chunk_entries
        The zero-count part of each round is evaluated over chunks of about ``chunk_entries`` cells x genes,
        and the stored entries in blocks of ``chunk_entries`` (float32 temporaries of that size), so the
        memory beyond ``x``, its stored pooled entries (20 bytes each on the device) and the result does
        not grow with the number of cells. The result does not depend on it (up to float32 rounding of the
        sums).

    Returns
    -------
    noise_ratio, share
        ``(n,)`` float64, and ``w`` evaluated once at the fitted ``(eps, pi, s)``: dense ``(n, G)``
        float64, or CSR (``share_at="observed"``). The loop runs in float32 on the default JAX device
        (module docstring).
    """
    odds = float(expressed_prior_odds)
    if not np.isfinite(odds) or odds <= 0:
        raise ValueError(f"expressed_prior_odds must be a positive number, got {expressed_prior_odds!r}")
    if share_at not in ("all", "observed"):
        raise ValueError(f"share_at must be 'all' or 'observed', got {share_at!r}")
    sparse_input = sp.issparse(x)
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    x.sum_duplicates()  # canonical (sorted indices): the pattern of the "observed" share
    n, n_genes = x.shape
    profiles = np.asarray(ambient, np.float64)
    profiles = profiles.reshape(1, -1) if profiles.ndim == 1 else profiles
    if profiles.ndim != 2 or profiles.shape[1] != n_genes:
        raise ValueError(f"ambient must have shape (n_genes,) or (n_batches, n_genes), got {np.shape(ambient)}")
    profiles = profiles / profiles.sum(1, keepdims=True)
    n_batches = profiles.shape[0]
    if n_batches > 1:
        if batch_index is None:
            raise ValueError(f"batch_index is needed with {n_batches} ambient profiles (one per batch)")
        batch_index = np.asarray(batch_index).ravel()
        if batch_index.shape != (n,) or batch_index.min() < 0 or batch_index.max() >= n_batches:
            raise ValueError(f"batch_index must be (n_cells,) = ({n},) integers in [0, {n_batches})")
    else:
        batch_index = np.zeros(n, np.int64)
    block = max(1, int(chunk_entries))
    entries, at_x, n_entries = _stored_entries(x, neighbours, alpha, block)
    block = entries["row"].shape[1]
    f32 = functools.partial(jnp.asarray, dtype=_DTYPE)
    problem = _Problem(
        library=f32(np.asarray(x.sum(1)).ravel()),
        neighbours=jnp.asarray(neighbours, jnp.int32),
        batch=jnp.asarray(batch_index, jnp.int32),
        profiles=f32(profiles),
        **{name: jnp.asarray(entries.pop(name)) for name in ("row", "col", "pooled", "lgamma_ratio", "counts")},
    )
    chunk = max(1, min(n, int(chunk_entries) // max(n_genes, 1)))
    start = f32(np.clip(np.asarray(noise_ratio, np.float64).ravel(), 1e-6, 1 - 1e-6))
    eps, pi, s, _ = _fit(start, jnp.full(n, pi0, _DTYPE), jnp.ones(n, _DTYPE), problem, alpha, tol, int(n_iter), chunk)
    if share_at == "observed" and sparse_input:
        w = _share_at(eps, pi, s, problem, _blocks_of(at_x, block), alpha, odds).ravel()[: at_x.size]
        w = sp.csr_matrix((np.asarray(w, np.float64), x.indices.copy(), x.indptr.copy()), shape=x.shape)
    else:
        w = np.array(_share_dense(eps, pi, s, problem, alpha, odds, chunk), np.float64)  # writable
        at = _blocks_of(np.arange(n_entries), block)
        stored = np.asarray(_share_at(eps, pi, s, problem, at, alpha, odds), np.float64).ravel()[:n_entries]
        w[np.asarray(problem.row).ravel()[:n_entries], np.asarray(problem.col).ravel()[:n_entries]] = stored
    return np.asarray(eps, np.float64), w


def calibrate_model(
    model,
    adata=None,
    n_neighbours: int = 50,
    n_iter: int = 50,
    alpha: float = 1.0,
    expressed_prior_odds: float = DEFAULT_EXPRESSED_PRIOR_ODDS,
    batch_size: int | None = None,
    share_at: Literal["all", "observed"] = "all",
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> tuple[np.ndarray, np.ndarray | sp.csr_matrix]:
    """:func:`calibrated_native_share` for a trained :class:`scar_jax.SCAR` (one ambient profile, or one per batch).

    Neighbourhoods are the ``n_neighbours`` nearest cells in the latent representation (``metric``: see
    :func:`knn_indices`; cosine by default, ``"euclidean"`` as in earlier versions); the noise
    ratio starts at ``START_NOISE_RATIO`` (0.01) for every cell, not at the model's estimate, whose
    over-estimate can lead the iteration to a spurious high fixed point (see
    :func:`calibrated_native_share`). Returns the calibrated noise ratio ``(n,)`` and the
    native share ``(n, G)``; ``numpy.random.default_rng(seed).binomial(x, share)`` is the
    count-preserving split, ``x * share`` its mean. ``expressed_prior_odds``: the removal/retention
    knob of :func:`calibrated_native_share` (default ``DEFAULT_EXPRESSED_PRIOR_ODDS`` = 0.1, measured
    better than the derived posterior's 1: see the constant). ``share_at="observed"``: the share only
    at the stored entries of sparse counts, as CSR (what :meth:`SCAR.get_denoised_counts` uses).
    """
    _check_metric(metric)  # before the latent pass
    adata = model.adata if adata is None else adata
    profile = np.asarray(model.ambient_profile, np.float64)  # (n_batches, G): one row per batch, or one
    batch_index = batch_codes(adata, model.spec) if profile.shape[0] > 1 else None  # checked against the setup
    layer = model.spec.layer
    x = adata.X if layer is None else adata.layers[layer]
    if isinstance(x, anndata.abc.CSRDataset | anndata.abc.CSCDataset):  # backed: the calibration needs all cells
        x = x.to_memory()
    elif not isinstance(x, np.ndarray) and not sp.issparse(x):  # e.g. an h5py or zarr dense array on disk
        x = np.asarray(x[...])
    latent = model.get_latent_representation(adata, batch_size=batch_size)
    neighbours = knn_indices(latent, n_neighbours, metric=metric)
    eps, share = calibrated_native_share(
        x,
        neighbours,
        profile if batch_index is not None else profile[0],
        np.full(adata.n_obs, START_NOISE_RATIO),
        n_iter,
        alpha,
        expressed_prior_odds=expressed_prior_odds,
        share_at=share_at,
        batch_index=batch_index,
    )
    if float(np.mean(eps)) > IMPLAUSIBLE_NOISE_RATIO:
        warnings.warn(
            f"the calibrated mean noise ratio is {np.mean(eps):.2f}: most counts are called ambient. This "
            f"happens when the latent neighbourhoods do not separate cell types (their pooled profile is then "
            f"the ambient profile itself), e.g. after too few epochs: train longer (the default max_epochs), "
            f"check the ambient profile, or use method='split'",
            UserWarning,
            stacklevel=2,
        )
    return eps, share


def calibration_digest(adata: anndata.AnnData, layer: str | None, profile: np.ndarray, batch_index=None) -> str | None:
    """A digest (blake2b) of what a calibration reads from ``adata``: the counts (``X`` or ``layer``), the ambient
    ``profile`` and the batch of each cell (``batch_index``, with more than one profile).

    ``None`` when the counts are not in memory (backed: reading them to hash costs what it saves). Hashing runs at
    about 1 GB/s, a small fraction of the calibration it lets :class:`scar_jax.SCAR` skip."""
    x = adata.X if layer is None else adata.layers[layer]
    if sp.issparse(x):
        parts = [x.data, x.indices, x.indptr]
    elif isinstance(x, np.ndarray):
        parts = [x]
    else:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((type(x).__name__, x.shape, str(x.dtype))).encode())
    for part in [*parts, np.asarray(profile), *([] if batch_index is None else [np.asarray(batch_index)])]:
        digest.update(np.ascontiguousarray(part))
    return digest.hexdigest()


def calibrated_split(
    x: np.ndarray | sp.spmatrix, share: np.ndarray | sp.csr_matrix, seed: int = 0, return_sparse: bool | None = None
) -> np.ndarray | sp.csr_matrix:
    """The count-preserving split ``Binomial(x, share)`` of counts ``x`` ``(n, G)`` with native shares ``share``.

    ``share`` as :func:`calibrate_model` returns it: dense ``(n, G)``, or for sparse ``x`` CSR at the
    observed entries (``share_at="observed"``; looked up entry by entry if its layout differs from the
    canonical form of ``x``). One ``numpy.random.default_rng(seed)`` stream over the stored entries in
    row order, so the result is reproducible from ``seed``; integer, ``0 <= out <= x``, zeros stay zero.
    ``return_sparse``: CSR output (default: when ``x`` is sparse). This is what
    :meth:`scar_jax.SCAR.get_denoised_counts` returns for ``method="calibrated"`` with the same seed.
    """
    rng = np.random.default_rng(seed)
    if sp.issparse(x):
        x = sp.csr_matrix(x, copy=True)
        x.sum_duplicates()
        # the share is CSR with the pattern of the canonical counts (calibrated_native_share)
        same = sp.issparse(share) and np.array_equal(share.indptr, x.indptr)
        if same and np.array_equal(share.indices, x.indices):
            at_counts = share.data
        else:  # another layout of the same counts: look the shares up
            row_of = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
            at_counts = np.asarray(share[row_of, x.indices]).ravel()
        data = rng.binomial(np.rint(x.data).astype(np.int64), at_counts).astype(np.float32)
        out = sp.csr_matrix((data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
        out.eliminate_zeros()
        return out if return_sparse is None or return_sparse else out.toarray()
    out = rng.binomial(np.rint(np.asarray(x)).astype(np.int64), share).astype(np.float32)
    return sp.csr_matrix(out) if return_sparse else out
