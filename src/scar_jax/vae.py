"""The SCAR model math as pure functions of ``(variables, batch, ambient_profile, key)``.

Find any model formula here (the likelihood formulas are in :mod:`scar_jax.likelihoods`)::

    z ~ q(z | x) = Normal(mean, sqrt(var))              (encoder on log1p(x))
    phi, eps, zi = decoder(z or softmax(z))
    p = (1 - eps) * phi + eps * a_{batch}               (ambient mixture)
    reconstruction_loss_i = -sum_g log p(x_ig | p_ig, l_i, theta_g, zi_ig)
                          = -sum_g k(x_ig; params) - sum_g c(x_ig)   (c: parameter-free, precomputable)
    kl_local_i = KL(q(z_i | x_i) || Normal(0, I))        (on the normal, before any softmax)
    loss = mean_i [reconstruction_loss_i + kl_weight * kl_local_i]

Everything here is a function of arrays and pytrees, so ``jax.jit``, ``jax.grad`` (also with respect to
the ambient profile) and ``jax.vmap`` apply directly. Static configuration is a frozen
:class:`SCARConfig`, closed over when functions are built, never traced.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from .likelihoods import GENE_LIKELIHOODS, GeneLikelihood, log_prob_kernel, make_likelihood, mixture_probs
from .nets import MATMUL_PRECISIONS, LatentDistribution, MatmulPrecision, ScaleActivation, SCARNet


@dataclasses.dataclass(frozen=True)
class SCARConfig:
    """Hyper-parameters of a SCAR model (the ``SCAR`` constructor arguments, JSON-serialisable)."""

    n_genes: int
    n_hidden: int = 150
    n_latent: int = 15
    n_layers: int = 2
    dropout_rate: float = 0.0
    gene_likelihood: GeneLikelihood = "b"
    latent_distribution: LatentDistribution = "normal"
    scale_activation: ScaleActivation = "softplus_sp"
    sparsity: float = 0.9
    matmul_precision: MatmulPrecision = "float32"  # beyond scvi-tools: see scar_jax.nets

    def __post_init__(self) -> None:
        for name in ("n_genes", "n_hidden", "n_latent", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy integers become plain ints (JSON, hashing)
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if self.gene_likelihood not in GENE_LIKELIHOODS:
            raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {self.gene_likelihood!r}")
        if self.latent_distribution not in ("normal", "ln"):
            raise ValueError(f"latent_distribution must be 'normal' or 'ln', got {self.latent_distribution!r}")
        if self.scale_activation not in ("softplus_sp", "softplus", "softmax"):
            raise ValueError(
                f"scale_activation must be 'softplus_sp', 'softplus' or 'softmax', got {self.scale_activation!r}"
            )
        if not 0.0 <= float(self.sparsity) <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"matmul_precision must be one of {MATMUL_PRECISIONS} (float32 is exact; the others are faster on "
                f"GPUs), got {self.matmul_precision!r}"
            )

    def make_net(self) -> SCARNet:
        fields = dataclasses.asdict(self)
        gene_likelihood = fields.pop("gene_likelihood")
        return SCARNet(**fields, compute_zi_logits=gene_likelihood == "zinb")


class Batch(NamedTuple):
    """One minibatch of cells.

    x: ``(n, G)`` float32 counts; library: ``(n, 1)`` observed library (or size factor for rate models);
    batch_index: ``(n,)`` int32 index into the rows of the ambient profile matrix; log_constant: ``(n,)``
    each cell's ``sum_g c(x_ig)``, the parameter-free part of its log-likelihood
    (:func:`scar_jax.likelihoods.cell_log_constants`), or ``None``: :func:`loss_terms` then evaluates ``c``
    itself.
    """

    x: jax.Array
    library: jax.Array
    batch_index: jax.Array
    log_constant: jax.Array | None = None


class Outputs(NamedTuple):
    """Per-cell outputs of one forward pass (shapes for ``n`` cells and ``G`` genes)."""

    z_mean: jax.Array  # (n, n_latent)
    z_var: jax.Array  # (n, n_latent)
    z: jax.Array  # (n, n_latent), before the logistic-normal softmax
    native_frequencies: jax.Array  # (n, G)
    noise_ratio: jax.Array  # (n, 1)
    zi_logits: jax.Array  # (n, G)
    theta: jax.Array  # (1, G)


class LossTerms(NamedTuple):
    loss: jax.Array  # scalar: mean_i [reconstruction_loss_i + kl_weight * kl_local_i]
    reconstruction_loss: jax.Array  # (n,) negative log-likelihood summed over genes
    kl_local: jax.Array  # (n,)


def cell_ambient_profile(ambient_profile: jax.Array, batch_index: jax.Array) -> jax.Array:
    """Each cell's ambient profile: ``(1, G)`` when there is one profile, else ``(n, G)``."""
    if ambient_profile.shape[0] == 1:
        return ambient_profile
    return ambient_profile[batch_index]


