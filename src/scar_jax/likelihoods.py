"""Count likelihoods of SCAR as numpyro distributions; every likelihood formula lives here once.

The ambient mixture (both references)::

    p_ig = (1 - eps_i) * phi_ig + eps_i * a_{b(i), g}

* ``"b"``: ``Binomial(total_count=N_i, probs=p_ig)`` with the cell's exact observed library ``N_i``;
* ``"poisson"``: ``Poisson(rate=l_i * p_ig)``;
* ``"nb"``: negative binomial with mean ``l_i * p_ig`` and inverse dispersion ``theta_g``;
* ``"zinb"``: that NB zero-inflated with per-cell-per-gene gate logits.

``l_i`` is the observed library, or the size factor when ``size_factor_key`` was set up.

Two numerical choices follow PyTorch/scvi-tools rather than numpyro's defaults:

* binomial probabilities are clamped to ``[eps, 1 - eps]`` (float32 machine epsilon) before taking
  logits, as ``torch.distributions.Binomial(probs=...)`` does, so ``p = 0`` (a gene with no native
  and no ambient mass) gives finite values and gradients;
* the negative binomial uses scvi-tools' ``log_nb_positive`` with ``eps = 1e-8`` inside the logs.
  numpyro's ``NegativeBinomial2`` returns ``-inf`` and a NaN gradient at mean 0.

One is more accurate than both references: the binomial log-probability writes the binomial
coefficient as ``-log(N + 1) - betaln(N - x + 1, x + 1)`` (:class:`BinomialStable`). The usual
``lgamma(N + 1) - lgamma(x + 1) - lgamma(N - x + 1)`` cancels terms of size ``N log N`` (about 2e5 at
20,000 counts, float32 ulp 0.016) to a result of a few nats; summed over the expressed genes, PyTorch's
and numpyro's float32 log-likelihoods are off the float64 value by about 1e-4 relative (the
parity suite checks it), this form by < 1e-5. Its gradient is also cheaper: the coefficient does not depend on
the parameters, so no ``lgamma`` remains in the backward pass. To compare with scvi-tools number for
number, :func:`log_prob_torch_rounding` evaluates scvi-tools' float32 formulas operation for
operation (parity checks only; it reproduces the reference's rounding error, it does not remove it).

Parameter-free terms. Each log-probability splits as ``log p(x) = k(x; params) + c(x)``, with

* ``"b"``: ``c(x) = log C(N, x)`` (``N`` the binomial total, data too);
* ``"poisson"``: ``c(x) = -log x!``;
* ``"nb"``, ``"zinb"``: ``c(x) = 0``: their ``-log x!`` enters with the theta-dependent
  ``log Gamma(x + theta) - log Gamma(theta)`` as one term, ``-log x - betaln(x, theta)`` in float32, and
  taking ``-log x!`` out of it would add a ``lgamma`` instead of removing one.

``c`` carries no gradient and is 0 at ``x = 0``. The training step evaluates ``k`` alone
(:func:`log_prob_kernel`) and adds ``sum_g c(x_ig)`` per cell, computed once in float64 from the non-zeros
(:func:`cell_log_constants`), so the reported loss is the full one and the gradient unchanged.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import scipy.sparse as sp
from jax.scipy.special import betaln, gammaln
from scipy.special import gammaln as gammaln64

GeneLikelihood = Literal["b", "poisson", "nb", "zinb"]
GENE_LIKELIHOODS: tuple[str, ...] = ("b", "poisson", "nb", "zinb")

NB_EPS = 1e-8
PROBS_EPS = float(jnp.finfo(jnp.float32).eps)
RATE_FLOOR = 1e-30  # Poisson rate inside the log for a positive count (see PoissonZeroSafe)


def mixture_probs(native_frequencies: jax.Array, noise_ratio: jax.Array, ambient_profile: jax.Array) -> jax.Array:
    """``(1 - noise_ratio) * native_frequencies + noise_ratio * ambient_profile``.

    Parameters
    ----------
    native_frequencies
        ``(n_cells, n_genes)``, rows sum to at most 1.
    noise_ratio
        ``(n_cells, 1)`` in [0, 1].
    ambient_profile
        ``(1, n_genes)`` or, one profile per cell's batch, ``(n_cells, n_genes)``; rows sum to 1.
    """
    return (1.0 - noise_ratio) * native_frequencies + noise_ratio * ambient_profile


class NegativeBinomialEps(dist.NegativeBinomial2):
    """``NegativeBinomial2(mean, concentration)`` with scvi-tools' eps-stable ``log_prob``.

    .. math::
        \\log p(x) = \\theta (\\log(\\theta + e) - \\log(\\theta + \\mu + e))
            + x (\\log(\\mu + e) - \\log(\\theta + \\mu + e))
            + \\log\\Gamma(x + \\theta) - \\log\\Gamma(\\theta) - \\log\\Gamma(x + 1),\\quad e = 10^{-8}

    In float32 the log-gamma terms are evaluated as ``-log(x) - betaln(x, theta)`` (0 at ``x = 0``), which
    does not cancel large terms (see :class:`BinomialStable`); in float64 as written.
    """

    pytree_data_fields = ("nb_mean",)

    def __init__(self, mean: jax.Array, concentration: jax.Array, *, validate_args: bool | None = None):
        self.nb_mean = mean
        super().__init__(mean=mean, concentration=concentration, validate_args=validate_args)

    def log_prob(self, value: jax.Array) -> jax.Array:
        mu, theta = self.nb_mean, self.concentration
        log_theta_mu_eps = jnp.log(theta + mu + NB_EPS)
        if jnp.result_type(mu, theta) == jnp.float64:
            log_coefficient = gammaln(value + theta) - gammaln(theta) - gammaln(value + 1.0)
        else:  # Gamma(x + theta) / (Gamma(theta) x!) = 1 / (x B(x, theta)), without forming lgamma(x + theta)
            positive = jnp.maximum(value, 1.0)
            log_coefficient = jnp.where(value > 0, -jnp.log(positive) - betaln(positive, theta), 0.0)
        return (
            theta * (jnp.log(theta + NB_EPS) - log_theta_mu_eps)
            + value * (jnp.log(mu + NB_EPS) - log_theta_mu_eps)
            + log_coefficient
        )


def log_binomial_coefficient(n: jax.Array, k: jax.Array) -> jax.Array:
    """``log C(n, k)``: ``-log(n + 1) - betaln(n - k + 1, k + 1)`` in float32, the ``lgamma`` form in float64."""
    if jnp.result_type(n, k) == jnp.float64:
        return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)
    return -jnp.log1p(n) - betaln(n - k + 1.0, k + 1.0)


class BinomialStable(dist.BinomialProbs):
    """``Binomial(total_count, probs)`` with a cancellation-free log-probability.

    .. math::
        \\log p(x) = -\\log(N + 1) - \\log B(N - x + 1, x + 1) + x \\log p + (N - x) \\log(1 - p)

    using :math:`\\binom{N}{x} = 1 / ((N + 1) B(N - x + 1, x + 1))`; ``betaln`` (JAX's, from TensorFlow
    Probability) evaluates the log-gamma differences without forming ``lgamma(N + 1)``. ``probs`` must
    lie in ``(0, 1)`` (:func:`make_likelihood` clamps them); sampling is numpyro's. ``betaln``'s series
    is tuned for float32 (absolute error ~1e-8); in float64 the ``lgamma`` form is the more accurate one
    (1e-12 relative) and is used instead.
    """

    def log_prob(self, value: jax.Array) -> jax.Array:
        n = self.total_count.astype(self.probs.dtype)
        return log_binomial_coefficient(n, value) + self.log_prob_kernel(value)

    def log_prob_kernel(self, value: jax.Array) -> jax.Array:
        """``x log p + (N - x) log(1 - p)``: the log-probability less ``log C(N, x)`` (module docstring)."""
        n = self.total_count.astype(self.probs.dtype)
        return value * jnp.log(self.probs) + (n - value) * jnp.log1p(-self.probs)


def _lgamma_float32(x: np.ndarray) -> np.ndarray:
    """``lgamma`` of float32 arguments, computed in float64 and rounded once to float32."""
    return gammaln64(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


def _softplus_torch(x: np.ndarray) -> np.ndarray:
    """``torch.nn.functional.softplus`` (beta 1, threshold 20) in float32."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0)))).astype(np.float32)


