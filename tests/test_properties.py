"""Property-based tests (hypothesis) of the count likelihoods and of the count-preserving split.

Examples come from the profile loaded in ``tests/conftest.py``: ``ci`` (default, 60 derandomized
examples per test, so every run checks the same inputs) or ``thorough`` (1200 fresh examples,
``pytest --hypothesis-profile=thorough tests/test_properties.py``).

Likelihood oracles (``scar_jax.likelihoods.make_likelihood``), all references in float64:

* ``"b"``: ``scipy.stats.binom`` at the clamped probability ``clip(p, eps32, 1 - eps32)``;
* ``"poisson"``: ``scipy.stats.poisson``;
* ``"nb"``: ``scipy.stats.nbinom(theta, theta / (theta + mu))``, up to the effect of scvi-tools'
  ``1e-8`` inside the logs, bounded by ``1e-8 (2 + 2 x / mu)`` (each ``log(a + 1e-8)`` moves by at
  most ``1e-8 / a``);
* ``"zinb"``: the zero-inflated mixture built by hand from ``scipy.stats.nbinom`` and the gate.

The JAX code in float64 must match the reference to ``1e-9`` relative plus ``64 eps64 S``; in float32
(the model's dtype) it must match its own float64 value to ``1e-5`` relative plus ``1e-5 + 32 eps32 S``, where
``S`` is the sum of the magnitudes of the terms of the log-pmf (log-gamma terms, ``x log p`` ...): the
rounding error any evaluation of that sum can carry. Log-probabilities and gradients with respect to
the probabilities (and ``theta``, the gate logits) must be finite on the support, including mean 0,
counts 0, probabilities 0 and 1 and counts up to 10^6.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.special as sps
import scipy.stats as st
from hypothesis import given, settings
from hypothesis import strategies as hs
from hypothesis.extra.numpy import arrays

from scar_jax import denoise, posterior
from scar_jax.likelihoods import NB_EPS, PROBS_EPS, RATE_FLOOR, make_likelihood
from scar_jax.vae import Batch, SCARConfig, init_variables

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
N_GENES = 6
MAX_COUNT = 10**6
FEWER = settings(max_examples=max(10, settings().max_examples // 3))  # a third of the profile's examples

# ---------------------------------------------------------------- strategies


def f32(values) -> np.ndarray:
    return np.asarray(values, np.float32)


def exact32(value: float) -> float:
    """The float32 nearest ``value``, as a Python float (hypothesis' float32 bounds must be exact)."""
    return float(np.float32(value))


# probabilities: exact 0 and 1, and float32 values down to 1e-30 (below that, x / p overflows float32)
TINY = exact32(1e-30)
probability = hs.one_of(
    hs.sampled_from([0.0, 1.0, TINY, PROBS_EPS, 0.5, exact32(1.0 - PROBS_EPS)]),
    hs.floats(TINY, 1.0, width=32),
)
count = hs.one_of(hs.integers(0, 3), hs.integers(0, MAX_COUNT), hs.just(MAX_COUNT))


@hs.composite
def binomial_case(draw):
    n = draw(hs.one_of(hs.integers(0, 30), hs.integers(0, MAX_COUNT), hs.just(MAX_COUNT)))
    x = draw(arrays(np.int64, N_GENES, elements=hs.integers(0, n)))
    probs = draw(arrays(np.float32, N_GENES, elements=probability))
    return probs, f32([n]), f32(x)


@hs.composite
def rate_case(draw):
    """Probabilities, a library (observed total or size factor, 0.1 to 10^6) and counts."""
    probs = draw(arrays(np.float32, N_GENES, elements=probability))
    library = draw(hs.one_of(hs.integers(1, MAX_COUNT).map(float), hs.floats(exact32(0.1), 1e6, width=32)))
    x = draw(arrays(np.int64, N_GENES, elements=count))
    return probs, f32([library]), f32(x)


theta_strategy = arrays(np.float32, N_GENES, elements=hs.floats(exact32(1e-3), 1e4, width=32))
gate_logits = arrays(np.float32, N_GENES, elements=hs.floats(-30.0, 30.0, width=32))


# ---------------------------------------------------------------- the JAX side


@functools.cache
def log_prob_and_grads(kind: str):
    """Jitted ``(log_prob (G,), d sum(log_prob) / d (probs, theta, zi_logits))`` for one cell of ``G`` genes."""

    def log_prob(probs, library, theta, zi_logits, x):
        d = make_likelihood(kind, probs[None], library[None], theta[None], zi_logits[None])
        return d.log_prob(x[None])[0]

    def total(probs, library, theta, zi_logits, x):
        return log_prob(probs, library, theta, zi_logits, x).sum()

    grads = jax.grad(total, argnums=(0, 2, 3))
    return jax.jit(lambda *a: (log_prob(*a), grads(*a)))


def jax_log_prob(kind, probs, library, x, theta=None, zi_logits=None, dtype="float32"):
    """Log-probabilities (float64 NumPy) and gradients computed by the library in ``dtype``."""
    theta = np.ones(N_GENES, np.float32) if theta is None else theta
    zi_logits = np.zeros(N_GENES, np.float32) if zi_logits is None else zi_logits
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(np.asarray(a, np.float64), dtype) for a in (probs, library, theta, zi_logits, x)]
        lp, grads = log_prob_and_grads(kind)(*args)
        assert lp.dtype == jnp.dtype(dtype)
        return np.asarray(lp, np.float64), [np.asarray(g, np.float64) for g in grads]


