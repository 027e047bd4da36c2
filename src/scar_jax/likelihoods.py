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
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import gammaln

GeneLikelihood = Literal["b", "poisson", "nb", "zinb"]
GENE_LIKELIHOODS: tuple[str, ...] = ("b", "poisson", "nb", "zinb")

NB_EPS = 1e-8
PROBS_EPS = float(jnp.finfo(jnp.float32).eps)


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
    """

    pytree_data_fields = ("nb_mean",)

    def __init__(self, mean: jax.Array, concentration: jax.Array, *, validate_args: bool | None = None):
        self.nb_mean = mean
        super().__init__(mean=mean, concentration=concentration, validate_args=validate_args)

    def log_prob(self, value: jax.Array) -> jax.Array:
        mu, theta = self.nb_mean, self.concentration
        log_theta_mu_eps = jnp.log(theta + mu + NB_EPS)
        return (
            theta * (jnp.log(theta + NB_EPS) - log_theta_mu_eps)
            + value * (jnp.log(mu + NB_EPS) - log_theta_mu_eps)
            + gammaln(value + theta)
            - gammaln(theta)
            - gammaln(value + 1.0)
        )


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
            return dist.BinomialLogits(logits=jnp.log(p) - jnp.log1p(-p), total_count=total_count)
        case "poisson":
            return dist.Poisson(rate=library * probs)
        case "nb":
            return NegativeBinomialEps(mean=library * probs, concentration=theta)
        case "zinb":
            base = NegativeBinomialEps(mean=library * probs, concentration=theta)
            return dist.ZeroInflatedLogits(base_dist=base, gate_logits=zi_logits)
    raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {gene_likelihood!r}")
