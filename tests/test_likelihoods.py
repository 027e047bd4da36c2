"""Tests of the count likelihoods (``scar_jax.likelihoods``) against scipy.stats and NumPy re-derivations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sparse
import scipy.special as sp
import scipy.stats as st

from scar_jax.likelihoods import (
    NB_EPS,
    PROBS_EPS,
    NegativeBinomialEps,
    cell_log_constants,
    log_prob_kernel,
    log_prob_torch_rounding,
    make_likelihood,
    mixture_probs,
)

N_CELLS, N_GENES = 5, 8


def _inputs(seed: int, library_range=(5, 60), theta_range=(0.2, 8.0)):
    """Seeded (probs (n, G), integer library (n, 1), theta (1, G), zi_logits (n, G)) in float64."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.01, 0.6, size=(N_CELLS, N_GENES))
    library = rng.integers(*library_range, size=(N_CELLS, 1)).astype(np.float64)
    theta = rng.uniform(*theta_range, size=(1, N_GENES))
    zi_logits = rng.normal(0.0, 2.0, size=(N_CELLS, N_GENES))
    return rng, probs, library, theta, zi_logits


def _log_prob(kind, probs, library, theta=None, zi_logits=None, x=None, dtype="float32"):
    """``make_likelihood(...).log_prob(x)`` computed in ``dtype``, returned as float64 NumPy."""
    with jax.enable_x64(dtype == "float64"):
        cast = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731
        d = make_likelihood(kind, cast(probs), cast(library), cast(theta), cast(zi_logits))
        lp = d.log_prob(cast(x))
        assert lp.dtype == jnp.dtype(dtype)
        return np.asarray(lp, np.float64)


def _float32_floor(library):
    """Absolute error floor of a float32 binomial log-pmf: its log-gamma terms, of size
    lgamma(N + 1), cancel, leaving a few float32 ulps of lgamma(N + 1) (PyTorch's Binomial too)."""
    return 4.0 * float(np.finfo(np.float32).eps) * sp.gammaln(np.asarray(library) + 1.0)


def _tol(dtype, rtol32):
    return dict(rtol=1e-10, atol=1e-10) if dtype == "float64" else dict(rtol=rtol32, atol=1e-5)


def np_log_nb_positive(x, mu, theta, eps=NB_EPS):
    """scvi-tools' ``log_nb_positive`` in float64 NumPy."""
    log_theta_mu_eps = np.log(theta + mu + eps)
    return (
        theta * (np.log(theta + eps) - log_theta_mu_eps)
        + x * (np.log(mu + eps) - log_theta_mu_eps)
        + sp.gammaln(x + theta)
        - sp.gammaln(theta)
        - sp.gammaln(x + 1.0)
    )


