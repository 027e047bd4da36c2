"""Plots: the knee plot marks the same cell-free droplets the ambient estimate uses; history curves;
noise ratio per group (box medians are the group medians); raw vs denoised bars (heights are group means).
Figures are also written as PNG files and checked to be non-empty images."""

import matplotlib

matplotlib.use("Agg")
import anndata
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scar_jax import pl
from scar_jax.ambient import estimate_ambient_profile
from scar_jax.datasets import raw_droplets, simulate, simulate_empty_droplets


@pytest.fixture(scope="module")
def droplets():
    cells = simulate(n_cells=300, n_genes=50, seed=0)
    return cells, raw_droplets(cells, simulate_empty_droplets(cells, n_droplets=2000, seed=1))


def test_knee_plot_marks_cells_and_cell_free_droplets(droplets):
    cells, raw = droplets
    ax = pl.knee_plot(raw, cells, prob=0.5)
    groups = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert set(groups) == {"other droplets", "cell-free", "cells"}
    assert len(groups["cells"]) == cells.n_obs
    estimate = estimate_ambient_profile(raw.X, prob=0.5)
    assert len(groups["cell-free"]) == int(estimate.cell_free.sum())
    # ranks are 1..n by decreasing total: every cell ranks above every cell-free droplet here
    assert groups["cells"][:, 0].max() < groups["cell-free"][:, 0].min()
    totals = np.asarray(raw.X.sum(1)).ravel()
    np.testing.assert_array_equal(np.sort(groups["cells"][:, 1]), np.sort(totals[raw.obs["is_cell"].to_numpy()]))
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


@pytest.fixture(scope="module")
def model(trained_model):
    return trained_model[1]  # conftest: a small trained model, shared: not to be changed


def _save_png(ax, path):
    ax.figure.savefig(path, dpi=60)
    plt.close(ax.figure)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    image = plt.imread(path)
    assert image.std() > 0  # something was drawn


def test_history_plot(model, tmp_path):
    ax = pl.history(model)
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    np.testing.assert_allclose(lines["elbo_train"], model.history["elbo_train"]["elbo_train"])
    assert len(lines["elbo_validation"]) == 2  # one per epoch (the shared model: 2 epochs)
    _save_png(ax, tmp_path / "history.png")


def test_knee_plot_png(droplets, tmp_path):
    cells, raw = droplets
    _save_png(pl.knee_plot(raw, cells, prob=0.5), tmp_path / "knee.png")


def _medians(ax):
    return {line.get_gid().split(":", 1)[1]: line.get_ydata()[0] for line in ax.get_lines() if line.get_gid()}


def test_noise_ratio_per_group_from_anndata(droplets, tmp_path):
    cells, _ = droplets
    adata = anndata.AnnData(obs=cells.obs.copy())
    rng = np.random.default_rng(0)
    adata.obs["noise_ratio"] = rng.beta(2, 10, adata.n_obs)
    ax = pl.noise_ratio(adata, groupby="cell_type")
    medians = _medians(ax)
    groups = adata.obs.groupby("cell_type", observed=True)["noise_ratio"].median()
    assert list(medians) == [str(c) for c in adata.obs["cell_type"].cat.categories if c in groups.index]
    for name, value in medians.items():
        assert value == pytest.approx(groups[name])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    counts = adata.obs["cell_type"].value_counts()
    first = list(medians)[0]
    assert labels[0] == f"{first}\n(n={counts[first]})"
    assert len(ax.collections) == len(medians)  # one violin per group
    _save_png(ax, tmp_path / "noise_ratio.png")


def test_noise_ratio_from_model_box_and_degenerate_groups(model, tmp_path):
    ax = pl.noise_ratio(model)  # one group, from the model's own AnnData
    assert _medians(ax)["all cells"] == pytest.approx(np.median(model.get_noise_ratio()))
    _save_png(ax, tmp_path / "noise_ratio_model.png")
    obs = pd.DataFrame({"noise_ratio": [0.1, 0.2, 0.3, 0.5, np.nan], "batch": ["a", "a", "a", "b", "c"]})
    adata = anndata.AnnData(obs=obs.set_axis([f"c{i}" for i in range(5)]))
    ax = pl.noise_ratio(adata, groupby="batch")  # b has one value (no violin), c only NaN (left out)
    assert _medians(ax) == {"a": pytest.approx(0.2), "b": pytest.approx(0.5)}
    assert len(ax.collections) == 1
    ax = pl.noise_ratio(adata, groupby="batch", kind="box")
    assert len(ax.collections) == 0
    with pytest.raises(ValueError, match="not a column of obs"):
        pl.noise_ratio(adata, groupby="cell_type")
    with pytest.raises(ValueError, match="kind must be"):
        pl.noise_ratio(adata, kind="swarm")
    with pytest.raises(ValueError, match=r"obs\['noise_ratio'\] not found"):
        pl.noise_ratio(anndata.AnnData(obs=pd.DataFrame(index=["a"])))
    plt.close("all")


