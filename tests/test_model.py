"""The SCAR class: truth recovery at default settings, the scvi-tools API, determinism, sparse = dense."""

import functools

import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scar_jax import SCAR
from scar_jax.datasets import raw_droplets, simulate, simulate_empty_droplets
from scar_jax.metrics import denoising_metrics, oracle_split, pearson, pseudobulk_l1


@pytest.fixture(scope="module")
def default_model():
    """Default settings (binomial, softplus_sp, sparsity 0.9, 400 epochs by the heuristic) on 2000 cells,
    with the ambient profile estimated from simulated empty droplets (the documented workflow)."""
    adata = simulate(n_cells=2000, n_genes=300, seed=0)
    raw = raw_droplets(adata, simulate_empty_droplets(adata, n_droplets=20000, seed=1))
    SCAR.setup_anndata(adata)
    SCAR.get_ambient_profile(adata, raw, prob=0.5)  # threshold 300 * log(0.5): see test_ambient
    model = SCAR(adata, ambient_profile="ambient_profile")
    model.train(enable_progress_bar=False)
    return adata, model


def split_scores(adata, denoised):
    """Fraction of the true ambient counts removed and of the true native counts kept, entry by entry."""
    x = adata.X.toarray()
    den = denoised.toarray() if sp.issparse(denoised) else np.asarray(denoised)
    native, ambient = adata.layers["native"].toarray(), adata.layers["ambient"].toarray()
    return np.minimum(x - den, ambient).sum() / ambient.sum(), np.minimum(den, native).sum() / native.sum()


def test_count_preserving_default_is_honest_and_near_the_oracle(default_model):
    adata, model = default_model
    denoised = model.get_denoised_counts()
    assert sp.isspmatrix_csr(denoised)  # sparse in, sparse out
    x = adata.X.toarray()
    den = denoised.toarray()
    assert (den > x).sum() == 0  # never above what was observed
    assert ((den > 0) & (x == 0)).sum() == 0  # zeros stay zero
    assert den.min() >= 0 and np.array_equal(den, np.round(den))
    removed, kept = split_scores(adata, denoised)
    oracle_removed, oracle_kept = split_scores(adata, oracle_split(adata))
    # within 5 percentage points of the oracle that knows the truth (measured: see README)
    assert removed > oracle_removed - 0.05, (removed, oracle_removed)
    assert kept > oracle_kept - 0.05, (kept, oracle_kept)
    expected = model.get_denoised_counts(method="expected")
    assert (expected > x).sum() > 0  # the reference's expectation creates counts never observed
    again = model.get_denoised_counts(seed=4).toarray()
    np.testing.assert_array_equal(model.get_denoised_counts(seed=4).toarray(), again)
    mean = model.get_denoised_counts(method="split_mean", return_sparse=False)
    assert (mean <= x + 1e-4).all() and (mean[x == 0] == 0).all()
    # the default is the calibrated method for mRNA (this model); the model's own split stays near the oracle too
    assert model.default_denoising_method == "calibrated"
    np.testing.assert_array_equal(model.get_denoised_counts(method="calibrated", seed=4).toarray(), again)
    split_removed, split_kept = split_scores(adata, model.get_denoised_counts(method="split"))
    assert split_removed > oracle_removed - 0.05 and split_kept > oracle_kept - 0.05, (split_removed, split_kept)


def test_default_denoising_method_follows_the_feature_type():
    adata = simulate(n_cells=40, n_genes=20, seed=0)
    SCAR.setup_anndata(adata)
    assert SCAR(adata).default_denoising_method == "calibrated"
    for feature_type in ("ADT", "sgRNA", "tag", "CMO", "ATAC"):
        assert SCAR(adata, feature_type=feature_type).default_denoising_method == "split"


def test_default_training_recovers_the_truth(default_model):
    adata, model = default_model
    assert len(model.history["elbo_train"]) == 400  # min(round(20000 / 2000 * 400), 400)
    elbo = model.history["elbo_train"]["elbo_train"].to_numpy()  # negative ELBO per cell
    assert elbo[-1] < 0.5 * elbo[0]
    r = pearson(model.get_noise_ratio(), adata.obs["noise_ratio"])
    assert r >= 0.8, r  # measured 0.98


