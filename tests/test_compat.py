"""Drop-in for scvi-tools users (issue 22): ``prob=0`` in the ambient estimate, Lightning's trainer keywords
(honoured, mapped or warned, each with a test here), ``data_registry(registry_key)``, duplicated gene names.

One small AnnData (60 cells x 12 genes, set up with a layer, batches, labels and size factors) and one tiny
network, so that the trainings share two compilations: one with and one without max_steps and clipping."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import anndata as ad
import jax
import numpy as np
import optax
import pytest
import scipy.sparse as sp

from scar_jax import SCAR, arguments
from scar_jax import fit as fit_module
from scar_jax import train as train_module
from scar_jax.ambient import estimate_ambient_profile, pooled_profile
from scar_jax.datasets import simulate

SMALL = dict(n_hidden=8, n_latent=2, n_layers=1, gene_likelihood="poisson")  # poisson: size factors allowed
QUIET = dict(enable_progress_bar=False)


# ---------------------------------------------------------------------------------------------- prob = 0
def test_prob_zero_makes_every_droplet_with_enough_counts_cell_free():
    """scvi-tools: threshold ``log(0) * n_genes = -inf``, so every scored droplet is cell-free."""
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(300, 20)).astype(np.float64)
    x[:40] = 0
    x[:40, 0] = 1  # 40 droplets with a single count: below min_raw_counts=2
    x[40:60, :5] *= 100  # "cells": far from the pooled profile
    raw = sp.csr_matrix(x)
    estimate = estimate_ambient_profile(raw, prob=0.0, min_raw_counts=2, iterations=2, sample=None)
    np.testing.assert_array_equal(estimate.droplets, np.arange(40, 300))
    assert estimate.cell_free.all()  # the "cells" too: their log-probabilities are far below the others'
    assert estimate.log_prob[:20].max() < estimate.log_prob[20:].min()
    np.testing.assert_allclose(estimate.profile, pooled_profile(raw[40:]), rtol=1e-12)


@pytest.mark.parametrize("prob", [-0.1, 1.0, 1.5, float("nan")])
def test_prob_out_of_range_is_refused(prob):
    raw = sp.csr_matrix(np.random.default_rng(0).poisson(3.0, size=(100, 10)).astype(np.float64))
    with pytest.raises(ValueError, match=r"prob must be .*in \[0, 1\)"):
        estimate_ambient_profile(raw, prob=prob)


def test_get_ambient_profile_with_prob_zero_as_the_reference_test_calls_it():
    adata = simulate(n_cells=60, n_genes=12, seed=3)
    profile = SCAR.get_ambient_profile(adata, adata, prob=0.0, iterations=1, sample=100)
    np.testing.assert_allclose(profile[:, 0], pooled_profile(adata.X), rtol=1e-12)  # every cell is "cell-free"


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    adata = simulate(n_cells=60, n_genes=12, n_batches=2, seed=3)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()  # X is not the counts: the layer is
    adata.obs["sf"] = np.linspace(0.5, 2.0, adata.n_obs)
    SCAR.setup_anndata(adata, batch_key="batch", labels_key="cell_type", layer="counts", size_factor_key="sf")
    return adata


# ---------------------------------------------------------------------------------------------- data_registry
def test_data_registry_returns_what_the_model_reads(adata):
    model = SCAR(adata, **SMALL)
    x = model.data_registry("X")
    assert x is adata.layers["counts"]  # the counts the model trains on, not X and not a copy
    np.testing.assert_array_equal(model._read_cells(adata).x.toarray(), x.toarray())
    np.testing.assert_array_equal(model.data_registry("batch").ravel(), adata.obs["batch"].cat.codes)
    assert model.data_registry("batch").shape == (60, 1)
    np.testing.assert_array_equal(model.data_registry("labels").ravel(), adata.obs["cell_type"].cat.codes)
    np.testing.assert_allclose(model.data_registry("size_factor").ravel(), adata.obs["sf"], rtol=1e-6)
    with pytest.raises(ValueError, match="registry_key"):
        model.data_registry("protein_expression")
    # without a key: where each field is read from (the dict the data_registry property gave before)
    assert model.data_registry() == {
        "X": {"attr_name": "layers", "attr_key": "counts"},
        "batch": {"attr_name": "obs", "attr_key": "batch"},
        "labels": {"attr_name": "obs", "attr_key": "cell_type"},
        "size_factor": {"attr_name": "obs", "attr_key": "sf"},
    }


# ---------------------------------------------------------------------------------------------- trainer keywords
def history_epochs(model: SCAR, name: str) -> list[int]:
    return [int(e) for e in model.history[name].index]


def test_check_val_every_n_epoch_runs_validation_every_n_epochs(adata):
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=5, batch_size=16, check_val_every_n_epoch=2, **QUIET)
    assert history_epochs(model, "elbo_train") == [0, 1, 2, 3, 4]
    assert history_epochs(model, "elbo_validation") == [1, 3]  # as Lightning: after epochs 2 and 4 (1-based)
    model.train(max_epochs=2, batch_size=16, check_val_every_n_epoch=1, **QUIET)
    assert history_epochs(model, "elbo_validation") == [0, 1]


def test_early_stopping_counts_validation_passes(adata):
    # min_delta so large that only the first check improves: the run stops `patience` checks later
    stop = dict(early_stopping=True, early_stopping_patience=2, early_stopping_min_delta=1e9, batch_size=16, **QUIET)
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=20, check_val_every_n_epoch=3, **stop)
    assert len(model.history_rows) == 9  # checks after epochs 3, 6, 9 (1-based): improved, then 2 without
    assert history_epochs(model, "elbo_validation") == [2, 5, 8]
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=20, **stop)
    assert len(model.history_rows) == 3  # every epoch checked


def largest_change(model: SCAR, before: list[np.ndarray]) -> float:
    after = [np.asarray(x) for x in jax.tree.leaves(model.variables["params"])]
    return max(float(np.abs(a - b).max()) for a, b in zip(after, before, strict=True))


@pytest.fixture(scope="module")
def limited(adata) -> tuple[SCAR, SCAR]:
    """Trained with max_steps=6 and gradient_clip_val=1e-7, and without either (4 steps per epoch)."""
    models = []
    for kwargs in ({"max_steps": 6, "gradient_clip_val": 1e-7}, {"max_steps": -1, "gradient_clip_val": 0.0}):
        model = SCAR(adata, **SMALL)
        model.before = [np.asarray(x) for x in jax.tree.leaves(model.variables["params"])]
        model.train(max_epochs=2, batch_size=16, train_size=1.0, **kwargs, **QUIET)
        models.append(model)
    return models[0], models[1]


def test_max_steps_stops_part_way_through_an_epoch(limited, adata):
    model, unlimited = limited
    assert int(model._state.step) == 6 and len(model.history_rows) == 2  # the second epoch stopped after 2 steps
    assert int(unlimited._state.step) == 8 and len(unlimited.history_rows) == 2  # -1: no limit (Lightning's)
    with pytest.raises(ValueError, match="max_steps"):
        SCAR(adata, **SMALL).train(max_epochs=1, max_steps=0, **QUIET)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_is_applied_before_weight_decay_and_adam(algorithm):
    params = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    grads = {"w": np.array([30.0, -40.0, 0.0], np.float32)}  # norm 50
    clipped = {"w": grads["w"] / 50.0 if algorithm == "norm" else np.array([1.0, -1.0, 0.0], np.float32)}
    tx = train_module.make_optimizer(1e-3, 0.01, 1e-6, gradient_clip=(1.0, algorithm))
    plain = train_module.make_optimizer(1e-3, 0.01, 1e-6)
    got, _ = tx.update(grads, tx.init(params), params)
    expected, _ = plain.update(clipped, plain.init(params), params)
    np.testing.assert_allclose(got["w"], expected["w"], rtol=1e-6)


def test_gradient_clip_val_reaches_training(limited, adata):
    """Clipping the gradient to a tiny norm leaves Adam's steps tiny too (its eps is 0.01); 0: no clipping."""
    clipped, plain = limited
    assert largest_change(clipped, clipped.before) < 1e-5 < 1e-4 < largest_change(plain, plain.before)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        SCAR(adata, **SMALL).train(max_epochs=1, gradient_clip_val=-1.0)
    with pytest.raises(ValueError, match="gradient_clip_algorithm"):
        SCAR(adata, **SMALL).train(max_epochs=1, gradient_clip_val=1.0, gradient_clip_algorithm="max")


