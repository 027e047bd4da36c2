r"""Seeded simulation of droplet scRNA-seq data with known ambient contamination.

The generator produces count matrices in which every droplet's observed counts are the sum of
*native* counts (RNA from the cell in the droplet) and *ambient* counts (free-floating RNA that was
captured alongside it), together with the ground truth needed to score an ambient-removal method.

Generative model
----------------
With :math:`K` cell types, :math:`B` batches, :math:`G` genes and cells :math:`i = 1, \dots, N`:

.. code-block:: text

    expressed set   S_t = H  ∪  U_t                     (H: housekeeping genes shared by all types,
                                                         U_t: genes specific to type t)
    native profile  rho_tg = w_tg / sum_h w_th,   w_tg = exp(z_tg) if g in S_t else 0,
                    z_tg ~ Normal(0, 1.25^2)   (housekeeping z shared across types, plus a small
                                               per-type Normal(0, 0.25^2) perturbation)
    type abundance  pi ~ Dirichlet(5 * 1_K),   t_i ~ Categorical(pi)
    ambient centre  base = (1 - f) * sum_t pihat_t rho_t + f / G,   f = 0.01
                    (pihat_t: realised fraction of cells of type t)
    ambient profile a_b ~ Dirichlet(ambient_concentration * G * base),   b = 1..B
    noise ratio     eps_i ~ Beta(m c, (1 - m) c),   m = noise_ratio_mean, c = noise_ratio_concentration
    library size    L_i = max(L_min, exp(Normal(log(mu_L) - s^2 / 2, s^2))),
                    mu_L = library_size_mean, s = library_size_sd_log, L_min = min(200, mu_L)
    native counts   n_ig ~ Poisson(L_i (1 - eps_i) rho_{t_i g})
    ambient counts  y_ig ~ Poisson(L_i eps_i a_{b_i g})
    observed counts x_ig = n_ig + y_ig

``E[sum_g x_ig] = L_i`` and ``E[sum_g y_ig] = eps_i L_i``. Because the Dirichlet parameter is scaled by
``G``, an average gene has Dirichlet parameter ``ambient_concentration`` whatever the number of genes,
so the relative batch-to-batch variation of a typical gene's ambient frequency is about
``1 / sqrt(ambient_concentration)``. The floor ``f`` gives every gene (including genes no cell type
expresses) a strictly positive ambient probability. Cells are assigned to batches in contiguous,
evenly sized blocks (as if the batches were concatenated); cell types are drawn independently of the
batch. Cells whose observed total is zero are re-drawn, so every cell has at least one count.

Optionally (``cell_profile_sd_log > 0``) each cell's native profile is perturbed multiplicatively,
``rho_ig ∝ rho_{t_i g} exp(sd * Normal(0, 1))`` on the expressed genes of its type and renormalised;
the exact zeros of the type's profile are kept.

Truth stored by :func:`simulate`
--------------------------------
``X``
    observed counts, CSR ``int32``, ``(n_cells, n_genes)``.
``layers["native"]``, ``layers["ambient"]``
    the two components, CSR ``int32``; ``native + ambient == X`` exactly.
``obs["noise_ratio"]``
    realised ambient fraction ``sum_g y_ig / sum_g x_ig``; ``obs["noise_ratio_parameter"]`` is
    ``eps_i``.
``obs["cell_type"]``, ``obs["batch"]``, ``obs["library_size"]``
    categorical type and batch labels and the expected library size ``L_i``.
``varm["true_ambient_profile"]``
    ``(n_genes, n_batches)``, columns ``a_b`` (each sums to one, all entries > 0).
``varm["true_native_profile"]``
    ``(n_genes, n_cell_types)``, columns ``rho_t`` (each sums to one, exact zeros off ``S_t``).
``uns["simulation"]``
    JSON-serialisable dictionary of every parameter, the seed and the category names.

Examples
--------
>>> from scar_jax.datasets import simulate, simulate_empty_droplets, raw_droplets
>>> adata = simulate(n_cells=500, n_genes=200, seed=1)
>>> empty = simulate_empty_droplets(adata, n_droplets=1000, seed=2)
>>> raw = raw_droplets(adata, empty)
>>> raw.shape
(1500, 200)

A low-contamination "barnyard" regime (species with disjoint genes, so that every count of a gene
the cell's species cannot express is known to be ambient) is made by :func:`simulate_species_mixture`;
its empty droplets come from the same :func:`simulate_empty_droplets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["raw_droplets", "simulate", "simulate_empty_droplets", "simulate_species_mixture"]

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


# --------------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# sampling helpers
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
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

    See the module docstring for the exact generative model.

    Parameters
    ----------
    n_cells
        Number of cell-containing droplets, ``>= 1``.
    n_genes
        Number of genes, ``>= 2``.
    n_cell_types
        Number of cell types, ``>= 1``. Type proportions are drawn from ``Dirichlet(5 * 1)``.
    n_batches
        Number of batches (channels), ``>= 1``. Each batch has its own ambient profile; cells are split
        into contiguous, evenly sized batch blocks.
    noise_ratio_mean
        Mean of the per-cell noise ratio ``eps_i ~ Beta``, in ``(0, 1)``.
    noise_ratio_concentration
        Concentration ``alpha + beta`` of the noise-ratio Beta distribution, ``> 0``. Larger values give
        less cell-to-cell variation of ``eps_i``.
    library_size_mean
        Mean expected library size ``E[L_i]`` (counts per cell), ``>= 1``.
    library_size_sd_log
        Standard deviation of ``log L_i``, ``>= 0``.
    expressed_fraction
        Fraction of genes expressed by each cell type, in ``(0, 1]``. Half of the expressed genes
        (rounded down) form a housekeeping block shared by all types; the rest are type specific
        (disjoint blocks when they fit in the remaining genes, otherwise random, possibly
        overlapping, subsets).
    ambient_concentration
        Per-gene Dirichlet concentration of the ambient profiles, ``> 0``: ``a_b ~ Dirichlet(
        ambient_concentration * n_genes * base)``. Larger values put the batch profiles closer to
        ``base``.
    seed
        Seed (``>= 0``); the generator is ``numpy.random.default_rng([0, seed])``. The same seed gives
        identical output.
    cell_profile_sd_log
        Keyword only. Log-sd of an optional per-cell multiplicative perturbation of the native
        profile (``0`` disables it, the default). When positive, the truth in
        ``varm["true_native_profile"]`` is the type-level profile, not the per-cell one.

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_genes)`` object with

        - ``X``: observed counts, ``scipy.sparse.csr_matrix`` of ``int32``, ``(n_cells, n_genes)``;
        - ``layers["native"]``, ``layers["ambient"]``: CSR ``int32`` components with
          ``native + ambient == X``;
        - ``obs["noise_ratio"]`` (float64): realised ambient fraction, ambient total / observed total;
        - ``obs["noise_ratio_parameter"]`` (float64): the drawn ``eps_i``;
        - ``obs["cell_type"]`` (categorical ``"type_0"``, ...), ``obs["batch"]`` (categorical
          ``"batch_0"``, ...), ``obs["library_size"]`` (float64, the expected library size ``L_i``);
        - ``obs_names`` ``"cell_00000"``, ...; ``var_names`` ``"gene_0000"``, ... (zero padded);
        - ``varm["true_ambient_profile"]``: float64 ``(n_genes, n_batches)``, columns sum to one;
        - ``varm["true_native_profile"]``: float64 ``(n_genes, n_cell_types)``, columns sum to one;
        - ``uns["simulation"]``: dict of all parameters (plain ``int``/``float``/``str`` and lists
          thereof), including ``seed``, ``batch_categories`` and ``cell_type_categories``.

    Raises
    ------
    ValueError
        If an argument is out of range; the message names the argument.
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    n_genes = _check_int("n_genes", n_genes, 2)
    n_cell_types = _check_int("n_cell_types", n_cell_types, 1)
    n_batches = _check_int("n_batches", n_batches, 1)
    noise_ratio_mean = _check_float("noise_ratio_mean", noise_ratio_mean, low=0.0, high=1.0)
    noise_ratio_concentration = _check_float("noise_ratio_concentration", noise_ratio_concentration, low=0.0)
    library_size_mean = _check_float("library_size_mean", library_size_mean, low=1.0, low_inclusive=True)
    library_size_sd_log = _check_float("library_size_sd_log", library_size_sd_log, low=0.0, low_inclusive=True)
    expressed_fraction = _check_float("expressed_fraction", expressed_fraction, low=0.0, high=1.0, high_inclusive=True)
    ambient_concentration = _check_float("ambient_concentration", ambient_concentration, low=0.0)
    seed = _check_int("seed", seed, 0)
    cell_profile_sd_log = _check_float("cell_profile_sd_log", cell_profile_sd_log, low=0.0, low_inclusive=True)

    rng = np.random.default_rng([_STREAM_CELLS, seed])
    G, K, B = n_genes, n_cell_types, n_batches

    # ---- native profiles: housekeeping block + type-specific blocks, log-normal frequencies ----
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

    # ---- cell types, batches ----
    type_proportions = rng.dirichlet(np.full(K, _TYPE_PROPORTION_CONCENTRATION))
    cell_type = rng.choice(K, size=n_cells, p=type_proportions)
    batch = _even_blocks(n_cells, B)
    realised_fractions = np.bincount(cell_type, minlength=K) / n_cells

    # ---- ambient profiles ----
    base = (1.0 - _AMBIENT_FLOOR) * (native_profile @ realised_fractions) + _AMBIENT_FLOOR / G
    base /= base.sum()
    alpha = ambient_concentration * G * base
    ambient_profile = np.empty((G, B), dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    for b in range(B):
        g = rng.standard_gamma(alpha)  # Dirichlet draw via normalised Gamma variables
        a_b = np.maximum(g / g.sum(), tiny)  # guard against underflow so that every entry is > 0
        ambient_profile[:, b] = a_b / a_b.sum()
    tables = [_alias_table(ambient_profile[:, b]) for b in range(B)]

    # ---- per-cell noise ratio and library size ----
    eps = rng.beta(
        noise_ratio_mean * noise_ratio_concentration,
        (1.0 - noise_ratio_mean) * noise_ratio_concentration,
        size=n_cells,
    )
    min_library = min(_MIN_LIBRARY_SIZE, library_size_mean)
    mu_log = math.log(library_size_mean) - 0.5 * library_size_sd_log**2
    library = np.maximum(rng.lognormal(mu_log, library_size_sd_log, size=n_cells), min_library)
    native_scale = library * (1.0 - eps)
    ambient_scale = library * eps
    type_probs = [native_profile[expressed[t], t] for t in range(K)]

    def draw(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Dense native and ambient counts ``(len(cells), n_genes)`` and their row totals."""
        m = cells.shape[0]
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

    # ---- counts, in row chunks ----
    observed, native_counts, ambient_counts, native_total, ambient_total = _draw_in_chunks(draw, n_cells, G)

    cell_type_names = [f"type_{t}" for t in range(K)]
    batch_names = [f"batch_{b}" for b in range(B)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, categories=cell_type_names),
            "batch": pd.Categorical.from_codes(batch, categories=batch_names),
            "noise_ratio": ambient_total / (native_total + ambient_total),
            "noise_ratio_parameter": eps.astype(np.float64),
            "library_size": library.astype(np.float64),
        },
        index=pd.Index(_names("cell", n_cells, 5)),
    )
    var = pd.DataFrame(index=pd.Index(_names("gene", G, 4)))
    params = {
        "generator": "scar_jax.datasets.simulate",
        "n_cells": n_cells,
        "n_genes": G,
        "n_cell_types": K,
        "n_batches": B,
        "noise_ratio_mean": noise_ratio_mean,
        "noise_ratio_concentration": noise_ratio_concentration,
        "library_size_mean": library_size_mean,
        "library_size_sd_log": library_size_sd_log,
        "expressed_fraction": expressed_fraction,
        "ambient_concentration": ambient_concentration,
        "seed": seed,
        "cell_profile_sd_log": cell_profile_sd_log,
        "n_expressed_genes_per_type": int(n_expr),
        "n_housekeeping_genes": int(n_hk),
        "disjoint_type_specific_blocks": bool(disjoint),
        "gene_log_sd": _GENE_LOG_SD,
        "housekeeping_type_log_sd": _HOUSEKEEPING_TYPE_LOG_SD,
        "type_proportion_concentration": _TYPE_PROPORTION_CONCENTRATION,
        "cell_type_proportions": [float(x) for x in type_proportions],
        "ambient_floor": _AMBIENT_FLOOR,
        "min_library_size": float(min_library),
        "cell_type_categories": cell_type_names,
        "batch_categories": batch_names,
    }
    return anndata.AnnData(
        X=observed,
        obs=obs,
        var=var,
        layers={"native": native_counts, "ambient": ambient_counts},
        varm={"true_ambient_profile": ambient_profile, "true_native_profile": native_profile},
        uns={"simulation": params},
    )


