""":func:`simulate_species_mixture`: a low-contamination mixture of species whose expressed genes are disjoint.

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
"""

from __future__ import annotations

import math
from functools import partial

import anndata
import numpy as np

from ._common import (
    _STREAM_SPECIES,
    _alias_table,
    _block_profiles,
    _check_float,
    _check_int,
    _check_proportions,
    _draw_in_chunks,
    _even_blocks,
    _largest_remainder,
    _library_sizes,
    _pair,
    _profile_counts,
    _record,
    _species_labels,
    _species_params,
)


# long: the parameter and output reference (about 60 lines of docstring); the body is about 50 lines
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

    The generative model is in this module's docstring.

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
    proportions = _check_proportions(species_proportions)
    S = int(proportions.shape[0])
    n_genes = _check_int("n_genes", n_genes, S)
    P = _check_int("n_types_per_species", n_types_per_species, 1)
    lo, hi = _pair("noise_ratio_range", noise_ratio_range, high=1.0)
    library_size_mean = _check_float("library_size_mean", library_size_mean, low=1.0, low_inclusive=True)
    library_size_sd_log = _check_float("library_size_sd_log", library_size_sd_log, low=0.0, low_inclusive=True)
    gene_log_sd = _check_float("gene_log_sd", gene_log_sd, low=0.0, low_inclusive=True)
    type_log_sd = _check_float("type_log_sd", type_log_sd, low=0.0, low_inclusive=True)
    seed = _check_int("seed", seed, 0)
    cell_profile_sd_log = _check_float("cell_profile_sd_log", cell_profile_sd_log, low=0.0, low_inclusive=True)

    rng = np.random.default_rng([_STREAM_SPECIES, seed])
    gene_species = _even_blocks(n_genes, S)
    blocks = [np.flatnonzero(gene_species == s) for s in range(S)]
    native_profile = _block_profiles(rng, blocks, n_genes, P, gene_log_sd, type_log_sd)
    species_counts = _largest_remainder(n_cells, proportions)  # exact counts, shuffled
    species = rng.permutation(np.repeat(np.arange(S), species_counts))
    cell_type = species * P + rng.integers(0, P, size=n_cells)
    ambient = native_profile @ (np.bincount(cell_type, minlength=S * P) / n_cells)  # the cells' own mixture
    ambient /= ambient.sum()
    eps = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n_cells))
    library, min_library = _library_sizes(rng, n_cells, library_size_mean, library_size_sd_log)
    scales = (library * (1.0 - eps), library * eps)
    tables = ([_alias_table(native_profile[:, t]) for t in range(S * P)], [_alias_table(ambient)])
    draw = partial(_draw_cells, rng, cell_type, native_profile, blocks, P, scales, tables, cell_profile_sd_log)
    counts = _draw_in_chunks(draw, n_cells, n_genes)

    labels, var, categories = _species_labels(species, cell_type, gene_species, S, P)
    params = {
        **_species_params("scar_jax.datasets.simulate_species_mixture", n_cells, n_genes, proportions),
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
        **categories,
    }
    varm = {"true_ambient_profile": ambient[:, None], "true_native_profile": native_profile}
    return _record(counts, labels, eps, library, var, params, varm)


def _draw_cells(rng, cell_type, native_profile, blocks, P, scales, tables, cell_profile_sd_log, cells):
    """Dense native and ambient counts ``(len(cells), n_genes)`` of ``cells`` and their row totals."""
    native_scale, ambient_scale = scales
    G = native_profile.shape[0]
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
        nat, nat_tot = _profile_counts(rng, native_scale[cells], cell_type[cells], tables[0], G)
    zero_batch = np.zeros(cells.shape[0], dtype=np.int64)
    amb, amb_tot = _profile_counts(rng, ambient_scale[cells], zero_batch, tables[1], G)
    return nat, amb, nat_tot, amb_tot
