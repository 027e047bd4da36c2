"""Differential expression from posterior samples of normalized expression (scvi-tools semantics).

The functions here are the array-level core of ``SCAR.differential_expression``; they follow
``scvi.model.base.DifferentialComputation.get_bayes_factors`` and ``scvi.model.base._de_core``:

- :func:`resolve_group_indices` turns ``groupby``/``group1``/``group2`` or ``idx1``/``idx2`` into the
  list of cell-group comparisons (one-vs-rest when ``group2`` is ``None``);
- :func:`draw_cells` and :func:`pairs_sampler` build the paired posterior samples: each sample is the
  normalized expression of a uniformly drawn cell of the group under one posterior draw;
- :func:`de_statistics` computes the ``"vanilla"`` (Lopez et al. 2018) or ``"change"`` (Boyeau et al.
  2019) Bayes factors, probabilities and log-fold-change summaries (JAX, jit-compiled, gene-chunked);
- :func:`fdr_flags` tags genes by the posterior expected false discovery rate;
- :func:`count_statistics` gives the raw-count summaries of ``all_stats=True``;
- :func:`de_table` assembles one comparison's table with scvi-tools' columns and sort order;
- :func:`differential_expression` drives all of the above from a posterior-sampling callable.

All per-sample work (comparisons, log-fold changes, sorting for medians and credible intervals) runs
in JAX; probabilities are formed from integer counts and the Bayes factors ``log(p + 1e-8) -
log(1 - p + 1e-8)`` (natural log) are evaluated in float64 on the host, as scvi-tools does with numpy.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats as _stats

__all__ = [
    "EPS",
    "GroupComparison",
    "count_statistics",
    "credible_intervals",
    "de_statistics",
    "de_table",
    "differential_expression",
    "draw_cells",
    "estimate_delta",
    "estimate_pseudocounts_offset",
    "fdr_flags",
    "filter_outlier_cells",
    "pairs_sampler",
    "resolve_group_indices",
    "zero_expression_mask",
]

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


# ---------------------------------------------------------------------------------------------- groups
class GroupComparison(NamedTuple):
    """One comparison: group names and the cells of each group.

    ``group1``/``group2`` are the group labels (``group2 == "Rest"`` for one-vs-rest) with ``groupby``,
    and both ``None`` when the groups came from ``idx1``/``idx2`` (scvi-tools then omits the
    ``comparison``/``group1``/``group2`` columns). ``rows1``/``rows2`` are sorted, disjoint int64 row
    positions into ``obs``.
    """

    group1: Any
    group2: Any
    rows1: np.ndarray
    rows2: np.ndarray

    @property
    def comparison(self) -> str | None:
        """``"<group1> vs <group2>"``, or ``None`` for ``idx1``/``idx2`` comparisons."""
        return None if self.group1 is None else f"{self.group1} vs {self.group2}"


def _selection_mask(idx: Any, obs: pd.DataFrame, name: str) -> np.ndarray:
    """Boolean ``(n_obs,)`` mask from a mask, integer positions, obs names or an ``obs.query`` string."""
    n_obs = obs.shape[0]
    if isinstance(idx, str):
        try:
            selected = obs.eval(idx)
        except Exception as err:  # pandas raises many types (SyntaxError, UndefinedVariableError, ...)
            raise ValueError(f"{name}: could not evaluate the query {idx!r} on obs: {err}") from err
        if not isinstance(selected, pd.Series) or not pd.api.types.is_bool_dtype(selected.dtype):
            raise ValueError(f"{name}: the query {idx!r} must evaluate to one boolean per cell")
        return selected.to_numpy(dtype=bool, na_value=False)
    values = np.asarray(idx.to_numpy() if isinstance(idx, pd.Series | pd.Index) else idx)
    if values.ndim != 1:
        values = values.ravel()
    if values.dtype == bool:
        if values.shape[0] != n_obs:
            raise ValueError(f"{name}: boolean mask has length {values.shape[0]}, expected n_obs = {n_obs}")
        return values
    mask = np.zeros(n_obs, dtype=bool)
    if values.size == 0:
        return mask
    if values.dtype.kind in "iu":
        if values.min() < -n_obs or values.max() >= n_obs:
            raise ValueError(f"{name}: integer indices out of range for {n_obs} cells")
        mask[values] = True
        return mask
    if values.dtype.kind in "UO":
        positions = pd.Index(obs.index).get_indexer(values.astype(str))
        if (positions < 0).any():
            missing = values[positions < 0][:5].tolist()
            raise ValueError(f"{name}: obs names not found: {missing}")
        mask[positions] = True
        return mask
    raise ValueError(f"{name} must be a boolean mask, integer indices, obs names or a query string")


def resolve_group_indices(
    obs: pd.DataFrame,
    groupby: str | None = None,
    group1: Any = None,
    group2: Any = None,
    idx1: Any = None,
    idx2: Any = None,
) -> list[GroupComparison]:
    """The cell groups to compare, following ``scvi.model.base._de_core``.

    Parameters
    ----------
    obs
        Cell annotations ``(n_obs, n_columns)`` (``adata.obs``).
    groupby
        Column of ``obs`` defining the groups. Exclusive with ``idx1``.
    group1
        One group label or a list of them; each is compared with ``group2``. ``None``: every group present
        in ``obs[groupby]`` (category order, unused categories dropped).
    group2
        Reference group label; ``None`` compares each ``group1`` with all other cells ("Rest"; cells with
        a missing label count as "Rest", as in scvi-tools).
    idx1, idx2
        Alternative to ``groupby``: a boolean mask ``(n_obs,)``, integer positions, a list of obs names,
        or an ``obs.query``-style boolean expression string. ``idx2=None`` compares ``idx1`` with all
        other cells. Cells selected by both go to group 2 (scvi-tools' behaviour; a warning is issued).

    Returns
    -------
    list of GroupComparison
        ``(group1, group2, rows1, rows2)`` per comparison, rows as sorted int64 positions.

    Raises
    ------
    ValueError
        No grouping given; both ``groupby`` and ``idx1`` given (or ``group1``/``group2`` with ``idx1``);
        ``idx2`` without ``idx1``; unknown ``groupby`` column; a group absent from the column; a single
        group; a group compared with itself; an empty cell group; malformed indices or query.
    """
    if idx1 is not None:
        if groupby is not None:
            raise ValueError("Pass either groupby (with group1/group2) or idx1/idx2, not both")
        if group1 is not None or group2 is not None:
            raise ValueError("group1/group2 only apply with groupby; use idx1/idx2 alone")
        mask1 = _selection_mask(idx1, obs, "idx1")
        if idx2 is None:
            mask2 = ~mask1
        else:
            mask2 = _selection_mask(idx2, obs, "idx2")
            overlap = mask1 & mask2
            if overlap.any():
                warnings.warn(
                    f"{int(overlap.sum())} cells are in both idx1 and idx2; they are assigned to group 2",
                    UserWarning,
                    stacklevel=2,
                )
                mask1 = mask1 & ~mask2
        if not mask1.any():
            raise ValueError("idx1 selects no cells")
        if not mask2.any():
            raise ValueError("idx2 selects no cells" if idx2 is not None else "idx1 selects every cell: no rest")
        return [GroupComparison(None, None, np.flatnonzero(mask1), np.flatnonzero(mask2))]

    if idx2 is not None:
        raise ValueError("idx2 requires idx1")
    if groupby is None:
        raise ValueError("Pass groupby (a column of obs) or idx1 to define the groups")
    if groupby not in obs.columns:
        raise ValueError(f"groupby={groupby!r} is not a column of obs; columns: {list(obs.columns)}")
    labels = obs[groupby]
    if group1 is None:
        present = labels.astype("category").cat.remove_unused_categories().cat.categories.tolist()
        if len(present) < 2:
            raise ValueError(f"Only a single group in obs[{groupby!r}]: cannot run DE on a single group")
        group1 = present
    elif isinstance(group1, str) or not isinstance(group1, Iterable):
        group1 = [group1]
    else:
        group1 = list(group1)
    if len(group1) == 0:
        raise ValueError("group1 is empty")

    def rows_of(group: Any, name: str) -> np.ndarray:
        mask = (labels == group).to_numpy(dtype=bool, na_value=False)
        if not mask.any():
            available = labels.astype("category").cat.remove_unused_categories().cat.categories.tolist()
            raise ValueError(f"{name}={group!r} has no cells in obs[{groupby!r}]; groups: {available}")
        return mask

    mask2 = None if group2 is None else rows_of(group2, "group2")
    out = []
    for g1 in group1:
        mask1 = rows_of(g1, "group1")
        if mask2 is None:
            rest = ~mask1
            if not rest.any():
                raise ValueError(f"group {g1!r} contains every cell: no rest to compare with")
            out.append(GroupComparison(g1, "Rest", np.flatnonzero(mask1), np.flatnonzero(rest)))
        else:
            if g1 == group2:
                raise ValueError(f"Cannot compare group {g1!r} with itself")
            out.append(GroupComparison(g1, group2, np.flatnonzero(mask1), np.flatnonzero(mask2)))
    return out


# -------------------------------------------------------------------------------------------- sampling
def draw_cells(rows: np.ndarray, n_samples: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Cells for ``n_samples`` posterior samples of a group, drawn uniformly with replacement.

    scvi-tools' ``scale_sampler`` draws ``n_samples // n_cells + 1`` posterior samples per cell and
    resamples ``n_samples`` of them with replacement; drawing the cells first and one posterior sample
    per drawn cell targets the same distribution at a fraction of the cost.

    Parameters
    ----------
    rows
        Cell positions of the group, ``(n_cells,)``.
    n_samples
        Number of samples (scvi-tools' ``n_samples_overall``, default 5000).
    rng
        Numpy generator or seed.

    Returns
    -------
    np.ndarray
        ``(n_samples,)`` cell positions (with repeats).
    """
    rows = np.asarray(rows)
    if rows.size == 0:
        raise ValueError("cannot draw cells from an empty group")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    return np.random.default_rng(rng).choice(rows, size=int(n_samples), replace=True)


def pairs_sampler(
    arr1: np.ndarray,
    arr2: np.ndarray,
    n_pairs: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair posterior samples of two groups (scvi-tools' ``pairs_sampler``).

    Parameters
    ----------
    arr1, arr2
        Samples ``(n1, n_genes)`` and ``(n2, n_genes)``.
    n_pairs
        ``None``: pair the samples in order (requires ``n1 == n2``; scvi-tools' default
        ``use_permutation=False``). An integer: draw ``n_pairs`` rows of each independently with
        replacement (``use_permutation=True, m_permutation=n_pairs``).
    rng
        Numpy generator or seed for the draws.

    Returns
    -------
    tuple of np.ndarray
        Paired samples, each ``(n_pairs, n_genes)``.
    """
    arr1, arr2 = np.asarray(arr1), np.asarray(arr2)
    if n_pairs is None:
        if arr1.shape[0] != arr2.shape[0]:
            raise ValueError(f"cannot pair {arr1.shape[0]} with {arr2.shape[0]} samples; pass n_pairs")
        return arr1, arr2
    rng = np.random.default_rng(rng)
    return arr1[rng.integers(0, arr1.shape[0], int(n_pairs))], arr2[rng.integers(0, arr2.shape[0], int(n_pairs))]


# --------------------------------------------------------------------------------- pseudocounts, delta
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


# ------------------------------------------------------------------------------------------ statistics
@jax.jit
def _vanilla_kernel(s1: jax.Array, s2: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    n_greater = jnp.sum(s1 > s2, axis=0, dtype=jnp.int32)
    return n_greater, jnp.mean(s1, axis=0), jnp.mean(s2, axis=0)


@jax.jit
def _lfc_mean_kernel(s1: jax.Array, s2: jax.Array, pseudocounts: jax.Array) -> jax.Array:
    return jnp.mean(jnp.log2(s1 + pseudocounts) - jnp.log2(s2 + pseudocounts), axis=0)


def _order_stats_on_device() -> bool:
    """Sort on the device only on accelerators: XLA's CPU sort is ~10x slower than numpy's."""
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
    n_samples, n_genes = s1.shape
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError("chunk_size must be a positive integer or None")

    if mode == "vanilla":
        n_greater, mean1, mean2 = _by_gene_chunks(_vanilla_kernel, s1, s2, chunk_size, 1.0)
        proba_m1 = n_greater.astype(np.float64) / n_samples
        proba_m2 = 1.0 - proba_m1
        return {
            "proba_m1": proba_m1,
            "proba_m2": proba_m2,
            "bayes_factor": np.log(proba_m1 + EPS) - np.log(proba_m2 + EPS),
            "scale1": mean1,
            "scale2": mean2,
        }
    if mode != "change":
        raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}")
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {test_mode!r}")

    if pseudocounts is None:
        zero = np.zeros(n_genes, dtype=bool)
        pseudocounts = estimate_pseudocounts_offset(
            s1,
            s2,
            zero if where_zero1 is None else where_zero1,
            zero if where_zero2 is None else where_zero2,
        )
    pseudocounts = float(pseudocounts)
    if pseudocounts < 0:
        raise ValueError(f"pseudocounts must be >= 0, got {pseudocounts}")
    if delta is None:
        kernel = functools.partial(_lfc_mean_kernel, pseudocounts=jnp.float32(pseudocounts))
        lfc_means = _by_gene_chunks(kernel, s1, s2, chunk_size, 1.0)
        delta = estimate_delta(lfc_means)
    delta = float(delta)
    levels = tuple(float(lv) for lv in (cred_interval_lvls or ()))
    for lv in levels:
        if not 0.0 <= lv < 1.0 or n_samples - math.floor(lv * n_samples) <= 0:
            raise ValueError(f"credible interval level {lv} must be in [0, 1) with enough samples")

    kernel = functools.partial(_change_chunk, pseudocounts=pseudocounts, delta=delta, levels=levels)
    res = _by_gene_chunks(kernel, s1, s2, chunk_size, 1.0)
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


# ------------------------------------------------------------------------------------ count statistics
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


# ------------------------------------------------------------------------------------------------ table
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


# -------------------------------------------------------------------------------------------- outliers
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
    h = int(math.ceil(0.5 * (n + p + 1)))
    rng = np.random.default_rng(rng)

    def fit(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loc = z[mask].mean(0)
        cov = np.atleast_2d(np.cov(z[mask], rowvar=False, bias=True))
        return loc, cov

    def mahalanobis(loc: np.ndarray, cov: np.ndarray) -> np.ndarray:
        centered = z - loc
        return np.einsum("ij,jk,ik->i", centered, np.linalg.pinv(cov, hermitian=True), centered)

    best = None
    for _ in range(max(1, n_trials)):
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:h]] = True
        det_prev = np.inf
        for _ in range(30):  # concentration steps
            loc, cov = fit(mask)
            det = np.linalg.slogdet(cov)
            det = det[1] if det[0] > 0 else -np.inf
            if det == -np.inf or det >= det_prev - 1e-12:
                break
            det_prev = det
            mask = np.zeros(n, dtype=bool)
            mask[np.argsort(mahalanobis(loc, cov), kind="stable")[:h]] = True
        if best is None or det_prev < best[0]:
            best = (det_prev, loc, cov)
    if best is None or not np.isfinite(best[0]):
        warnings.warn("Could not properly estimate Cov!, using all samples", UserWarning, stacklevel=2)
        return keep_all
    _, loc, cov = best
    dist = mahalanobis(loc, cov)
    cov = cov * np.median(dist) / _stats.chi2(p).isf(0.5)  # consistency correction
    dist = mahalanobis(loc, cov)
    support = dist < _stats.chi2(p).isf(0.025)  # reweighting
    if support.sum() <= p:
        warnings.warn("Could not properly estimate Cov!, using all samples", UserWarning, stacklevel=2)
        return keep_all
    loc, cov = fit(support)
    dist = mahalanobis(loc, cov)
    return dist <= np.percentile(dist, 100.0 * (1.0 - contamination))


# ---------------------------------------------------------------------------------------------- driver
def differential_expression(
    sample_scales: Callable[[np.ndarray, int, int], np.ndarray],
    obs: pd.DataFrame,
    x: Any,
    gene_names: Sequence[str],
    groupby: str | None = None,
    group1: Any = None,
    group2: Any = None,
    idx1: Any = None,
    idx2: Any = None,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    all_stats: bool = True,
    fdr_target: float = 0.05,
    *,
    n_samples_overall: int = 5000,
    pseudocounts: float | None = None,
    threshold_counts: float = 0.01,
    test_mode: Literal["two", "three"] = "three",
    cred_interval_lvls: Sequence[float] | None = None,
    latent: Callable[[np.ndarray], np.ndarray] | None = None,
    library: np.ndarray | None = None,
    seed: int = 0,
    silent: bool = True,
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
    groupby, group1, group2, idx1, idx2
        See :func:`resolve_group_indices`.
    mode, delta, pseudocounts, test_mode, cred_interval_lvls
        See :func:`de_statistics`; with ``pseudocounts=None`` the non-expressed genes are those with mean
        raw count below ``threshold_counts`` in a group.
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
    silent
        Unused (no progress bar); accepted for API compatibility.

    Returns
    -------
    pandas.DataFrame
        The :func:`de_table` of every comparison, concatenated in order.
    """
    del silent
    comparisons = resolve_group_indices(obs, groupby, group1, group2, idx1, idx2)
    if library is None:
        library = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    library = np.asarray(library, dtype=np.float64).ravel()
    tables = []
    for i, comp in enumerate(comparisons):
        rows1, rows2 = comp.rows1, comp.rows2
        if latent is not None:
            rows1 = rows1[filter_outlier_cells(latent(rows1), rng=[seed, i, 1])]
            rows2 = rows2[filter_outlier_cells(latent(rows2), rng=[seed, i, 2])]
        s1 = np.asarray(sample_scales(rows1, n_samples_overall, seed * 7919 + 2 * i))
        s2 = np.asarray(sample_scales(rows2, n_samples_overall, seed * 7919 + 2 * i + 1))
        x1, x2 = x[comp.rows1], x[comp.rows2]
        where_zero1 = where_zero2 = None
        if mode == "change" and pseudocounts is None:
            where_zero1 = zero_expression_mask(x[rows1], threshold_counts)
            where_zero2 = zero_expression_mask(x[rows2], threshold_counts)
        stats = de_statistics(
            s1,
            s2,
            mode=mode,
            delta=delta,
            pseudocounts=pseudocounts,
            cred_interval_lvls=cred_interval_lvls,
            where_zero1=where_zero1,
            where_zero2=where_zero2,
            test_mode=test_mode,
        )
        counts = count_statistics(x1, x2, library[comp.rows1], library[comp.rows2]) if all_stats else None
        tables.append(
            de_table(stats, counts, gene_names, comp.comparison, comp.group1, comp.group2, fdr_target, all_stats)
        )
    return pd.concat(tables, axis=0)
