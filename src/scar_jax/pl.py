"""Plots (matplotlib): droplet knee plot and training history.

Each function draws on ``ax`` (a new figure when ``None``) and returns the axes, as scanpy's do.
"""

from __future__ import annotations

from typing import Any

import anndata
import numpy as np

from . import ambient as _ambient
from . import data as _data


def _axes(ax: Any, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


def knee_plot(
    raw_adata: anndata.AnnData,
    adata: anndata.AnnData | None = None,
    prob: float = 0.995,
    min_raw_counts: int = 2,
    iterations: int = 3,
    sample: int | None = None,
    seed: int = 0,
    ax: Any = None,
) -> Any:
    """Droplet rank against total counts (log-log), with cell-free and cell droplets marked.

    The cell-free droplets are those :meth:`scar_jax.SCAR.get_ambient_profile` uses with the same
    ``prob``, ``min_raw_counts``, ``iterations`` and ``sample`` (genes matched to ``adata`` when given);
    cells are the droplets whose names are in ``adata.obs_names``.
    """
    x = _data.raw_counts(raw_adata)
    if adata is not None:
        x = x[:, _data.match_raw_genes(adata, raw_adata)]
    totals = np.asarray(x.sum(axis=1)).ravel()
    estimate = _ambient.estimate_ambient_profile(x, prob, min_raw_counts, iterations, sample, seed)
    cell_free = np.zeros(raw_adata.n_obs, bool)
    cell_free[estimate.droplets[estimate.cell_free]] = True
    is_cell = np.zeros(raw_adata.n_obs, bool) if adata is None else raw_adata.obs_names.isin(adata.obs_names)
    order = np.argsort(-totals, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(1, len(order) + 1)
    keep = totals > 0
    ax = _axes(ax, (5, 4))
    other = keep & ~cell_free & ~is_cell
    ax.scatter(rank[other], totals[other], s=2, c="lightgrey", label="other droplets", rasterized=True)
    ax.scatter(rank[cell_free & keep], totals[cell_free & keep], s=2, c="tab:blue", label="cell-free", rasterized=True)
    if is_cell.any():
        ax.scatter(rank[is_cell & keep], totals[is_cell & keep], s=2, c="tab:red", label="cells", rasterized=True)
    ax.set(xscale="log", yscale="log", xlabel="droplet rank", ylabel="total counts")
    ax.legend(markerscale=4, frameon=False)
    return ax


def history(model: Any, keys: tuple[str, ...] = ("elbo_train", "elbo_validation"), ax: Any = None) -> Any:
    """Training curves from ``model.history`` (negative ELBO per cell by default, log scale)."""
    ax = _axes(ax, (5, 3))
    for key in keys:
        if key in model.history:
            ax.plot(model.history[key].index, model.history[key].iloc[:, 0], label=key)
    ax.set(xlabel="epoch", ylabel="per cell", yscale="log")
    ax.legend(frameon=False)
    return ax