# ---------------------------------------------------------------- tables against scipy.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("library_range", [(1, 40), (40, 400), (10_000, 100_000)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_binomial_vs_scipy(seed, library_range, dtype):
    rng, probs, library, _, _ = _inputs(seed, library_range)
    x = rng.binomial(library.astype(np.int64), probs).astype(np.float64)
    x[0, :2] = [0.0, library[0, 0]]  # both ends of the support
    want = st.binom(n=library, p=probs).logpmf(x)
    got = _log_prob("b", probs, library, x=x, dtype=dtype)
    if dtype == "float64":
        np.testing.assert_allclose(got, want, rtol=1e-10)  # the formula itself: rtol 1e-10
    else:
        # float32: rtol 1e-5 above the floor of the probability terms, 16 eps32 (|x log p| + |(N - x) log(1 - p)|)
        # (measured up to 9.4 eps32), which cancel against the coefficient at large N and p (0.038 nats at N ~ 1e5,
        # p ~ 0.6). The betaln form has no lgamma(N + 1) floor (the lgamma form's: 4 eps32 lgamma(N + 1), 0.5 nats).
        terms = np.abs(x * np.log(probs)) + np.abs((library - x) * np.log1p(-probs))
        floor = 16.0 * float(np.finfo(np.float32).eps) * terms
        assert (np.abs(got - want) <= 1e-5 * np.abs(want) + floor).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_poisson_vs_scipy(seed, dtype):
    rng, probs, _, _, _ = _inputs(seed)
    library = rng.uniform(0.3, 80.0, size=(N_CELLS, 1))  # a size factor need not be integral
    x = rng.poisson(library * probs).astype(np.float64)
    want = st.poisson(library * probs).logpmf(x)
    got = _log_prob("poisson", probs, library, x=x, dtype=dtype)
    np.testing.assert_allclose(got, want, **_tol(dtype, rtol32=1e-5))  # float32: rtol 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("theta_range", [(0.2, 2.0), (2.0, 50.0)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nb_vs_scipy(seed, theta_range, dtype):
    # moderate means (>= 0.05): scvi's eps = 1e-8 inside the logs is invisible at rtol 1e-4 (float32)
    # and at rtol 1e-6 in float64
    rng, probs, library, theta, _ = _inputs(seed, theta_range=theta_range)
    mu = library * probs
    x = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
    x[0, 0] = 0.0
    want = st.nbinom(n=theta, p=theta / (theta + mu)).logpmf(x)
    got = _log_prob("nb", probs, library, theta, x=x, dtype=dtype)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == "float64" else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zinb_vs_numpy_mixture(seed, dtype):
    rng, probs, library, theta, zi_logits = _inputs(seed)
    mu = library * probs
    x = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
    x[:, :2] = 0.0
    x[:, 2] = np.maximum(x[:, 2], 1.0)
    pi = sp.expit(zi_logits)
    nb = st.nbinom(n=theta, p=theta / (theta + mu))
    want = np.where(x == 0, np.log(pi + (1.0 - pi) * nb.pmf(0)), np.log1p(-pi) + nb.logpmf(x))
    got = _log_prob("zinb", probs, library, theta, zi_logits, x=x, dtype=dtype)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == "float64" else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, want, **tol)  # float32: rtol 1e-4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nb_eps_formula_vs_scvi_log_nb_positive(dtype):
    # includes tiny and zero means, where the eps formula departs from the exact NB
    rng = np.random.default_rng(3)
    mu = np.concatenate([[0.0, 1e-12, 1e-9, 1e-8, 1e-6], rng.uniform(0.01, 100.0, size=11)])
    mu = np.broadcast_to(mu, (3, mu.size)).copy()
    theta = rng.uniform(0.1, 20.0, size=(1, mu.shape[1]))
    x = np.stack([np.zeros(mu.shape[1]), np.ones(mu.shape[1]), rng.integers(0, 30, mu.shape[1])]).astype(float)
    want = np_log_nb_positive(x, mu, theta)
    with jax.enable_x64(dtype == "float64"):
        d = NegativeBinomialEps(mean=jnp.asarray(mu, dtype), concentration=jnp.asarray(theta, dtype))
        got = d.log_prob(jnp.asarray(x, dtype))
        assert got.dtype == jnp.dtype(dtype)
    # float64: rtol 1e-10 (same formula); float32: rtol 1e-5 (atol 1e-5 for values near 0)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol)
    # at mean 0 the eps formula is finite where the exact NB gives -inf for x > 0
    assert np.isfinite(np.asarray(got)).all()


# ---------------------------------------------------------------- the ambient mixture


@pytest.mark.parametrize("per_cell", [False, True])
def test_mixture_probs_and_binomial(per_cell):
    rng = np.random.default_rng(4)
    phi = rng.dirichlet(np.ones(N_GENES), size=N_CELLS) * 0.999
    eps = rng.uniform(0.0, 1.0, size=(N_CELLS, 1))
    a = rng.dirichlet(np.ones(N_GENES), size=N_CELLS if per_cell else 1)
    got = np.asarray(mixture_probs(jnp.asarray(phi), jnp.asarray(eps), jnp.asarray(a)), np.float64)
    want = (1.0 - eps) * phi + eps * a
    assert got.shape == (N_CELLS, N_GENES)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)  # rtol 1e-6 (float32)
    np.testing.assert_allclose(got.sum(-1), (1.0 - eps[:, 0]) * phi.sum(-1) + eps[:, 0], rtol=1e-6)
    library = rng.integers(20, 200, size=(N_CELLS, 1)).astype(float)
    x = rng.binomial(library.astype(np.int64), want).astype(float)
    lp = _log_prob("b", got, library, x=x)
    ref = st.binom(n=library, p=want).logpmf(x)
    assert (np.abs(lp - ref) <= 1e-5 * np.abs(ref) + _float32_floor(library)).all()  # as the table above
    lp64 = _log_prob("b", want, library, x=x, dtype="float64")
    np.testing.assert_allclose(lp64, ref, rtol=1e-10)


def test_mixture_probs_endpoints():
    phi = jnp.asarray([[0.5, 0.3, 0.0]])
    a = jnp.asarray([[0.2, 0.2, 0.6]])
    np.testing.assert_array_equal(np.asarray(mixture_probs(phi, jnp.zeros((1, 1)), a)), np.asarray(phi))
    np.testing.assert_array_equal(np.asarray(mixture_probs(phi, jnp.ones((1, 1)), a)), np.asarray(a))


