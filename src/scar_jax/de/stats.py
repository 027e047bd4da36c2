"""Bayes factors, log-fold-change summaries and FDR flags from paired posterior samples (JAX, gene-chunked)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-8
"""Offset inside the logarithms of the Bayes factors (scvi-tools' ``eps``)."""

VANILLA_COLUMNS = ("proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2")
CHANGE_COLUMNS = (
    "proba_de",
    "proba_not_de",
    "bayes_factor",
    "scale1",
    "scale2",
    "pseudocounts",
    "delta",
    "lfc_mean",
    "lfc_median",
    "lfc_std",
    "lfc_min",
    "lfc_max",
)
COUNT_COLUMNS = (
    "raw_mean1",
    "raw_mean2",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "raw_normalized_mean1",
    "raw_normalized_mean2",
)


def zero_expression_mask(x: Any, threshold_counts: float = 0.01) -> np.ndarray:
    """Genes whose mean raw count over the cells ``x`` ``(n_cells, n_genes)`` is below ``threshold_counts``.

    Returns a boolean ``(n_genes,)`` mask, the ``where_zero`` input of
    :func:`estimate_pseudocounts_offset`.
    """
    return np.asarray(x.mean(axis=0), dtype=np.float64).ravel() < threshold_counts


def estimate_pseudocounts_offset(
    scale1: np.ndarray,
    scale2: np.ndarray,
    where_zero1: np.ndarray,
    where_zero2: np.ndarray,
    quantile: float = 0.9,
) -> float:
    """Pseudocount shrinking the log-fold changes of non-expressed genes (scvi-tools' rule).

    Per group, the ``quantile`` of the per-gene maximum sampled scale over the genes not expressed in
    that group (``1e-10`` if there is none); the offset is the larger of the two divided by ``n_genes``,
    floored at ``1e-10``.

    Parameters
    ----------
    scale1, scale2
        Paired posterior samples ``(n_samples, n_genes)``.
    where_zero1, where_zero2
        Boolean ``(n_genes,)`` masks of the genes not expressed in each group.
    quantile
        Quantile of the maximum scales.
    """
    max1 = np.asarray(np.max(scale1, axis=0), dtype=np.float64)
    max2 = np.asarray(np.max(scale2, axis=0), dtype=np.float64)
    where_zero1 = np.asarray(where_zero1, dtype=bool).ravel()
    where_zero2 = np.asarray(where_zero2, dtype=bool).ravel()
    if not (max1.shape == max2.shape == where_zero1.shape == where_zero2.shape):
        raise ValueError("Dimension mismatch between scales and masks to compute the pseudocounts offset")
    eps1 = np.quantile(max1[where_zero1], quantile) if where_zero1.any() else 1e-10
    eps2 = np.quantile(max2[where_zero2], quantile) if where_zero2.any() else 1e-10
    return float(max(1e-10, max(eps1, eps2) / max1.shape[0]))


def estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """LFC threshold from a 3-component 1-d Gaussian mixture of the per-gene LFC means.

    ``max(min_thres, coef * mean(|lowest mean|, |highest mean|))`` of the mixture components, as
    scvi-tools' ``estimate_delta`` (which fits ``sklearn.mixture.GaussianMixture``; this is a
    deterministic EM with quantile/k-means initialisation and the same ``reg_covar``/``tol``).

    Parameters
    ----------
    lfc_means
        ``(n_genes,)`` posterior mean LFCs.
    """
    x = np.asarray(lfc_means, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("lfc_means should be 1-dimensional of shape (n_genes,)")
    x = x[np.isfinite(x)]
    if x.size < 3:
        raise ValueError("estimating delta needs at least 3 genes with finite LFC means")
    k, reg = 3, 1e-6
    centers = np.quantile(x, [1 / 6, 1 / 2, 5 / 6])
    for _ in range(100):  # 1-d k-means initialisation
        labels = np.argmin(np.abs(x[:, None] - centers[None, :]), axis=1)
        new = np.array([x[labels == j].mean() if (labels == j).any() else centers[j] for j in range(k)])
        if np.allclose(new, centers):
            break
        centers = new
    resp = np.eye(k)[labels]
    lower = -np.inf
    for _ in range(100):
        nk = resp.sum(0) + 10 * np.finfo(float).eps
        means = resp.T @ x / nk
        var = (resp * (x[:, None] - means[None, :]) ** 2).sum(0) / nk + reg
        weights = nk / x.size
        log_p = np.log(weights) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (x[:, None] - means) ** 2 / var
        log_norm = np.logaddexp.reduce(log_p, axis=1)
        resp = np.exp(log_p - log_norm[:, None])
        bound = log_norm.mean()
        if abs(bound - lower) < 1e-3:
            break
        lower = bound
    vals = np.sort(means)
    return float(max(min_thres, coef * np.abs(vals[[0, -1]]).mean()))


@jax.jit
def _vanilla_kernel(s1: jax.Array, s2: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    n_greater = jnp.sum(s1 > s2, axis=0, dtype=jnp.int32)
    return n_greater, jnp.mean(s1, axis=0), jnp.mean(s2, axis=0)


@jax.jit
def _lfc_mean_kernel(s1: jax.Array, s2: jax.Array, pseudocounts: jax.Array) -> jax.Array:
    return jnp.mean(jnp.log2(s1 + pseudocounts) - jnp.log2(s2 + pseudocounts), axis=0)


def _order_stats_on_device() -> bool:
    """Sort on the device only on accelerators: XLA's CPU sort is slower than numpy's."""
    return jax.default_backend() != "cpu"


@functools.partial(jax.jit, static_argnames=("levels", "on_device"))
def _change_kernel(
    s1: jax.Array,
    s2: jax.Array,
    pseudocounts: jax.Array,
    delta: jax.Array,
    levels: tuple[float, ...],
    on_device: bool,
) -> dict[str, jax.Array]:
    n = s1.shape[0]
    lfc = jnp.log2(s1 + pseudocounts) - jnp.log2(s2 + pseudocounts)
    out = {
        "n_plus": jnp.sum(lfc >= delta, axis=0, dtype=jnp.int32),
        "n_minus": jnp.sum(lfc < -delta, axis=0, dtype=jnp.int32),
        "scale1": jnp.mean(s1, axis=0),
        "scale2": jnp.mean(s2, axis=0),
    }
    # Reported LFC summaries use a 1000x smaller pseudocount, as scvi-tools does.
    small = pseudocounts * 1e-3
    lfc = jnp.log2(s1 + small) - jnp.log2(s2 + small)
    out["lfc_mean"] = jnp.mean(lfc, axis=0)
    out["lfc_std"] = jnp.std(lfc, axis=0)
    out["lfc_min"] = jnp.min(lfc, axis=0)
    out["lfc_max"] = jnp.max(lfc, axis=0)
    if not on_device:  # median and intervals on the host
        out["lfc"] = lfc
        return out
    lfc = jnp.sort(lfc, axis=0)
    out["lfc_median"] = 0.5 * (lfc[(n - 1) // 2] + lfc[n // 2])
    for level in levels:  # highest-posterior-density intervals on the sorted samples
        inc = int(math.floor(level * n))
        idx = jnp.argmin(lfc[inc:] - lfc[: n - inc], axis=0)
        out[f"hpd_{level}_min"] = jnp.take_along_axis(lfc, idx[None, :], axis=0)[0]
        out[f"hpd_{level}_max"] = jnp.take_along_axis(lfc, idx[None, :] + inc, axis=0)[0]
    return out


def _hpd_sorted(s: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-density interval ``(lower, upper)`` per column of column-sorted samples ``s``."""
    n = s.shape[0]
    inc = int(math.floor(level * n))
    if n - inc <= 0:
        raise ValueError("Too few samples for the interval: need 0 <= confidence_level < 1")
    idx = np.argmin(s[inc:] - s[: n - inc], axis=0)
    cols = np.arange(s.shape[1])
    return s[idx, cols], s[idx + inc, cols]


def _change_chunk(
    s1: jax.Array, s2: jax.Array, pseudocounts: float, delta: float, levels: tuple[float, ...]
) -> dict[str, np.ndarray]:
    on_device = _order_stats_on_device()
    res = _change_kernel(s1, s2, jnp.float32(pseudocounts), jnp.float32(delta), levels=levels, on_device=on_device)
    res = {key: np.asarray(value) for key, value in res.items()}
    if not on_device:
        lfc = res.pop("lfc")
        if levels:
            lfc = np.sort(lfc, axis=0)
            n = lfc.shape[0]
            res["lfc_median"] = 0.5 * (lfc[(n - 1) // 2] + lfc[n // 2])
            for level in levels:
                res[f"hpd_{level}_min"], res[f"hpd_{level}_max"] = _hpd_sorted(lfc, level)
        else:
            res["lfc_median"] = np.median(lfc, axis=0)
    return res


def _by_gene_chunks(fn: Callable, s1: np.ndarray, s2: np.ndarray, chunk_size: int | None, fill: float):
    """Apply ``fn(s1_chunk, s2_chunk) -> pytree of (chunk,) arrays`` over fixed-size gene chunks."""
    n_genes = s1.shape[1]
    if chunk_size is None or n_genes <= chunk_size:
        return jax.tree.map(np.asarray, fn(jnp.asarray(s1), jnp.asarray(s2)))
    parts = []
    for start in range(0, n_genes, chunk_size):
        c1, c2 = s1[:, start : start + chunk_size], s2[:, start : start + chunk_size]
        width = c1.shape[1]
        if width < chunk_size:  # pad the last chunk so nothing recompiles
            pad = ((0, 0), (0, chunk_size - width))
            c1, c2 = np.pad(c1, pad, constant_values=fill), np.pad(c2, pad, constant_values=fill)
        res = fn(jnp.asarray(c1), jnp.asarray(c2))
        parts.append(jax.tree.map(lambda a, w=width: np.asarray(a)[:w], res))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def credible_intervals(samples: np.ndarray, confidence_level: float = 0.94) -> np.ndarray:
    """Highest-posterior-density interval per column (scvi-tools' arviz-derived rule, unimodal case).

    Parameters
    ----------
    samples
        ``(n_samples, n_features)`` or ``(n_samples,)``.
    confidence_level
        Mass of the interval, in ``[0, 1)``.

    Returns
    -------
    np.ndarray
        ``(n_features, 2)`` (or ``(2,)`` for 1-d input) interval bounds ``[min, max]``.
    """
    arr = np.asarray(samples)
    lower, upper = _hpd_sorted(np.sort(arr.reshape(arr.shape[0], -1), axis=0), confidence_level)
    out = np.stack([lower, upper], axis=1)
    return out[0] if arr.ndim == 1 else out


# long: scvi-tools' parameter reference (about 45 lines of docstring); the body is 20 lines
def de_statistics(
    scale1: np.ndarray,
    scale2: np.ndarray,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    pseudocounts: float | None = None,
    cred_interval_lvls: Sequence[float] | None = None,
    *,
    where_zero1: np.ndarray | None = None,
    where_zero2: np.ndarray | None = None,
    test_mode: Literal["two", "three"] = "three",
    chunk_size: int | None = 2048,
) -> dict[str, np.ndarray]:
    """Bayes factors and effect sizes from paired posterior samples (scvi-tools' ``get_bayes_factors``).

    ``vanilla``: ``proba_m1 = P(scale1 > scale2)``, ``proba_m2 = 1 - proba_m1``,
    ``bayes_factor = log(proba_m1 + eps) - log(proba_m2 + eps)``.

    ``change``: with ``lfc = log2(scale1 + pseudocounts) - log2(scale2 + pseudocounts)``,
    ``P+ = P(lfc >= delta)`` and ``P- = P(lfc < -delta)``; ``proba_de = max(P+, P-)`` (``test_mode=
    "three"``, scvi-tools' default: up- and down-regulation are separate hypotheses) or ``P+ + P-``
    (``"two"``: ``P(|lfc| >= delta)`` up to the boundary ``lfc == -delta``); ``proba_not_de = 1 -
    proba_de`` and ``bayes_factor = log(proba_de + eps) - log(proba_not_de + eps)``. The reported
    ``lfc_mean``/``lfc_median``/``lfc_std`` (population std)/``lfc_min``/``lfc_max`` (sample extremes)
    and credible intervals summarise the LFC recomputed with ``1e-3 * pseudocounts``, as in scvi-tools.

    Parameters
    ----------
    scale1, scale2
        Paired posterior samples of normalized expression, each ``(n_samples, n_genes)``.
    mode
        ``"vanilla"`` or ``"change"``.
    delta
        LFC threshold of the ``change`` mode; ``None`` estimates it with :func:`estimate_delta`.
    pseudocounts
        Offset of the ``change`` mode LFC; ``None`` estimates it with
        :func:`estimate_pseudocounts_offset` from ``where_zero1``/``where_zero2`` (without masks no gene
        counts as non-expressed and the offset is ``1e-10``, scvi-tools' floor).
    cred_interval_lvls
        Levels in ``[0, 1)`` of highest-density intervals of the LFC (``change`` mode), reported as
        ``lfc_confidence_interval_<level>_min`` / ``_max``.
    where_zero1, where_zero2
        Boolean ``(n_genes,)`` masks of non-expressed genes per group (see :func:`zero_expression_mask`).
    test_mode
        ``"three"`` or ``"two"`` (see above).
    chunk_size
        Genes per jit-compiled chunk (bounds device memory); ``None`` processes all genes at once.

    Returns
    -------
    dict of str to np.ndarray
        ``(n_genes,)`` arrays, keys in scvi-tools' order: vanilla ``proba_m1, proba_m2, bayes_factor,
        scale1, scale2``; change ``proba_de, proba_not_de, bayes_factor, scale1, scale2, pseudocounts,
        delta, lfc_mean, lfc_median, lfc_std, lfc_min, lfc_max`` (+ intervals). ``pseudocounts`` and
        ``delta`` (scalars in scvi-tools) are broadcast to ``(n_genes,)``.
    """
    s1, s2 = _check_scales(scale1, scale2, chunk_size)
    if mode == "vanilla":
        return _vanilla_statistics(s1, s2, chunk_size)
    if mode != "change":
        raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}")
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {test_mode!r}")
    n_samples, n_genes = s1.shape
    zero = np.zeros(n_genes, dtype=bool)
    where_zero = (zero if where_zero1 is None else where_zero1, zero if where_zero2 is None else where_zero2)
    pseudocounts, delta = _change_parameters(s1, s2, pseudocounts, delta, where_zero, chunk_size)
    levels = tuple(float(lv) for lv in (cred_interval_lvls or ()))
    for lv in levels:
        if not 0.0 <= lv < 1.0 or n_samples - math.floor(lv * n_samples) <= 0:
            raise ValueError(f"credible interval level {lv} must be in [0, 1) with enough samples")
    kernel = functools.partial(_change_chunk, pseudocounts=pseudocounts, delta=delta, levels=levels)
    res = _by_gene_chunks(kernel, s1, s2, chunk_size, 1.0)
    return _change_table(res, n_samples, n_genes, pseudocounts, delta, levels, test_mode)


def _change_parameters(s1, s2, pseudocounts, delta, where_zero, chunk_size) -> tuple[float, float]:
    """The pseudocounts (estimated from the non-expressed genes ``where_zero`` when ``None``) and the LFC threshold
    (estimated from the per-gene LFC means when ``None``)."""
    if pseudocounts is None:
        pseudocounts = estimate_pseudocounts_offset(s1, s2, *where_zero)
    pseudocounts = float(pseudocounts)
    if pseudocounts < 0:
        raise ValueError(f"pseudocounts must be >= 0, got {pseudocounts}")
    if delta is None:
        kernel = functools.partial(_lfc_mean_kernel, pseudocounts=jnp.float32(pseudocounts))
        delta = estimate_delta(_by_gene_chunks(kernel, s1, s2, chunk_size, 1.0))
    return pseudocounts, float(delta)


def _check_scales(scale1, scale2, chunk_size) -> tuple[np.ndarray, np.ndarray]:
    """The paired samples as floating ``(n_samples, n_genes)`` arrays (float32 unless already floating)."""
    s1 = np.asarray(scale1)
    s2 = np.asarray(scale2)
    if s1.ndim != 2 or s1.shape != s2.shape:
        raise ValueError(f"scale1 and scale2 must both be (n_samples, n_genes); got {s1.shape} and {s2.shape}")
    if s1.shape[0] == 0:
        raise ValueError("need at least one posterior sample")
    if not np.issubdtype(s1.dtype, np.floating):
        s1 = s1.astype(np.float32)
    if not np.issubdtype(s2.dtype, np.floating):
        s2 = s2.astype(np.float32)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError("chunk_size must be a positive integer or None")
    return s1, s2


def _vanilla_statistics(s1: np.ndarray, s2: np.ndarray, chunk_size: int | None) -> dict[str, np.ndarray]:
    """``proba_m1 = P(scale1 > scale2)``, ``proba_m2``, the Bayes factor and the mean scales."""
    n_greater, mean1, mean2 = _by_gene_chunks(_vanilla_kernel, s1, s2, chunk_size, 1.0)
    proba_m1 = n_greater.astype(np.float64) / s1.shape[0]
    proba_m2 = 1.0 - proba_m1
    return {
        "proba_m1": proba_m1,
        "proba_m2": proba_m2,
        "bayes_factor": np.log(proba_m1 + EPS) - np.log(proba_m2 + EPS),
        "scale1": mean1,
        "scale2": mean2,
    }


def _change_table(res: dict, n_samples: int, n_genes: int, pseudocounts, delta, levels, test_mode: str) -> dict:
    """The ``change`` mode's statistics, in scvi-tools' order, from the chunk kernels' counts and summaries."""
    proba_plus = res["n_plus"].astype(np.float64) / n_samples
    proba_minus = res["n_minus"].astype(np.float64) / n_samples
    proba_de = proba_plus + proba_minus if test_mode == "two" else np.maximum(proba_plus, proba_minus)
    out = {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
        "scale1": res["scale1"],
        "scale2": res["scale2"],
        "pseudocounts": np.full(n_genes, pseudocounts),
        "delta": np.full(n_genes, delta),
    }
    for key in ("mean", "median", "std", "min", "max"):
        out[f"lfc_{key}"] = res[f"lfc_{key}"]
    for lv in levels:
        name = str(lv)[:5]
        out[f"lfc_confidence_interval_{name}_min"] = res[f"hpd_{lv}_min"]
        out[f"lfc_confidence_interval_{name}_max"] = res[f"hpd_{lv}_max"]
    return out


@jax.jit
def _fdr_kernel(proba_de: jax.Array, fdr_target: jax.Array) -> jax.Array:
    n = proba_de.shape[0]
    order = jnp.argsort(-proba_de, stable=True)
    sorted_p = proba_de[order]
    expected_fdr = jnp.cumsum(1.0 - sorted_p) / jnp.arange(1, n + 1, dtype=sorted_p.dtype)
    n_de = jnp.sum(expected_fdr <= fdr_target)
    return jnp.zeros(n, dtype=bool).at[order].set(jnp.arange(n) < n_de)


def fdr_flags(proba_de: np.ndarray, fdr_target: float = 0.05) -> np.ndarray:
    """Tag genes as DE by the posterior expected false discovery rate (scvi-tools' rule).

    Sort genes by ``proba_de`` (descending, stable); the expected FDR of the top ``k`` genes is the
    mean of their ``1 - proba_de``; the ``d`` top genes are flagged, where ``d`` is the number of
    prefixes whose expected FDR is ``<= fdr_target`` (the prefix means are non-decreasing, so ``d`` is
    the largest such prefix).

    Parameters
    ----------
    proba_de
        ``(n_genes,)`` posterior probabilities of differential expression.
    fdr_target
        Target posterior expected FDR.

    Returns
    -------
    np.ndarray
        Boolean ``(n_genes,)`` flags in the input order.
    """
    p = np.asarray(proba_de)
    if p.ndim != 1:
        raise ValueError("proba_de should be 1-dimensional")
    if p.size == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(_fdr_kernel(jnp.asarray(p), jnp.asarray(fdr_target, dtype=jnp.asarray(p).dtype)))
