""":func:`simulate`: droplets with cells of several types and batches, contaminated with ambient RNA."""

from __future__ import annotations

from functools import partial

import anndata
import numpy as np
import pandas as pd

from ._common import (
    _AMBIENT_FLOOR,
    _GENE_LOG_SD,
    _HOUSEKEEPING_TYPE_LOG_SD,
    _STREAM_CELLS,
    _TYPE_PROPORTION_CONCENTRATION,
    _alias_table,
    _check_float,
    _check_int,
    _draw_in_chunks,
    _even_blocks,
    _library_sizes,
    _profile_counts,
    _record,
)


# long: the parameter and output reference (about 35 lines of docstring); the body is about 40 lines
def simulate(
    n_cells: int = 2000,
    n_genes: int = 1000,
    n_cell_types: int = 5,
    n_batches: int = 1,
    noise_ratio_mean: float = 0.15,
    noise_ratio_concentration: float = 20.0,
    library_size_mean: float = 3000.0,
    library_size_sd_log: float = 0.4,
    expressed_fraction: float = 0.3,
    ambient_concentration: float = 50.0,
    seed: int = 0,
    *,
    cell_profile_sd_log: float = 0.0,
) -> anndata.AnnData:
    """Simulate droplets containing cells, contaminated with ambient RNA, with known truth.

    The generative model and the fields of the result are in the module docstring of :mod:`scar_jax.datasets`.

    Parameters
    ----------
    n_cells, n_genes, n_cell_types, n_batches
        Cells (``>= 1``), genes (``>= 2``), cell types (``>= 1``; proportions ``Dirichlet(5 * 1)``) and batches
        (``>= 1``; each has its own ambient profile, cells in contiguous, evenly sized batch blocks).
    noise_ratio_mean, noise_ratio_concentration
        Mean in ``(0, 1)`` and concentration ``alpha + beta > 0`` of the per-cell ``eps_i ~ Beta``.
    library_size_mean, library_size_sd_log
        Mean expected library size ``E[L_i]`` (``>= 1``) and the sd of ``log L_i`` (``>= 0``).
    expressed_fraction
        Fraction of genes expressed by each cell type, in ``(0, 1]``. Half of the expressed genes (rounded
        down) form a housekeeping block shared by all types; the rest are type specific (disjoint blocks
        when they fit in the remaining genes, otherwise random, possibly overlapping, subsets).
    ambient_concentration
        Per-gene Dirichlet concentration of the ambient profiles, ``> 0``:
        ``a_b ~ Dirichlet(ambient_concentration * n_genes * base)``.
    seed
        Seed (``>= 0``) of ``numpy.random.default_rng([0, seed])``; the same seed gives identical output.
    cell_profile_sd_log
        Keyword only. Log-sd of an optional per-cell multiplicative perturbation of the native profile
        (``0``, the default, disables it); ``varm["true_native_profile"]`` stays the type-level profile.

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_genes)``: ``X`` and ``layers["native"]``, ``layers["ambient"]`` (CSR ``int32``,
        ``native + ambient == X``); ``obs["noise_ratio"]`` (realised), ``obs["noise_ratio_parameter"]``
        (``eps_i``), ``obs["cell_type"]``, ``obs["batch"]``, ``obs["library_size"]``;
        ``varm["true_ambient_profile"]`` ``(n_genes, n_batches)``, ``varm["true_native_profile"]``
        ``(n_genes, n_cell_types)``; ``uns["simulation"]`` (every parameter). Raises ``ValueError`` naming
        an argument out of range.
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    G = _check_int("n_genes", n_genes, 2)
    K = _check_int("n_cell_types", n_cell_types, 1)
    B = _check_int("n_batches", n_batches, 1)
    noise_ratio_mean = _check_float("noise_ratio_mean", noise_ratio_mean, low=0.0, high=1.0)
    noise_ratio_concentration = _check_float("noise_ratio_concentration", noise_ratio_concentration, low=0.0)
    library_size_mean = _check_float("library_size_mean", library_size_mean, low=1.0, low_inclusive=True)
    library_size_sd_log = _check_float("library_size_sd_log", library_size_sd_log, low=0.0, low_inclusive=True)
    expressed_fraction = _check_float("expressed_fraction", expressed_fraction, low=0.0, high=1.0, high_inclusive=True)
    ambient_concentration = _check_float("ambient_concentration", ambient_concentration, low=0.0)
    seed = _check_int("seed", seed, 0)
    cell_profile_sd_log = _check_float("cell_profile_sd_log", cell_profile_sd_log, low=0.0, low_inclusive=True)
    params = {k: v for k, v in locals().items() if k not in ("G", "K", "B")}
    params.update(n_genes=G, n_cell_types=K, n_batches=B)

    rng = np.random.default_rng([_STREAM_CELLS, seed])
    native_profile, expressed, design = _type_profiles(rng, G, K, expressed_fraction)
    type_proportions = rng.dirichlet(np.full(K, _TYPE_PROPORTION_CONCENTRATION))
    cell_type = rng.choice(K, size=n_cells, p=type_proportions)
    batch = _even_blocks(n_cells, B)
    realised_fractions = np.bincount(cell_type, minlength=K) / n_cells
    ambient_profile = _ambient_profiles(rng, native_profile, realised_fractions, ambient_concentration, B)
    c = noise_ratio_concentration
    eps = rng.beta(noise_ratio_mean * c, (1.0 - noise_ratio_mean) * c, size=n_cells)
    library, min_library = _library_sizes(rng, n_cells, library_size_mean, library_size_sd_log)
    type_probs = [native_profile[expressed[t], t] for t in range(K)]
    tables = [_alias_table(ambient_profile[:, b]) for b in range(B)]
    scales = (library * (1.0 - eps), library * eps)
    draw = partial(_draw_cells, rng, cell_type, batch, type_probs, expressed, scales, tables, cell_profile_sd_log)
    counts = _draw_in_chunks(draw, n_cells, G)

    cell_type_names = [f"type_{t}" for t in range(K)]
    batch_names = [f"batch_{b}" for b in range(B)]
    labels = {
        "cell_type": pd.Categorical.from_codes(cell_type, categories=cell_type_names),
        "batch": pd.Categorical.from_codes(batch, categories=batch_names),
    }
    params = _params(params, design, type_proportions, min_library, cell_type_names, batch_names)
    varm = {"true_ambient_profile": ambient_profile, "true_native_profile": native_profile}
    return _record(counts, labels, eps, library, {}, params, varm)


def _params(args: dict, design: dict, type_proportions, min_library: float, type_names, batch_names) -> dict:
    """``uns["simulation"]`` of :func:`simulate`: the arguments, the design and the fixed constants."""
    order = (
        "n_cells n_genes n_cell_types n_batches noise_ratio_mean noise_ratio_concentration library_size_mean "
        "library_size_sd_log expressed_fraction ambient_concentration seed cell_profile_sd_log"
    )
    return {
        "generator": "scar_jax.datasets.simulate",
        **{name: args[name] for name in order.split()},
        **design,
        "gene_log_sd": _GENE_LOG_SD,
        "housekeeping_type_log_sd": _HOUSEKEEPING_TYPE_LOG_SD,
        "type_proportion_concentration": _TYPE_PROPORTION_CONCENTRATION,
        "cell_type_proportions": [float(x) for x in type_proportions],
        "ambient_floor": _AMBIENT_FLOOR,
        "min_library_size": float(min_library),
        "cell_type_categories": type_names,
        "batch_categories": batch_names,
    }


def _type_profiles(
    rng: np.random.Generator, G: int, K: int, expressed_fraction: float
) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """Native profiles ``(G, K)``: a housekeeping block shared by all types plus type-specific genes, log-normal
    frequencies; the sorted expressed genes of each type; and the design recorded in ``uns["simulation"]``."""
    n_expr = min(G, max(1, int(round(expressed_fraction * G))))
    n_hk = n_expr // 2
    n_spec = n_expr - n_hk
    perm = rng.permutation(G)
    hk_genes = perm[:n_hk]
    rest = perm[n_hk:]
    disjoint = n_hk + K * n_spec <= G
    hk_log = rng.normal(0.0, _GENE_LOG_SD, size=n_hk)
    native_profile = np.zeros((G, K), dtype=np.float64)
    expressed: list[np.ndarray] = []
    for t in range(K):
        if disjoint:
            spec_genes = rest[t * n_spec : (t + 1) * n_spec]
        else:
            spec_genes = rng.choice(rest, size=n_spec, replace=False)
        genes = np.concatenate([hk_genes, spec_genes])
        log_w = np.concatenate(
            [
                hk_log + rng.normal(0.0, _HOUSEKEEPING_TYPE_LOG_SD, size=n_hk),
                rng.normal(0.0, _GENE_LOG_SD, size=n_spec),
            ]
        )
        w = np.exp(log_w - log_w.max())
        native_profile[genes, t] = w / w.sum()
        expressed.append(np.sort(genes))
    native_profile /= native_profile.sum(axis=0, keepdims=True)
    design = {
        "n_expressed_genes_per_type": int(n_expr),
        "n_housekeeping_genes": int(n_hk),
        "disjoint_type_specific_blocks": bool(disjoint),
    }
    return native_profile, expressed, design


def _ambient_profiles(
    rng: np.random.Generator, native_profile: np.ndarray, fractions: np.ndarray, concentration: float, B: int
) -> np.ndarray:
    """``(G, B)`` ambient profiles ``a_b ~ Dirichlet(concentration * G * base)`` around the floored mixture
    ``base`` of the type profiles weighted by the realised type ``fractions``; every entry > 0."""
    G = native_profile.shape[0]
    base = (1.0 - _AMBIENT_FLOOR) * (native_profile @ fractions) + _AMBIENT_FLOOR / G
    base /= base.sum()
    alpha = concentration * G * base
    ambient_profile = np.empty((G, B), dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    for b in range(B):
        g = rng.standard_gamma(alpha)  # Dirichlet draw via normalised Gamma variables
        a_b = np.maximum(g / g.sum(), tiny)  # guard against underflow so that every entry is > 0
        ambient_profile[:, b] = a_b / a_b.sum()
    return ambient_profile


def _draw_cells(rng, cell_type, batch, type_probs, expressed, scales, tables, cell_profile_sd_log, cells):
    """Dense native and ambient counts ``(len(cells), n_genes)`` of ``cells`` and their row totals."""
    native_scale, ambient_scale = scales
    m, G = cells.shape[0], tables[0][0].shape[0]
    nat = np.zeros((m, G), dtype=np.int32)
    nat_tot = np.zeros(m, dtype=np.int64)
    types = cell_type[cells]
    for t in np.unique(types):
        rows = np.flatnonzero(types == t)
        p = type_probs[t]
        if cell_profile_sd_log > 0.0:
            w = p[None, :] * np.exp(cell_profile_sd_log * rng.standard_normal((rows.shape[0], p.shape[0])))
            w /= w.sum(axis=1, keepdims=True)
            mu = native_scale[cells[rows], None] * w
        else:
            mu = native_scale[cells[rows], None] * p[None, :]
        x = rng.poisson(mu)
        nat[np.ix_(rows, expressed[t])] = x
        nat_tot[rows] = x.sum(axis=1)
    amb, amb_tot = _profile_counts(rng, ambient_scale[cells], batch[cells], tables, G)
    return nat, amb, nat_tot, amb_tot
