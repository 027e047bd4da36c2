"""Shared pieces of the simulators: argument checks, samplers, chunked CSR assembly and the AnnData record."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

# Fixed constants of the generative model (recorded in ``uns["simulation"]``).
_GENE_LOG_SD = 1.25  # log-sd of the per-gene relative frequencies (heavy-tailed profiles)
_HOUSEKEEPING_TYPE_LOG_SD = 0.25  # per-type perturbation of the shared housekeeping frequencies
_TYPE_PROPORTION_CONCENTRATION = 5.0  # pi ~ Dirichlet(5 * 1_K)
_AMBIENT_FLOOR = 0.01  # fraction of the ambient centre spread uniformly over all genes
_MIN_LIBRARY_SIZE = 200.0  # lower bound of L_i (or library_size_mean, if smaller)
_MAX_REDRAWS = 1000
_CHUNK_ELEMENTS = 4_000_000  # rows per chunk = _CHUNK_ELEMENTS // n_genes (bounded dense work arrays)

# Independent random streams for the two generators, so that ``simulate(seed=s)`` and
# ``simulate_empty_droplets(seed=s)`` do not share random numbers.
_STREAM_CELLS = 0
_STREAM_EMPTY = 1
_STREAM_SPECIES = 2


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (v == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}, got {v}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {op} {high}, got {v}")
    return v


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table for O(1) sampling from the discrete distribution ``p``.

    Parameters
    ----------
    p
        Probabilities, shape ``(n,)``, non-negative, summing to one.

    Returns
    -------
    prob, alias
        Arrays of shape ``(n,)``: draw ``j`` uniformly, keep it with probability ``prob[j]``,
        otherwise return ``alias[j]``.
    """
    n = p.shape[0]
    q = np.asarray(p, dtype=np.float64) * (n / p.sum())
    prob = np.ones(n, dtype=np.float64)
    alias = np.arange(n, dtype=np.int64)
    small = [int(j) for j in np.flatnonzero(q < 1.0)]
    large = [int(j) for j in np.flatnonzero(q >= 1.0)]
    q_list = q.tolist()
    while small and large:
        s = small.pop()
        g = large.pop()
        prob[s] = q_list[s]
        alias[s] = g
        q_list[g] = q_list[g] + q_list[s] - 1.0
        (small if q_list[g] < 1.0 else large).append(g)
    # Whatever is left has q == 1 up to rounding: prob = 1, alias = self (already set).
    return prob, alias


def _sample_genes(rng: np.random.Generator, n: int, table: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Draw ``n`` gene indices i.i.d. from the distribution encoded by an alias ``table``."""
    prob, alias = table
    u = rng.random(n) * prob.shape[0]
    idx = u.astype(np.int64)
    np.minimum(idx, prob.shape[0] - 1, out=idx)
    return np.where(u - idx < prob[idx], idx, alias[idx])


def _profile_counts(
    rng: np.random.Generator,
    rates: np.ndarray,
    groups: np.ndarray,
    tables: list[tuple[np.ndarray, np.ndarray]],
    n_genes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Poisson counts ``y_ig ~ Poisson(rates_i * a_{groups_i, g})`` for ``m`` rows.

    Uses the exact Poisson-multinomial decomposition: ``N_i ~ Poisson(rates_i)`` then ``N_i`` genes
    drawn from ``a_{groups_i}``, which costs O(total counts) rather than O(m * n_genes) draws.

    Returns
    -------
    counts, totals
        Dense ``int32`` counts of shape ``(m, n_genes)`` and the row totals ``N_i``, shape ``(m,)``.
    """
    m = rates.shape[0]
    totals = rng.poisson(rates)
    flat = np.empty(int(totals.sum()), dtype=np.int64)
    pos = 0
    for b in np.unique(groups):
        rows = np.flatnonzero(groups == b)
        nb = totals[rows]
        k = int(nb.sum())
        if k == 0:
            continue
        flat[pos : pos + k] = np.repeat(rows * n_genes, nb) + _sample_genes(rng, k, tables[int(b)])
        pos += k
    counts = np.bincount(flat, minlength=m * n_genes).astype(np.int32).reshape(m, n_genes)
    return counts, totals


class _CSRBuilder:
    """Accumulates dense row chunks into a CSR matrix without keeping the dense chunks."""

    def __init__(self, n_cols: int) -> None:
        self.n_cols = n_cols
        self.data: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        self.row_nnz: list[np.ndarray] = []

    def add(self, dense: np.ndarray) -> None:
        flat = np.flatnonzero(dense)
        self.data.append(dense.ravel()[flat].astype(np.int32, copy=False))
        if dense.size <= np.iinfo(np.int32).max:
            flat = flat.astype(np.int32)
        self.indices.append((flat % self.n_cols).astype(np.int32, copy=False))
        row_starts = np.searchsorted(flat, np.arange(dense.shape[0] + 1, dtype=flat.dtype) * self.n_cols)
        self.row_nnz.append(np.diff(row_starts))

    def build(self) -> sp.csr_matrix:
        n_rows = sum(r.shape[0] for r in self.row_nnz)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        if n_rows:
            np.cumsum(np.concatenate(self.row_nnz), out=indptr[1:])
        # Concatenate and release the pieces one array at a time to bound peak memory.
        data = np.concatenate(self.data) if self.data else np.zeros(0, np.int32)
        self.data = []
        indices = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int32)
        self.indices = []
        if indptr[-1] <= np.iinfo(np.int32).max:
            indptr = indptr.astype(np.int32)
        else:  # pragma: no cover - only for > 2**31 stored entries
            indices = indices.astype(np.int64)
        mat = sp.csr_matrix((data, indices, indptr), shape=(n_rows, self.n_cols))
        mat.has_sorted_indices = True
        return mat


