r"""Feature barcodes (sgRNA, tag, CMO, ADT, ATAC): Bayes factors and feature assignment.

After a scAR model is trained on feature-barcode counts, the original scAR (Novartis/scar) decides
which features (guides, hashtags, ...) a cell truly carries by comparing each observed count with the
count that ambient contamination alone would explain. This module implements that step as pure,
vectorised functions over arrays, so it works with any estimate of the noise ratio and of the ambient
profile (a trained model's ``get_noise_ratio()`` and ``ambient_profile``, or a simulation's truth).

Formulas
--------
With cell ``i``, feature ``g = 1..G``, observed counts ``x_ig``, observed library ``N_i = sum_g x_ig``,
noise ratio ``eps_i`` and ambient profile ``a_{b(i)}`` of the cell's batch ``b(i)``:

.. code-block:: text

    expected ambient counts   E_ig = N_i * eps_i * a_{b(i), g}
    ambient total             T_i  = sum_g E_ig = N_i * eps_i * sum_g a_{b(i), g}
    adjustment                adj_i = max(0, (N_i - T_i) / G)                          adjust='micro'
                              adj_i = max(0, sum_i (N_i - T_i) / (n_cells * G))        adjust='global'
                              adj_i = 0                                                adjust=None
    Poisson rate              lambda_ig = E_ig + adj_i
    Bayes factor              BF_ig = P(X <= x_ig) / P(X = x_ig),   X ~ Poisson(lambda_ig)
    log Bayes factor          log BF_ig = clip(logcdf - logpmf, -709.78, 709.78)

``'global'`` pools over *all the cells passed in* (the original pools over an inference minibatch),
so the result depends on which cells are given but never on ``chunk_size``.

Because ``P(X <= x) >= P(X = x)``, the exact ``log BF`` is ``>= 0``. The log-pmf is evaluated in closed
form, ``x log(lambda) - lambda - log(x!)``, and the log-cdf as ``log(pdtr(x, lambda))``. Where the cdf
underflows (``lambda`` far above ``x``), the original (``scipy.stats.poisson.logcdf``) returns
``-inf`` and its clip gives ``BF = exp(-709.78)``; here ``log BF`` is computed directly from the
continued fraction of the upper incomplete gamma function,
``P(X <= x) = Q(x + 1, lambda) = lambda^(x+1) e^(-lambda) / x! * CF``, so ``log BF = log(lambda) + log(CF)``,
which is accurate there (and small: ``BF ~ 1 / (1 - x / lambda)``).

Assignment
----------
``moi=None`` (the original rule): ``BF_ig < cutoff`` is set to 0; a cell is assigned the features tied
at its row maximum, none if that maximum is 0. ``moi=k`` (not implemented in the original): the up to
``k`` features with ``BF_ig >= cutoff``, in decreasing ``BF`` order (ties broken by the larger observed
count, then by feature order), for high-MOI or dual-guide experiments.

Examples
--------
>>> import numpy as np
>>> from scar_jax.features import bayes_factors, assign_features
>>> x = np.array([[50, 1, 0], [0, 2, 40]])
>>> bf = bayes_factors(x, x.sum(1), np.array([0.1, 0.1]), np.full(3, 1 / 3))
>>> assign_features(bf, x, ["sg_a", "sg_b", "sg_c"])["sgRNA"].tolist()
['sg_a', 'sg_c']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special

__all__ = [
    "FEATURE_TYPES",
    "FORCED_SPARSITY",
    "LOG_BF_CLIP",
    "assign_features",
    "bayes_factors",
    "check_feature_type",
    "expected_ambient_counts",
    "log_bayes_factors",
]

FEATURE_TYPES: tuple[str, ...] = ("mRNA", "ADT", "sgRNA", "tag", "CMO", "ATAC")
"""Feature types of the original scAR (``feature_type`` argument)."""

FORCED_SPARSITY: dict[str, float] = {"sgRNA": 1.0, "tag": 1.0, "CMO": 1.0}
"""Feature types for which the original scAR forces the decoder's ``sparsity`` to 1."""

LOG_BF_CLIP = 709.78
"""Bound of ``|log BF|`` (the original's guard against overflow of ``exp``)."""