def test_default_denoising_is_closer_to_native_than_raw(default_model):
    adata, model = default_model
    denoised = model.get_denoised_counts(method="expected")
    native = adata.layers["native"]
    # Stated metric: L1 distance of per-cell-type summed profiles to the true native ones.
    pb = pseudobulk_l1(adata.X, denoised, native, adata.obs["cell_type"].to_numpy())
    assert pb["l1_improvement"] > 0.5, pb  # measured 0.89
    # and per cell and gene
    m = denoising_metrics(adata.X, denoised, native)
    assert m["l1_denoised"] < m["l1_raw"], m
    assert np.array_equal(denoised, np.round(denoised)) and denoised.min() >= 0


def test_elbo_and_reconstruction_conventions(default_model):
    adata, model = default_model
    per_cell = model.get_elbo(return_mean=False)
    assert per_cell.shape == (adata.n_obs,)
    assert model.get_elbo() == pytest.approx(per_cell.mean(), rel=1e-6)
    rec = model.get_reconstruction_error(return_mean=False)["reconstruction_loss"]
    assert (per_cell <= rec + 1e-3).all()  # ELBO = log p(x|z) - KL, KL >= 0
    # higher is better: the ELBO is the negative of the last logged negative ELBO, up to the split and z draw
    assert model.get_elbo() == pytest.approx(-model.history["elbo_train"].iloc[-1, 0], rel=0.05)


def test_latent_representation_api(default_model):
    adata, model = default_model
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 15)
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(mean, z)
    assert (var >= 1e-4).all()
    sample = model.get_latent_representation(give_mean=False, seed=1)
    assert not np.allclose(sample, z)
    np.testing.assert_array_equal(sample, model.get_latent_representation(give_mean=False, seed=1))
    sub = model.get_latent_representation(indices=[3, 1, 2])
    # a different chunk shape changes float summation order only
    np.testing.assert_allclose(sub, z[[3, 1, 2]], rtol=1e-5, atol=1e-6)
    mask = np.zeros(adata.n_obs, bool)
    mask[[1, 2]] = True
    np.testing.assert_allclose(model.get_latent_representation(indices=mask), z[[1, 2]], rtol=1e-5, atol=1e-6)


def test_inference_on_another_adata_with_the_same_genes(default_model):
    adata, model = default_model
    other = adata[:50].copy()
    np.testing.assert_allclose(
        model.get_latent_representation(other), model.get_latent_representation(indices=np.arange(50)), rtol=1e-6
    )
    wrong = other[:, ::-1].copy()
    with pytest.raises(ValueError, match="var_names"):
        model.get_latent_representation(wrong)


def test_history_and_split(default_model):
    adata, model = default_model
    for name in (
        "train_loss_epoch",
        "elbo_train",
        "reconstruction_loss_train",
        "kl_local_train",
        "validation_loss",
        "elbo_validation",
        "reconstruction_loss_validation",
        "kl_local_validation",
    ):
        frame = model.history[name]
        assert isinstance(frame, pd.DataFrame) and list(frame.columns) == [name] and len(frame) == 400
    assert len(model.train_indices) == 1800 and len(model.validation_indices) == 200
    assert len(model.test_indices) == 0
    assert model.is_trained and "Trained" in repr(model)


# ---------------------------------------------------------------- small, fast models

SMALL = dict(n_hidden=16, n_latent=4)


@functools.cache
def _small(x_format="csr", seed=0, **kw):
    """A trained tiny model, cached: tests must not change it."""
    adata = simulate(n_cells=200, n_genes=30, seed=5)
    if x_format == "dense":
        adata.X = adata.X.toarray()
    elif x_format == "float":
        adata.X = adata.X.astype(np.float32)
    SCAR.setup_anndata(adata)
    model = SCAR(adata, seed=seed, **SMALL, **kw)
    model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
    return adata, model


def _leaves(model):
    return [np.asarray(a) for a in jax.tree.leaves(model.variables)]