# ---------------------------------------------------------------- edge cases


def test_binomial_probs_zero_and_one_are_clamped():
    probs = jnp.asarray([[0.0, 1.0, 0.0, 1.0, 0.5]], jnp.float32)
    library = jnp.asarray([[10.0]], jnp.float32)
    x = jnp.asarray([[0.0, 10.0, 3.0, 7.0, 5.0]], jnp.float32)

    def f(p):
        return make_likelihood("b", p, library).log_prob(x)

    lp = np.asarray(f(probs), np.float64)
    assert np.isfinite(lp).all()
    pc = np.clip(np.asarray(probs, np.float64), PROBS_EPS, 1.0 - PROBS_EPS)
    want = st.binom(n=10, p=pc).logpmf(np.asarray(x))
    # the clamp at float32 eps: log p(0 | p=0) ~ -10 * 1.2e-7, p(3 | p=0) ~ 3 * log(1.2e-7)
    np.testing.assert_allclose(lp, want, rtol=1e-4, atol=1e-5)
    assert abs(lp[0, 0]) < 1e-5 and abs(lp[0, 1]) < 1e-5
    grad = np.asarray(jax.grad(lambda p: f(p).sum())(probs))
    assert np.isfinite(grad).all()


def test_nb_mean_zero_finite_with_finite_gradients():
    theta = jnp.asarray([[0.5, 2.0, 10.0]], jnp.float32)
    x = jnp.asarray([[0.0, 0.0, 2.0]], jnp.float32)

    def f(mean, th):
        return NegativeBinomialEps(mean=mean, concentration=th).log_prob(x).sum()

    mean = jnp.zeros((1, 3), jnp.float32)
    assert np.isfinite(float(f(mean, theta)))
    g_mean, g_theta = jax.grad(f, argnums=(0, 1))(mean, theta)
    assert np.isfinite(np.asarray(g_mean)).all() and np.isfinite(np.asarray(g_theta)).all()
    # d/dmu at mu = 0: -theta / (theta + eps) + x / eps - x / (theta + eps)   (rtol 1e-4)
    th = np.asarray(theta, np.float64)
    xx = np.asarray(x, np.float64)
    want = -th / (th + NB_EPS) + xx / NB_EPS - xx / (th + NB_EPS)
    np.testing.assert_allclose(np.asarray(g_mean, np.float64), want, rtol=1e-4)
    # the zinb path too
    zl = jnp.zeros((1, 3))
    lp = lambda m: make_likelihood("zinb", m, jnp.ones((1, 1)), theta, zl).log_prob(x).sum()  # noqa: E731
    assert np.isfinite(np.asarray(jax.grad(lp)(mean))).all()


@pytest.mark.parametrize("kind", ["b", "poisson", "nb", "zinb"])
def test_large_library_finite(kind):
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(N_GENES), size=2)
    library = np.full((2, 1), 1e6)
    theta = np.full((1, N_GENES), 3.0)
    x = rng.binomial(1_000_000, probs).astype(float)
    x[0, 0] = 0.0
    lp = _log_prob(kind, probs, library, theta, np.zeros((2, N_GENES)), x=x)
    assert np.isfinite(lp).all()
    if kind == "b":  # float32 at N = 1e6: right up to the cancellation floor (about 6 nats per gene)
        ref = st.binom(n=1e6, p=probs).logpmf(x)
        assert (np.abs(lp - ref) <= 1e-5 * np.abs(ref) + _float32_floor(library)).all()


# ---------------------------------------------------------------- gradients


def test_nb_eps_gradient_finite_differences():
    # float64 central differences with h = 1e-6 on the mean and theta: rtol 1e-6
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        mu = jnp.asarray(rng.uniform(0.05, 30.0, size=(3, 6)))
        theta = jnp.asarray(rng.uniform(0.2, 15.0, size=(1, 6)))
        x = jnp.asarray(rng.integers(0, 25, size=(3, 6)).astype(np.float64))

        def f(m, t):
            return NegativeBinomialEps(mean=m, concentration=t).log_prob(x)

        g_mu, g_theta = jax.grad(lambda m, t: f(m, t).sum(), argnums=(0, 1))(mu, theta)
        h = 1e-6
        fd_mu = (f(mu + h, theta) - f(mu - h, theta)) / (2 * h)  # elementwise: each entry its own mean
        fd_theta = ((f(mu, theta + h) - f(mu, theta - h)) / (2 * h)).sum(0, keepdims=True)
        np.testing.assert_allclose(np.asarray(g_mu), np.asarray(fd_mu), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.asarray(g_theta), np.asarray(fd_theta), rtol=1e-6, atol=1e-9)


