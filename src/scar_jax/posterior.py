"""Inference in evaluation mode: jit-compiled evaluators and a memory-bounded chunk driver.

Every evaluator is a pure function of ``(config, variables, batch, ...)`` compiled once per model
configuration (``config`` is a static, hashable argument). :func:`map_chunks` feeds it fixed-size
chunks of cells (the last one padded, so nothing recompiles), densifying sparse rows on the host one
chunk at a time. Random draws use one key per cell, ``fold_in(key, cell_index)``, so results do not
depend on ``batch_size``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .denoise import binomial_split, native_share  # noqa: F401 (binomial_split: re-exported)
from .likelihoods import PROBS_EPS, RATE_FLOOR, log_binomial_coefficient, make_likelihood, mixture_probs
from .nets import SCARNet
from .vae import (
    Batch,
    Outputs,
    SCARConfig,
    cell_ambient_profile,
    forward,
    kl_local,
    likelihood,
    standard_normal_noise,
)

Variables = dict[str, Any]  # the Flax variables of a SCAR network
Array = jax.Array


class HostCells(NamedTuple):
    """Cells on the host: counts ``(n, G)`` (dense or CSR), library ``(n, 1)``, batch index ``(n,)``."""

    x: np.ndarray | sp.csr_matrix  # or a scar_jax.backed.BackedCounts (CSR on disk, read by rows)
    library: np.ndarray
    batch_index: np.ndarray
    max_count: float = float("inf")  # the largest count, when known (it picks the device dtype of streamed data)
    gene_totals: np.ndarray | None = None  # (n_genes,) counts per gene, when known (the default ambient profile)


def fold_in_each(cell_keys: Array, data: int | jax.Array) -> jax.Array:
    """``fold_in(key, data)`` for each of the ``(n,)`` per-cell keys (one stream per draw or purpose)."""
    return jax.vmap(jax.random.fold_in, (0, None))(cell_keys, data)


@functools.cache
def _net(config: SCARConfig) -> SCARNet:
    return config.make_net()


@functools.partial(jax.jit, static_argnums=0)
def encode(config: SCARConfig, variables: Variables, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of q(z | x), each ``(n, n_latent)``."""
    return _net(config).apply(variables, x, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def decode_at_mean(config: SCARConfig, variables: Variables, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Native frequencies ``(n, G)`` and noise ratio ``(n, 1)`` decoded from the posterior mean of z."""
    net = _net(config)
    z_mean, _ = net.apply(variables, x, method="encode")
    native_frequencies, noise_ratio, _ = net.apply(variables, z_mean, method="decode")
    return native_frequencies, noise_ratio


@functools.partial(jax.jit, static_argnums=(0, 4))
def logistic_normal_mean(
    config: SCARConfig, variables: Variables, x: jax.Array, cell_keys: Array, mc_samples: int
) -> jax.Array:
    """Monte Carlo mean of softmax(z), z ~ q(z | x), over ``mc_samples`` draws, ``(n, n_latent)``."""
    z_mean, z_var = encode(config, variables, x)

    def add_sample(i, total):
        keys = fold_in_each(cell_keys, i)
        z = z_mean + jnp.sqrt(z_var) * standard_normal_noise(keys, x.shape[0], config.n_latent)
        return total + jax.nn.softmax(z, axis=-1)

    return jax.lax.fori_loop(0, mc_samples, add_sample, jnp.zeros_like(z_mean)) / mc_samples


@functools.partial(jax.jit, static_argnums=0)
def elbo_terms(
    config: SCARConfig, variables: Variables, batch: Batch, ambient_profile: Array, cell_keys: Array
) -> tuple[jax.Array, jax.Array]:
    """Per-cell reconstruction NLL (full ambient mixture) and KL with one z draw, each ``(n,)``."""
    out, _ = forward(_net(config), variables, batch.x, cell_keys, train=False)
    reconstruction_loss = -likelihood(config, out, batch, ambient_profile).log_prob(batch.x).sum(-1)
    return reconstruction_loss, kl_local(out)


@functools.partial(jax.jit, static_argnums=(0, 3))
def denoised_counts_expected(
    config: SCARConfig, variables: Variables, batch: Batch, n_samples: int, cell_keys: Array
) -> jax.Array:
    """scvi-tools' denoised counts: ``N_i (1 - eps_i) phi_ig`` stochastically rounded, median over draws.

    Each draw samples z, takes the expected native counts ``E = library * native scale`` and rounds
    ``floor(E) + Bernoulli(E - floor(E))``. The result can exceed the observed count.
    """

    def one_draw(s):
        keys = fold_in_each(cell_keys, s)
        out, _ = forward(_net(config), variables, batch.x, keys, train=False)
        expected = batch.library * (1.0 - out.noise_ratio) * out.native_frequencies
        floor = jnp.floor(expected)
        round_keys = fold_in_each(keys, 1)
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (expected.shape[1],)))(round_keys)
        return floor + (uniform < expected - floor)

    draws = jax.lax.map(one_draw, jnp.arange(n_samples))  # (n_samples, n, G)
    return draws[0] if n_samples == 1 else jnp.median(draws, axis=0)


@functools.partial(jax.jit, static_argnums=(0, 4))
def denoised_counts_split_mean(
    config: SCARConfig, variables: Variables, batch: Batch, ambient_profile: Array, n_samples: int, cell_keys: Array
) -> jax.Array:
    """Mean of the count-preserving split: each observed count times its posterior native share.

    .. code-block:: text

        w_ig = (1 - eps_i) phi_ig / ((1 - eps_i) phi_ig + eps_i a_{b(i) g})
        denoised_ig = x_ig w_ig

    with ``phi`` and ``eps`` decoded from one draw of z per sample (a draw of the posterior), averaged over
    ``n_samples`` draws; ``0 <= result <= x`` and zeros stay zero. The split itself (binomial draws) is
    :func:`native_share_at_counts` with :func:`scar_jax.denoise.binomial_split`.
    """
    ambient = cell_ambient_profile(ambient_profile, batch.batch_index)

    def one_draw(s):
        keys = fold_in_each(cell_keys, s)
        out, _ = forward(_net(config), variables, batch.x, keys, train=False)
        return batch.x * native_share(out.native_frequencies, out.noise_ratio, ambient)

    return jax.lax.map(one_draw, jnp.arange(n_samples)).mean(axis=0)  # (n_samples, n, G) -> (n, G)


def denoised_counts_posterior_split(
    config: SCARConfig,
    variables: Variables,
    batch: Batch,
    ambient_profile: Array,
    n_samples: int,
    sample: bool,
    cell_keys: Array,
) -> jax.Array:
    """:func:`denoised_counts_split_mean` under its former name (``sample`` must be False: the binomial draws
    are :func:`scar_jax.denoise.binomial_split`). Kept for the callers of the old name."""
    if sample:
        raise ValueError("sample=True is gone: draw with native_share_at_counts and denoise.binomial_split")
    return denoised_counts_split_mean(config, variables, batch, ambient_profile, n_samples, cell_keys)


def _dense_rows(x: np.ndarray | sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    block = x[rows]
    return (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(np.float32, copy=False)


@jax.jit
def _cell_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """One key per cell, ``fold_in(key, row)``: a cell's draws do not depend on its chunk."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, rows)


def map_chunks(
    fn: Callable[[Batch, jax.Array], Any],
    cells: HostCells,
    rows: np.ndarray,
    batch_size: int,
    key: jax.Array,
    sparse_output: bool = False,
) -> list[np.ndarray | sp.csr_matrix]:
    """Apply ``fn(batch, cell_keys)`` to ``rows`` in chunks of ``batch_size``; concatenate on the host.

    ``fn`` returns an array or a tuple of arrays with cells on the first axis. The last chunk is padded
    (with its first row) to ``batch_size`` so that ``fn`` compiles once; padding is dropped. One chunk
    is computed while the previous one is copied to the host, so device memory holds at most two
    chunks of results, and the next chunk is read and densified on the host in a background thread
    (:func:`scar_jax.backed.prefetch`; ``cells.x`` may be a matrix on disk). With ``sparse_output``
    each chunk is stored as CSR (bounded host memory for
    sparse results such as count-preserving denoised counts).
    """
    rows = np.asarray(rows, dtype=np.int64)
    batch_size = max(1, min(int(batch_size), len(rows)))
    done: list[tuple[Any, ...]] = []
    in_flight = None

    def to_host(out: tuple[Any, ...], n_valid: int) -> tuple[Any, ...]:
        arrays = [np.asarray(o)[:n_valid] for o in out]
        return tuple(sp.csr_matrix(a) if sparse_output else a for a in arrays)

    def host_chunks():  # read and densify on the host, one chunk ahead (prefetch thread)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            n_valid = len(chunk)
            if n_valid < batch_size:
                chunk = np.concatenate([chunk, np.full(batch_size - n_valid, chunk[0])])
            yield chunk, n_valid, _dense_rows(cells.x, chunk)

    from .backed import prefetch

    for chunk, n_valid, dense in prefetch(host_chunks()):
        batch = Batch(
            jnp.asarray(dense),
            jnp.asarray(cells.library[chunk], jnp.float32),
            jnp.asarray(cells.batch_index[chunk], jnp.int32),
        )
        cell_keys = _cell_keys(key, jnp.asarray(chunk, jnp.uint32))
        out = fn(batch, cell_keys)  # dispatched asynchronously
        if in_flight is not None:
            done.append(to_host(*in_flight))  # copied while the chunk above computes
        in_flight = (out if isinstance(out, tuple) else (out,), n_valid)
    if in_flight is not None:
        done.append(to_host(*in_flight))
    n_outputs = len(done[0]) if done else 0
    if sparse_output:
        return [sp.vstack([d[i] for d in done], format="csr") for i in range(n_outputs)]
    return [np.concatenate([d[i] for d in done]) for i in range(n_outputs)]


@functools.partial(jax.jit, static_argnums=(0, 4))
def log_marginal_likelihood(
    config: SCARConfig, variables: Variables, batch: Batch, ambient_profile: Array, n_mc_samples: int, cell_keys: Array
) -> jax.Array:
    """Importance-sampling estimate of ``log p(x)`` per cell, ``(n,)``, with q(z | x) as proposal.

    .. code-block:: text

        log p(x) ~= logsumexp_s [log p(x | z_s) + log N(z_s; 0, I) - log q(z_s | x)] - log S

    ``log p(x | z)`` is the full likelihood (native + ambient mixture). Samples are evaluated one at a
    time (``lax.map``), so memory holds ``(n, G)`` arrays and an ``(S, n)`` matrix of log weights only.
    """
    net = _net(config)
    z_mean, z_var = net.apply(variables, batch.x, method="encode")
    z_sd = jnp.sqrt(z_var)

    def log_weight(s):
        keys = fold_in_each(cell_keys, s)
        z = z_mean + z_sd * standard_normal_noise(keys, batch.x.shape[0], config.n_latent)
        native_frequencies, noise_ratio, zi_logits = net.apply(variables, z, method="decode")
        theta = net.apply(variables, method="dispersion")
        out = Outputs(z_mean, z_var, z, native_frequencies, noise_ratio, zi_logits, theta)
        log_px = likelihood(config, out, batch, ambient_profile).log_prob(batch.x).sum(-1)
        log_pz = jax.scipy.stats.norm.logpdf(z).sum(-1)
        log_qz = jax.scipy.stats.norm.logpdf(z, z_mean, z_sd).sum(-1)
        return log_px + log_pz - log_qz

    log_w = jax.lax.map(log_weight, jnp.arange(n_mc_samples))  # (S, n)
    return jax.scipy.special.logsumexp(log_w, axis=0) - jnp.log(n_mc_samples)


def _native_expression_draw(
    config: SCARConfig, variables: Variables, batch: Batch, latent_library: bool, cell_keys: Array, draw: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Draw ``draw`` of z and its native expression: ``phi`` or, with ``latent_library``, ``N (1 - eps) phi``."""
    out, _ = forward(_net(config), variables, batch.x, fold_in_each(cell_keys, draw), train=False)
    expression = out.native_frequencies
    if latent_library:
        expression = batch.library * (1.0 - out.noise_ratio) * expression
    return expression, out.z


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def native_expression_samples(
    config: SCARConfig,
    variables: Variables,
    batch: Batch,
    n_samples: int,
    latent_library: bool,
    return_mean: bool,
    cell_keys: Array,
) -> jax.Array:
    """Normalized native expression from ``n_samples`` draws of z: ``(n, G)`` mean or ``(S, n, G)``.

    ``phi`` (the native frequencies, rows sum to 1) or, with ``latent_library``, the expected native
    counts ``N (1 - eps) phi``.
    """

    def one_draw(s):
        return _native_expression_draw(config, variables, batch, latent_library, cell_keys, s)[0]

    if return_mean:
        total = jax.lax.fori_loop(0, n_samples, lambda s, acc: acc + one_draw(s), jnp.zeros_like(batch.x))
        return total / n_samples
    return jax.lax.map(one_draw, jnp.arange(n_samples))


@functools.partial(jax.jit, static_argnums=(0, 4))
def posterior_predictive(
    config: SCARConfig, variables: Variables, batch: Batch, ambient_profile: Array, n_samples: int, cell_keys: Array
) -> jax.Array:
    """``(S, n, G)`` draws of x from p(x | z) (the full ambient mixture likelihood), z ~ q(z | x) each."""

    def one_draw(s):
        keys = fold_in_each(cell_keys, s)
        out, _ = forward(_net(config), variables, batch.x, keys, train=False)
        sample_keys = fold_in_each(keys, 3)

        def one_cell(key, row_out, row_batch):  # per-cell keys: draws do not depend on the chunking
            row_out = jax.tree.map(lambda a: a[None], row_out)
            law = likelihood(config, row_out, jax.tree.map(lambda a: a[None], row_batch), ambient_profile)
            return law.sample(key)[0]

        return jax.vmap(one_cell)(
            sample_keys, out._replace(theta=jnp.broadcast_to(out.theta, out.zi_logits.shape)), batch
        ).astype(jnp.float32)

    return jax.lax.map(one_draw, jnp.arange(n_samples))


@functools.partial(jax.jit, static_argnums=(0, 4))
def likelihood_parameters(
    config: SCARConfig, variables: Variables, batch: Batch, ambient_profile: Array, give_mean: bool, cell_keys: Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean ``l * p`` of p(x | z) ``(n, G)``, dispersion ``theta`` ``(n, G)`` and zero-inflation probability.

    One draw of z (``give_mean=False``) or the posterior mean of z (``give_mean=True``).
    """
    net = _net(config)
    z_mean, z_var = net.apply(variables, batch.x, method="encode")
    z = z_mean if give_mean else z_mean + jnp.sqrt(z_var) * standard_normal_noise(cell_keys, *z_mean.shape)
    native_frequencies, noise_ratio, zi_logits = net.apply(variables, z, method="decode")
    probs = mixture_probs(native_frequencies, noise_ratio, cell_ambient_profile(ambient_profile, batch.batch_index))
    theta = jnp.broadcast_to(net.apply(variables, method="dispersion"), probs.shape)
    return batch.library * probs, theta, jax.nn.sigmoid(zi_logits)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def native_expression_and_latent(
    config: SCARConfig, variables: Variables, batch: Batch, n_samples: int, latent_library: bool, cell_keys: Array
) -> tuple[jax.Array, jax.Array]:
    """The draws of :func:`native_expression_samples` ``(S, n, G)`` with their latent draws z ``(S, n, L)``.

    Same keys, hence the same draws; the z are what importance weights are computed for.
    """

    def one_draw(s):
        return _native_expression_draw(config, variables, batch, latent_library, cell_keys, s)

    return jax.lax.map(one_draw, jnp.arange(n_samples))


@functools.partial(jax.jit, static_argnums=0)
def anchor_log_constant(config: SCARConfig, anchors: Batch) -> jax.Array:
    """The parameter-free part of ``log p(x_a | z)`` for each anchor cell, ``(A,)``.

    Binomial: ``sum_g log C(N_a, x_ag)``; Poisson: ``-sum_g log x_ag!``; NB/ZINB: 0 (not separable).
    """
    if config.gene_likelihood == "b":
        total_count = jnp.round(anchors.library)
        return log_binomial_coefficient(total_count, anchors.x).sum(-1)
    if config.gene_likelihood == "poisson":
        return -jax.scipy.special.gammaln(anchors.x + 1.0).sum(-1)
    return jnp.zeros(anchors.x.shape[0])


@functools.partial(jax.jit, static_argnums=0)
def anchor_log_likelihood(
    config: SCARConfig,
    variables: Variables,
    z: jax.Array,
    anchors: Batch,
    ambient_profile: Array,
    log_constant: jax.Array,
) -> jax.Array:
    """``log p(x_a | z_k)`` of every anchor cell ``a`` under every latent draw ``z_k``, ``(K, A)``.

    The full likelihood of the model (the ambient mixture with the anchor's own library and its batch's
    ambient profile) at the native frequencies and noise ratio decoded from ``z_k`` ``(K, L)``. For the
    binomial and Poisson likelihoods the sum over genes is a matrix product::

        binomial:  log C(N_a, x_a) + x_a . (log p_k - log(1 - p_k)) + N_a sum_g log(1 - p_kg)
        Poisson:   -sum_g log x_ag! + x_a . log p_k + N_x_a log l_a - l_a sum_g p_kg

    (``p`` clamped as :func:`~scar_jax.likelihoods.make_likelihood` does for the binomial, and at
    ``RATE_FLOOR`` inside the Poisson log, as ``PoissonZeroSafe`` does for the rate);
    ``log_constant`` is :func:`anchor_log_constant`. NB and ZINB are evaluated gene by gene, one draw at
    a time.
    """
    net = _net(config)
    native_frequencies, noise_ratio, zi_logits = net.apply(variables, z, method="decode")
    x, library = anchors.x, anchors.library
    if config.gene_likelihood in ("b", "poisson"):
        total = jnp.zeros((z.shape[0], x.shape[0]), jnp.float32)
        for b in range(ambient_profile.shape[0]):  # one mixture per ambient profile (batch)
            p = mixture_probs(native_frequencies, noise_ratio, ambient_profile[b][None])  # (K, G)
            if config.gene_likelihood == "b":
                p = jnp.clip(p, PROBS_EPS, 1.0 - PROBS_EPS)
                log_not = jnp.log1p(-p)
                term = (jnp.log(p) - log_not) @ x.T + log_not.sum(-1, keepdims=True) * jnp.round(library).T
            else:
                term = (
                    jnp.log(jnp.maximum(p, RATE_FLOOR)) @ x.T
                    + (x.sum(-1, keepdims=True) * jnp.log(library)).T
                    - p.sum(-1, keepdims=True) * library.T
                )
            total = term if ambient_profile.shape[0] == 1 else jnp.where(anchors.batch_index[None] == b, term, total)
        return total + log_constant[None]
    theta = net.apply(variables, method="dispersion")
    ambient = cell_ambient_profile(ambient_profile, anchors.batch_index)

    def one_draw(k):
        probs = mixture_probs(native_frequencies[k][None], noise_ratio[k][None], ambient)  # (A, G)
        zi = jnp.broadcast_to(zi_logits[k][None], x.shape)
        return make_likelihood(config.gene_likelihood, probs, library, theta, zi).log_prob(x).sum(-1)

    return jax.lax.map(one_draw, jnp.arange(z.shape[0]))


@functools.partial(jax.jit, static_argnums=0)
def native_share_at_counts(
    config: SCARConfig, variables: Variables, batch: Batch, ambient_profile: Array, draw: jax.Array, cell_keys: Array
) -> jax.Array:
    """Native share ``w`` ``(n, G)`` of draw ``draw`` of z, kept only where a count was observed.

    The same z as draw ``draw`` of :func:`denoised_counts_split_mean`. Where ``x > 0`` the share is
    raised to at least float32's smallest normal number, so the non-zeros of the result are exactly
    those of ``x`` (a CSR of it aligns entry by entry with the counts' CSR); elsewhere 0.
    """
    keys = fold_in_each(cell_keys, draw)
    out, _ = forward(_net(config), variables, batch.x, keys, train=False)
    share = native_share(
        out.native_frequencies, out.noise_ratio, cell_ambient_profile(ambient_profile, batch.batch_index)
    )
    return jnp.where(batch.x > 0, jnp.maximum(share, jnp.finfo(jnp.float32).tiny), 0.0)
