"""The SCAR loss (``scar_jax.vae``) against a float64 NumPy re-derivation of the whole model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp

from scar_jax.likelihoods import cell_log_constants
from scar_jax.nets import SCARNet
from scar_jax.vae import (
    Batch,
    SCARConfig,
    forward,
    init_variables,
    loss_terms,
    standard_normal_noise,
)

N_GENES, N_HIDDEN, N_LATENT, N_CELLS = 7, 5, 3, 4
F32_EPS = 1.1920929e-07  # float32 machine epsilon: the binomial probability clamp
NB_EPS = 1e-8  # scvi-tools' eps in log_nb_positive / log_zinb_positive
KL_WEIGHT = 0.7
RTOL = 1e-5  # float32 model against the float64 re-derivation


# ---------------------------------------------------------------- the float64 NumPy model


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def np_softplus(v):
    return np.logaddexp(0.0, v)


def np_softmax(v):
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_dense(p, h):
    return h @ p["kernel"] + p["bias"]


def np_hidden(params, stats, h, n_layers, train):
    """n_layers x [Dense -> BatchNorm(eps 1e-3) -> ReLU]; batch statistics (biased variance) in training."""
    for i in range(n_layers):
        h = np_dense(params[f"dense_{i}"], h)
        bn = params[f"batchnorm_{i}"]
        if train:
            mean, var = h.mean(0), h.var(0)
        else:
            mean, var = stats[f"batchnorm_{i}"]["mean"], stats[f"batchnorm_{i}"]["var"]
        h = (h - mean) / np.sqrt(var + 1e-3) * bn["scale"] + bn["bias"]
        h = np.maximum(h, 0.0)
    return h


def np_log_nb_positive(x, mu, theta, eps=NB_EPS):
    log_theta_mu_eps = np.log(theta + mu + eps)
    return (
        theta * (np.log(theta + eps) - log_theta_mu_eps)
        + x * (np.log(mu + eps) - log_theta_mu_eps)
        + sp.gammaln(x + theta)
        - sp.gammaln(theta)
        - sp.gammaln(x + 1.0)
    )


def np_log_zinb_positive(x, mu, theta, pi, eps=NB_EPS):
    """scvi-tools' ``log_zinb_positive`` (pi: the gate logits)."""
    softplus_pi = np_softplus(-pi)
    log_theta_eps = np.log(theta + eps)
    log_theta_mu_eps = np.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = np_softplus(pi_theta_log) - softplus_pi
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (np.log(mu + eps) - log_theta_mu_eps)
        + sp.gammaln(x + theta)
        - sp.gammaln(theta)
        - sp.gammaln(x + 1.0)
    )
    return (x < eps) * case_zero + (x > eps) * case_non_zero


def np_model(config, variables, x, library, batch_index, ambient, noise, train):
    """Per-cell (reconstruction_loss, kl_local) and the loss, all in float64, from the math document."""
    params, stats = _f64(variables["params"]), _f64(variables["batch_stats"])
    x, library, ambient, noise = (np.asarray(a, np.float64) for a in (x, library, ambient, noise))
    n_layers = config.n_layers
    # encoder
    enc = params["encoder"]
    h = np_hidden(enc["hidden"], stats["encoder"]["hidden"], np.log1p(x), n_layers, train)
    z_mean = np_dense(enc["mean"], h)
    z_var = np.exp(np_dense(enc["log_var"], h)) + 1e-4
    z = z_mean + np.sqrt(z_var) * noise
    # decoder
    dec = params["decoder"]
    z_in = np_softmax(z) if config.latent_distribution == "ln" else z
    h = np_hidden(dec["hidden"], stats["decoder"]["hidden"], z_in, n_layers, train)
    v = np_dense(dec["native_frequencies"], h)
    if config.scale_activation == "softplus_sp":
        act = np.maximum(0.0, np_softplus(v) - np_softplus(-10.0 * (1.0 - config.sparsity)))
    elif config.scale_activation == "softplus":
        act = np_softplus(v)
    else:
        act = np_softmax(v)
    phi = act / (act.sum(-1, keepdims=True) + 1e-5)
    eps = (1.0 + np.tanh(np_dense(dec["noise_ratio"], h))) / 2.0
    zi = np_dense(dec["zi_logits"], h)
    theta = np.exp(params["px_r"])
    a = ambient if ambient.shape[0] == 1 else ambient[np.asarray(batch_index)]
    p = (1.0 - eps) * phi + eps * a
    # likelihood
    kind = config.gene_likelihood
    if kind == "b":
        pc = np.clip(p, F32_EPS, 1.0 - F32_EPS)
        ll = (
            sp.gammaln(library + 1.0)
            - sp.gammaln(x + 1.0)
            - sp.gammaln(library - x + 1.0)
            + x * np.log(pc)
            + (library - x) * np.log1p(-pc)
        )
    elif kind == "poisson":
        rate = library * p
        ll = x * np.log(rate) - rate - sp.gammaln(x + 1.0)
    elif kind == "nb":
        ll = np_log_nb_positive(x, library * p, theta)
    else:
        ll = np_log_zinb_positive(x, library * p, theta, zi)
    rec = -ll.sum(-1)
    kl = 0.5 * (z_var + z_mean**2 - 1.0 - np.log(z_var)).sum(-1)
    batch_mean = {}
    if train:  # the running statistics flax should return, momentum 0.01 (PyTorch convention)
        batch_mean = dict(z_mean=z_mean, z_var=z_var)
    return rec, kl, np.mean(rec + KL_WEIGHT * kl), batch_mean