def assert_close(got, want, rtol, atol, what):
    both_inf = np.isneginf(got) & np.isneginf(want)
    with np.errstate(invalid="ignore"):  # -inf - -inf
        err = np.where(both_inf, 0.0, np.abs(got - want))
    bound = rtol * np.where(both_inf, 0.0, np.abs(want)) + atol
    assert (err <= bound).all(), f"{what}: got {got}, want {want}, error {err}, bound {bound}"


def magnitudes(*terms) -> np.ndarray:
    """``sum |term|`` (terms that are not finite, as ``0 log 0`` evaluated naively, count 0)."""
    return sum(np.abs(np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)) for t in terms)


def check_float32(kind, probs, library, x, theta=None, zi_logits=None, scale=None):
    """float32 within ``1e-5 |lp64| + 1e-5 + 32 eps32 S`` of the float64 JAX value."""
    lp32, grads32 = jax_log_prob(kind, probs, library, x, theta, zi_logits, "float32")
    lp64, _ = jax_log_prob(kind, probs, library, x, theta, zi_logits, "float64")
    # 1e-5 absolute: float32 log-gamma is not exactly 0 at 1 and 2 (measured: lgamma(1) = -4.8e-7)
    assert_close(lp32, lp64, 1e-5, 1e-5 + 32 * EPS32 * scale, f"{kind} float32 vs float64")
    return lp32, grads32


# ---------------------------------------------------------------- likelihoods


@given(binomial_case())
def test_binomial_matches_scipy_and_has_finite_gradients(case):
    probs, library, x = case
    n = float(library[0])
    p = np.clip(probs.astype(np.float64), PROBS_EPS, 1.0 - PROBS_EPS)
    want = st.binom(n=n, p=p).logpmf(x)
    xs = x.astype(np.float64)
    s = magnitudes(
        sps.gammaln(n + 1.0), sps.gammaln(xs + 1.0), sps.gammaln(n - xs + 1.0), xs * np.log(p), (n - xs) * np.log1p(-p)
    )
    lp64, _ = jax_log_prob("b", probs, library, x, dtype="float64")
    assert_close(lp64, want, 1e-9, 64 * EPS64 * s, "binomial float64 vs scipy")
    lp32, (g_probs, _, _) = check_float32("b", probs, library, x, scale=s)
    assert np.isfinite(lp32).all()  # the clamp: finite even at p = 0 or 1 with any count
    assert np.isfinite(g_probs).all()


