"""scvi-tools parity: a trained ``scvi.external.SCAR`` imported into scar-jax computes the same numbers.

For each case (every likelihood, latent distribution and scale activation at least once) an
scvi-tools SCAR is trained a few epochs on simulated data, saved, imported with
:func:`scar_jax.scvi_io.from_scvi_tools`, and both are evaluated in evaluation mode on the same cells:
q(z | x) mean and variance, the decoder heads at the same z, the per-cell reconstruction loss and KL.
Agreement is asserted at relative error 1e-5 in float32; the measured figures are printed at the end.
The per-cell log-likelihood and ELBO are compared at 1e-5 with our parameters evaluated by scvi-tools' own
float32 formulas (``likelihoods.log_prob_torch_rounding``, the "torch rounding" rows); scar-jax's own, more
accurate float32 likelihoods differ from scvi-tools' by the reference's rounding (bounded separately).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("scvi")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from parity_helpers import (  # noqa: E402
    CASES,
    Case,
    counts,
    hyperparameters,
    make_adata,
    record,
    rel_err,
    rel_err_elementwise,
    setup_args,
)

from scar_jax import SCAR, posterior, scvi_io  # noqa: E402
from scar_jax.likelihoods import log_prob_torch_rounding, make_likelihood, mixture_probs  # noqa: E402
from scar_jax.vae import Batch, Outputs, cell_ambient_profile, kl_local, likelihood  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def imported(trained):
    cache = {}

    def get(case: Case):
        if case not in cache:
            scvi_model, path, adata = trained(case)
            cache[case] = (scvi_model, scvi_io.from_scvi_tools(SCAR, path, adata.copy()), adata)
        return cache[case]

    return get


def scvi_truncated_library(x: np.ndarray) -> np.ndarray:
    """scvi-tools' binomial total count: ``exp(log(sum x)).int()`` in float32, ``(n, 1)``."""
    library = torch.log(torch.from_numpy(x).sum(1)).unsqueeze(1)
    return torch.exp(library).int().numpy().astype(np.float32)


def evaluate_both(scvi_model, model: SCAR, x: np.ndarray, batch_index: np.ndarray, seed: int = 0):
    """Both models at the same cells and the same z draw; returns a dict of (ours, scvi) pairs."""
    module = scvi_model.module
    module.eval()
    xt = torch.from_numpy(x)
    bt = torch.from_numpy(batch_index.astype(np.int64)).reshape(-1, 1)
    eps = np.random.default_rng(seed).standard_normal((x.shape[0], model.config.n_latent)).astype(np.float32)
    with torch.no_grad():
        inference = module.inference(xt, bt)
        qz = inference["qz"]
        z_raw = qz.loc + qz.scale * torch.from_numpy(eps)
        z_in = torch.softmax(z_raw, dim=-1) if model.config.latent_distribution == "ln" else z_raw
        px_scale, px_noise, _, px_dropout = module.decoder(z_in, inference["library"])
        inference["z"] = z_in
        generative = module.generative(z=z_in, library=inference["library"], batch_index=bt)
        loss = module.loss({"X": xt, "batch": bt}, inference, generative, kl_weight=1.0)
    rec_scvi = loss.reconstruction_loss["reconstruction_loss"].numpy()
    kl_scvi = loss.kl_local["kl_divergence_z"].numpy()

    cfg, variables = model.config, model.variables
    z_mean, z_var = posterior.encode(cfg, variables, jnp.asarray(x))
    nf, noise, zi = model._net.apply(variables, jnp.asarray(z_raw.numpy()), method="decode")
    theta = jnp.exp(variables["params"]["px_r"])
    out = Outputs(z_mean, z_var, jnp.asarray(z_raw.numpy()), nf, noise, zi, theta)
    exact = np.asarray(x.sum(1, keepdims=True), np.float32)
    library = scvi_truncated_library(x) if cfg.gene_likelihood == "b" else exact
    ambient = jnp.asarray(model.ambient_profile)

    def rec(lib):
        batch = Batch(jnp.asarray(x), jnp.asarray(lib), jnp.asarray(batch_index, jnp.int32))
        return np.asarray(-likelihood(cfg, out, batch, ambient).log_prob(batch.x).sum(-1))

    rec_ours = rec(library)
    kl_ours = np.asarray(kl_local(out))
    # our network's parameters evaluated with scvi-tools' float32 formulas, operation for operation
    probs = mixture_probs(nf, noise, cell_ambient_profile(ambient, jnp.asarray(batch_index, jnp.int32)))
    log_p = log_prob_torch_rounding(
        cfg.gene_likelihood, x, np.asarray(probs), library, np.asarray(theta), None if zi is None else np.asarray(zi)
    )
    rec_torch_rounding = -log_p.sum(-1)
    pairs = {
        "z_mean": (z_mean, qz.loc.numpy()),
        "z_var": (z_var, qz.variance.numpy()),
        "native_frequencies": (nf, px_scale.numpy()),
        "noise_ratio": (noise, px_noise.numpy()),
        "reconstruction_loss": (rec_ours, rec_scvi),
        "kl_local": (kl_ours, kl_scvi),
        "elbo": (-(rec_ours + kl_ours), -(rec_scvi + kl_scvi)),
    }
    if cfg.gene_likelihood == "zinb":
        pairs["zi_logits"] = (zi, px_dropout.numpy())
    pairs["reconstruction_loss, torch rounding"] = (rec_torch_rounding, rec_scvi)
    pairs["elbo, torch rounding"] = (-(rec_torch_rounding + kl_ours), -(rec_scvi + kl_scvi))
    return pairs, rec(exact), rec_scvi, generative


