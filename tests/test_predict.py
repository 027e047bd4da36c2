"""scar_jax.predict: the multi-pass queries behind SCAR's methods, called directly on a trained model."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scar_jax import predict


def test_expression_options_check_the_keywords(trained_model):
    _, model = trained_model
    assert predict.expression_options(model, {}, None, None, 1) == (False, 1.0)
    assert predict.expression_options(model, {"max_cells": 8}, "importance", None, "latent") == (True, 1.0)
    with pytest.raises(TypeError, match="passed to get_importance_weights"):
        predict.expression_options(model, {"nope": 1}, None, None, 1)
    with pytest.raises(ValueError, match="weights must be None"):
        predict.expression_options(model, {}, "other", None, 1)
    with pytest.raises(ValueError, match="library_size must be a number or 'latent'"):
        predict.expression_options(model, {}, None, None, "observed")


def test_normalized_expression_is_the_methods_draws(trained_model):
    adata, model = trained_model
    values, index, mean = predict.normalized_expression(model, None, [0, 3], 1, False, None, (False, {}), None, True, 0)
    assert values.shape == (2, adata.n_vars) and mean and list(index) == list(adata.obs_names[[0, 3]])
    method = model.get_normalized_expression(indices=[0, 3], return_numpy=True)
    np.testing.assert_array_equal(values, method)
    overall, index, _ = predict.normalized_expression(model, None, None, 1, False, 5, (False, {}), None, True, 0)
    assert overall.shape == (5, adata.n_vars) and index is None


def test_importance_weights_are_normalised(trained_model):
    _, model = trained_model
    w = predict.importance_weights(model, None, np.arange(20), None, None, 8, False, 20, 0)
    assert w.shape == (20,) and np.isclose(w.sum(), 1.0) and (w >= 0).all()


def test_denoised_counts_and_the_calibration_cache(trained_model):
    adata, model = trained_model
    split = predict.denoised_counts(model, None, 1, None, "split", None, 0, None, 50, 0.1)
    assert sp.issparse(split) and (split.toarray() <= adata.X.toarray()).all()
    np.testing.assert_array_equal(split.toarray(), predict.split_counts(model, None, None, None, 1, 0).toarray())
    eps, share, _, rows = predict.calibrated(model, None, [1, 2], None, 10)
    assert eps.shape == (2,) and share.shape[0] == 2 and list(rows) == [1, 2]
    again = predict.calibrated(model, None, [1, 2], None, 10)[0]
    np.testing.assert_array_equal(eps, again)
    with pytest.raises(ValueError, match="method must be"):
        predict.denoised_counts(model, None, 1, None, "other", None, 0, None, 50, 0.1)


def test_differential_expression_and_feature_correlation(trained_model):
    adata, model = trained_model
    groups = {"idx1": np.arange(0, 50), "idx2": np.arange(50, 100)}
    table = predict.differential_expression(model, None, groups, None, "uniform", None, False, n_samples_overall=20)
    assert len(table) == adata.n_vars
    with pytest.raises(ValueError, match="weights must be 'uniform' or 'importance'"):
        predict.differential_expression(model, None, groups, None, "other", None, False)
    samples = np.random.default_rng(0).random((3, 4, 5))
    frame = predict.feature_correlation(samples, np.array(list("abcde")), "pearson")
    assert isinstance(frame, pd.DataFrame) and frame.shape == (5, 5) and np.allclose(np.diag(frame), 1)


def test_write_denoised_counts_refuses_an_existing_file(trained_model, tmp_path):
    _, model = trained_model
    path = tmp_path / "out.h5ad"
    path.write_text("")
    with pytest.raises(ValueError, match="already exists"):
        predict.write_denoised_counts(model, path, None, "denoised", "split", 100, None, 1, 0, 50, 0.1, False, False)
    with pytest.raises(ValueError, match="layer must be a non-empty string"):
        predict.write_denoised_counts(model, path, None, "", "split", 100, None, 1, 0, 50, 0.1, True, False)


def test_differential_abundance_needs_a_sample_column(trained_model):
    adata, model = trained_model
    with pytest.raises(ValueError, match="sample_key must be a column of adata.obs"):
        predict.differential_abundance(model, None, "nope", 128, None, None, 0)
    adata = adata.copy()
    adata.obs["sample"] = np.where(np.arange(adata.n_obs) % 2, "s1", "s2")
    frame = predict.differential_abundance(model, adata, "sample", 128, None, None, 0)
    assert frame.shape == (adata.n_obs, 2)


def test_bayes_factors_and_feature_assignment_read_the_cells_once(trained_model):
    adata, model = trained_model
    cells, rows = model._cells(None, [0, 1, 2])
    bf = predict.bayes_factors(model, cells, rows, None, "micro")
    log_bf = predict.bayes_factors(model, cells, rows, None, "micro", log=True)
    assert bf.shape == (3, adata.n_vars) and np.allclose(np.log(bf), log_bf, rtol=1e-4, atol=1e-4)
    table = predict.assign_features(model, None, 3.0, None, "micro", None)
    assert list(table.index) == list(adata.obs_names)