def standard_normal_noise(key: jax.Array, n_cells: int, n_latent: int) -> jax.Array:
    """``(n_cells, n_latent)`` standard normal draws.

    ``key`` is one typed key, or an ``(n_cells,)`` array of per-cell keys: then each cell's draw
    depends only on its own key, so results do not depend on how cells are chunked.
    """
    if key.ndim == 0:
        return jax.random.normal(key, (n_cells, n_latent))
    return jax.vmap(lambda k: jax.random.normal(k, (n_latent,)))(key)


def forward(
    net: SCARNet,
    variables: dict[str, Any],
    x: jax.Array,
    key: jax.Array,
    train: bool = False,
) -> tuple[Outputs, dict[str, Any]]:
    """Encode ``x`` ``(n, G)``, draw one reparameterised z, decode.

    ``key`` is one typed key or ``(n,)`` per-cell keys (see :func:`standard_normal_noise`). In training
    mode batch statistics are used (and their running averages returned updated) and dropout is
    active; in evaluation mode the running statistics are used. Returns the outputs and the (possibly
    updated) ``batch_stats`` collection.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError("key must be a typed key from jax.random.key(seed) (not the legacy jax.random.PRNGKey)")
    if key.ndim == 0:
        key, dropout_key = jax.random.split(key)
    else:
        dropout_key = jax.random.fold_in(key[0], 1)
    z_noise = standard_normal_noise(key, x.shape[0], net.n_latent)
    if train:
        out, updates = net.apply(
            variables, x, z_noise, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"]
        )
        return Outputs(*out), updates["batch_stats"]
    out = net.apply(variables, x, z_noise, train=False)
    return Outputs(*out), variables.get("batch_stats", {})


def likelihood(config: SCARConfig, out: Outputs, batch: Batch, ambient_profile: jax.Array) -> dist.Distribution:
    """p(x | z) with the ambient mixture, for the outputs of :func:`forward`."""
    probs = mixture_probs(
        out.native_frequencies, out.noise_ratio, cell_ambient_profile(ambient_profile, batch.batch_index)
    )
    return make_likelihood(config.gene_likelihood, probs, batch.library, out.theta, out.zi_logits)


def kl_local(out: Outputs) -> jax.Array:
    """``KL(Normal(mean, sqrt(var)) || Normal(0, 1))`` summed over latent dimensions, ``(n,)``."""
    q = dist.Normal(loc=out.z_mean, scale=jnp.sqrt(out.z_var))
    return dist.kl_divergence(q, dist.Normal(loc=0.0, scale=1.0)).sum(-1)


def loss_terms(
    net: SCARNet,
    config: SCARConfig,
    variables: dict[str, Any],
    batch: Batch,
    ambient_profile: jax.Array,
    key: jax.Array,
    kl_weight: jax.Array | float,
    train: bool = False,
) -> tuple[LossTerms, dict[str, Any]]:
    """The SCAR loss of one minibatch and its per-cell terms.

    Parameters
    ----------
    ambient_profile
        ``(n_batches, G)``: one ambient profile per batch (rows sum to 1).
    kl_weight
        Weight of the KL term in ``loss`` (the warm-up weight in training; 1 for the ELBO).

    With ``batch.log_constant`` given, the log-likelihood is ``sum_g k(x_ig) + log_constant_i``
    (:func:`scar_jax.likelihoods.log_prob_kernel`): the same value and gradient as the full
    ``sum_g log p(x_ig)``, without evaluating the parameter-free ``c(x_ig)`` per entry.
    """
    out, batch_stats = forward(net, variables, batch.x, key, train)
    law = likelihood(config, out, batch, ambient_profile)
    if batch.log_constant is None:
        log_px = law.log_prob(batch.x).sum(-1)
    else:
        log_px = log_prob_kernel(law, batch.x).sum(-1) + batch.log_constant
    reconstruction_loss = -log_px
    kl = kl_local(out)
    loss = jnp.mean(reconstruction_loss + kl_weight * kl)
    return LossTerms(loss, reconstruction_loss, kl), batch_stats


def init_variables(net: SCARNet, key: jax.Array, n_genes: int) -> dict[str, Any]:
    """Initial ``{"params", "batch_stats"}`` (torch-like initialisation, see :mod:`scar_jax.nets`)."""
    x = jnp.zeros((2, n_genes), jnp.float32)
    return dict(net.init({"params": key}, x, jnp.zeros((2, net.n_latent)), train=False))