@given(rate_case())
def test_poisson_matches_scipy_and_has_finite_gradients(case):
    probs, library, x = case
    rate = float(library[0]) * probs.astype(np.float64)  # exact: a product of two float32 values
    xs = x.astype(np.float64)
    want = st.poisson(rate).logpmf(xs)
    support = (rate > 0) | (xs == 0)
    assert np.isneginf(want[~support]).all()
    # a positive count at rate 0 (off the support): the rate inside the log is floored (PoissonZeroSafe), so the
    # value is x log(RATE_FLOOR) - log x! - rate instead of -inf; elsewhere (all rates >= float32 tiny) scipy's
    floored = (xs > 0) & (rate < RATE_FLOOR)
    want = np.where(floored, xs * np.log(RATE_FLOOR) - sps.gammaln(xs + 1.0) - rate, want)
    s = magnitudes(xs * np.log(np.maximum(rate, RATE_FLOOR)), sps.gammaln(xs + 1.0), rate, xs)
    lp64, _ = jax_log_prob("poisson", probs, library, x, dtype="float64")
    assert_close(lp64, want, 1e-9, 64 * EPS64 * s, "poisson float64 vs scipy")
    lp32, (g_probs, _, _) = check_float32("poisson", probs, library, x, scale=s)
    # finite everywhere, including rate 0 with count 0 (log-probability 0, gradient -library) and a positive
    # count at rate 0 (floored: training cannot turn NaN)
    assert np.isfinite(lp32).all()
    assert np.isfinite(g_probs).all()
    np.testing.assert_allclose(g_probs[(rate == 0) & (xs == 0)], -float(library[0]), rtol=1e-6)


def nb_reference(mu, theta, x):
    """scipy's NB log-pmf, and the bound on its distance to the eps formula (+ scipy's own rounding)."""
    p = theta / (theta + mu)
    want = st.nbinom(n=theta, p=p).logpmf(x)
    with np.errstate(divide="ignore", invalid="ignore"):  # np.where evaluates both branches
        eps_bound = np.where(mu > 0, NB_EPS * (2.0 + 2.0 * x / mu), np.where(x > 0, np.inf, 2.0 * NB_EPS))
        # log1p(-p) with p = theta / (theta + mu) rounded: relative error eps64 theta / mu in 1 - p
        scipy_bound = np.where(mu > 0, 8 * EPS64 * (theta + x * theta / mu), 0.0)
    return want, eps_bound + scipy_bound


def nb_scale(mu, theta, x):
    log_sum = np.log(theta + mu + NB_EPS)
    return magnitudes(
        theta * np.log(theta + NB_EPS),
        theta * log_sum,
        x * np.log(mu + NB_EPS),
        x * log_sum,
        sps.gammaln(x + theta),
        sps.gammaln(theta),
        sps.gammaln(x + 1.0),
        2 * x + theta + mu,
    )


@given(rate_case(), theta_strategy)
def test_nb_matches_scipy_up_to_the_eps_and_has_finite_gradients(case, theta):
    probs, library, x = case
    mu = float(library[0]) * probs.astype(np.float64)
    th, xs = theta.astype(np.float64), x.astype(np.float64)
    want, bound = nb_reference(mu, th, xs)
    s = nb_scale(mu, th, xs)
    lp64, _ = jax_log_prob("nb", probs, library, x, theta, dtype="float64")
    assert_close(lp64, want, 1e-9, 64 * EPS64 * s + bound, "nb float64 vs scipy")
    lp32, (g_probs, g_theta, _) = check_float32("nb", probs, library, x, theta, scale=s)
    # the eps formula is finite everywhere, even at mean 0 with a positive count (scipy: -inf)
    assert np.isfinite(lp32).all() and np.isfinite(g_probs).all() and np.isfinite(g_theta).all()


