"""scvi-tools' own SCAR test, ported: ``tests/external/scar/test_scar.py`` of scvi-tools 1.4.2 (unchanged at
its HEAD of 2026-08-18, commit 93dc4fae), with only the import and the data helper changed.

``test_scar`` below is the reference's test line for line; the one import changed is ``from scvi.external import
SCAR`` -> ``from scar_jax import SCAR``, and ``scvi.data.synthetic_iid`` is replaced by a NumPy copy of it
(same recipe and shapes: 2 batches of 200 cells, 100 genes, NB(5, 0.3) counts with 70% kept, 3 labels), so
that the test needs neither scvi-tools nor PyTorch and always runs. Where scar-jax deliberately differs, a
comment says so, and ``test_scar_results`` asserts what scar-jax does instead.
"""

import numpy as np
import pandas as pd
import scipy
from anndata import AnnData

from scar_jax import SCAR  # was: from scvi.external import SCAR


def synthetic_iid(batch_size: int = 200, n_genes: int = 100, n_batches: int = 2, n_labels: int = 3, seed: int = 0):
    """``scvi.data.synthetic_iid()``'s recipe (scvi-tools 1.4.2, ``_generate_synthetic``), seeded NumPy."""
    rng = np.random.default_rng(seed)
    n_obs = batch_size * n_batches
    rna = rng.negative_binomial(5, 0.3, size=(n_obs, n_genes)) * rng.binomial(1, 0.7, size=(n_obs, n_genes))
    batch = pd.Categorical(np.repeat([f"batch_{i}" for i in range(n_batches)], batch_size))
    labels = pd.Categorical([f"label_{i}" for i in rng.integers(0, n_labels, size=n_obs)])
    obs = pd.DataFrame({"batch": batch, "labels": labels}, index=[str(i) for i in range(n_obs)])
    return AnnData(rna.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"gene_{i}" for i in range(n_genes)]))


def test_scar():
    n_latent = 5
    adata = synthetic_iid()

    adata.obs["batch"] = adata.obs["batch"].cat.rename_categories(["batch_2", "batch_3"])

    adata.X = scipy.sparse.csr_matrix(adata.X)
    SCAR.setup_anndata(adata, batch_key="batch", labels_key="labels")

    # prob=0: every droplet is cell-free (threshold log(0) * n_genes = -inf), as in scvi-tools. Differs: the
    # setup's batch_key is used, so one profile per batch (100 x 2) from each batch's droplets (scvi-tools: one
    # pooled profile); the result is not used here, as in the reference
    _ = SCAR.get_ambient_profile(adata, adata, prob=0.0, iterations=1, sample=100)
    model = SCAR(adata, ambient_profile=None, n_latent=n_latent)
    model.train(1, check_val_every_n_epoch=1, train_size=0.5)
    model.get_elbo()
    model.get_latent_representation()
    model.get_marginal_ll(n_mc_samples=5)
    model.get_reconstruction_error()
    # differs: scar-jax's default method is "calibrated" (count-preserving), scvi-tools' is "expected"
    model.get_denoised_counts(adata, n_samples=1)
    _ = model.history

    # tests __repr__
    print(model)


def test_scar_results(capsys):
    """What the reference test's calls return in scar-jax (the reference only checks that they run)."""
    adata = synthetic_iid()
    adata.obs["batch"] = adata.obs["batch"].cat.rename_categories(["batch_2", "batch_3"])
    adata.X = scipy.sparse.csr_matrix(adata.X)
    SCAR.setup_anndata(adata, batch_key="batch", labels_key="labels")

    profile = SCAR.get_ambient_profile(adata, adata, prob=0.0, iterations=1, sample=100)
    assert profile.shape == (100, 2)  # one column per batch of the setup (scvi-tools: (100, 1))
    np.testing.assert_allclose(profile.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(adata.varm["ambient_profile"], profile)

    model = SCAR(adata, ambient_profile=None, n_latent=5)
    model.train(1, check_val_every_n_epoch=1, train_size=0.5, enable_progress_bar=False)
    assert len(model.train_indices) == 200 and len(model.validation_indices) == 200
    assert np.isfinite(model.get_elbo()) and model.get_elbo() < 0  # an ELBO (log-likelihood bound), as scvi-tools
    assert model.get_latent_representation().shape == (400, 5)
    marginal = model.get_marginal_ll(n_mc_samples=5)
    assert np.isfinite(marginal) and marginal > model.get_elbo() - 50  # log p(x) >= ELBO up to sampling noise
    assert set(model.get_reconstruction_error()) == {"reconstruction_loss"}
    denoised = model.get_denoised_counts(adata, n_samples=1)
    # calibrated: integers, 0 <= denoised <= raw, sparse like the input (scvi-tools: a dense array that can
    # exceed the raw counts)
    assert scipy.sparse.issparse(denoised) and denoised.shape == adata.shape
    assert (denoised != np.round(denoised)).nnz == 0 and (denoised > adata.X).nnz == 0 and denoised.min() >= 0
    history = model.history
    assert {"elbo_train", "elbo_validation", "train_loss_epoch", "validation_loss"} <= set(history)
    assert list(history["elbo_validation"].index) == [0]  # check_val_every_n_epoch=1: validated after epoch 1
    print(model)
    assert "Training status: Trained" in capsys.readouterr().out
