"""The float64 NumPy statement of the neighbourhood posterior (the oracle of the compiled loop)."""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

_TINY = 1e-300


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

    The float64 NumPy statement (dense ``(m, G)``): the tests' oracle of :func:`calibrated_native_share`'s loop.

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
