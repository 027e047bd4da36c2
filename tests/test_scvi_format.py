"""The scvi-tools save format without scvi-tools: the weight mapping on synthetic state dicts, and the checks of
a save directory (reading a real save: tests/parity)."""

import jax
import numpy as np
import pytest

from scar_jax import scvi_format
from scar_jax.vae import SCARConfig, init_variables


def random_variables(n_layers: int, n_genes: int = 11, n_hidden: int = 7, n_latent: int = 3, seed: int = 0):
    """Initial variables with random batch statistics (so that every leaf is distinguishable)."""
    config = SCARConfig(n_genes=n_genes, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers)
    variables = jax.device_get(init_variables(config.make_net(), jax.random.key(seed), n_genes))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(np.shape(a)).astype(np.float32), variables)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_state_dict_round_trip(n_layers):
    variables = random_variables(n_layers)
    state = scvi_format.variables_to_state_dict(variables)
    # scvi-tools' names and PyTorch's (out, in) weight layout
    w = state[f"z_encoder.encoder.fc_layers.Layer {n_layers - 1}.0.weight"]
    np.testing.assert_array_equal(w, variables["params"]["encoder"]["hidden"][f"dense_{n_layers - 1}"]["kernel"].T)
    np.testing.assert_array_equal(
        state["decoder.px_decoder.fc_layers.Layer 0.1.running_var"],
        variables["batch_stats"]["decoder"]["hidden"]["batchnorm_0"]["var"],
    )
    np.testing.assert_array_equal(
        state["decoder.px_scale_decoder.0.weight"], variables["params"]["decoder"]["native_frequencies"]["kernel"].T
    )
    assert state["px_r"].shape == (11,)
    assert state["decoder.px_noise_decoder.0.weight"].shape == (1, 7)
    assert state["z_encoder.var_encoder.bias"].shape == (3,)
    assert state["z_encoder.encoder.fc_layers.Layer 0.1.num_batches_tracked"].dtype == np.int64
    # what scvi-tools adds and scar-jax ignores: the library encoder and the pyro store
    full = {
        **state,
        "l_encoder.encoder.fc_layers.Layer 0.0.weight": np.zeros((7, 11), np.float32),
        "l_encoder.mean_encoder.bias": np.zeros(1, np.float32),
        "pyro_param_store": {},
    }
    back, ambient = scvi_format.state_dict_to_variables(full)
    assert ambient is None
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    back, _ = scvi_format.state_dict_to_variables(full, n_layers)
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_state_dict_round_trip_runs_the_same_network():
    config = SCARConfig(n_genes=11, n_hidden=7, n_latent=3, n_layers=2, gene_likelihood="zinb")
    variables = random_variables(2)
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # variances must be positive
    back, _ = scvi_format.state_dict_to_variables(scvi_format.variables_to_state_dict(variables))
    x = np.random.default_rng(1).poisson(3.0, (5, 11)).astype(np.float32)
    z = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    net = config.make_net()
    for a, b in zip(net.apply(variables, x, z), net.apply(back, x, z), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_state_dict_ambient_profile_buffer_is_returned():
    state = scvi_format.variables_to_state_dict(random_variables(1))
    profile = np.full(11, 1 / 11, np.float32)
    _, ambient = scvi_format.state_dict_to_variables({**state, "ambient_profile": profile})
    np.testing.assert_array_equal(ambient, profile[None])


def test_state_dict_errors():
    state = scvi_format.variables_to_state_dict(random_variables(2))
    with pytest.raises(ValueError, match="expected 3"):
        scvi_format.state_dict_to_variables(state, n_layers=3)
    missing = dict(state)
    del missing["decoder.px_dropout_decoder.bias"]
    with pytest.raises(ValueError, match="lacks 1 SCAR weights"):
        scvi_format.state_dict_to_variables(missing)
    extra = {**state, "decoder.px_decoder.fc_layers.Layer 0.0.extra": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="does not have"):
        scvi_format.state_dict_to_variables(extra)
    wrong = {**state, "decoder.px_scale_decoder.0.weight": np.zeros((11, 6), np.float32)}
    with pytest.raises(ValueError, match="native_frequencies"):
        scvi_format.state_dict_to_variables(wrong)
    with pytest.raises(ValueError, match="0 encoder hidden layers"):
        scvi_format.state_dict_to_variables({"px_r": np.zeros(3)})


def test_missing_or_legacy_save_directory(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="not a directory saved by scvi.external.SCAR.save"):
        scvi_format.read_scvi_tools_save(tmp_path)
    (tmp_path / "model_params.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="scvi-tools < 0.15"):
        scvi_format.read_scvi_tools_save(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot be read by torch.load"):
        scvi_format.read_scvi_tools_save(tmp_path)
