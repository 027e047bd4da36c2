"""The multi-pass queries of :class:`~scar_jax.SCAR`, a shell over the model's AnnData (and, for
``get_ambient_profile``, over the raw droplets).

Each function takes the trained model (``model``: a :class:`scar_jax.SCAR`, not imported here), reads its cells
once and calls the array functions of :mod:`scar_jax.analysis`, :mod:`scar_jax.de`, :mod:`scar_jax.abundance`,
:mod:`scar_jax.calibration` and :mod:`scar_jax.ambient`; the SCAR methods of the same names check the arguments
scvi-tools documents and return what these return. The model and the calibration are derived in docs/model.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import abundance as _abundance
from . import ambient as _ambient
from . import analysis as _an
from . import data as _data
from . import de as _de
from . import features as _features
from . import io as _io
from . import posterior as _post
from .calibration import calibrated_split
from .train import positive_int as _positive_int


def expression_options(model, kwargs: dict, weights, transform_batch, library_size) -> tuple[bool, float]:
    """Check ``get_normalized_expression``'s keywords; ``(latent library, scale)``."""
    unknown = set(kwargs) - _an.IMPORTANCE_KWARGS
    if unknown:
        raise TypeError(
            f"get_normalized_expression() got unknown keyword arguments {sorted(unknown)}"
            f"; the extra keywords are passed to get_importance_weights: {sorted(_an.IMPORTANCE_KWARGS)}"
        )
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights must be None, 'uniform' or 'importance', got {weights!r}")
    _an.check_transform_batch(model.spec.batch_categories, transform_batch)
    latent = isinstance(library_size, str)
    if latent and library_size != "latent":
        raise ValueError(f"library_size must be a number or 'latent', got {library_size!r}")
    return latent, 1.0 if latent else float(library_size)


def normalized_expression(model, adata, indices, n: int, latent: bool, overall, weights, batch_size, return_mean, seed):
    """Draws of ``phi`` (or ``N (1 - eps) phi``) for ``get_normalized_expression``, before the gene subset and
    scale: ``(values, obs_names or None, return_mean)``; ``overall`` draws of random cells (resampled with the
    importance weights for ``weights="importance"``, the extra keywords in ``weights``' place as a dict)."""
    cells, rows = model._cells(adata, indices)
    importance, extra = weights
    if importance and overall is not None:
        values, zs = _an.expression_draws(
            model.config, model.variables, cells, rows, n, latent, batch_size, model._key(seed)
        )
        w = model.get_importance_weights(adata, rows, zs=zs, seed=seed, **extra)
        return _an.resample(values, w, overall, seed), None, True
    if overall is not None:
        rows, n, return_mean = np.random.default_rng(seed).choice(rows, size=overall, replace=True), 1, True
    fn = _an.expression_fn(model.config, model.variables, n, latent, return_mean)
    values = _post.map_chunks(fn, cells, rows, batch_size or 1024, model._key(seed))[0]
    index = None if overall is not None else np.asarray((model.adata if adata is None else adata).obs_names)[rows]
    return values, index, return_mean


def importance_weights(model, adata, indices, qz, zs, max_cells, truncation, n_mc_samples, seed) -> np.ndarray:
    """``get_importance_weights``: anchors, ``log p(x_a)`` and ``log p(x_a | z_k)`` (:mod:`scar_jax.analysis`)."""
    cells, rows = model._cells(adata, indices)
    moments = model.get_latent_representation(adata, rows, return_dist=True) if qz is None else qz
    z_mean, z_var = _an.latent_moments(moments, len(rows), model.config.n_latent)
    zs = _an.latent_draws(zs, z_mean, z_var, seed)
    anchors = _abundance.select_anchor_cells(len(rows), max_cells, seed)
    log_px = model.get_marginal_ll(adata, rows[anchors], n_mc_samples, return_mean=False, seed=seed)
    cfg, v, ambient = model.config, model.variables, model.ambient_profile
    log_px_z = lambda flat: _an.anchor_log_likelihood(cfg, v, ambient, cells, rows[anchors], flat)  # noqa: E731
    return _an.importance_weights(zs, z_mean, z_var, anchors, log_px, log_px_z, truncation)


def differential_expression(model, adata, groups: dict, batch_size, weights, iw_kwargs, filter_outlier_cells, **test):
    """``differential_expression``: :func:`scar_jax.de.differential_expression` (``groups``, ``test``: its
    arguments) over posterior draws of the native frequencies (``get_normalized_expression``) of ``adata``."""
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights must be 'uniform' or 'importance', got {weights!r}")
    iw_kwargs = dict(iw_kwargs or {})
    _an.check_importance_kwargs(iw_kwargs, "importance_weighting_kwargs")
    adata = model.adata if adata is None else adata
    cells, _ = model._cells(adata, None)
    extra = iw_kwargs if weights == "importance" else {}
    scales = lambda rows, n, s: model.get_normalized_expression(  # noqa: E731
        adata, rows, n_samples_overall=n, batch_size=batch_size, seed=s, return_numpy=True, weights=weights, **extra
    )
    latent = lambda rows: model.get_latent_representation(adata, indices=rows, batch_size=batch_size)  # noqa: E731
    outliers = latent if filter_outlier_cells else None
    return _de.differential_expression(
        scales, adata.obs, cells.x, list(model.var_names), groups, latent=outliers, **test
    )