_ADJUST_MODES = ("micro", "global", None)
_CF_UNDERFLOW = 1e-200  # pdtr below this: use the continued fraction instead of log(pdtr)
_CF_MAX_ITER = 5000
_CF_TOL = 1e-15
_CF_TINY = 1e-300


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def check_feature_type(feature_type: Any) -> str:
    """Validate a feature type and return its canonical spelling.

    Parameters
    ----------
    feature_type
        One of :data:`FEATURE_TYPES`, matched case-insensitively (``"sgrna"`` gives ``"sgRNA"``).

    Returns
    -------
    str
        The canonical name, e.g. ``"sgRNA"``.

    Raises
    ------
    ValueError
        If ``feature_type`` is not one of :data:`FEATURE_TYPES`; the message lists the valid ones.
    """
    if isinstance(feature_type, str):
        for name in FEATURE_TYPES:
            if feature_type.lower() == name.lower():
                return name
    raise ValueError(f"feature_type must be one of {', '.join(FEATURE_TYPES)}; got {feature_type!r}")


def _check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return int(chunk_size)


def _as_float_vector(name: str, value: Any, n: int | None) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array of shape (n_cells,)") from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (n_cells,), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one value per cell), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def _check_matrix(name: str, value: Any) -> np.ndarray | sp.csr_matrix:
    """Dense float64 ``ndarray`` or CSR matrix; shape ``(n, G)``."""
    if sp.issparse(value):
        mat = sp.csr_matrix(value)
    else:
        try:
            mat = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a numeric 2-D array or scipy sparse matrix") from err
    if mat.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_cells, n_features), got shape {mat.shape}")
    return mat


def _check_counts(name: str, x: np.ndarray | sp.csr_matrix) -> None:
    values = x.data if sp.issparse(x) else x
    values = np.asarray(values)
    if values.size and (
        not np.all(np.isfinite(values)) or values.min() < 0 or not np.array_equal(values, np.floor(values))
    ):
        raise ValueError(f"{name} must contain finite, non-negative integer counts")


def _dense_rows(x: np.ndarray | sp.csr_matrix, start: int, stop: int) -> np.ndarray:
    block = x[start:stop]
    if sp.issparse(block):
        return np.asarray(block.toarray(), dtype=np.float64)
    return np.asarray(block, dtype=np.float64)