def likelihood_only(gene_likelihood: str, generative: dict, x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell reconstruction loss of scvi-tools and of scar-jax from the *same* distribution parameters.

    The parameters are scvi-tools' (the ambient mixture exactly as its ``loss`` forms it), cast to
    ``dtype``; scvi-tools' distribution classes and scar-jax's :func:`make_likelihood` then evaluate
    ``-sum_g log p(x_g)``. In float64 this isolates the formulas; in float32 it measures rounding.
    """
    from scvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial

    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    px = generative["px"]
    xt = torch.from_numpy(x).to(tdt)
    ones = np.ones((x.shape[0], 1), dtype)
    if gene_likelihood == "b":
        # both clamp p to [eps, 1 - eps] before taking logits; torch with the eps of the dtype, scar-jax with
        # float32's (also in float64): clamp first so the float64 comparison isolates the formula
        eps32 = float(np.finfo(np.float32).eps)
        probs = (px.probs + generative["pamb_scale"]).to(tdt).clamp(eps32, 1 - eps32)
        total = px.total_count.to(tdt)
        ref = torch.distributions.Binomial(total_count=total, probs=probs)
        mean, library, theta, zi = probs.numpy(), total.numpy().astype(dtype), None, None
    else:
        mu = ((px.rate if gene_likelihood == "poisson" else px.mu) + generative["pamb_rate"]).to(tdt)
        mean, library, theta, zi = mu.numpy(), ones, None, None
        if gene_likelihood == "poisson":
            ref = Poisson(rate=mu)
        else:
            theta_t = px.theta.to(tdt)
            theta = theta_t.numpy() if theta_t.ndim == 2 else theta_t.numpy().reshape(1, -1)
            if gene_likelihood == "nb":
                ref = NegativeBinomial(mu=mu, theta=theta_t)
            else:
                zi_t = px.zi_logits.to(tdt)
                zi = zi_t.numpy()
                ref = ZeroInflatedNegativeBinomial(mu=mu, theta=theta_t, zi_logits=zi_t)
    scvi_value = (-ref.log_prob(xt).sum(-1)).numpy()
    with jax.enable_x64(dtype == "float64"):
        ours = make_likelihood(
            gene_likelihood,
            jnp.asarray(mean),
            jnp.asarray(library),
            None if theta is None else jnp.asarray(theta),
            None if zi is None else jnp.asarray(zi),
        )
        ours_value = np.asarray(-ours.log_prob(jnp.asarray(x, dtype)).sum(-1))
    assert ours_value.dtype == scvi_value.dtype == np.dtype(dtype)
    return ours_value, scvi_value


def check_parity(label: str, scvi_model, model: SCAR, x: np.ndarray, batch_index: np.ndarray) -> dict[str, float]:
    """Assert that ``model`` (scar-jax) and ``scvi_model`` compute the same numbers on ``x``; returns the errors."""
    pairs, _, _, generative = evaluate_both(scvi_model, model, x, batch_index)
    errors = {}
    for name, (ours, ref) in pairs.items():
        ours, ref = np.asarray(ours), np.asarray(ref)
        assert np.isfinite(ours).all() and np.isfinite(ref).all(), name
        per_cell = name.startswith(("reconstruction_loss", "kl_local", "elbo"))
        errors[name] = record(label, name, (rel_err_elementwise if per_cell else rel_err)(ours, ref))
    gene_likelihood = model.config.gene_likelihood
    ours64, scvi64 = likelihood_only(gene_likelihood, generative, x, "float64")
    ours32, scvi32 = likelihood_only(gene_likelihood, generative, x, "float32")
    np.testing.assert_array_equal(scvi32, pairs["reconstruction_loss"][1])  # the same evaluation as scvi's loss
    formula = record(label, "likelihood formula, float64", rel_err_elementwise(ours64, scvi64))
    scvi_rounding = record(label, "likelihood float32 rounding: scvi", rel_err_elementwise(scvi32, scvi64))
    ours_rounding = record(label, "likelihood float32 rounding: scar-jax", rel_err_elementwise(ours32, ours64))
    assert formula <= 1e-12, formula
    # scar-jax's float32 log-likelihood is within RTOL of its exact (float64) value: the binomial uses the
    # cancellation-free betaln form (scar_jax.likelihoods.BinomialStable); scvi-tools' own float32 value is not
    # (its rounding error is recorded above, 1e-4 for the binomial), so the two can only agree to about that.
    assert ours_rounding <= RTOL, ours_rounding
    # The network outputs and KL agree to RTOL. The per-cell log-likelihood sums log-factorials of the
    # library (lgamma(N + 1) ~ 2e4, ulp 2e-3) that cancel to ~1e3: in float32 each implementation is off
    # its own float64 value by its rounding error (measured above); the two may differ by their sum.
    # Evaluated with scvi-tools' own float32 formulas (likelihoods.log_prob_torch_rounding, the "torch
    # rounding" rows), our model's log-likelihood and ELBO agree with scvi-tools' to RTOL.
    rounding = RTOL + ours_rounding + scvi_rounding
    bounds = {k: rounding if k in ("reconstruction_loss", "elbo") else RTOL for k in errors}
    bad = {k: (v, bounds[k]) for k, v in errors.items() if v > bounds[k]}
    assert not bad, f"relative errors above their bounds (error, bound): {bad}"
    return errors


def batch_codes(adata, case: Case) -> np.ndarray:
    return np.asarray(adata.obs["batch"].cat.codes if case.batches else np.zeros(adata.n_obs), np.int32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_imported_model_matches_scvi_tools(case, imported):
    scvi_model, model, adata = imported(case)
    check_parity(case.name, scvi_model, model, counts(adata, case), batch_codes(adata, case))


@pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c.name)
def test_model_api_matches_scvi_tools(case, imported):
    """The public methods agree too (latent mean/variance, training flag, split, history, profile)."""
    scvi_model, model, adata = imported(case)
    scvi_mean, scvi_var = scvi_model.get_latent_representation(return_dist=True)
    ours_mean, ours_var = model.get_latent_representation(return_dist=True)
    assert record(case.name, "api z_mean", rel_err(ours_mean, scvi_mean)) <= RTOL
    assert record(case.name, "api z_var", rel_err(ours_var, scvi_var)) <= RTOL
    np.testing.assert_array_equal(model.ambient_profile, scvi_model.module.ambient_profile.numpy())
    np.testing.assert_array_equal(model.train_indices, scvi_model.train_indices)
    np.testing.assert_array_equal(model.validation_indices, scvi_model.validation_indices)
    assert model.is_trained and len(model.history_rows) == scvi_model.history["elbo_train"].shape[0]


def test_binomial_total_count_truncation_is_the_only_difference(imported):
    """Documented deliberate difference: scvi-tools' binomial total count is ``exp(log N).int()``.

    ``exp(log N)`` rounds below ``N`` in float32 for about 45% of integers (7, 13, 26, ...), and ``.int()``
    truncates, so scvi-tools evaluates ``Binomial(N - 1, p)`` for those cells. scar-jax uses the exact
    observed library ``N``. The per-cell reconstruction losses differ exactly on the truncated cells,
    by ``log Binomial(x; N - 1, p) - log Binomial(x; N, p)``.
    """
    case = next(c for c in CASES if c.gene_likelihood == "b")
    scvi_model, model, adata = imported(case)
    x = counts(adata, case)
    n = x.sum(1)
    truncated = scvi_truncated_library(x)[:, 0] < n
    record("binomial total count", "fraction of cells truncated", float(truncated.mean()))
    assert 0.1 < truncated.mean() < 0.9  # common, not a corner case
    # over all libraries 1 .. 10^5: about 45% are truncated (by exactly 1), none rounded up
    all_n = torch.arange(1, 100_001, dtype=torch.float32)
    all_t = torch.exp(torch.log(all_n)).int().float()
    assert bool(((all_t == all_n) | (all_t == all_n - 1)).all())
    record("binomial total count", "fraction of N <= 1e5 truncated", float((all_t < all_n).float().mean()))
    pairs, rec_exact32, rec_scvi32, generative = evaluate_both(scvi_model, model, x, np.zeros(adata.n_obs, np.int32))
    # float64 evaluation from the same parameters (scvi-tools' p), so that rounding does not blur the effect
    ours_truncated, scvi64 = likelihood_only("b", generative, x, "float64")
    assert rel_err_elementwise(ours_truncated, scvi64) <= 1e-12  # same total count: same numbers
    eps32 = float(np.finfo(np.float32).eps)
    probs = (generative["px"].probs + generative["pamb_scale"]).double().clamp(eps32, 1 - eps32).numpy()
    with jax.enable_x64(True):
        dist = make_likelihood("b", jnp.asarray(probs), jnp.asarray(n.astype(np.float64)[:, None]))
        ours_exact = np.asarray(-dist.log_prob(jnp.asarray(x, jnp.float64)).sum(-1))
    effect = np.abs(ours_exact - scvi64)
    # exact N: differs on, and only on, the truncated cells
    np.testing.assert_array_equal(effect > 1e-9 * np.abs(scvi64), truncated)
    record("binomial total count", "max |rec(N) - rec(N-1)| (nats)", float(effect.max()))
    record("binomial total count", "max |rec(N) - rec(N-1)| / rec", float(np.max(effect / np.abs(scvi64))))
    record("binomial total count", "float32 model vs scvi, exact N", rel_err_elementwise(rec_exact32, rec_scvi32))


def test_float32_determinism_of_import(trained):
    """Importing twice gives bit-identical variables, and the mapping is lossless (export gives them back)."""
    case = CASES[0]
    _, path, adata = trained(case)
    a = scvi_io.from_scvi_tools(SCAR, path, adata.copy())
    b = scvi_io.from_scvi_tools(SCAR, path, adata.copy())
    jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
    saved = scvi_io.read_scvi_tools_save(path)
    back = scvi_io.variables_to_state_dict(jax.device_get(a.variables), case.n_layers)
    for key, value in back.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(value, saved["state_dict"][key], err_msg=key)


# ------------------------------------------------------------------------------------------ round trips
def test_export_of_a_scar_jax_trained_model_loads_in_scvi_tools(tmp_path):
    """scar-jax trains, exports; ``scvi.external.SCAR.load`` reads it and computes the same numbers."""
    import scvi

    case = CASES[2]  # nb, layer + batch_key, dropout
    adata = make_adata(case, seed=1)
    SCAR.setup_anndata(adata, **setup_args(case))
    model = SCAR(adata, **hyperparameters(case))
    model.train(max_epochs=2, batch_size=64, plan_kwargs={"lr": 1e-2}, enable_progress_bar=False)
    scvi_io.export_scvi_tools(model, tmp_path / "exported", save_anndata=True)
    loaded = scvi.external.SCAR.load(str(tmp_path / "exported"), adata.copy(), accelerator="cpu")
    assert loaded.is_trained
    check_parity("export: scar-jax trained -> scvi", loaded, model, counts(adata, case), batch_codes(adata, case))
    from_file = scvi.external.SCAR.load(str(tmp_path / "exported"), accelerator="cpu")  # the saved AnnData
    assert from_file.adata.n_obs == adata.n_obs
    np.testing.assert_array_equal(loaded.module.ambient_profile.numpy(), model.ambient_profile)
    np.testing.assert_array_equal(loaded.train_indices, model.train_indices)
    with pytest.raises(ValueError, match="already exists"):
        model.export_scvi_tools(str(tmp_path / "exported"))
    model.export_scvi_tools(str(tmp_path / "exported"), overwrite=True)


def test_import_then_export_gives_back_the_same_weights(trained, tmp_path):
    case = CASES[3]  # zinb, 3 layers
    scvi_model, path, adata = trained(case)
    model = scvi_io.from_scvi_tools(SCAR, path, adata.copy())
    scvi_io.export_scvi_tools(model, tmp_path / "again", prefix="p_")
    original = scvi_io.read_scvi_tools_save(path)["state_dict"]
    again = scvi_io.read_scvi_tools_save(tmp_path / "again", prefix="p_")
    assert again["hyperparameters"] == scvi_io.read_scvi_tools_save(path)["hyperparameters"]
    for key, value in original.items():
        if not key.startswith("l_encoder.") and not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(again["state_dict"][key], value, err_msg=key)
    np.testing.assert_array_equal(again["ambient_profile"], original_ambient := model.ambient_profile)
    assert original_ambient.shape == (1, adata.n_vars)


def test_convert_legacy_save_then_load_without_torch(trained, tmp_path, monkeypatch):
    case = CASES[0]
    _, path, adata = trained(case)
    out = tmp_path / "converted"
    scvi_io.convert_legacy_save(SCAR, path, out)
    reference = scvi_io.from_scvi_tools(SCAR, path, adata.copy())
    monkeypatch.setitem(sys.modules, "torch", None)  # SCAR.load must not need PyTorch
    loaded = SCAR.load(str(out))  # the AnnData saved by scvi-tools was carried over
    monkeypatch.undo()
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, reference.variables)
    np.testing.assert_array_equal(loaded.ambient_profile, reference.ambient_profile)
    assert loaded.is_trained and loaded.config == reference.config
    np.testing.assert_array_equal(loaded.get_latent_representation(), reference.get_latent_representation())
    with pytest.raises(ValueError, match="already exists"):
        scvi_io.convert_legacy_save(SCAR, path, out)


def test_convert_legacy_save_needs_an_anndata(trained, tmp_path):
    case = CASES[0]
    scvi_model, _, adata = trained(case)
    bare = tmp_path / "bare"
    scvi_model.save(str(bare))  # no adata.h5ad
    with pytest.raises(ValueError, match="pass adata"):
        scvi_io.convert_legacy_save(SCAR, bare, tmp_path / "out")
    with pytest.raises(ValueError, match="pass adata"):
        scvi_io.from_scvi_tools(SCAR, bare)
    SCAR.convert_legacy_save(str(bare), str(tmp_path / "out"), adata=adata.copy())
    assert SCAR.load(str(tmp_path / "out"), adata.copy()).is_trained


def test_import_checks_genes_and_architecture(trained, tmp_path):
    import scvi

    case = CASES[0]
    _, path, adata = trained(case)
    with pytest.raises(ValueError, match="var_names do not match"):
        scvi_io.from_scvi_tools(SCAR, path, adata[:, ::-1].copy())
    other = make_adata(case)
    scvi.external.SCAR.setup_anndata(other)
    layer_norm = scvi.external.SCAR(other, n_hidden=8, n_latent=2, use_layer_norm="both")
    layer_norm.save(str(tmp_path / "ln"))
    with pytest.raises(ValueError, match="use_layer_norm"):
        scvi_io.from_scvi_tools(SCAR, tmp_path / "ln", other.copy())


def test_export_refuses_per_batch_ambient_profiles(tmp_path):
    case = CASES[2]
    adata = make_adata(case)
    SCAR.setup_anndata(adata, **setup_args(case))
    profiles = np.random.default_rng(0).random((adata.n_vars, 2))
    model = SCAR(adata, ambient_profile=profiles / profiles.sum(0), **hyperparameters(case))
    with pytest.raises(ValueError, match="single ambient profile"):
        scvi_io.export_scvi_tools(model, tmp_path / "x")


def test_reading_needs_torch_but_not_scvi_tools(trained, monkeypatch):
    """``model.pt`` unpickles without scvi-tools or Lightning: the ``torch`` extra is enough to import."""
    case = CASES[0]
    _, path, adata = trained(case)
    for name in ("scvi", "lightning", "pyro"):
        monkeypatch.setitem(sys.modules, name, None)
    model = SCAR.from_scvi_tools(path, adata.copy())  # the public method delegates to scvi_io
    assert model.is_trained and model.config.gene_likelihood == case.gene_likelihood