def simulate_empty_droplets(
    adata: anndata.AnnData,
    n_droplets: int = 5000,
    library_size_mean: float = 100.0,
    library_size_sd_log: float = 0.8,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate cell-free (empty) droplets matching a dataset made by :func:`simulate`.

    Each droplet ``j`` in batch ``b_j`` receives pure ambient counts
    ``y_jg ~ Poisson(L_j a_{b_j g})`` with ``L_j ~ LogNormal(log(library_size_mean) - s^2 / 2, s^2)``
    and ``a_b = adata.varm["true_ambient_profile"][:, b]``. Droplets are split into contiguous,
    evenly sized batch blocks. No floor is applied: droplets with zero counts can occur (as in a real
    raw feature-barcode matrix) and are kept.

    Parameters
    ----------
    adata
        Output of :func:`simulate` (needs ``varm["true_ambient_profile"]`` and ``uns["simulation"]``).
    n_droplets
        Number of empty droplets, ``>= 1``.
    library_size_mean
        Mean expected counts per empty droplet, ``> 0``.
    library_size_sd_log
        Standard deviation of ``log L_j``, ``>= 0``.
    seed
        Seed (``>= 0``); the generator is ``numpy.random.default_rng([1, seed])``, a stream independent
        of :func:`simulate`'s for the same seed.

    Returns
    -------
    anndata.AnnData
        ``(n_droplets, n_genes)`` object with ``X`` (CSR ``int32``), ``obs["batch"]`` (categorical with
        the same categories as ``adata``), ``obs["library_size"]`` (float64 ``L_j``), ``obs_names``
        ``"empty_00000"``, ..., the ``var_names`` of ``adata`` and ``uns["simulation"]`` (the
        parameters, JSON-serialisable).

    Raises
    ------
    ValueError
        If ``adata`` was not made by :func:`simulate` or an argument is out of range.
    """
    if not isinstance(adata, anndata.AnnData):
        raise ValueError(f"adata must be an AnnData made by simulate(), got {type(adata).__name__}")
    if "true_ambient_profile" not in adata.varm:
        raise ValueError("adata has no varm['true_ambient_profile']; it was not made by scar_jax.datasets.simulate")
    n_droplets = _check_int("n_droplets", n_droplets, 1)
    library_size_mean = _check_float("library_size_mean", library_size_mean, low=0.0)
    library_size_sd_log = _check_float("library_size_sd_log", library_size_sd_log, low=0.0, low_inclusive=True)
    seed = _check_int("seed", seed, 0)

    profile = np.asarray(adata.varm["true_ambient_profile"], dtype=np.float64)
    if profile.ndim == 1:
        profile = profile[:, None]
    G, B = profile.shape
    sim = adata.uns.get("simulation", {})
    if "batch_categories" in sim:
        batch_names = [str(x) for x in sim["batch_categories"]]
    elif "batch" in adata.obs and isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype):
        batch_names = [str(x) for x in adata.obs["batch"].cat.categories]
    else:
        batch_names = [f"batch_{b}" for b in range(B)]
    if len(batch_names) != B:
        raise ValueError(f"adata.varm['true_ambient_profile'] has {B} columns but there are {len(batch_names)} batches")
    if np.any(profile < 0) or np.any(profile.sum(axis=0) <= 0):
        raise ValueError("adata.varm['true_ambient_profile'] must be non-negative with positive columns")
    profile = profile / profile.sum(axis=0, keepdims=True)

    rng = np.random.default_rng([_STREAM_EMPTY, seed])
    batch = _even_blocks(n_droplets, B)
    mu_log = math.log(library_size_mean) - 0.5 * library_size_sd_log**2
    library = rng.lognormal(mu_log, library_size_sd_log, size=n_droplets)
    tables = [_alias_table(profile[:, b]) for b in range(B)]

    builder = _CSRBuilder(G)
    step = _chunk_rows(G)
    for start in range(0, n_droplets, step):
        rows = slice(start, min(start + step, n_droplets))
        builder.add(_profile_counts(rng, library[rows], batch[rows], tables, G)[0])

    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, categories=batch_names),
            "library_size": library,
        },
        index=pd.Index(_names("empty", n_droplets, 5)),
    )
    params = {
        "generator": "scar_jax.datasets.simulate_empty_droplets",
        "n_droplets": n_droplets,
        "library_size_mean": library_size_mean,
        "library_size_sd_log": library_size_sd_log,
        "seed": seed,
        "batch_categories": batch_names,
    }
    return anndata.AnnData(
        X=builder.build(),
        obs=obs,
        var=pd.DataFrame(index=adata.var_names.copy()),
        uns={"simulation": params},
    )


def _largest_remainder(n: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` closest to ``n * proportions`` (largest-remainder rounding)."""
    exact = n * proportions
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - int(counts.sum())]] += 1
    return counts


