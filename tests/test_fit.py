"""The host-side training loop: resumption, early stopping, divergence (the compiled epoch: test_train)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scar_jax import fit


def test_resume_equals_uninterrupted_run(training_setup):
    """Keys derive from (state.key, state.step): 2 + 2 epochs equal 4 epochs, bit for bit."""
    _, _, data, ambient, _, epoch_fn, rows, fresh_state = training_setup
    common = dict(n_epochs_kl_warmup=4, progress_bar=False)
    full, rows_full = fit.fit(epoch_fn, None, fresh_state(), data, rows, None, ambient, max_epochs=4, **common)
    half, _ = fit.fit(epoch_fn, None, fresh_state(), data, rows, None, ambient, max_epochs=2, **common)
    resumed, rows_rest = fit.fit(epoch_fn, None, half, data, rows, None, ambient, max_epochs=4, first_epoch=2, **common)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert [r["kl_weight"] for r in rows_full[2:]] == [r["kl_weight"] for r in rows_rest]


def test_early_stopping_stops_after_patience(training_setup):
    _, _, data, ambient, _, epoch_fn, rows, fresh_state = training_setup
    # min_delta huge: no epoch improves on the first, so training stops after epoch 0 + patience (2) epochs
    stopper = fit.EarlyStopping("elbo_train", patience=2, min_delta=1e9)

    def run(max_epochs, early_stopping):
        return fit.fit(
            epoch_fn,
            None,
            fresh_state(),
            data,
            rows,
            None,
            ambient,
            max_epochs=max_epochs,
            early_stopping=early_stopping,
            progress_bar=False,
        )

    _, rows_out = run(10, stopper)
    assert len(rows_out) == 3
    with pytest.raises(ValueError, match="early_stopping_monitor"):
        run(2, fit.EarlyStopping("elbo_validation"))  # no validation cells: the monitor is not logged


def test_divergence_keeps_the_last_good_epoch(training_setup):
    """A NaN injected into the parameters after epoch 2: fit stops there and hands back epoch 1's state."""
    _, _, data, ambient, _, epoch_fn, rows, fresh_state = training_setup
    calls = []

    def poisoned_epoch(state, *args):
        state, sums = epoch_fn(state, *args)
        calls.append(1)
        if len(calls) == 3:
            state = state.replace(params=jax.tree.map(lambda a: a * jnp.nan, state.params))
        return state, sums

    reference, _ = fit.fit(epoch_fn, None, fresh_state(), data, rows, None, ambient, max_epochs=2, progress_bar=False)
    with pytest.raises(fit.TrainingDiverged, match="epoch 2") as info:
        fit.fit(poisoned_epoch, None, fresh_state(), data, rows, None, ambient, max_epochs=5, progress_bar=False)
    assert len(info.value.rows) == 2 and "those of epoch 1 are kept" in str(info.value)
    for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(info.value.state.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
