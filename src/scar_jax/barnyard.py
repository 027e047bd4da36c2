r"""A barnyard simulator that sets the traps of real low-contamination droplets.

:func:`scar_jax.datasets.simulate_species_mixture` draws Poisson expression around type profiles, and its
benchmarks estimate the ambient profile from 20,000 deep empty droplets, so every gene gets a positive
ambient frequency. Real data differ in three ways that matter to a denoiser, and :func:`simulate_barnyard`
reproduces each of them:

* **sporadic, overdispersed expression**: a lowly expressed gene is seen in a few cells of its type and
  not in their neighbours (negative binomial with a small shape), so a cell has counts on genes its
  neighbourhood lacks;
* **species of unequal depth** (one ``depth_ratio`` times deeper), so a pooled noise-ratio estimate is
  biased towards the deeper species' counts;
* **a shallow ambient sample**: the cell-free droplets of a real run hold a few UMIs each, so an ambient
  profile estimated from them has exact zeros on the rare genes, and those genes carry real expression.

Generative model
----------------
.. code-block:: text

    genes, species, types, native profile rho_t   as simulate_species_mixture (disjoint gene blocks)
    library size    L_i = max(200, exp(Normal(log(mu_s) - s^2 / 2, s^2))),  mu_s = library_size_mean for
                    species 0, depth_ratio * library_size_mean for species 1 (and so on, by powers)
    noise ratio     eps_i = exp(Uniform(log lo, log hi))
    native mean     m_ig = L_i (1 - eps_i) rho_{t_i g}
    native shape    r_tg = r_lo + (r_hi - r_lo) c_tg / (c_tg + 1),  c_tg = mu_{s(t)} rho_tg
                    (the mean count at the species' typical depth: rare genes get r_lo, sporadic;
                    abundant genes r_hi, close to Poisson)
    native counts   n_ig ~ Poisson(lambda_ig),  lambda_ig ~ Gamma(r_tg, rate r_tg / m_ig)   (NB, mean m_ig)
    ambient profile a = sum_t w_t rho_t,  w_t ∝ (cells of type t) x (mean library of type t)
                    (lysed RNA in proportion to each type's RNA content)
    ambient counts  y_ig ~ Poisson(L_i eps_i a_g)
    observed counts x_ig = n_ig + y_ig

The output has the fields of :func:`scar_jax.datasets.simulate_species_mixture` (``obs["species"]``,
``var["species"]``, ``layers["native"]``, ``layers["ambient"]``, ``varm["true_ambient_profile"]``, ...),
so :func:`scar_jax.metrics.species_mixture_metrics` scores it, and
:func:`scar_jax.datasets.simulate_empty_droplets` draws its cell-free droplets.
"""

from __future__ import annotations

import functools
import math

import anndata
import numpy as np

from .datasets import _common as sim
from .datasets import raw_droplets, simulate_empty_droplets

__all__ = ["barnyard_raw_droplets", "simulate_barnyard"]

_STREAM_BARNYARD = 3  # a stream of its own: simulate_barnyard(seed=s) shares no numbers with the other generators
_MIN_LIBRARY_SIZE = 200.0


