"""Every bad input gets a clear error naming the field, and the user's AnnData is left as it was."""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scar_jax import SCAR
from scar_jax.datasets import simulate
from scar_jax.io import FORMAT_VERSION

SMALL = dict(n_hidden=8, n_latent=2)


def fresh() -> ad.AnnData:
    return simulate(n_cells=60, n_genes=12, n_batches=2, seed=3)


@functools.cache
def trained() -> tuple[ad.AnnData, SCAR]:
    adata = fresh()
    SCAR.setup_anndata(adata, batch_key="batch")
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=1, enable_progress_bar=False)
    return adata, model


def set_x(value):
    def mutate(adata):
        adata.X = value(adata)

    return mutate


def with_layer(value):
    def mutate(adata):
        adata.layers["counts"] = value(adata)

    return mutate


def dense(adata):
    return adata.X.toarray().astype(np.float64)


def setup(**kwargs):
    return lambda adata: SCAR.setup_anndata(adata, **kwargs)


def set_up(adata):
    SCAR.setup_anndata(adata)


def first_cells(n: int):
    """A new, set-up AnnData of the first ``n`` cells (a ``prepare`` may return the AnnData to use)."""

    def prepare(adata):
        small = adata[:n].copy()
        with warnings.catch_warnings():  # a few cells leave some genes without counts: warned, not refused
            warnings.simplefilter("ignore", UserWarning)
            SCAR.setup_anndata(small)
        return small

    return prepare


def set_up_with_size_factor(value):
    def prepare(adata):
        adata.obs["sf"] = value
        SCAR.setup_anndata(adata, size_factor_key="sf")

    return prepare


def nan_x(adata):
    x = dense(adata)
    x[0, 0] = np.nan
    return x


def inf_dense(adata):
    x = dense(adata)
    x[1, 2] = np.inf
    return x


def inf_sparse(adata):
    x = adata.X.astype(np.float64)
    x.data[0] = np.inf
    return x


def zero_cell(adata):
    x = dense(adata)
    x[5] = 0
    return x