def calibrated(model, adata, indices, batch_size, n_neighbours: int, expressed_prior_odds: float = 0.1):
    """Calibrated noise ratio ``(m,)`` and native share ``(m, G)`` of the selected rows, the cells and rows.

    The last calibration is kept on the model, keyed on the parameters (by identity), a digest of the counts,
    profile and batches (:func:`scar_jax.data.calibration_digest`), ``n_neighbours`` and ``expressed_prior_odds``."""
    cells, rows = model._cells(adata, indices)
    n_neighbours = _positive_int(n_neighbours, "n_neighbours")
    target = model.adata if adata is None else adata
    profile = np.asarray(model.ambient_profile)
    batches = _data.batch_index(target, model.spec) if profile.shape[0] > 1 else None
    digest = _data.calibration_digest(target, model.spec, profile, batches)
    key = (digest, n_neighbours, float(expressed_prior_odds))
    cached = model._calibration_cache
    if digest is not None and cached is not None and cached[0] is model.variables and cached[1] == key:
        eps, share = cached[2], cached[3]
    else:
        options = {"n_neighbours": n_neighbours, "expressed_prior_odds": expressed_prior_odds}
        eps, share = _data.calibrate_model(model, adata, **options, batch_size=batch_size, share_at="observed")
        model._calibration_cache = None if digest is None else (model.variables, key, eps, share)
    return eps[rows], _take_rows(share, rows), cells, rows


def _take_rows(m, rows: np.ndarray):
    """``m[rows]``, or ``m`` itself (nothing copied) when ``rows`` are all its rows in order (the default
    ``indices=None``: a copy of the counts and of the share would add twice the counts to the peak memory); in-memory
    arrays only."""
    rows = np.asarray(rows)
    in_memory = sp.issparse(m) or isinstance(m, np.ndarray)  # counts on disk are read by indexing
    if in_memory and rows.shape == (m.shape[0],) and np.array_equal(rows, np.arange(m.shape[0])):
        return m
    return m[rows]


def denoised_counts(model, adata, n_samples, batch_size, method, indices, seed, return_sparse, n_neighbours, odds):
    """``get_denoised_counts`` (the methods are derived in docs/model.md)."""
    n_samples = _positive_int(n_samples, "n_samples")
    method = model.default_denoising_method if method is None else method
    if method not in ("split", "split_mean", "expected", "calibrated"):
        raise ValueError(f"method must be 'split', 'split_mean', 'expected' or 'calibrated', got {method!r}")
    if method == "calibrated":
        _, share, cells, rows = calibrated(model, adata, indices, batch_size, n_neighbours, odds)
        return calibrated_split(_take_rows(cells.x, rows), share, seed, return_sparse)
    if return_sparse is None:
        sparse = _data.counts_are_sparse(model.adata if adata is None else adata, model.spec)
        return_sparse = sparse and method != "expected"
    if method == "split":
        out = split_counts(model, adata, indices, batch_size, n_samples, seed)
        return out if return_sparse else out.toarray()
    fn = _an.denoise_fn(model.config, model.variables, model.ambient_profile, method, n_samples)
    return model._map(fn, adata, indices, batch_size, seed, sparse_output=bool(return_sparse))[0]


def split_counts(model, adata, indices, batch_size, n_samples: int, seed: int) -> sp.csr_matrix:
    """``Binomial(x, w)`` with the model's posterior native share, median over ``n_samples`` draws of z."""
    cells, rows = model._cells(adata, indices)
    cfg, v, key = model.config, model.variables, model._key(seed)
    return _an.split_counts(cfg, v, model.ambient_profile, cells, rows, batch_size, n_samples, seed, key)