def test_zinb_gradient_finite_differences():
    # the gate logits too: float64, rtol 1e-6
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        probs = jnp.asarray(rng.uniform(0.01, 0.5, size=(2, 5)))
        library = jnp.asarray([[30.0], [80.0]])
        theta = jnp.asarray(rng.uniform(0.5, 5.0, size=(1, 5)))
        zl = jnp.asarray(rng.normal(size=(2, 5)))
        x = jnp.asarray([[0.0, 1.0, 4.0, 0.0, 9.0], [2.0, 0.0, 0.0, 12.0, 1.0]])

        def f(p, z):
            return make_likelihood("zinb", p, library, theta, z).log_prob(x)

        g_p, g_z = jax.grad(lambda p, z: f(p, z).sum(), argnums=(0, 1))(probs, zl)
        h = 1e-6
        np.testing.assert_allclose(
            np.asarray(g_p), np.asarray((f(probs + h, zl) - f(probs - h, zl)) / (2 * h)), rtol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(g_z), np.asarray((f(probs, zl + h) - f(probs, zl - h)) / (2 * h)), rtol=1e-6
        )


def test_unknown_likelihood_raises():
    with pytest.raises(ValueError, match="gene_likelihood"):
        make_likelihood("zip", jnp.full((1, 2), 0.5), jnp.ones((1, 1)))


# ------------------------------------------------------- scvi-tools' float32 evaluation (parity checks)


@pytest.mark.parametrize("kind", ["b", "poisson", "nb", "zinb"])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_rounding_log_prob_vs_scipy(kind, seed):
    """The float32 replica of scvi-tools' formulas equals the exact law up to its float32 rounding."""
    rng, probs, library, theta, zi_logits = _inputs(seed, library_range=(40, 400))
    mean = library * probs
    if kind == "b":
        x = rng.binomial(library.astype(np.int64), probs).astype(np.float64)
        exact = st.binom.logpmf(x, library, probs)
    elif kind == "poisson":
        x = rng.poisson(mean).astype(np.float64)
        exact = st.poisson.logpmf(x, mean)
    else:
        x = rng.negative_binomial(theta, theta / (theta + mean)).astype(np.float64)
        x[0, :3] = 0.0  # zeros take the zero branch of the ZINB
        exact = np_log_nb_positive(x, mean, theta)
        if kind == "zinb":
            gate = sp.expit(zi_logits)
            exact = np.where(x == 0, np.log(gate + (1 - gate) * np.exp(exact)), np.log1p(-gate) + exact)
    got = log_prob_torch_rounding(kind, x, probs, library if kind == "b" else np.ones_like(library), theta, zi_logits)
    if kind != "b":  # the mean is library * probs: pass the library as the multiplier
        got = log_prob_torch_rounding(kind, x, probs, library, theta, zi_logits)
    assert got.dtype == np.float32 and got.shape == x.shape
    floor = _float32_floor(np.maximum(library, x))  # a few ulps of the cancelling log-gamma terms
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=float(floor.max()))


def test_torch_rounding_binomial_equals_torch_bitwise_mostly():
    """Against ``torch.distributions.Binomial`` itself (when torch is installed): the same float32 numbers."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(500, 0.3), size=40).astype(np.float32)
    library = rng.integers(500, 30_000, size=(40, 1)).astype(np.float32)
    x = rng.binomial(library.astype(np.int64), probs.astype(np.float64)).astype(np.float32)
    ref = torch.distributions.Binomial(total_count=torch.from_numpy(library), probs=torch.from_numpy(probs))
    expected = ref.log_prob(torch.from_numpy(x)).numpy()
    got = log_prob_torch_rounding("b", x, probs, library)
    # equal entry by entry but where glibc's lgammaf or a transcendental is one ulp off the correctly
    # rounded value (measured: 99.9% bit-identical here); there by at most two ulps of lgamma(N + 1)
    assert np.mean(got == expected) > 0.999
    ulp = np.spacing(sp.gammaln(library.astype(np.float64) + 1.0).astype(np.float32))
    assert np.all(np.abs(got - expected) <= 2 * ulp)


def test_torch_rounding_unknown_likelihood_raises():
    with pytest.raises(ValueError, match="gene_likelihood"):
        log_prob_torch_rounding("zip", np.zeros((1, 2)), np.full((1, 2), 0.5), np.ones((1, 1)))


# ---------------------------------------------------------------- kernel and parameter-free part


def _reference_log_prob(kind, x, probs, library, theta):
    """float64 log-probabilities: scipy.stats (binomial, Poisson), scvi-tools' eps-stable NB formula (NB)."""
    if kind == "b":
        return st.binom.logpmf(x, library, probs)
    if kind == "poisson":
        return st.poisson.logpmf(x, library * probs)
    return np_log_nb_positive(x, library * probs, theta)


