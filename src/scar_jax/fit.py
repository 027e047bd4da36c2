"""The host-side training loop and a model's whole training run.

* :func:`fit` runs compiled epochs (:func:`scar_jax.train.make_train_epoch`): Python touches the device once
  per epoch, for the per-epoch sums; the KL weight of each epoch comes from
  :func:`scar_jax.train.kl_weight_schedule`; early stopping (:class:`EarlyStopping`, scvi-tools' defaults)
  and divergence (:class:`TrainingDiverged`: the state of the last good epoch is kept) are checked per epoch.
* :func:`fit_model` is what ``SCAR.train`` runs: it compiles (:func:`scar_jax.train.compiled_training`,
  once per configuration), places the cells (resident, replicated, sharded over processes or streamed
  in blocks), resumes from and writes checkpoints (:class:`Checkpoint`), and trains.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .likelihoods import cell_log_constants, has_log_constant

# kl_weight_schedule and compiled_training are looked up here at call time: tests patch scar_jax.fit's names
from .train import (
    CellData,
    EpochSums,
    Split,
    TrainState,
    compiled_training,
    data_parallel_mesh,
    init_train_state,
    kl_weight_schedule,
    positive_int,
)
from .vae import SCARConfig


class EarlyStopping(NamedTuple):
    """scvi-tools' early-stopping defaults: monitor ``elbo_validation``, patience 45, min_delta 0, mode min."""

    monitor: str = "elbo_validation"
    patience: int = 45
    min_delta: float = 0.0


def epoch_metrics(sums: EpochSums, suffix: str) -> dict[str, float]:
    """Per-epoch means with scvi-tools' history names (``elbo_*`` is the *negative* ELBO, lower is better)."""
    n = float(sums.n_cells)
    rec, kl = float(sums.reconstruction_loss) / n, float(sums.kl_local) / n
    loss_name = "train_loss_epoch" if suffix == "train" else "validation_loss"
    return {
        loss_name: float(sums.loss) / n,
        f"elbo_{suffix}": rec + kl,
        f"reconstruction_loss_{suffix}": rec,
        f"kl_local_{suffix}": kl,
    }


class TrainingDiverged(FloatingPointError):
    """The loss or the parameters became NaN or infinite; ``state`` and ``rows`` are the last good ones."""

    def __init__(self, message: str, state: TrainState, rows: list[dict[str, float]]):
        super().__init__(message)
        self.state, self.rows = state, rows
        self.split: Split | None = None  # set by fit_model