# ---------------------------------------------------------------- fixtures


def _randomised_variables(config: SCARConfig, seed: int):
    """Initial variables with non-trivial BatchNorm scale/bias and running statistics (positive var)."""
    net = config.make_net()
    variables = init_variables(net, jax.random.key(seed), config.n_genes)
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "mean":
            new = rng.normal(0.0, 0.5, shape)
        elif name == "var":
            new = rng.uniform(0.3, 2.5, shape)
        elif name == "scale":
            new = rng.uniform(0.5, 1.5, shape)
        elif name == "bias" and "batchnorm" in str(path[-2].key):
            new = rng.normal(0.0, 0.3, shape)
        elif name == "kernel":
            new = np.asarray(leaf) * 2.5  # livelier latent means / variances than at init
        else:
            return leaf
        return jnp.asarray(new, jnp.float32)

    return net, jax.tree_util.tree_map_with_path(perturb, variables)


def _data(seed: int, n_batches: int):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(0.8, 5.0, size=(N_CELLS, N_GENES))).astype(np.float32)
    x[0, 0] = 0.0
    x[1, :] = np.maximum(x[1, :], 1.0)
    library = x.sum(-1, keepdims=True)
    batch_index = np.asarray([0, 1, 1, 0][:N_CELLS], np.int32) % n_batches
    ambient = rng.dirichlet(np.ones(N_GENES), size=n_batches).astype(np.float32)
    return Batch(jnp.asarray(x), jnp.asarray(library), jnp.asarray(batch_index)), jnp.asarray(ambient)


def _noise(key):
    # vae.forward splits a single typed key first and draws the noise from the first half
    noise_key, _ = jax.random.split(key)
    return standard_normal_noise(noise_key, N_CELLS, N_LATENT)


CASES = [
    # (gene_likelihood, latent_distribution, n_layers, n_batches, scale_activation)
    *[(lik, lat, 2, 2, "softplus_sp") for lik in ("b", "poisson", "nb", "zinb") for lat in ("normal", "ln")],
    ("b", "normal", 1, 1, "softplus_sp"),
    ("zinb", "ln", 1, 1, "softplus_sp"),
    ("nb", "normal", 1, 2, "softplus"),
    ("b", "normal", 2, 1, "softmax"),
]


def _check(config, n_batches, seed, train):
    net, variables = _randomised_variables(config, seed)
    batch, ambient = _data(seed + 100, n_batches)
    key = jax.random.key(seed + 7)
    terms, stats = loss_terms(net, config, variables, batch, ambient, key, KL_WEIGHT, train=train)
    rec, kl, loss, _ = np_model(
        config, variables, batch.x, batch.library, batch.batch_index, ambient, _noise(key), train
    )
    assert terms.reconstruction_loss.shape == (N_CELLS,) and terms.kl_local.shape == (N_CELLS,)
    assert np.abs(kl).min() > 1e-2  # a non-trivial KL, so that rtol 1e-5 is meaningful
    # rtol 1e-5 on per-cell reconstruction loss, per-cell KL and the loss
    np.testing.assert_allclose(np.asarray(terms.reconstruction_loss, np.float64), rec, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(terms.kl_local, np.float64), kl, rtol=RTOL)
    np.testing.assert_allclose(float(terms.loss), loss, rtol=RTOL)
    return net, variables, batch, stats


def _config(lik, lat, n_layers, act="softplus_sp"):
    return SCARConfig(
        n_genes=N_GENES,
        n_hidden=N_HIDDEN,
        n_latent=N_LATENT,
        n_layers=n_layers,
        gene_likelihood=lik,
        latent_distribution=lat,
        scale_activation=act,
    )