@given(rate_case(), theta_strategy, gate_logits)
def test_zinb_matches_the_hand_built_mixture_and_has_finite_gradients(case, theta, zi_logits):
    probs, library, x = case
    mu = float(library[0]) * probs.astype(np.float64)
    th, xs, zl = theta.astype(np.float64), x.astype(np.float64), zi_logits.astype(np.float64)
    nb_logpmf, bound = nb_reference(mu, th, xs)
    log_gate, log_not_gate = sps.log_expit(zl), sps.log_expit(-zl)  # log pi, log(1 - pi)
    want = np.where(xs == 0, np.logaddexp(log_gate, log_not_gate + nb_logpmf), log_not_gate + nb_logpmf)
    s = nb_scale(mu, th, xs) + magnitudes(log_gate, log_not_gate, zl)
    lp64, _ = jax_log_prob("zinb", probs, library, x, theta, zi_logits, dtype="float64")
    assert_close(lp64, want, 1e-9, 64 * EPS64 * s + bound, "zinb float64 vs hand-built mixture")
    lp32, grads = check_float32("zinb", probs, library, x, theta, zi_logits, scale=s)
    assert np.isfinite(lp32).all() and all(np.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- the count-preserving split

N_CELLS = 5


def cell_keys(seed: int, n: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(n, dtype=jnp.uint32))


def split_core(x, native_frequencies, noise_ratio, ambient, seed):
    """The model's share (:func:`scar_jax.denoise.native_share`) and its split at the stored counts, one NumPy
    stream per cell (:func:`scar_jax.denoise.binomial_split`, what ``method="split"`` draws)."""
    share = np.asarray(jax.jit(denoise.native_share)(native_frequencies, noise_ratio, ambient))  # as it runs
    counts = sp.csr_matrix(x)
    at = sp.csr_matrix((share[counts.nonzero()], counts.indices, counts.indptr), shape=counts.shape)
    draws = denoise.binomial_split(counts, at, np.arange(x.shape[0]), seed, 0)
    out = sp.csr_matrix((draws, counts.indices, counts.indptr), shape=counts.shape).toarray()
    return share, out


unit = hs.one_of(hs.sampled_from([0.0, 1.0]), hs.floats(0.0, 1.0, width=32))
raw_counts = arrays(np.int64, (N_CELLS, N_GENES), elements=hs.one_of(hs.just(0), count))


def assert_count_preserving(denoised: np.ndarray, x: np.ndarray) -> None:
    assert np.isfinite(denoised).all()
    np.testing.assert_array_equal(denoised, np.round(denoised))  # integer-valued
    assert (denoised >= 0).all() and (denoised <= x).all()
    assert (denoised[x == 0] == 0).all()


@given(
    raw_counts,
    arrays(np.float32, (N_CELLS, N_GENES), elements=unit),
    arrays(np.float32, (N_CELLS, 1), elements=unit),
    arrays(np.float32, (1, N_GENES), elements=unit),
    hs.integers(0, 2**31 - 1),
)
def test_split_core_keeps_counts_between_zero_and_raw(x, native_frequencies, noise_ratio, ambient, seed):
    """Any native frequencies, noise ratios and ambient profile (zeros, ones, unnormalised)."""
    xf = f32(x)
    share, denoised = split_core(xf, native_frequencies, noise_ratio, ambient, seed)
    assert ((share >= 0) & (share <= 1)).all()
    assert (share[(noise_ratio * ambient) == 0] == 1).all()  # a count the ambient cannot produce is native
    assert_count_preserving(denoised, xf)
    np.testing.assert_array_equal(denoised[share == 1], xf[share == 1])  # all native: every count kept
    assert (denoised[share == 0] == 0).all()  # all ambient: every count removed
    again = split_core(xf, native_frequencies, noise_ratio, ambient, seed)[1]
    np.testing.assert_array_equal(denoised, again)  # reproducible for the same keys


@functools.cache
def network() -> tuple[SCARConfig, dict]:
    config = SCARConfig(n_genes=N_GENES, n_hidden=8, n_latent=2, n_layers=1)  # softplus_sp: exact zeros
    return config, init_variables(config.make_net(), jax.random.key(0), N_GENES)


@FEWER  # one compilation (about 4 s) plus a few ms per example
@given(
    raw_counts,
    hs.floats(0.1, 30.0),
    hs.integers(0, 2**31 - 1),
    arrays(np.float64, (2, N_GENES), elements=hs.one_of(hs.just(0.0), hs.floats(1e-6, 1.0))),
)
def test_native_share_at_counts_split_keeps_counts_between_zero_and_raw(x, weight_scale, seed, ambient):
    """The jitted ``native_share_at_counts`` split by ``binomial_split`` (``method="split"``) and the split's
    mean ``denoised_counts_split_mean`` (3 draws) with random networks (weights scaled up to 30x, so noise
    ratios and native frequencies reach 0 and 1), random raw counts and two ambient profiles (one per batch,
    with zeros)."""
    config, variables = network()
    leaves, tree = jax.tree.flatten(variables["params"])
    noise = jax.random.split(jax.random.key(seed), len(leaves))
    params = [w * weight_scale + 0.1 * jax.random.normal(k, w.shape) for w, k in zip(leaves, noise, strict=True)]
    variables = {**variables, "params": jax.tree.unflatten(tree, params)}
    ambient[:, 0] += ambient.sum(axis=1) == 0  # each profile needs some mass
    ambient = f32(ambient / ambient.sum(axis=1, keepdims=True))
    xf = f32(x)
    batch = Batch(
        jnp.asarray(xf),
        jnp.asarray(xf.sum(axis=1, keepdims=True)),
        jnp.asarray(np.arange(N_CELLS) % 2, jnp.int32),
    )
    keys = cell_keys(seed, N_CELLS)

    def split():
        share = np.asarray(posterior.native_share_at_counts(config, variables, batch, ambient, 0, keys))
        counts = sp.csr_matrix(xf)
        at = sp.csr_matrix((share[counts.nonzero()], counts.indices, counts.indptr), shape=counts.shape)
        draws = denoise.binomial_split(counts, at, np.arange(N_CELLS), seed, 0)
        return sp.csr_matrix((draws, counts.indices, counts.indptr), shape=counts.shape).toarray()

    denoised = split()
    assert_count_preserving(denoised, xf)
    np.testing.assert_array_equal(denoised, split())  # reproducible for the same seed
    mean = np.asarray(posterior.denoised_counts_split_mean(config, variables, batch, ambient, 3, keys))
    assert np.isfinite(mean).all() and (mean >= 0).all() and (mean <= xf * (1 + 1e-6)).all()
    assert (mean[xf == 0] == 0).all()


# ---------------------------------------------------------------- calibration with ambient zeros

CAL_CELLS, CAL_GENES, CAL_ADDED = 10, 12, 4


@settings(max_examples=15, deadline=None)
@given(hs.integers(0, 2**31 - 1), hs.floats(0.1, 0.6), hs.booleans())
def test_calibration_with_ambient_zeros(seed, zero_fraction, sparse):
    """Random sparse profiles and counts: a count of a gene with ``a_g = 0`` is native (share exactly 1); adding
    such genes leaves every other share and each cell's ambient counts ``eps_i N_i`` unchanged, and the noise
    ratio itself unchanged where the added genes have no counts."""
    from scar_jax.calibration import calibrated_native_share

    rng = np.random.default_rng(seed)
    profile = rng.dirichlet(np.full(CAL_GENES, 0.5)) * (rng.random(CAL_GENES) > zero_fraction)
    profile[rng.integers(CAL_GENES)] += 0.1  # at least one gene the ambient can produce
    x = rng.poisson(rng.gamma(0.5, 4.0, (CAL_CELLS, CAL_GENES))).astype(np.float64)
    x[:, 0] += 1  # no empty cell
    neighbours = np.c_[np.arange(CAL_CELLS), rng.integers(0, CAL_CELLS, (CAL_CELLS, 2))]
    start = np.full(CAL_CELLS, 0.05)

    def run(counts, a):
        eps, w = calibrated_native_share(
            sp.csr_matrix(counts) if sparse else counts, neighbours, a, start, n_iter=20, share_at="observed"
        )
        return eps, (w.toarray() if sp.issparse(w) else w)

    eps, share = run(x, profile)
    assert (share[(x > 0) & (profile == 0)[None, :]] == 1.0).all()
    added = rng.poisson(3.0, (CAL_CELLS, CAL_ADDED)).astype(np.float64)
    wider = np.zeros(CAL_GENES + CAL_ADDED)
    wider[:CAL_GENES] = profile
    for extra in (np.zeros_like(added), added):
        eps2, share2 = run(np.c_[x, extra], wider)
        np.testing.assert_array_equal(share2[:, CAL_GENES:][extra > 0], 1.0)
        np.testing.assert_allclose(share2[:, :CAL_GENES][x > 0], share[x > 0], rtol=1e-6)
        library, library2 = x.sum(1), x.sum(1) + extra.sum(1)
        np.testing.assert_allclose(eps2 * library2, eps * library, rtol=1e-6)
    np.testing.assert_allclose(run(np.c_[x, np.zeros_like(added)], wider)[0], eps, rtol=1e-6)
