"""Aggregated posterior, differential abundance, importance weights and feature correlation.

Pure functions of arrays (latent moments, log densities, expression samples); the :class:`~scar_jax.model.SCAR`
methods of the same names only gather those arrays from the model. The semantics follow scvi-tools 1.4.2
(``VAEMixin.get_aggregated_posterior``, ``VAEMixin.differential_abundance``,
``RNASeqMixin.get_importance_weights``, ``RNASeqMixin.get_feature_correlation_matrix``); every deviation is
stated in the docstring concerned.

Notation: ``n`` cells with posterior ``q(z | x_i) = prod_d Normal(z_d; mu_id, sigma_id)`` over ``d = 1..D``
latent dimensions (``D = n_latent``). The aggregated posterior of a set ``I`` of cells is the uniform mixture

    q_I(z) = 1/|I| sum_{i in I} q(z | x_i),
    log q_I(z) = logsumexp_{i in I} sum_d log k(z_d; mu_id, sigma_id) - log |I|,

with ``k`` a Normal density, or a Student-t density with ``dof`` degrees of freedom (heavier tails).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import scipy.stats

__all__ = [
    "AggregatedPosterior",
    "aggregated_posterior",
    "anchor_log_qz",
    "differential_abundance",
    "feature_correlation",
    "importance_weights",
    "select_anchor_cells",
    "standard_normal_log_prob",
]


# --------------------------------------------------------------------------------------- aggregated posterior
class AggregatedPosterior(dist.MixtureSameFamily):
    """``numpyro`` ``MixtureSameFamily`` that tolerates ``jax_numpy_rank_promotion="raise"``.

    numpyro broadcasts a value ``(..., 1, D)`` against the component locations ``(n, D)`` (an implicit rank
    promotion); these overrides allow it locally so the distribution works under strict JAX settings.
    """

    def component_log_probs(self, value: Any) -> jax.Array:
        with jax.numpy_rank_promotion("allow"):
            return super().component_log_probs(value)

    def component_sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        with jax.numpy_rank_promotion("allow"):
            return super().component_sample(key, sample_shape)

    def component_cdf(self, samples: Any) -> jax.Array:
        with jax.numpy_rank_promotion("allow"):
            return super().component_cdf(samples)


def _scales(variances: Any, variance_as_scale: bool) -> jax.Array:
    variances = jnp.asarray(variances, jnp.float32)
    return variances if variance_as_scale else jnp.sqrt(variances)


def _check_moments(means: Any, variances: Any) -> tuple[np.ndarray, np.ndarray]:
    means, variances = np.asarray(means, np.float32), np.asarray(variances, np.float32)
    if means.ndim != 2 or means.shape != variances.shape or means.shape[0] == 0:
        raise ValueError(
            f"means and variances must both be (n_cells, n_latent) with n_cells >= 1, "
            f"got {means.shape} and {variances.shape}"
        )
    if not np.all(variances > 0):
        raise ValueError("variances must be positive")
    return means, variances


def _check_dof(dof: float | None) -> float | None:
    if dof is None:
        return None
    if not dof > 0:
        raise ValueError(f"dof must be positive or None, got {dof!r}")
    return float(dof)


def aggregated_posterior(
    means: Any, variances: Any, dof: float | None = None, *, variance_as_scale: bool = False
) -> AggregatedPosterior:
    """Aggregated posterior of a set of cells: the uniform mixture of their ``q(z | x)``.

    As ``scvi.model.base.VAEMixin.get_aggregated_posterior``::

        MixtureSameFamily(Categorical(logits=ones(n)), Independent(K(loc=mu, scale=sigma), 1))

    with ``K`` ``Normal`` (``dof=None``) or ``StudentT(dof)``, i.e. a mixture over cells of distributions that
    are independent across the ``D`` latent dimensions::

        log q(z) = logsumexp_i sum_d log K(z_d; mu_id, sigma_id) - log n.

    Parameters
    ----------
    means
        ``(n_cells, n_latent)`` posterior means ``mu`` (``get_latent_representation(return_dist=True)[0]``).
    variances
        ``(n_cells, n_latent)`` posterior variances ``sigma^2`` (``[1]`` of the same call).
    dof
        Degrees of freedom of Student-t components; ``None`` for Normal components. Note that scvi-tools'
        ``get_aggregated_posterior`` defaults to ``dof=3.0`` while its ``differential_abundance`` defaults to
        ``None``.
    variance_as_scale
        scvi-tools 1.4.2 passes the *variance* returned by ``get_latent_representation(return_dist=True)`` as
        the component scale (``sigma^2`` instead of ``sigma``). ``False`` (default) uses the standard deviation,
        the correct posterior; ``True`` reproduces scvi-tools' numbers exactly.

    Returns
    -------
    AggregatedPosterior
        A numpyro ``MixtureSameFamily`` with ``batch_shape=()`` and ``event_shape=(n_latent,)``:
        ``.log_prob(z)`` maps ``(..., n_latent)`` to ``(...)``; ``.sample(key, (m,))`` gives ``(m, n_latent)``.
    """
    means, variances = _check_moments(means, variances)
    dof = _check_dof(dof)
    loc, scale = jnp.asarray(means), _scales(variances, variance_as_scale)
    components = dist.Normal(loc, scale) if dof is None else dist.StudentT(dof, loc, scale)
    mixing = dist.Categorical(logits=jnp.ones(means.shape[0], jnp.float32))
    return AggregatedPosterior(mixing, dist.Independent(components, 1))


# --------------------------------------------------------------------------------------- differential abundance
def _component_log_probs(
    points: jax.Array, loc: jax.Array, scale: jax.Array, log_scale_sum: jax.Array, dof: jax.Array, student: bool
) -> jax.Array:
    """``sum_d log K(points_qd; loc_cd, scale_cd)``, ``(Q, C)``, from points ``(Q, D)`` and components ``(C, D)``."""
    n_latent = points.shape[-1]
    z = (points[:, None, :] - loc[None, :, :]) / scale[None, :, :]  # (Q, C, D)
    if student:
        const = jax.scipy.special.gammaln((dof + 1) / 2) - jax.scipy.special.gammaln(dof / 2)
        const = const - 0.5 * jnp.log(dof * jnp.pi)
        kernel = -(dof + 1) / 2 * jnp.sum(jnp.log1p(z * z / dof), axis=-1) + n_latent * const
    else:
        kernel = -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * n_latent * math.log(2 * math.pi)
    return kernel - log_scale_sum[None, :]


@functools.partial(jax.jit, static_argnames=("num_segments", "student"))
def _segment_logsumexp(
    points: jax.Array,
    loc: jax.Array,
    scale: jax.Array,
    segments: jax.Array,
    dof: jax.Array,
    num_segments: int,
    student: bool,
) -> jax.Array:
    """``logsumexp`` of the component log densities within each segment, ``(Q, num_segments)``.

    ``points`` ``(Q, D)``; components in blocks ``loc``/``scale`` ``(B, C, D)`` with segment ids ``(B, C)``
    in ``[0, num_segments]`` (``num_segments`` marks padding and is dropped). A running per-segment maximum
    keeps the accumulation stable however far apart the segments' densities are; memory is ``O(Q C D)``.
    """
    n_seg = num_segments + 1
    log_scale_sum = jnp.sum(jnp.log(scale), axis=-1)  # (B, C)

    def step(carry, block):
        run_max, run_sum = carry  # (n_seg, Q) each
        loc_b, scale_b, log_scale_b, seg_b = block
        lp = _component_log_probs(points, loc_b, scale_b, log_scale_b, dof, student).T  # (C, Q)
        new_max = jnp.maximum(run_max, jax.ops.segment_max(lp, seg_b, num_segments=n_seg))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        block_sum = jax.ops.segment_sum(jnp.exp(lp - safe_max[seg_b]), seg_b, num_segments=n_seg)
        return (new_max, run_sum * jnp.exp(run_max - safe_max) + block_sum), None

    init = (
        jnp.full((n_seg, points.shape[0]), -jnp.inf, points.dtype),
        jnp.zeros((n_seg, points.shape[0]), points.dtype),
    )
    (run_max, run_sum), _ = jax.lax.scan(step, init, (loc, scale, log_scale_sum, segments))
    return (jnp.log(run_sum[:num_segments]) + run_max[:num_segments]).T


def _pad_rows(array: np.ndarray, n_rows: int, value: float) -> np.ndarray:
    pad = n_rows - array.shape[0]
    if pad == 0:
        return array
    return np.concatenate([array, np.full((pad, *array.shape[1:]), value, array.dtype)])


# long: the parameter reference (about 50 lines of docstring); the body is about 50 lines
def differential_abundance(
    sample_labels: Sequence[Any] | pd.Series | np.ndarray,
    means: Any,
    variances: Any,
    num_cells_posterior: int | None = None,
    dof: float | None = None,
    seed: int = 0,
    chunk_size: int = 512,
    *,
    points: Any = None,
    obs_names: Sequence[Any] | pd.Index | None = None,
    component_chunk_size: int = 2048,
    variance_as_scale: bool = False,
) -> pd.DataFrame:
    """Log density of every cell's latent point under every sample's aggregated posterior.

    scvi-tools semantics (``VAEMixin.differential_abundance``): the samples are the distinct labels in order
    of first appearance (``Series.unique()``); for each sample ``s`` with cells ``I_s`` (randomly reduced to
    ``num_cells_posterior`` cells, without replacement, when it has more), and for every cell ``j``::

        out[j, s] = log q_{I_s}(u_j) = logsumexp_{i in I_s} sum_d log K(u_jd; mu_id, sigma_id) - log |I_s|

    with ``u_j`` the latent mean of cell ``j`` (``points``) and ``K`` as in :func:`aggregated_posterior`.
    Cells of every sample are evaluated under every sample's mixture, so a high ``out[j, s]`` relative to the
    other columns says the neighbourhood of cell ``j`` is abundant in sample ``s``.

    Computed in JAX for all samples at once: blocks of ``chunk_size`` query cells against blocks of
    ``component_chunk_size`` mixture components, with a running per-sample ``logsumexp``; memory is
    ``O(chunk_size * component_chunk_size * n_latent)``, independent of the number of cells. The result does
    not depend on ``chunk_size``.

    Parameters
    ----------
    sample_labels
        ``(n_cells,)`` sample of each cell (e.g. ``adata.obs[sample_key]``; categorical is fine). Missing labels
        (NaN/None) join no sample's mixture and form no column (scvi-tools would make an empty-mixture column).
    means, variances
        ``(n_cells, n_latent)`` moments of ``q(z | x)``, aligned with ``sample_labels``.
    num_cells_posterior
        Maximum number of cells per sample in its aggregated posterior; ``None`` uses all cells.
    dof
        Student-t degrees of freedom of the components; ``None`` (scvi's default here) for Normal components.
    seed
        Seed of the subsampling (``numpy.random.default_rng(seed)``, samples drawn in column order; scvi uses
        the global NumPy state).
    chunk_size
        Number of query cells per block.
    points
        ``(n_cells, n_latent)`` points to evaluate; defaults to ``means``. scvi evaluates
        ``get_latent_representation(give_mean=True)``, which for ``latent_distribution="ln"`` is the Monte
        Carlo mean of ``softmax(z)`` rather than ``mu``; pass that here to match it.
    obs_names
        Row labels; defaults to the index of ``sample_labels`` when it is a ``Series``, else ``0..n-1``.
    component_chunk_size
        Number of mixture components per block.
    variance_as_scale
        As in :func:`aggregated_posterior` (``True`` reproduces scvi-tools 1.4.2's use of the variance as scale).

    Returns
    -------
    pandas.DataFrame
        ``(n_cells, n_samples)`` float32 log-probabilities, index ``obs_names``, columns the sample labels.
        scvi-tools stores this frame in ``adata.obsm["da_log_probs"]`` (and returns ``None``).
    """
    means, variances = _check_moments(means, variances)
    dof = _check_dof(dof)
    n_cells, n_latent = means.shape
    chunk_size = _positive(chunk_size, "chunk_size")
    component_chunk_size = _positive(component_chunk_size, "component_chunk_size")
    labels = sample_labels if isinstance(sample_labels, pd.Series) else pd.Series(np.asarray(sample_labels))
    if labels.shape[0] != n_cells:
        raise ValueError(f"sample_labels has {labels.shape[0]} entries for {n_cells} cells")
    points = means if points is None else np.asarray(points, np.float32)
    if points.shape != means.shape:
        raise ValueError(f"points must be {means.shape}, got {points.shape}")
    if obs_names is None:
        obs_names = labels.index if isinstance(sample_labels, pd.Series) else pd.RangeIndex(n_cells)
    codes, samples = pd.factorize(labels, sort=False)  # order of first appearance, as Series.unique()
    n_samples = len(samples)
    if n_samples == 0:
        raise ValueError("sample_labels has no non-missing label")
    if num_cells_posterior is not None:
        num_cells_posterior = _positive(num_cells_posterior, "num_cells_posterior")

    rng = np.random.default_rng(seed)
    members = []
    for s in range(n_samples):
        rows = np.flatnonzero(codes == s)
        if num_cells_posterior is not None and num_cells_posterior < rows.shape[0]:
            rows = np.sort(rng.choice(rows, num_cells_posterior, replace=False))
        members.append(rows)
    rows = np.concatenate(members)
    segments = np.repeat(np.arange(n_samples, dtype=np.int32), [m.shape[0] for m in members])
    log_sizes = np.log(np.array([m.shape[0] for m in members], np.float32))

    # components in fixed-size blocks; padding (loc 0, scale 1) goes to the dropped segment ``n_samples``
    block = min(component_chunk_size, rows.shape[0])
    n_padded = -(-rows.shape[0] // block) * block
    loc = _pad_rows(means[rows], n_padded, 0.0).reshape(-1, block, n_latent)
    scale = np.asarray(_scales(variances[rows], variance_as_scale))
    scale = _pad_rows(scale, n_padded, 1.0).reshape(-1, block, n_latent)
    seg = _pad_rows(segments, n_padded, n_samples).reshape(-1, block)
    loc, scale, seg = jnp.asarray(loc), jnp.asarray(scale), jnp.asarray(seg)
    dof_arr = jnp.asarray(1.0 if dof is None else dof, jnp.float32)

    query = min(chunk_size, n_cells)
    out = np.empty((n_cells, n_samples), np.float32)
    for start in range(0, n_cells, query):
        chunk = _pad_rows(points[start : start + query], query, 0.0)
        values = _segment_logsumexp(jnp.asarray(chunk), loc, scale, seg, dof_arr, n_samples, dof is not None)
        stop = min(start + query, n_cells)
        out[start:stop] = np.asarray(values)[: stop - start]
    out -= log_sizes[None, :]
    return pd.DataFrame(out, index=pd.Index(obs_names), columns=samples)


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------- importance weights
def select_anchor_cells(n_cells: int, max_cells: int = 1024, seed: int = 0) -> np.ndarray:
    """Positions of the anchor cells of :func:`importance_weights`.

    As scvi-tools: all ``n_cells`` positions when ``n_cells <= max_cells``, else ``max_cells`` positions drawn
    without replacement (here with ``numpy.random.default_rng(seed)``; scvi uses the global NumPy state).
    """
    n_cells, max_cells = _positive(n_cells, "n_cells"), _positive(max_cells, "max_cells")
    if n_cells <= max_cells:
        return np.arange(n_cells)
    return np.random.default_rng(seed).choice(n_cells, size=max_cells, replace=False)


def standard_normal_log_prob(zs: Any) -> jax.Array:
    """``log p(z) = sum_d log Normal(z_d; 0, 1)``: ``(..., n_latent)`` -> ``(...)``."""
    zs = jnp.asarray(zs)
    return -0.5 * jnp.sum(zs * zs, axis=-1) - 0.5 * zs.shape[-1] * math.log(2 * math.pi)


@functools.partial(jax.jit, static_argnames="chunk")
def _anchor_log_qz(flat: jax.Array, loc: jax.Array, scale: jax.Array, chunk: int) -> jax.Array:
    log_scale_sum = jnp.sum(jnp.log(scale), axis=-1)
    blocks = flat.reshape(-1, chunk, flat.shape[-1])
    one = lambda z: _component_log_probs(z, loc, scale, log_scale_sum, jnp.float32(1.0), False)  # noqa: E731
    return jax.lax.map(one, blocks).reshape(-1, loc.shape[0])


def anchor_log_qz(zs: Any, anchor_means: Any, anchor_variances: Any, chunk_size: int = 256) -> np.ndarray:
    """``log q(z | x_a)`` of every latent draw under every anchor cell's posterior.

    ``out[..., a] = sum_d log Normal(z_d; mu_ad, sigma_ad)`` (scvi-tools'
    ``qz_anchor.log_prob(zs.unsqueeze(-2)).sum(-1)``), computed ``chunk_size`` draws at a time.

    Parameters
    ----------
    zs
        ``(..., n_latent)`` draws, e.g. ``(n_samples, n_cells, n_latent)``.
    anchor_means, anchor_variances
        ``(n_anchors, n_latent)`` moments of the anchors' ``q(z | x)``.

    Returns
    -------
    numpy.ndarray
        ``(..., n_anchors)``.
    """
    anchor_means, anchor_variances = _check_moments(anchor_means, anchor_variances)
    zs = np.asarray(zs, np.float32)
    if zs.shape[-1] != anchor_means.shape[1]:
        raise ValueError(f"zs has {zs.shape[-1]} latent dimensions, anchors {anchor_means.shape[1]}")
    flat = zs.reshape(-1, zs.shape[-1])
    chunk = min(_positive(chunk_size, "chunk_size"), flat.shape[0])
    n_padded = -(-flat.shape[0] // chunk) * chunk
    scale = jnp.sqrt(jnp.asarray(anchor_variances))
    out = _anchor_log_qz(jnp.asarray(_pad_rows(flat, n_padded, 0.0)), jnp.asarray(anchor_means), scale, chunk)
    return np.asarray(out)[: flat.shape[0]].reshape(*zs.shape[:-1], anchor_means.shape[0])


@functools.partial(jax.jit, static_argnames="truncation")
def _importance_log_weights(
    log_px_z: jax.Array, log_pz: jax.Array, log_qz: jax.Array, log_px: jax.Array, truncation: bool
) -> jax.Array:
    log_ratio = log_pz[:, None] + log_px_z - log_px[None, :]  # (K, A)
    log_w = jax.scipy.special.logsumexp(log_ratio, axis=1) - jax.scipy.special.logsumexp(log_qz, axis=1)
    if truncation:
        tau = jax.scipy.special.logsumexp(log_w) - jnp.log(log_w.shape[0])
        log_w = jnp.maximum(log_w, tau)
    return log_w - jax.scipy.special.logsumexp(log_w)


def importance_weights(log_px_z: Any, log_pz: Any, log_qz: Any, log_px: Any, truncation: bool = False) -> np.ndarray:
    """Self-normalised importance weights of latent draws for a subpopulation (scvi-tools semantics).

    ``RNASeqMixin.get_importance_weights``: ``K`` latent draws ``z_k`` (``n_samples`` draws of each of
    ``n_cells`` cells, flattened sample-major) are weighted against ``A`` anchor cells ``x_a`` of the
    subpopulation, as a self-normalised estimate of the target ``p(z | x_1..x_A)`` with the aggregated
    posterior of the anchors as proposal::

        log w_k = logsumexp_a [log p(z_k) + log p(x_a | z_k) - log p(x_a)] - logsumexp_a log q(z_k | x_a)
        truncation:  tau = log mean_k exp(log w_k),  log w_k <- max(log w_k, tau)
        weights_k = exp(log w_k - logsumexp_k log w_k)      (sum_k weights_k = 1)

    The ``-log A`` of the mixture densities cancels in the normalisation. ``truncation`` follows scvi-tools'
    code literally (``torch.clamp(min=tau)``: weights below their mean are *raised* to the mean), although its
    docstring cites the upper truncation of Ionides (2008).

    Parameters
    ----------
    log_px_z
        ``(..., A)``: ``log p(x_a | z_k)``, the log-likelihood of anchor ``a``'s counts under the expression
        decoded from draw ``k`` (scvi rescales the decoder's mean to the anchor's library size).
    log_pz
        ``(...)``: prior ``log p(z_k)`` (:func:`standard_normal_log_prob`).
    log_qz
        ``(..., A)``: ``log q(z_k | x_a)`` (:func:`anchor_log_qz`).
    log_px
        ``(A,)``: marginal log-likelihoods ``log p(x_a)`` of the anchors (``get_marginal_ll(return_mean=False)``).
    truncation
        Apply the truncation above.

    Returns
    -------
    numpy.ndarray
        Weights of shape ``(...)`` (the draws' shape), summing to 1 over all entries; ``.ravel()`` gives
        scvi-tools' flat ``(n_samples * n_cells,)`` vector when the draws are ``(n_samples, n_cells)``.
    """
    log_px_z, log_qz = jnp.asarray(log_px_z), jnp.asarray(log_qz)
    log_pz, log_px = jnp.asarray(log_pz), jnp.asarray(log_px)
    batch_shape = log_pz.shape
    n_anchors = log_px.shape[0] if log_px.ndim == 1 else -1
    if log_px.ndim != 1 or log_px_z.shape != (*batch_shape, n_anchors) or log_qz.shape != log_px_z.shape:
        raise ValueError(
            "expected log_px_z and log_qz (..., A), log_pz (...) and log_px (A,), got "
            f"{log_px_z.shape}, {log_qz.shape}, {log_pz.shape} and {log_px.shape}"
        )
    flat = lambda a: a.reshape(-1, n_anchors)  # noqa: E731
    log_w = _importance_log_weights(flat(log_px_z), log_pz.reshape(-1), flat(log_qz), log_px, bool(truncation))
    return np.exp(np.asarray(log_w)).reshape(batch_shape)


# --------------------------------------------------------------------------------------- feature correlation
def feature_correlation(samples: Any, correlation_type: Literal["spearman", "pearson"] = "spearman") -> np.ndarray:
    """Gene-gene correlation matrix of posterior expression samples.

    scvi-tools' ``get_feature_correlation_matrix`` flattens ``n_samples`` posterior draws of ``n_cells`` cells
    into ``n_samples * n_cells`` observations of ``G`` genes and takes ``numpy.corrcoef(rowvar=False)``
    (Pearson) or ``scipy.stats.spearmanr`` (Pearson correlation of the within-gene ranks, ties given their
    average rank). Its draws come from ``Gamma(shape=theta, rate=theta / (rna_size_factor * px_scale))``
    (the Gamma part of the negative binomial, mean ``rna_size_factor * px_scale``), averaged over
    ``transform_batch``. For SCAR, whose default likelihood (binomial) has no dispersion and whose networks
    have no batch covariate, pass posterior draws of the native expression (e.g.
    ``get_normalized_expression(n_samples=m, return_mean=False)``); the correlation then combines the
    between-cell and the posterior (within-cell) variability of the ambient-free expression.

    Computed in float64 with NumPy; a gene constant over all observations gets NaN correlations (as in
    NumPy/SciPy). Unlike ``spearmanr``, two genes still give a ``(2, 2)`` matrix.

    Parameters
    ----------
    samples
        ``(n_samples, n_cells, G)`` draws or ``(n_observations, G)``; the order of observations is irrelevant.
    correlation_type
        ``"spearman"`` or ``"pearson"``.

    Returns
    -------
    numpy.ndarray
        ``(G, G)`` correlation matrix.
    """
    if correlation_type not in ("spearman", "pearson"):
        raise ValueError("Unknown correlation type. Choose one of 'spearman', 'pearson'.")
    samples = np.asarray(samples, np.float64)
    if samples.ndim not in (2, 3):
        raise ValueError(f"samples must be (n_samples, n_cells, G) or (n_observations, G), got {samples.shape}")
    flat = samples.reshape(-1, samples.shape[-1])
    if flat.shape[0] < 2:
        raise ValueError("at least two observations are needed for a correlation")
    if correlation_type == "spearman":
        flat = scipy.stats.rankdata(flat, method="average", axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        centred = flat - flat.mean(axis=0, keepdims=True)
        norms = np.sqrt(np.einsum("ng,ng->g", centred, centred))
        corr = (centred.T @ centred) / np.outer(norms, norms)
    corr = np.clip(corr, -1.0, 1.0)
    finite = np.isfinite(np.diag(corr))
    corr[np.diag_indices_from(corr)] = np.where(finite, 1.0, np.nan)
    return corr