@pytest.mark.parametrize(("lik", "lat", "n_layers", "n_batches", "act"), CASES)
def test_loss_matches_numpy_eval_mode(lik, lat, n_layers, n_batches, act):
    config = _config(lik, lat, n_layers, act)
    net, variables, batch, stats = _check(config, n_batches, seed=11, train=False)
    # evaluation mode leaves the running statistics alone
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(variables["batch_stats"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("lik", "lat", "n_layers", "n_batches", "act"),
    [("b", "normal", 2, 2, "softplus_sp"), ("zinb", "ln", 1, 1, "softplus_sp")],
)
def test_loss_matches_numpy_train_mode(lik, lat, n_layers, n_batches, act):
    # training mode: batch statistics (biased variance, as flax), and running averages updated by 0.01
    config = _config(lik, lat, n_layers, act)
    net, variables, batch, stats = _check(config, n_batches, seed=12, train=True)
    params = _f64(variables["params"])
    old = _f64(variables["batch_stats"])
    h = np.log1p(np.asarray(batch.x, np.float64))
    enc, enc_old = params["encoder"]["hidden"], old["encoder"]["hidden"]
    for i in range(n_layers):
        pre = np_dense(enc[f"dense_{i}"], h)
        new = stats["encoder"]["hidden"][f"batchnorm_{i}"]
        want_mean = 0.99 * enc_old[f"batchnorm_{i}"]["mean"] + 0.01 * pre.mean(0)
        want_var = 0.99 * enc_old[f"batchnorm_{i}"]["var"] + 0.01 * pre.var(0)
        np.testing.assert_allclose(np.asarray(new["mean"]), want_mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(new["var"]), want_var, rtol=1e-5)
        bn = enc[f"batchnorm_{i}"]
        h = np.maximum((pre - pre.mean(0)) / np.sqrt(pre.var(0) + 1e-3) * bn["scale"] + bn["bias"], 0.0)


def test_train_and_eval_losses_differ():
    config = _config("b", "normal", 2)
    net, variables = _randomised_variables(config, 3)
    batch, ambient = _data(4, 1)
    key = jax.random.key(0)
    ev, _ = loss_terms(net, config, variables, batch, ambient, key, 1.0, train=False)
    tr, _ = loss_terms(net, config, variables, batch, ambient, key, 1.0, train=True)
    assert abs(float(ev.loss) - float(tr.loss)) > 1e-3 * abs(float(ev.loss))


def test_per_cell_keys_noise():
    # (n,) per-cell keys: each cell's noise depends on its own key only
    config = _config("b", "normal", 2)
    net, variables = _randomised_variables(config, 5)
    batch, _ = _data(6, 1)
    keys = jax.random.split(jax.random.key(3), N_CELLS)
    out, _ = forward(net, variables, batch.x, keys, train=False)
    out_2, _ = forward(net, variables, batch.x[:2], keys[:2], train=False)
    np.testing.assert_allclose(np.asarray(out_2.z), np.asarray(out.z[:2]), rtol=1e-6, atol=1e-7)
    noise = (np.asarray(out.z, np.float64) - np.asarray(out.z_mean)) / np.sqrt(np.asarray(out.z_var))
    want = np.stack([np.asarray(jax.random.normal(k, (N_LATENT,))) for k in keys])
    np.testing.assert_allclose(noise, want, rtol=1e-4, atol=1e-5)


def test_kl_weight_enters_linearly():
    config = _config("nb", "normal", 2)
    net, variables = _randomised_variables(config, 8)
    batch, ambient = _data(9, 1)
    key = jax.random.key(1)
    t0, _ = loss_terms(net, config, variables, batch, ambient, key, 0.0)
    t1, _ = loss_terms(net, config, variables, batch, ambient, key, 1.0)
    np.testing.assert_allclose(float(t0.loss), float(jnp.mean(t0.reconstruction_loss)), rtol=1e-6)
    np.testing.assert_allclose(float(t1.loss), float(jnp.mean(t1.reconstruction_loss + t1.kl_local)), rtol=1e-6)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_latent", 0),
        ("n_genes", -3),
        ("n_hidden", 2.0),
        ("n_layers", True),
        ("sparsity", 1.5),
        ("sparsity", -0.1),
        ("gene_likelihood", "foo"),
        ("scale_activation", "relu"),
        ("latent_distribution", "x"),
        ("dropout_rate", 1.0),
        ("dropout_rate", -0.2),
    ],
)
def test_config_validation(field, value):
    kwargs = {"n_genes": 10, field: value}
    with pytest.raises(ValueError, match=field):
        SCARConfig(**kwargs)