def test_same_seed_identical_other_seed_differs():
    _, a = _small(seed=0)
    _, b = _small.__wrapped__(seed=0)  # a second, independent training run
    _, c = _small(seed=2)
    assert a is not b
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(c), strict=True))
    np.testing.assert_array_equal(a.get_denoised_counts().toarray(), b.get_denoised_counts().toarray())


@pytest.mark.parametrize("x_format", ["dense", "float"])
def test_sparse_and_dense_input_give_the_same_model(x_format):
    _, sparse_model = _small("csr")
    _, other = _small(x_format)
    for x, y in zip(_leaves(sparse_model), _leaves(other), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sparse_model.get_elbo(), other.get_elbo(), rtol=1e-6)


@pytest.mark.parametrize(
    ("likelihood", "latent"), [("poisson", "normal"), ("nb", "ln"), ("zinb", "normal"), ("b", "ln")]
)
def test_every_likelihood_and_latent_trains(likelihood, latent):
    adata, model = _small(gene_likelihood=likelihood, latent_distribution=latent)
    assert np.isfinite(model.get_elbo())
    z = model.get_latent_representation(mc_samples=50)
    if latent == "ln":
        np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-5)  # softmax of z averaged over draws
    nr = model.get_noise_ratio()
    assert nr.shape == (adata.n_obs,) and ((nr >= 0) & (nr <= 1)).all()
    phi = model.get_native_frequencies()
    assert phi.shape == adata.shape and (phi.sum(1) <= 1 + 1e-6).all()


def test_denoised_counts_median_over_samples_and_seed():
    _, model = _small()
    one = model.get_denoised_counts(seed=3, method="expected")
    np.testing.assert_array_equal(one, model.get_denoised_counts(seed=3, method="expected"))
    five = model.get_denoised_counts(n_samples=5, seed=3, method="expected")
    assert five.shape == one.shape and np.all(five >= 0)
    with pytest.raises(ValueError, match="n_samples"):
        model.get_denoised_counts(n_samples=0)


def test_size_factor_key_for_rate_likelihoods():
    adata = simulate(n_cells=200, n_genes=30, seed=5)
    adata.obs["sf"] = np.asarray(adata.X.sum(1)).ravel() / 100.0
    SCAR.setup_anndata(adata, size_factor_key="sf")
    with pytest.raises(ValueError, match="size_factor_key"):
        SCAR(adata, **SMALL)  # binomial needs the observed library
    model = SCAR(adata, gene_likelihood="poisson", **SMALL)
    model.train(max_epochs=2, enable_progress_bar=False)
    assert np.isfinite(model.get_elbo())


def test_per_batch_ambient_profiles_and_batch_key():
    adata = simulate(n_cells=200, n_genes=30, n_batches=2, seed=5)
    SCAR.setup_anndata(adata, batch_key="batch")
    profile = adata.varm["true_ambient_profile"]  # (genes, batches)
    model = SCAR(adata, ambient_profile=profile, **SMALL)
    assert model.ambient_profile.shape == (2, 30)
    model.train(max_epochs=2, enable_progress_bar=False)
    assert np.isfinite(model.get_elbo())
    unseen = adata[:10].copy()
    unseen.obs["batch"] = "batch_9"
    with pytest.raises(ValueError, match="unseen"):
        model.get_elbo(unseen)


def test_ambient_profile_argument_forms():
    adata = simulate(n_cells=100, n_genes=20, seed=5)
    SCAR.setup_anndata(adata)
    truth = adata.varm["true_ambient_profile"][:, 0]
    from_varm = SCAR(adata, ambient_profile="true_ambient_profile", **SMALL).ambient_profile
    np.testing.assert_allclose(from_varm[0], truth, rtol=1e-6)
    frame = pd.DataFrame({"p": truth}, index=adata.var_names)[::-1]  # matched by name, not position
    np.testing.assert_allclose(SCAR(adata, ambient_profile=frame, **SMALL).ambient_profile[0], truth, rtol=1e-6)
    default = SCAR(adata, **SMALL).ambient_profile[0]
    cells_mean = np.asarray(adata.X.sum(0)).ravel() / adata.X.sum()
    np.testing.assert_allclose(default, cells_mean, rtol=1e-6)
    with pytest.warns(UserWarning, match="normalising"):
        scaled = SCAR(adata, ambient_profile=truth * 3, **SMALL).ambient_profile[0]
    np.testing.assert_allclose(scaled, truth, rtol=1e-6)
    for bad, match in [
        (truth[:5], "one row per gene"),
        (-truth, "non-negative"),
        (truth * 0, "all zero"),
        (np.full(20, np.nan), "finite"),
        ("nope", "varm"),
    ]:
        with pytest.raises(ValueError, match=match):
            SCAR(adata, ambient_profile=bad, **SMALL)


