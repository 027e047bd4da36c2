"""One comparison's DE table, raw-count summaries, outlier cells and the driver over all comparisons."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats as _stats

from .groups import resolve_group_indices
from .stats import de_statistics, fdr_flags, zero_expression_mask


def _col_mean(x: Any) -> np.ndarray:
    return np.asarray(x.mean(axis=0), dtype=np.float64).ravel()


def count_statistics(
    x1: Any,
    x2: Any,
    library1: np.ndarray | None = None,
    library2: np.ndarray | None = None,
    target_sum: float = 1e4,
) -> dict[str, np.ndarray]:
    """Raw-count summaries per gene and group (scvi-tools' ``scrna_raw_counts_properties``).

    Parameters
    ----------
    x1, x2
        Raw counts of the two groups, ``(n_cells1, n_genes)`` and ``(n_cells2, n_genes)``, dense or
        scipy sparse.
    library1, library2
        ``(n_cells,)`` library sizes used for the normalisation; default: row sums of ``x1``/``x2``
        (pass totals over all genes when ``x`` holds a subset of them, as scvi-tools does).
    target_sum
        Normalised library size (scvi-tools: ``1e4``).

    Returns
    -------
    dict of str to np.ndarray
        ``(n_genes,)`` float64 arrays ``raw_mean1, raw_mean2`` (mean counts), ``non_zeros_proportion1,
        non_zeros_proportion2`` (fraction of cells with a non-zero count) and ``raw_normalized_mean1,
        raw_normalized_mean2`` (mean of ``target_sum * x / library``; cells with an empty library
        contribute 0 where scvi-tools would give NaN).
    """
    out: dict[str, np.ndarray] = {}
    groups = ((x1, library1), (x2, library2))
    for i, (x, _) in enumerate(groups, start=1):
        out[f"raw_mean{i}"] = _col_mean(x)
    for i, (x, _) in enumerate(groups, start=1):
        out[f"non_zeros_proportion{i}"] = _col_mean(x != 0)
    for i, (x, lib) in enumerate(groups, start=1):
        lib = np.asarray(x.sum(axis=1) if lib is None else lib, dtype=np.float64).ravel()
        if lib.shape[0] != x.shape[0]:
            raise ValueError(f"library{i} has {lib.shape[0]} entries for {x.shape[0]} cells")
        factor = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
        if sp.issparse(x):
            normalized = sp.csr_matrix(x, dtype=np.float64).multiply(factor[:, None])
        else:
            normalized = np.asarray(x, dtype=np.float64) * factor[:, None]
        out[f"raw_normalized_mean{i}"] = _col_mean(normalized)
    return out


def de_table(
    stats: dict[str, Any],
    counts: dict[str, np.ndarray] | None,
    gene_names: Sequence[str],
    comparison: str | None = None,
    group1: Any = None,
    group2: Any = None,
    fdr_target: float = 0.05,
    all_stats: bool = True,
) -> pd.DataFrame:
    """One comparison's DE table with scvi-tools' columns and sort order.

    Parameters
    ----------
    stats
        Output of :func:`de_statistics` (the mode is read from its keys).
    counts
        Output of :func:`count_statistics`, or ``None``.
    gene_names
        ``(n_genes,)`` index of the table.
    comparison
        ``"<g1> vs <g2>"``; defaults to ``f"{group1} vs {group2}"`` when ``group1`` is given. When both
        are ``None`` (``idx1``/``idx2`` comparisons) the ``comparison``/``group1``/``group2`` columns are
        omitted, as in scvi-tools.
    group1, group2
        Group labels for the ``group1``/``group2`` columns.
    fdr_target
        Target of the ``is_de_fdr_<fdr_target>`` column (``change`` mode only, as in scvi-tools).
    all_stats
        Include the ``counts`` columns.

    Returns
    -------
    pandas.DataFrame
        Index: gene names. Columns: the statistics, then the count statistics, then
        ``is_de_fdr_<target>`` (change mode), then ``comparison, group1, group2``. Sorted by ``proba_de``
        (change) or ``bayes_factor`` (vanilla), descending (stable sort for ties).
    """
    change = "proba_de" in stats
    names = pd.Index(np.asarray(gene_names))
    data = dict(stats)
    if all_stats and counts is not None:
        data.update(counts)
    res = pd.DataFrame(data, index=names)
    res = res.sort_values(by="proba_de" if change else "bayes_factor", ascending=False, kind="mergesort")
    if change:
        res[f"is_de_fdr_{fdr_target}"] = fdr_flags(res["proba_de"].to_numpy(), fdr_target)
    if comparison is None and group1 is not None:
        comparison = f"{group1} vs {group2}"
    if comparison is not None:
        res["comparison"] = comparison
        res["group1"] = group1
        res["group2"] = group2
    return res


def filter_outlier_cells(
    latent: np.ndarray,
    contamination: float = 0.1,
    rng: np.random.Generator | int | None = 0,
    n_trials: int = 10,
) -> np.ndarray:
    """Inlier mask of cells in latent space, like scvi-tools' ``EllipticEnvelope().fit_predict``.

    A robust location/covariance is fitted by minimum covariance determinant (random half-subsets
    refined by concentration steps, then scikit-learn's consistency correction and reweighting); the
    ``contamination`` fraction of cells with the largest robust Mahalanobis distance are outliers.
    When the covariance cannot be estimated (fewer cells than dimensions + 2, or a degenerate
    support) a warning is issued and every cell is kept, as in scvi-tools.

    Parameters
    ----------
    latent
        ``(n_cells, n_latent)`` latent representation of the group's cells.
    contamination
        Expected outlier fraction (scikit-learn's default 0.1).
    rng
        Numpy generator or seed for the random initial subsets.
    n_trials
        Number of random initial subsets.

    Returns
    -------
    np.ndarray
        Boolean ``(n_cells,)``, True for the cells to keep.
    """
    z = np.asarray(latent, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError("latent must be (n_cells, n_latent)")
    n, p = z.shape
    keep_all = np.ones(n, dtype=bool)
    if n < p + 2:
        warnings.warn("Could not properly estimate Cov!, using all samples", UserWarning, stacklevel=2)
        return keep_all
    best = _min_covariance_determinant(z, int(math.ceil(0.5 * (n + p + 1))), np.random.default_rng(rng), n_trials)
    if best is None or not np.isfinite(best[0]):
        warnings.warn("Could not properly estimate Cov!, using all samples", UserWarning, stacklevel=2)
        return keep_all
    _, loc, cov = best
    dist = _mahalanobis(z, loc, cov)
    cov = cov * np.median(dist) / _stats.chi2(p).isf(0.5)  # consistency correction
    dist = _mahalanobis(z, loc, cov)
    support = dist < _stats.chi2(p).isf(0.025)  # reweighting
    if support.sum() <= p:
        warnings.warn("Could not properly estimate Cov!, using all samples", UserWarning, stacklevel=2)
        return keep_all
    loc, cov = _fit_gaussian(z, support)
    dist = _mahalanobis(z, loc, cov)
    return dist <= np.percentile(dist, 100.0 * (1.0 - contamination))


def _fit_gaussian(z: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased) covariance of the rows ``mask`` of ``z``."""
    loc = z[mask].mean(0)
    cov = np.atleast_2d(np.cov(z[mask], rowvar=False, bias=True))
    return loc, cov


def _mahalanobis(z: np.ndarray, loc: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``z`` (pseudo-inverse of ``cov``)."""
    centered = z - loc
    return np.einsum("ij,jk,ik->i", centered, np.linalg.pinv(cov, hermitian=True), centered)


def _min_covariance_determinant(z: np.ndarray, h: int, rng: np.random.Generator, n_trials: int):
    """``(log det, loc, cov)`` of the best of ``n_trials`` random ``h``-subsets refined by concentration steps
    (``None`` if no trial ran)."""
    n = z.shape[0]
    best = None
    for _ in range(max(1, n_trials)):
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:h]] = True
        det_prev = np.inf
        for _ in range(30):  # concentration steps
            loc, cov = _fit_gaussian(z, mask)
            det = np.linalg.slogdet(cov)
            det = det[1] if det[0] > 0 else -np.inf
            if det == -np.inf or det >= det_prev - 1e-12:
                break
            det_prev = det
            mask = np.zeros(n, dtype=bool)
            mask[np.argsort(_mahalanobis(z, loc, cov), kind="stable")[:h]] = True
        if best is None or det_prev < best[0]:
            best = (det_prev, loc, cov)
    return best


# long: the numpydoc reference of 13 parameters; the body is 27 lines
def differential_expression(
    sample_scales: Callable[[np.ndarray, int, int], np.ndarray],
    obs: pd.DataFrame,
    x: Any,
    gene_names: Sequence[str],
    groups: dict[str, Any],
    statistics: dict[str, Any] | None = None,
    *,
    all_stats: bool = True,
    fdr_target: float = 0.05,
    n_samples_overall: int = 5000,
    threshold_counts: float = 0.01,
    latent: Callable[[np.ndarray], np.ndarray] | None = None,
    library: np.ndarray | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """DE tables of all comparisons, concatenated (scvi-tools' ``differential_expression`` flow).

    Parameters
    ----------
    sample_scales
        ``sample_scales(rows, n_samples, seed) -> (n_samples, n_genes)``: posterior samples of normalized
        expression of ``n_samples`` cells drawn uniformly with replacement among ``rows`` (e.g. the
        model's ``get_normalized_expression(indices=rows, n_samples_overall=n_samples, seed=seed)``).
    obs
        ``(n_obs, ...)`` cell annotations for :func:`resolve_group_indices`.
    x
        ``(n_obs, n_genes)`` raw counts (dense or sparse), for ``all_stats`` and the pseudocounts.
    gene_names
        ``(n_genes,)`` table index.
    groups
        Keywords of :func:`resolve_group_indices`: ``groupby``, ``group1``, ``group2``, ``idx1``, ``idx2``.
    statistics
        Keywords of :func:`de_statistics`: ``mode`` (``"vanilla"``), ``delta`` (0.25), ``pseudocounts`` (None),
        ``test_mode`` (``"three"``), ``cred_interval_lvls`` (None); with ``pseudocounts=None`` in ``"change"``
        mode the non-expressed genes are those with mean raw count below ``threshold_counts`` in a group.
    all_stats, fdr_target
        See :func:`de_table`.
    n_samples_overall
        Posterior samples per group.
    latent
        ``latent(rows) -> (len(rows), n_latent)``; when given, outlier cells of each group are removed
        first (scvi-tools' ``filter_outlier_cells=True``).
    library
        ``(n_obs,)`` library sizes for the normalized means; default: row sums of ``x``.
    seed
        Seeds the sampling (each comparison and group gets its own stream).

    Returns
    -------
    pandas.DataFrame
        The :func:`de_table` of every comparison, concatenated in order.
    """
    comparisons = resolve_group_indices(obs, **groups)
    if library is None:
        library = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    library = np.asarray(library, dtype=np.float64).ravel()
    options = {"mode": "vanilla", "delta": 0.25, "pseudocounts": None, "test_mode": "three", **(statistics or {})}
    mode, pseudocounts = options["mode"], options["pseudocounts"]
    tables = []
    for i, comp in enumerate(comparisons):
        rows1, rows2 = comp.rows1, comp.rows2
        if latent is not None:
            rows1 = rows1[filter_outlier_cells(latent(rows1), rng=[seed, i, 1])]
            rows2 = rows2[filter_outlier_cells(latent(rows2), rng=[seed, i, 2])]
        s1 = np.asarray(sample_scales(rows1, n_samples_overall, seed * 7919 + 2 * i))
        s2 = np.asarray(sample_scales(rows2, n_samples_overall, seed * 7919 + 2 * i + 1))
        where_zero1 = where_zero2 = None
        if mode == "change" and pseudocounts is None:
            where_zero1 = zero_expression_mask(x[rows1], threshold_counts)
            where_zero2 = zero_expression_mask(x[rows2], threshold_counts)
        stats = de_statistics(s1, s2, **options, where_zero1=where_zero1, where_zero2=where_zero2)
        counts = None
        if all_stats:
            counts = count_statistics(x[comp.rows1], x[comp.rows2], library[comp.rows1], library[comp.rows2])
        tables.append(
            de_table(stats, counts, gene_names, comp.comparison, comp.group1, comp.group2, fdr_target, all_stats)
        )
    return pd.concat(tables, axis=0)