def test_config_defaults_and_make_net():
    config = SCARConfig(n_genes=10)
    assert (config.n_hidden, config.n_latent, config.n_layers, config.dropout_rate) == (150, 15, 2, 0.0)
    assert (config.gene_likelihood, config.latent_distribution, config.scale_activation) == (
        "b",
        "normal",
        "softplus_sp",
    )
    assert config.sparsity == 0.9
    net = config.make_net()
    assert net.n_genes == 10 and not net.compute_zi_logits
    assert dataclasses.replace(config, gene_likelihood="zinb").make_net().compute_zi_logits
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_genes = 3  # type: ignore[misc]


def test_config_defaults_are_the_networks():
    """SCARConfig repeats SCARNet's hyper-parameters (it is their validated, JSON-serialisable record): their
    defaults must not drift apart."""
    net_defaults = {f.name: f.default for f in dataclasses.fields(SCARNet)}
    for field in dataclasses.fields(SCARConfig):
        if field.name in ("n_genes", "gene_likelihood"):
            continue
        assert field.default == net_defaults[field.name], field.name


# ---------------------------------------------------------------- differentiability


@pytest.mark.parametrize("lik", ["b", "zinb"])
def test_gradient_wrt_ambient_profile(lik):
    config = _config(lik, "normal", 2)
    net, variables = _randomised_variables(config, 13)
    batch, ambient = _data(14, 2)
    key = jax.random.key(2)

    def loss(a):
        return loss_terms(net, config, variables, batch, a, key, 1.0)[0].loss

    g = np.asarray(jax.grad(loss)(ambient), np.float64)
    assert g.shape == ambient.shape
    assert np.isfinite(g).all()
    assert np.abs(g).max() > 0
    assert (np.abs(g).sum(-1) > 0).all()  # each batch's profile gets gradient from its own cells
    # directional derivative against a central difference (float32: rtol 2e-2)
    direction = jnp.asarray(np.random.default_rng(0).normal(size=ambient.shape), jnp.float32)
    h = 1e-3
    fd = (float(loss(ambient + h * direction)) - float(loss(ambient - h * direction))) / (2 * h)
    assert float(np.sum(g * np.asarray(direction))) == pytest.approx(fd, rel=2e-2)


# ---------------------------------------------------------------- the parameter-free part, precomputed


@pytest.mark.parametrize("lik", ["b", "poisson", "nb"])
def test_precomputed_constant_same_loss_and_gradient(lik):
    """``Batch.log_constant`` (each cell's ``sum_g c(x_ig)``, float64 rounded to float32) instead of ``c`` per entry:
    the reconstruction loss within rtol 1e-5 of the float64 model and within float32 rounding of it and of the
    full formula's (a few ulps of ``|rec| + |c|``, the size of the summed terms); the gradient bit for bit the
    full formula's (``c`` has none: the backward pass is the same computation)."""
    config = _config(lik, "normal", 2)
    net, variables = _randomised_variables(config, 21)
    batch, ambient = _data(22, 2)
    constants = cell_log_constants(lik, np.asarray(batch.x), np.asarray(batch.library))
    diet = batch._replace(log_constant=jnp.asarray(constants, jnp.float32))
    key = jax.random.key(5)

    def loss(params, b):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        terms, _ = loss_terms(net, config, v, b, ambient, key, KL_WEIGHT, train=True)
        return terms.loss, terms

    (_, full), grad_full = jax.value_and_grad(loss, has_aux=True)(variables["params"], batch)
    (_, kept), grad_kept = jax.value_and_grad(loss, has_aux=True)(variables["params"], diet)
    rec64, _, loss64, _ = np_model(
        config, variables, batch.x, batch.library, batch.batch_index, ambient, _noise(key), True
    )
    rec = np.asarray(kept.reconstruction_loss, np.float64)
    np.testing.assert_allclose(rec, rec64, rtol=RTOL)
    np.testing.assert_allclose(float(kept.loss), loss64, rtol=RTOL)
    # float32 rounding of sums whose terms are of size |rec| + |c|: the precomputed constant is the closer to float64
    rounding = F32_EPS * (np.abs(rec64) + np.abs(constants))
    assert np.all(np.abs(rec - rec64) <= 2 * rounding)
    assert np.all(np.abs(rec - np.asarray(full.reconstruction_loss, np.float64)) <= 8 * rounding)
    if lik == "nb":  # c = 0: the same computation
        np.testing.assert_array_equal(rec, np.asarray(full.reconstruction_loss, np.float64))
    for a, b in zip(jax.tree.leaves(grad_kept), jax.tree.leaves(grad_full), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
