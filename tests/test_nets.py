"""Tests of the SCAR networks and activations (``scar_jax.nets``) against hand values and NumPy oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scar_jax.nets import (
    SCARNet,
    bfloat16_dot_general,
    dot_precision,
    row_normalize,
    scale_activation_fn,
    softplus_sp,
    tanh01,
)
from scar_jax.vae import init_variables

N_GENES = 40
N_HIDDEN = 24
N_LATENT = 4


def np_softplus(x):
    return np.logaddexp(0.0, np.asarray(x, dtype=np.float64))


def np_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- activations: hand values


def test_softplus_sp_hand_value():
    # softplus(0.01) - softplus(-1) = 0.69815 - 0.31326 = 0.38489 (atol 1e-4)
    assert float(softplus_sp(jnp.float32(0.01), sparsity=0.9)) == pytest.approx(0.3849, abs=1e-4)


@pytest.mark.parametrize(
    ("sparsity", "threshold"),
    [(0.9, 0.31326168751822286), (1.0, np.log(2.0)), (0.0, np_softplus(-10.0))],
)
def test_softplus_sp_threshold(sparsity, threshold):
    # threshold = softplus(x) - softplus_sp(x) wherever softplus(x) exceeds it (rtol 1e-6)
    x = jnp.asarray([0.0, 0.5, 1.0, 3.0], jnp.float32)
    got = np_softplus(x) - np.asarray(softplus_sp(x, sparsity=sparsity), np.float64)
    np.testing.assert_allclose(got, np.full(4, threshold), rtol=1e-6, atol=1e-7)


def test_softplus_sp_at_sparsity_one_is_zero_at_origin():
    # threshold ln 2 = softplus(0): the output is exactly 0 at x <= 0
    assert float(softplus_sp(jnp.float32(0.0), sparsity=1.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(softplus_sp(jnp.float32(-0.5), sparsity=1.0)) == 0.0


@pytest.mark.parametrize("x", [-1.5, -5.0, -30.0, -1e4])
def test_softplus_sp_zero_for_very_negative(x):
    assert float(softplus_sp(jnp.float32(x), sparsity=0.9)) == 0.0  # exact


def test_softplus_sp_non_negative_and_matches_numpy():
    x = np.linspace(-8.0, 8.0, 101).astype(np.float32)
    got = np.asarray(softplus_sp(jnp.asarray(x), sparsity=0.9), np.float64)
    want = np.maximum(0.0, np_softplus(x) - np_softplus(-1.0))
    assert (got >= 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tanh01_hand_values():
    assert float(tanh01(jnp.float32(1.0))) == pytest.approx(0.8808, abs=1e-4)  # (1 + tanh 1) / 2
    assert float(tanh01(jnp.float32(0.0))) == 0.5  # exact
    x = np.linspace(-20.0, 20.0, 81).astype(np.float32)
    got = np.asarray(tanh01(jnp.asarray(x)))
    assert ((got >= 0) & (got <= 1)).all()
    # atol 2e-7: 1 + tanh(x) cancels in float32 for x << 0 (float32 eps is 1.2e-7), as in PyTorch
    np.testing.assert_allclose(got, (1.0 + np.tanh(x.astype(np.float64))) / 2.0, rtol=1e-6, atol=2e-7)


def test_row_normalize_sums():
    rng = np.random.default_rng(0)
    x = rng.gamma(0.5, 1.0, size=(6, 30)).astype(np.float32)
    x[2] = 0.0  # all-zero row stays zero
    x[3] *= 1e-4  # tiny row: the 1e-5 is visible
    s = x.astype(np.float64).sum(-1)
    got = np.asarray(row_normalize(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(got.sum(-1), s / (s + 1e-5), rtol=1e-6)  # rtol 1e-6
    np.testing.assert_allclose(got, x / (s[:, None] + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("kind", ["softplus_sp", "softplus", "softmax"])
@pytest.mark.parametrize("sparsity", [0.9, 0.5])
def test_scale_activation_fn_matches_numpy(kind, sparsity):
    rng = np.random.default_rng(1)
    v = rng.normal(0.0, 3.0, size=(5, 12)).astype(np.float32)
    want = {
        "softplus_sp": lambda a: np.maximum(0.0, np_softplus(a) - np_softplus(-10.0 * (1.0 - sparsity))),
        "softplus": np_softplus,
        "softmax": np_softmax,
    }[kind](v)
    got = np.asarray(scale_activation_fn(jnp.asarray(v), kind, sparsity), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # rtol 1e-5 (float32)


def test_scale_activation_fn_invalid_kind():
    with pytest.raises(ValueError, match="scale_activation"):
        scale_activation_fn(jnp.zeros((2, 3)), "relu", 0.9)


# ---------------------------------------------------------------- activations: gradients


def _central_difference(f, x, h=1e-6):
    return (f(x + h) - f(x - h)) / (2.0 * h)


def test_activation_gradients_finite_differences():
    # float64, central differences with h = 1e-6 (truncation ~h^2, round-off ~1e-10): rtol 1e-6.
    # softplus_sp at sparsity 0.9 has its kink at x = -1: the points stay away from it.
    with jax.enable_x64(True):
        x = jnp.asarray([-6.0, -3.0, -0.9, -0.5, 0.0, 0.01, 0.7, 2.0, 6.0], jnp.float64)
        for fn in (lambda t: softplus_sp(t, 0.9), lambda t: softplus_sp(t, 0.6), tanh01):
            assert fn(x).dtype == jnp.float64
            grad = jax.vmap(jax.grad(fn))(x)
            fd = _central_difference(fn, x)
            np.testing.assert_allclose(np.asarray(grad), np.asarray(fd), rtol=1e-6, atol=1e-12)
        # the analytic derivatives, for good measure
        sig = 1.0 / (1.0 + np.exp(-np.asarray(x)))
        want_sp = np.where(np.asarray(x) > -1.0, sig, 0.0)
        np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(lambda t: softplus_sp(t, 0.9)))(x)), want_sp)
        want_tanh = (1.0 - np.tanh(np.asarray(x)) ** 2) / 2.0
        np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(tanh01))(x)), want_tanh, rtol=1e-9)


def test_softplus_sp_gradient_at_kink():
    # at the kink (x = -1 for sparsity 0.9) the derivative is a valid subgradient in [0, sigmoid(-1)]
    with jax.enable_x64(True):
        g = float(jax.grad(lambda t: softplus_sp(t, 0.9))(jnp.float64(-1.0)))
    assert np.isfinite(g)
    assert 0.0 <= g <= 1.0 / (1.0 + np.e) + 1e-12


# ---------------------------------------------------------------- SCARNet


def _net(**kwargs) -> SCARNet:
    base = dict(n_genes=N_GENES, n_hidden=N_HIDDEN, n_latent=N_LATENT, n_layers=2)
    base.update(kwargs)
    return SCARNet(**base)


def _counts(seed: int, n: int = 16) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.poisson(rng.gamma(0.6, 4.0, size=(n, N_GENES))).astype(np.float32))


@pytest.fixture(scope="module")
def variables():
    return init_variables(_net(compute_zi_logits=False), jax.random.key(0), N_GENES)


def _leaf_paths(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def test_parameter_tree_names_and_shapes(variables):
    shapes = _leaf_paths(variables["params"])
    g, h, lat = N_GENES, N_HIDDEN, N_LATENT
    want = {"px_r": (1, g)}
    for part, fan_in in (("encoder", g), ("decoder", lat)):
        for i in range(2):
            want[f"{part}/hidden/dense_{i}/kernel"] = (fan_in if i == 0 else h, h)
            want[f"{part}/hidden/dense_{i}/bias"] = (h,)
            want[f"{part}/hidden/batchnorm_{i}/scale"] = (h,)
            want[f"{part}/hidden/batchnorm_{i}/bias"] = (h,)
    for name, out in (("mean", lat), ("log_var", lat)):
        want[f"encoder/{name}/kernel"] = (h, out)
        want[f"encoder/{name}/bias"] = (out,)
    # zi_logits exists even though compute_zi_logits=False (a non-zinb model)
    for name, out in (("native_frequencies", g), ("noise_ratio", 1), ("zi_logits", g)):
        want[f"decoder/{name}/kernel"] = (h, out)
        want[f"decoder/{name}/bias"] = (out,)
    assert shapes == want
    stats = _leaf_paths(variables["batch_stats"])
    want_stats = {
        f"{part}/hidden/batchnorm_{i}/{s}": (h,)
        for part in ("encoder", "decoder")
        for i in range(2)
        for s in ("mean", "var")
    }
    assert stats == want_stats
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
        np.testing.assert_array_equal(np.asarray(leaf), 0.0 if path[-1].key == "mean" else 1.0)


def test_dense_initialisation_follows_torch_linear(variables):
    # every Dense kernel and bias within +-1/sqrt(fan_in), spread like U(-b, b) (std b/sqrt(3) within 15%)
    n_dense = 0
    for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        if path[-1].key != "kernel":
            continue
        layer = variables["params"]
        for k in path[:-1]:
            layer = layer[k.key]
        kernel, bias = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
        bound = 1.0 / np.sqrt(kernel.shape[0])
        assert np.abs(kernel).max() <= bound * (1 + 1e-6), path
        assert np.abs(bias).max() <= bound * (1 + 1e-6), path
        if kernel.size >= 90:
            assert kernel.std() == pytest.approx(bound / np.sqrt(3.0), rel=0.15), path
            assert np.abs(kernel).max() > 0.8 * bound, path
        n_dense += 1
    assert n_dense == 9


def test_batchnorm_momentum_is_torch_001(variables):
    net = _net(compute_zi_logits=False)
    x = _counts(3)
    noise = jnp.zeros((x.shape[0], N_LATENT))
    _, updates = net.apply(variables, x, noise, train=True, mutable=["batch_stats"])
    p = variables["params"]["encoder"]["hidden"]["dense_0"]
    h = np.log1p(np.asarray(x, np.float64)) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
    new = updates["batch_stats"]["encoder"]["hidden"]["batchnorm_0"]
    # from running mean 0 / var 1: new = 0.99 * old + 0.01 * batch statistic (biased variance, as flax)
    np.testing.assert_allclose(np.asarray(new["mean"]), 0.01 * h.mean(0), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(np.asarray(new["var"]), 0.99 + 0.01 * h.var(0), rtol=1e-4)


def test_eval_mode_rows_independent_train_mode_not(variables):
    net = _net(compute_zi_logits=False)
    x1, x2 = _counts(4, 6), _counts(5, 10)
    both = jnp.concatenate([x1, x2], axis=0)
    m1, v1 = net.apply(variables, x1, method="encode", train=False)
    m12, v12 = net.apply(variables, both, method="encode", train=False)
    np.testing.assert_allclose(np.asarray(m12[:6]), np.asarray(m1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v12[:6]), np.asarray(v1), rtol=1e-5, atol=1e-6)
    (t1, _), _ = net.apply(variables, x1, method="encode", train=True, mutable=["batch_stats"])
    (t12, _), _ = net.apply(variables, both, method="encode", train=True, mutable=["batch_stats"])
    assert np.abs(np.asarray(t12[:6]) - np.asarray(t1)).max() > 1e-3  # batch statistics differ
    assert np.abs(np.asarray(t1) - np.asarray(m1)).max() > 1e-3  # train != eval


def test_dropout_only_in_training(variables):
    x = _counts(6)
    plain, dropped = _net(compute_zi_logits=False), _net(dropout_rate=0.5, compute_zi_logits=False)
    e_plain = plain.apply(variables, x, method="encode", train=False)
    e_drop = dropped.apply(variables, x, method="encode", train=False)
    for a, b in zip(e_plain, e_drop, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rngs = {"dropout": jax.random.key(1)}
    (t_plain, _), _ = plain.apply(variables, x, method="encode", train=True, rngs=rngs, mutable=["batch_stats"])
    (t_drop, _), _ = dropped.apply(variables, x, method="encode", train=True, rngs=rngs, mutable=["batch_stats"])
    assert np.abs(np.asarray(t_plain) - np.asarray(t_drop)).max() > 1e-3
    (t_drop2, _), _ = dropped.apply(
        variables, x, method="encode", train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
    )
    assert np.abs(np.asarray(t_drop2) - np.asarray(t_drop)).max() > 1e-3  # depends on the dropout key


@pytest.mark.parametrize("scale_activation", ["softplus_sp", "softplus", "softmax"])
def test_decoder_output_ranges(variables, scale_activation):
    net = _net(scale_activation=scale_activation, compute_zi_logits=False)
    z = 4.0 * jax.random.normal(jax.random.key(7), (64, N_LATENT))
    phi, eps, zi = net.apply(variables, z, method="decode")
    phi, eps = np.asarray(phi, np.float64), np.asarray(eps)
    assert phi.shape == (64, N_GENES) and eps.shape == (64, 1) and zi.shape == (64, N_GENES)
    assert ((eps >= 0) & (eps <= 1)).all()
    assert (phi >= 0).all()
    assert (phi.sum(-1) <= 1.0 + 1e-6).all()
    if scale_activation != "softplus_sp":
        np.testing.assert_allclose(phi.sum(-1), 1.0, atol=1e-4)  # atol 1e-4


def test_full_forward_shapes(variables):
    net = _net(compute_zi_logits=True)
    x = _counts(8, 5)
    out = net.apply(variables, x, jnp.ones((5, N_LATENT)))
    shapes = [tuple(o.shape) for o in out]
    n, g, lat = 5, N_GENES, N_LATENT
    assert shapes == [(n, lat), (n, lat), (n, lat), (n, g), (n, 1), (n, g), (1, g)]
    z_mean, z_var, z = (np.asarray(o, np.float64) for o in out[:3])
    assert (z_var >= 1e-4).all()
    np.testing.assert_allclose(z, z_mean + np.sqrt(z_var), rtol=1e-5)  # z = mean + sqrt(var) * noise
    np.testing.assert_allclose(np.asarray(out[6]), np.exp(np.asarray(variables["params"]["px_r"])), rtol=1e-6)


def test_logistic_normal_decodes_softmax_z(variables):
    z = 2.0 * jax.random.normal(jax.random.key(9), (8, N_LATENT))
    ln = _net(latent_distribution="ln", compute_zi_logits=True)
    normal = _net(latent_distribution="normal", compute_zi_logits=True)
    got = ln.apply(variables, z, method="decode")
    want = normal.apply(variables, jax.nn.softmax(z, axis=-1), method="decode")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # and it is not a no-op
    raw = normal.apply(variables, z, method="decode")
    assert np.abs(np.asarray(raw[0]) - np.asarray(got[0])).max() > 1e-5


# ---------------------------------------------------------------- matmul precision


def test_dot_precision_per_backend(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert dot_precision("float32") == jax.lax.Precision.HIGHEST  # true float32 (JAX's GPU default is TF32)
    assert dot_precision("tensorfloat32") == "TF32_TF32_F32"
    assert dot_precision("bfloat16") == "BF16_BF16_F32"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # XLA's CPU has neither: float32
    assert {dot_precision(p) for p in ("float32", "tensorfloat32", "bfloat16")} == {jax.lax.Precision.HIGHEST}
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        dot_precision("float8")


def test_reduced_precision_names_on_cpu():
    """On a CPU "tensorfloat32" is float32 exactly, and "bfloat16" stays close to float32 (bfloat16 operands)."""
    if jax.default_backend() != "cpu":
        pytest.skip("on GPUs the precisions are dot algorithms (test_dot_precision_per_backend)")
    x = jax.random.poisson(jax.random.key(0), 3.0, (6, N_GENES)).astype(jnp.float32)
    noise = jax.random.normal(jax.random.key(1), (6, N_LATENT))
    outputs = {}
    for precision in ("float32", "bfloat16", "tensorfloat32"):
        net = SCARNet(N_GENES, n_hidden=N_HIDDEN, n_latent=N_LATENT, matmul_precision=precision)
        variables = init_variables(net, jax.random.key(2), N_GENES)
        outputs[precision] = net.apply(variables, x, noise)
    for a, b in zip(outputs["float32"], outputs["tensorfloat32"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(outputs["float32"], outputs["bfloat16"], strict=True):
        assert np.asarray(b).dtype == np.float32
        scale = np.abs(np.asarray(a)).max()
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 0.05 * scale  # bfloat16 keeps 8 bits: ~0.4% per operand
    pairs = zip(outputs["float32"], outputs["bfloat16"], strict=True)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)  # the operands were rounded


def test_bfloat16_dot_general_is_bfloat16_products_summed_in_float32():
    """Against float64 products of the operands rounded to bfloat16 (ml_dtypes): the float32 sum's rounding only."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    lhs, rhs = rng.normal(size=(7, 300)).astype(np.float32), rng.normal(size=(300, 5)).astype(np.float32)
    got = np.asarray(bfloat16_dot_general(jnp.asarray(lhs), jnp.asarray(rhs), (((1,), (0,)), ((), ()))))
    rounded = [m.astype(ml_dtypes.bfloat16).astype(np.float64) for m in (lhs, rhs)]
    expected = rounded[0] @ rounded[1]
    assert got.dtype == np.float32
    bound = 300 * 2.0**-24 * (np.abs(rounded[0]) @ np.abs(rounded[1]))  # n u sum |products|, u = 2^-24 (float32)
    assert (np.abs(got - expected) <= bound).all()
    assert np.abs(got - lhs.astype(np.float64) @ rhs).max() > 1e-3  # the operands were rounded