# (name, prepare(adata) or None, call(adata), exception, message fragment); prepare may return another AnnData
SETUP_CASES = [
    ("non-integer dense X", set_x(lambda a: dense(a) + 0.5), setup(), ValueError, "non-integer"),
    ("non-integer sparse X", set_x(lambda a: a.X.astype(np.float32) * 0.5), setup(), ValueError, "non-integer"),
    ("negative dense X", set_x(lambda a: -dense(a)), setup(), ValueError, "negative"),
    ("negative sparse X", set_x(lambda a: -a.X), setup(), ValueError, "negative"),
    ("NaN dense X", set_x(nan_x), setup(), ValueError, "NaN"),
    ("inf sparse X", set_x(inf_sparse), setup(), ValueError, "infinite"),
    ("non-integer layer", with_layer(lambda a: dense(a) * 0.3), setup(layer="counts"), ValueError, "layers"),
    ("NaN layer", with_layer(nan_x), setup(layer="counts"), ValueError, "layers"),
    ("negative sparse layer", with_layer(lambda a: -a.X), setup(layer="counts"), ValueError, "layers"),
    ("inf dense X", set_x(inf_dense), setup(), ValueError, "infinite"),
    ("string X", set_x(lambda a: np.full(a.shape, "a")), setup(), TypeError, "numbers"),
    ("cell with zero counts", set_x(zero_cell), setup(), ValueError, "zero counts"),
    ("cell with zero counts in a layer", with_layer(zero_cell), setup(layer="counts"), ValueError, "layers"),
    ("empty AnnData", None, lambda a: SCAR.setup_anndata(a[:0].copy()), ValueError, "empty"),
    ("not an AnnData", None, lambda a: SCAR.setup_anndata(a.X), TypeError, "AnnData"),
    ("unknown batch_key", None, setup(batch_key="nope"), ValueError, "batch_key"),
    ("unknown labels_key", None, setup(labels_key="nope"), ValueError, "labels_key"),
    ("unknown layer", None, setup(layer="nope"), ValueError, "layer"),
    ("unknown size_factor_key", None, setup(size_factor_key="nope"), ValueError, "size_factor_key"),
    ("unknown setup keyword", None, setup(batch="batch"), TypeError, "unknown keyword"),
    (
        "missing batch values",
        lambda a: a.obs.__setitem__("b2", [None] + ["x"] * 59),
        setup(batch_key="b2"),
        ValueError,
        "missing values",
    ),
    ("model before setup", None, lambda a: SCAR(a), ValueError, "setup_anndata"),
    ("sparsity above 1", set_up, (lambda a: SCAR(a, sparsity=1.5)), ValueError, "sparsity"),
    ("unknown likelihood", set_up, (lambda a: SCAR(a, gene_likelihood="gauss")), ValueError, "gene_likelihood"),
    (
        "unknown activation",
        set_up,
        (lambda a: SCAR(a, scale_activation="relu")),
        ValueError,
        "scale_activation",
    ),
    ("n_latent < 1", set_up, (lambda a: SCAR(a, n_latent=0)), ValueError, "n_latent"),
    ("dropout_rate 1", set_up, (lambda a: SCAR(a, dropout_rate=1.0)), ValueError, "dropout_rate"),
    ("unknown feature_type", set_up, (lambda a: SCAR(a, feature_type="protein")), ValueError, "feature_type"),
    ("unknown model keyword", set_up, (lambda a: SCAR(a, n_hiden=3)), TypeError, "unknown keyword"),
    (
        "ambient profile too short",
        set_up,
        (lambda a: SCAR(a, ambient_profile=np.ones(5))),
        ValueError,
        "one row per gene",
    ),
    (
        "ambient profile negative",
        set_up,
        (lambda a: SCAR(a, ambient_profile=-np.ones(12))),
        ValueError,
        "non-negative",
    ),
    (
        "ambient profile NaN",
        set_up,
        (lambda a: SCAR(a, ambient_profile=np.full(12, np.nan))),
        ValueError,
        "finite",
    ),
    (
        "ambient profile all zero",
        set_up,
        (lambda a: SCAR(a, ambient_profile=np.zeros(12))),
        ValueError,
        "all zero",
    ),
    ("ambient profile unknown key", set_up, (lambda a: SCAR(a, ambient_profile="nope")), ValueError, "varm"),
    (
        "ambient profile 3 columns",
        set_up,
        (lambda a: SCAR(a, ambient_profile=np.ones((12, 3)))),
        ValueError,
        "columns",
    ),
    # fewer cells than a batch: one smaller minibatch (test below), unless < 3 training cells remain
    ("2 cells (fewer than 3 to train on)", first_cells(2), lambda a: SCAR(a, **SMALL).train(), ValueError, "2 cells"),
    ("1 cell", first_cells(1), lambda a: SCAR(a, **SMALL).train(batch_size=1), ValueError, "batch_size"),
    (
        "size factors with binomial",
        set_up_with_size_factor(1.0),
        lambda a: SCAR(a),
        ValueError,
        "size_factor_key",
    ),
    (
        "non-positive size factors",
        set_up_with_size_factor(0.0),
        lambda a: SCAR(a, gene_likelihood="poisson"),
        ValueError,
        "size_factor_key",
    ),
]


def model_call(call):
    """A call on the shared trained model with a fresh copy of its AnnData."""

    def run(adata):
        _, model = trained()
        call(model, adata)

    return run


def trained_adata() -> ad.AnnData:
    return trained()[0].copy()


MODEL_CASES = [
    (
        "genes in another order",
        lambda a: model_call(lambda m, _: m.get_elbo(a[:, ::-1].copy())),
        ValueError,
        "var_names",
    ),
    ("other genes", lambda a: model_call(lambda m, _: m.get_elbo(a[:, :5].copy())), ValueError, "var_names"),
    ("unseen batch category", None, ValueError, "unseen"),
    ("indices out of range", lambda a: model_call(lambda m, _: m.get_elbo(indices=[0, 10_000])), ValueError, "indices"),
    ("indices not integers", lambda a: model_call(lambda m, _: m.get_elbo(indices=[0.5])), ValueError, "indices"),
    (
        "unknown plan_kwargs",
        lambda a: model_call(lambda m, _: m.train(plan_kwargs={"learning_rate": 1})),
        TypeError,
        "plan_kwargs",
    ),
    (
        "unknown trainer keyword",
        lambda a: model_call(lambda m, _: m.train(max_epochs=1, gradient_clip=1)),
        TypeError,
        "trainer keywords",
    ),
    ("max_epochs 0", lambda a: model_call(lambda m, _: m.train(max_epochs=0)), ValueError, "max_epochs"),
    ("batch_size 0", lambda a: model_call(lambda m, _: m.train(max_epochs=1, batch_size=0)), ValueError, "batch_size"),
    (  # a minibatch of one cell: BatchNorm's batch variance is 0 (PyTorch refuses it too)
        "batch_size 1",
        lambda a: model_call(lambda m, _: m.train(max_epochs=1, batch_size=1)),
        ValueError,
        "batch_size=1",
    ),
    (
        "unknown accelerator",
        lambda a: model_call(lambda m, _: m.train(max_epochs=1, accelerator="qpu")),
        ValueError,
        "accelerator",
    ),
    ("denoise method", lambda a: model_call(lambda m, _: m.get_denoised_counts(method="magic")), ValueError, "method"),
    ("n_samples 0", lambda a: model_call(lambda m, _: m.get_denoised_counts(n_samples=0)), ValueError, "n_samples"),
    (
        "unknown gene in gene_list",
        lambda a: model_call(lambda m, _: m.get_normalized_expression(gene_list=["x"])),
        ValueError,
        "gene_list",
    ),
]


