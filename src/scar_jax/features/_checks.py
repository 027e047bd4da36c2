"""Feature types, argument checks and chunked row access shared by the Bayes factors and the assignment."""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np
import scipy.sparse as sp

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


def _float_array(name: str, value: Any, what: str) -> np.ndarray:
    """``value`` as a float64 array; a ``ValueError`` saying ``name`` must be ``what`` if it is not numeric."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be {what}") from err


def _as_float_vector(name: str, value: Any, n: int | None) -> np.ndarray:
    arr = _float_array(name, value, "a numeric array of shape (n_cells,)")
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
        mat = _float_array(name, value, "a numeric 2-D array or scipy sparse matrix")
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