def simulate_species_mixture(
    n_cells: int = 300,
    n_genes: int = 20000,
    species_proportions: tuple[float, ...] = (0.64, 0.36),
    n_types_per_species: int = 2,
    noise_ratio_range: tuple[float, float] = (0.002, 0.02),
    library_size_mean: float = 5000.0,
    library_size_sd_log: float = 0.5,
    gene_log_sd: float = 2.0,
    type_log_sd: float = 0.5,
    seed: int = 0,
    *,
    cell_profile_sd_log: float = 0.0,
) -> anndata.AnnData:
    r"""Simulate a low-contamination mixture of species whose expressed genes are disjoint.

    The regime of a "barnyard" experiment (e.g. human and mouse cells on one chip): each cell belongs
    to one of ``S = len(species_proportions)`` species, and the genes are split into ``S`` disjoint
    blocks, one per species. A cell's native RNA only ever contains genes of its own species' block,
    so **every count of a gene outside the block is ambient**, which lets a denoiser be scored on real
    expression kept and on contamination removed without any modelling assumption. Few cells, many
    genes and a noise ratio of a fraction of a percent to a few percent are the defaults.

    Generative model
    ----------------
    .. code-block:: text

        gene blocks     B_s = genes j with floor(j S / G) = s           (contiguous, sizes differ by <= 1)
        species sizes   n_s = largest-remainder rounding of n_cells * species_proportions_s (ties
                        to the first species; e.g. exactly 192 / 108 of 300 cells), order shuffled
        types           T = n_types_per_species types per species, type of a cell uniform within its species
        native profile  rho_tg = w_tg / sum_h w_th,  w_tg = exp(z_g + d_tg) if g in B_{s(t)} else 0,
                        z_g ~ Normal(0, gene_log_sd^2)   (species level, heavy tailed),
                        d_tg ~ Normal(0, type_log_sd^2)  (type level)
        ambient profile a = sum_t pihat_t rho_t,  pihat_t = realised fraction of cells of type t
                        (a mixture of the cells' own profiles; species weights = n_s / n_cells)
        noise ratio     eps_i = exp(Uniform(log lo, log hi)),  (lo, hi) = noise_ratio_range
        library size    L_i = max(L_min, exp(Normal(log(mu_L) - s^2 / 2, s^2))),  L_min = min(200, mu_L)
        native counts   n_ig ~ Poisson(L_i (1 - eps_i) rho_{t_i g})       (0 off B_{s(i)})
        ambient counts  y_ig ~ Poisson(L_i eps_i a_g)
        observed counts x_ig = n_ig + y_ig

    Every gene of a block is expressed by its species (``rho_tg > 0`` exactly on ``B_{s(t)}``), and
    every gene has a positive ambient frequency. Cells whose observed total is zero are re-drawn.
    With ``cell_profile_sd_log > 0`` each cell's profile is perturbed as in :func:`simulate`,
    ``rho_ig ∝ rho_{t_i g} exp(cell_profile_sd_log * Normal(0, 1))`` on its block (the zeros off the
    block are kept); ``varm["true_native_profile"]`` is then the type-level profile.

    The output follows :func:`simulate`, so :func:`simulate_empty_droplets`, :func:`raw_droplets`,
    :func:`scar_jax.metrics.oracle_native_share` and :func:`scar_jax.metrics.oracle_split` apply
    unchanged (there is one batch).

    Parameters
    ----------
    n_cells
        Number of cells, ``>= 1``.
    n_genes
        Number of genes, ``>= len(species_proportions)``.
    species_proportions
        Fractions of cells per species (at least two, each ``> 0``; normalised to sum to one). The
        default is a 64/36 mixture of two species.
    n_types_per_species
        Cell types (lineages) per species, ``>= 1``, named ``"<species>_type_<k>"``.
    noise_ratio_range
        ``(lo, hi)`` with ``0 < lo <= hi < 1``: ``eps_i`` is log-uniform on it (the default 0.2%-2% has
        mean ``(hi - lo) / log(hi / lo) = 0.78%``).
    library_size_mean, library_size_sd_log
        Mean expected counts per cell (``>= 1``) and the sd of their logarithm (``>= 0``).
    gene_log_sd
        Log-sd of the species-level gene frequencies (``>= 0``); 2 gives a heavy tail in which the top
        genes take percents of a cell's counts and most genes are rarely detected.
    type_log_sd
        Log-sd of the type-level perturbation of those frequencies (``>= 0``).
    seed
        Seed (``>= 0``); the generator is ``numpy.random.default_rng([2, seed])``, a stream independent
        of :func:`simulate` and :func:`simulate_empty_droplets` for the same seed.
    cell_profile_sd_log
        Keyword only. Optional per-cell log-normal perturbation of the native profile (default 0).

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_genes)`` object with the fields of :func:`simulate` (``X``, ``layers["native"]``,
        ``layers["ambient"]``, ``obs["noise_ratio"]``, ``obs["noise_ratio_parameter"]``,
        ``obs["cell_type"]``, ``obs["batch"]`` (one category ``"batch_0"``), ``obs["library_size"]``,
        ``varm["true_ambient_profile"]`` ``(n_genes, 1)``, ``varm["true_native_profile"]``
        ``(n_genes, n_species * n_types_per_species)``, ``uns["simulation"]``), plus

        - ``obs["species"]`` and ``var["species"]``: categorical ``"species_0"``, ... (the cell's
          species; the species whose block holds the gene). A count of gene ``g`` in cell ``i`` is
          native-possible iff ``var["species"][g] == obs["species"][i]``, otherwise it is ambient.

    Raises
    ------
    ValueError
        If an argument is out of range; the message names the argument.

    Examples
    --------
    >>> from scar_jax.datasets import simulate_species_mixture, simulate_empty_droplets
    >>> adata = simulate_species_mixture(n_cells=100, n_genes=2000, seed=0)
    >>> adata.obs["species"].value_counts().tolist()
    [64, 36]
    >>> empty = simulate_empty_droplets(adata, n_droplets=500, seed=1)
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    try:
        proportions = np.asarray(species_proportions, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"species_proportions must be a sequence of numbers, got {species_proportions!r}") from None
    if proportions.ndim != 1 or proportions.shape[0] < 2:
        raise ValueError(f"species_proportions must list at least two species, got {species_proportions!r}")
    for k, value in enumerate(proportions):
        _check_float(f"species_proportions[{k}]", float(value), low=0.0)
    proportions = proportions / proportions.sum()
    S = int(proportions.shape[0])
    n_genes = _check_int("n_genes", n_genes, S)
    n_types_per_species = _check_int("n_types_per_species", n_types_per_species, 1)
    if not isinstance(noise_ratio_range, tuple | list) or len(noise_ratio_range) != 2:
        raise ValueError(f"noise_ratio_range must be a pair (lo, hi), got {noise_ratio_range!r}")
    lo = _check_float("noise_ratio_range[0]", noise_ratio_range[0], low=0.0, high=1.0)
    hi = _check_float("noise_ratio_range[1]", noise_ratio_range[1], low=lo, high=1.0, low_inclusive=True)
    library_size_mean = _check_float("library_size_mean", library_size_mean, low=1.0, low_inclusive=True)
    library_size_sd_log = _check_float("library_size_sd_log", library_size_sd_log, low=0.0, low_inclusive=True)
    gene_log_sd = _check_float("gene_log_sd", gene_log_sd, low=0.0, low_inclusive=True)
    type_log_sd = _check_float("type_log_sd", type_log_sd, low=0.0, low_inclusive=True)
    seed = _check_int("seed", seed, 0)
    cell_profile_sd_log = _check_float("cell_profile_sd_log", cell_profile_sd_log, low=0.0, low_inclusive=True)

    rng = np.random.default_rng([_STREAM_SPECIES, seed])
    G, P = n_genes, n_types_per_species
    K = S * P

    # ---- gene blocks and native profiles ----
    gene_species = _even_blocks(G, S)
    blocks = [np.flatnonzero(gene_species == s) for s in range(S)]
    native_profile = np.zeros((G, K), dtype=np.float64)
    for s in range(S):
        z = rng.normal(0.0, gene_log_sd, size=blocks[s].shape[0])
        for k in range(P):
            log_w = z + rng.normal(0.0, type_log_sd, size=z.shape[0])
            w = np.exp(log_w - log_w.max())
            native_profile[blocks[s], s * P + k] = w / w.sum()

    # ---- species (exact counts, shuffled) and types ----
    species_counts = _largest_remainder(n_cells, proportions)
    species = rng.permutation(np.repeat(np.arange(S), species_counts))
    cell_type = species * P + rng.integers(0, P, size=n_cells)
    type_fractions = np.bincount(cell_type, minlength=K) / n_cells

    # ---- ambient profile: the mixture of the cells' own profiles ----
    ambient = native_profile @ type_fractions
    ambient /= ambient.sum()
    ambient_profile = ambient[:, None]
    ambient_table = [_alias_table(ambient)]
    native_tables = [_alias_table(native_profile[:, t]) for t in range(K)]

    # ---- noise ratio and library size ----
    eps = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n_cells))
    min_library = min(_MIN_LIBRARY_SIZE, library_size_mean)
    mu_log = math.log(library_size_mean) - 0.5 * library_size_sd_log**2
    library = np.maximum(rng.lognormal(mu_log, library_size_sd_log, size=n_cells), min_library)
    native_scale = library * (1.0 - eps)
    ambient_scale = library * eps
    zero_batch = np.zeros(n_cells, dtype=np.int64)

    def draw(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if cell_profile_sd_log > 0.0:
            nat = np.zeros((cells.shape[0], G), dtype=np.int32)
            for t in np.unique(cell_type[cells]):
                rows = np.flatnonzero(cell_type[cells] == t)
                genes = blocks[t // P]
                p = native_profile[genes, t]
                w = p[None, :] * np.exp(cell_profile_sd_log * rng.standard_normal((rows.shape[0], genes.shape[0])))
                w /= w.sum(axis=1, keepdims=True)
                nat[np.ix_(rows, genes)] = rng.poisson(native_scale[cells[rows], None] * w)
            nat_tot = nat.sum(axis=1, dtype=np.int64)
        else:
            nat, nat_tot = _profile_counts(rng, native_scale[cells], cell_type[cells], native_tables, G)
        amb, amb_tot = _profile_counts(rng, ambient_scale[cells], zero_batch[cells], ambient_table, G)
        return nat, amb, nat_tot, amb_tot

    observed, native_counts, ambient_counts, native_total, ambient_total = _draw_in_chunks(draw, n_cells, G)

    species_names = [f"species_{s}" for s in range(S)]
    cell_type_names = [f"species_{s}_type_{k}" for s in range(S) for k in range(P)]
    obs = pd.DataFrame(
        {
            "species": pd.Categorical.from_codes(species, categories=species_names),
            "cell_type": pd.Categorical.from_codes(cell_type, categories=cell_type_names),
            "batch": pd.Categorical.from_codes(zero_batch, categories=["batch_0"]),
            "noise_ratio": ambient_total / (native_total + ambient_total),
            "noise_ratio_parameter": eps.astype(np.float64),
            "library_size": library.astype(np.float64),
        },
        index=pd.Index(_names("cell", n_cells, 5)),
    )
    var = pd.DataFrame(
        {"species": pd.Categorical.from_codes(gene_species, categories=species_names)},
        index=pd.Index(_names("gene", G, 4)),
    )
    params = {
        "generator": "scar_jax.datasets.simulate_species_mixture",
        "n_cells": n_cells,
        "n_genes": G,
        "species_proportions": [float(x) for x in proportions],
        "n_types_per_species": P,
        "noise_ratio_range": [lo, hi],
        "library_size_mean": library_size_mean,
        "library_size_sd_log": library_size_sd_log,
        "gene_log_sd": gene_log_sd,
        "type_log_sd": type_log_sd,
        "seed": seed,
        "cell_profile_sd_log": cell_profile_sd_log,
        "species_cell_counts": [int(x) for x in species_counts],
        "min_library_size": float(min_library),
        "species_categories": species_names,
        "cell_type_categories": cell_type_names,
        "batch_categories": ["batch_0"],
    }
    return anndata.AnnData(
        X=observed,
        obs=obs,
        var=var,
        layers={"native": native_counts, "ambient": ambient_counts},
        varm={"true_ambient_profile": ambient_profile, "true_native_profile": native_profile},
        uns={"simulation": params},
    )


def raw_droplets(adata: anndata.AnnData, empty: anndata.AnnData) -> anndata.AnnData:
    """Concatenate cells and empty droplets into a raw (unfiltered) droplet matrix.

    Mimics a 10x Genomics ``raw_feature_bc_matrix``: all barcodes, cells first, counts only.

    Parameters
    ----------
    adata
        Cell-containing droplets, ``(n_cells, n_genes)``, e.g. from :func:`simulate`.
    empty
        Empty droplets, ``(n_droplets, n_genes)``, e.g. from :func:`simulate_empty_droplets`; must have
        the same ``var_names`` as ``adata``.

    Returns
    -------
    anndata.AnnData
        ``(n_cells + n_droplets, n_genes)`` object with ``X`` (CSR ``int32``, observed counts only),
        ``obs["is_cell"]`` (bool, ``True`` for the first ``n_cells`` rows) and ``obs["batch"]``
        (categorical; the categories of ``adata`` followed by any new ones of ``empty``).

    Raises
    ------
    ValueError
        If the gene names differ, the droplet names overlap or ``obs["batch"]`` is missing.
    """
    for name, obj in (("adata", adata), ("empty", empty)):
        if not isinstance(obj, anndata.AnnData):
            raise ValueError(f"{name} must be an AnnData, got {type(obj).__name__}")
        if "batch" not in obj.obs:
            raise ValueError(f"{name}.obs has no 'batch' column")
    if not adata.var_names.equals(empty.var_names):
        raise ValueError("adata and empty must have identical var_names")
    obs_names = adata.obs_names.append(empty.obs_names)
    if not obs_names.is_unique:
        raise ValueError("adata and empty share droplet names (obs_names)")

    def as_csr(x: object) -> sp.csr_matrix:
        m = sp.csr_matrix(x)
        return m.astype(np.int32) if m.dtype != np.int32 else m

    X = sp.vstack([as_csr(adata.X), as_csr(empty.X)], format="csr").astype(np.int32)
    X.sort_indices()
    cell_batch = adata.obs["batch"].astype(str)
    empty_batch = empty.obs["batch"].astype(str)
    if isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype):
        categories = [str(c) for c in adata.obs["batch"].cat.categories]
    else:
        categories = list(pd.unique(cell_batch))
    categories += [c for c in pd.unique(empty_batch) if c not in categories]
    obs = pd.DataFrame(
        {
            "is_cell": np.concatenate([np.ones(adata.n_obs, bool), np.zeros(empty.n_obs, bool)]),
            "batch": pd.Categorical(
                np.concatenate([cell_batch.to_numpy(), empty_batch.to_numpy()]), categories=categories
            ),
        },
        index=obs_names,
    )
    return anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
