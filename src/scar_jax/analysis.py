"""Array-level work behind :class:`~scar_jax.SCAR`'s likelihood, expression, sampling and denoising methods.

Functions of arrays, the model's configuration and variables, and :class:`~scar_jax.posterior.HostCells`
(no AnnData, no model); the formulas themselves are in :mod:`scar_jax.posterior` and
:mod:`scar_jax.abundance`. The chunk functions (``*_fn``) are what :func:`scar_jax.posterior.map_chunks`
applies to each chunk of cells.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from . import abundance as _abundance
from . import posterior as _post
from .vae import SCARConfig

IMPORTANCE_KWARGS = {"max_cells", "truncation", "n_mc_samples", "n_mc_samples_per_pass"}
Variables = dict[str, Any]


def check_importance_kwargs(kwargs: dict[str, Any], what: str) -> None:
    """``TypeError`` for keys that ``get_importance_weights`` does not take."""
    unknown = set(kwargs) - IMPORTANCE_KWARGS
    if unknown:
        raise TypeError(f"{what} has unknown keys {sorted(unknown)}; allowed: {sorted(IMPORTANCE_KWARGS)}")


def gene_mask(var_names: np.ndarray, gene_list: list[str] | None) -> np.ndarray:
    """Boolean mask ``(n_genes,)`` of ``gene_list`` (all genes for ``None``); ``ValueError`` for unknown genes."""
    if gene_list is None:
        return np.ones(len(var_names), bool)
    mask = np.isin(var_names, np.asarray(gene_list, dtype=str))
    missing = sorted(set(gene_list) - set(var_names[mask]))
    if missing:
        raise ValueError(f"gene_list has genes that are not in the model: {missing[:5]}")
    return mask


def check_transform_batch(batch_categories: tuple[str, ...], transform_batch: Any) -> None:
    """``transform_batch`` must name batch categories (or their codes); SCAR has no batch covariate."""
    values = [] if transform_batch is None else np.atleast_1d(transform_batch)
    for value in values:
        if str(value) not in batch_categories and not (
            isinstance(value, int | np.integer) and 0 <= value < len(batch_categories)
        ):
            raise ValueError(f"transform_batch {value!r} is not a batch category {batch_categories}")


def latent_fn(cfg: SCARConfig, v: Variables, return_dist: bool, give_mean: bool, mc_samples: int):
    """Chunk function of the latent representation: ``(mean, variance)`` of q(z | x) with ``return_dist``; for
    ``"ln"`` the Monte Carlo mean of softmax(z) (``mc_samples`` draws) or one draw; for ``"normal"`` the mean or
    one draw of z."""

    def latent(batch, keys):
        if return_dist:
            return _post.encode(cfg, v, batch.x)
        if cfg.latent_distribution == "ln":
            return _post.logistic_normal_mean(cfg, v, batch.x, keys, mc_samples if give_mean else 1)
        z_mean, z_var = _post.encode(cfg, v, batch.x)
        if give_mean:
            return z_mean
        return z_mean + jnp.sqrt(z_var) * jax.vmap(lambda k: jax.random.normal(k, (cfg.n_latent,)))(keys)

    return latent


def expression_fn(cfg: SCARConfig, v: Variables, n: int, latent: bool, return_mean: bool):
    """Chunk function of the native expression: mean over ``n`` draws, or the draws with cells first."""

    def fn(b, k):
        out = _post.native_expression_samples(cfg, v, b, n, latent, return_mean, k)
        return out if return_mean else jnp.moveaxis(out, 0, 1)  # cells first for chunking

    return fn


def expression_draws(cfg: SCARConfig, v: Variables, cells, rows, n: int, latent: bool, batch_size, key):
    """``n`` draws of native expression and of z for ``rows``: ``(n, m, G)`` and ``(n, m, n_latent)``."""

    def fn(b, k):  # cells first for chunking
        expression, z = _post.native_expression_and_latent(cfg, v, b, n, latent, k)
        return jnp.moveaxis(expression, 0, 1), jnp.moveaxis(z, 0, 1)

    values, zs = _post.map_chunks(fn, cells, rows, batch_size or 1024, key)
    return np.moveaxis(values, 1, 0), np.moveaxis(zs, 1, 0)


def resample(values: np.ndarray, weights: np.ndarray, total: int, seed: int) -> np.ndarray:
    """``total`` rows of ``values`` ``(n, m, G)`` (flattened sample-major) drawn with ``weights``."""
    weights = weights.astype(np.float64)
    chosen = np.random.default_rng(seed).choice(weights.size, size=total, replace=True, p=weights / weights.sum())
    return values.reshape(-1, values.shape[-1])[chosen]


def latent_moments(qz: Any, n_cells: int, n_latent: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance ``(n_cells, n_latent)`` of ``qz``: a numpyro ``Normal`` or a ``(mean, variance)`` pair."""
    if hasattr(qz, "loc") and hasattr(qz, "scale"):
        z_mean, z_var = np.asarray(qz.loc), np.asarray(qz.scale) ** 2
    else:
        z_mean, z_var = (np.asarray(a) for a in qz)
    if z_mean.shape != (n_cells, n_latent) or z_var.shape != z_mean.shape:
        raise ValueError(
            f"qz must hold (n_cells, n_latent) = {(n_cells, n_latent)} means and variances for the "
            f"cells in indices, got {z_mean.shape} and {z_var.shape}"
        )
    return z_mean, z_var


