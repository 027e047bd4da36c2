"""scar_jax.training: SCAR.train's orchestration (argument checks before any work, the result kept)."""

import pytest

from scar_jax import SCAR, arguments, training
from scar_jax.datasets import simulate

SIZES = {"train_size": None, "validation_size": None}
TRAINER = {"enable_progress_bar": False}


def small_model():
    adata = simulate(n_cells=60, n_genes=12, seed=0)
    SCAR.setup_anndata(adata)
    return SCAR(adata, n_hidden=8, n_latent=2)


def run(model, max_epochs=2, batch_size=16):
    options = arguments.trainer_options(TRAINER)
    training.train_model(
        model, max_epochs, "auto", "auto", SIZES, True, batch_size, False, {}, TRAINER, options, None, 10
    )


def test_train_model_checks_arguments_before_training():
    model = small_model()
    with pytest.raises(ValueError, match="batch_size"):
        run(model, batch_size=0)
    with pytest.raises(ValueError, match="max_epochs"):
        run(model, max_epochs=0)
    assert not model.is_trained


def test_train_model_keeps_the_result_on_the_model():
    model = small_model()
    run(model)
    assert model.is_trained and len(model.history_rows) == 2 and model.training_time_s > 0
    assert len(model.train_indices) + len(model.validation_indices) + len(model.test_indices) == 60
