"""Bayes factors of native presence against the ambient Poisson (the original scAR's rule)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from ._checks import (
    _ADJUST_MODES,
    _CF_MAX_ITER,
    _CF_TINY,
    _CF_TOL,
    _CF_UNDERFLOW,
    LOG_BF_CLIP,
    _check_chunk_size,
    _check_counts,
    _check_matrix,
    _dense_rows,
    _prepare,
    _row_sums,
)


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


# long: the parameter reference (about 35 lines of docstring); the body is about 20 lines
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
    adj = _adjustment(library, scale * profile.sum(axis=1)[batch], adjust, G)  # T_i = sum_g E_ig
    out = np.empty((n, G), dtype=np.float64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        xc = _dense_rows(x, start, stop)
        lam = scale[start:stop, None] * profile[batch[start:stop]] + adj[start:stop, None]
        out[start:stop] = _poisson_log_bf(xc, lam)
    np.clip(out, -LOG_BF_CLIP, LOG_BF_CLIP, out=out)
    return out


def _adjustment(library: np.ndarray, ambient_total: np.ndarray, adjust: str | None, G: int) -> np.ndarray:
    """The rate ``adj_i`` added to every feature: the native counts ``N_i - T_i`` spread over the ``G`` features,
    per cell (``"micro"``) or pooled over the cells (``"global"``); zero with ``None``."""
    n = library.shape[0]
    if adjust == "micro":
        return np.maximum(library - ambient_total, 0.0) / G
    if adjust == "global":
        pooled = float(np.sum(library - ambient_total)) / (max(n, 1) * G)
        return np.full(n, max(pooled, 0.0))
    return np.zeros(n)


def bayes_factors(
    x, library, noise_ratio, ambient_profile, batch_index=None, adjust: str | None = "micro", chunk_size: int = 4096
) -> np.ndarray:
    """Bayes factors ``BF_ig = exp(log BF_ig)``; see :func:`log_bayes_factors` for the arguments.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(n_cells, n_features)``, values in ``[exp(-709.78), exp(709.78)]`` (finite).
    """
    return np.exp(log_bayes_factors(x, library, noise_ratio, ambient_profile, batch_index, adjust, chunk_size))