@pytest.mark.parametrize("kind", ["b", "poisson", "nb"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_plus_cell_constant_is_scipy_log_prob(kind, dtype):
    """``sum_g log_prob_kernel + cell_log_constants`` = ``sum_g`` of the float64 log-pmf per cell (scipy; NB: the
    eps-stable formula, ``c = 0``).
    Tolerance relative to the summed terms' size ``|kernel| + |c|``: 1e-10 in float64; in float32 8 ulps (1e-5 for
    the NB, whose float32 kernel is the whole log-probability)."""
    rng, probs, library, theta, _ = _inputs(41, library_range=(5, 60) if kind == "nb" else (5, 3000))
    x = rng.binomial(library.astype(np.int64), probs).astype(np.float64)
    x[0, :3] = 0.0
    library = x.sum(-1, keepdims=True) if kind == "b" else library  # the binomial's total is the observed library
    want = _reference_log_prob(kind, x, probs, library, theta).sum(-1)
    constant = cell_log_constants(kind, sparse.csr_matrix(x), library)
    with jax.enable_x64(dtype == "float64"):
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        law = make_likelihood(kind, cast(probs), cast(library), cast(theta))
        kernel = np.asarray(log_prob_kernel(law, cast(x)).sum(-1), np.float64)
    if kind == "nb":
        np.testing.assert_array_equal(constant, 0.0)
    scale = np.abs(kernel) + np.abs(constant)
    # float32 NB: its own rounding (log(theta + mu) terms, test_nb_vs_scipy), not the split's
    tol = 1e-10 if dtype == "float64" else 1e-5 if kind == "nb" else 8 * float(np.finfo(np.float32).eps)
    assert np.all(np.abs(kernel + constant - want) <= tol * scale)


@pytest.mark.parametrize("kind", ["b", "poisson", "nb", "zinb"])
def test_cell_log_constants_vs_scipy_dense_sparse_and_chunked(kind):
    """``c`` per cell against scipy: ``log pmf(x) - (x log p + (N - x) log(1 - p))`` (binomial), ``log pmf(x) -
    (x log mu - mu)`` (Poisson), 0 (NB, ZINB); dense, CSR (with a duplicate entry) and one row per chunk agree."""
    rng = np.random.default_rng(5)
    x = rng.poisson(rng.gamma(0.5, 8.0, size=(6, 9))).astype(np.float64)
    x[2] = 0.0
    library = x.sum(-1, keepdims=True) + (kind != "b") * 3.0
    p, mu = 0.3, 2.5
    if kind == "b":
        want = (st.binom.logpmf(x, library, p) - x * np.log(p) - (library - x) * np.log1p(-p)).sum(-1)
    elif kind == "poisson":
        want = (st.poisson.logpmf(x, mu) - x * np.log(mu) + mu).sum(-1)
    else:
        want = np.zeros(6)
    dense = cell_log_constants(kind, x, library)
    np.testing.assert_allclose(dense, want, rtol=1e-12, atol=1e-10)
    assert dense[2] == 0.0  # a cell without counts
    duplicated = sparse.csr_matrix((np.r_[x[0, 0] - 1.0, 1.0], (np.r_[0, 0], np.r_[0, 0])), shape=x.shape)
    csr = sparse.csr_matrix(x) - sparse.csr_matrix(duplicated.toarray()) + duplicated  # same values, two entries
    csr = sparse.csr_matrix((csr.data, csr.indices, csr.indptr), shape=x.shape)
    np.testing.assert_allclose(cell_log_constants(kind, csr, library, chunk_entries=9), want, rtol=1e-12, atol=1e-10)


def test_cell_log_constants_arguments():
    with pytest.raises(ValueError, match="library"):
        cell_log_constants("b", np.ones((2, 3)))
    with pytest.raises(ValueError, match="gene_likelihood"):
        cell_log_constants("gaussian", np.ones((2, 3)))