def test_setup_anndata_only_writes_uns_and_model_leaves_adata_unchanged():
    adata = simulate(n_cells=100, n_genes=20, seed=5)
    before = adata.copy()
    SCAR.setup_anndata(adata)
    assert set(adata.uns) - set(before.uns) == {"_scar_jax"}
    assert list(adata.obs.columns) == list(before.obs.columns)
    after_setup = adata.copy()
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.get_denoised_counts()
    assert (adata.X != after_setup.X).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, after_setup.obs)
    assert set(adata.layers) == set(after_setup.layers) and set(adata.obsm) == set(after_setup.obsm)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: setattr(a, "X", a.X.astype(np.float32) * 0.5), ValueError, "non-integer"),
        (lambda a: setattr(a, "X", -a.X), ValueError, "negative"),
        (lambda a: setattr(a, "X", sp.csr_matrix(np.where(a.X.toarray() > 0, np.nan, 0.0))), ValueError, "NaN"),
        (lambda a: setattr(a, "X", sp.csr_matrix(a.X.shape, dtype=np.int32)), ValueError, "zero counts"),
    ],
)
def test_bad_counts_are_refused_at_setup(mutate, exc, match):
    adata = simulate(n_cells=50, n_genes=10, seed=5)
    mutate(adata)
    with pytest.raises(exc, match=match):
        SCAR.setup_anndata(adata)


