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

from ._common import _check_float, _check_int  # noqa: F401 (used by the feature simulators)
from .cells import simulate
from .empty import raw_droplets, simulate_empty_droplets
from .species import simulate_species_mixture

__all__ = ["raw_droplets", "simulate", "simulate_empty_droplets", "simulate_species_mixture"]


def __getattr__(name: str):
    """``simulate_barnyard`` and ``barnyard_raw_droplets`` live in :mod:`scar_jax.barnyard` (imported on first use)."""
    if name in ("simulate_barnyard", "barnyard_raw_droplets"):
        from .. import barnyard

        return getattr(barnyard, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
