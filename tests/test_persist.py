"""scar_jax.persist: the model's record, save and the parts of a load."""

import numpy as np
import pytest

from scar_jax import SCAR, persist


def test_record_holds_what_a_load_needs(trained_model):
    adata, model = trained_model
    record = persist.record(model)
    assert record["var_names"] == list(adata.var_names) and record["seed"] == model.seed
    assert record["config"]["n_latent"] == 4 and record["feature_type"] == "mRNA"


def test_save_then_load_parts_round_trip(trained_model, tmp_path):
    adata, model = trained_model
    persist.save(model, str(tmp_path / "m"), None, False, False)
    parts = persist.load_parts(str(tmp_path / "m"), adata, None)
    assert parts["adata"] is adata and parts["config"] == model.config and parts["is_trained"]
    np.testing.assert_array_equal(parts["split"][0], model.train_indices)
    assert parts["history_rows"] == model.history_rows
    loaded = SCAR._from_parts(**parts)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    with pytest.raises(ValueError, match="saved without its AnnData"):
        persist.load_parts(str(tmp_path / "m"), None, None)
