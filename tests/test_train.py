"""Training core: schedules, data split, optimizer, compiled epoch and validation, data parallelism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scar_jax import train
from scar_jax.vae import Batch, loss_terms


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, 0.0), (1, 1 / 400), (200, 0.5), (399, 399 / 400), (400, 1.0), (1000, 1.0)],
)
def test_kl_warmup_is_linear_in_the_epoch(epoch, expected):
    assert train.kl_weight_schedule(epoch) == pytest.approx(expected, abs=1e-12)


def test_kl_warmup_bounds_and_off():
    # min + (max - min) * epoch / n: hand values
    assert train.kl_weight_schedule(5, 10, max_kl_weight=0.8, min_kl_weight=0.2) == pytest.approx(0.5)
    assert train.kl_weight_schedule(10, 10, max_kl_weight=0.8, min_kl_weight=0.2) == pytest.approx(0.8)
    assert train.kl_weight_schedule(0, None) == 1.0


@pytest.mark.parametrize(
    ("n_cells", "expected"),
    [(1, 400), (2000, 400), (20000, 400), (40000, 200), (30000, 267), (1_000_000, 8), (100_000_000, 1)],
)
def test_max_epochs_heuristic(n_cells, expected):
    # min(round(20000 / n * 400), 400), at least 1
    assert train.max_epochs_heuristic(n_cells) == expected


def test_split_sizes_and_disjoint():
    tr, va, te = train.split_indices(1000, 0.9, None, True, 128, seed=0)
    assert (len(tr), len(va), len(te)) == (900, 100, 0)
    assert len(np.intersect1d(tr, va)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(1000))
    tr2, va2, _ = train.split_indices(1000, 0.9, None, True, 128, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)


def test_split_moves_tiny_last_batch_to_validation():
    # n_train = ceil(0.9 * 1000) = 900 = 7 * 128 + 4 -> kept; 258 cells at 0.5 -> 129 = 128 + 1 -> 1 moved
    tr, va, _ = train.split_indices(258, 0.5, None, True, 128, seed=1)
    assert (len(tr), len(va)) == (128, 130)


def test_split_with_validation_size_and_test_set():
    tr, va, te = train.split_indices(100, 0.6, 0.3, False, None)
    assert (len(tr), len(va), len(te)) == (60, 30, 10)
    assert np.array_equal(va, np.arange(30)) and np.array_equal(tr, np.arange(30, 90))


def test_split_rejects_bad_sizes():
    with pytest.raises(ValueError, match="train_size"):
        train.split_indices(100, 1.5)
    with pytest.raises(ValueError, match="validation_size"):
        train.split_indices(100, 0.9, 0.5)
    with pytest.raises(ValueError, match="training cells"):
        train.split_indices(2, 0.9)


def test_optimizer_is_torch_adam_with_l2():
    """Three steps of optax chain vs a float64 NumPy re-derivation of torch.optim.Adam(weight_decay=...)."""
    lr, eps, wd = 1e-2, 0.01, 0.1
    tx = train.make_optimizer(lr=lr, eps=eps, weight_decay=wd)
    w = jnp.array([1.0, -2.0, 0.5])
    state = tx.init(w)
    w_np, m, v = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.zeros(3)
    for t in range(1, 4):
        grad = 2 * w  # gradient of sum(w ** 2)
        updates, state = tx.update(grad, state, w)
        w = w + updates
        g = 2 * w_np + wd * w_np  # torch Adam: L2 enters the gradient
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        w_np = w_np - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-5)


def test_epoch_trains_every_cell_and_compiles_once(training_setup):
    _, _, data, ambient, _, epoch_fn, rows, fresh_state = training_setup
    state = fresh_state()
    losses = []
    for epoch in range(4):
        state, sums = epoch_fn(state, data, rows, ambient, jnp.float32(epoch / 10))
        losses.append(float(sums.loss / sums.n_cells))
        assert float(sums.n_cells) == 250  # the partial last minibatch is trained too
    assert int(state.step) == 4 * 4  # ceil(250 / 64) steps per epoch
    assert epoch_fn._cache_size() == 1  # a changing kl_weight does not recompile
    assert losses[-1] < losses[0]


def test_evaluate_matches_direct_loss_terms(training_setup):
    net, config, data, ambient, _, _, _, fresh_state = training_setup
    state = fresh_state()
    evaluate = train.make_evaluate(net, config, 32)
    val_rows = jnp.arange(250, 300, dtype=jnp.int32)
    key = jax.random.key(7)
    sums = evaluate(state.variables, data, val_rows, ambient, jnp.float32(0.5), key)
    cell_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(val_rows)
    batch = Batch(data.counts.take(val_rows), data.library[val_rows], data.batch_index[val_rows])
    terms, _ = loss_terms(net, config, state.variables, batch, ambient, cell_keys, 0.5, train=False)
    np.testing.assert_allclose(float(sums.reconstruction_loss), float(terms.reconstruction_loss.sum()), rtol=1e-5)
    np.testing.assert_allclose(float(sums.kl_local), float(terms.kl_local.sum()), rtol=1e-5)
    np.testing.assert_allclose(float(sums.loss) / 50, float(terms.loss), rtol=1e-5)


def test_epoch_and_validation_with_precomputed_constants(training_setup):
    """Resident data carrying each cell's ``log C(N, x)`` sum (binomial; ``CellData.log_constant``), the step evaluating
    the kernel alone: the same parameters after an epoch, bit for bit (``c`` has no gradient), and epoch and validation
    sums within float32 rounding of the full formula's (8 ulps of the summed terms' size, ``|rec| + sum |c|``)."""
    from scar_jax.likelihoods import cell_log_constants

    net, config, data, ambient, _, epoch_fn, rows, fresh_state = training_setup
    assert config.gene_likelihood == "b"
    x = np.asarray(data.counts.take(jnp.arange(300, dtype=jnp.int32)), np.float64)
    constants = cell_log_constants("b", x, np.asarray(data.library))
    assert constants.min() >= 0.0 and constants.sum() > 1e3  # log C(N, x) >= 0, and not trivial here
    diet = data._replace(log_constant=jnp.asarray(constants, jnp.float32))
    state_full, sums_full = epoch_fn(fresh_state(), data, rows, ambient, jnp.float32(0.3))
    state_diet, sums_diet = epoch_fn(fresh_state(), diet, rows, ambient, jnp.float32(0.3))
    for a, b in zip(jax.tree.leaves(state_diet.params), jax.tree.leaves(state_full.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    evaluate = train.make_evaluate(net, config, 32)
    val_rows = jnp.arange(250, 300, dtype=jnp.int32)
    key = jax.random.key(3)
    val_full = evaluate(state_full.variables, data, val_rows, ambient, jnp.float32(1.0), key)
    val_diet = evaluate(state_full.variables, diet, val_rows, ambient, jnp.float32(1.0), key)
    f32 = float(np.finfo(np.float32).eps)
    for full, kept, c in ((sums_full, sums_diet, constants[:250]), (val_full, val_diet, constants[250:])):
        rounding = 8 * f32 * (abs(float(full.reconstruction_loss)) + np.abs(c).sum())
        assert abs(float(kept.reconstruction_loss) - float(full.reconstruction_loss)) <= rounding
        assert abs(float(kept.loss) - float(full.loss)) <= rounding
        assert float(kept.kl_local) == float(full.kl_local) and float(kept.n_cells) == float(full.n_cells)


DATA_PARALLEL_SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from scar_jax import SCAR, train
from scar_jax.datasets import simulate

adata = simulate(n_cells=400, n_genes=60, seed=0)
SCAR.setup_anndata(adata)
out = {"n_devices": len(jax.devices())}
for devices in (1, 4):
    model = SCAR(adata, seed=0)
    model.train(max_epochs=6, devices=devices, enable_progress_bar=False)
    out[devices] = {
        "elbo_train": model.history["elbo_train"].to_numpy().ravel().tolist(),
        "elbo_validation": model.history["elbo_validation"].to_numpy().ravel().tolist(),
        "params": [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(model.variables)],
        "device": str(model.device),
    }
# the compiled epoch really splits minibatches: its HLO all-reduces (gradients and BatchNorm moments)
tx, epoch, _ = train.compiled_training(model.config, 128, devices=tuple(jax.devices()))
mesh_sharding = jax.sharding.NamedSharding(train.data_parallel_mesh(tuple(jax.devices())), jax.sharding.PartitionSpec())
state = jax.device_put(train.init_train_state(model.variables, tx, jax.random.key(0)), mesh_sharding)
data = train.CellData(
    jax.device_put(train.DenseCounts(jnp.ones((256, 60))), mesh_sharding),
    jax.device_put(jnp.full((256, 1), 60.0), mesh_sharding),
    jax.device_put(jnp.zeros(256, jnp.int32), mesh_sharding),
)
rows = jax.device_put(jnp.arange(256, dtype=jnp.int32), mesh_sharding)
ambient = jax.device_put(jnp.full((1, 60), 1 / 60), mesh_sharding)
hlo = epoch.lower(state, data, rows, ambient, jnp.float32(1.0)).compile().as_text()
out["all_reduce"] = "all-reduce" in hlo
print(json.dumps(out))
"""


def test_data_parallel_on_four_host_devices_matches_one_device(tmp_path):
    """``train(devices=4)`` on 4 forced CPU devices: the same loss trajectory and parameters as one device.

    Runs in a subprocess because the device count is fixed when JAX starts. Differences come only from the
    order of float32 sums across devices (measured: ELBO 2e-7 relative, parameters 2e-5 absolute after
    10 epochs on 600 cells).
    """
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "data_parallel.py"
    script.write_text(DATA_PARALLEL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["4"]
    assert out["n_devices"] == 4 and out["all_reduce"]
    np.testing.assert_allclose(four["elbo_train"], one["elbo_train"], rtol=1e-5)
    np.testing.assert_allclose(four["elbo_validation"], one["elbo_validation"], rtol=1e-5)
    for a, b in zip(four["params"], one["params"], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
    assert four["device"] == one["device"] == "TFRT_CPU_0" or four["device"] == one["device"]  # back on one device
