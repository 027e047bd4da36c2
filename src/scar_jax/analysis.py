"""Likelihood, expression, sampling, differential expression and abundance methods of :class:`~scar_jax.SCAR`.

Functions of the model (``self``), bound as methods in :mod:`scar_jax.model`; the formulas are in
:mod:`scar_jax.posterior`, :mod:`scar_jax.de` and :mod:`scar_jax.abundance`.
"""

from __future__ import annotations

from typing import Any, Literal

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import abundance as _abundance
from . import de as _de
from . import posterior as _post
from .data import positive_int

IMPORTANCE_KWARGS = {"max_cells", "truncation", "n_mc_samples", "n_mc_samples_per_pass"}


def get_marginal_ll(
    self,
    adata: anndata.AnnData | None = None,
    indices: Any = None,
    n_mc_samples: int = 1000,
    batch_size: int | None = None,
    return_mean: bool = True,
    dataloader: Any = None,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> float | np.ndarray:
    """Marginal log-likelihood ``log p(x)`` per cell by importance sampling with q(z | x) as proposal.

    Unlike scvi-tools, ``log p(x | z)`` is the full likelihood of the model (native + ambient mixture),
    not the native part alone. Samples are evaluated one at a time inside the compiled chunk, so
    memory does not grow with ``n_mc_samples`` (beyond an ``(n_mc_samples, batch_size)`` matrix of
    log weights). ``batch_size`` defaults to 256 cells here.
    """
    if kwargs:
        raise TypeError(f"get_marginal_ll() got unknown keyword arguments {sorted(kwargs)}")
    if dataloader is not None:
        raise ValueError("dataloader is not supported; pass adata and indices")
    n = positive_int(n_mc_samples, "n_mc_samples")
    cfg, v, ambient = self.config, self._variables, jnp.asarray(self.ambient_profile)
    fn = lambda b, k: _post.log_marginal_likelihood(cfg, v, b, ambient, n, k)  # noqa: E731
    values = self._map(fn, adata, indices, batch_size or 256, seed)[0]
    return float(values.mean()) if return_mean else values


def get_latent_library_size(
    self,
    adata: anndata.AnnData | None = None,
    indices: Any = None,
    give_mean: bool = True,
    batch_size: int | None = None,
    dataloader: Any = None,
    **data_loader_kwargs: Any,
) -> np.ndarray:
    """Library size of each cell, ``(n_cells, 1)``: SCAR uses the observed library (total counts)."""
    cells, rows = self._cells(adata, indices)
    return np.asarray(cells.x[rows].sum(axis=1), np.float32).reshape(-1, 1)


def get_normalized_expression(
    self,
    adata: anndata.AnnData | None = None,
    indices: Any = None,
    transform_batch: Any = None,
    gene_list: list[str] | None = None,
    library_size: float | Literal["latent"] = 1,
    n_samples: int = 1,
    n_samples_overall: int | None = None,
    weights: Literal["uniform", "importance"] | None = None,
    batch_size: int | None = None,
    return_mean: bool = True,
    return_numpy: bool | None = None,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> np.ndarray | pd.DataFrame:
    """Normalized native expression: the native frequencies ``phi`` times ``library_size``.

    With ``weights="importance"`` and ``n_samples_overall``, the ``n_samples`` draws of every cell are
    resampled with the weights of :meth:`get_importance_weights` (extra keywords go there), as in
    scvi-tools; without ``n_samples_overall`` the weights are not used (scvi-tools ignores them too).

    Rows sum to ``library_size`` (the ambient part removed and the native part renormalised), or, with
    ``library_size="latent"``, the expected native counts ``N (1 - noise_ratio) phi``. Averaged over
    ``n_samples`` draws of z (``return_mean``) or returned per draw ``(n_samples, n_cells, n_genes)``;
    ``n_samples_overall`` draws of random cells give ``(n_samples_overall, n_genes)``. SCAR's networks
    have no batch covariate, so ``transform_batch`` only accepts the setup's batch categories and does
    not change the result. Returns a DataFrame (genes as columns) unless ``return_numpy`` or
    ``n_samples > 1`` with ``return_mean=False``.
    """
    unknown = set(kwargs) - IMPORTANCE_KWARGS
    if unknown:
        raise TypeError(
            f"get_normalized_expression() got unknown keyword arguments {sorted(unknown)}; the extra keywords "
            f"are passed to get_importance_weights: {sorted(IMPORTANCE_KWARGS)}"
        )
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights must be None, 'uniform' or 'importance', got {weights!r}")
    self._check_transform_batch(transform_batch)
    latent = isinstance(library_size, str)
    if latent and library_size != "latent":
        raise ValueError(f"library_size must be a number or 'latent', got {library_size!r}")
    n = positive_int(n_samples, "n_samples")
    cells, rows = self._cells(adata, indices)
    if weights == "importance" and n_samples_overall is not None:
        return self._importance_resampled_expression(
            cells,
            adata,
            rows,
            n,
            positive_int(n_samples_overall, "n_samples_overall"),
            latent,
            library_size,
            gene_list,
            batch_size,
            return_numpy,
            seed,
            kwargs,
        )
    if n_samples_overall is not None:
        total = positive_int(n_samples_overall, "n_samples_overall")
        rows = np.random.default_rng(seed).choice(rows, size=total, replace=True)
        n, return_mean = 1, True
    genes = self._gene_mask(gene_list)
    cfg, v = self.config, self._variables

    def fn(b, k):
        out = _post.native_expression_samples(cfg, v, b, n, latent, return_mean, k)
        return out if return_mean else jnp.moveaxis(out, 0, 1)  # cells first for chunking

    key = jax.random.fold_in(self._predict_key, seed)
    values = _post.map_chunks(fn, cells, rows, batch_size or 1024, key)[0]
    values = values[..., genes] * (1.0 if latent else float(library_size))
    if not return_mean and n > 1:
        return np.moveaxis(values, 1, 0)
    if return_numpy:
        return values
    names = np.asarray(self.var_names)[genes]
    source = self.adata if adata is None else adata
    index = None if n_samples_overall is not None else np.asarray(source.obs_names)[rows]
    return pd.DataFrame(values, columns=names, index=index)


def _importance_resampled_expression(
    self, cells, adata, rows, n, total, latent, library_size, gene_list, batch_size, return_numpy, seed, iw_kwargs
) -> np.ndarray | pd.DataFrame:
    cfg, v = self.config, self._variables

    def fn(b, k):  # cells first for chunking
        expression, z = _post.native_expression_and_latent(cfg, v, b, n, latent, k)
        return jnp.moveaxis(expression, 0, 1), jnp.moveaxis(z, 0, 1)

    key = jax.random.fold_in(self._predict_key, seed)
    values, zs = _post.map_chunks(fn, cells, rows, batch_size or 1024, key)
    values, zs = np.moveaxis(values, 1, 0), np.moveaxis(zs, 1, 0)  # (n_samples, n_cells, ...)
    weights = self.get_importance_weights(adata, rows, zs=zs, seed=seed, **iw_kwargs).astype(np.float64)
    chosen = np.random.default_rng(seed).choice(weights.size, size=total, replace=True, p=weights / weights.sum())
    genes = self._gene_mask(gene_list)
    values = values.reshape(-1, values.shape[-1])[chosen][:, genes] * (1.0 if latent else float(library_size))
    if return_numpy:
        return values
    return pd.DataFrame(values, columns=np.asarray(self.var_names)[genes])


def get_importance_weights(
    self,
    adata: anndata.AnnData | None = None,
    indices: Any = None,
    qz: Any = None,
    px: Any = None,
    zs: Any = None,
    max_cells: int = 1024,
    truncation: bool = False,
    n_mc_samples: int = 500,
    n_mc_samples_per_pass: int = 250,
    *,
    seed: int = 0,
    **data_loader_kwargs: Any,
) -> np.ndarray:
    """Importance weights of latent draws ``zs`` of the cells ``indices`` (scvi-tools semantics).

    Self-normalised weights of each draw ``z_k`` against up to ``max_cells`` anchor cells ``x_a`` of the
    same cells (:func:`scar_jax.abundance.importance_weights`)::

        log w_k = logsumexp_a [log p(z_k) + log p(x_a | z_k) - log p(x_a)] - logsumexp_a log q(z_k | x_a)

    with ``log p(x_a)`` from :meth:`get_marginal_ll` (``n_mc_samples``). Different from scvi-tools, which
    rescales the native-only count distribution of each draw to the anchor's library (and cannot do so
    for the binomial): ``log p(x_a | z_k)`` here is the model's full likelihood at the decoder's output
    for ``z_k`` (native + ambient mixture with the anchor's library and batch profile), consistent with
    the marginal likelihood, as matrix products for the binomial and Poisson likelihoods
    (:func:`scar_jax.posterior.anchor_log_likelihood`).

    Parameters
    ----------
    qz
        The cells' ``q(z | x)``: a ``numpyro`` ``Normal`` or a ``(mean, variance)`` pair, each
        ``(n_cells, n_latent)``; ``None`` computes it.
    px
        Accepted for scvi-tools compatibility and not used (the likelihood is decoded from ``zs``).
    zs
        ``(n_cells, n_latent)`` or ``(n_samples, n_cells, n_latent)`` draws; ``None`` draws one per
        cell from ``qz`` with ``seed``.
    n_mc_samples_per_pass
        Accepted for compatibility: samples are evaluated one at a time in compiled code, so memory
        does not depend on ``n_mc_samples``.
    seed
        Seeds the choice of anchors (and ``zs`` when drawn here).

    Returns
    -------
    numpy.ndarray
        ``(n_samples * n_cells,)`` non-negative weights summing to 1, draws flattened sample-major.
    """
    unknown = set(data_loader_kwargs) - {"batch_size"}
    if unknown:
        raise TypeError(f"get_importance_weights() got unknown keyword arguments {sorted(unknown)}")
    cells, rows = self._cells(adata, indices)
    if qz is None:
        z_mean, z_var = self.get_latent_representation(adata, rows, return_dist=True)
    elif hasattr(qz, "loc") and hasattr(qz, "scale"):
        z_mean, z_var = np.asarray(qz.loc), np.asarray(qz.scale) ** 2
    else:
        z_mean, z_var = (np.asarray(a) for a in qz)
    n_latent = self.config.n_latent
    if z_mean.shape != (len(rows), n_latent) or z_var.shape != z_mean.shape:
        raise ValueError(
            f"qz must hold (n_cells, n_latent) = {(len(rows), n_latent)} means and variances for the "
            f"cells in indices, got {z_mean.shape} and {z_var.shape}"
        )
    if zs is None:
        noise = np.random.default_rng(seed).standard_normal(z_mean.shape)
        zs = (z_mean + np.sqrt(z_var) * noise).astype(np.float32)
    zs = np.asarray(zs, np.float32)
    if zs.ndim not in (2, 3) or zs.shape[-2:] != (len(rows), n_latent):
        raise ValueError(
            f"zs must be (n_cells, n_latent) or (n_samples, n_cells, n_latent) with n_cells = {len(rows)} "
            f"and n_latent = {n_latent}, got {zs.shape}"
        )
    anchors = _abundance.select_anchor_cells(len(rows), max_cells, seed)
    log_px = self.get_marginal_ll(adata, rows[anchors], n_mc_samples, return_mean=False, seed=seed)
    flat = zs.reshape(-1, n_latent)
    log_qz = _abundance.anchor_log_qz(flat, z_mean[anchors], z_var[anchors])
    log_px_z = self._anchor_log_likelihood(cells, rows[anchors], flat)
    log_pz = _abundance.standard_normal_log_prob(flat)
    return _abundance.importance_weights(log_px_z, log_pz, log_qz, log_px, truncation)


def _anchor_log_likelihood(self, cells: _post.HostCells, anchor_rows: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """``log p(x_a | z_k)`` ``(K, A)``, draws in fixed-size chunks (compiled once)."""
    anchors = _post.Batch(
        jnp.asarray(_post._dense_rows(cells.x, anchor_rows)),
        jnp.asarray(cells.library[anchor_rows], jnp.float32),
        jnp.asarray(cells.batch_index[anchor_rows], jnp.int32),
    )
    cfg, v, ambient = self.config, self._variables, jnp.asarray(self.ambient_profile)
    constant = _post.anchor_log_constant(cfg, anchors)
    chunk = min(512, len(zs))
    out = []
    for start in range(0, len(zs), chunk):
        block = zs[start : start + chunk]
        padded = np.concatenate([block, np.zeros((chunk - len(block), zs.shape[1]), np.float32)])
        values = _post.anchor_log_likelihood(cfg, v, jnp.asarray(padded), anchors, ambient, constant)
        out.append(np.asarray(values)[: len(block)])
    return np.concatenate(out)


def get_likelihood_parameters(
    self,
    adata: anndata.AnnData | None = None,
    indices: Any = None,
    n_samples: int = 1,
    give_mean: bool = False,
    batch_size: int | None = None,
    dataloader: Any = None,
    *,
    seed: int = 0,
    **data_loader_kwargs: Any,
) -> dict[str, np.ndarray]:
    """Parameters of p(x | z) (the full ambient mixture): ``mean`` ``(n_cells, n_genes)``, and for NB/ZINB
    ``dispersions`` (theta) and for ZINB ``dropout`` (zero-inflation probability).

    ``give_mean=True`` decodes the posterior mean of z; otherwise one draw of z (``n_samples`` must be 1).
    """
    if positive_int(n_samples, "n_samples") != 1:
        raise ValueError("n_samples > 1 is not supported; call repeatedly with different seeds")
    cfg, v, ambient = self.config, self._variables, jnp.asarray(self.ambient_profile)
    fn = lambda b, k: _post.likelihood_parameters(cfg, v, b, ambient, bool(give_mean), k)  # noqa: E731
    mean, theta, dropout = self._map(fn, adata, indices, batch_size, seed)
    out = {"mean": mean}
    if cfg.gene_likelihood in ("nb", "zinb"):
        out["dispersions"] = theta
    if cfg.gene_likelihood == "zinb":
        out["dropout"] = dropout
    return out


def posterior_predictive_sample(
    self,
    adata: anndata.AnnData | None = None,
    indices: Any = None,
    n_samples: int = 1,
    gene_list: list[str] | None = None,
    batch_size: int | None = None,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> sp.csr_matrix | np.ndarray:
    """Draws of x̂ ~ p(x̂ | z), z ~ q(z | x): CSR ``(n_cells, n_genes)`` for one sample, else a dense
    ``(n_cells, n_genes, n_samples)`` array (scvi-tools returns a sparse COO array there).

    The likelihood is the model's full one (native + ambient), i.e. data like the observed counts.
    """
    if kwargs:
        raise TypeError(f"posterior_predictive_sample() got unknown keyword arguments {sorted(kwargs)}")
    n = positive_int(n_samples, "n_samples")
    genes = self._gene_mask(gene_list)
    cfg, v, ambient = self.config, self._variables, jnp.asarray(self.ambient_profile)
    fn = lambda b, k: jnp.moveaxis(_post.posterior_predictive(cfg, v, b, ambient, n, k), 0, -1)  # noqa: E731
    values = self._map(fn, adata, indices, batch_size, seed)[0][:, genes, :]
    return sp.csr_matrix(values[..., 0]) if n == 1 else values


def differential_expression(
    self,
    adata: anndata.AnnData | None = None,
    groupby: str | None = None,
    group1: Any = None,
    group2: Any = None,
    idx1: Any = None,
    idx2: Any = None,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    batch_size: int | None = None,
    all_stats: bool = True,
    batch_correction: bool = False,
    batchid1: Any = None,
    batchid2: Any = None,
    fdr_target: float = 0.05,
    silent: bool = False,
    weights: Literal["uniform", "importance"] | None = "uniform",
    filter_outlier_cells: bool = False,
    importance_weighting_kwargs: dict | None = None,
    *,
    seed: int = 0,
    n_samples_overall: int = 5000,
    pseudocounts: float | None = None,
    test_mode: Literal["two", "three"] = "three",
    cred_interval_lvls: list[float] | None = None,
) -> pd.DataFrame:
    """Bayesian differential expression of the *native* expression between groups of cells.

    scvi-tools' semantics and result columns (``proba_de``, ``bayes_factor``, ``lfc_*``,
    ``is_de_fdr_<target>`` in change mode, raw means, non-zero proportions, normalized means,
    ``comparison``, ``group1``, ``group2``); ``group2=None`` compares each group with the rest; ``idx1``
    and ``idx2`` may be boolean masks, integer indices or ``obs`` query strings. The expression
    compared is the native frequencies (ambient removed), drawn from the posterior of
    ``n_samples_overall`` random cells per group (see :mod:`scar_jax.de`). SCAR has no batch covariate,
    so ``batch_correction``/``batchid*`` have no effect. ``weights="importance"`` resamples each group's
    posterior draws with :meth:`get_importance_weights` (``importance_weighting_kwargs`` go there).
    """
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights must be 'uniform' or 'importance', got {weights!r}")
    iw_kwargs = dict(importance_weighting_kwargs or {})
    unknown = set(iw_kwargs) - IMPORTANCE_KWARGS
    if unknown:
        raise TypeError(
            f"importance_weighting_kwargs has unknown keys {sorted(unknown)}; allowed: {sorted(IMPORTANCE_KWARGS)}"
        )
    adata = self.adata if adata is None else adata
    cells, _ = self._cells(adata, None)

    def sample_scales(rows: np.ndarray, n: int, sample_seed: int) -> np.ndarray:
        return self.get_normalized_expression(
            adata,
            indices=rows,
            n_samples_overall=n,
            batch_size=batch_size,
            seed=sample_seed,
            return_numpy=True,
            weights=weights,
            **(iw_kwargs if weights == "importance" else {}),
        )

    def latent(rows: np.ndarray) -> np.ndarray:
        return self.get_latent_representation(adata, indices=rows, batch_size=batch_size)

    return _de.differential_expression(
        sample_scales,
        adata.obs,
        cells.x,
        list(self.var_names),
        groupby,
        group1,
        group2,
        idx1,
        idx2,
        mode,
        delta,
        all_stats,
        fdr_target,
        n_samples_overall=n_samples_overall,
        pseudocounts=pseudocounts,
        test_mode=test_mode,
        cred_interval_lvls=cred_interval_lvls,
        latent=latent if filter_outlier_cells else None,
        seed=seed,
        silent=silent,
    )


def get_aggregated_posterior(
    self,
    adata: anndata.AnnData | None = None,
    indices: Any = None,
    batch_size: int | None = None,
    dof: float | None = 3.0,
) -> Any:
    """The aggregated posterior: a uniform numpyro mixture over the cells of their q(z | x)
    (Normal, or Student-t with ``dof`` degrees of freedom as scvi-tools' default), with the posterior
    standard deviation as scale (scvi-tools passes the variance)."""
    means, variances = self.get_latent_representation(adata, indices, batch_size=batch_size, return_dist=True)
    return _abundance.aggregated_posterior(means, variances, dof)


def differential_abundance(
    self,
    adata: anndata.AnnData | None = None,
    sample_key: str | None = None,
    batch_size: int = 128,
    num_cells_posterior: int | None = None,
    dof: float | None = None,
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """Log-probability of every cell's latent mean under each sample's aggregated posterior.

    Returns a DataFrame ``(n_cells, n_samples)`` indexed by ``obs_names`` with one column per value of
    ``adata.obs[sample_key]`` (scvi-tools writes it to ``obsm["da_log_probs"]`` instead; scar-jax never
    writes to the AnnData from a getter). ``num_cells_posterior`` subsamples each sample's mixture (seeded).
    """
    adata = self.adata if adata is None else adata
    if sample_key is None or sample_key not in adata.obs:
        raise ValueError(f"sample_key must be a column of adata.obs, got {sample_key!r}")
    means, variances = self.get_latent_representation(adata, batch_size=batch_size, return_dist=True)
    points = None
    if self.config.latent_distribution == "ln":
        points = self.get_latent_representation(adata, batch_size=batch_size, give_mean=True)
    return _abundance.differential_abundance(
        adata.obs[sample_key], means, variances, num_cells_posterior, dof, seed, points=points
    )


def get_feature_correlation_matrix(
    self,
    adata: anndata.AnnData | None = None,
    indices: Any = None,
    n_samples: int = 10,
    batch_size: int = 64,
    rna_size_factor: int = 1000,
    transform_batch: Any = None,
    correlation_type: Literal["spearman", "pearson"] = "spearman",
    silent: bool = True,
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """Gene-gene correlation of posterior draws of native expression (``n_samples`` per cell), genes x genes.

    scvi-tools correlates Gamma draws around the NB mean; SCAR's default binomial likelihood has no
    dispersion, so scar-jax correlates the posterior draws of ``rna_size_factor x phi`` directly.
    """
    samples = self.get_normalized_expression(
        adata,
        indices,
        transform_batch=transform_batch,
        library_size=rna_size_factor,
        n_samples=n_samples,
        batch_size=batch_size,
        return_mean=False,
        return_numpy=True,
        seed=seed,
    )
    matrix = _abundance.feature_correlation(samples, correlation_type)
    return pd.DataFrame(matrix, index=self.var_names, columns=self.var_names)


def _gene_mask(self, gene_list: list[str] | None) -> np.ndarray:
    if gene_list is None:
        return np.ones(len(self.var_names), bool)
    mask = np.isin(self.var_names, np.asarray(gene_list, dtype=str))
    missing = sorted(set(gene_list) - set(self.var_names[mask]))
    if missing:
        raise ValueError(f"gene_list has genes that are not in the model: {missing[:5]}")
    return mask


def _check_transform_batch(self, transform_batch: Any) -> None:
    values = [] if transform_batch is None else np.atleast_1d(transform_batch)
    for value in values:
        if str(value) not in self.spec.batch_categories and not (
            isinstance(value, int | np.integer) and 0 <= value < len(self.spec.batch_categories)
        ):
            raise ValueError(f"transform_batch {value!r} is not a batch category {self.spec.batch_categories}")