def all_finite(tree: Any) -> jax.Array:
    """True when every leaf of ``tree`` is finite (one device reduction)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


# long: 15 training options, each documented here; the loop itself is under 40 lines
def fit(
    train_epoch: Callable[..., tuple[TrainState, EpochSums]],
    evaluate: Callable[..., EpochSums] | None,
    state: TrainState,
    data: CellData,
    train_rows: jax.Array,
    validation_rows: jax.Array | None,
    ambient_profile: jax.Array,
    *,
    max_epochs: int,
    first_epoch: int = 0,
    n_epochs_kl_warmup: int | None = 400,
    max_kl_weight: float = 1.0,
    min_kl_weight: float = 0.0,
    early_stopping: EarlyStopping | None = None,
    progress_bar: bool = True,
    previous_rows: list[dict[str, float]] | None = None,
    on_epoch_end: Callable[[int, TrainState, list[dict[str, float]]], None] | None = None,
    check_val_every_n_epoch: int = 1,
    max_steps: int | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Run epochs ``first_epoch .. max_epochs - 1``; returns the final state and all metrics rows.

    Python touches the device once per epoch (to read the sums), never per minibatch. ``previous_rows``
    (the history of a resumed run) restores the early-stopping counters. ``on_epoch_end(epoch, state,
    rows)`` is called after every epoch (checkpoints). If the loss or any parameter becomes NaN or
    infinite, :class:`TrainingDiverged` is raised carrying the state and history of the last good epoch.

    Lightning's ``check_val_every_n_epoch``: the validation pass runs after epochs ``n - 1, 2n - 1, ...``
    (0-based), and early stopping is checked after each validation pass only, so its patience counts
    validation passes (every epoch when ``n == 1`` or there are no validation cells). ``max_steps``: training
    stops once the state's step reaches it (the compiled epoch must be built with the same ``max_steps``).
    """
    has_validation = evaluate is not None and validation_rows is not None and validation_rows.shape[0] > 0

    def validation_epoch(epoch: int) -> bool:
        return (epoch + 1) % check_val_every_n_epoch == 0

    def stopping_check(epoch: int) -> bool:
        return check_val_every_n_epoch == 1 or not has_validation or validation_epoch(epoch)

    rows_out: list[dict[str, float]] = list(previous_rows or [])
    best, since_best = math.inf, 0
    if early_stopping is not None:
        for row in (row for row in rows_out if stopping_check(int(row["epoch"]))):
            best, since_best = _early_stopping_update(early_stopping, row, best, since_best)
    epochs = _epoch_bar(first_epoch, max_epochs, progress_bar)
    for epoch in epochs:
        kl_weight = kl_weight_schedule(epoch, n_epochs_kl_warmup, max_kl_weight, min_kl_weight)
        good = jax.tree.map(jnp.copy, state)  # the epoch donates its input
        state, sums = train_epoch(state, data, train_rows, ambient_profile, jnp.float32(kl_weight))
        row = {"epoch": epoch, "kl_weight": kl_weight, **epoch_metrics(sums, "train")}
        if not (math.isfinite(row["train_loss_epoch"]) and bool(all_finite(state.params))):
            epochs.close()
            raise _diverged(epoch, row, state, good, rows_out)
        if has_validation and validation_epoch(epoch):
            eval_key = jax.random.fold_in(jax.random.fold_in(state.key, 2), epoch)
            val = evaluate(state.variables, data, validation_rows, ambient_profile, jnp.float32(kl_weight), eval_key)
            row.update(epoch_metrics(val, "validation"))
        rows_out.append(row)
        epochs.set_postfix(loss=f"{row['train_loss_epoch']:.4g}", refresh=False)
        if on_epoch_end is not None:
            on_epoch_end(epoch, state, rows_out)
        if early_stopping is not None and stopping_check(epoch):
            best, since_best = _early_stopping_update(early_stopping, row, best, since_best)
            if since_best >= early_stopping.patience:
                break
        if max_steps is not None and int(state.step) >= max_steps:
            break
    epochs.close()
    return state, rows_out


def _epoch_bar(first_epoch: int, max_epochs: int, progress_bar: bool) -> Any:
    if progress_bar:  # tqdm.auto picks the notebook widget (and warns without ipywidgets): only when shown
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    disable = not progress_bar or first_epoch >= max_epochs  # no bar when a resumed run had finished
    return tqdm(range(first_epoch, max_epochs), desc="Training", unit="epoch", disable=disable)


def _diverged(epoch: int, row: dict, state: TrainState, good: TrainState, rows: list) -> TrainingDiverged:
    kept = f"those of epoch {epoch - 1} are kept" if rows else "the initial parameters are kept"
    return TrainingDiverged(
        f"training diverged at epoch {epoch} (loss {row['train_loss_epoch']}, parameters finite: "
        f"{bool(all_finite(state.params))}); {kept}. Check the counts and the ambient profile, or lower "
        "the learning rate (plan_kwargs={'lr': ...})",
        good,
        rows,
    )


def _early_stopping_update(
    stopper: EarlyStopping, row: dict[str, float], best: float, since_best: int
) -> tuple[float, int]:
    if stopper.monitor not in row:
        raise ValueError(
            f"early_stopping_monitor {stopper.monitor!r} is not logged; "
            f"choose one of {sorted(k for k in row if k not in ('epoch', 'kl_weight'))}"
        )
    value = row[stopper.monitor]
    if value < best - stopper.min_delta:
        return value, 0
    return best, since_best + 1


class Checkpoint(NamedTuple):
    """Checkpoints of one run: ``read(template, split) -> (state, rows)`` when ``exists`` (resume), and
    ``write(state, rows, split)`` every ``every`` epochs and after the last."""

    exists: bool
    every: Any
    read: Callable[[TrainState, Split], tuple[TrainState, list[dict[str, float]]]]
    write: Callable[[TrainState, list[dict[str, float]], Split], None]


class FitResult(NamedTuple):
    state: TrainState  # on one device
    rows: list[dict[str, float]]  # the history, one row per epoch
    split: Split  # train, validation, test cell indices
    training_time_s: float