# long: the docstring derives the float32 rounding it reproduces (about 30 lines); the body is about 40 lines
def log_prob_torch_rounding(
    gene_likelihood: GeneLikelihood,
    value: np.ndarray,
    probs: np.ndarray,
    library: np.ndarray,
    theta: np.ndarray | None = None,
    zi_logits: np.ndarray | None = None,
) -> np.ndarray:
    """scvi-tools' float32 log-probabilities, operation for operation, in NumPy (parity checks only).

    scvi-tools evaluates the binomial (``torch.distributions.Binomial``), the negative binomial and the
    zero-inflated NB (``log_nb_positive``, ``log_zinb_positive``) and the Poisson in float32 with
    log-gamma terms that cancel (``lgamma(N + 1) - lgamma(x + 1) - lgamma(N - x + 1)`` ~ ``N log N``),
    which leaves its per-cell log-likelihoods off their exact values by up to 1e-4 relative. This function
    repeats those evaluations (the same clamps, logits, ``eps = 1e-8``, softplus threshold and operation
    order), with log-gamma values correctly rounded to float32 (PyTorch's float32 ``lgamma``, glibc's
    ``lgammaf``, gives the same float32 number at all but 12 of the integers 0 .. 200,000, off by one ulp
    there; XLA's float32 ``lgamma`` is several ulps off at large arguments). It so reproduces the
    reference's rounding error, so that a model's parameters can be compared with scvi-tools' to float32
    resolution; for training and inference :func:`make_likelihood`'s distributions are the accurate ones.

    Parameters
    ----------
    gene_likelihood
        ``"b"``, ``"poisson"``, ``"nb"`` or ``"zinb"``.
    value
        ``(n_cells, n_genes)`` counts.
    probs
        ``(n_cells, n_genes)`` mixture probabilities (as for :func:`make_likelihood`).
    library
        ``(n_cells, 1)``: binomial total count, or the rate multiplier (``mean = library * probs``).
    theta, zi_logits
        NB inverse dispersion ``(1, n_genes)`` and zero-inflation logits ``(n_cells, n_genes)``.

    Returns
    -------
    ``(n_cells, n_genes)`` float32 log-probabilities.
    """
    f32 = np.float32
    x, p, lib = (np.asarray(a, f32) for a in (value, probs, library))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        match gene_likelihood:
            case "b":
                pc = np.clip(p, f32(PROBS_EPS), f32(1.0 - PROBS_EPS))
                logits = np.log(pc) - np.log1p(-pc)
                clamp_by_zero = (np.maximum(logits, f32(0)) + logits - np.minimum(logits, f32(0))) / f32(2)
                normalize = lib * clamp_by_zero + lib * np.log1p(np.exp(-np.abs(logits))) - _lgamma_float32(lib + 1)
                return x * logits - _lgamma_float32(x + 1) - _lgamma_float32(lib - x + 1) - normalize
            case "poisson":
                rate = lib * p
                return np.where(x == 0, f32(0), x * np.log(rate)) - rate - _lgamma_float32(x + 1)
            case "nb" | "zinb":
                mu, th, e = lib * p, np.asarray(theta, f32), f32(NB_EPS)
                log_theta_mu_eps = np.log(th + mu + e)
                coefficient_terms = (_lgamma_float32(x + th), _lgamma_float32(th), _lgamma_float32(x + 1))
                if gene_likelihood == "nb":
                    return (
                        th * (np.log(th + e) - log_theta_mu_eps)
                        + x * (np.log(mu + e) - log_theta_mu_eps)
                        + coefficient_terms[0]
                        - coefficient_terms[1]
                        - coefficient_terms[2]
                    )
                pi = np.asarray(zi_logits, f32)
                softplus_pi = _softplus_torch(-pi)
                pi_theta_log = -pi + th * (np.log(th + e) - log_theta_mu_eps)
                case_zero = _softplus_torch(pi_theta_log) - softplus_pi
                case_non_zero = (
                    -softplus_pi
                    + pi_theta_log
                    + x * (np.log(mu + e) - log_theta_mu_eps)
                    + coefficient_terms[0]
                    - coefficient_terms[1]
                    - coefficient_terms[2]
                )
                return (x < e).astype(f32) * case_zero + (x > e).astype(f32) * case_non_zero
    raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {gene_likelihood!r}")


