"""Tests of saving and loading (``scar_jax.io`` through ``SCAR.save``/``SCAR.load``).

Oracles: the outputs of the model before saving (exact equality after loading), the files on disk,
and the documented error messages.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import scar_jax
from scar_jax import io as scar_io
from scar_jax import train as scar_train
from scar_jax.vae import init_variables

N_CELLS, N_GENES = 200, 40


@pytest.fixture(scope="module")
def adata(trained_model):
    ad, _ = trained_model  # conftest: simulate(n_cells=N_CELLS, n_genes=N_GENES, seed=0), set up
    assert ad.shape == (N_CELLS, N_GENES)
    return ad


@pytest.fixture(scope="module")
def model(trained_model):
    return trained_model[1]  # conftest: n_hidden=16, n_latent=4, 2 epochs; shared: not to be changed


@pytest.fixture(scope="module")
def untrained(adata):
    return scar_jax.SCAR(adata, n_hidden=16, n_latent=4, seed=7)


@pytest.fixture(scope="module")
def outputs(model):
    """Outputs of the trained model before any save."""
    return {
        "latent": model.get_latent_representation(),
        "elbo": model.get_elbo(return_mean=False),
        "denoised": model.get_denoised_counts(return_sparse=False),
    }


@pytest.fixture(scope="module")
def saved_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("saves") / "model"
    model.save(str(path))
    return path


def assert_same_outputs(loaded, outputs):
    np.testing.assert_array_equal(loaded.get_latent_representation(), outputs["latent"])
    np.testing.assert_array_equal(loaded.get_elbo(return_mean=False), outputs["elbo"])
    np.testing.assert_array_equal(loaded.get_denoised_counts(return_sparse=False), outputs["denoised"])


def assert_tree_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def with_key_data(state):
    return state.replace(key=jax.random.key_data(state.key))


# ---------------------------------------------------------------- round trip


def test_save_writes_manifest_and_state(saved_dir, model):
    assert sorted(os.listdir(saved_dir)) == ["manifest.json", "state.msgpack"]
    manifest = json.loads((saved_dir / "manifest.json").read_text())
    assert manifest["format_version"] == scar_io.FORMAT_VERSION
    assert manifest["config"] == dataclasses.asdict(model.config)
    assert manifest["var_names"] == list(model.var_names)
    assert manifest["is_trained"] is True
    assert manifest["jax_version"] == jax.__version__


def test_round_trip_outputs_identical(saved_dir, adata, outputs):
    loaded = scar_jax.SCAR.load(str(saved_dir), adata=adata)
    assert_same_outputs(loaded, outputs)


def test_round_trip_attributes_identical(saved_dir, adata, model):
    loaded = scar_jax.SCAR.load(str(saved_dir), adata=adata)
    assert loaded.is_trained is True
    assert loaded.config == model.config
    assert loaded.seed == model.seed
    np.testing.assert_array_equal(loaded.var_names, model.var_names)
    np.testing.assert_array_equal(loaded.ambient_profile, model.ambient_profile)
    assert loaded.ambient_profile.dtype == model.ambient_profile.dtype == np.float32
    for name in ("train_indices", "validation_indices", "test_indices"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert len(loaded.train_indices) + len(loaded.validation_indices) + len(loaded.test_indices) == N_CELLS
    assert loaded.history_rows == model.history_rows
    assert loaded.history.keys() == model.history.keys()
    for name, frame in model.history.items():
        assert len(frame) == 2  # two epochs
        np.testing.assert_array_equal(loaded.history[name].to_numpy(), frame.to_numpy())
    assert loaded.training_time_s == model.training_time_s
    assert_tree_equal(loaded.variables, model.variables)
    assert_tree_equal(with_key_data(loaded._state), with_key_data(model._state))


def test_save_anndata_then_load_without_adata(model, adata, outputs, tmp_path):
    path = tmp_path / "with_adata"
    model.save(str(path), save_anndata=True)
    assert (path / "adata.h5ad").is_file()
    loaded = scar_jax.SCAR.load(str(path))
    assert loaded.adata is not adata
    np.testing.assert_array_equal(loaded.adata.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(np.asarray(loaded.adata.var_names), np.asarray(adata.var_names))
    assert_same_outputs(loaded, outputs)


def test_load_without_adata_when_not_saved_raises(saved_dir):
    with pytest.raises(ValueError, match="without its AnnData"):
        scar_jax.SCAR.load(str(saved_dir))


def test_two_prefixes_in_one_directory(model, untrained, adata, outputs, tmp_path):
    path = tmp_path / "prefixed"
    model.save(str(path), prefix="trained_")
    untrained.save(str(path), prefix="fresh_", overwrite=True)  # the directory exists: overwrite keeps others
    assert sorted(os.listdir(path)) == [
        "fresh_manifest.json",
        "fresh_state.msgpack",
        "trained_manifest.json",
        "trained_state.msgpack",
    ]
    a = scar_jax.SCAR.load(str(path), adata=adata, prefix="trained_")
    b = scar_jax.SCAR.load(str(path), adata=adata, prefix="fresh_")
    assert a.is_trained and not b.is_trained
    assert b.seed == 7
    assert_same_outputs(a, outputs)
    assert_tree_equal(b.variables, untrained.variables)
    with pytest.raises(ValueError, match="lacks manifest.json"):
        scar_jax.SCAR.load(str(path), adata=adata)  # no unprefixed files


def test_existing_directory_without_overwrite_raises(model, saved_dir):
    before = {name: (saved_dir / name).read_bytes() for name in os.listdir(saved_dir)}
    with pytest.raises(ValueError, match="overwrite"):
        model.save(str(saved_dir))
    after = {name: (saved_dir / name).read_bytes() for name in os.listdir(saved_dir)}
    assert after == before  # untouched


def test_overwrite_replaces(model, untrained, adata, outputs, tmp_path):
    path = tmp_path / "replaced"
    model.save(str(path))
    untrained.save(str(path), overwrite=True)
    loaded = scar_jax.SCAR.load(str(path), adata=adata)
    assert loaded.is_trained is False and loaded.seed == 7
    model.save(str(path), overwrite=True)
    loaded = scar_jax.SCAR.load(str(path), adata=adata)
    assert loaded.is_trained is True
    assert_same_outputs(loaded, outputs)
    assert sorted(os.listdir(tmp_path)) == ["replaced"]  # no temporary or old directories beside it


def test_overwrite_drops_the_old_anndata(model, untrained, tmp_path):
    path = tmp_path / "stale"
    model.save(str(path), save_anndata=True)
    untrained.save(str(path), overwrite=True)  # without its AnnData
    assert not (path / "adata.h5ad").exists()
    with pytest.raises(ValueError, match="without its AnnData"):
        scar_jax.SCAR.load(str(path))


def test_manifest_that_is_not_an_object_is_refused(model, tmp_path):
    path = tmp_path / "list_manifest"
    model.save(str(path))
    (path / "manifest.json").write_text("[]")
    with pytest.raises(ValueError, match="manifest"):
        scar_jax.SCAR.load(str(path), adata=model.adata)


def test_untrained_round_trip(untrained, adata, tmp_path):
    path = tmp_path / "untrained"
    untrained.save(str(path))
    loaded = scar_jax.SCAR.load(str(path), adata=adata)
    assert loaded.is_trained is False
    assert loaded._state is None
    assert loaded.history == {}
    assert len(loaded.train_indices) == 0
    np.testing.assert_array_equal(loaded.ambient_profile, untrained.ambient_profile)
    assert_tree_equal(loaded.variables, untrained.variables)
    with pytest.raises(RuntimeError, match="not trained"):
        loaded.get_latent_representation()


def test_no_temporary_directories_left(model, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    model.save(str(parent / "m1"))
    model.save(str(parent / "m2"), prefix="p_")
    model.save(str(parent / "m1"), overwrite=True)
    with pytest.raises(ValueError):
        model.save(str(parent / "m2"))
    assert sorted(os.listdir(parent)) == ["m1", "m2"]
    # saving into a parent that does not exist yet creates it
    model.save(str(tmp_path / "new" / "deeper" / "m"))
    assert os.listdir(tmp_path / "new" / "deeper") == ["m"]


# ---------------------------------------------------------------- load errors


def test_load_missing_directory(tmp_path, adata):
    with pytest.raises(ValueError, match="not a directory"):
        scar_jax.SCAR.load(str(tmp_path / "does_not_exist"), adata=adata)


def test_load_directory_without_files(tmp_path, adata):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a scar-jax model directory"):
        scar_jax.SCAR.load(str(tmp_path / "empty"), adata=adata)


def copy_save(saved_dir, dest):
    dest.mkdir()
    for name in os.listdir(saved_dir):
        (dest / name).write_bytes((saved_dir / name).read_bytes())
    return dest


def test_load_truncated_state(saved_dir, tmp_path, adata):
    path = copy_save(saved_dir, tmp_path / "truncated")
    data = (path / "state.msgpack").read_bytes()
    (path / "state.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        scar_jax.SCAR.load(str(path), adata=adata)


def test_load_corrupted_manifest(saved_dir, tmp_path, adata):
    path = copy_save(saved_dir, tmp_path / "bad_manifest")
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 3])
    with pytest.raises(ValueError, match="corrupted"):
        scar_jax.SCAR.load(str(path), adata=adata)


def test_load_newer_format_version(saved_dir, tmp_path, adata):
    path = copy_save(saved_dir, tmp_path / "newer")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = scar_io.FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="upgrade"):
        scar_jax.SCAR.load(str(path), adata=adata)


def test_load_manifest_without_format_version(saved_dir, tmp_path, adata):
    path = copy_save(saved_dir, tmp_path / "no_version")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["format_version"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="save format None"):
        scar_jax.SCAR.load(str(path), adata=adata)


def test_load_scvi_tools_directory(tmp_path, adata):
    path = tmp_path / "scvi"
    path.mkdir()
    (path / "model.pt").write_bytes(b"\x80\x02not really torch")
    with pytest.raises(ValueError, match="scvi-tools"):
        scar_jax.SCAR.load(str(path), adata=adata)


def test_load_with_reordered_genes_raises(saved_dir, adata):
    reversed_adata = adata[:, adata.var_names[::-1]].copy()
    with pytest.raises(ValueError, match="var_names"):
        scar_jax.SCAR.load(str(saved_dir), adata=reversed_adata)


def test_load_with_fewer_genes_raises(saved_dir, adata):
    with pytest.raises(ValueError, match="var_names"):
        scar_jax.SCAR.load(str(saved_dir), adata=adata[:, :-1].copy())


# ---------------------------------------------------------------- state bytes


def test_state_bytes_round_trip(model):
    state = model._state
    data = scar_io.state_to_bytes(state, model.ambient_profile)
    # a template with the same structure but other values (fresh init, other key)
    template_vars = init_variables(model._net, jax.random.key(123), model.config.n_genes)
    template = scar_train.init_train_state(template_vars, scar_train.make_optimizer(), jax.random.key(456))
    ambient_template = np.zeros_like(model.ambient_profile)
    restored, ambient = scar_io.state_from_bytes(template, ambient_template, data)
    assert_tree_equal(with_key_data(restored), with_key_data(state))
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(state.key))
    assert jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)  # a typed key again
    assert int(restored.step) == int(state.step) > 0
    np.testing.assert_array_equal(np.asarray(ambient), model.ambient_profile)
    # the template is not the answer: its parameters differ from the trained ones
    assert not np.array_equal(
        np.asarray(jax.tree.leaves(template.params)[0]), np.asarray(jax.tree.leaves(state.params)[0])
    )
    # and the bytes on disk are exactly these bytes
    assert scar_io.state_to_bytes(restored, np.asarray(ambient)) == data


def test_saved_state_file_round_trips(saved_dir, model):
    data = (saved_dir / "state.msgpack").read_bytes()
    assert data == scar_io.state_to_bytes(model._state, model.ambient_profile)


def test_newer_package_version_warns_but_loads(model, tmp_path):
    path = tmp_path / "newer"
    model.save(str(path))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["scar_jax_version"] = "99.0.0"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="99.0.0"):
        loaded = scar_jax.SCAR.load(str(path), adata=model.adata)
    assert loaded.is_trained
    assert scar_jax.io._version_tuple("1.2.3rc1+local") == (1, 2, 3)
