r"""Seeded simulation of feature-barcode data (CRISPR guides, CITE-seq antibodies) with ambient noise.

Companion of :mod:`scar_jax.datasets` for the original scAR's non-mRNA feature types. Each droplet's
observed counts are the sum of *native* counts (barcodes of the cell in the droplet) and *ambient*
counts (free barcodes captured alongside it); the truth needed to score denoising and feature
assignment is stored with the counts.

Generative models
-----------------
Common to both, for cells ``i = 1..N`` and features ``g = 1..G``:

.. code-block:: text

    noise ratio     eps_i ~ Beta(m c, (1 - m) c),        m = noise_ratio_mean, c = 20
    library size    L_i = max(L_min, exp(Normal(log(mu_L) - s^2 / 2, s^2))),
                    mu_L = library_size_mean, s = 0.5, L_min = 0.1 mu_L
    native counts   n_ig ~ Poisson(L_i (1 - eps_i) rho_ig)
    ambient counts  y_ig ~ Poisson(L_i eps_i a_g)
    observed counts x_ig = n_ig + y_ig               (cells with x_i. = 0 are re-drawn)

Guides (:func:`simulate_guides`, CROP-seq like):

.. code-block:: text

    guide abundance   pi = w / sum(w),   w_g ~ LogNormal(0, 0.5^2)      (library representation)
    guides per cell   k_i = 1 + Bernoulli(dual_fraction)
    cell's guides     S_i: k_i guides drawn without replacement with probabilities pi
                      (Gumbel top-k: the k largest of log pi_g + Gumbel_ig)
    guide shares      k_i = 1: rho_i = e_{S_i};   k_i = 2: u_i ~ Beta(4, 4), shares (u_i, 1 - u_i)
    ambient profile   a = (1 - f) q / sum(q) + f / G,   q_g = sum_i L_i (1 - eps_i) rho_ig,   f = 0.02
                      (free guides come from lysed cells: the expected native guide pool, plus a floor)

Antibodies (:func:`simulate_adt`, CITE-seq like), with ``J`` isotype controls and ``P = G - J``
target proteins (controls last):

.. code-block:: text

    baseline          beta_p ~ LogNormal(0, 0.75^2),   p = 1..P
    markers           a random quarter of the proteins (at least one) are pan markers (no type);
                      the others are dealt round-robin, in random order, to the K types
    native profile    w_tp = beta_p * (F_p if p is a marker of t else 1),  F_p ~ LogNormal(log 25, 0.3^2)
                      w_tp = 0 for isotype controls;   rho_t = w_t / sum_p w_tp
    cell types        pi ~ Dirichlet(5 * 1_K),   t_i ~ Categorical(pi)
    antibody mix      v_g ~ LogNormal(0, 0.5^2) for all G antibodies (isotype controls included)
    ambient profile   a = (1 - f_bg) sum_t pihat_t rho_t + f_bg v / sum(v),   f_bg = 0.2
                      (pihat_t: realised fraction of cells of type t; free antibody for f_bg)

So isotype controls have no native counts, only ambient ones.

Truth stored
------------
``X`` (CSR ``int32``), ``layers["native"]``, ``layers["ambient"]`` (``native + ambient == X``),
``obs["noise_ratio"]`` (realised ambient fraction ``y_i. / x_i.``), ``obs["noise_ratio_parameter"]``
(``eps_i``), ``obs["library_size"]`` (``L_i``), ``obs["batch"]`` (one category ``"batch_0"``, so
:func:`scar_jax.datasets.raw_droplets` accepts the result), ``varm["true_ambient_profile"]``
(``(G, 1)``, sums to one, all entries > 0) and ``uns["simulation"]`` (JSON-serialisable parameters).
Empty droplets for either come from :func:`simulate_feature_empty_droplets`.

Examples
--------
>>> from scar_jax.feature_datasets import simulate_guides, simulate_feature_empty_droplets
>>> adata = simulate_guides(n_cells=300, n_guides=20, dual_fraction=0.2, seed=1)
>>> empty = simulate_feature_empty_droplets(adata, n_droplets=500, seed=2)
>>> adata.shape, empty.shape
((300, 20), (500, 20))
"""

from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .datasets import simulate_empty_droplets
from .datasets._common import _check_int, _names