class PoissonZeroSafe(dist.Poisson):
    """``Poisson(rate)`` whose ``log_prob`` has a finite gradient at rate 0 for a zero count.

    ``x log(rate) - rate - log x!`` with ``0 log 0 = 0`` and the gradient ``-1`` at rate 0 and count 0,
    where numpyro's (and PyTorch's) ``xlogy`` gives ``0 / 0 = NaN``. Rate 0 arises for a gene with no
    counts in any cell: its default ambient share is 0 and the sparse softplus can set its native
    frequency to exactly 0. For a positive count the rate inside the log is floored at ``RATE_FLOOR``
    (1e-30): a count at rate 0 (a gene the ambient profile says is absent and the decoder has switched off)
    costs ``x * 69`` nats instead of ``-inf``, so training does not turn NaN; above the floor (every rate
    a float32 model produces in practice) the value is exact.
    """

    def log_prob(self, value: jax.Array) -> jax.Array:
        return self.log_prob_kernel(value) - gammaln(value + 1.0)

    def log_prob_kernel(self, value: jax.Array) -> jax.Array:
        """``x log(rate) - rate``: the log-probability less ``-log x!`` (module docstring)."""
        rate = jnp.asarray(self.rate, jnp.result_type(float))
        # where(x > 0, rate, 1): the log term and its gradient vanish for x = 0 (also at rate 0)
        log_rate = jnp.log(jnp.where(value > 0, jnp.maximum(rate, RATE_FLOOR), 1.0))
        return value * log_rate - rate