def write_denoised_counts(model, filename, adata, layer, method, block_cells, *options) -> None:
    """``write_denoised_counts``: the counts of ``get_denoised_counts`` written ``block_cells`` cells at a time
    (:mod:`scar_jax.io`). ``options``: ``batch_size, n_samples, seed, n_neighbours, expressed_prior_odds,
    overwrite, progress_bar``.

    ``"calibrated"``: the calibration of all cells (kept on the model as for ``get_denoised_counts``), then one
    :func:`scar_jax.denoise.calibrated_split` stream continued block after block, so the file holds the same
    numbers as ``get_denoised_counts(method="calibrated", seed=seed)``. ``"split"``: per-cell streams."""
    batch_size, n_samples, seed, n_neighbours, odds, overwrite, bar = options
    if not model.is_trained:
        raise RuntimeError("the model is not trained yet; call model.train() first")
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a non-empty string, got {layer!r}")
    method = model.default_denoising_method if method is None else method
    if method not in ("calibrated", "split"):
        raise ValueError(f"method must be 'calibrated' or 'split' (count-preserving, by blocks), got {method!r}")
    path = Path(filename)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
    block = _positive_int(block_cells, "block_cells")
    n_samples = _positive_int(n_samples, "n_samples")
    adata = model.adata if adata is None else adata
    if method == "split":
        draw = lambda rows: split_counts(model, adata, rows, batch_size, n_samples, seed)  # noqa: E731
    else:
        _, share, cells, _ = calibrated(model, adata, None, batch_size, n_neighbours, odds)
        rng = np.random.default_rng(seed)  # one stream, continued by each block in row order
        draw = lambda rows: calibrated_split(cells.x[rows], share[rows], rng, return_sparse=True)  # noqa: E731
    _io.write_layer_by_blocks(path, adata, layer, block, draw, bar)


def ambient_profile(adata: anndata.AnnData, raw_adata: anndata.AnnData, n_batch: int, batch_key, **options: Any):
    """``get_ambient_profile``: one profile per batch of ``raw_adata`` (``options``: the arguments of
    :func:`scar_jax.ambient.estimate_ambient_profile`), stacked ``(n_genes, n_profiles)``, written to
    ``adata.varm["ambient_profile"]``."""
    raw, groups = _data.raw_droplet_groups(adata, raw_adata, batch_key)
    chunk = min(max(1, -(-raw_adata.n_obs // max(1, int(n_batch)))), 100_000)
    profiles = [
        _ambient.estimate_ambient_profile(
            raw if len(rows) == raw.shape[0] else raw[rows], **options, chunk_size=chunk
        ).profile
        for rows in groups
    ]
    adata.varm["ambient_profile"] = profile = np.stack(profiles, axis=1)
    return profile


def differential_abundance(model, adata, sample_key, batch_size, num_cells_posterior, dof, seed) -> pd.DataFrame:
    """``differential_abundance``: :func:`scar_jax.abundance.differential_abundance` of the latent moments of
    ``adata``'s cells (and, for ``"ln"``, their latent means as the points) by ``adata.obs[sample_key]``."""
    adata = model.adata if adata is None else adata
    if sample_key is None or sample_key not in adata.obs:
        raise ValueError(f"sample_key must be a column of adata.obs, got {sample_key!r}")
    means, variances = model.get_latent_representation(adata, batch_size=batch_size, return_dist=True)
    points = None
    if model.config.latent_distribution == "ln":
        points = model.get_latent_representation(adata, batch_size=batch_size, give_mean=True)
    obs = adata.obs[sample_key]
    return _abundance.differential_abundance(obs, means, variances, num_cells_posterior, dof, seed, points=points)


def bayes_factors(model, cells, rows, batch_size, adjust, log: bool = False) -> np.ndarray:
    """``get_bayes_factors`` of the selected ``rows`` of ``cells``, with the noise ratio at the posterior mean of z
    (:func:`scar_jax.features.bayes_factors`, or ``log_bayes_factors`` with ``log``)."""
    noise_ratio = model._decode_at_mean(cells, rows, batch_size)[1][:, 0]
    x = cells.x[rows]
    library = np.asarray(x.sum(axis=1), np.float64).ravel()
    fn = _features.log_bayes_factors if log else _features.bayes_factors
    return fn(x, library, noise_ratio, model.ambient_profile, cells.batch_index[rows], adjust=adjust)


def assign_features(model, adata, cutoff, moi, adjust, batch_size) -> pd.DataFrame:
    """``assign_features``: :func:`scar_jax.features.assign_features` from the Bayes factors of every cell."""
    adata = model.adata if adata is None else adata
    cells, rows = model._cells(adata, None)
    bf = bayes_factors(model, cells, rows, batch_size, adjust)
    names, obs_names = np.asarray(adata.var_names), np.asarray(adata.obs_names)
    options = {"cutoff": cutoff, "moi": moi, "obs_names": obs_names, "feature_type": model.feature_type}
    return _features.assign_features(bf, cells.x, names, **options)


def feature_correlation(samples: np.ndarray, var_names: np.ndarray, correlation_type: str) -> pd.DataFrame:
    """Gene-gene correlation of posterior draws ``(n_samples, n_cells, n_genes)``, a DataFrame over the genes."""
    matrix = _abundance.feature_correlation(samples, correlation_type)
    return pd.DataFrame(matrix, index=var_names, columns=var_names)