def _row_sums(x: np.ndarray | sp.csr_matrix) -> np.ndarray:
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def _prepare(
    library: Any,
    noise_ratio: Any,
    ambient_profile: Any,
    batch_index: Any,
    n_cells: int | None,
    n_features: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the per-cell inputs; return ``library, noise_ratio, profile (P, G), batch (n,)``."""
    library = _as_float_vector("library", library, n_cells)
    n = library.shape[0]
    if np.any(library < 0):
        raise ValueError("library must be >= 0 (observed total counts per cell)")
    noise_ratio = _as_float_vector("noise_ratio", noise_ratio, n)
    if np.any(noise_ratio < 0) or np.any(noise_ratio > 1):
        raise ValueError("noise_ratio must lie in [0, 1]")

    try:
        profile = np.asarray(ambient_profile, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError("ambient_profile must be a numeric array of shape (n_profiles, n_features)") from err
    if profile.ndim == 1:
        profile = profile[None, :]
    if profile.ndim != 2 or profile.shape[0] < 1 or profile.shape[1] < 1:
        raise ValueError(f"ambient_profile must have shape (n_profiles, n_features), got shape {profile.shape}")
    if n_features is not None and profile.shape[1] != n_features:
        raise ValueError(f"ambient_profile has {profile.shape[1]} features but x has {n_features}")
    if not np.all(np.isfinite(profile)) or np.any(profile < 0):
        raise ValueError("ambient_profile must be finite and non-negative")
    n_profiles = profile.shape[0]

    if batch_index is None:
        if n_profiles != 1:
            raise ValueError(f"batch_index is required when ambient_profile has {n_profiles} rows (one per batch)")
        batch = np.zeros(n, dtype=np.int64)
    else:
        batch = np.asarray(batch_index)
        if batch.dtype == np.bool_ or not np.issubdtype(batch.dtype, np.integer):
            raise ValueError(f"batch_index must be an integer array, got dtype {batch.dtype}")
        if batch.shape != (n,):
            raise ValueError(f"batch_index must have shape ({n},) (one value per cell), got shape {batch.shape}")
        if n and (batch.min() < 0 or batch.max() >= n_profiles):
            raise ValueError(f"batch_index values must lie in [0, {n_profiles - 1}] (rows of ambient_profile)")
        batch = batch.astype(np.int64)
    return library, noise_ratio, profile, batch


# --------------------------------------------------------------------------------------------------
# Poisson tail in log space
# --------------------------------------------------------------------------------------------------
def _log_bf_continued_fraction(x: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``log(P(X <= x) / P(X = x))`` for ``X ~ Poisson(lam)`` with ``lam > x + 1``, 1-D arrays.

    Modified Lentz evaluation of the continued fraction of the regularised upper incomplete gamma
    function ``Q(a, z) = z^a e^-z / Gamma(a) * h`` with ``a = x + 1``, ``z = lam``; then
    ``log BF = log(z) + log(h)``. Converges quickly for ``z > a``.
    """
    a = x + 1.0
    b = lam + 1.0 - a
    c = np.full_like(lam, 1.0 / _CF_TINY)
    d = 1.0 / b
    h = d.copy()
    active = np.ones(lam.shape, dtype=bool)
    for i in range(1, _CF_MAX_ITER + 1):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        an = -i * (i - a[idx])
        b[idx] += 2.0
        dd = an * d[idx] + b[idx]
        dd = np.where(np.abs(dd) < _CF_TINY, _CF_TINY, dd)
        cc = b[idx] + an / c[idx]
        cc = np.where(np.abs(cc) < _CF_TINY, _CF_TINY, cc)
        dd = 1.0 / dd
        delta = dd * cc
        d[idx], c[idx] = dd, cc
        h[idx] *= delta
        active[idx] = np.abs(delta - 1.0) >= _CF_TOL
    return np.log(lam) + np.log(h)


def _poisson_log_bf(x: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Unclipped ``logcdf(x; lam) - logpmf(x; lam)`` (elementwise, same shapes)."""
    log_pmf = special.xlogy(x, lam) - lam - special.gammaln(x + 1.0)
    cdf = special.pdtr(x, lam)
    with np.errstate(divide="ignore"):
        out = np.log(cdf) - log_pmf
    under = (cdf < _CF_UNDERFLOW) & (lam > x + 1.0)
    if np.any(under):
        out[under] = _log_bf_continued_fraction(x[under], lam[under])
    return out


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def expected_ambient_counts(
    library: Any,
    noise_ratio: Any,
    ambient_profile: Any,
    batch_index: Any = None,
) -> np.ndarray:
    """Expected ambient counts ``E_ig = N_i * eps_i * a_{b(i), g}``.

    Parameters
    ----------
    library
        Observed total counts ``N_i`` per cell, shape ``(n_cells,)``, ``>= 0``.
    noise_ratio
        Noise ratio ``eps_i`` per cell, shape ``(n_cells,)``, in ``[0, 1]`` (e.g. a trained model's
        ``get_noise_ratio()``).
    ambient_profile
        Ambient profile(s), shape ``(n_profiles, n_features)`` or ``(n_features,)``, non-negative (rows
        normally sum to one; they are used as given, e.g. a model's ``ambient_profile``).
    batch_index
        Row of ``ambient_profile`` for each cell, integer array of shape ``(n_cells,)``. Optional when
        there is a single profile.

    Returns
    -------
    numpy.ndarray
        ``E``, float64, shape ``(n_cells, n_features)``.

    Raises
    ------
    ValueError
        If a shape, dtype or range is wrong; the message names the argument.
    """
    library, noise_ratio, profile, batch = _prepare(library, noise_ratio, ambient_profile, batch_index, None, None)
    return (library * noise_ratio)[:, None] * profile[batch]


def log_bayes_factors(
    x: Any,
    library: Any,
    noise_ratio: Any,
    ambient_profile: Any,
    batch_index: Any = None,
    adjust: str | None = "micro",
    chunk_size: int = 4096,
) -> np.ndarray:
    """Natural-log Bayes factors of native presence, ``log BF_ig`` (see the module docstring).

    ``log BF_ig = clip(log P(X <= x_ig) - log P(X = x_ig), -709.78, 709.78)`` with
    ``X ~ Poisson(E_ig + adj_i)``, ``E_ig = N_i eps_i a_{b(i), g}``.

    Parameters
    ----------
    x
        Observed counts, shape ``(n_cells, n_features)``: dense array or scipy sparse matrix of
        non-negative integers. Processed ``chunk_size`` rows at a time (densified per chunk).
    library
        Observed totals ``N_i``, shape ``(n_cells,)``; ``None`` uses the row sums of ``x``.
    noise_ratio
        ``eps_i``, shape ``(n_cells,)``, in ``[0, 1]``.
    ambient_profile
        ``(n_profiles, n_features)`` or ``(n_features,)``, non-negative, used as given.
    batch_index
        Integer array ``(n_cells,)`` selecting each cell's row of ``ambient_profile``; optional when
        there is a single profile.
    adjust
        ``"micro"`` (per-cell adjustment), ``"global"`` (pooled over all cells given) or ``None``.
    chunk_size
        Rows per chunk, ``>= 1``; bounds the memory of the work arrays. Does not change the result.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(n_cells, n_features)``, values in ``[-709.78, 709.78]``.

    Raises
    ------
    ValueError
        If a shape, dtype or range is wrong or ``adjust`` is unknown; the message names the argument.
    """
    if adjust not in _ADJUST_MODES:
        raise ValueError(f"adjust must be 'micro', 'global' or None, got {adjust!r}")
    chunk_size = _check_chunk_size(chunk_size)
    x = _check_matrix("x", x)
    n, G = x.shape
    if G < 1:
        raise ValueError("x must have at least one feature (column)")
    _check_counts("x", x)
    if library is None:
        library = _row_sums(x)
    library, noise_ratio, profile, batch = _prepare(library, noise_ratio, ambient_profile, batch_index, n, G)

    scale = library * noise_ratio  # N_i eps_i
    ambient_total = scale * profile.sum(axis=1)[batch]  # T_i = sum_g E_ig
    if adjust == "micro":
        adj = np.maximum(library - ambient_total, 0.0) / G
    elif adjust == "global":
        pooled = float(np.sum(library - ambient_total)) / (max(n, 1) * G)
        adj = np.full(n, max(pooled, 0.0))
    else:
        adj = np.zeros(n)

    out = np.empty((n, G), dtype=np.float64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        xc = _dense_rows(x, start, stop)
        lam = scale[start:stop, None] * profile[batch[start:stop]] + adj[start:stop, None]
        out[start:stop] = _poisson_log_bf(xc, lam)
    np.clip(out, -LOG_BF_CLIP, LOG_BF_CLIP, out=out)
    return out


def bayes_factors(
    x: Any,
    library: Any,
    noise_ratio: Any,
    ambient_profile: Any,
    batch_index: Any = None,
    adjust: str | None = "micro",
    chunk_size: int = 4096,
) -> np.ndarray:
    """Bayes factors ``BF_ig = exp(log BF_ig)``; see :func:`log_bayes_factors` for the arguments.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(n_cells, n_features)``, values in ``[exp(-709.78), exp(709.78)]`` (finite).
    """
    return np.exp(log_bayes_factors(x, library, noise_ratio, ambient_profile, batch_index, adjust, chunk_size))


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

    bf = _check_matrix("bayes_factors", bayes_factors)
    if sp.issparse(bf):
        bf = np.asarray(bf.toarray(), dtype=np.float64)
    if np.any(np.isnan(bf)) or (bf.size and bf.min() < 0):
        raise ValueError("bayes_factors must be non-negative and not NaN")
    n, G = bf.shape
    if G < 1:
        raise ValueError("bayes_factors must have at least one feature (column)")
    x = _check_matrix("x", x)
    if x.shape != bf.shape:
        raise ValueError(f"x must have the shape of bayes_factors {bf.shape}, got {x.shape}")
    _check_counts("x", x)

    names = np.asarray([str(s) for s in feature_names], dtype=object)
    if names.shape != (G,):
        raise ValueError(f"feature_names must have {G} entries (one per column), got {names.shape[0]}")
    if obs_names is None:
        index = pd.Index([str(i) for i in range(n)])
    else:
        index = pd.Index(obs_names)
        if index.shape != (n,):
            raise ValueError(f"obs_names must have {n} entries (one per row), got {len(index)}")

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
    n_assigned = np.bincount(rows, minlength=n).astype(np.int64)
    pieces = np.split(names[cols], np.cumsum(n_assigned)[:-1]) if n else []
    joined = [",".join(p) for p in pieces]
    return pd.DataFrame(
        {feature_type: pd.Series(joined, index=index, dtype=object), f"n_{feature_type}": n_assigned, "count": counts},
        index=index,
    )
