"""Shared pytest configuration: strict JAX hygiene for every test, and hypothesis profiles."""

import os
from pathlib import Path

# One persistent XLA compilation cache for the whole run: the two xdist workers, the notebook kernels and the
# subprocess tests inherit it through the environment, so code that one process compiled is loaded, not compiled
# again, by the others (the same HLO gives the same executable, so no result changes). In .pytest_cache (ignored by
# git); set JAX_COMPILATION_CACHE_DIR to choose another folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])  # if jax came in first

# Property tests (tests/test_properties.py): "ci" (the default) is derandomized, so every run draws the
# same examples and a failure reproduces; "thorough" searches afresh with 20x the examples. Choose with
# `pytest --hypothesis-profile=thorough` or HYPOTHESIS_PROFILE=thorough.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=1200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# With `pytest -n 2 --dist loadfile` (README, CI) whole files go to the two workers in collection order, so the
# longest files are collected first and the short ones fill the gaps at the end: the longest-first rule for
# scheduling. Order from a full `-n 2` run with --durations=0 on 2 cores (2026-12-05, the compilation cache warm;
# seconds per file, summed over its tests, in brackets). Plain `pytest` is unaffected but for the order.
LONGEST_FILES_FIRST = (
    "test_model.py",  # (~115)
    "test_notebooks.py",  # (~110: notebooks in their own kernels)
    "test_calibration.py",  # (~77)
    "test_real_pbmc.py",  # (~76)
    "test_posterior.py",  # (~75)
    "test_parity.py",  # (~45)
    "test_cli_resume.py",  # (~40: subprocesses)
    "test_train.py",  # (~37)
    "test_cli.py",  # (~31)
    "test_likelihoods.py",  # (~31)
    "test_validation.py",  # (~30)
    "test_distributed.py",  # (~28: subprocesses)
    "test_resume.py",  # (~28: subprocesses)
    "test_properties.py",  # (~26)
    "test_vae.py",  # (~23)
    "test_counts.py",  # (~22)
    "test_nets.py",  # (~22)
    "test_scvi_tools_scar.py",  # (~17)
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def trained_model():
    """``(adata, model)``: a small trained model (200 cells x 40 genes, 16 hidden units, 4 latent dimensions, 2 epochs)
    for the tests that need "a trained model" and not a particular training. Built once per process (per xdist
    worker) and shared across files: a test must not change it (train it again, re-register its AnnData, ...)."""
    from scar_jax import SCAR
    from scar_jax.datasets import simulate

    adata = simulate(n_cells=200, n_genes=40, seed=0)
    SCAR.setup_anndata(adata)
    model = SCAR(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, enable_progress_bar=False)
    return adata, model


@pytest.fixture(scope="module")
def training_setup():
    """``(net, config, data, ambient, tx, epoch_fn, rows, fresh_state)``: 300 simulated cells x 40 genes on the
    device, a compiled epoch of minibatches of 64 over 250 training rows, and fresh train states (test_train,
    test_fit)."""
    import jax.numpy as jnp
    import numpy as np

    from scar_jax import counts, train
    from scar_jax.datasets import simulate
    from scar_jax.vae import SCARConfig, init_variables

    adata = simulate(n_cells=300, n_genes=40, seed=3)
    config = SCARConfig(n_genes=40, n_hidden=16, n_latent=4)
    net = config.make_net()
    x = adata.X
    library = np.asarray(x.sum(1), np.float32)
    data = train.CellData(counts.to_device(x), jnp.asarray(library), jnp.zeros(300, jnp.int32))
    ambient = jnp.asarray(adata.varm["true_ambient_profile"].T, jnp.float32)
    tx = train.make_optimizer()
    epoch_fn = train.make_train_epoch(net, config, tx, 64)
    rows = jnp.arange(250, dtype=jnp.int32)  # 3 full minibatches + one of 58

    def fresh_state():
        return train.init_train_state(init_variables(net, jax.random.key(0), 40), tx, jax.random.key(1))

    return net, config, data, ambient, tx, epoch_fn, rows, fresh_state