__all__ = ["simulate_adt", "simulate_feature_empty_droplets", "simulate_guides"]

# Fixed constants of the generative models (recorded in ``uns["simulation"]``).
_NOISE_RATIO_CONCENTRATION = 20.0
_LIBRARY_SIZE_SD_LOG = 0.5
_MIN_LIBRARY_FRACTION = 0.1  # L_min = 0.1 * library_size_mean
_GUIDE_ABUNDANCE_SD_LOG = 0.5
_DUAL_SHARE_CONCENTRATION = 4.0  # u ~ Beta(4, 4)
_GUIDE_AMBIENT_FLOOR = 0.02
_ADT_BASELINE_SD_LOG = 0.75
_ADT_MARKER_FOLD = 25.0
_ADT_MARKER_FOLD_SD_LOG = 0.3
_ADT_PAN_FRACTION = 0.25
_ADT_ANTIBODY_SD_LOG = 0.5
_ADT_BACKGROUND_FRACTION = 0.2
_TYPE_PROPORTION_CONCENTRATION = 5.0
_MAX_REDRAWS = 1000
_CHUNK_ELEMENTS = 2_000_000  # rows per chunk = _CHUNK_ELEMENTS // n_features

# Independent random streams (disjoint from scar_jax.datasets, which uses 0 and 1).
_STREAM_GUIDES = 10
_STREAM_ADT = 11


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_float(name: str, value: Any, low: float, high: float | None = None, *, low_inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    v = float(value)
    if v < low or (v == low and not low_inclusive):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {v}")
    if high is not None and v >= high:
        raise ValueError(f"{name} must be < {high}, got {v}")
    return v


def _noise_and_library(
    rng: np.random.Generator, n: int, noise_ratio_mean: float, library_size_mean: float
) -> tuple[np.ndarray, np.ndarray]:
    c = _NOISE_RATIO_CONCENTRATION
    eps = rng.beta(noise_ratio_mean * c, (1.0 - noise_ratio_mean) * c, size=n)
    s = _LIBRARY_SIZE_SD_LOG
    library = rng.lognormal(math.log(library_size_mean) - 0.5 * s**2, s, size=n)
    return eps, np.maximum(library, _MIN_LIBRARY_FRACTION * library_size_mean)


def _draw_counts(
    rng: np.random.Generator, native_rate: Any, ambient_rate: Any, n: int, G: int
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """CSR ``int32`` native ``Poisson(native_rate(rows))`` and ambient ``Poisson(ambient_rate(rows))``.

    Both callables return dense ``(len(rows), G)`` rates for an index array ``rows``; rows are drawn in
    chunks of ``_CHUNK_ELEMENTS // G``. Rows whose observed total is zero are re-drawn (both
    components), so every cell has at least one count.
    """
    step = max(1, _CHUNK_ELEMENTS // G)
    nat_parts, amb_parts = [], []
    for start in range(0, n, step):
        rows = np.arange(start, min(start + step, n))
        nat = rng.poisson(native_rate(rows)).astype(np.int32)
        amb = rng.poisson(ambient_rate(rows)).astype(np.int32)
        for _ in range(_MAX_REDRAWS):
            empty = np.flatnonzero((nat.sum(axis=1) + amb.sum(axis=1)) == 0)
            if empty.size == 0:
                break
            nat[empty] = rng.poisson(native_rate(rows[empty]))
            amb[empty] = rng.poisson(ambient_rate(rows[empty]))
        else:  # pragma: no cover - probability < exp(-_MAX_REDRAWS)
            raise RuntimeError("could not draw a non-empty cell; increase library_size_mean")
        nat_parts.append(sp.csr_matrix(nat))
        amb_parts.append(sp.csr_matrix(amb))
    return _stack(nat_parts, G), _stack(amb_parts, G)


def _stack(parts: list[sp.csr_matrix], G: int) -> sp.csr_matrix:
    mat = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, G), dtype=np.int32)
    mat = mat.astype(np.int32)
    mat.sum_duplicates()
    mat.sort_indices()
    return mat


def _assemble(
    native: sp.csr_matrix,
    ambient: sp.csr_matrix,
    obs: dict[str, Any],
    obs_names: list[str],
    var: pd.DataFrame,
    profile: np.ndarray,
    eps: np.ndarray,
    library: np.ndarray,
    params: dict[str, Any],
    varm: dict[str, np.ndarray] | None = None,
) -> anndata.AnnData:
    X = (native + ambient).astype(np.int32)
    X.sort_indices()
    amb_tot = np.asarray(ambient.sum(axis=1), dtype=np.float64).ravel()
    obs_tot = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    n = X.shape[0]
    frame = pd.DataFrame(
        {
            **obs,
            "batch": pd.Categorical.from_codes(np.zeros(n, dtype=np.int64), categories=["batch_0"]),
            "noise_ratio": amb_tot / obs_tot,
            "noise_ratio_parameter": eps.astype(np.float64),
            "library_size": library.astype(np.float64),
        },
        index=pd.Index(obs_names),
    )
    params = {
        **params,
        "noise_ratio_concentration": _NOISE_RATIO_CONCENTRATION,
        "library_size_sd_log": _LIBRARY_SIZE_SD_LOG,
        "min_library_size": float(_MIN_LIBRARY_FRACTION * params["library_size_mean"]),
        "batch_categories": ["batch_0"],
    }
    return anndata.AnnData(
        X=X,
        obs=frame,
        var=var,
        layers={"native": native, "ambient": ambient},
        varm={"true_ambient_profile": profile[:, None].astype(np.float64), **(varm or {})},
        uns={"simulation": params},
    )


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
# long: the docstring lists every output field (about 30 lines); the body is about 45 lines
def simulate_guides(
    n_cells: int = 2000,
    n_guides: int = 50,
    dual_fraction: float = 0.0,
    noise_ratio_mean: float = 0.1,
    library_size_mean: float = 300.0,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate CROP-seq-like guide (sgRNA) counts with ambient contamination and known guides.

    See the module docstring for the generative model: each cell carries one guide (two with
    probability ``dual_fraction``), whose native counts are ``Poisson(L_i (1 - eps_i) share)``;
    ambient guides follow the expected native guide pool plus a small floor.

    Parameters
    ----------
    n_cells, n_guides
        Cells (``>= 1``) and guides (features, ``>= 2``).
    dual_fraction
        Probability that a cell carries two distinct guides, in ``[0, 1]``.
    noise_ratio_mean, library_size_mean
        Mean of ``eps_i ~ Beta``, in ``(0, 1)``, and the mean expected guide counts per cell, ``> 0``.
    seed
        Seed (``>= 0``) of ``numpy.random.default_rng([10, seed])``.

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_guides)``: ``X``, ``layers["native"]``, ``layers["ambient"]`` (CSR ``int32``, ``native +
        ambient == X``); ``obs["true_guides"]`` (the cell's guide names, sorted, joined by ``","``),
        ``obs["n_true_guides"]`` (1 or 2), ``obs["noise_ratio"]``, ``obs["noise_ratio_parameter"]``,
        ``obs["library_size"]``, ``obs["batch"]``; names ``"cell_00000"``, ``"sg_00"``; ``var["abundance"]``
        (``pi``); ``varm["true_ambient_profile"]`` ``(n_guides, 1)``; ``uns["simulation"]``. Raises
        ``ValueError`` naming an argument out of range.
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    n_guides = _check_int("n_guides", n_guides, 2)
    dual_fraction = _check_float("dual_fraction", dual_fraction, 0.0, low_inclusive=True)
    if dual_fraction > 1.0:
        raise ValueError(f"dual_fraction must be <= 1, got {dual_fraction}")
    noise_ratio_mean = _check_float("noise_ratio_mean", noise_ratio_mean, 0.0, 1.0, low_inclusive=False)
    library_size_mean = _check_float("library_size_mean", library_size_mean, 0.0, low_inclusive=False)
    seed = _check_int("seed", seed, 0)

    rng = np.random.default_rng([_STREAM_GUIDES, seed])
    n, G = n_cells, n_guides
    abundance, k, top2, share1 = _guide_design(rng, n, G, dual_fraction)
    eps, library = _noise_and_library(rng, n, noise_ratio_mean, library_size_mean)
    native_scale = library * (1.0 - eps)
    q = np.bincount(top2[:, 0], weights=native_scale * share1, minlength=G)
    q += np.bincount(top2[:, 1], weights=native_scale * (1.0 - share1), minlength=G)  # zero for k == 1
    profile = (1.0 - _GUIDE_AMBIENT_FLOOR) * q / q.sum() + _GUIDE_AMBIENT_FLOOR / G
    profile /= profile.sum()
    native_rate = functools.partial(_guide_rate, native_scale, share1, top2, k, G)
    ambient_rate = functools.partial(_ambient_rate, library * eps, profile)
    native, ambient = _draw_counts(rng, native_rate, ambient_rate, n, G)

    guide_names = np.asarray(_names("sg", G, 2), dtype=object)
    first, second = guide_names[top2[:, 0]], guide_names[top2[:, 1]]
    true_guides = [
        ",".join(sorted((a, b))) if kk == 2 else a for a, b, kk in zip(first, second, k.tolist(), strict=True)
    ]
    params = {
        "generator": "scar_jax.feature_datasets.simulate_guides",
        "n_cells": n,
        "n_guides": G,
        "dual_fraction": dual_fraction,
        "noise_ratio_mean": noise_ratio_mean,
        "library_size_mean": library_size_mean,
        "seed": seed,
        "guide_abundance_sd_log": _GUIDE_ABUNDANCE_SD_LOG,
        "dual_share_concentration": _DUAL_SHARE_CONCENTRATION,
        "ambient_floor": _GUIDE_AMBIENT_FLOOR,
        "n_dual_cells": int(np.sum(k == 2)),
    }
    obs = {"true_guides": pd.Series(true_guides, dtype=object).to_numpy(), "n_true_guides": k}
    var = pd.DataFrame({"abundance": abundance}, index=pd.Index(list(guide_names)))
    return _assemble(native, ambient, obs, _names("cell", n, 5), var, profile, eps, library, params)


def _guide_design(rng: np.random.Generator, n: int, G: int, dual_fraction: float):
    """Guide abundances ``pi`` ``(G,)``, guides per cell ``k`` (1 or 2), the two guides drawn for each cell without
    replacement ``(n, 2)`` and the first guide's share of a dual cell's native counts ``(n,)``."""
    w = rng.lognormal(0.0, _GUIDE_ABUNDANCE_SD_LOG, size=G)
    abundance = w / w.sum()
    k = 1 + (rng.random(n) < dual_fraction).astype(np.int64)
    # Gumbel top-k: sequential sampling without replacement with probabilities `abundance`.
    keys = np.log(abundance)[None, :] + rng.gumbel(size=(n, G))
    top2 = np.argsort(-keys, axis=1)[:, :2]
    u = rng.beta(_DUAL_SHARE_CONCENTRATION, _DUAL_SHARE_CONCENTRATION, size=n)
    return abundance, k, top2, np.where(k == 2, u, 1.0)


def _guide_rate(native_scale, share1, top2, k, G: int, rows: np.ndarray) -> np.ndarray:
    """Native guide rates ``(len(rows), G)``: the cell's native scale on its one or two guides."""
    rate = np.zeros((rows.shape[0], G))
    r = np.arange(rows.shape[0])
    rate[r, top2[rows, 0]] = native_scale[rows] * share1[rows]
    second = k[rows] == 2
    rate[r[second], top2[rows[second], 1]] = native_scale[rows[second]] * (1.0 - share1[rows[second]])
    return rate


def _ambient_rate(ambient_scale: np.ndarray, profile: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Ambient rates ``(len(rows), G)``: each cell's ambient scale times the ambient profile."""
    return ambient_scale[rows, None] * profile[None, :]


# long: the docstring lists every output field (about 30 lines); the body is about 50 lines
def simulate_adt(
    n_cells: int = 2000,
    n_proteins: int = 30,
    n_cell_types: int = 4,
    n_isotype_controls: int = 3,
    noise_ratio_mean: float = 0.2,
    library_size_mean: float = 2000.0,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate CITE-seq-like antibody-derived tag (ADT) counts with ambient antibodies.

    See the module docstring for the generative model: per cell type, marker proteins are about
    25-fold above their baseline; isotype controls have no native counts; the ambient profile mixes
    the cell types' profiles with free antibody spread over the whole panel.

    Parameters
    ----------
    n_cells, n_proteins, n_cell_types, n_isotype_controls
        Cells (``>= 1``), antibodies including the isotype controls (``>= n_isotype_controls + 1``), cell
        types (``>= 1``) and isotype-control antibodies (the last features, ``>= 0``).
    noise_ratio_mean, library_size_mean
        Mean of ``eps_i ~ Beta``, in ``(0, 1)``, and the mean expected ADT counts per cell, ``> 0``.
    seed
        Seed (``>= 0``) of ``numpy.random.default_rng([11, seed])``.

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_proteins)``: ``X``, ``layers["native"]``, ``layers["ambient"]`` (CSR ``int32``);
        ``obs["cell_type"]``, ``obs["noise_ratio"]``, ``obs["noise_ratio_parameter"]``, ``obs["library_size"]``,
        ``obs["batch"]``; ``var_names`` ``"adt_00"``, ... then ``"isotype_0"``, ...; ``var["isotype_control"]``,
        ``var["marker_of"]`` (the type name, ``"pan"`` or ``"isotype"``); ``varm["true_ambient_profile"]``
        ``(n_proteins, 1)``, ``varm["true_native_profile"]`` ``(n_proteins, n_cell_types)`` (zero on isotype
        controls); ``uns["simulation"]``. Raises ``ValueError`` naming an argument out of range.
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    n_isotype_controls = _check_int("n_isotype_controls", n_isotype_controls, 0)
    n_proteins = _check_int("n_proteins", n_proteins, 1)
    if n_proteins < n_isotype_controls + 1:
        raise ValueError(f"n_proteins must be >= n_isotype_controls + 1 = {n_isotype_controls + 1}, got {n_proteins}")
    n_cell_types = _check_int("n_cell_types", n_cell_types, 1)
    noise_ratio_mean = _check_float("noise_ratio_mean", noise_ratio_mean, 0.0, 1.0, low_inclusive=False)
    library_size_mean = _check_float("library_size_mean", library_size_mean, 0.0, low_inclusive=False)
    seed = _check_int("seed", seed, 0)

    rng = np.random.default_rng([_STREAM_ADT, seed])
    n, G, K, J = n_cells, n_proteins, n_cell_types, n_isotype_controls
    native_profile, marker_of = _adt_profiles(rng, G, K, J)
    type_proportions = rng.dirichlet(np.full(K, _TYPE_PROPORTION_CONCENTRATION))
    cell_type = rng.choice(K, size=n, p=type_proportions)
    realised = np.bincount(cell_type, minlength=K) / n
    v = rng.lognormal(0.0, _ADT_ANTIBODY_SD_LOG, size=G)
    profile = (1.0 - _ADT_BACKGROUND_FRACTION) * (native_profile @ realised) + _ADT_BACKGROUND_FRACTION * v / v.sum()
    profile /= profile.sum()
    eps, library = _noise_and_library(rng, n, noise_ratio_mean, library_size_mean)
    native_rate = functools.partial(_type_rate, library * (1.0 - eps), native_profile.T, cell_type)
    ambient_rate = functools.partial(_ambient_rate, library * eps, profile)
    native, ambient = _draw_counts(rng, native_rate, ambient_rate, n, G)

    type_names = [f"type_{t}" for t in range(K)]
    params = {
        "generator": "scar_jax.feature_datasets.simulate_adt",
        "n_cells": n,
        "n_proteins": G,
        "n_cell_types": K,
        "n_isotype_controls": J,
        "noise_ratio_mean": noise_ratio_mean,
        "library_size_mean": library_size_mean,
        "seed": seed,
        "baseline_sd_log": _ADT_BASELINE_SD_LOG,
        "marker_fold": _ADT_MARKER_FOLD,
        "marker_fold_sd_log": _ADT_MARKER_FOLD_SD_LOG,
        "pan_fraction": _ADT_PAN_FRACTION,
        "antibody_sd_log": _ADT_ANTIBODY_SD_LOG,
        "background_fraction": _ADT_BACKGROUND_FRACTION,
        "type_proportion_concentration": _TYPE_PROPORTION_CONCENTRATION,
        "cell_type_proportions": [float(p) for p in type_proportions],
        "cell_type_categories": type_names,
    }
    obs = {"cell_type": pd.Categorical.from_codes(cell_type, categories=type_names)}
    var = _adt_var(marker_of, type_names, J)
    varm = {"true_native_profile": native_profile}
    return _assemble(native, ambient, obs, _names("cell", n, 5), var, profile, eps, library, params, varm=varm)


def _adt_profiles(rng: np.random.Generator, G: int, K: int, J: int) -> tuple[np.ndarray, np.ndarray]:
    """Native profiles ``(G, K)`` (zero on the ``J`` isotype controls, the last features) and the type each
    non-isotype protein marks ``(G - J,)`` (-1: a pan marker)."""
    P = G - J
    baseline = rng.lognormal(0.0, _ADT_BASELINE_SD_LOG, size=P)
    order = rng.permutation(P)
    n_pan = max(1, int(round(_ADT_PAN_FRACTION * P))) if P > K else 0
    marker_of = np.full(P, -1, dtype=np.int64)  # -1: pan marker
    marker_of[order[n_pan:]] = np.arange(P - n_pan) % K
    fold = rng.lognormal(math.log(_ADT_MARKER_FOLD), _ADT_MARKER_FOLD_SD_LOG, size=P)
    w = np.repeat(baseline[:, None], K, axis=1)
    specific = marker_of >= 0
    w[np.flatnonzero(specific), marker_of[specific]] *= fold[specific]
    native_profile = np.zeros((G, K))
    native_profile[:P] = w / w.sum(axis=0, keepdims=True)
    return native_profile, marker_of


def _type_rate(native_scale: np.ndarray, profiles: np.ndarray, cell_type: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Native rates ``(len(rows), G)``: each cell's native scale times its type's profile (``profiles`` ``(K, G)``)."""
    return native_scale[rows, None] * profiles[cell_type[rows]]


def _adt_var(marker_of: np.ndarray, type_names: list[str], J: int) -> pd.DataFrame:
    """``var`` of :func:`simulate_adt`: names, ``isotype_control`` and ``marker_of``."""
    P = marker_of.shape[0]
    var_names = _names("adt", P, 2) + [f"isotype_{j}" for j in range(J)]
    marker_label = [type_names[m] if m >= 0 else "pan" for m in marker_of] + ["isotype"] * J
    return pd.DataFrame(
        {
            "isotype_control": np.r_[np.zeros(P, dtype=bool), np.ones(J, dtype=bool)],
            "marker_of": pd.Series(marker_label, dtype=object).to_numpy(),
        },
        index=pd.Index(var_names),
    )


def simulate_feature_empty_droplets(
    adata: anndata.AnnData,
    n_droplets: int = 5000,
    library_size_mean: float = 20.0,
    library_size_sd_log: float = 0.8,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate empty (cell-free) droplets matching :func:`simulate_guides` or :func:`simulate_adt`.

    Each droplet ``j`` receives pure ambient counts ``y_jg ~ Poisson(L_j a_{b_j, g})`` with
    ``L_j ~ LogNormal(log(library_size_mean) - s^2 / 2, s^2)``, ``s = library_size_sd_log``, and
    ``a_b = adata.varm["true_ambient_profile"][:, b]`` (droplets split into contiguous, evenly sized
    blocks when there are several columns). Droplets with zero counts are kept, as in a raw matrix.

    Parameters
    ----------
    adata
        An AnnData with ``varm["true_ambient_profile"]`` of shape ``(n_features, n_batches)``.
    n_droplets
        Number of droplets, ``>= 1``.
    library_size_mean
        Mean expected counts per droplet, ``> 0``.
    library_size_sd_log
        Standard deviation of ``log L_j``, ``>= 0``.
    seed
        Seed (``>= 0``), as :func:`scar_jax.datasets.simulate_empty_droplets` (which this calls) uses it.

    Returns
    -------
    anndata.AnnData
        ``(n_droplets, n_features)`` with ``X`` (CSR ``int32``), ``obs["batch"]`` (categorical, the
        categories of ``adata``), ``obs["library_size"]`` (float64 ``L_j``), ``obs_names``
        ``"empty_00000"``, ..., the ``var_names`` of ``adata`` and ``uns["simulation"]``.

    Raises
    ------
    ValueError
        If ``adata`` has no true ambient profile or an argument is out of range.
    """
    # The same generative model as the mRNA simulator's empty droplets: one implementation serves both.
    return simulate_empty_droplets(adata, n_droplets, library_size_mean, library_size_sd_log, seed)
