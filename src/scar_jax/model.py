"""``SCAR``: the scvi-tools ``scvi.external.SCAR`` API over the functional core.

Each method reads the cells once (:mod:`scar_jax.data`), calls a function over arrays
(:mod:`scar_jax.posterior`, :mod:`scar_jax.analysis`, :mod:`scar_jax.abundance`, :mod:`scar_jax.de`,
:mod:`scar_jax.features`) and assembles the result; queries of several passes are in :mod:`scar_jax.predict`,
training in :mod:`scar_jax.training`, saving in :mod:`scar_jax.persist`, the setup-record methods in
:mod:`scar_jax.compat`. The model and the calibration are derived in ``docs/model.md``.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Literal

import anndata
import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import abundance as _abundance
from . import analysis as _an
from . import arguments as _arguments
from . import backed as _backed
from . import compat as _compat
from . import data as _data
from . import features as _features
from . import persist as _persist
from . import posterior as _post
from . import predict as _predict
from . import train as _train
from . import training as _training
from .train import positive_int as _positive_int
from .vae import SCARConfig, init_variables

PLAN_KWARGS = {*_arguments.PLAN_RANGES, "optimizer"}
TRAINER_KWARGS = set(_arguments.TRAINER_RANGES)  # and those of _arguments.NO_EFFECT_TRAINER_KWARGS (warned)


class SCAR:
    """Ambient RNA removal (scAR, Sheng et al. 2022) in JAX, with the ``scvi.external.SCAR`` API.

    ``adata``: raw counts ``(n_cells, n_genes)`` registered with :meth:`setup_anndata`. ``ambient_profile``:
    ``None`` (the cells' mean profile), a key of ``adata.varm``/``adata.var``, an array ``(n_genes,)`` /
    ``(n_genes, n_batches)`` or a DataFrame indexed by gene; normalised to sum 1 (with a warning). The network
    arguments are scvi-tools' (defaults 150, 15, 2, 0.0, ``"b"``, ``"normal"``, ``"softplus_sp"``, 0.9).
    ``feature_type``: ``"mRNA"``, ``"ADT"``, ``"sgRNA"``, ``"tag"``, ``"CMO"`` or ``"ATAC"`` (sgRNA, tag and CMO
    force ``sparsity=1``, as the original scAR). ``seed``: every random draw of the model. ``matmul_precision``:
    ``"float32"`` (true float32 on every backend), ``"tensorfloat32"`` or ``"bfloat16"`` (faster Dense layers on
    GPUs, float32 accumulation and likelihoods; see docs/benchmarks.md).
    """

    def __init__(
        self,
        adata: anndata.AnnData,
        ambient_profile: Any = None,
        n_hidden: int = 150,
        n_latent: int = 15,
        n_layers: int = 2,
        dropout_rate: float = 0.0,
        gene_likelihood: Literal["zinb", "nb", "b", "poisson"] = "b",
        latent_distribution: Literal["normal", "ln"] = "normal",
        scale_activation: Literal["softmax", "softplus", "softplus_sp"] = "softplus_sp",
        sparsity: float = 0.9,
        *,
        feature_type: str = "mRNA",
        seed: int = 0,
        matmul_precision: Literal["float32", "tensorfloat32", "bfloat16"] = "float32",
        **model_kwargs: Any,
    ) -> None:
        if model_kwargs:
            raise TypeError(f"SCAR() got unknown keyword arguments {sorted(model_kwargs)}")
        feature_type = _features.check_feature_type(feature_type)
        _data.check_unique_genes(adata)  # set up, then renamed: refused here too
        sparsity = _features.FORCED_SPARSITY.get(feature_type, sparsity)  # as the original scAR
        spec = _data.read_spec(adata)
        config = SCARConfig(
            n_genes=adata.n_vars,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            scale_activation=scale_activation,
            sparsity=sparsity,
            matmul_precision=matmul_precision,
        )
        self.spec, self.config, self._backed_cells = spec, config, None
        profile = _data.resolve_ambient_profile(adata, ambient_profile, spec, self._read_cells(adata).gene_totals)
        parts = {"seed": seed, "feature_type": feature_type, "ambient_profile": profile}
        self._set_parts(adata, spec, config, backed_cells=self._backed_cells, **parts)  # counts on disk: read once

    def _set_parts(self, adata, spec, config, *, seed, feature_type, ambient_profile, **saved: Any) -> None:
        """The one place a model's attributes are set (``__init__``, :meth:`load`, ``from_scvi_tools``); ``saved``:
        ``variables``, ``state``, ``is_trained``, ``history_rows``, ``split``, ``training_time_s``, ``backed_cells``."""
        self.adata, self.spec, self.config, self.feature_type = adata, spec, config, feature_type
        self.var_names = np.asarray(adata.var_names).astype(str)
        self.ambient_profile, self.seed = ambient_profile, int(seed)
        init_key, self._train_key, self._predict_key = _train.model_keys(self.seed)
        self._net, variables = config.make_net(), saved.pop("variables", None)
        self._variables = init_variables(self._net, init_key, config.n_genes) if variables is None else variables
        self._state: _train.TrainState | None = saved.pop("state", None)
        self.is_trained, self.history_rows = bool(saved.pop("is_trained", False)), list(saved.pop("history_rows", ()))
        self.training_time_s, split = saved.pop("training_time_s", 0.0), saved.pop("split", None)
        empty = np.zeros(0, np.int64)
        self.train_indices, self.validation_indices, self.test_indices = split or (empty, empty, empty)
        self._calibration_cache = None  # the last calibration (see predict.calibrated)
        # (adata weakref, spec, cells) of counts on disk, validated once
        self._backed_cells = saved.pop("backed_cells", None)
        self._records: _compat.Records = {}  # setup records of other AnnData (transfer_fields)
        if saved:
            raise TypeError(f"unknown model parts {sorted(saved)}")

    @classmethod
    def _from_parts(cls, adata: anndata.AnnData, spec, config: SCARConfig, **parts: Any) -> SCAR:
        model = cls.__new__(cls)
        model._set_parts(adata, spec, config, **parts)
        return model

    @classmethod
    def setup_anndata(
        cls,
        adata: anndata.AnnData,
        batch_key: str | None = None,
        labels_key: str | None = None,
        layer: str | None = None,
        size_factor_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Validate ``adata`` and record the setup in ``adata.uns["_scar_jax"]`` (no ``obs`` columns, no copy)."""
        if kwargs:
            raise TypeError(f"setup_anndata() got unknown keyword arguments {sorted(kwargs)}")
        keys = {"batch_key": batch_key, "labels_key": labels_key, "layer": layer, "size_factor_key": size_factor_key}
        _data.setup_anndata(adata, keys)

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule: Any = None,
        trainer_config: dict | None = None,
        *,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 10,
        **trainer_kwargs: Any,
    ) -> None:
        """Train the model (scvi-tools' arguments and defaults; ``docs/compat.md`` says what each one does here).

        ``max_epochs=None``: ``min(round(20000 / n_cells * 400), 400)``. ``plan_kwargs``: ``lr`` (1e-3),
        ``weight_decay`` (1e-6), ``eps`` (0.01), ``n_epochs_kl_warmup`` (400), ``max_kl_weight`` (1),
        ``min_kl_weight`` (0). Trainer keywords: Lightning's (docs/compat.md), ``scan_unroll`` (1) and ``block_cells``
        (None: on-disk counts streamed in blocks of about 65,536 rows); those of
        :data:`scar_jax.arguments.NO_EFFECT_TRAINER_KWARGS` warn, others are a ``TypeError``. Training again
        continues from the current weights with a fresh optimizer. A last minibatch of 1 or 2 cells moves to
        validation; ``ValueError`` with fewer than 3 training cells or ``batch_size < 2``. Several ``devices``
        train data parallel (``batch_size`` a multiple of their number; see :mod:`scar_jax.distributed`).
        ``checkpoint_dir``: the full state is saved every ``checkpoint_every`` epochs and at the end; a later call
        resumes from it to the uninterrupted result. A NaN/infinite loss or parameter raises
        ``FloatingPointError`` and keeps the last good epoch.
        """
        if datamodule is not None:
            raise ValueError("datamodule is not supported: scar-jax trains from the AnnData given to SCAR()")
        plan = {**(plan_config or {}), **(plan_kwargs or {})}
        trainer = {**(trainer_config or {}), **trainer_kwargs}
        _arguments.plan_options(plan)  # unknown keys: TypeError; values out of range: ValueError
        options = _arguments.trainer_options(trainer)  # the same, warns here (Lightning's keywords: docs/compat.md)
        sizes = {"train_size": train_size, "validation_size": validation_size, **(datasplitter_kwargs or {})}
        run = (plan, trainer, options, checkpoint_dir, checkpoint_every)
        _training.train_model(
            self, max_epochs, accelerator, devices, sizes, shuffle_set_split, batch_size, early_stopping, *run
        )

    def _trained(self, state: _train.TrainState, rows: list[dict[str, float]], split: _train.Split) -> None:
        self._state, self._variables, self.history_rows, self.is_trained = state, state.variables, rows, True
        self.train_indices, self.validation_indices, self.test_indices = split

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics, one DataFrame per name (scvi-tools names; ``elbo_*`` is the negative ELBO).

        Each holds the epochs where it was logged (validation metrics: every ``check_val_every_n_epoch``)."""
        if not self.history_rows:
            return {}
        frame = pd.DataFrame(self.history_rows).set_index("epoch")
        return {name: frame[[name]].dropna() for name in frame.columns}

    @property
    def variables(self) -> dict:
        """The trained Flax variables ``{"params": ..., "batch_stats": ...}`` (read-only; train or load to change)."""
        return self._variables

    # ------------------------------------------------------------------ reading cells
    def _read_cells(self, adata: anndata.AnnData) -> _post.HostCells:
        """Validated counts, library and batch index of ``adata``; counts on disk are validated once per AnnData."""
        if not isinstance(_data.get_counts(adata, self.spec), _backed.BackedCounts):
            return _data.read_cells(adata, self.spec, self.config.gene_likelihood)
        cached = self._backed_cells
        if cached is not None and cached[0]() is adata and cached[1] == self.spec:
            return cached[2]
        cells = _data.read_cells(adata, self.spec, self.config.gene_likelihood)
        self._backed_cells = (weakref.ref(adata), self.spec, cells)
        return cells

    def _cells(self, adata: anndata.AnnData | None, indices: Any) -> tuple[_post.HostCells, np.ndarray]:
        """The cells of ``adata`` (default: the model's) and the selected rows; in memory only those are read."""
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet; call model.train() first")
        adata = self.adata if adata is None else adata
        if adata is not self.adata:
            _data.check_genes(adata, self.var_names)
        if indices is None:
            return self._read_cells(adata), np.arange(adata.n_obs)
        rows = _data.select_rows(adata.n_obs, indices)
        if isinstance(_data.get_counts(adata, self.spec), _backed.BackedCounts):
            return self._read_cells(adata), rows  # validated once per file (cached)
        return _data.read_cells(adata, self.spec, self.config.gene_likelihood, rows), rows

    def _key(self, seed: int) -> jax.Array:
        return jax.random.fold_in(self._predict_key, seed)

    def _map(self, fn, adata, indices, batch_size, seed: int = 0, sparse_output: bool = False) -> list:
        cells, rows = self._cells(adata, indices)
        return _post.map_chunks(fn, cells, rows, batch_size or 1024, self._key(seed), sparse_output)

    # ------------------------------------------------------------------ latent space, ELBO, likelihood
    def get_latent_representation(
        self,
        adata: anndata.AnnData | None = None,
        indices: Any = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        dataloader: Any = None,
        *,
        seed: int = 0,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation ``(n_cells, n_latent)``: the mean (``give_mean``) or one draw of z, for ``"ln"``
        of softmax(z) (mean over ``mc_samples`` draws); ``return_dist``: mean and variance of q(z | x)."""
        _arguments.refuse_dataloader(dataloader)
        fn = _an.latent_fn(self.config, self._variables, return_dist, give_mean, mc_samples)
        out = self._map(fn, adata, indices, batch_size, seed)
        return (out[0], out[1]) if return_dist else out[0]

    def _elbo_terms(self, adata, indices, batch_size, seed, dataloader) -> list[np.ndarray]:
        _arguments.refuse_dataloader(dataloader)
        cfg, v, ambient = self.config, self._variables, jax.numpy.asarray(self.ambient_profile)
        return self._map(lambda b, k: _post.elbo_terms(cfg, v, b, ambient, k), adata, indices, batch_size, seed)

    def get_elbo(
        self,
        adata: anndata.AnnData | None = None,
        indices: Any = None,
        batch_size: int | None = None,
        dataloader: Any = None,
        return_mean: bool = True,
        data_loader_kwargs: dict | None = None,
        *,
        seed: int = 0,
    ) -> float | np.ndarray:
        """ELBO per cell, ``-(reconstruction NLL + KL)`` with one z draw; higher is better."""
        rec, kl = self._elbo_terms(adata, indices, batch_size, seed, dataloader)
        return float((-(rec + kl)).mean()) if return_mean else -(rec + kl)

    def get_reconstruction_error(
        self,
        adata: anndata.AnnData | None = None,
        indices: Any = None,
        batch_size: int | None = None,
        dataloader: Any = None,
        return_mean: bool = True,
        data_loader_kwargs: dict | None = None,
        *,
        seed: int = 0,
    ) -> dict[str, float | np.ndarray]:
        """``{"reconstruction_loss": log p(x | z)}`` per cell (one z draw), higher is better, as scvi-tools."""
        rec = self._elbo_terms(adata, indices, batch_size, seed, dataloader)[0]
        return {"reconstruction_loss": float(-rec.mean()) if return_mean else -rec}

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
        """``log p(x)`` per cell by importance sampling with q(z | x); ``log p(x | z)`` is the full mixture
        likelihood (scvi-tools: the native part). ``batch_size`` defaults to 256 cells."""
        if kwargs:
            raise TypeError(f"get_marginal_ll() got unknown keyword arguments {sorted(kwargs)}")
        _arguments.refuse_dataloader(dataloader)
        n = _positive_int(n_mc_samples, "n_mc_samples")
        cfg, v, ambient = self.config, self._variables, jax.numpy.asarray(self.ambient_profile)
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

    # ------------------------------------------------------------------ expression, sampling
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
        """Native frequencies ``phi`` times ``library_size`` (``"latent"``: ``N (1 - noise_ratio) phi``).

        Mean over ``n_samples`` draws of z, or ``(n_samples, n_cells, n_genes)`` without ``return_mean``;
        ``n_samples_overall`` draws of random cells give ``(n_samples_overall, n_genes)``, resampled with
        :meth:`get_importance_weights` (extra keywords go there) for ``weights="importance"``. ``transform_batch``
        accepts the setup's batches and changes nothing (no batch covariate). A DataFrame unless ``return_numpy``.
        """
        latent, scale = _predict.expression_options(self, kwargs, weights, transform_batch, library_size)
        n = _positive_int(n_samples, "n_samples")
        overall = None if n_samples_overall is None else _positive_int(n_samples_overall, "n_samples_overall")
        draws = (n, latent, overall, (weights == "importance", kwargs), batch_size, return_mean, seed)
        values, index, return_mean = _predict.normalized_expression(self, adata, indices, *draws)
        genes = _an.gene_mask(self.var_names, gene_list)
        values = values[..., genes] * scale
        if not return_mean and n > 1:
            return np.moveaxis(values, 1, 0)
        return values if return_numpy else pd.DataFrame(values, columns=self.var_names[genes], index=index)

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
        """Self-normalised importance weights ``(n_samples * n_cells,)`` (sample-major) of latent draws ``zs``.

        ``log w_k = logsumexp_a [log p(z_k) + log p(x_a | z_k) - log p(x_a)] - logsumexp_a log q(z_k | x_a)``
        over up to ``max_cells`` anchor cells ``x_a`` of the same cells, ``log p(x_a)`` from
        :meth:`get_marginal_ll` and ``log p(x_a | z_k)`` the full mixture likelihood (scvi-tools rescales the
        native part). ``qz``: a numpyro ``Normal`` or ``(mean, variance)`` ``(n_cells, n_latent)``, ``None``
        computes it; ``zs``: ``(n_cells, n_latent)`` or ``(n_samples, n_cells, n_latent)``, ``None`` draws one
        per cell with ``seed`` (which also picks the anchors). ``px`` and ``n_mc_samples_per_pass`` are unused.
        """
        unknown = set(data_loader_kwargs) - {"batch_size"}
        if unknown:
            raise TypeError(f"get_importance_weights() got unknown keyword arguments {sorted(unknown)}")
        mc = (max_cells, truncation, n_mc_samples)
        return _predict.importance_weights(self, adata, indices, qz, zs, *mc, seed)

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
        """Parameters of p(x | z) (the full mixture): ``mean`` ``(n_cells, n_genes)``, for NB/ZINB ``dispersions``,
        for ZINB ``dropout``; at the posterior mean of z (``give_mean``) or one draw (``n_samples`` must be 1)."""
        if _positive_int(n_samples, "n_samples") != 1:
            raise ValueError("n_samples > 1 is not supported; call repeatedly with different seeds")
        cfg, v, ambient = self.config, self._variables, jax.numpy.asarray(self.ambient_profile)
        fn = lambda b, k: _post.likelihood_parameters(cfg, v, b, ambient, bool(give_mean), k)  # noqa: E731
        return _an.likelihood_parameters(cfg.gene_likelihood, *self._map(fn, adata, indices, batch_size, seed))

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
        """Draws of x̂ ~ p(x̂ | z) (the full mixture), z ~ q(z | x): CSR ``(n_cells, n_genes)`` for one sample,
        else dense ``(n_cells, n_genes, n_samples)`` (scvi-tools: sparse COO)."""
        if kwargs:
            raise TypeError(f"posterior_predictive_sample() got unknown keyword arguments {sorted(kwargs)}")
        n = _positive_int(n_samples, "n_samples")
        genes = _an.gene_mask(self.var_names, gene_list)
        cfg, v, ambient = self.config, self._variables, jax.numpy.asarray(self.ambient_profile)
        fn = lambda b, k: jax.numpy.moveaxis(_post.posterior_predictive(cfg, v, b, ambient, n, k), 0, -1)  # noqa: E731
        values = self._map(fn, adata, indices, batch_size, seed)[0][:, genes, :]
        return sp.csr_matrix(values[..., 0]) if n == 1 else values

    # ------------------------------------------------------------------ differential expression and abundance
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
        """Bayesian differential expression of the *native* frequencies between groups (:mod:`scar_jax.de`).

        scvi-tools' semantics and columns; ``group2=None``: each group against the rest; ``idx1``/``idx2``:
        masks, indices or ``obs`` queries; ``n_samples_overall`` posterior draws of random cells per group,
        resampled with :meth:`get_importance_weights` for ``weights="importance"``. No batch covariate:
        ``batch_correction``/``batchid*`` change nothing.
        """
        groups = {"groupby": groupby, "group1": group1, "group2": group2, "idx1": idx1, "idx2": idx2}
        stats = {"mode": mode, "delta": delta, "pseudocounts": pseudocounts, "test_mode": test_mode}
        table = {"all_stats": all_stats, "fdr_target": fdr_target, "n_samples_overall": n_samples_overall, "seed": seed}
        iw = (weights, importance_weighting_kwargs, filter_outlier_cells)
        statistics = {**stats, "cred_interval_lvls": cred_interval_lvls}
        return _predict.differential_expression(self, adata, groups, batch_size, *iw, statistics=statistics, **table)

    def get_aggregated_posterior(
        self,
        adata: anndata.AnnData | None = None,
        indices: Any = None,
        batch_size: int | None = None,
        dof: float | None = 3.0,
    ) -> Any:
        """A uniform numpyro mixture over the cells of q(z | x) (Normal, or Student-t with ``dof``), with the
        posterior standard deviation as scale (scvi-tools passes the variance)."""
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
        """Log-probability ``(n_cells, n_samples)`` of each cell's latent mean under each sample's aggregated
        posterior, a DataFrame (scvi-tools writes ``obsm["da_log_probs"]``); ``num_cells_posterior`` subsamples."""
        return _predict.differential_abundance(self, adata, sample_key, batch_size, num_cells_posterior, dof, seed)

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
        """Gene-gene correlation of posterior draws of ``rna_size_factor x phi`` (``n_samples`` per cell)."""
        draws = {"library_size": rna_size_factor, "n_samples": n_samples, "batch_size": batch_size, "seed": seed}
        samples = self.get_normalized_expression(
            adata, indices, transform_batch, return_mean=False, return_numpy=True, **draws
        )
        return _predict.feature_correlation(samples, self.var_names, correlation_type)

    # ------------------------------------------------------------------ denoising
    def get_noise_ratio(
        self,
        adata: anndata.AnnData | None = None,
        indices: Any = None,
        batch_size: int | None = None,
        *,
        calibrated: bool = False,
        n_neighbours: int = 50,
    ) -> np.ndarray:
        """Ambient fraction of each cell's counts ``(n_cells,)`` at the posterior mean of z.

        ``calibrated=True``: the empirical-Bayes noise ratio of :mod:`scar_jax.calibration` (from the genes
        each cell's ``n_neighbours`` latent neighbourhood does not express; computed over all cells of ``adata``,
        then subset), the one of the default denoising; see docs/model.md, "Calibration". It is kept on the model
        for a following ``get_denoised_counts()`` with the same data and settings.
        """
        if calibrated:
            return _predict.calibrated(self, adata, indices, batch_size, n_neighbours)[0]
        return self._decode_at_mean(*self._cells(adata, indices), batch_size)[1][:, 0]

    def get_native_frequencies(
        self, adata: anndata.AnnData | None = None, indices: Any = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Native expression frequencies ``phi`` at the posterior mean of z, ``(n_cells, n_genes)``."""
        return self._decode_at_mean(*self._cells(adata, indices), batch_size)[0]

    def _decode_at_mean(self, cells: _post.HostCells, rows: np.ndarray, batch_size) -> list[np.ndarray]:
        cfg, v = self.config, self._variables
        fn = lambda b, k: _post.decode_at_mean(cfg, v, b.x)  # noqa: E731
        return _post.map_chunks(fn, cells, rows, batch_size or 1024, self._key(0))

    @property
    def default_denoising_method(self) -> str:
        """What ``get_denoised_counts()`` does by default: ``"calibrated"`` for mRNA, ``"split"`` otherwise."""
        return "calibrated" if self.feature_type == "mRNA" else "split"

    def get_denoised_counts(
        self,
        adata: anndata.AnnData | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        *,
        method: Literal["calibrated", "split", "split_mean", "expected"] | None = None,
        indices: Any = None,
        seed: int = 0,
        return_sparse: bool | None = None,
        n_neighbours: int = 50,
        expressed_prior_odds: float = 0.1,
    ) -> np.ndarray | sp.csr_matrix:
        """Denoised counts ``(n_cells, n_genes)``; the methods are derived and compared in docs/model.md.

        ``method=None``: ``"calibrated"`` for mRNA, ``"split"`` for the other feature types (small panels).
        ``"calibrated"``: ``Binomial(x, w)`` with the empirical-Bayes native share ``w`` of
        :mod:`scar_jax.calibration` over the ``n_neighbours`` nearest cells in the latent space (all cells of
        ``adata`` in memory; ``n_samples`` unused); ``expressed_prior_odds`` (default 0.1) multiplies the prior
        odds that a gene is expressed in a neighbourhood: larger keeps more, smaller removes more.
        ``"split"``: ``Binomial(x, w)`` with the model's posterior share ``w = (1 - eps) phi / ((1 - eps) phi +
        eps a)``, median over ``n_samples`` draws of z, host draws per cell (independent of ``batch_size``).
        ``"split_mean"``: ``x * w``. ``"expected"`` (scvi-tools): ``library (1 - eps) phi`` stochastically rounded,
        which can exceed the observed count. The count-preserving ones are integers in ``[0, x]`` with zeros kept.
        ``return_sparse``: CSR; default for sparse input and a count-preserving method. ``seed``: every draw.
        """
        options = (method, indices, seed, return_sparse, n_neighbours, expressed_prior_odds)
        return _predict.denoised_counts(self, adata, n_samples, batch_size, *options)

    def write_denoised_counts(
        self,
        filename: str | Path,
        adata: anndata.AnnData | None = None,
        *,
        layer: str = "denoised",
        method: Literal["calibrated", "split"] | None = None,
        block_cells: int = _backed.DEFAULT_BLOCK_CELLS,
        batch_size: int | None = None,
        n_samples: int = 1,
        seed: int = 0,
        n_neighbours: int = 50,
        expressed_prior_odds: float = 0.1,
        overwrite: bool = False,
        progress_bar: bool = True,
    ) -> None:
        """Write ``get_denoised_counts(adata, method=method, ...)`` (same arguments, same result) to the CSR
        ``layers[layer]`` of a new ``.h5ad`` (the cells' ``obs`` and ``var``, no ``X``), ``block_cells`` cells at a
        time, atomically (a temporary name, renamed when complete). For data larger than memory
        (:func:`scar_jax.backed.read_backed`); ``"calibrated"`` holds the calibration's per-cell state and shares."""
        options = (batch_size, n_samples, seed, n_neighbours, expressed_prior_odds, overwrite, progress_bar)
        _predict.write_denoised_counts(self, filename, adata, layer, method, block_cells, *options)

    @staticmethod
    def get_ambient_profile(
        adata: anndata.AnnData,
        raw_adata: anndata.AnnData,
        prob: float | None = None,
        min_raw_counts: int = 2,
        iterations: int = 3,
        n_batch: int = 1,
        sample: int = 50000,
        *,
        batch_key: str | None = None,
        seed: int = 0,
        prior_counts: float | Literal["auto"] = "auto",
    ) -> np.ndarray:
        """The ``(n_genes, n_profiles)`` ambient profile from raw droplets; writes ``adata.varm["ambient_profile"]``.

        Cell-free droplets (:mod:`scar_jax.ambient`): ``prob=None``, those below the steepest fall of the
        barcode-rank curve; ``prob`` in ``[0, 1)``, scvi-tools' EmptyDrops-like rule ``log p_j >= n_genes
        log(prob)`` (``0``: every droplet with ``>= min_raw_counts`` counts; ``n_batch`` sets the row chunks).
        The profile is a Dirichlet posterior mean with a Good-Turing prior for unseen genes (``prior_counts``
        its strength; ``0`` with ``prob=0.995``: scvi-tools' profile). Genes matched by name; with a batch key
        (default: the setup's, if ``raw_adata.obs`` has it) one profile per batch, in the setup's order.
        """
        options = {"prob": prob, "min_raw_counts": min_raw_counts, "iterations": iterations, "sample": sample}
        return _predict.ambient_profile(
            adata, raw_adata, n_batch, batch_key, **options, seed=seed, prior_counts=prior_counts
        )

    # ------------------------------------------------------------------ feature barcodes
    def get_bayes_factors(
        self,
        adata: anndata.AnnData | None = None,
        indices: Any = None,
        batch_size: int | None = None,
        adjust: Literal["micro", "global"] | None = "micro",
        log: bool = False,
    ) -> np.ndarray:
        """``(n_cells, n_features)`` Bayes factors (natural log with ``log``) that a count exceeds the ambient:
        ``P(X <= x) / P(X = x)``, ``X ~ Poisson(N * noise_ratio * a + adjustment)`` (:mod:`scar_jax.features`)."""
        return _predict.bayes_factors(self, *self._cells(adata, indices), batch_size, adjust, log)

    def assign_features(
        self,
        adata: anndata.AnnData | None = None,
        cutoff: float = 3.0,
        moi: int | None = None,
        adjust: Literal["micro", "global"] | None = "micro",
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Features (guides, hashtags, CMOs) of each cell from their Bayes factors: ``moi=None``, the original's
        rule (those tied at the maximum, if >= ``cutoff``); ``moi=k``, up to ``k`` with factor >= ``cutoff``.
        A DataFrame indexed by ``obs_names``: the features (comma-joined), their number and total count."""
        return _predict.assign_features(self, adata, cutoff, moi, adjust, batch_size)

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        **anndata_write_kwargs: Any,
    ) -> None:
        """Save the model atomically to ``dir_path`` (with ``save_anndata``, the AnnData too); unlike scvi-tools
        with the optimizer state, step and history, so training can resume."""
        _persist.save(self, dir_path, prefix, overwrite, save_anndata)

    @classmethod
    def load(
        cls, dir_path: str, adata: anndata.AnnData | None = None, prefix: str | None = None, **kwargs: Any
    ) -> SCAR:
        """Load a model saved by :meth:`save`; ``adata`` must have the same genes in the same order."""
        if kwargs:
            raise TypeError(f"load() got unknown keyword arguments {sorted(kwargs)}")
        return cls._from_parts(**_persist.load_parts(dir_path, adata, prefix))

    # ------------------------------------------------------------------ setup record and devices (scar_jax.compat)
    def view_anndata_setup(self, adata: anndata.AnnData | None = None, hide_state_registries: bool = False) -> None:
        """Print what ``setup_anndata`` recorded (layer, keys, categories) for ``adata`` (default: the model's)."""
        print(_compat.setup_table(self.spec if adata is None else _data.read_spec(adata)))

    def view_setup_args(self) -> None:
        """Print the ``setup_anndata`` arguments of the model."""
        print(_compat.setup_table(self.spec))

    def get_setup_arg(self, setup_arg: str) -> Any:
        """One ``setup_anndata`` argument (``layer``, ``batch_key``, ``labels_key``, ``size_factor_key``)."""
        return _compat.get_setup_arg(self.spec, setup_arg)

    def get_state_registry(self, registry_key: str) -> dict[str, Any]:
        """The categories recorded for ``"batch"`` or ``"labels"`` (scvi-tools' state registry, simplified)."""
        return _compat.get_state_registry(self.spec, registry_key)

    def get_from_registry(self, adata: anndata.AnnData, registry_key: str) -> np.ndarray:
        """What the model reads for ``"X"``, ``"batch"``/``"labels"`` (codes) or ``"size_factor"``."""
        return _compat.get_from_registry(self.spec, adata, registry_key)

    def data_registry(self, registry_key: str | None = None) -> Any:
        """:meth:`get_from_registry` of the model's AnnData; without a key, where each field is read from
        (``{"X": {"attr_name": "X" | "layers", "attr_key": layer}, "batch": {"attr_name": "obs", ...}, ...}``)."""
        if registry_key is not None:
            return self.get_from_registry(self.adata, registry_key)
        return _compat.registry_fields(self.spec)

    def transfer_fields(self, adata: anndata.AnnData, extend_categories: bool = False, **kwargs: Any) -> None:
        """Set ``adata`` up as the model's AnnData is (genes, layer, keys, the model's categories) and register it
        with the model; only ``adata.uns["_scar_jax"]`` is written; ``extend_categories=True``: ``ValueError``."""
        if kwargs:
            raise TypeError(f"transfer_fields() got unknown keyword arguments {sorted(kwargs)}")
        _compat.transfer_fields(self.spec, self.var_names, adata, self._records, extend_categories)

    def update_setup_method_args(self, setup_method_args: dict[str, Any]) -> None:
        """Change recorded ``setup_anndata`` arguments (``layer``, ``*_key``), e.g. after renaming a column; the
        model's AnnData must have the new fields with the same categories."""
        self.spec = _compat.updated_spec(self.spec, self.var_names, self.adata, setup_method_args)

    @staticmethod
    def load_registry(dir_path: str, prefix: str | None = None) -> dict[str, Any]:
        """The setup and model record of a save, without weights or data (:func:`scar_jax.compat.load_registry`)."""
        return _compat.load_registry(dir_path, prefix)

    @classmethod
    def register_manager(cls, adata_manager: anndata.AnnData | tuple[anndata.AnnData, _data.AnnDataSpec]) -> None:
        """Register an AnnData's setup record (the AnnData, or ``(adata, AnnDataSpec)``) with the class."""
        _compat.register_manager(adata_manager)

    def deregister_manager(self, adata: anndata.AnnData | None = None) -> None:
        """Forget the setup record of ``adata`` (class and model); ``None``: all but the model's own."""
        _compat.deregister(self._records, adata, self.adata)

    def get_anndata_manager(self, adata: anndata.AnnData, required: bool = False) -> _data.AnnDataSpec | None:
        """The setup record the model uses for ``adata`` (its own, or a compatible registered one); ``None`` or,
        when ``required``, ``ValueError``."""
        return _compat.find_record(self.spec, self.adata, self._records, adata, required)

    @property
    def device(self) -> jax.Device:
        """The JAX device holding the model's parameters."""
        return next(iter(jax.tree.leaves(self._variables)[0].devices()))

    def to_device(self, device: str | int | jax.Device) -> None:
        """Move the parameters to a ``jax.Device``, a platform (``"cpu"``, ``"cuda:1"``) or a device index."""
        self._variables = jax.device_put(self._variables, _compat.parse_device(device))

    # ------------------------------------------------------------------ scvi-tools interchange (needs torch)
    @classmethod
    def from_scvi_tools(
        cls, dir_path: str, adata: anndata.AnnData | None = None, prefix: str | None = None, *, seed: int = 0
    ) -> SCAR:
        """A model with every weight of an ``scvi.external.SCAR.save`` (``model.pt``); needs PyTorch."""
        from . import scvi_io

        return scvi_io.from_scvi_tools(cls, dir_path, adata, prefix, seed=seed)

    def export_scvi_tools(
        self, dir_path: str, prefix: str | None = None, overwrite: bool = False, save_anndata: bool = False
    ) -> None:
        """Write a directory that ``scvi.external.SCAR.load(dir_path, adata)`` accepts (needs scvi-tools)."""
        from . import scvi_io

        scvi_io.export_scvi_tools(self, dir_path, prefix, overwrite, save_anndata)

    @classmethod
    def convert_legacy_save(
        cls,
        dir_path: str,
        output_dir_path: str,
        overwrite: bool = False,
        prefix: str | None = None,
        adata: anndata.AnnData | None = None,
    ) -> None:
        """Convert a scvi-tools (PyTorch) save into scar-jax's format, which ``SCAR.load`` reads without torch."""
        from . import scvi_io

        scvi_io.convert_legacy_save(cls, dir_path, output_dir_path, overwrite, prefix, adata)

    @property
    def summary_string(self) -> str:
        """scvi-tools' one-paragraph description of the architecture and training status (the ``repr``)."""
        return _compat.summary_string(self.config, self.is_trained)

    def __repr__(self) -> str:
        return self.summary_string


_arguments.validate_methods(SCAR)  # numeric arguments of every public method: scar_jax/arguments.py
