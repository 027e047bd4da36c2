"""Assignment of features (guides, tags, CMOs) to cells from their Bayes factors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._checks import _check_chunk_size, _check_counts, _check_matrix, _dense_rows, check_feature_type
from .bayes import bayes_factors


# long: the rules and the parameter reference (about 45 lines of docstring); the body is about 25 lines
def assign_features(
    bayes_factors: Any,
    x: Any,
    feature_names: Sequence[str] | Any,
    cutoff: float = 3.0,
    moi: int | None = None,
    obs_names: Sequence[str] | Any = None,
    feature_type: str = "sgRNA",
    *,
    chunk_size: int = 4096,
) -> pd.DataFrame:
    """Assign features (guides, tags, ...) to cells from their Bayes factors.

    ``moi=None`` (the original scAR's rule): ``BF_ig < cutoff`` is set to 0 and cell ``i`` gets the
    features tied at ``max_g BF_ig``; none when the maximum is 0. The names are joined in feature order.

    ``moi=k``: cell ``i`` gets up to ``k`` features with ``BF_ig >= cutoff`` (and ``> 0``), taken in
    decreasing ``BF`` order, ties broken by the larger observed count ``x_ig`` and then by feature
    order; the names are joined in that order (strongest first).

    Parameters
    ----------
    bayes_factors
        ``BF`` (not log), shape ``(n_cells, n_features)``, non-negative, no NaN (output of
        :func:`bayes_factors`).
    x
        Observed counts, shape ``(n_cells, n_features)``, dense or scipy sparse; used for the ``count``
        column and the ``moi`` tie break.
    feature_names
        Names of the features, length ``n_features`` (e.g. ``adata.var_names``).
    cutoff
        Minimum Bayes factor of an assigned feature (finite real).
    moi
        ``None`` for the original rule, or an integer ``>= 1``: the maximum number of features per cell.
    obs_names
        Index of the result, length ``n_cells``; default ``"0"``, ..., ``"n_cells-1"``.
    feature_type
        One of :data:`FEATURE_TYPES` (case-insensitive); names the columns.
    chunk_size
        Keyword only. Rows per chunk (bounds the dense work arrays), ``>= 1``.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``obs_names``, with columns

        - ``feature_type`` (e.g. ``"sgRNA"``): assigned names joined by ``","``, ``""`` when none;
        - ``f"n_{feature_type}"`` (int64): number of assigned features;
        - ``"count"`` (int64): total observed counts of the assigned features.

    Raises
    ------
    ValueError
        If a shape or value is invalid; the message names the argument.
    """
    feature_type = check_feature_type(feature_type)
    chunk_size = _check_chunk_size(chunk_size)
    if isinstance(cutoff, bool) or not isinstance(cutoff, Real) or not math.isfinite(float(cutoff)):
        raise ValueError(f"cutoff must be a finite real number, got {cutoff!r}")
    cutoff = float(cutoff)
    if moi is not None and (isinstance(moi, bool) or not isinstance(moi, Integral) or moi < 1):
        raise ValueError(f"moi must be None or an integer >= 1, got {moi!r}")
    bf, x = _check_bayes_factors(bayes_factors, x)
    n, G = bf.shape
    names = np.asarray([str(s) for s in feature_names], dtype=object)
    if names.shape != (G,):
        raise ValueError(f"feature_names must have {G} entries (one per column), got {names.shape[0]}")
    if obs_names is None:
        index = pd.Index([str(i) for i in range(n)])
    else:
        index = pd.Index(obs_names)
        if index.shape != (n,):
            raise ValueError(f"obs_names must have {n} entries (one per row), got {len(index)}")
    rows, cols, counts = _assigned(bf, x, cutoff, moi, chunk_size)
    n_assigned = np.bincount(rows, minlength=n).astype(np.int64)
    pieces = np.split(names[cols], np.cumsum(n_assigned)[:-1]) if n else []
    joined = [",".join(p) for p in pieces]
    return pd.DataFrame(
        {feature_type: pd.Series(joined, index=index, dtype=object), f"n_{feature_type}": n_assigned, "count": counts},
        index=index,
    )


def _check_bayes_factors(bayes_factors: Any, x: Any) -> tuple[np.ndarray, np.ndarray | sp.csr_matrix]:
    """Dense float64 Bayes factors (non-negative, no NaN, at least one column) and counts ``x`` of their shape."""
    bf = _check_matrix("bayes_factors", bayes_factors)
    if sp.issparse(bf):
        bf = np.asarray(bf.toarray(), dtype=np.float64)
    if np.any(np.isnan(bf)) or (bf.size and bf.min() < 0):
        raise ValueError("bayes_factors must be non-negative and not NaN")
    if bf.shape[1] < 1:
        raise ValueError("bayes_factors must have at least one feature (column)")
    x = _check_matrix("x", x)
    if x.shape != bf.shape:
        raise ValueError(f"x must have the shape of bayes_factors {bf.shape}, got {x.shape}")
    _check_counts("x", x)
    return bf, x


def _assigned(bf: np.ndarray, x, cutoff: float, moi: int | None, chunk_size: int):
    """The assigned ``(rows, cols)`` (row-major; within a row in feature order, or strongest first with ``moi``)
    and each cell's total observed count of its assigned features ``(n,)`` int64, in chunks of rows."""
    n, G = bf.shape
    rows_all: list[np.ndarray] = []
    cols_all: list[np.ndarray] = []
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        b = bf[start:stop]
        xc = _dense_rows(x, start, stop)
        if moi is None:
            b = np.where(b < cutoff, 0.0, b)
            row_max = b.max(axis=1, keepdims=True)
            rows, cols = np.nonzero((b == row_max) & (row_max > 0))  # row-major: feature order
        else:
            k = min(int(moi), G)
            cand = (b >= cutoff) & (b > 0)
            key_bf = np.where(cand, b, -1.0)  # non-candidates after every candidate
            order = np.lexsort((-xc, -key_bf), axis=-1)[:, :k]  # stable: then feature order
            valid = np.take_along_axis(cand, order, axis=1)
            rows, rank = np.nonzero(valid)  # row-major: decreasing evidence within a row
            cols = order[rows, rank]
        counts[start:stop] = np.bincount(rows, weights=xc[rows, cols], minlength=stop - start).astype(np.int64)
        rows_all.append(rows + start)
        cols_all.append(cols)
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    cols = np.concatenate(cols_all) if cols_all else np.zeros(0, np.int64)
    return rows, cols, counts


def assign_features_from_counts(
    x: Any,
    noise_ratio: Any,
    ambient_profile: Any,
    feature_names: Sequence[str] | Any,
    batch_index: Any = None,
    cutoff: float = 3.0,
    moi: int | None = None,
    adjust: str | None = "micro",
    obs_names: Sequence[str] | Any = None,
    feature_type: str = "sgRNA",
) -> pd.DataFrame:
    """:func:`assign_features` from the counts read once: the libraries are the row sums of ``x`` and the Bayes
    factors those of :func:`bayes_factors` with ``noise_ratio``, ``ambient_profile``, ``batch_index`` and
    ``adjust``; the counts ``x`` ``(n_cells, n_features)`` then serve the assignment too."""
    x = _check_matrix("x", x)
    library = np.asarray(x.sum(axis=1), np.float64).ravel()
    bf = bayes_factors(x, library, noise_ratio, ambient_profile, batch_index, adjust=adjust)
    return assign_features(bf, x, feature_names, cutoff=cutoff, moi=moi, obs_names=obs_names, feature_type=feature_type)