@pytest.mark.parametrize(
    ("precision", "expected"),
    [("32-true", "float32"), (32, "float32"), ("32", "float32"), ("bf16-mixed", "bfloat16"), ("bf16", "bfloat16")],
)
def test_precision_maps_to_the_matmul_precision_of_training(adata, monkeypatch, precision, expected):
    seen = []
    compiled = fit_module.compiled_training

    def spy(config, *args):
        seen.append(config.matmul_precision)
        # the mapping is what is tested, not the reduced-precision training (test_nets): reuse the float32
        # compilation rather than compile another program
        return compiled(dataclasses.replace(config, matmul_precision="float32"), *args)

    monkeypatch.setattr(fit_module, "compiled_training", spy)  # fit_model compiles through it
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=1, batch_size=16, precision=precision, **QUIET)
    assert seen == [expected]
    assert model.config.matmul_precision == "float32"  # inference keeps the model's own setting, as Lightning


@pytest.mark.parametrize("precision", ["16-mixed", 16, "bf16-true", "64-true", "transformer-engine"])
def test_precision_without_a_matmul_option_is_refused(adata, precision):
    with pytest.raises(ValueError, match="precision"):
        SCAR(adata, **SMALL).train(max_epochs=1, precision=precision)


def test_accelerator_and_devices_map_to_jax_devices(adata):
    cpu = jax.devices("cpu")[0]
    for accelerator, devices in [("cpu", 1), ("cpu", [0]), ("auto", "auto"), ("cpu", -1)]:
        model = SCAR(adata, **SMALL)
        model.train(max_epochs=1, batch_size=16, accelerator=accelerator, devices=devices, **QUIET)
        if accelerator == "cpu":
            assert model.device == cpu
    if not any(d.platform == "tpu" for d in jax.devices()):
        with pytest.raises(ValueError, match="accelerator='tpu'"):
            SCAR(adata, **SMALL).train(max_epochs=1, accelerator="tpu")
    with pytest.raises(ValueError, match="devices"):
        SCAR(adata, **SMALL).train(max_epochs=1, accelerator="cpu", devices=len(jax.devices("cpu")) + 1)