def test_bad_arguments_are_refused():
    adata = simulate(n_cells=50, n_genes=10, seed=5)
    for kwargs, match in [
        ({"batch_key": "nope"}, "batch_key"),
        ({"labels_key": "nope"}, "labels_key"),
        ({"layer": "nope"}, "layer"),
        ({"size_factor_key": "nope"}, "size_factor_key"),
    ]:
        with pytest.raises(ValueError, match=match):
            SCAR.setup_anndata(adata, **kwargs)
    with pytest.raises(ValueError, match="setup_anndata"):
        SCAR(adata)
    SCAR.setup_anndata(adata)
    with pytest.raises(TypeError, match="unknown keyword"):
        SCAR(adata, n_hiden=10)
    for kwargs, match in [
        ({"sparsity": 1.5}, "sparsity"),
        ({"gene_likelihood": "gauss"}, "gene_likelihood"),
        ({"n_latent": 0}, "n_latent"),
        ({"scale_activation": "relu"}, "scale_activation"),
        ({"matmul_precision": "float8"}, "matmul_precision"),
    ]:
        with pytest.raises(ValueError, match=match):
            SCAR(adata, **kwargs)
    model = SCAR(adata, **SMALL)
    with pytest.raises(RuntimeError, match="not trained"):
        model.get_latent_representation()
    with pytest.raises(TypeError, match="plan_kwargs"):
        model.train(max_epochs=1, plan_kwargs={"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="trainer keywords"):
        model.train(max_epochs=1, gradient_clip=1.0)  # a misspelt Lightning keyword
    with pytest.raises(ValueError, match="max_epochs"):
        model.train(max_epochs=0)
    with pytest.raises(ValueError, match="accelerator"):
        model.train(max_epochs=1, accelerator="quantum")
    with pytest.raises(ValueError, match="scan_unroll"):
        model.train(max_epochs=1, scan_unroll=0)
    model.train(max_epochs=1, enable_progress_bar=False)
    with pytest.raises(ValueError, match="indices"):
        model.get_elbo(indices=[0, 50])


def test_scan_unroll_runs_the_same_steps():
    """Unrolling the epoch's loop changes only the float32 summation order of the same steps."""
    _, base = _small(seed=0)
    adata, _ = _small(seed=0)
    unrolled = SCAR(adata, **SMALL, seed=0)
    unrolled.train(max_epochs=3, batch_size=64, enable_progress_bar=False, scan_unroll=2)
    for x, y in zip(_leaves(base), _leaves(unrolled), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_training_again_continues_from_the_current_weights():
    adata = simulate(n_cells=200, n_genes=30, seed=5)
    SCAR.setup_anndata(adata)
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    first = _leaves(model)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)  # the donated state must not be reused
    assert not all(np.array_equal(x, y) for x, y in zip(first, _leaves(model), strict=True))
    assert np.isfinite(model.get_elbo())


def test_setup_record_api(capsys):
    adata = simulate(n_cells=100, n_genes=20, n_batches=2, seed=5)
    adata.obs["sf"] = 1.0
    SCAR.setup_anndata(adata, batch_key="batch", labels_key="cell_type", size_factor_key="sf")
    model = SCAR(adata, gene_likelihood="poisson", **SMALL)
    assert model.get_setup_arg("batch_key") == "batch" and model.get_setup_arg("layer") is None
    with pytest.raises(ValueError, match="setup_arg"):
        model.get_setup_arg("nope")
    assert model.get_state_registry("batch")["categorical_mapping"] == ["batch_0", "batch_1"]
    np.testing.assert_array_equal(
        model.get_from_registry(adata, "batch").ravel(), adata.obs["batch"].cat.codes.to_numpy()
    )
    np.testing.assert_array_equal(
        model.get_from_registry(adata, "labels").ravel(), adata.obs["cell_type"].cat.codes.to_numpy()
    )
    assert (model.get_from_registry(adata, "X") != adata.X).nnz == 0
    assert model.data_registry()["batch"] == {"attr_name": "obs", "attr_key": "batch"}
    model.view_setup_args()
    model.view_anndata_setup()
    out = capsys.readouterr().out
    assert "batch_key: batch" in out and "['batch_0', 'batch_1']" in out
    model.to_device("cpu")
    assert model.device.platform == "cpu"
    model.to_device(0)
    assert model.device == jax.devices()[0]


def test_transfer_fields_update_setup_args_registry_and_managers(tmp_path):
    adata = simulate(n_cells=100, n_genes=20, n_batches=2, seed=5)
    SCAR.setup_anndata(adata, batch_key="batch")
    model = SCAR(adata, **SMALL)
    model.train(max_epochs=2, enable_progress_bar=False)
    # a new AnnData: same genes, batches reordered in its categories, not set up
    new = adata[::-1].copy()
    del new.uns["_scar_jax"]
    new.obs["batch"] = new.obs["batch"].cat.reorder_categories(["batch_1", "batch_0"])
    assert model.get_anndata_manager(new) is None
    with pytest.raises(ValueError, match="transfer_fields"):
        model.get_anndata_manager(new, required=True)
    before = new.copy()
    model.transfer_fields(new)
    assert set(new.uns) - set(before.uns) == {"_scar_jax"} and new.obs.equals(before.obs)  # only the record
    assert new.uns["_scar_jax"]["batch_categories"] == ["batch_0", "batch_1"]  # the model's order
    assert model.get_anndata_manager(new, required=True) == model.spec
    np.testing.assert_array_equal(  # codes follow the model's categories, so outputs match cell for cell
        model.get_from_registry(new, "batch").ravel()[::-1], model.get_from_registry(adata, "batch").ravel()
    )
    np.testing.assert_allclose(model.get_latent_representation(new)[::-1], model.get_latent_representation())
    with pytest.raises(ValueError, match="extend_categories"):
        model.transfer_fields(new, extend_categories=True)
    other = new.copy()
    other.obs["batch"] = other.obs["batch"].cat.rename_categories({"batch_1": "batch_9"})
    with pytest.raises(ValueError, match="batch_9"):
        model.transfer_fields(other)
    with pytest.raises(ValueError, match="genes"):
        model.transfer_fields(new[:, ::-1].copy())
    # deregister: the record is forgotten (the model's own AnnData stays)
    model.deregister_manager(new)
    assert model.get_anndata_manager(new) is None and model.get_anndata_manager(adata) == model.spec
    SCAR.register_manager(new)  # set up above: its record is read
    assert model.get_anndata_manager(new) == model.spec
    model.deregister_manager()
    assert model.get_anndata_manager(new) is None
    with pytest.raises(TypeError, match="AnnData"):
        SCAR.register_manager("not an AnnData")
    # renamed obs column: same categories required
    adata.obs["lane"] = adata.obs["batch"]
    model.update_setup_method_args({"batch_key": "lane"})
    assert model.get_setup_arg("batch_key") == "lane" and adata.uns["_scar_jax"]["batch_key"] == "lane"
    adata.obs["bad"] = "x"
    with pytest.raises(ValueError, match="batch_key='bad'"):
        model.update_setup_method_args({"batch_key": "bad"})
    assert model.get_setup_arg("batch_key") == "lane"  # unchanged after a refused update
    with pytest.raises(ValueError, match="unknown keys"):
        model.update_setup_method_args({"nope": 1})
    # the saved registry, without loading the model
    model.save(tmp_path / "m")
    registry = SCAR.load_registry(str(tmp_path / "m"))
    assert registry["setup_args"]["batch_key"] == "lane" and registry["categories"]["batch"] == ["batch_0", "batch_1"]
    assert registry["model_args"]["n_genes"] == 20 and registry["is_trained"] and registry["scar_jax_version"]
    with pytest.raises(ValueError):
        SCAR.load_registry(str(tmp_path / "missing"))


def test_checkpoints_resume_to_the_uninterrupted_result(tmp_path):
    adata = simulate(n_cells=200, n_genes=30, seed=5)
    SCAR.setup_anndata(adata)
    full = SCAR(adata, **SMALL)
    full.train(
        max_epochs=6, batch_size=64, enable_progress_bar=False, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=2
    )
    # an interrupted run: 4 of the 6 epochs, checkpointed; a fresh process resumes from the directory
    SCAR(adata, **SMALL).train(
        max_epochs=4, batch_size=64, enable_progress_bar=False, checkpoint_dir=str(tmp_path / "b"), checkpoint_every=2
    )
    resumed = SCAR(adata, **SMALL)
    resumed.train(max_epochs=6, batch_size=64, enable_progress_bar=False, checkpoint_dir=str(tmp_path / "b"))
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(full), _leaves(resumed), strict=True))
    assert [r["epoch"] for r in resumed.history_rows] == list(range(6))
    assert resumed.history_rows[-1]["train_loss_epoch"] == full.history_rows[-1]["train_loss_epoch"]
    loaded = SCAR.load(str(tmp_path / "a"), adata)  # a checkpoint is an ordinary save
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(full), _leaves(loaded), strict=True))
    other = SCAR(adata, seed=3, **SMALL)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        other.train(max_epochs=6, batch_size=64, enable_progress_bar=False, checkpoint_dir=str(tmp_path / "b"))