def _chunk_rows(n_genes: int) -> int:
    return max(1, _CHUNK_ELEMENTS // n_genes)


def _names(prefix: str, n: int, min_width: int) -> list[str]:
    width = max(min_width, len(str(max(n - 1, 0))))
    return [f"{prefix}_{i:0{width}d}" for i in range(n)]


def _even_blocks(n: int, n_blocks: int) -> np.ndarray:
    """Codes ``0..n_blocks-1`` for ``n`` items in contiguous blocks whose sizes differ by at most one."""
    return (np.arange(n, dtype=np.int64) * n_blocks // max(n, 1)).astype(np.int64)


def _draw_in_chunks(
    draw: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], n_cells: int, n_genes: int
) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix, np.ndarray, np.ndarray]:
    """Observed, native and ambient CSR counts and per-cell native/ambient totals, drawn in row chunks.

    ``draw(cells)`` returns dense native and ambient counts of those cells and their row totals; cells
    with no count at all are drawn again (at most ``_MAX_REDRAWS`` times), so every cell has a count.
    """
    b_obs, b_nat, b_amb = _CSRBuilder(n_genes), _CSRBuilder(n_genes), _CSRBuilder(n_genes)
    native_total = np.empty(n_cells, dtype=np.int64)
    ambient_total = np.empty(n_cells, dtype=np.int64)
    step = _chunk_rows(n_genes)
    for start in range(0, n_cells, step):
        cells = np.arange(start, min(start + step, n_cells))
        nat, amb, nat_tot, amb_tot = draw(cells)
        for _ in range(_MAX_REDRAWS):
            empty_rows = np.flatnonzero(nat_tot + amb_tot == 0)
            if empty_rows.size == 0:
                break
            nat[empty_rows], amb[empty_rows], nat_tot[empty_rows], amb_tot[empty_rows] = draw(cells[empty_rows])
        else:  # pragma: no cover - probability < exp(-_MAX_REDRAWS)
            raise RuntimeError("could not draw a non-empty cell; increase library_size_mean")
        native_total[cells] = nat_tot
        ambient_total[cells] = amb_tot
        b_nat.add(nat)
        b_amb.add(amb)
        nat += amb
        b_obs.add(nat)
    return b_obs.build(), b_nat.build(), b_amb.build(), native_total, ambient_total