def latent_draws(zs: Any, z_mean: np.ndarray, z_var: np.ndarray, seed: int) -> np.ndarray:
    """``zs`` checked (``(m, n_latent)`` or ``(n, m, n_latent)``), or one draw per cell from the moments."""
    if zs is None:
        noise = np.random.default_rng(seed).standard_normal(z_mean.shape)
        zs = (z_mean + np.sqrt(z_var) * noise).astype(np.float32)
    zs = np.asarray(zs, np.float32)
    if zs.ndim not in (2, 3) or zs.shape[-2:] != z_mean.shape:
        raise ValueError(
            f"zs must be (n_cells, n_latent) or (n_samples, n_cells, n_latent) with n_cells = {z_mean.shape[0]} "
            f"and n_latent = {z_mean.shape[1]}, got {zs.shape}"
        )
    return zs


def anchor_log_likelihood(
    cfg: SCARConfig, v: Variables, ambient: np.ndarray, cells: _post.HostCells, anchor_rows: np.ndarray, zs: np.ndarray
) -> np.ndarray:
    """``log p(x_a | z_k)`` ``(K, A)`` of the anchor cells, draws in fixed-size chunks (compiled once)."""
    anchors = _post.Batch(
        jnp.asarray(_post._dense_rows(cells.x, anchor_rows)),
        jnp.asarray(cells.library[anchor_rows], jnp.float32),
        jnp.asarray(cells.batch_index[anchor_rows], jnp.int32),
    )
    ambient = jnp.asarray(ambient)
    constant = _post.anchor_log_constant(cfg, anchors)
    chunk = min(512, len(zs))
    out = []
    for start in range(0, len(zs), chunk):
        block = zs[start : start + chunk]
        padded = np.concatenate([block, np.zeros((chunk - len(block), zs.shape[1]), np.float32)])
        values = _post.anchor_log_likelihood(cfg, v, jnp.asarray(padded), anchors, ambient, constant)
        out.append(np.asarray(values)[: len(block)])
    return np.concatenate(out)


def importance_weights(
    zs: np.ndarray, z_mean: np.ndarray, z_var: np.ndarray, anchors: np.ndarray, log_px: np.ndarray, log_px_z_fn, trunc
) -> np.ndarray:
    """Self-normalised weights of the draws ``zs`` against the ``anchors`` (positions into the cells) with their
    ``log p(x_a)``; ``log_px_z_fn(flat_zs)`` gives ``log p(x_a | z_k)`` (:func:`anchor_log_likelihood`)."""
    flat = zs.reshape(-1, z_mean.shape[1])
    log_qz = _abundance.anchor_log_qz(flat, z_mean[anchors], z_var[anchors])
    log_px_z = log_px_z_fn(flat)
    log_pz = _abundance.standard_normal_log_prob(flat)
    return _abundance.importance_weights(log_px_z, log_pz, log_qz, log_px, trunc)


def likelihood_parameters(gene_likelihood: str, mean, theta, dropout) -> dict[str, np.ndarray]:
    """``{"mean"}``, with ``"dispersions"`` for NB/ZINB and ``"dropout"`` for ZINB."""
    out = {"mean": mean}
    if gene_likelihood in ("nb", "zinb"):
        out["dispersions"] = theta
    if gene_likelihood == "zinb":
        out["dropout"] = dropout
    return out


def split_counts(
    cfg: SCARConfig, v: Variables, ambient: np.ndarray, cells: _post.HostCells, rows, batch_size, n_samples, seed, key
) -> sp.csr_matrix:
    """The count-preserving split of ``rows``: native shares on the device at the observed counts, binomial
    draws on the host (:func:`scar_jax.posterior.binomial_split`), median over ``n_samples`` draws of z."""
    counts = sp.csr_matrix(cells.x[rows], dtype=np.float32)
    counts.eliminate_zeros()
    counts.sort_indices()
    ambient = jnp.asarray(ambient)
    draws = []
    for draw in range(n_samples):
        fn = lambda b, k, d=draw: _post.native_share_at_counts(cfg, v, b, ambient, d, k)  # noqa: E731
        share = _post.map_chunks(fn, cells, rows, batch_size or 1024, key, sparse_output=True)[0]
        share.sort_indices()
        draws.append(_post.binomial_split(counts, share, rows, seed, draw))
    data = draws[0] if n_samples == 1 else np.floor(np.median(np.stack(draws), axis=0))
    out = sp.csr_matrix((data.astype(np.float32), counts.indices, counts.indptr), shape=counts.shape)
    out.eliminate_zeros()
    return out


def denoise_fn(cfg: SCARConfig, v: Variables, ambient: np.ndarray, method: str, n_samples: int):
    """Chunk function of ``"expected"`` (scvi-tools' rounded ``library (1 - eps) phi``) or ``"split_mean"``."""
    if method == "expected":
        return lambda b, k: _post.denoised_counts_expected(cfg, v, b, n_samples, k)
    ambient = jnp.asarray(ambient)
    return lambda b, k: _post.denoised_counts_posterior_split(cfg, v, b, ambient, n_samples, False, k)