def test_divergence_stops_with_the_epoch_and_keeps_the_last_good_parameters():
    adata = simulate(n_cells=200, n_genes=30, seed=5)
    SCAR.setup_anndata(adata)
    model = SCAR(adata, **SMALL)
    with pytest.raises(FloatingPointError, match="epoch") as info:
        model.train(max_epochs=50, batch_size=64, enable_progress_bar=False, plan_kwargs={"lr": 1e36})
    assert "initial parameters are kept" in str(info.value)  # this learning rate diverges in epoch 0
    assert all(np.isfinite(leaf).all() for leaf in _leaves(model)) and not model.is_trained


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    return float(
        ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    )


def test_differential_expression_finds_the_true_markers(default_model):
    adata, model = default_model
    table = model.differential_expression(
        groupby="cell_type", group1="type_0", group2="type_1", mode="change", n_samples_overall=2000
    )
    assert {"proba_de", "bayes_factor", "lfc_mean", "is_de_fdr_0.05", "raw_mean1", "comparison"} <= set(table.columns)
    assert (table["comparison"] == "type_0 vs type_1").all()
    profiles = adata.varm["true_native_profile"]  # columns type_0, type_1, ...
    true_lfc = np.log2((profiles[:, 0] + 1e-6) / (profiles[:, 1] + 1e-6))
    markers, unchanged = np.abs(true_lfc) > 1, np.abs(true_lfc) < 0.25
    table = table.loc[adata.var_names]
    keep = markers | unchanged
    auroc = _auroc(table["proba_de"].to_numpy()[keep], markers[keep])
    assert auroc >= 0.95, auroc  # measured 0.988
    flagged = table["is_de_fdr_0.05"].to_numpy()
    assert flagged[markers].mean() > 0.9  # measured 0.978 (and 5% of the unchanged genes)
    one_vs_rest = model.differential_expression(groupby="cell_type", n_samples_overall=500)
    assert set(one_vs_rest["comparison"]) == {f"type_{i} vs Rest" for i in range(5)}