def _unseen_batch(adata):
    other = adata[:10].copy()
    other.obs["batch"] = pd.Categorical(["batch_9"] * 10)
    _, model = trained()
    model.get_elbo(other)


@pytest.mark.parametrize(("name", "prepare", "call", "exc", "match"), SETUP_CASES, ids=[c[0] for c in SETUP_CASES])
def test_setup_and_model_errors_leave_adata_unchanged(name, prepare, call, exc, match):
    adata = fresh()
    if prepare is not None:
        adata = prepare(adata) or adata
    before = adata.copy()
    with pytest.raises(exc, match=match):
        call(adata)
    assert_same(adata, before)


@pytest.mark.parametrize(("name", "make", "exc", "match"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_inference_errors_leave_adata_unchanged(name, make, exc, match):
    adata = trained_adata()
    before = adata.copy()
    call = _unseen_batch if make is None else make(adata)
    with pytest.raises(exc, match=match):
        call(adata)
    assert_same(adata, before)


def corrupt(edit):
    """A saved copy of the trained model in ``folder / "model"``, edited by ``edit(path)``."""

    def make(folder: Path) -> Path:
        path = folder / "model"
        trained()[1].save(str(path))
        edit(path)
        return path

    return make


def truncate_state(path: Path) -> None:
    data = (path / "state.msgpack").read_bytes()
    (path / "state.msgpack").write_bytes(data[: len(data) // 2])


def truncate_manifest(path: Path) -> None:
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 3])


def newer_format(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))


def foreign(path: Path) -> None:
    for name in os.listdir(path):
        os.remove(path / name)
    (path / "weights.bin").write_bytes(b"not a model")


def scvi_tools_save(path: Path) -> None:
    foreign(path)
    (path / "model.pt").write_bytes(b"\x80\x02not really torch")


def load(path: Path, adata: ad.AnnData) -> None:
    SCAR.load(str(path), adata)


def load_reordered(path: Path, adata: ad.AnnData) -> None:
    SCAR.load(str(path), adata[:, ::-1].copy())


def save_again(path: Path, adata: ad.AnnData) -> None:
    trained()[1].save(str(path))


saved = corrupt(lambda path: None)


# (name, make(folder) -> directory, call(directory, adata), exception, message fragment)
PERSISTENCE_CASES = [
    ("save onto an existing directory", saved, save_again, ValueError, "overwrite"),
    ("load a missing directory", lambda f: f / "missing", load, ValueError, "missing is not a directory"),
    ("load a truncated state", corrupt(truncate_state), load, ValueError, "truncated"),
    ("load a truncated manifest", corrupt(truncate_manifest), load, ValueError, "manifest.json is corrupted"),
    ("load a foreign directory", corrupt(foreign), load, ValueError, "not a scar-jax model directory"),
    ("load a scvi-tools save", corrupt(scvi_tools_save), load, ValueError, "scvi-tools"),
    ("load a newer format version", corrupt(newer_format), load, ValueError, f"save format {FORMAT_VERSION + 1}"),
    ("load with genes in another order", saved, load_reordered, ValueError, "var_names"),
]


@pytest.mark.parametrize(
    ("name", "make", "call", "exc", "match"), PERSISTENCE_CASES, ids=[c[0] for c in PERSISTENCE_CASES]
)
def test_persistence_errors_leave_adata_unchanged(name, make, call, exc, match, tmp_path):
    directory = make(tmp_path)
    adata = trained_adata()
    before, model_before = adata.copy(), trained()[0].copy()
    with pytest.raises(exc, match=match):
        call(directory, adata)
    assert_same(adata, before)
    assert_same(trained()[0], model_before)  # the model's own AnnData too


def test_unnormalised_ambient_profile_is_normalised_with_a_warning():
    """Decision: an ambient profile that does not sum to 1 (counts, say) is normalised, with a warning."""
    adata = fresh()
    SCAR.setup_anndata(adata)
    before = adata.copy()
    profile = np.arange(1.0, 13.0)  # counts of an empty-droplet pool, not frequencies
    with pytest.warns(UserWarning, match="ambient_profile does not sum to 1.*normalising"):
        model = SCAR(adata, ambient_profile=profile, **SMALL)
    np.testing.assert_allclose(model.ambient_profile[0], profile / profile.sum(), rtol=1e-6)
    assert_same(adata, before)


def test_inference_before_training():
    adata = fresh()
    SCAR.setup_anndata(adata)
    model = SCAR(adata, **SMALL)
    before = adata.copy()
    for method in (model.get_latent_representation, model.get_elbo, model.get_denoised_counts):
        with pytest.raises(RuntimeError, match="not trained"):
            method()
    assert_same(adata, before)


def assert_same(adata: ad.AnnData, before: ad.AnnData) -> None:
    """Same X, layers, obs, var, obsm, varm and uns keys as the copy taken before the failed call."""
    assert adata.shape == before.shape
    for now, then in [(adata.X, before.X), *((adata.layers[k], before.layers[k]) for k in before.layers)]:
        now = now.toarray() if sp.issparse(now) else np.asarray(now)
        then = then.toarray() if sp.issparse(then) else np.asarray(then)
        np.testing.assert_array_equal(now, then)
    assert set(adata.layers) == set(before.layers)
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    assert set(adata.obsm) == set(before.obsm) and set(adata.varm) == set(before.varm)
    assert set(adata.uns) == set(before.uns)


@pytest.mark.parametrize("likelihood", ["b", "zinb"])  # zinb runs the NB code too
def test_adversarial_but_valid_data_trains_without_nan(likelihood):
    """Cells with 1 count, one gene holding most counts, libraries of 10^6, noise ratios near 0 and 1."""
    rng = np.random.default_rng(0)
    n_genes = 20
    x = rng.poisson(3.0, size=(80, n_genes)).astype(np.float64)
    x[:10] = 0
    x[np.arange(10), rng.integers(0, n_genes, 10)] = 1  # single-count cells
    x[10:20, 0] = 50_000  # one gene with most of the counts
    x[20:30] *= 0  # libraries of 10^6, spread over the genes
    x[20:30] += rng.multinomial(1_000_000, np.full(n_genes, 1 / n_genes), size=10)
    adata = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=[f"c{i}" for i in range(80)]))
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    SCAR.setup_anndata(adata)
    ambient = np.full(n_genes, 1e-9)
    ambient[0] = 1.0  # ambient is (almost) all gene 0: noise near 1 for cells 10-19, near 0 elsewhere
    model = SCAR(adata, ambient_profile=ambient / ambient.sum(), gene_likelihood=likelihood, **SMALL)
    model.train(max_epochs=15, batch_size=32, enable_progress_bar=False)
    losses = np.array([row["train_loss_epoch"] for row in model.history_rows])
    assert np.isfinite(losses).all()
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(model.variables))
    assert np.isfinite(model.get_elbo(return_mean=False)).all()
    noise = model.get_noise_ratio()
    assert np.isfinite(noise).all() and ((noise >= 0) & (noise <= 1)).all()
    denoised = model.get_denoised_counts().toarray()
    assert (denoised <= x).all()