def test_enable_progress_bar_is_honoured(adata, capsys):
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    assert "Training" not in capsys.readouterr().err
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=True)
    assert "Training" in capsys.readouterr().err


@pytest.mark.parametrize("keyword", sorted(arguments.NO_EFFECT_TRAINER_KWARGS))
def test_keywords_without_effect_are_named_in_one_warning(keyword):
    with pytest.warns(UserWarning, match=rf"trainer keywords \['{keyword}'\] have no effect") as record:
        options = arguments.trainer_options({keyword: True})
    assert len(record) == 1 and options == arguments.TrainerOptions()


def test_training_with_the_keywords_users_pass(adata):
    """The keywords of the issue, together: one warning naming those without effect; training runs."""
    model = SCAR(adata, **SMALL)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.train(
            max_epochs=2,
            batch_size=16,
            check_val_every_n_epoch=1,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            logger=False,
            enable_checkpointing=False,
            log_every_n_steps=5,
            gradient_clip_val=0.0,  # Lightning's "no clipping" and "no step limit" (honoured: tests above)
            precision="32-true",
            max_steps=-1,
        )
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert messages == [m for m in messages if "have no effect" in m] and len(messages) == 1
    assert "['enable_checkpointing', 'log_every_n_steps', 'logger']" in messages[0]
    assert record[0].filename == __file__  # the warning points at the caller's line
    assert len(model.history_rows) == 2


@pytest.mark.parametrize("keyword", ["gradient_clip", "strategy", "callbacks", "max_time"])
def test_other_trainer_keywords_are_still_refused(adata, keyword):
    with pytest.raises(TypeError, match=rf"unsupported trainer keywords \['{keyword}'\]"):
        SCAR(adata, **SMALL).train(max_epochs=1, **{keyword: 1})


def test_every_trainer_keyword_of_the_table_is_documented():
    text = (Path(__file__).resolve().parents[1] / "docs" / "compat.md").read_text()
    for keyword in [*arguments.TRAINER_RANGES, *arguments.NO_EFFECT_TRAINER_KWARGS, "accelerator", "devices"]:
        assert f"`{keyword}`" in text, keyword


# ---------------------------------------------------------------------------------------------- duplicated genes
@pytest.mark.filterwarnings("ignore:Variable names are not unique")  # anndata's own warning
def test_duplicated_gene_names_are_refused_with_the_fix():
    adata = simulate(n_cells=60, n_genes=12, seed=3)
    adata.var_names = [f"g{i}" for i in range(10)] + ["g0", "g1"]
    before = adata.copy()
    with pytest.raises(ValueError, match=r"duplicated names \(e\.g\. \['g0', 'g1'\]\).*var_names_make_unique\(\)"):
        SCAR.setup_anndata(adata)
    assert "_scar_jax" not in adata.uns and list(adata.var_names) == list(before.var_names)
    with pytest.raises(ValueError, match="var_names_make_unique"):
        SCAR.get_ambient_profile(adata, before, prob=0.0)
    adata.var_names_make_unique()
    SCAR.setup_anndata(adata)  # the fix works
    adata.var_names = before.var_names  # renamed after the setup: refused by the model too
    with pytest.raises(ValueError, match="var_names_make_unique"):
        SCAR(adata, **SMALL)


def test_negative_learning_rate_is_refused(adata):
    with pytest.raises(ValueError, match=r"plan_kwargs\['lr'\] must be a finite number > 0, got -0\.001"):
        SCAR(adata, **SMALL).train(max_epochs=1, plan_kwargs={"lr": -1e-3})


def test_optimizer_clip_chain_keeps_the_state_layout_without_clipping():
    """Without clipping the optimizer is the one of before (saved optimizer states still load)."""
    params = {"w": np.zeros(3, np.float32)}
    state = train_module.make_optimizer().init(params)
    assert len(state) == 2 and isinstance(state[1][0], optax.ScaleByAdamState)
