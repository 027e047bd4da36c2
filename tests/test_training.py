"""scar_jax.training: SCAR.train's orchestration (argument checks before any work, the result kept)."""

import pytest

from scar_jax import SCAR, training
from scar_jax.datasets import simulate

SIZES = {"train_size": None, "validation_size": None}


def small_model():
    adata = simulate(n_cells=60, n_genes=12, seed=0)
    SCAR.setup_anndata(adata)
    return SCAR(adata, n_hidden=8, n_latent=2)


def test_train_model_checks_arguments_before_training():
    model = small_model()
    with pytest.raises(TypeError):
        training.train_model(model, 1, "auto", "auto", SIZES, True, 16, False, {"nope": 1}, {}, None, 10)
    with pytest.raises(ValueError, match="batch_size"):
        training.train_model(model, 1, "auto", "auto", SIZES, True, 0, False, {}, {}, None, 10)
    assert not model.is_trained


def test_train_model_keeps_the_result_on_the_model():
    model = small_model()
    trainer = {"enable_progress_bar": False}
    training.train_model(model, 2, "auto", "auto", SIZES, True, 16, False, {}, trainer, None, 10)
    assert model.is_trained and len(model.history_rows) == 2 and model.training_time_s > 0
    assert len(model.train_indices) + len(model.validation_indices) + len(model.test_indices) == 60
