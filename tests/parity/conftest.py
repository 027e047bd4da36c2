"""Fixtures of the scvi-tools parity suite (run only where ``torch`` and ``scvi`` import).

The test files skip themselves with ``pytest.importorskip`` when scvi-tools or PyTorch is missing, so
this file must not import either at module level. Measured errors are collected in
``parity_helpers.REPORT`` and printed at the end of the run (``pytest_terminal_summary``).
"""

from __future__ import annotations

from typing import Any

import pytest
from parity_helpers import EPOCHS, HAVE_SCVI, REPORT, Case, hyperparameters, make_adata, setup_args


@pytest.fixture(scope="session", autouse=True)
def _deterministic():
    if not HAVE_SCVI:
        yield
        return
    import jax
    import scvi
    import torch

    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "float32")
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    scvi.settings.seed = 0
    scvi.settings.verbosity = 40  # errors only
    yield
    jax.config.update("jax_default_matmul_precision", previous)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``case -> (scvi model, save dir, adata)``: each case's scvi-tools SCAR trained once, saved with its AnnData."""
    import scvi

    cache: dict[Case, tuple[Any, Any, Any]] = {}

    def get(case: Case):
        if case not in cache:
            scvi.settings.seed = 0
            adata = make_adata(case)
            scvi.external.SCAR.setup_anndata(adata, **setup_args(case))
            model = scvi.external.SCAR(adata, **hyperparameters(case))
            model.train(
                max_epochs=EPOCHS,
                batch_size=64,
                train_size=0.9,
                accelerator="cpu",
                plan_kwargs={"lr": 1e-2},  # move the weights well away from their initial values
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            model.module.eval()
            path = tmp_path_factory.mktemp("scvi-" + case.name) / "model"
            model.save(str(path), save_anndata=True)
            cache[case] = (model, path, adata)
        return cache[case]

    return get


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    terminalreporter.section("scvi-tools parity: measured relative errors (float32)")
    quantities = sorted({q for _, q in REPORT})
    worst = {q: max(v for (_, qq), v in REPORT.items() if qq == q) for q in quantities}
    for (case, quantity), value in sorted(REPORT.items()):
        terminalreporter.write_line(f"{case:40s} {quantity:34s} {value:.2e}")
    terminalreporter.write_line("worst per quantity: " + ", ".join(f"{q} {v:.1e}" for q, v in worst.items()))