def make_likelihood(
    gene_likelihood: GeneLikelihood,
    probs: jax.Array,
    library: jax.Array,
    theta: jax.Array | None = None,
    zi_logits: jax.Array | None = None,
) -> dist.Distribution:
    """The count distribution of ``x`` given per-gene probabilities.

    Parameters
    ----------
    gene_likelihood
        ``"b"``, ``"poisson"``, ``"nb"`` or ``"zinb"``.
    probs
        ``(n_cells, n_genes)`` expected fraction of the cell's counts per gene (the ambient mixture, or
        the native scale alone).
    library
        ``(n_cells, 1)``: binomial total count (the observed library, integral) or the rate multiplier.
    theta
        ``(1, n_genes)`` NB inverse dispersion (``"nb"``, ``"zinb"``).
    zi_logits
        ``(n_cells, n_genes)`` zero-inflation gate logits (``"zinb"``).
    """
    match gene_likelihood:
        case "b":
            p = jnp.clip(probs, PROBS_EPS, 1.0 - PROBS_EPS)
            # integer total count (exact below 2**24 counts), so that the law can also be sampled
            total_count = jnp.round(library).astype(jnp.int32)
            return BinomialStable(probs=p, total_count=total_count)
        case "poisson":
            return PoissonZeroSafe(rate=library * probs)
        case "nb":
            return NegativeBinomialEps(mean=library * probs, concentration=theta)
        case "zinb":
            base = NegativeBinomialEps(mean=library * probs, concentration=theta)
            return dist.ZeroInflatedLogits(base_dist=base, gate_logits=zi_logits)
    raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {gene_likelihood!r}")


def has_log_constant(gene_likelihood: GeneLikelihood) -> bool:
    """Whether the law's log-probability has a parameter-free part ``c(x) != 0`` (module docstring)."""
    return gene_likelihood in ("b", "poisson")


def log_prob_kernel(law: dist.Distribution, value: jax.Array) -> jax.Array:
    """``law.log_prob(value) - c(value)``, without evaluating ``c`` (module docstring); ``c = 0`` for NB and ZINB.

    Parameters
    ----------
    law
        A distribution made by :func:`make_likelihood`.
    value
        Counts, shaped as the law's batch shape.
    """
    if isinstance(law, BinomialStable | PoissonZeroSafe):
        return law.log_prob_kernel(value)
    return law.log_prob(value)


def cell_log_constants(
    gene_likelihood: GeneLikelihood,
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    library: np.ndarray | None = None,
    chunk_entries: int = 1 << 20,
) -> np.ndarray:
    """``sum_g c(x_ig)`` for every cell, in float64 from the non-zeros (``c(0) = 0``; module docstring).

    ``c(x) = lgamma(N + 1) - lgamma(x + 1) - lgamma(N - x + 1)`` for ``"b"`` (``N`` the cell's library
    rounded to an integer, as :func:`make_likelihood` does), ``-lgamma(x + 1)`` for ``"poisson"``, 0 for
    ``"nb"`` and ``"zinb"``. Computed in blocks of rows of at most ``chunk_entries`` entries (dense size), so the
    temporaries (a few float64 arrays of the block's non-zeros) stay below about ``40 * chunk_entries`` bytes.

    Parameters
    ----------
    gene_likelihood
        ``"b"``, ``"poisson"``, ``"nb"`` or ``"zinb"``.
    counts
        ``(n_cells, n_genes)`` counts, dense or sparse (duplicate sparse entries are summed).
    library
        ``(n_cells, 1)`` or ``(n_cells,)``: the binomial total count (``"b"`` only).

    Returns
    -------
    ``(n_cells,)`` float64.
    """
    if gene_likelihood not in GENE_LIKELIHOODS:
        raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {gene_likelihood!r}")
    n_cells, n_genes = counts.shape
    out = np.zeros(n_cells, np.float64)
    if not has_log_constant(gene_likelihood):
        return out
    if gene_likelihood == "b":
        if library is None:
            raise ValueError("the binomial's constant log C(N, x) needs the library N")
        total = np.round(np.asarray(library, np.float64).reshape(n_cells))
    step = max(1, chunk_entries // max(n_genes, 1))
    for start in range(0, n_cells, step):
        block = sp.csr_matrix(counts[start : start + step])
        block.sum_duplicates()
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        x = block.data.astype(np.float64)
        terms = -gammaln64(x + 1.0)
        if gene_likelihood == "b":
            n = total[start : start + step][rows]
            terms += gammaln64(n + 1.0) - gammaln64(n - x + 1.0)
        out[start : start + block.shape[0]] = np.bincount(rows, weights=terms, minlength=block.shape[0])
    return out