def _place_cells(
    cells: Any,
    chosen: list[jax.Device],
    rows: Split,
    block_cells: Any,
    batch_size: int,
    compiled,
    gene_likelihood: str,
):
    """``(train_epoch, evaluate, data, train_rows, validation_rows, placement)`` for the cells: resident on one
    device, replicated over several, sharded over processes, or streamed in blocks (sparse or on disk).

    Resident and streamed cells carry their parameter-free log-likelihood
    (:func:`scar_jax.likelihoods.cell_log_constants`, float64 rounded once to float32) when ``gene_likelihood`` has
    one; cells sharded over processes evaluate it per entry.
    """
    from . import backed, distributed  # imported when used: backed brings in anndata, not needed to train

    _, train_epoch, evaluate = compiled
    train_idx, val_idx, _ = rows
    multi_process = distributed.is_multi_process()
    mesh = data_parallel_mesh(tuple(chosen)) if len(chosen) > 1 else None
    placement = chosen[0] if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_disk = isinstance(cells.x, backed.BackedCounts)
    if not multi_process and (block_cells is not None or on_disk):  # out of core: one block at a time
        block = positive_int(backed.DEFAULT_BLOCK_CELLS if block_cells is None else block_cells, "block_cells")
        x = cells.x if on_disk else sp.csr_matrix(cells.x)
        train_epoch, evaluate = backed.streamed_training(
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
            batch_size,
            gene_likelihood,
        )
        return train_epoch, evaluate, None, train_idx, np.empty(len(val_idx)), placement
    if multi_process:  # each process reads its own rows (also from disk) onto its own devices
        data = distributed.shard_cells(cells.x, cells.library, cells.batch_index, cells.max_count, mesh)
        train_rows = distributed.put(np.asarray(train_idx, np.int32), placement)
        val_rows = distributed.put(np.asarray(val_idx, np.int32), placement)
        return train_epoch, evaluate, data, train_rows, val_rows, placement
    data = _resident_cells(cells, placement, gene_likelihood)
    train_rows = jax.device_put(jnp.asarray(train_idx, jnp.int32), placement)
    val_rows = jax.device_put(jnp.asarray(val_idx, jnp.int32), placement)
    return train_epoch, evaluate, data, train_rows, val_rows, placement


def _resident_cells(cells: Any, placement: Any, gene_likelihood: str) -> CellData:
    """The cells on the device (or replicated): counts, library, batch index and, when ``gene_likelihood`` has
    one, each cell's parameter-free log-likelihood (float64, rounded once to float32)."""
    from .counts import to_device

    log_constant = None
    if has_log_constant(gene_likelihood):
        constants = cell_log_constants(gene_likelihood, cells.x, cells.library).astype(np.float32)
        log_constant = jax.device_put(constants, placement)
    x = to_device(cells.x, placement, cells.max_count)
    return CellData(
        x, jax.device_put(cells.library, placement), jax.device_put(cells.batch_index, placement), log_constant
    )


def _check_streamable(cells: Any, block_cells: Any) -> None:
    from . import backed, distributed

    on_disk = isinstance(cells.x, backed.BackedCounts)
    streamed = not distributed.is_multi_process() and (block_cells is not None or on_disk)
    if streamed and not sp.issparse(cells.x) and not on_disk:
        raise ValueError(
            "block_cells streams sparse counts by blocks of cells; the counts are dense (keep them "
            "resident: leave block_cells=None, or make them scipy.sparse.csr_matrix)"
        )


def _checkpoint_callback(checkpoint: Checkpoint | None, max_epochs: int, split: Split):
    if checkpoint is None:
        return None
    every = positive_int(checkpoint.every, "checkpoint_every")

    def on_epoch_end(epoch: int, state: TrainState, rows: list[dict[str, float]]) -> None:
        if (epoch + 1) % every == 0 or epoch + 1 == max_epochs:
            checkpoint.write(state, rows, split)

    return on_epoch_end


def _compile(config: SCARConfig, batch_size: int, plan: dict, trainer: dict, options: Any, chosen: list):
    """:func:`compiled_training` for scvi-tools' ``plan_kwargs`` and trainer keywords."""
    if options.matmul_precision is not None:  # Lightning's precision: the Dense layers' precision while training
        config = dataclasses.replace(config, matmul_precision=options.matmul_precision)
    return compiled_training(
        config,
        batch_size,
        float(plan.get("lr", 1e-3)),
        float(plan.get("eps", 0.01)),
        float(plan.get("weight_decay", 1e-6)),
        tuple(chosen) if len(chosen) > 1 else None,
        positive_int(trainer.get("scan_unroll", 1), "scan_unroll"),
        options.gradient_clip,
        options.max_steps,
    )


