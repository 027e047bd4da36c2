"""``SCAR``: the scvi-tools ``scvi.external.SCAR`` API over the functional core.

The class validates AnnData, moves arrays, loops over chunks and assembles results; every formula is
in :mod:`scar_jax.vae`, :mod:`scar_jax.likelihoods` and :mod:`scar_jax.posterior`.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from pathlib import Path
from typing import Any, Literal

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import ambient as _ambient
from . import analysis as _analysis
from . import backed as _backed
from . import data as _data
from . import features as _features
from . import io as _io
from . import posterior as _post
from . import setup_record as _setup
from . import train as _train
from .calibration import calibrated_split
from .counts import to_device
from .vae import SCARConfig, init_variables

PLAN_KWARGS = {"lr", "weight_decay", "eps", "n_epochs_kl_warmup", "max_kl_weight", "min_kl_weight", "optimizer"}
TRAINER_KWARGS = {
    "early_stopping_monitor",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "enable_progress_bar",
    "scan_unroll",
    "block_cells",
}


_select_device = _setup.select_device
_select_devices = _setup.select_devices
_positive_int = _data.positive_int


class SCAR:
    """Ambient RNA removal (scAR, Sheng et al. 2022) in JAX, with the ``scvi.external.SCAR`` API.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`, raw counts ``(n_cells, n_genes)``.
    ambient_profile
        ``None`` (mean profile of the cells), a key of ``adata.varm``/``adata.var``, an array
        ``(n_genes,)``/``(n_genes, n_batches)`` or a DataFrame indexed by gene. Normalised to sum 1
        with a warning if it does not.
    n_hidden, n_latent, n_layers, dropout_rate, gene_likelihood, latent_distribution, scale_activation, sparsity
        As in scvi-tools (defaults 150, 15, 2, 0.0, ``"b"``, ``"normal"``, ``"softplus_sp"``, 0.9).
    feature_type
        ``"mRNA"`` (default), ``"ADT"``, ``"sgRNA"``, ``"tag"``, ``"CMO"`` or ``"ATAC"`` (the original
        scAR's feature types); sgRNA, tag and CMO force ``sparsity=1`` as the original does. Feature
        barcodes are assigned with :meth:`get_bayes_factors` and :meth:`assign_features`.
    seed
        Seed of every random draw of this model (initialisation, split, minibatches, sampling).
    matmul_precision
        Beyond scvi-tools: ``"float32"`` (default; true float32 on every backend, where JAX would use TF32
        on recent NVIDIA GPUs), or ``"tensorfloat32"`` / ``"bfloat16"`` for faster Dense layers on GPUs
        (inputs rounded, float32 accumulation; likelihoods stay float32; no effect on CPU). The ELBO change
        is measured in ``benchmarks/scale.py --precision`` (``benchmarks/RESULTS.md``).
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
        self.feature_type = _features.check_feature_type(feature_type)
        sparsity = _features.FORCED_SPARSITY.get(self.feature_type, sparsity)  # as the original scAR
        self.spec = _data.read_spec(adata)
        self.config = SCARConfig(
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
        self.adata = adata
        self.var_names = np.asarray(adata.var_names).astype(str)
        cells = self._read_cells(adata)
        self.ambient_profile = _data.resolve_ambient_profile(adata, ambient_profile, self.spec, cells.gene_totals)
        self.seed = int(seed)
        root = jax.random.key(self.seed)
        init_key, self._train_key, self._predict_key = jax.random.split(root, 3)
        self._net = self.config.make_net()
        self._variables = init_variables(self._net, init_key, self.config.n_genes)
        self._state: _train.TrainState | None = None
        self.is_trained = False
        self._calibration_cache = None  # the last calibration (see _calibrated)
        self.history_rows: list[dict[str, float]] = []
        self.train_indices = self.validation_indices = self.test_indices = np.zeros(0, np.int64)
        self.training_time_s = 0.0

    # ------------------------------------------------------------------ setup
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
        """Validate ``adata`` and record the setup in ``adata.uns["_scar_jax"]`` (the only field written).

        Unlike scvi-tools, no ``obs`` columns are added and ``X`` is not copied.
        """
        if kwargs:
            raise TypeError(f"setup_anndata() got unknown keyword arguments {sorted(kwargs)}")
        _data.setup_anndata(adata, batch_key, labels_key, layer, size_factor_key)

    # ------------------------------------------------------------------ training
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
        """Train the model (scvi-tools arguments and defaults).

        ``max_epochs=None`` uses ``min(round(20000 / n_cells * 400), 400)``. ``plan_kwargs`` accepts
        ``lr`` (1e-3), ``weight_decay`` (1e-6), ``eps`` (0.01), ``n_epochs_kl_warmup`` (400),
        ``max_kl_weight`` (1), ``min_kl_weight`` (0). Extra keywords: ``early_stopping_monitor``
        (``"elbo_validation"``), ``early_stopping_patience`` (45), ``early_stopping_min_delta`` (0),
        ``enable_progress_bar`` (True), and beyond scvi-tools ``scan_unroll`` (1: optimizer steps per
        iteration of the compiled epoch's loop; the same arithmetic, measured in ``benchmarks/scale.py``)
        and ``block_cells`` (None: sparse counts in memory stay resident on the device, counts on disk
        (:func:`scar_jax.backed.read_backed`) are streamed in blocks spanning about 65,536 rows; an int
        streams blocks of about that many rows, from memory too, e.g. when the device cannot hold the data;
        see :mod:`scar_jax.backed` for the block shuffling).
        Training data stay on the device, and each epoch is one
        compiled call; ``load_sparse_tensor`` is accepted for compatibility (sparse input is always
        kept sparse on the device and densified per minibatch). Training again continues from the
        current weights with a fresh optimizer, as in scvi-tools.

        Small data: with fewer training cells than ``batch_size`` each epoch is one smaller minibatch; a
        last minibatch of 1 or 2 cells is moved to validation (as scvi-tools does). ``ValueError`` when
        fewer than 3 training cells remain or ``batch_size < 2``: BatchNorm cannot train on one cell.

        ``accelerator`` (``"auto"``, ``"cpu"``, ``"gpu"``, ``"tpu"``) and ``devices`` follow PyTorch Lightning:
        ``"auto"`` trains on one device, an int ``n`` on the first ``n`` (``-1``: all), a list on those
        indices. With several devices training is data parallel through JAX sharding: one compiled epoch,
        each minibatch split over the devices, parameters and data replicated (so the data must fit on
        each device), gradients and BatchNorm moments all-reduced; the result equals one-device training
        up to float32 summation order. ``batch_size`` must be a multiple of the number of devices. On
        several hosts, call ``jax.distributed.initialize()`` first (README).

        Beyond scvi-tools: with ``checkpoint_dir``, the full training state (parameters, optimizer,
        step, history) is saved atomically every ``checkpoint_every`` epochs and at the end; calling
        ``train`` again with the same ``checkpoint_dir`` (e.g. after a crash) resumes from the last
        checkpoint and gives the same result as an uninterrupted run. If the loss or the parameters
        become NaN or infinite, training stops with ``FloatingPointError`` naming the epoch, and the
        model keeps the parameters of the last good epoch.
        """
        if datamodule is not None:
            raise ValueError("datamodule is not supported: scar-jax trains from the AnnData given to SCAR()")
        plan = {**(plan_config or {}), **(plan_kwargs or {})}
        trainer = {**(trainer_config or {}), **trainer_kwargs}
        for name, given, allowed in (("plan_kwargs", plan, PLAN_KWARGS), ("trainer keywords", trainer, TRAINER_KWARGS)):
            unknown = set(given) - allowed
            if unknown:
                raise TypeError(f"train(): unsupported {name} {sorted(unknown)}; supported: {sorted(allowed)}")
        if str(plan.get("optimizer", "Adam")) != "Adam":
            raise ValueError("plan_kwargs['optimizer'] must be 'Adam' (the only optimizer scvi-tools SCAR uses)")
        split = {"train_size": train_size, "validation_size": validation_size, **(datasplitter_kwargs or {})}
        batch_size = _positive_int(batch_size, "batch_size")
        n_cells = self.adata.n_obs
        if max_epochs is None:
            max_epochs = _train.max_epochs_heuristic(n_cells)
        max_epochs = _positive_int(max_epochs, "max_epochs")
        chosen = _select_devices(accelerator, devices)
        device = chosen[0]
        if len(chosen) > 1 and batch_size % len(chosen):
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the number of devices ({len(chosen)}) for data "
                "parallel training"
            )
        # one device: arrays on it; several: replicated over them (each minibatch is split across them)
        placement = (
            device
            if len(chosen) == 1
            else jax.sharding.NamedSharding(_train.data_parallel_mesh(tuple(chosen)), jax.sharding.PartitionSpec())
        )
        train_idx, val_idx, test_idx = _train.split_indices(
            n_cells, split["train_size"], split["validation_size"], shuffle_set_split, batch_size, self.seed
        )
        cells = self._read_cells(self.adata)
        block_cells = trainer.get("block_cells")
        streamed = block_cells is not None or isinstance(cells.x, _backed.BackedCounts)
        if streamed and not sp.issparse(cells.x) and not isinstance(cells.x, _backed.BackedCounts):
            raise ValueError(
                "block_cells streams sparse counts by blocks of cells; the counts are dense (keep them "
                "resident: leave block_cells=None, or make them scipy.sparse.csr_matrix)"
            )
        tx, train_epoch, evaluate = _train.compiled_training(
            self.config,
            int(batch_size),
            float(plan.get("lr", 1e-3)),
            float(plan.get("eps", 0.01)),
            float(plan.get("weight_decay", 1e-6)),
            tuple(chosen) if len(chosen) > 1 else None,
            _positive_int(trainer.get("scan_unroll", 1), "scan_unroll"),
        )
        if streamed:  # out of core: blocks of cells read (from disk) and placed one at a time
            block = _positive_int(_backed.DEFAULT_BLOCK_CELLS if block_cells is None else block_cells, "block_cells")
            x = cells.x if isinstance(cells.x, _backed.BackedCounts) else sp.csr_matrix(cells.x)
            train_epoch, evaluate = _backed.streamed_training(
                train_epoch,
                evaluate,
                x,
                cells.library,
                cells.batch_index,
                train_idx,
                val_idx,
                block,
                cells.max_count,
                placement,
                int(batch_size),
            )
            resident, train_rows, validation_rows = None, train_idx, np.empty(len(val_idx))
        else:
            resident = _train.CellData(
                to_device(cells.x, placement, cells.max_count),
                jax.device_put(cells.library, placement),
                jax.device_put(cells.batch_index, placement),
            )
            train_rows = jax.device_put(jnp.asarray(train_idx, jnp.int32), placement)
            validation_rows = jax.device_put(jnp.asarray(val_idx, jnp.int32), placement)
        device = placement
        # The epoch donates its state: hand it copies so the model's own arrays and key stay valid.
        variables = jax.tree.map(lambda a: jnp.array(a, copy=True), jax.device_put(self._variables, device))
        key = jax.random.wrap_key_data(jnp.array(jax.random.key_data(self._train_key), copy=True))
        # committed to the device like the epoch's outputs, so that the second epoch reuses the first one's
        # compilation (uncommitted step and optimizer counters would compile the epoch a second time)
        state = jax.device_put(_train.init_train_state(variables, tx, key), device)
        previous_rows: list[dict[str, float]] = []
        if checkpoint_dir is not None and _io.has_model(checkpoint_dir):
            state, previous_rows = self._resume(checkpoint_dir, state, (train_idx, val_idx, test_idx))
            state = jax.device_put(state, device)
        on_epoch_end = None
        if checkpoint_dir is not None:
            every = _positive_int(checkpoint_every, "checkpoint_every")
            split_rows = (train_idx, val_idx, test_idx)

            def on_epoch_end(epoch, state, rows):
                if (epoch + 1) % every == 0 or epoch + 1 == max_epochs:
                    self._write(checkpoint_dir, state, rows, split_rows, is_trained=True, overwrite=True)

        stopper = None
        if early_stopping:
            stopper = _train.EarlyStopping(
                trainer.get("early_stopping_monitor", "elbo_validation"),
                int(trainer.get("early_stopping_patience", 45)),
                float(trainer.get("early_stopping_min_delta", 0.0)),
            )
        start = time.perf_counter()
        try:
            state, rows = _train.fit(
                train_epoch,
                evaluate,
                state,
                resident,
                train_rows,
                validation_rows,
                jax.device_put(jnp.asarray(self.ambient_profile), device),
                max_epochs=int(max_epochs),
                n_epochs_kl_warmup=plan.get("n_epochs_kl_warmup", 400),
                max_kl_weight=float(plan.get("max_kl_weight", 1.0)),
                min_kl_weight=float(plan.get("min_kl_weight", 0.0)),
                early_stopping=stopper,
                progress_bar=bool(trainer.get("enable_progress_bar", True)),
                first_epoch=len(previous_rows),
                previous_rows=previous_rows,
                on_epoch_end=on_epoch_end,
            )
        except _train.TrainingDiverged as err:
            if err.rows:  # keep the last good epoch's parameters
                self._state, self._variables, self.history_rows = err.state, err.state.variables, err.rows
                self.train_indices, self.validation_indices, self.test_indices = train_idx, val_idx, test_idx
                self.is_trained = True
            raise
        jax.block_until_ready(state.params)
        self.training_time_s = time.perf_counter() - start
        if len(chosen) > 1:  # inference runs on one device
            state = jax.device_put(state, chosen[0])
        self._state, self._variables = state, state.variables
        self._calibration_cache = None  # for the earlier parameters (the key would not match; frees the memory)
        self.history_rows = rows
        self.train_indices, self.validation_indices, self.test_indices = train_idx, val_idx, test_idx
        self.is_trained = True

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics, one DataFrame per name (scvi-tools names; ``elbo_*`` is the negative ELBO)."""
        if not self.history_rows:
            return {}
        frame = pd.DataFrame(self.history_rows).set_index("epoch")
        return {name: frame[[name]] for name in frame.columns}

    # ------------------------------------------------------------------ inference helpers
    def _read_cells(self, adata: anndata.AnnData) -> _post.HostCells:
        """Validated counts, library and batch index of ``adata``; for counts on disk the validating pass is
        made once per AnnData and remembered (a file opened read-only does not change)."""
        x = _data.get_counts(adata, self.spec)
        if isinstance(x, _backed.BackedCounts):
            cached = getattr(self, "_backed_cells", None)
            if cached is not None and cached[0]() is adata and cached[1] == self.spec:
                return cached[2]
            cells = _data.read_cells(adata, self.spec, self.config.gene_likelihood)
            self._backed_cells = (weakref.ref(adata), self.spec, cells)
            return cells
        return _data.read_cells(adata, self.spec, self.config.gene_likelihood)

    def _cells(self, adata: anndata.AnnData | None, indices: Any) -> tuple[_post.HostCells, np.ndarray]:
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet; call model.train() first")
        adata = self.adata if adata is None else adata
        if adata is not self.adata:
            _data.check_genes(adata, self.var_names)
        if indices is None:
            return self._read_cells(adata), np.arange(adata.n_obs)
        rows = np.asarray(indices)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
            raise ValueError("indices must be a non-empty 1-d sequence of integer cell positions")
        if rows.min() < -adata.n_obs or rows.max() >= adata.n_obs:
            raise ValueError(f"indices out of range for {adata.n_obs} cells")
        rows = rows % adata.n_obs
        if isinstance(_data.get_counts(adata, self.spec), _backed.BackedCounts):
            return self._read_cells(adata), rows  # validated once per file (cached)
        # in memory: validate and sum only the selected cells (their results do not depend on the others)
        return _data.read_cells(adata, self.spec, self.config.gene_likelihood, rows), rows

    def _map(self, fn, adata, indices, batch_size, seed: int = 0, sparse_output: bool = False) -> list:
        cells, rows = self._cells(adata, indices)
        key = jax.random.fold_in(self._predict_key, seed)
        return _post.map_chunks(fn, cells, rows, batch_size or 1024, key, sparse_output)

    # ------------------------------------------------------------------ latent space
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
        """Latent representation ``(n_cells, n_latent)`` (evaluation mode).

        ``return_dist``: the mean and variance of q(z | x). Otherwise, for ``latent_distribution="ln"``
        the Monte Carlo mean of softmax(z) over ``mc_samples`` draws (``give_mean=True``) or one draw of
        softmax(z); for ``"normal"`` the mean (``give_mean=True``) or one draw of z.
        """
        if dataloader is not None:
            raise ValueError("dataloader is not supported; pass adata and indices")
        cfg, v = self.config, self._variables

        def latent(batch, keys):
            if return_dist:
                return _post.encode(cfg, v, batch.x)
            if cfg.latent_distribution == "ln":
                return _post.logistic_normal_mean(cfg, v, batch.x, keys, mc_samples if give_mean else 1)
            z_mean, z_var = _post.encode(cfg, v, batch.x)
            if give_mean:
                return z_mean
            return z_mean + jnp.sqrt(z_var) * jax.vmap(lambda k: jax.random.normal(k, (cfg.n_latent,)))(keys)

        out = self._map(latent, adata, indices, batch_size, seed)
        return (out[0], out[1]) if return_dist else out[0]

    # ------------------------------------------------------------------ ELBO
    def _elbo_terms(self, adata, indices, batch_size, seed) -> tuple[np.ndarray, np.ndarray]:
        cfg, v, ambient = self.config, self._variables, jnp.asarray(self.ambient_profile)
        rec, kl = self._map(lambda b, k: _post.elbo_terms(cfg, v, b, ambient, k), adata, indices, batch_size, seed)
        return rec, kl

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
        """Evidence lower bound per cell, ``-(reconstruction NLL + KL)`` with one z draw; higher is better."""
        if dataloader is not None:
            raise ValueError("dataloader is not supported; pass adata and indices")
        rec, kl = self._elbo_terms(adata, indices, batch_size, seed)
        elbo = -(rec + kl)
        return float(elbo.mean()) if return_mean else elbo

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
        if dataloader is not None:
            raise ValueError("dataloader is not supported; pass adata and indices")
        rec, _ = self._elbo_terms(adata, indices, batch_size, seed)
        return {"reconstruction_loss": float(-rec.mean()) if return_mean else -rec}

    # ------------------------------------------------------------------ likelihood, expression, sampling, DE/DA
    # (functions of the model in scar_jax/analysis.py)
    get_marginal_ll = _analysis.get_marginal_ll
    get_latent_library_size = _analysis.get_latent_library_size
    get_normalized_expression = _analysis.get_normalized_expression
    _importance_resampled_expression = _analysis._importance_resampled_expression
    get_importance_weights = _analysis.get_importance_weights
    _anchor_log_likelihood = _analysis._anchor_log_likelihood
    get_likelihood_parameters = _analysis.get_likelihood_parameters
    posterior_predictive_sample = _analysis.posterior_predictive_sample
    differential_expression = _analysis.differential_expression
    get_aggregated_posterior = _analysis.get_aggregated_posterior
    differential_abundance = _analysis.differential_abundance
    get_feature_correlation_matrix = _analysis.get_feature_correlation_matrix
    _gene_mask = _analysis._gene_mask
    _check_transform_batch = _analysis._check_transform_batch

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
        """Noise ratio (ambient fraction of each cell's counts) at the posterior mean of z, ``(n_cells,)``.

        ``calibrated=True``: the empirical-Bayes noise ratio of :mod:`scar_jax.calibration` (estimated
        from the genes that are not expressed in each cell's ``n_neighbours`` latent neighbourhood,
        computed over all cells of ``adata``, then subset by ``indices``). Use it at low contamination
        (a fraction of a percent to a few percent), where the model's own noise ratio is several times
        too high; it is the noise ratio of the default denoising (``get_denoised_counts()`` for mRNA). With one
        ambient profile per batch each cell's ambient counts follow its batch's profile. The calibration is
        kept on the model: a following ``get_denoised_counts()`` with the same data and settings reuses it.
        """
        if calibrated:
            return self._calibrated(adata, indices, batch_size, n_neighbours)[0]
        return self._decode_at_mean(adata, indices, batch_size)[1][:, 0]

    def get_native_frequencies(
        self, adata: anndata.AnnData | None = None, indices: Any = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Native expression frequencies ``phi`` at the posterior mean of z, ``(n_cells, n_genes)``."""
        return self._decode_at_mean(adata, indices, batch_size)[0]

    def _decode_at_mean(self, adata, indices, batch_size) -> list[np.ndarray]:
        cfg, v = self.config, self._variables
        return self._map(lambda b, k: _post.decode_at_mean(cfg, v, b.x), adata, indices, batch_size)

    def _calibrated(
        self, adata, indices, batch_size, n_neighbours: int, expressed_prior_odds: float = 0.1
    ) -> tuple[np.ndarray, np.ndarray, _post.HostCells, np.ndarray]:
        """Calibrated noise ratio ``(m,)`` and native share ``(m, G)`` of the selected rows, the cells and rows.

        The last calibration is kept on the model, keyed on the trained parameters (by identity), a digest of
        the counts, profile and batches (:func:`scar_jax.calibration.calibration_digest`), ``n_neighbours`` and
        ``expressed_prior_odds``: ``get_noise_ratio(calibrated=True)`` then ``get_denoised_counts()`` compute it
        once. It holds the noise ratio and the share at the stored counts (about 12 bytes per stored count)."""
        from . import calibration as _calibration

        cells, rows = self._cells(adata, indices)
        n_neighbours = _positive_int(n_neighbours, "n_neighbours")
        target = self.adata if adata is None else adata
        profile = np.asarray(self.ambient_profile)
        batches = _data.batch_index(target, self.spec) if profile.shape[0] > 1 else None
        key = (
            _calibration.calibration_digest(target, self.spec.layer, profile, batches),
            n_neighbours,
            float(expressed_prior_odds),
        )
        cached = getattr(self, "_calibration_cache", None)
        if key[0] is not None and cached is not None and cached[0] is self._variables and cached[1] == key:
            eps, share = cached[2], cached[3]
        else:
            eps, share = _calibration.calibrate_model(
                self,
                adata,
                n_neighbours=n_neighbours,
                expressed_prior_odds=expressed_prior_odds,
                batch_size=batch_size,
                share_at="observed",
            )
            self._calibration_cache = None if key[0] is None else (self._variables, key, eps, share)
        return eps[rows], share[rows], cells, rows

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
        """Denoised counts ``(n_cells, n_genes)``.

        Parameters
        ----------
        method
            Default ``None``: ``"calibrated"`` for ``feature_type="mRNA"`` (the model's default), ``"split"``
            for the other feature types, whose panels are too small for the calibration to find features
            a neighbourhood does not express (with 8 ADTs it removes nothing) and whose guides/tags are
            assigned from the model itself (``"calibrated"`` can still be asked for: on 87 ADTs with
            isotype controls it keeps more of the other ADTs, README).

            ``"calibrated"`` (count-preserving): ``denoised ~ Binomial(x, w)`` with the native
            share ``w`` of :mod:`scar_jax.calibration`, an empirical-Bayes posterior on the cell's
            ``n_neighbours`` nearest cells in the latent space (cosine:
            :func:`scar_jax.calibration.knn_indices`; computed over all cells of ``adata``): a gene the
            neighbourhood expresses keeps its counts, a gene it does not express loses them all, and the
            noise ratio is re-estimated from the latter (``get_noise_ratio(calibrated=True)``). Integer,
            ``0 <= denoised <= raw``, zeros stay zero. **Why it is the default here** (scvi-tools has
            ``"expected"``; earlier versions of scar-jax ``"split"``): it is at least as close to the truth
            in every regime measured. Simulated, 2,000 cells x 1,000 genes (``benchmarks/denoising_quality.py``):
            at 20% contamination 82.1% of the ambient counts removed and 95.5% of the native kept (oracle
            82.4% / 95.5%, ``"split"`` 74.3% / 96.3%), at 5% 71.5% / 98.5% (oracle 72.0% / 98.5%, split
            69.2% / 98.5%). Low contamination (two-species mixture, 0.2-2%, README): >= 99.5% of the counts
            of expressed genes kept and >= 90% of the contamination removed (99.57% / 90.4% and 99.57% / 91.5%
            at 300 x 20,000, seeds 0 / 1), where the model's noise ratio is several times too high and its
            sparse native frequencies zero out expressed genes, so ``"split"`` keeps only 96%. Real data
            (README): more real expression kept inside the lineages on PBMC and of the non-isotype
            antibodies on CITE-seq (83.5% against 73.8%), a little less removed outside (PBMC MNP markers
            87% against 97%; isotype controls 93.7% against 100%). Its cost: it needs all cells of
            ``adata`` in memory at once (on-disk counts are read whole), exact neighbours up to 50,000
            cells (approximate above), and up to 50 rounds over cells x genes in one compiled JAX loop
            (float32, the default device; 2.4-5.4 s in all for 300 x 20,000 on 2 CPU cores, 8.0 s with the NumPy
            loop of earlier versions; ``benchmarks/calibration_speed.py``). The last calibration is kept on
            the model (about 12 bytes per stored count), so ``get_noise_ratio(calibrated=True)`` and this
            method with the same data and settings compute it once. For atlases, on-disk
            data or speed, use ``"split"`` (or :meth:`write_denoised_counts`, which streams it); with
            neighbourhoods that do not separate cell types (an under-trained model) the calibrated noise
            ratio collapses towards 1, and a warning says so. ``n_samples`` is not used (one seeded draw).
            With one ambient profile per batch, each cell's ambient counts follow its own batch's profile
            (a neighbourhood's expected ambient counts mix them). For sparse counts the memory is that of
            sparse matrices (the counts, their neighbourhood sums and the shares at the observed entries;
            20 bytes per stored neighbourhood sum on the device, about 44 in all on a CPU) plus chunks and
            blocks of about 1M entries: 5.3 GB for 100,000 cells x 2,000 genes (README).

            ``"split"`` (count-preserving, the model's own posterior): each observed count is native with
            its posterior share ``w = (1 - eps) phi / ((1 - eps) phi + eps a)`` (the cell's own batch
            profile ``a``), ``denoised ~ Binomial(x, w)``, median over ``n_samples`` draws of z. Integer,
            ``0 <= denoised <= raw``, and zeros stay zero. The shares are computed on the device, the
            binomial draws on the host with one NumPy stream per cell
            (:func:`scar_jax.posterior.binomial_split`): results do not depend on ``batch_size`` or on the
            other cells, and it scales to atlases. ``"split_mean"``: its posterior mean ``x * w`` (not
            integer). ``"expected"``: the scvi-tools reference, ``library * (1 - eps) * phi``
            stochastically rounded, median over draws; it can exceed the observed count and be positive
            where nothing was observed ("artificial counts"), which is why it is not the default here.
        n_neighbours
            ``"calibrated"`` only: the neighbourhood size (default 50; 30 is enough for ~100 cells).
        expressed_prior_odds
            ``"calibrated"`` only, the removal/retention knob (default 0.1; 1 is the derived posterior):
            the prior odds that a gene is expressed in a neighbourhood are multiplied by it. The default
            was chosen on measurements (``scar_jax.calibration.DEFAULT_EXPRESSED_PRIOR_ODDS``): on the
            simulated mixtures it removes 91-99% of the contamination where 1 removes 78-97%, keeping
            >= 99.5% of real expression at both. Larger keeps
            more real expression (fewer expressed genes are called off and lose their counts) and
            removes less contamination; smaller removes more and keeps less; the share is monotone in
            it. ``benchmarks/low_contamination.py --knob`` prints the trade-off on simulated data.
        return_sparse
            CSR output; default: when the input counts are sparse and the method is count-preserving
            (``"calibrated"``, ``"split"``, ``"split_mean"``: their non-zeros are a subset of the input's).
        seed
            Seed of the draws of z and of the binomial split / rounding.
        """
        n_samples = _positive_int(n_samples, "n_samples")
        method = self.default_denoising_method if method is None else method
        if method not in ("split", "split_mean", "expected", "calibrated"):
            raise ValueError(f"method must be 'split', 'split_mean', 'expected' or 'calibrated', got {method!r}")
        if method == "calibrated":
            _, share, cells, rows = self._calibrated(adata, indices, batch_size, n_neighbours, expressed_prior_odds)
            return calibrated_split(cells.x[rows], share, seed, return_sparse)
        cfg, v, ambient = self.config, self._variables, jnp.asarray(self.ambient_profile)
        if return_sparse is None:
            counts = self.adata.X if adata is None else adata.X
            counts = (
                counts if self.spec.layer is None else (self.adata if adata is None else adata).layers[self.spec.layer]
            )
            on_disk = isinstance(counts, anndata.abc.CSRDataset)
            return_sparse = (sp.issparse(counts) or on_disk) and method != "expected"
        if method == "split":
            out = self._split_counts(adata, indices, batch_size, n_samples, seed)
            return out if return_sparse else out.toarray()
        if method == "expected":
            fn = lambda b, k: _post.denoised_counts_expected(cfg, v, b, int(n_samples), k)  # noqa: E731
        else:
            sample = method == "split"
            fn = lambda b, k: _post.denoised_counts_posterior_split(  # noqa: E731
                cfg, v, b, ambient, int(n_samples), sample, k
            )
        return self._map(fn, adata, indices, batch_size, seed, sparse_output=bool(return_sparse))[0]

    def write_denoised_counts(
        self,
        filename: str | Path,
        adata: anndata.AnnData | None = None,
        *,
        layer: str = "denoised",
        block_cells: int = _backed.DEFAULT_BLOCK_CELLS,
        batch_size: int | None = None,
        n_samples: int = 1,
        seed: int = 0,
        overwrite: bool = False,
        progress_bar: bool = True,
    ) -> None:
        """Write the count-preserving denoised counts to a new ``.h5ad``, one block of cells at a time.

        Beyond scvi-tools, for data larger than memory (an AnnData from :func:`scar_jax.backed.read_backed`,
        or any other): the cells are read ``block_cells`` at a time (the next chunk in a background
        thread), split as ``get_denoised_counts(method="split")`` does, and each block is appended to the
        CSR ``layers[layer]`` of ``filename`` on disk, so memory holds one block. The file has the cells'
        ``obs`` and ``var`` and no ``X``; read it with ``anndata.read_h5ad(filename, backed="r")``. The
        result equals ``get_denoised_counts(adata, n_samples=..., seed=..., method="split")`` row for row (each cell's
        draws depend only on the cell and the seed). The file is written under a temporary name and
        renamed when complete, so an interrupted call leaves no partial file.
        """
        import h5py
        from anndata.io import sparse_dataset, write_elem
        from tqdm.auto import tqdm

        if not self.is_trained:
            raise RuntimeError("the model is not trained yet; call model.train() first")
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be a non-empty string, got {layer!r}")
        path = Path(filename)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
        block = _positive_int(block_cells, "block_cells")
        n_samples = _positive_int(n_samples, "n_samples")
        adata = self.adata if adata is None else adata
        obs = adata.obs if isinstance(adata.obs, pd.DataFrame) else pd.DataFrame(index=adata.obs_names)
        partial = path.with_name(path.name + ".partial")
        anndata.AnnData(obs=obs.copy(), var=adata.var.copy()).write_h5ad(partial)
        starts = range(0, adata.n_obs, block)
        try:
            with h5py.File(partial, "r+") as f:
                for start in tqdm(starts, desc="Denoising", unit="block", disable=not progress_bar):
                    rows = np.arange(start, min(start + block, adata.n_obs))
                    counts = self._split_counts(adata, rows, batch_size, n_samples, seed)
                    if start == 0:
                        write_elem(f["layers"], layer, counts)
                    else:
                        sparse_dataset(f["layers"][layer]).append(counts)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)

    def _split_counts(self, adata, indices, batch_size, n_samples: int, seed: int) -> sp.csr_matrix:
        """The count-preserving split: shares on the device at the observed counts, binomial draws on the host."""
        cells, rows = self._cells(adata, indices)
        counts = sp.csr_matrix(cells.x[rows], dtype=np.float32)
        counts.eliminate_zeros()
        counts.sort_indices()
        cfg, v, ambient = self.config, self._variables, jnp.asarray(self.ambient_profile)
        key = jax.random.fold_in(self._predict_key, seed)
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

    @staticmethod
    def get_ambient_profile(
        adata: anndata.AnnData,
        raw_adata: anndata.AnnData,
        prob: float = 0.995,
        min_raw_counts: int = 2,
        iterations: int = 3,
        n_batch: int = 1,
        sample: int = 50000,
        *,
        batch_key: str | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Estimate the ambient profile from raw (unfiltered) droplets; writes ``adata.varm["ambient_profile"]``.

        The EmptyDrops-like iteration of scvi-tools (see :mod:`scar_jax.ambient`), computed on the sparse
        matrix without densifying it (``n_batch`` only sets the number of row chunks). Genes are matched
        by name. With a ``batch_key`` (default: the one given to ``setup_anndata``, when ``raw_adata.obs``
        has that column too), one profile per batch from that batch's own droplets, one column per batch
        category in the setup's order. Returns the ``(n_genes, n_profiles)`` profile matrix.
        """
        genes = _data.match_raw_genes(adata, raw_adata)
        if batch_key is None and _data.UNS_KEY in adata.uns:
            setup_key = _data.read_spec(adata).batch_key
            batch_key = setup_key if setup_key is not None and setup_key in raw_adata.obs else None
        raw = _data.raw_counts(raw_adata)
        if not np.array_equal(genes, np.arange(raw.shape[1])):  # no copy when the genes already match
            raw = raw[:, genes]
        chunk = max(1, -(-raw_adata.n_obs // max(1, int(n_batch))))
        if batch_key is None:
            groups = [np.arange(raw_adata.n_obs)]
        else:
            if batch_key not in raw_adata.obs or batch_key not in adata.obs:
                raise ValueError(f"batch_key={batch_key!r} must be a column of both adata.obs and raw_adata.obs")
            categories = (
                _data.read_spec(adata).batch_categories
                if _data.UNS_KEY in adata.uns
                else _data.categories(adata, batch_key)
            )
            labels = raw_adata.obs[batch_key].astype(str).to_numpy()
            groups = [np.flatnonzero(labels == c) for c in categories]
            for c, g in zip(categories, groups, strict=True):
                if len(g) == 0:
                    raise ValueError(f"raw_adata has no droplets of batch {c!r} (raw_adata.obs[{batch_key!r}])")
        profiles = []
        for rows in groups:
            estimate = _ambient.estimate_ambient_profile(
                raw if len(rows) == raw.shape[0] else raw[rows],
                prob,
                min_raw_counts,
                iterations,
                sample,
                seed,
                chunk_size=min(chunk, 100_000),
            )
            profiles.append(estimate.profile)
        profile = np.stack(profiles, axis=1)
        adata.varm["ambient_profile"] = profile
        return profile

    # ------------------------------------------------------------------ feature barcodes
    def get_bayes_factors(
        self,
        adata: anndata.AnnData | None = None,
        indices: Any = None,
        batch_size: int | None = None,
        adjust: Literal["micro", "global"] | None = "micro",
        log: bool = False,
    ) -> np.ndarray:
        """Per cell and feature, the evidence that the count exceeds what ambient contamination explains.

        ``BF = P(X <= x) / P(X = x)`` with ``X ~ Poisson(N * noise_ratio * a + adjustment)``, each cell with
        its own batch's ambient profile ``a`` (the original scAR's rule and its ``"micro"``/``"global"``
        adjustments; see :mod:`scar_jax.features`). Returns ``(n_cells, n_features)`` Bayes factors, or
        their natural log with ``log=True``.
        """
        cells, rows = self._cells(adata, indices)
        noise_ratio = self.get_noise_ratio(adata, indices, batch_size)
        x = cells.x[rows]
        library = np.asarray(x.sum(axis=1), np.float64).ravel()
        fn = _features.log_bayes_factors if log else _features.bayes_factors
        return fn(x, library, noise_ratio, self.ambient_profile, cells.batch_index[rows], adjust=adjust)

    def assign_features(
        self,
        adata: anndata.AnnData | None = None,
        cutoff: float = 3.0,
        moi: int | None = None,
        adjust: Literal["micro", "global"] | None = "micro",
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Assign features (guides, hashtags, CMOs) to cells from their Bayes factors.

        ``moi=None``: the original scAR's rule (Bayes factors below ``cutoff`` set to 0, the features tied
        at each cell's maximum, none when it is 0). ``moi=k``: up to ``k`` features with Bayes factor >=
        ``cutoff``, strongest first, for high-MOI or dual-guide experiments (the original raises
        NotImplementedError). Returns a DataFrame indexed like ``adata.obs_names`` with the assigned
        features (comma-joined), their number and their total observed count.
        """
        adata = self.adata if adata is None else adata
        cells, _ = self._cells(adata, None)
        bf = self.get_bayes_factors(adata, batch_size=batch_size, adjust=adjust)
        return _features.assign_features(
            bf,
            cells.x,
            np.asarray(adata.var_names),
            cutoff=cutoff,
            moi=moi,
            obs_names=np.asarray(adata.obs_names),
            feature_type=self.feature_type,
        )

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
        """Save the model (atomically) to ``dir_path``; with ``save_anndata`` also the AnnData.

        Unlike scvi-tools, the optimizer state, step and history are saved too, so training can resume.
        """
        state = self._state
        if state is None:  # untrained or imported: a state with a fresh optimizer keeps one file format
            state = _train.init_train_state(self._variables, _train.make_optimizer(), self._train_key)
        split = (self.train_indices, self.validation_indices, self.test_indices)
        self._write(dir_path, state, self.history_rows, split, self.is_trained, overwrite, prefix, save_anndata)

    def _write(
        self,
        dir_path: str,
        state: _train.TrainState,
        rows: list[dict[str, float]],
        split: tuple[np.ndarray, np.ndarray, np.ndarray],
        is_trained: bool,
        overwrite: bool,
        prefix: str | None = None,
        save_anndata: bool = False,
    ) -> None:
        from . import __version__

        manifest = {
            "scar_jax_version": __version__,
            "config": dataclasses.asdict(self.config),
            "spec": self.spec.to_dict(),
            "var_names": self.var_names.tolist(),
            "seed": self.seed,
            "feature_type": self.feature_type,
            "ambient_profile_shape": list(self.ambient_profile.shape),
            "is_trained": is_trained,
            "history": rows,
            "training_time_s": self.training_time_s,
            "split": {"train": split[0].tolist(), "validation": split[1].tolist(), "test": split[2].tolist()},
        }
        _io.write_model_dir(
            dir_path,
            manifest,
            _io.state_to_bytes(state, self.ambient_profile),
            prefix=prefix,
            overwrite=overwrite,
            adata=self.adata if save_anndata else None,
        )

    def _resume(
        self, checkpoint_dir: str, template: _train.TrainState, split: tuple[np.ndarray, ...]
    ) -> tuple[_train.TrainState, list[dict[str, float]]]:
        """The train state and history of a checkpoint of this same model and data."""
        manifest, state_bytes, _ = _io.read_model_dir(checkpoint_dir)
        same = (
            SCARConfig(**manifest["config"]) == self.config
            and manifest["seed"] == self.seed
            and manifest["var_names"] == self.var_names.tolist()
            and all(
                np.array_equal(np.asarray(manifest["split"][k], np.int64), rows)
                for k, rows in zip(("train", "validation", "test"), split, strict=True)
            )
        )
        if not same:
            raise ValueError(
                f"checkpoint_dir {checkpoint_dir} holds a different model or data split (configuration, seed, genes "
                "or train_size); use another checkpoint_dir or delete it"
            )
        ambient = np.zeros(tuple(manifest["ambient_profile_shape"]), np.float32)
        state, _ = _io.state_from_bytes(template, ambient, state_bytes)
        return state, manifest["history"]

    @classmethod
    def load(
        cls, dir_path: str, adata: anndata.AnnData | None = None, prefix: str | None = None, **kwargs: Any
    ) -> SCAR:
        """Load a model saved by :meth:`save`; ``adata`` must have the same genes in the same order."""
        if kwargs:
            raise TypeError(f"load() got unknown keyword arguments {sorted(kwargs)}")
        manifest, state_bytes, adata_path = _io.read_model_dir(dir_path, prefix)
        if adata is None:
            if not adata_path.is_file():
                raise ValueError(f"{dir_path} was saved without its AnnData; pass adata=... to SCAR.load")
            adata = anndata.read_h5ad(adata_path)
        _data.check_genes(adata, np.asarray(manifest["var_names"]))
        spec = _data.AnnDataSpec.from_dict(manifest["spec"])
        adata_setup = adata.uns.get(_data.UNS_KEY)
        if adata_setup is None:
            _data.setup_anndata(adata, spec.batch_key, spec.labels_key, spec.layer, spec.size_factor_key)
        config = SCARConfig(**manifest["config"])
        model = cls.__new__(cls)
        model.spec, model.config, model.adata = spec, config, adata
        model.var_names = np.asarray(manifest["var_names"]).astype(str)
        model.seed = int(manifest["seed"])
        model.feature_type = manifest.get("feature_type", "mRNA")
        init_key, model._train_key, model._predict_key = jax.random.split(jax.random.key(model.seed), 3)
        model._net = config.make_net()
        template_vars = init_variables(model._net, init_key, config.n_genes)
        template = _train.init_train_state(template_vars, _train.make_optimizer(), model._train_key)
        ambient_template = np.zeros(tuple(manifest["ambient_profile_shape"]), np.float32)
        try:
            state, ambient = _io.state_from_bytes(template, ambient_template, state_bytes)
        except Exception as err:  # msgpack errors come in many types
            raise ValueError(
                f"{dir_path}: the saved state cannot be read ({err}); the file is truncated or corrupted"
            ) from err
        model._state = state if manifest["is_trained"] else None
        model._variables = state.variables
        model.ambient_profile = np.asarray(ambient, np.float32)
        model.is_trained = bool(manifest["is_trained"])
        model.history_rows = manifest["history"]
        model.training_time_s = float(manifest.get("training_time_s", 0.0))
        split = manifest["split"]
        model.train_indices = np.asarray(split["train"], np.int64)
        model.validation_indices = np.asarray(split["validation"], np.int64)
        model.test_indices = np.asarray(split["test"], np.int64)
        return model

    # ------------------------------------------------------------------ setup record and devices
    # (scvi-tools names; functions of the model in scar_jax/setup_record.py)
    view_anndata_setup = _setup.view_anndata_setup
    view_setup_args = _setup.view_setup_args
    get_setup_arg = _setup.get_setup_arg
    get_state_registry = _setup.get_state_registry
    get_from_registry = _setup.get_from_registry
    transfer_fields = _setup.transfer_fields
    _check_compatible = _setup._check_compatible
    update_setup_method_args = _setup.update_setup_method_args
    load_registry = staticmethod(_setup.load_registry)
    _instance_records = _setup._instance_records
    register_manager = classmethod(_setup.register_manager)
    deregister_manager = _setup.deregister_manager
    get_anndata_manager = _setup.get_anndata_manager
    data_registry = property(_setup.data_registry)
    device = property(_setup.device)
    to_device = _setup.to_device
    _setup_args = staticmethod(_setup._setup_args)
    _setup_table = _setup._setup_table

    # ------------------------------------------------------------------ scvi-tools interchange (needs torch)
    @classmethod
    def from_scvi_tools(
        cls, dir_path: str, adata: anndata.AnnData | None = None, prefix: str | None = None, *, seed: int = 0
    ) -> SCAR:
        """A scar-jax model with every weight of a model saved by ``scvi.external.SCAR.save`` (``model.pt``).

        Needs PyTorch to read the file (``pip install 'scar-jax[torch]'``). See :mod:`scar_jax.scvi_io`.
        """
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

    # ------------------------------------------------------------------ display
    @property
    def summary_string(self) -> str:
        c = self.config
        return (
            f"SCAR model with n_hidden: {c.n_hidden}, n_latent: {c.n_latent}, n_layers: {c.n_layers}, "
            f"dropout_rate: {c.dropout_rate}, gene_likelihood: {c.gene_likelihood}, "
            f"latent_distribution: {c.latent_distribution}, scale_activation: {c.scale_activation}, "
            f"sparsity: {c.sparsity}\nTraining status: {'Trained' if self.is_trained else 'Not Trained'}"
        )

    def __repr__(self) -> str:
        return self.summary_string