def test_poisson_with_an_ambient_profile_that_is_zero_for_expressed_genes_stays_finite():
    """Empty-droplet profiles often have exact zeros for genes the cells express: the Poisson rate can then be 0
    at a positive count (the sparse decoder switches the gene off). Before the rate floor in PoissonZeroSafe this
    diverged at epoch 8 (120 cells x 20 genes, 4 such genes)."""
    rng = np.random.default_rng(1)
    x = rng.poisson(2.0, size=(120, 20)).astype(np.float64)
    adata = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=[f"c{i}" for i in range(120)]))
    adata.var_names = [f"g{i}" for i in range(20)]
    SCAR.setup_anndata(adata)
    ambient = rng.uniform(0.5, 1.5, 20)
    ambient[:4] = 0.0
    model = SCAR(adata, ambient_profile=ambient / ambient.sum(), gene_likelihood="poisson", **SMALL)
    model.train(max_epochs=30, batch_size=32, enable_progress_bar=False)
    assert np.isfinite([row["train_loss_epoch"] for row in model.history_rows]).all()
    assert np.isfinite(model.get_elbo(return_mean=False)).all()
    assert (model.get_denoised_counts().toarray() <= x).all()


def with_zero_genes(adata: ad.AnnData, genes=(0, 3, 7)) -> ad.AnnData:
    x = dense(adata)
    x[:, list(genes)] = 0
    adata.X = sp.csr_matrix(x)
    return adata