def _initial_state(variables, key, tx, placement, checkpoint: Checkpoint | None, split: Split):
    """The first state on the devices (or the checkpoint's) and the history it continues."""
    from . import distributed

    # The epoch donates its state: copies keep the model's own arrays and key valid. Committed to the device like
    # the epoch's outputs, so that the second epoch reuses the first one's compilation.
    variables = jax.tree.map(lambda a: jnp.array(a, copy=True), distributed.put(variables, placement))
    key = jax.random.wrap_key_data(jnp.array(jax.random.key_data(key), copy=True))
    state = distributed.put(init_train_state(variables, tx, key), placement)
    if checkpoint is None or not checkpoint.exists:
        return state, []
    state, previous = checkpoint.read(state, split)
    return jax.device_put(state, placement), previous


def _fit_options(plan: dict, trainer: dict, options: Any, early_stopping: bool) -> dict[str, Any]:
    """The keywords of :func:`fit` from scvi-tools' ``plan_kwargs`` and trainer keywords."""
    stopper = None
    if early_stopping:
        stopper = EarlyStopping(
            trainer.get("early_stopping_monitor", "elbo_validation"),
            int(trainer.get("early_stopping_patience", 45)),
            float(trainer.get("early_stopping_min_delta", 0.0)),
        )
    return {
        "n_epochs_kl_warmup": plan.get("n_epochs_kl_warmup", 400),
        "max_kl_weight": float(plan.get("max_kl_weight", 1.0)),
        "min_kl_weight": float(plan.get("min_kl_weight", 0.0)),
        "early_stopping": stopper,
        "progress_bar": bool(trainer.get("enable_progress_bar", True)),
        "check_val_every_n_epoch": options.check_val_every_n_epoch,
        "max_steps": options.max_steps,
    }


def fit_model(
    config: SCARConfig,
    cells: Any,
    variables: dict[str, Any],
    key: jax.Array,
    ambient_profile: np.ndarray,
    chosen: list[jax.Device],
    split: Split,
    *,
    max_epochs: int,
    batch_size: int,
    plan: dict[str, Any],
    trainer: dict[str, Any],
    options: Any,
    early_stopping: bool = False,
    checkpoint: Checkpoint | None = None,
) -> FitResult:
    """Train from ``variables`` on ``cells`` (:class:`~scar_jax.posterior.HostCells`) over the ``chosen`` devices.

    ``plan``/``trainer``: scvi-tools' ``plan_kwargs`` and trainer keywords, ``options`` their parsed form
    (:func:`scar_jax.arguments.trainer_options`). ``variables`` and ``key`` are copied, not consumed. On
    divergence :class:`TrainingDiverged` carries the last good state, rows and (as ``split``) the split.
    """
    from . import distributed

    block_cells = trainer.get("block_cells")
    _check_streamable(cells, block_cells)
    compiled = _compile(config, batch_size, plan, trainer, options, chosen)
    train_epoch, evaluate, data, train_rows, val_rows, placement = _place_cells(
        cells, chosen, split, block_cells, batch_size, compiled, config.gene_likelihood
    )
    state, previous = _initial_state(variables, key, compiled[0], placement, checkpoint, split)
    on_epoch_end = _checkpoint_callback(checkpoint, max_epochs, split)
    fit_options = _fit_options(plan, trainer, options, early_stopping)
    ambient = distributed.put(jnp.asarray(ambient_profile), placement)
    start = time.perf_counter()
    try:
        state, rows = fit(
            train_epoch,
            evaluate,
            state,
            data,
            train_rows,
            val_rows,
            ambient,
            max_epochs=int(max_epochs),
            first_epoch=len(previous),
            previous_rows=previous,
            on_epoch_end=on_epoch_end,
            **fit_options,
        )
    except TrainingDiverged as err:
        err.split = split
        raise
    jax.block_until_ready(state.params)
    elapsed = time.perf_counter() - start
    if len(chosen) > 1:  # inference runs on one device (several processes: each on its own copy)
        state = distributed.one_replica(state, chosen[0])
    return FitResult(state, rows, split, elapsed)