def _largest_remainder(n: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` closest to ``n * proportions`` (largest-remainder rounding)."""
    exact = n * proportions
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - int(counts.sum())]] += 1
    return counts


def _pair(name: str, value, high: float | None) -> tuple[float, float]:
    """A pair ``(lo, hi)`` with ``0 < lo <= hi`` (and ``< high`` when given)."""
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}")
    lo = _check_float(f"{name}[0]", value[0], low=0.0, high=high)
    return lo, _check_float(f"{name}[1]", value[1], low=lo, high=high, low_inclusive=True)


def _check_proportions(species_proportions) -> np.ndarray:
    """Fractions of cells per species: at least two, each ``> 0``, normalised to sum to one."""
    try:
        proportions = np.asarray(species_proportions, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"species_proportions must be a sequence of numbers, got {species_proportions!r}") from None
    if proportions.ndim != 1 or proportions.shape[0] < 2:
        raise ValueError(f"species_proportions must list at least two species, got {species_proportions!r}")
    for k, value in enumerate(proportions):
        _check_float(f"species_proportions[{k}]", float(value), low=0.0)
    return proportions / proportions.sum()


def _library_sizes(
    rng: np.random.Generator, n_cells: int, library_size_mean: float, library_size_sd_log: float
) -> tuple[np.ndarray, float]:
    """``L_i = max(L_min, exp(Normal(log(mu_L) - s^2 / 2, s^2)))``, ``L_min = min(200, mu_L)``; and ``L_min``."""
    min_library = min(_MIN_LIBRARY_SIZE, library_size_mean)
    mu_log = math.log(library_size_mean) - 0.5 * library_size_sd_log**2
    return np.maximum(rng.lognormal(mu_log, library_size_sd_log, size=n_cells), min_library), min_library


def _block_profiles(rng: np.random.Generator, blocks, n_genes: int, n_types: int, gene_log_sd, type_log_sd):
    """``(G, S * n_types)`` type profiles, each on its species' gene block, heavy tailed (log-normal)."""
    profile = np.zeros((n_genes, len(blocks) * n_types), np.float64)
    for s, genes in enumerate(blocks):
        z = rng.normal(0.0, gene_log_sd, size=genes.shape[0])
        for k in range(n_types):
            log_w = z + rng.normal(0.0, type_log_sd, size=z.shape[0])
            w = np.exp(log_w - log_w.max())
            profile[genes, s * n_types + k] = w / w.sum()
    return profile


def _species_labels(species: np.ndarray, cell_type: np.ndarray, gene_species: np.ndarray, n_species: int, n_types: int):
    """The species columns of a species simulation: ``obs`` labels (species, cell type, batch), ``var`` columns
    and the category names as recorded in ``uns["simulation"]``."""
    species_names = [f"species_{s}" for s in range(n_species)]
    type_names = [f"species_{s}_type_{k}" for s in range(n_species) for k in range(n_types)]
    labels = {
        "species": pd.Categorical.from_codes(species, categories=species_names),
        "cell_type": pd.Categorical.from_codes(cell_type, categories=type_names),
        "batch": pd.Categorical.from_codes(np.zeros(species.shape[0], np.int64), categories=["batch_0"]),
    }
    var = {"species": pd.Categorical.from_codes(gene_species, categories=species_names)}
    categories = {
        "species_categories": species_names,
        "cell_type_categories": type_names,
        "batch_categories": ["batch_0"],
    }
    return labels, var, categories


def _species_params(generator: str, n_cells: int, n_genes: int, proportions: np.ndarray) -> dict:
    """The first entries of a species simulation's ``uns["simulation"]``."""
    species_proportions = [float(x) for x in proportions]
    return {"generator": generator, "n_cells": n_cells, "n_genes": n_genes, "species_proportions": species_proportions}


def _record(
    counts: tuple, labels: dict, eps: np.ndarray, library: np.ndarray, var: dict, params: dict, varm: dict
) -> anndata.AnnData:
    """The AnnData of a simulation: ``counts = (observed, native, ambient, native_total, ambient_total)`` from
    :func:`_draw_in_chunks`, ``obs`` = the ``labels`` then the realised noise ratio, ``eps`` and the library,
    ``var`` columns, ``varm`` truth and ``uns["simulation"] = params``; names ``cell_00000``, ``gene_0000``."""
    observed, native_counts, ambient_counts, native_total, ambient_total = counts
    n_cells, n_genes = observed.shape
    obs = pd.DataFrame(
        {
            **labels,
            "noise_ratio": ambient_total / np.maximum(native_total + ambient_total, 1),
            "noise_ratio_parameter": eps.astype(np.float64),
            "library_size": library.astype(np.float64),
        },
        index=pd.Index(_names("cell", n_cells, 5)),
    )
    return anndata.AnnData(
        X=observed,
        obs=obs,
        var=pd.DataFrame(var or None, index=pd.Index(_names("gene", n_genes, 4))),
        layers={"native": native_counts, "ambient": ambient_counts},
        varm=varm,
        uns={"simulation": params},
    )
