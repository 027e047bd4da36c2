"""Plots: the knee plot marks the same cell-free droplets the ambient estimate uses; history curves."""

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

from scar_jax import SCAR, pl
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


def test_history_plot(droplets):
    cells, _ = droplets
    SCAR.setup_anndata(cells)
    model = SCAR(cells, n_hidden=16, n_latent=4)
    model.train(max_epochs=3, enable_progress_bar=False)
    ax = pl.history(model)
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    np.testing.assert_allclose(lines["elbo_train"], model.history["elbo_train"]["elbo_train"])
    assert len(lines["elbo_validation"]) == 3