# long: the parameter reference (about 35 lines of docstring); the body (55 lines) is mostly checks and parameters
def simulate_barnyard(
    n_cells: int = 120,
    n_genes: int = 24000,
    species_proportions: tuple[float, ...] = (0.5, 0.5),
    depth_ratio: float = 1.6,
    library_size_mean: float = 4000.0,
    library_size_sd_log: float = 0.5,
    noise_ratio_range: tuple[float, float] = (0.003, 0.01),
    n_types_per_species: int = 2,
    gene_log_sd: float = 2.5,
    type_log_sd: float = 0.5,
    shape_range: tuple[float, float] = (0.1, 5.0),
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate a real-like barnyard at low contamination (module docstring: the model and its traps).

    Parameters
    ----------
    n_cells, n_genes
        Cells (``>= 1``) and genes (``>= len(species_proportions)``); the defaults are the size of a small
        real barnyard (100-150 cells, 20,000-30,000 genes).
    species_proportions
        Fractions of cells per species (at least two, each ``> 0``, normalised).
    depth_ratio
        Mean library of species ``s`` is ``library_size_mean * depth_ratio**s`` (``> 0``; 1.6: the second
        species is 1.6x deeper).
    library_size_mean, library_size_sd_log
        Mean expected counts per cell of species 0 (``>= 1``) and the log-sd of the library (``>= 0``).
    noise_ratio_range
        ``(lo, hi)``, ``0 < lo <= hi < 1``: ``eps_i`` log-uniform on it (default 0.3%-1%).
    n_types_per_species, gene_log_sd, type_log_sd
        As :func:`scar_jax.datasets.simulate_species_mixture`. ``gene_log_sd = 2.5`` (there 2) gives the ambient
        about the concentration of a real soup (its top genes' share; docs/benchmarks.md compares them).
    shape_range
        ``(r_lo, r_hi)``, ``0 < r_lo <= r_hi``: the negative-binomial shape of the rarest and of the most
        abundant genes (module docstring).
    seed
        Seed (``>= 0``) of ``numpy.random.default_rng([3, seed])``.

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_genes)`` CSR int32 counts with the fields of ``simulate_species_mixture`` and
        ``uns["simulation"]`` (the parameters; ``generator = "scar_jax.datasets.simulate_barnyard"``).

    Raises
    ------
    ValueError
        If an argument is out of range; the message names it.
    """
    n_cells = sim._check_int("n_cells", n_cells, 1)
    proportions = sim._check_proportions(species_proportions)
    n_species = int(proportions.shape[0])
    n_genes = sim._check_int("n_genes", n_genes, n_species)
    depth_ratio = sim._check_float("depth_ratio", depth_ratio, low=0.0)
    library_size_mean = sim._check_float("library_size_mean", library_size_mean, low=1.0, low_inclusive=True)
    library_size_sd_log = sim._check_float("library_size_sd_log", library_size_sd_log, low=0.0, low_inclusive=True)
    lo, hi = sim._pair("noise_ratio_range", noise_ratio_range, high=1.0)
    r_lo, r_hi = sim._pair("shape_range", shape_range, high=None)
    n_types = sim._check_int("n_types_per_species", n_types_per_species, 1)
    gene_log_sd = sim._check_float("gene_log_sd", gene_log_sd, low=0.0, low_inclusive=True)
    type_log_sd = sim._check_float("type_log_sd", type_log_sd, low=0.0, low_inclusive=True)
    seed = sim._check_int("seed", seed, 0)

    rng = np.random.default_rng([_STREAM_BARNYARD, seed])
    gene_species = sim._even_blocks(n_genes, n_species)
    blocks = [np.flatnonzero(gene_species == s) for s in range(n_species)]
    native_profile = sim._block_profiles(rng, blocks, n_genes, n_types, gene_log_sd, type_log_sd)
    species = rng.permutation(np.repeat(np.arange(n_species), sim._largest_remainder(n_cells, proportions)))
    cell_type = species * n_types + rng.integers(0, n_types, size=n_cells)
    species_depth = library_size_mean * depth_ratio ** np.arange(n_species)
    type_depth = np.repeat(species_depth, n_types)
    shape = r_lo + (r_hi - r_lo) * (c := native_profile * type_depth[None, :]) / (c + 1.0)  # (G, K)

    weights = np.bincount(cell_type, minlength=n_species * n_types) * type_depth
    ambient = native_profile @ (weights / weights.sum())
    ambient /= ambient.sum()

    eps = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n_cells))
    mu_log = np.log(species_depth[species]) - 0.5 * library_size_sd_log**2
    library = np.maximum(rng.lognormal(mu_log, library_size_sd_log), _MIN_LIBRARY_SIZE)

    tables = [sim._alias_table(ambient)]
    draw = functools.partial(_draw_cells, rng, cell_type, library, eps, native_profile, shape, tables)
    counts = sim._draw_in_chunks(draw, n_cells, n_genes)
    labels, var, categories = sim._species_labels(species, cell_type, gene_species, n_species, n_types)
    params = {
        **sim._species_params("scar_jax.datasets.simulate_barnyard", n_cells, n_genes, proportions),
        "depth_ratio": depth_ratio,
        "library_size_mean": library_size_mean,
        "library_size_sd_log": library_size_sd_log,
        "noise_ratio_range": [lo, hi],
        "n_types_per_species": n_types,
        "gene_log_sd": gene_log_sd,
        "type_log_sd": type_log_sd,
        "shape_range": [r_lo, r_hi],
        "seed": seed,
        **categories,
    }
    varm = {"true_ambient_profile": ambient[:, None], "true_native_profile": native_profile}
    return sim._record(counts, labels, eps, library, var, params, varm)


def _draw_cells(rng, cell_type, library, eps, native_profile, shape, tables, cells: np.ndarray):
    """Dense native (Gamma-Poisson) and ambient counts ``(len(cells), n_genes)`` of ``cells``, and their totals."""
    types = cell_type[cells]
    mean = (library[cells] * (1.0 - eps[cells]))[:, None] * native_profile[:, types].T
    r = shape[:, types].T
    rate = rng.gamma(r, np.where(mean > 0, mean / r, 0.0))
    nat = rng.poisson(rate).astype(np.int32)
    one_profile = np.zeros(cells.shape[0], np.int64)
    amb, amb_tot = sim._profile_counts(rng, library[cells] * eps[cells], one_profile, tables, native_profile.shape[0])
    return nat, amb, nat.sum(1, dtype=np.int64), amb_tot


def barnyard_raw_droplets(
    adata: anndata.AnnData, n_droplets: int = 20000, library_size_mean: float = 10.0, seed: int = 0
) -> anndata.AnnData:
    """The raw droplet matrix of a simulated run: the cells of ``adata`` and ``n_droplets`` shallow cell-free ones.

    Cell-free droplets of a real 10x run hold a few UMIs each (most barcodes below the knee have 1-10), so an
    ambient profile estimated from them has exact zeros on the rare genes. ``library_size_mean`` (default 10,
    log-sd 0.8) and ``n_droplets`` (default 20,000: about 200,000 ambient UMIs) set that depth; the droplets are
    :func:`scar_jax.datasets.simulate_empty_droplets` with ``seed``. Returns
    :func:`scar_jax.datasets.raw_droplets` (cells first, ``obs["is_cell"]``).
    """
    empty = simulate_empty_droplets(adata, n_droplets=n_droplets, library_size_mean=library_size_mean, seed=seed)
    return raw_droplets(adata, empty)