@pytest.mark.parametrize("raw_layer", [None, "counts"])
def test_denoised_expression_bars_are_group_means(droplets, tmp_path, raw_layer):
    cells, _ = droplets
    adata = anndata.AnnData(X=cells.X.astype(np.float32), obs=cells.obs.copy(), var=cells.var.copy())
    if raw_layer is not None:
        adata.layers["counts"] = adata.X.copy()
        adata.X = None
    adata.layers["denoised"] = sp.csr_matrix(cells.layers["native"])  # the truth stands in for a result
    genes = list(adata.var_names[[0, 7, 20]])
    ax = pl.denoised_expression(adata, genes, groupby="cell_type", raw_layer=raw_layer)
    bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert set(bars) == {"raw", "denoised"}
    groups = list(adata.obs["cell_type"].cat.categories)
    expected_raw, expected_denoised = [], []
    for gene in genes:
        for group in groups:
            rows = (adata.obs["cell_type"] == group).to_numpy()
            col = adata.var_names.get_loc(gene)
            expected_raw.append(cells.X[rows, col].toarray().mean())
            expected_denoised.append(cells.layers["native"][rows, col].toarray().mean())
    np.testing.assert_allclose(bars["raw"], expected_raw, rtol=1e-6)
    np.testing.assert_allclose(bars["denoised"], expected_denoised, rtol=1e-6)
    assert [t.get_text() for t in ax.texts] == genes
    assert [t.get_text() for t in ax.get_xticklabels()] == groups * len(genes)
    _save_png(ax, tmp_path / "denoised_expression.png")


def test_denoised_expression_single_gene_no_groups_and_errors(droplets):
    cells, _ = droplets
    adata = anndata.AnnData(X=cells.X, obs=cells.obs.copy(), var=cells.var.copy())
    adata.layers["denoised"] = cells.layers["native"]
    gene = adata.var_names[3]
    fig, ax = plt.subplots()
    assert pl.denoised_expression(adata, gene, ax=ax, log=True) is ax
    heights = [b.get_height() for c in ax.containers for b in c]
    col = adata.var_names.get_loc(gene)
    assert heights == pytest.approx([cells.X[:, col].mean(), cells.layers["native"][:, col].mean()])
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="genes not in adata.var_names"):
        pl.denoised_expression(adata, ["no_such_gene"])
    with pytest.raises(ValueError, match="layer 'scar' not found"):
        pl.denoised_expression(adata, gene, denoised_layer="scar")
    plt.close("all")


# ---------------------------------------------------------------------------------------------- labels fit
def drawn_texts(fig) -> list:
    """The texts a saved figure shows: tick labels inside the view limits, axis labels, titles, texts, legends."""
    fig.canvas.draw()
    texts = []
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(lim)
            for minor in (False, True):
                locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
                labels = axis.get_ticklabels(minor=minor)
                texts += [t for loc, t in zip(locs, labels, strict=False) if lo - 1e-9 <= loc <= hi + 1e-9]
        texts += [ax.xaxis.label, ax.yaxis.label, ax.title, *ax.texts]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def assert_labels_fit(ax, path):
    """Saved as PNG; no two texts' bounding boxes overlap, and every text is inside the figure (not cut)."""
    fig = ax.figure
    texts = drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    overlaps = [
        (texts[i].get_text(), texts[j].get_text())
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if boxes[i].overlaps(boxes[j])
    ]
    assert not overlaps, overlaps
    width, height = fig.bbox.width, fig.bbox.height
    cut = [
        t.get_text()
        for t, b in zip(texts, boxes, strict=True)
        if b.x0 < -1 or b.y0 < -1 or b.x1 > width + 1 or b.y1 > height + 1
    ]
    assert not cut, cut
    _save_png(ax, path)


@pytest.fixture(scope="module")
def twelve():
    """12 cell types with long names, 30 genes with long names, the truth as the denoised layer."""
    cells = simulate(n_cells=360, n_genes=30, n_cell_types=12, seed=4)
    adata = anndata.AnnData(X=cells.X, obs=cells.obs.copy())
    adata.var_names = [f"LONG-GENE-NAME-{i}" for i in range(adata.n_vars)]
    adata.layers["denoised"] = sp.csr_matrix(cells.layers["native"])
    adata.obs["noise_ratio"] = np.random.default_rng(0).beta(2, 10, adata.n_obs)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories(lambda c: f"cell type {c} (long)")
    return adata


def first_groups(adata, n: int):
    keep = adata.obs["cell_type"].isin(adata.obs["cell_type"].cat.categories[:n]).to_numpy()
    return adata[keep].copy()


@pytest.mark.parametrize("n", [1, 4, 12])
def test_noise_ratio_labels_fit(twelve, tmp_path, n):
    adata = first_groups(twelve, n)
    ax = pl.noise_ratio(adata, groupby="cell_type")
    assert len(ax.get_xticklabels()) == n and ax.get_ylabel() and ax.get_xlabel() == "cell_type"
    assert_labels_fit(ax, tmp_path / "noise_ratio.png")
    assert_labels_fit(pl.noise_ratio(adata, kind="box"), tmp_path / "noise_ratio_all.png")


@pytest.mark.parametrize("n", [1, 4, 12])
def test_denoised_expression_labels_fit(twelve, tmp_path, n):
    genes = list(twelve.var_names[:n])
    ax = pl.denoised_expression(twelve, genes)  # n genes, one group
    assert [t.get_text() for t in ax.texts] == genes
    assert_labels_fit(ax, tmp_path / "genes.png")
    ax = pl.denoised_expression(first_groups(twelve, n), genes[:4], groupby="cell_type")  # n groups, <= 4 genes
    assert_labels_fit(ax, tmp_path / "groups.png")
    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")  # an ax of the user's: names turned to fit
    assert_labels_fit(pl.denoised_expression(twelve, genes, ax=ax), tmp_path / "given_ax.png")


@pytest.mark.parametrize("n", [1, 4, 8])
def test_history_and_knee_plot_labels_fit(model, droplets, tmp_path, n):
    keys = tuple(k for k in model.history if k != "kl_weight")[:n]  # 8 curves are all there are
    assert len(keys) == n
    ax = pl.history(model, keys=keys)
    assert len(ax.get_lines()) == n
    assert_labels_fit(ax, tmp_path / "history.png")
    if n == 1:
        cells, raw = droplets
        assert_labels_fit(pl.knee_plot(raw, cells, prob=0.5), tmp_path / "knee.png")
