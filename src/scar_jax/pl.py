"""Plots (matplotlib): droplet knee plot, training history, noise ratio per group, raw vs denoised expression.

Each function draws on ``ax`` (a new figure when ``None``) and returns the axes, as scanpy's do. A new
figure uses matplotlib's constrained layout, so axis labels, tick labels and gene names stay inside it;
labels that would overlap (long group or gene names, many groups) are turned until they do not
(:func:`fit_labels`), on a new figure or on the ``ax`` given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import ambient as _ambient
from . import arguments as _arguments
from . import data as _data


def _axes(ax: Any, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, layout="constrained")[1]


def _boxes(texts: Sequence[Any], renderer: Any) -> list[Any]:
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def _shown_ticklabels(axis: Any) -> list[Any]:
    """The major and minor tick labels of ``axis`` inside its view limits (those a saved figure shows)."""
    axis.figure.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    labels = []
    for minor in (False, True):
        locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
        labels += [t for loc, t in zip(locs, axis.get_ticklabels(minor=minor), strict=False) if lo <= loc <= hi]
    return labels


def overlapping(texts: Sequence[Any], renderer: Any = None) -> list[tuple[str, str]]:
    """Pairs of the (visible, non-empty) ``texts`` whose bounding boxes overlap on the drawn figure."""
    texts = [t for t in texts if t.get_visible() and t.get_text()]
    if not texts:
        return []
    figure = texts[0].figure
    if renderer is None:
        figure.canvas.draw()  # runs the layout: positions as they will be saved
        renderer = figure.canvas.get_renderer()
    boxes = _boxes(texts, renderer)
    return [
        (texts[i].get_text(), texts[j].get_text())
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if boxes[i].overlaps(boxes[j])
    ]


def fit_labels(texts: Sequence[Any], anchor: str = "top", grow: bool = False) -> None:
    """Turn ``texts`` (tick labels below the axes: ``anchor="top"``; names above it: ``"bottom"``) by 45, then
    90 degrees, until no two overlap. Texts that already fit are left as they are. ``grow`` (a figure the
    plot made): the figure is made taller by the height the turned texts take, so that the axes keep theirs."""
    texts = [t for t in texts if t.get_visible() and t.get_text()]
    if not texts:
        return
    before = max(t.get_window_extent(t.figure.canvas.get_renderer()).height for t in texts) if grow else 0.0
    _turn(texts, anchor)
    if grow and any(t.get_rotation() for t in texts):
        figure = texts[0].figure
        after = max(b.height for b in _boxes(texts, figure.canvas.get_renderer()))
        figure.set_figheight(figure.get_figheight() + max(0.0, after - before) / figure.dpi)


def _turn(texts: list[Any], anchor: str) -> None:
    for angle in (a for a in (45, 90) if a > max(t.get_rotation() for t in texts)):
        if not overlapping(texts):
            return
        for t in texts:
            t.set_rotation(angle)
            t.set_rotation_mode("anchor")
            t.set_horizontalalignment("right" if anchor == "top" else "left")
            t.set_verticalalignment("center" if angle == 90 else ("top" if anchor == "top" else "bottom"))


@_arguments.checked
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
    if overlapping(_shown_ticklabels(ax.yaxis)):  # a narrow log range labels its minor ticks too: too many
        from matplotlib.ticker import NullFormatter

        ax.yaxis.set_minor_formatter(NullFormatter())
    return ax


def _groups(obs: pd.DataFrame, groupby: str | None, n: int) -> tuple[list[str], np.ndarray]:
    """Group names in display order (categorical order, else sorted) and each row's group index."""
    if groupby is None:
        return ["all cells"], np.zeros(n, np.int64)
    if groupby not in obs:
        raise ValueError(f"groupby={groupby!r} is not a column of obs (columns: {', '.join(map(str, obs.columns))})")
    column = obs[groupby]
    categorical = column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype(str).astype("category")
    categorical = categorical.cat.remove_unused_categories()
    return [str(c) for c in categorical.cat.categories], categorical.cat.codes.to_numpy()