def test_differential_expression_null_split_has_few_discoveries(default_model):
    adata, model = default_model
    cells = np.flatnonzero(adata.obs["cell_type"] == "type_0")
    half = np.random.default_rng(0).permutation(cells)
    table = model.differential_expression(
        idx1=half[: len(half) // 2], idx2=half[len(half) // 2 :], mode="change", n_samples_overall=2000
    )
    assert table["is_de_fdr_0.05"].mean() < 0.05, table["is_de_fdr_0.05"].mean()


def test_aggregated_posterior_abundance_and_correlation(default_model):
    adata, model = default_model
    posterior = model.get_aggregated_posterior(indices=np.arange(50), dof=None)
    z = model.get_latent_representation(indices=np.arange(5))
    assert np.isfinite(np.asarray(posterior.log_prob(z))).all()
    # two samples with different compositions: type_0 cells go to sample A with probability 0.8, the other
    # cells with probability 0.2; each sample holds every cell type
    rng = np.random.default_rng(0)
    is_type0 = (adata.obs["cell_type"] == "type_0").to_numpy()
    samples = np.where(rng.random(adata.n_obs) < np.where(is_type0, 0.8, 0.2), "A", "B")
    other = adata.copy()
    other.obs["sample"] = samples
    frame = model.differential_abundance(other, sample_key="sample", num_cells_posterior=500)
    assert list(frame.columns) == list(pd.unique(samples)) and list(frame.index) == list(adata.obs_names)
    # type_0 cells are denser under A's aggregated posterior, the other types under B's
    # (chance would be 0.5; measured 0.89 for the other types)
    assert (frame.loc[is_type0, "A"] > frame.loc[is_type0, "B"]).mean() > 0.8
    assert (frame.loc[~is_type0, "B"] > frame.loc[~is_type0, "A"]).mean() > 0.8
    corr = model.get_feature_correlation_matrix(indices=np.arange(200), n_samples=3, correlation_type="pearson")
    assert corr.shape == (adata.n_vars, adata.n_vars)
    finite = np.isfinite(corr.to_numpy())
    np.testing.assert_allclose(np.diag(corr.to_numpy())[np.diag(finite)], 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="sample_key"):
        model.differential_abundance(sample_key="nope")


def test_inference_on_selected_cells_reads_only_those_cells():
    """A call with ``indices`` gives the full call's rows and does not depend on (or validate) the other cells."""
    adata, model = _small()
    rows = np.array([7, 3, 150, 3])
    full_latent = model.get_latent_representation(give_mean=False, seed=2)
    subset_latent = model.get_latent_representation(indices=rows, give_mean=False, seed=2)
    np.testing.assert_array_equal(subset_latent, full_latent[rows])
    full_split = model.get_denoised_counts(seed=4, method="split").toarray()
    subset_split = model.get_denoised_counts(indices=rows, seed=4, method="split").toarray()
    np.testing.assert_array_equal(subset_split, full_split[rows])
    other = adata.copy()
    x = other.X.toarray().astype(np.float32)
    x[10, 0] = np.nan  # a bad cell that is not selected
    other.X = sp.csr_matrix(x)
    mean_other = model.get_latent_representation(other, indices=rows)
    np.testing.assert_array_equal(mean_other, model.get_latent_representation(indices=rows))
    with pytest.raises(ValueError, match="adata.X contains NaN"):
        model.get_latent_representation(other)  # the whole AnnData: every cell is validated
    with pytest.raises(ValueError, match="adata.X contains NaN"):
        model.get_latent_representation(other, indices=[10])
