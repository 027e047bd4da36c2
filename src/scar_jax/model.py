"""``SCAR``: the scvi-tools ``scvi.external.SCAR`` API over the functional core.

The class validates AnnData, moves arrays, loops over chunks and assembles results; every formula is
in :mod:`scar_jax.vae`, :mod:`scar_jax.likelihoods` and :mod:`scar_jax.posterior`.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Any, Literal

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import abundance as _abundance
from . import ambient as _ambient
from . import data as _data
from . import de as _de
from . import features as _features
from . import io as _io
from . import posterior as _post
from . import train as _train
from .counts import to_device
from .vae import SCARConfig, init_variables

IMPORTANCE_KWARGS = {"max_cells", "truncation", "n_mc_samples", "n_mc_samples_per_pass"}
PLAN_KWARGS = {"lr", "weight_decay", "eps", "n_epochs_kl_warmup", "max_kl_weight", "min_kl_weight", "optimizer"}
TRAINER_KWARGS = {
    "early_stopping_monitor",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "enable_progress_bar",
}


def _select_device(accelerator: str, devices: int | str | list[int]) -> jax.Device:
    """The XLA device to train on, from scvi-tools' ``accelerator``/``devices`` arguments."""
    platform = {"auto": None, "cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(str(accelerator).lower(), "")
    if platform == "":
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu' or 'tpu', got {accelerator!r}")
    try:
        available = jax.devices(platform)
    except RuntimeError as err:
        raise ValueError(f"accelerator={accelerator!r}: no such device here ({err})") from err
    if devices in ("auto", -1, "-1", None):
        return available[0]
    index = devices[0] if isinstance(devices, list | tuple) else int(devices)
    if not 0 <= index < len(available):
        raise ValueError(f"devices={devices!r}: only {len(available)} {available[0].platform} device(s)")
    return available[index]


def _select_devices(accelerator: str, devices: int | str | list[int]) -> list[jax.Device]:
    """The devices to train on, with PyTorch Lightning's meaning of ``devices`` (as scvi-tools passes it).

    ``"auto"``: one device; an int ``n``: the first ``n`` devices (``-1``: all); a list: those indices.
    """
    if devices in ("auto", None):
        return [_select_device(accelerator, "auto")]
    available = jax.devices(_select_device(accelerator, "auto").platform)
    if isinstance(devices, list | tuple):
        return [_select_device(accelerator, [int(i)]) for i in devices]
    count = len(available) if int(devices) == -1 else int(devices)
    if not 1 <= count <= len(available):
        raise ValueError(
            f"devices={devices!r}: {len(available)} {available[0].platform} device(s) here; pass a number from 1 to "
            f"{len(available)}, -1 for all, or a list of indices"
        )
    return available[:count]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


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
        )
        self.adata = adata
        self.var_names = np.asarray(adata.var_names).astype(str)
        cells = _data.read_cells(adata, self.spec, gene_likelihood)
        self.ambient_profile = _data.resolve_ambient_profile(adata, ambient_profile, self.spec, cells.x)
        self.seed = int(seed)
        root = jax.random.key(self.seed)
        init_key, self._train_key, self._predict_key = jax.random.split(root, 3)
        self._net = self.config.make_net()
        self._variables = init_variables(self._net, init_key, self.config.n_genes)
        self._state: _train.TrainState | None = None
        self.is_trained = False
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
        ``enable_progress_bar`` (True). Training data stay on the device, and each epoch is one
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
        placement = device if len(chosen) == 1 else jax.sharding.NamedSharding(
            _train.data_parallel_mesh(tuple(chosen)), jax.sharding.PartitionSpec()
        )
        train_idx, val_idx, test_idx = _train.split_indices(
            n_cells, split["train_size"], split["validation_size"], shuffle_set_split, batch_size, self.seed
        )
        cells = _data.read_cells(self.adata, self.spec, self.config.gene_likelihood)
        resident = _train.CellData(
            to_device(cells.x, placement),
            jax.device_put(cells.library, placement),
            jax.device_put(cells.batch_index, placement),
        )
        tx, train_epoch, evaluate = _train.compiled_training(
            self.config,
            int(batch_size),
            float(plan.get("lr", 1e-3)),
            float(plan.get("eps", 0.01)),
            float(plan.get("weight_decay", 1e-6)),
            tuple(chosen) if len(chosen) > 1 else None,
        )
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
                jax.device_put(jnp.asarray(train_idx, jnp.int32), device),
                jax.device_put(jnp.asarray(val_idx, jnp.int32), device),
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
    def _cells(self, adata: anndata.AnnData | None, indices: Any) -> tuple[_post.HostCells, np.ndarray]:
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet; call model.train() first")
        adata = self.adata if adata is None else adata
        if adata is not self.adata:
            _data.check_genes(adata, self.var_names)
        cells = _data.read_cells(adata, self.spec, self.config.gene_likelihood)
        if indices is None:
            rows = np.arange(adata.n_obs)
        else:
            rows = np.asarray(indices)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
                raise ValueError("indices must be a non-empty 1-d sequence of integer cell positions")
            if rows.min() < -adata.n_obs or rows.max() >= adata.n_obs:
                raise ValueError(f"indices out of range for {adata.n_obs} cells")
            rows = rows % adata.n_obs
        return cells, rows

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

    # ------------------------------------------------------------------ likelihood, expression, sampling
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
        n = _positive_int(n_mc_samples, "n_mc_samples")
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
        n = _positive_int(n_samples, "n_samples")
        cells, rows = self._cells(adata, indices)
        if weights == "importance" and n_samples_overall is not None:
            return self._importance_resampled_expression(
                cells, adata, rows, n, _positive_int(n_samples_overall, "n_samples_overall"), latent,
                library_size, gene_list, batch_size, return_numpy, seed, kwargs,
            )
        if n_samples_overall is not None:
            total = _positive_int(n_samples_overall, "n_samples_overall")
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
        if _positive_int(n_samples, "n_samples") != 1:
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
        n = _positive_int(n_samples, "n_samples")
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
        too high; it needs a single ambient profile (``ValueError`` otherwise).
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
        self, adata, indices, batch_size, n_neighbours: int, expressed_prior_odds: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray, _post.HostCells, np.ndarray]:
        """Calibrated noise ratio ``(m,)`` and native share ``(m, G)`` of the selected rows, the cells and rows."""
        from .calibration import calibrate_model

        cells, rows = self._cells(adata, indices)
        n_neighbours = _positive_int(n_neighbours, "n_neighbours")
        eps, share = calibrate_model(
            self, adata, n_neighbours=n_neighbours, expressed_prior_odds=expressed_prior_odds, batch_size=batch_size
        )
        return eps[rows], share[rows], cells, rows

    def get_denoised_counts(
        self,
        adata: anndata.AnnData | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        *,
        method: Literal["split", "split_mean", "expected", "calibrated"] = "split",
        indices: Any = None,
        seed: int = 0,
        return_sparse: bool | None = None,
        n_neighbours: int = 50,
        expressed_prior_odds: float = 1.0,
    ) -> np.ndarray | sp.csr_matrix:
        """Denoised counts ``(n_cells, n_genes)``.

        Parameters
        ----------
        method
            ``"split"`` (default, count-preserving): each observed count is native with its posterior
            share ``w = (1 - eps) phi / ((1 - eps) phi + eps a)`` (the cell's own batch profile ``a``),
            ``denoised ~ Binomial(x, w)``, median over ``n_samples`` draws of z. Integer, ``0 <=
            denoised <= raw``, and zeros stay zero. ``"split_mean"``: the posterior mean ``x * w``
            (not integer). ``"expected"``: the scvi-tools reference, ``library * (1 - eps) * phi``
            stochastically rounded, median over draws; it can exceed the observed count and be
            positive where nothing was observed ("artificial counts"), which is why it is not the
            default here. ``"calibrated"`` (count-preserving, for low contamination): ``denoised ~
            Binomial(x, w)`` with the native share ``w`` of :mod:`scar_jax.calibration`, an
            empirical-Bayes posterior on the cell's ``n_neighbours`` nearest cells in the latent
            space (computed over all cells of ``adata``): a gene the neighbourhood expresses keeps its
            counts, a gene it does not express loses them all, and the noise ratio is re-estimated
            from the latter (``get_noise_ratio(calibrated=True)``). Use it when a fraction of a
            percent to a few percent of the counts are ambient: there the model's noise ratio is
            several times too high and its sparse native frequencies zero out expressed genes, so
            ``"split"`` removes real expression. On a simulated two-species mixture (0.2-2%
            contamination) it keeps >= 99.5% of the counts of expressed genes and removes >= 90% of
            the contamination. Needs a single ambient profile (``ValueError`` with per-batch
            profiles); ``n_samples`` is not used (one seeded draw); memory is a few dense
            ``(n_cells, n_genes)`` float64 arrays.
        n_neighbours
            ``"calibrated"`` only: the neighbourhood size (default 50; 30 is enough for ~100 cells).
        expressed_prior_odds
            ``"calibrated"`` only, the removal/retention knob (default 1, the derived posterior): the
            prior odds that a gene is expressed in a neighbourhood are multiplied by it. Larger keeps
            more real expression (fewer expressed genes are called off and lose their counts) and
            removes less contamination; smaller removes more and keeps less; the share is monotone in
            it. ``benchmarks/low_contamination.py --knob`` prints the trade-off on simulated data.
        return_sparse
            CSR output; default: when the input counts are sparse and the method is a split (whose
            non-zeros are a subset of the input's).
        seed
            Seed of the draws of z and of the binomial split / rounding.
        """
        n_samples = _positive_int(n_samples, "n_samples")
        if method not in ("split", "split_mean", "expected", "calibrated"):
            raise ValueError(f"method must be 'split', 'split_mean', 'expected' or 'calibrated', got {method!r}")
        if method == "calibrated":
            _, share, cells, rows = self._calibrated(adata, indices, batch_size, n_neighbours, expressed_prior_odds)
            x = cells.x[rows]
            rng = np.random.default_rng(seed)
            if sp.issparse(x):
                x = sp.csr_matrix(x)
                x.sum_duplicates()
                row_of = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
                data = rng.binomial(np.rint(x.data).astype(np.int64), share[row_of, x.indices]).astype(np.float32)
                out = sp.csr_matrix((data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
                out.eliminate_zeros()
                return out if return_sparse is None or return_sparse else out.toarray()
            out = rng.binomial(np.rint(np.asarray(x)).astype(np.int64), share).astype(np.float32)
            return sp.csr_matrix(out) if return_sparse else out
        cfg, v, ambient = self.config, self._variables, jnp.asarray(self.ambient_profile)
        if method == "expected":
            fn = lambda b, k: _post.denoised_counts_expected(cfg, v, b, int(n_samples), k)  # noqa: E731
        else:
            sample = method == "split"
            fn = lambda b, k: _post.denoised_counts_posterior_split(  # noqa: E731
                cfg, v, b, ambient, int(n_samples), sample, k
            )
        if return_sparse is None:
            counts = self.adata.X if adata is None else adata.X
            counts = (
                counts if self.spec.layer is None else (self.adata if adata is None else adata).layers[self.spec.layer]
            )
            return_sparse = sp.issparse(counts) and method != "expected"
        return self._map(fn, adata, indices, batch_size, seed, sparse_output=bool(return_sparse))[0]

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
            manifest["config"] == dataclasses.asdict(self.config)
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

    # ------------------------------------------------------------------ setup record (scvi-tools names)
    def view_anndata_setup(self, adata: anndata.AnnData | None = None, hide_state_registries: bool = False) -> None:
        """Print what ``setup_anndata`` recorded (layer, keys, categories) for ``adata`` (default: the model's)."""
        spec = self.spec if adata is None else _data.read_spec(adata)
        print(self._setup_table(spec))

    def view_setup_args(self) -> None:
        """Print the ``setup_anndata`` arguments of the model."""
        print(self._setup_table(self.spec))

    def get_setup_arg(self, setup_arg: str) -> Any:
        """One ``setup_anndata`` argument (``layer``, ``batch_key``, ``labels_key``, ``size_factor_key``)."""
        args = self._setup_args(self.spec)
        if setup_arg not in args:
            raise ValueError(f"setup_arg must be one of {sorted(args)}, got {setup_arg!r}")
        return args[setup_arg]

    def get_state_registry(self, registry_key: str) -> dict[str, Any]:
        """The categories recorded for ``"batch"`` or ``"labels"`` (scvi-tools' state registry, simplified)."""
        registries = {
            "batch": {"categorical_mapping": list(self.spec.batch_categories), "original_key": self.spec.batch_key},
            "labels": {"categorical_mapping": list(self.spec.labels_categories), "original_key": self.spec.labels_key},
        }
        if registry_key not in registries:
            raise ValueError(f"registry_key must be one of {sorted(registries)}, got {registry_key!r}")
        return registries[registry_key]

    def get_from_registry(self, adata: anndata.AnnData, registry_key: str) -> np.ndarray:
        """The data the model reads for ``"X"``, ``"batch"`` (codes), ``"labels"`` (codes) or ``"size_factor"``."""
        spec = self.spec
        if registry_key == "X":
            return _data.get_counts(adata, spec)
        if registry_key == "batch":
            return _data.batch_index(adata, spec).reshape(-1, 1)
        if registry_key == "labels":
            if spec.labels_key is None:
                return np.zeros((adata.n_obs, 1), np.int32)
            codes = pd.Categorical(adata.obs[spec.labels_key].astype(str), categories=list(spec.labels_categories))
            return np.asarray(codes.codes, np.int32).reshape(-1, 1)
        if registry_key == "size_factor" and spec.size_factor_key is not None:
            return np.asarray(adata.obs[spec.size_factor_key], np.float32).reshape(-1, 1)
        raise ValueError(
            f"registry_key must be 'X', 'batch', 'labels' or 'size_factor' (if set up), got {registry_key!r}"
        )

    def transfer_fields(self, adata: anndata.AnnData, extend_categories: bool = False, **kwargs: Any) -> None:
        """Set ``adata`` up the way the model's AnnData is (scvi-tools' ``transfer_fields``).

        Checks that ``adata`` has the model's genes in the same order and the setup's ``obs`` columns and
        layer, that its batch categories are ones the model was trained with, then writes the model's setup
        record (layer, keys and the model's category order) to ``adata.uns["_scar_jax"]``, the only field
        written, and registers it with this model (:meth:`get_anndata_manager`). SCAR has one ambient
        profile per training batch, so new batch categories cannot be added: ``extend_categories=True``
        raises ``ValueError``.
        """
        if kwargs:
            raise TypeError(f"transfer_fields() got unknown keyword arguments {sorted(kwargs)}")
        if extend_categories:
            raise ValueError(
                "extend_categories=True is not possible for SCAR: each batch needs its own ambient profile from "
                "training; train a model on the new batches instead"
            )
        self._check_compatible(adata)
        adata.uns[_data.UNS_KEY] = self.spec.to_dict()
        self._instance_records()[id(adata)] = (weakref.ref(adata), self.spec)

    def _check_compatible(self, adata: anndata.AnnData) -> None:
        """``ValueError`` naming the field unless the model can read ``adata`` (genes, layer, keys, batches)."""
        if not isinstance(adata, anndata.AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
        _data.check_genes(adata, self.var_names)
        spec = self.spec
        if spec.layer is not None and spec.layer not in adata.layers:
            raise ValueError(f"layer={spec.layer!r} (the model's setup) is not in adata.layers; add it")
        for name in ("batch_key", "labels_key", "size_factor_key"):
            key = getattr(spec, name)
            if key is not None and key not in adata.obs:
                raise ValueError(f"{name}={key!r} (the model's setup) is not a column of adata.obs; add it")
        _data.batch_index(adata, spec)  # unseen batch categories: ValueError naming them

    def update_setup_method_args(self, setup_method_args: dict[str, Any]) -> None:
        """Update recorded ``setup_anndata`` arguments, e.g. after renaming a layer or an ``obs`` column.

        Keys: ``layer``, ``batch_key``, ``labels_key``, ``size_factor_key``. The model's AnnData must have
        the new fields, and a renamed batch or labels column must hold the same categories (the model's
        ambient profiles and codes depend on them). Updates the model's record and
        ``adata.uns["_scar_jax"]`` of the model's AnnData.
        """
        if not isinstance(setup_method_args, dict):
            raise TypeError(f"setup_method_args must be a dict, got {type(setup_method_args).__name__}")
        unknown = set(setup_method_args) - set(self._setup_args(self.spec))
        if unknown:
            raise ValueError(
                f"setup_method_args has unknown keys {sorted(unknown)}; allowed: {sorted(self._setup_args(self.spec))}"
            )
        new = dataclasses.replace(self.spec, **setup_method_args)
        for name, key in (("batch_key", "batch_categories"), ("labels_key", "labels_categories")):
            if getattr(new, name) != getattr(self.spec, name):
                column = getattr(new, name)
                found = _data.categories(self.adata, column) if column in self.adata.obs else None
                if found != getattr(self.spec, key):
                    raise ValueError(
                        f"{name}={getattr(new, name)!r} must be a column of adata.obs with the model's categories "
                        f"{list(getattr(self.spec, key))}, found {None if found is None else list(found)}"
                    )
        old_spec, self.spec = self.spec, new
        try:
            self._check_compatible(self.adata)
        except (ValueError, TypeError):
            self.spec = old_spec
            raise
        self.adata.uns[_data.UNS_KEY] = new.to_dict()

    @staticmethod
    def load_registry(dir_path: str, prefix: str | None = None) -> dict[str, Any]:
        """The setup and model record saved with a model, without loading weights or data.

        ``{"setup_args", "categories", "model_args", "var_names", "scar_jax_version", "format_version",
        "is_trained"}``; missing, truncated or foreign directories raise ``ValueError`` as :meth:`load` does.
        """
        manifest, _, _ = _io.read_model_dir(dir_path, prefix)
        spec = _data.AnnDataSpec.from_dict(manifest["spec"])
        return {
            "setup_args": SCAR._setup_args(spec),
            "categories": {"batch": list(spec.batch_categories), "labels": list(spec.labels_categories)},
            "model_args": dict(manifest["config"]),
            "var_names": list(manifest["var_names"]),
            "scar_jax_version": manifest.get("scar_jax_version"),
            "format_version": manifest.get("format_version"),
            "is_trained": bool(manifest["is_trained"]),
        }

    # setup records by AnnData (scvi-tools' AnnDataManager stores, over the plain AnnDataSpec record)
    _class_records: dict[int, tuple[weakref.ref, _data.AnnDataSpec]] = {}

    def _instance_records(self) -> dict[int, tuple[weakref.ref, _data.AnnDataSpec]]:
        return self.__dict__.setdefault("_records", {})

    @classmethod
    def register_manager(cls, adata_manager: anndata.AnnData | tuple[anndata.AnnData, _data.AnnDataSpec]) -> None:
        """Register the setup record of an AnnData with the class (scvi-tools' ``register_manager``).

        ``adata_manager`` is an AnnData set up with :meth:`setup_anndata` (its record is read) or an
        ``(adata, AnnDataSpec)`` pair. A later registration for the same AnnData replaces the earlier one.
        """
        if isinstance(adata_manager, tuple) and len(adata_manager) == 2:
            adata, spec = adata_manager
            if not isinstance(spec, _data.AnnDataSpec):
                raise TypeError(f"expected (AnnData, AnnDataSpec), got a {type(spec).__name__} record")
        else:
            adata = adata_manager
            if not isinstance(adata, anndata.AnnData):
                kind = type(adata).__name__
                raise TypeError(f"adata_manager must be an AnnData or (AnnData, AnnDataSpec), got {kind}")
            spec = _data.read_spec(adata)
        cls._class_records[id(adata)] = (weakref.ref(adata), spec)

    def deregister_manager(self, adata: anndata.AnnData | None = None) -> None:
        """Forget the setup record of ``adata`` (class and instance stores); ``None``: all but the model's own."""
        for store in (type(self)._class_records, self._instance_records()):
            for key in list(store):
                target = store[key][0]()
                if (adata is None and target is not self.adata) or (adata is not None and target is adata):
                    del store[key]

    def get_anndata_manager(self, adata: anndata.AnnData, required: bool = False) -> _data.AnnDataSpec | None:
        """The setup record the model uses for ``adata`` (scvi-tools' ``get_anndata_manager``).

        The model's own AnnData gives the model's record; another AnnData gives its record from
        :meth:`transfer_fields` or :meth:`register_manager` if it is compatible with the model. ``None`` when
        there is none, or ``ValueError`` saying how to make one when ``required``.
        """
        if adata is self.adata:
            return self.spec
        for store in (self._instance_records(), type(self)._class_records):
            entry = store.get(id(adata))
            if entry is not None and entry[0]() is adata:
                if entry[1] != self.spec:
                    break  # set up differently from the model
                return entry[1]
        if required:
            raise ValueError(
                "adata has no setup record compatible with this model; call model.transfer_fields(adata) "
                "(or SCAR.setup_anndata with the model's arguments)"
            )
        return None

    @property
    def data_registry(self) -> dict[str, dict[str, str | None]]:
        """Where each field is read from in the AnnData (scvi-tools' data registry, simplified)."""
        spec = self.spec
        return {
            "X": {"attr_name": "X" if spec.layer is None else "layers", "attr_key": spec.layer},
            "batch": {"attr_name": "obs", "attr_key": spec.batch_key},
            "labels": {"attr_name": "obs", "attr_key": spec.labels_key},
            "size_factor": {"attr_name": "obs", "attr_key": spec.size_factor_key},
        }

    @property
    def device(self) -> jax.Device:
        """The JAX device holding the model's parameters."""
        return next(iter(jax.tree.leaves(self._variables)[0].devices()))

    def to_device(self, device: str | int | jax.Device) -> None:
        """Move the parameters to a JAX device: a ``jax.Device``, a platform (``"cpu"``, ``"gpu"``, ``"cuda:1"``) or
        an index into ``jax.devices()``."""
        if isinstance(device, str):
            platform, _, index = device.partition(":")
            target = _select_device(platform, int(index) if index else "auto")
        elif isinstance(device, int | np.integer):
            target = _select_device("auto", int(device))
        else:
            target = device
        self._variables = jax.device_put(self._variables, target)

    @staticmethod
    def _setup_args(spec: _data.AnnDataSpec) -> dict[str, Any]:
        return {
            "layer": spec.layer,
            "batch_key": spec.batch_key,
            "labels_key": spec.labels_key,
            "size_factor_key": spec.size_factor_key,
        }

    def _setup_table(self, spec: _data.AnnDataSpec) -> str:
        rows = [f"{k}: {v}" for k, v in self._setup_args(spec).items()]
        rows.append(f"batch categories ({len(spec.batch_categories)}): {list(spec.batch_categories)}")
        rows.append(f"labels categories ({len(spec.labels_categories)}): {list(spec.labels_categories)}")
        return "SCAR setup (adata.uns['_scar_jax'])\n  " + "\n  ".join(rows)

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
