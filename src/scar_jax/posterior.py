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

from .nets import SCARNet
from .vae import Batch, SCARConfig, forward, kl_local, likelihood, standard_normal_noise


class HostCells(NamedTuple):
    """Cells on the host: counts ``(n, G)`` (dense or CSR), library ``(n, 1)``, batch index ``(n,)``."""

    x: np.ndarray | sp.csr_matrix
    library: np.ndarray
    batch_index: np.ndarray


@functools.cache
def _net(config: SCARConfig) -> SCARNet:
    return config.make_net()


@functools.partial(jax.jit, static_argnums=0)
def encode(config: SCARConfig, variables: dict[str, Any], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of q(z | x), each ``(n, n_latent)``."""
    return _net(config).apply(variables, x, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def decode_at_mean(config: SCARConfig, variables: dict[str, Any], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Native frequencies ``(n, G)`` and noise ratio ``(n, 1)`` decoded from the posterior mean of z."""
    net = _net(config)
    z_mean, _ = net.apply(variables, x, method="encode")
    native_frequencies, noise_ratio, _ = net.apply(variables, z_mean, method="decode")
    return native_frequencies, noise_ratio


@functools.partial(jax.jit, static_argnums=(0, 4))
def logistic_normal_mean(
    config: SCARConfig, variables: dict[str, Any], x: jax.Array, cell_keys: jax.Array, mc_samples: int
) -> jax.Array:
    """Monte Carlo mean of softmax(z), z ~ q(z | x), over ``mc_samples`` draws, ``(n, n_latent)``."""
    z_mean, z_var = encode(config, variables, x)

    def add_sample(i, total):
        keys = jax.vmap(jax.random.fold_in, (0, None))(cell_keys, i)
        z = z_mean + jnp.sqrt(z_var) * standard_normal_noise(keys, x.shape[0], config.n_latent)
        return total + jax.nn.softmax(z, axis=-1)

    return jax.lax.fori_loop(0, mc_samples, add_sample, jnp.zeros_like(z_mean)) / mc_samples


@functools.partial(jax.jit, static_argnums=0)
def elbo_terms(
    config: SCARConfig, variables: dict[str, Any], batch: Batch, ambient_profile: jax.Array, cell_keys: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-cell reconstruction NLL (full ambient mixture) and KL with one z draw, each ``(n,)``."""
    out, _ = forward(_net(config), variables, batch.x, cell_keys, train=False)
    reconstruction_loss = -likelihood(config, out, batch, ambient_profile).log_prob(batch.x).sum(-1)
    return reconstruction_loss, kl_local(out)


@functools.partial(jax.jit, static_argnums=(0, 3))
def denoised_counts_expected(
    config: SCARConfig, variables: dict[str, Any], batch: Batch, n_samples: int, cell_keys: jax.Array
) -> jax.Array:
    """scvi-tools' denoised counts: ``N_i (1 - eps_i) phi_ig`` stochastically rounded, median over draws.

    Each draw samples z, takes the expected native counts ``E = library * native scale`` and rounds
    ``floor(E) + Bernoulli(E - floor(E))``. The result can exceed the observed count.
    """

    def one_draw(s):
        keys = jax.vmap(jax.random.fold_in, (0, None))(cell_keys, s)
        out, _ = forward(_net(config), variables, batch.x, keys, train=False)
        expected = batch.library * (1.0 - out.noise_ratio) * out.native_frequencies
        floor = jnp.floor(expected)
        round_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (expected.shape[1],)))(round_keys)
        return floor + (uniform < expected - floor)

    draws = jax.lax.map(one_draw, jnp.arange(n_samples))  # (n_samples, n, G)
    return draws[0] if n_samples == 1 else jnp.median(draws, axis=0)


def _dense_rows(x: np.ndarray | sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    block = x[rows]
    return (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(np.float32, copy=False)


def map_chunks(
    fn: Callable[[Batch, jax.Array], Any],
    cells: HostCells,
    rows: np.ndarray,
    batch_size: int,
    key: jax.Array,
) -> list[np.ndarray]:
    """Apply ``fn(batch, cell_keys)`` to ``rows`` in chunks of ``batch_size``; concatenate on the host.

    ``fn`` returns an array or a tuple of arrays with cells on the first axis. The last chunk is padded
    (with its first row) to ``batch_size`` so that ``fn`` compiles once; padding is dropped.
    """
    rows = np.asarray(rows, dtype=np.int64)
    batch_size = max(1, min(int(batch_size), len(rows)))
    pending = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        n_valid = len(chunk)
        if n_valid < batch_size:
            chunk = np.concatenate([chunk, np.full(batch_size - n_valid, chunk[0])])
        batch = Batch(
            jnp.asarray(_dense_rows(cells.x, chunk)),
            jnp.asarray(cells.library[chunk], jnp.float32),
            jnp.asarray(cells.batch_index[chunk], jnp.int32),
        )
        cell_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(chunk, jnp.uint32))
        out = fn(batch, cell_keys)  # dispatched asynchronously: the next chunk is read meanwhile
        pending.append((out if isinstance(out, tuple) else (out,), n_valid))
    n_outputs = len(pending[0][0]) if pending else 0
    return [np.concatenate([np.asarray(o[i])[:n] for o, n in pending]) for i in range(n_outputs)]