def noise_ratio(
    adata_or_model: Any,
    groupby: str | None = None,
    kind: str = "violin",
    key: str = "noise_ratio",
    ax: Any = None,
) -> Any:
    """Distribution of the noise ratio per group (batch, cell type, ...): violins with a box inside.

    Parameters
    ----------
    adata_or_model
        An AnnData with ``obs[key]`` (as ``scar-jax denoise`` writes it), or a trained
        :class:`scar_jax.SCAR` (its :meth:`~scar_jax.SCAR.get_noise_ratio`, groups from ``model.adata``).
    groupby
        ``obs`` column defining the groups (categorical order kept); ``None``: all cells in one group.
    kind
        ``"violin"`` (violin per group with a box inside; groups with fewer than two distinct values get
        the box only) or ``"box"``.
    key
        ``obs`` column of the noise ratio for an AnnData (default ``"noise_ratio"``).

    The box's median line of each group has ``gid`` ``"median:<group>"``; tick labels carry the
    number of cells.
    """
    if kind not in ("violin", "box"):
        raise ValueError(f"kind must be 'violin' or 'box', got {kind!r}")
    obs, values = _noise_values(adata_or_model, key)
    names, codes = _groups(obs, groupby, len(values))
    data = [values[(codes == g) & np.isfinite(values)] for g in range(len(names))]
    keep = [i for i, d in enumerate(data) if len(d)]
    names, data = [names[i] for i in keep], [data[i] for i in keep]
    positions = np.arange(1, len(data) + 1)
    created = ax is None
    ax = _axes(ax, (max(3.0, 0.8 * len(data) + 1.5), 3.5))
    if kind == "violin":
        spread = [i for i, d in enumerate(data) if len(np.unique(d)) > 1]
        if spread:
            parts = ax.violinplot([data[i] for i in spread], positions[spread], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                body.set(facecolor="tab:blue", edgecolor="none", alpha=0.35)
    box = ax.boxplot(
        data,
        positions=positions,
        widths=0.15 if kind == "violin" else 0.5,
        showfliers=kind == "box",
        medianprops={"color": "black"},
        manage_ticks=False,
    )
    for name, line in zip(names, box["medians"], strict=True):
        line.set_gid(f"median:{name}")
    ax.set_xticks(positions, [f"{n}\n(n={len(d)})" for n, d in zip(names, data, strict=True)])
    ax.set(xlabel=groupby or "", ylabel="noise ratio (ambient fraction)", xlim=(0.4, len(data) + 0.6))
    fit_labels(ax.get_xticklabels(), grow=created)
    return ax


def _noise_values(adata_or_model: Any, key: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The cells' ``obs`` and noise ratios: ``obs[key]`` of an AnnData, or a model's ``get_noise_ratio()``."""
    if isinstance(adata_or_model, anndata.AnnData):
        obs = adata_or_model.obs
        if key not in obs:
            raise ValueError(
                f"obs[{key!r}] not found; run scar-jax denoise or set obs[{key!r}] = model.get_noise_ratio()"
            )
        values = obs[key].to_numpy(np.float64)
    elif hasattr(adata_or_model, "get_noise_ratio") and hasattr(adata_or_model, "adata"):
        obs = adata_or_model.adata.obs
        values = np.asarray(adata_or_model.get_noise_ratio(), np.float64)
    else:
        raise TypeError(f"expected an AnnData or a SCAR model, got {type(adata_or_model).__name__}")
    return obs, values


def _layer(adata: anndata.AnnData, layer: str | None) -> Any:
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is None; name the raw counts with raw_layer=")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(f"layer {layer!r} not found (layers: {', '.join(adata.layers.keys()) or 'none'})")
    return adata.layers[layer]


def _group_means(x: Any, cols: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of the columns ``cols`` over the rows of each group, ``(n_groups, len(cols))``."""
    x = sp.csr_matrix(x)[:, cols] if sp.issparse(x) else np.asarray(x)[:, cols]
    out = np.zeros((n_groups, len(cols)))
    for g in range(n_groups):
        rows = np.flatnonzero(codes == g)
        if len(rows):
            out[g] = np.asarray(x[rows].mean(axis=0), np.float64).ravel()
    return out


def denoised_expression(
    adata: anndata.AnnData,
    genes: str | Sequence[str],
    groupby: str | None = None,
    raw_layer: str | None = None,
    denoised_layer: str = "denoised",
    log: bool = False,
    ax: Any = None,
) -> Any:
    """Mean counts per cell of chosen genes in each group, raw and denoised side by side.

    Shows where ambient counts were removed: a marker gene keeps its counts in its own cell type and
    loses them elsewhere. Bars are grouped by gene (gene names above each block), one pair per group:
    ``"raw"`` (``X`` or ``layers[raw_layer]``) and ``"denoised"`` (``layers[denoised_layer]``); the two
    bar containers carry those labels, in gene-major, group-minor order.

    Parameters
    ----------
    genes
        One name or a list, from ``adata.var_names``.
    groupby
        ``obs`` column (cell type, batch, ...); ``None``: all cells together.
    log
        Logarithmic y axis.
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("genes is empty")
    cols = adata.var_names.get_indexer(genes)
    if (cols < 0).any():
        missing = [g for g, c in zip(genes, cols, strict=True) if c < 0]
        raise ValueError(f"genes not in adata.var_names: {missing}")
    names, codes = _groups(adata.obs, groupby, adata.n_obs)
    raw = _group_means(_layer(adata, raw_layer), cols, codes, len(names))
    denoised = _group_means(_layer(adata, denoised_layer), cols, codes, len(names))
    n_groups = len(names)
    x = np.concatenate([i * (n_groups + 1) + np.arange(n_groups) for i in range(len(genes))]).astype(float)
    names_width = sum(0.1 * (len(str(g)) + 2) for g in genes)  # inches: the gene names side by side, bold 10 pt
    created = ax is None
    ax = _axes(ax, (max(4.0, 0.3 * len(x) + 1.5, names_width + 1.5), 3.5))
    width = 0.4
    ax.bar(x - width / 2, raw.T.ravel(), width, label="raw", color="lightgrey", edgecolor="grey")
    ax.bar(x + width / 2, denoised.T.ravel(), width, label="denoised", color="tab:red")
    ax.set_xticks(x, names * len(genes))  # turned by fit_labels below if they overlap
    transform = ax.get_xaxis_transform()
    titles = []
    for i, gene in enumerate(genes):
        center = i * (n_groups + 1) + (n_groups - 1) / 2
        titles.append(ax.text(center, 1.01, gene, transform=transform, ha="center", va="bottom", fontweight="bold"))
        if i:
            ax.axvline(i * (n_groups + 1) - 1, color="lightgrey", lw=0.8)
    ax.set(ylabel="mean counts per cell", xlabel=groupby or "")
    if log:
        ax.set_yscale("log")
    ax.legend(frameon=False)
    fit_labels(ax.get_xticklabels(), grow=created)
    fit_labels(titles, anchor="bottom", grow=created)
    return ax