def test_genes_with_zero_counts_are_accepted_with_a_warning():
    """Real matrices keep genes that no cell expresses: a warning naming them and the fix, not an error."""
    adata = with_zero_genes(fresh())
    before = adata.copy()
    with pytest.warns(UserWarning, match=r"adata\.X has 3 of 12 genes with zero counts") as record:
        SCAR.setup_anndata(adata)
    message = str(record[0].message)
    assert "gene_0000" in message and "gene_0003" in message and "filter_genes(adata, min_counts=1)" in message
    assert set(adata.uns) - set(before.uns) == {"_scar_jax"}  # only the setup record was written
    adata.uns.pop("_scar_jax")
    assert_same(adata, before)


@pytest.mark.parametrize("likelihood", ["poisson"])
def test_genes_with_zero_counts_train_to_finite_results(likelihood):
    """Their default ambient share is 0 and their native frequency can be exactly 0: the probability of
    the observed 0 is then 1, with finite gradients, for every likelihood (tests/test_properties.py
    checks all four at probability 0). Poisson is trained here: its ``xlogy`` gave a NaN gradient at rate
    0 and count 0, so this data diverged in the first epoch before ``PoissonZeroSafe``."""
    adata = with_zero_genes(fresh())
    with pytest.warns(UserWarning, match="zero counts"):
        SCAR.setup_anndata(adata, batch_key="batch")
    model = SCAR(adata, gene_likelihood=likelihood, **SMALL)
    assert (model.ambient_profile[:, [0, 3, 7]] == 0).all()
    model.train(max_epochs=5, batch_size=16, train_size=1.0, enable_progress_bar=False)  # no validation compile
    assert np.isfinite([row["train_loss_epoch"] for row in model.history_rows]).all()
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(model.variables))
    denoised = model.get_denoised_counts().toarray()
    assert (denoised[:, [0, 3, 7]] == 0).all() and (denoised <= dense(adata)).all()


def test_fewer_cells_than_a_batch_train_as_one_smaller_minibatch():
    adata = fresh()[:10].copy()  # 9 training cells, batch_size 128
    SCAR.setup_anndata(adata)
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=3, enable_progress_bar=False)
    assert len(model.train_indices) == 9 and len(model.validation_indices) == 1
    assert int(model._state.step) == 3  # one optimizer step (one minibatch) per epoch
    assert np.isfinite([row["train_loss_epoch"] for row in model.history_rows]).all()


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_validating_pass_is_chunked_and_exact(monkeypatch, fmt):
    """The one pass over row chunks finds a bad value in any chunk and sums exactly like SciPy/NumPy."""
    import scar_jax.data as data

    monkeypatch.setattr(data, "HOST_CHUNK_ENTRIES", 7)  # many small chunks
    rng = np.random.default_rng(0)
    dense = rng.poisson(2.0, (23, 5)).astype(np.float32)
    dense[:, 0] += 1  # every cell has counts
    x = sp.csr_matrix(dense) if fmt == "csr" else dense
    summary = data.validate_counts(x, "adata.X")
    np.testing.assert_array_equal(summary.row_sums, dense.sum(axis=1, dtype=np.float64))
    np.testing.assert_array_equal(summary.column_sums, dense.sum(axis=0, dtype=np.float64))
    assert summary.max_count == dense.max()
    assert len(data.row_chunks(x)) > 3
    for value, match in ((np.nan, "NaN"), (-1.0, "negative"), (0.5, "non-integer")):
        bad = dense.copy()
        bad[21, 3] = value  # in the last chunks
        with pytest.raises(ValueError, match=match):
            data.validate_counts(sp.csr_matrix(bad) if fmt == "csr" else bad, "adata.X")
