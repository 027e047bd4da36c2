"""Training: the train state, the optimizer, one compiled epoch, and the host-side fit loop.

Choices (each matches scvi-tools' SCAR training unless said otherwise):

* optimizer ``torch.optim.Adam(lr=1e-3, eps=0.01, weight_decay=1e-6)``: L2 enters the gradient
  *before* Adam (``optax.add_decayed_weights`` then ``optax.adam``), not decoupled AdamW;
* KL warm-up linear in the epoch over ``n_epochs_kl_warmup=400`` epochs, from ``min_kl_weight`` to
  ``max_kl_weight``;
* a whole epoch runs in one donated ``jax.jit`` call: shuffling, minibatch densification and every
  optimizer step (``lax.scan``) stay on the device; Python only sees per-epoch sums;
* every random key derives from ``(state.key, state.step)``, so a resumed run equals an uninterrupted
  one, and the last partial minibatch is trained (as scvi-tools' ``drop_last=False``) in a second step
  of fixed shape inside the same compiled call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp

from .counts import CsrCounts, DenseCounts, EllCounts
from .nets import SCARNet
from .vae import Batch, SCARConfig, init_variables, loss_terms

Counts = DenseCounts | CsrCounts | EllCounts


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; returned, never mutated."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: optax.OptState
    key: jax.Array  # typed key; never split in place: keys are fold_in(key, step)

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


class CellData(NamedTuple):
    """Device-resident training data: counts plus per-cell library ``(n, 1)`` and batch index ``(n,)``."""

    counts: Counts
    library: jax.Array
    batch_index: jax.Array

    def batch(self, rows: jax.Array) -> Batch:
        return Batch(self.counts.take(rows), self.library[rows], self.batch_index[rows])


class EpochSums(NamedTuple):
    """Sums over the cells of one epoch (divide by ``n_cells`` for means)."""

    loss: jax.Array  # sum over minibatches of (minibatch loss x minibatch size)
    reconstruction_loss: jax.Array
    kl_local: jax.Array
    n_cells: jax.Array


def make_optimizer(
    lr: float = 1e-3,
    eps: float = 0.01,
    weight_decay: float = 1e-6,
    gradient_clip: tuple[float, str] | None = None,
) -> optax.GradientTransformation:
    """``torch.optim.Adam(lr, eps=eps, weight_decay=weight_decay)``: L2 added to the gradient before Adam.

    ``gradient_clip=(value, "norm" | "value")``: Lightning's ``gradient_clip_val`` and
    ``gradient_clip_algorithm``, applied to the loss gradient before the L2 term and Adam (as Lightning
    clips before ``optimizer.step()``): the global norm clipped to ``value``, or each entry to ``[-value, value]``.
    """
    steps = [optax.add_decayed_weights(weight_decay), optax.adam(learning_rate=lr, eps=eps)]
    if gradient_clip is not None:
        value, algorithm = gradient_clip
        steps.insert(0, optax.clip_by_global_norm(value) if algorithm == "norm" else optax.clip(value))
    return optax.chain(*steps)


def kl_weight_schedule(
    epoch: int, n_epochs_kl_warmup: int | None = 400, max_kl_weight: float = 1.0, min_kl_weight: float = 0.0
) -> float:
    """scvi-tools' KL warm-up: ``min + (max - min) * epoch / n_epochs_kl_warmup`` before the end, then ``max``."""
    if n_epochs_kl_warmup is None or n_epochs_kl_warmup <= 0 or epoch >= n_epochs_kl_warmup:
        return float(max_kl_weight)
    return float(min_kl_weight + (max_kl_weight - min_kl_weight) * epoch / n_epochs_kl_warmup)


def max_epochs_heuristic(n_cells: int, epochs_cap: int = 400, decay_at_n_obs: int = 20000) -> int:
    """scvi-tools' default epoch count: ``min(round(20000 / n_cells * 400), 400)``, at least 1."""
    return max(1, int(min(round(decay_at_n_obs / n_cells * epochs_cap), epochs_cap)))


def split_indices(
    n_cells: int,
    train_size: float | None = 0.9,
    validation_size: float | None = None,
    shuffle_set_split: bool = True,
    batch_size: int | None = 128,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test cell indices, as scvi-tools' ``DataSplitter`` makes them.

    ``n_train = ceil(train_size * n)``; ``n_val = n - n_train`` unless ``validation_size`` is given
    (then ``floor(validation_size * n)``); a last training minibatch of fewer than 3 cells is moved to
    validation (a BatchNorm layer cannot train on it). Validation cells come first in the permutation.
    Fewer training cells than ``batch_size`` make one smaller minibatch; fewer than 3 training cells, or
    ``batch_size < 2``, raise ``ValueError``.
    """
    train_size = 0.9 if train_size is None else float(train_size)
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}")
    n_train = math.ceil(train_size * n_cells)
    if validation_size is None:
        n_val = n_cells - n_train
    else:
        if not 0.0 <= validation_size < 1.0 or train_size + validation_size > 1.0 + 1e-12:
            raise ValueError(
                f"validation_size must be in [0, 1) with train_size + validation_size <= 1, got {validation_size}"
            )
        n_val = math.floor(validation_size * n_cells)
    if batch_size is not None and batch_size < 2:
        raise ValueError(
            f"batch_size={batch_size}: a minibatch of one cell cannot train the BatchNorm layers (its batch "
            "variance is 0, so the encoder output would not depend on the cell); use batch_size >= 2 (default 128)"
        )
    if batch_size is not None and 0 < n_train % batch_size < 3:
        n_val += n_train % batch_size
        n_train -= n_train % batch_size
    if n_train < 3:
        raise ValueError(
            f"adata has {n_cells} cells, which leaves {n_train} training cells (train_size={train_size}, "
            f"batch_size={batch_size}); SCAR needs at least 3 training cells (a last minibatch of 1 or 2 cells "
            "is moved to validation: BatchNorm cannot train on it). Use more cells or a larger train_size"
        )
    order = np.random.default_rng(seed).permutation(n_cells) if shuffle_set_split else np.arange(n_cells)
    return np.sort(order[n_val : n_val + n_train]), np.sort(order[:n_val]), np.sort(order[n_val + n_train :])


def init_train_state(variables: dict[str, Any], tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """The state before the first step. The compiled epoch *donates* its state (its buffers are reused), so
    ``variables`` and ``key`` given here are deleted by the first epoch: pass copies if you use them again
    (``jax.tree.map(jnp.copy, variables)``; a key: ``jax.random.wrap_key_data(jnp.copy(jax.random.key_data(key)))``).
    """
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        key=key,
    )


def make_train_step(
    net: SCARNet, config: SCARConfig, tx: optax.GradientTransformation
) -> Callable[..., tuple[TrainState, EpochSums]]:
    """One optimizer step on one minibatch: ``(state, batch, ambient_profile, kl_weight) -> (state, sums)``."""

    def train_step(state: TrainState, batch: Batch, ambient_profile: jax.Array, kl_weight: jax.Array):
        key = jax.random.fold_in(jax.random.fold_in(state.key, 0), state.step)

        def objective(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            terms, batch_stats = loss_terms(net, config, variables, batch, ambient_profile, key, kl_weight, True)
            return terms.loss, (terms, batch_stats)

        (_, (terms, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        n = batch.x.shape[0]
        sums = EpochSums(terms.loss * n, terms.reconstruction_loss.sum(), terms.kl_local.sum(), jnp.float32(n))
        return state, sums

    return train_step


def data_parallel_mesh(devices: tuple[jax.Device, ...]) -> jax.sharding.Mesh:
    """A 1-d device mesh with axis ``"data"``: minibatches are split along it, parameters replicated."""
    return jax.sharding.Mesh(np.asarray(devices, dtype=object), ("data",))


def shard_minibatch(batch: Batch, mesh: jax.sharding.Mesh | None) -> Batch:
    """Constrain a minibatch to be split over the mesh's ``"data"`` axis (cells), when it divides evenly.

    Inside ``jit`` this is all data parallelism needs: XLA's SPMD partitioner runs the forward and
    backward pass on each device's cells, all-reduces the gradients (and the BatchNorm batch moments, so
    the statistics are those of the whole minibatch, as on one device), and keeps the replicated
    parameters identical on every device.
    """
    if mesh is None or batch.x.shape[0] % mesh.size:
        return batch
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    return jax.lax.with_sharding_constraint(batch, Batch(sharding, sharding, sharding))


def make_train_epoch(
    net: SCARNet,
    config: SCARConfig,
    tx: optax.GradientTransformation,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    unroll: int = 1,
    max_steps: int | None = None,
) -> Callable[..., tuple[TrainState, EpochSums]]:
    """A donated, jit-compiled epoch: ``(state, data, train_rows, ambient_profile, kl_weight)``.

    The training rows are shuffled with a key from ``(state.key, state.step)``, cut into minibatches
    of ``batch_size`` (plus one final partial minibatch of static size), and scanned. With a ``mesh``
    (:func:`data_parallel_mesh`) each minibatch is split over its devices (:func:`shard_minibatch`);
    the state and data are expected replicated over the mesh. ``unroll`` optimizer steps run per
    iteration of the scan's loop (``lax.scan(unroll=...)``: fewer loop iterations, the same arithmetic).
    ``max_steps`` (Lightning's): minibatches after the state's step reaches it leave the state unchanged and
    add nothing to the sums, so an epoch can end part way.
    """
    train_step = make_train_step(net, config, tx)
    if max_steps is not None:
        unlimited_step = train_step

        def train_step(state, batch, ambient_profile, kl_weight):
            new, sums = unlimited_step(state, batch, ambient_profile, kl_weight)
            active = state.step < max_steps
            keep = lambda a, b: jnp.where(active, a, b)  # noqa: E731
            new = state.replace(
                step=keep(new.step, state.step),
                params=jax.tree.map(keep, new.params, state.params),
                batch_stats=jax.tree.map(keep, new.batch_stats, state.batch_stats),
                opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
            )
            return new, EpochSums(*(jnp.where(active, s, 0.0) for s in sums))

    @partial(jax.jit, donate_argnums=(0,))
    def train_epoch(state: TrainState, data: CellData, train_rows: jax.Array, ambient_profile, kl_weight):
        shuffle_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.step)
        rows = jax.random.permutation(shuffle_key, train_rows)
        n_full = rows.shape[0] // batch_size
        n_rest = rows.shape[0] - n_full * batch_size
        total = EpochSums(*(jnp.float32(0.0) for _ in EpochSums._fields))

        def body(state, minibatch_rows):
            return train_step(state, shard_minibatch(data.batch(minibatch_rows), mesh), ambient_profile, kl_weight)

        if n_full > 0:
            minibatches = rows[: n_full * batch_size].reshape(n_full, batch_size)
            state, sums = jax.lax.scan(body, state, minibatches, unroll=max(1, min(unroll, n_full)))
            total = EpochSums(*(s.sum() for s in sums))
        if n_rest > 0:
            state, sums = body(state, rows[n_full * batch_size :])
            total = EpochSums(*(a + b for a, b in zip(total, sums, strict=True)))
        return state, total

    return train_epoch


def make_evaluate(
    net: SCARNet, config: SCARConfig, batch_size: int, mesh: jax.sharding.Mesh | None = None
) -> Callable[..., EpochSums]:
    """Jitted evaluation-mode sums over ``rows`` of resident data (validation), in minibatches (split over
    the ``mesh``'s devices when given)."""

    @jax.jit
    def evaluate(variables, data: CellData, rows: jax.Array, ambient_profile, kl_weight, key):
        n = rows.shape[0]
        n_chunks = -(-n // batch_size)
        padded = jnp.concatenate([rows, jnp.zeros(n_chunks * batch_size - n, rows.dtype)])
        mask = (jnp.arange(n_chunks * batch_size) < n).reshape(n_chunks, batch_size)
        cell_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(padded).reshape(n_chunks, batch_size)

        def one(args):
            chunk, keys, valid = args
            batch = shard_minibatch(data.batch(chunk), mesh)
            terms, _ = loss_terms(net, config, variables, batch, ambient_profile, keys, kl_weight, False)
            rec = jnp.where(valid, terms.reconstruction_loss, 0.0)
            kl = jnp.where(valid, terms.kl_local, 0.0)
            return rec.sum(), kl.sum()

        rec, kl = jax.lax.map(one, (padded.reshape(n_chunks, batch_size), cell_keys, mask))
        rec, kl = rec.sum(), kl.sum()
        return EpochSums(rec + kl_weight * kl, rec, kl, jnp.float32(n))

    return evaluate


@functools.lru_cache(maxsize=16)
def compiled_training(
    config: SCARConfig,
    batch_size: int,
    lr: float = 1e-3,
    eps: float = 0.01,
    weight_decay: float = 1e-6,
    devices: tuple[jax.Device, ...] | None = None,
    unroll: int = 1,
    gradient_clip: tuple[float, str] | None = None,
    max_steps: int | None = None,
) -> tuple[optax.GradientTransformation, Callable[..., tuple[TrainState, EpochSums]], Callable[..., EpochSums]]:
    """The optimizer, compiled epoch and compiled validation for a configuration, built once per process.

    Models with the same configuration and training settings share compiled code, so training a second
    model (or training again) does not compile again. Several ``devices``: data parallel over them.
    ``unroll``: optimizer steps per scan iteration (:func:`make_train_epoch`). ``gradient_clip`` and
    ``max_steps``: :func:`make_optimizer` and :func:`make_train_epoch`.
    """
    net = config.make_net()
    tx = make_optimizer(lr, eps, weight_decay, gradient_clip)
    mesh = data_parallel_mesh(devices) if devices is not None and len(devices) > 1 else None
    epoch = make_train_epoch(net, config, tx, batch_size, mesh, unroll, max_steps)
    return tx, epoch, make_evaluate(net, config, batch_size, mesh)


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


# ---------------------------------------------------------------------------------------------- orchestration
def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def model_keys(seed: int) -> jax.Array:
    """The three keys of a model with this seed: initialisation, training, prediction."""
    return jax.random.split(jax.random.key(int(seed)), 3)


def template_state(config: SCARConfig, seed: int) -> TrainState:
    """The freshly initialised train state of a model (the structure a saved state is read into)."""
    init_key, train_key, _ = model_keys(seed)
    variables = init_variables(config.make_net(), init_key, config.n_genes)
    return init_train_state(variables, make_optimizer(), train_key)


Split = tuple[np.ndarray, np.ndarray, np.ndarray]


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


def _place_cells(cells: Any, chosen: list[jax.Device], rows: Split, block_cells: Any, batch_size: int, compiled):
    """``(train_epoch, evaluate, data, train_rows, validation_rows, placement)`` for the cells: resident on one
    device, replicated over several, sharded over processes, or streamed in blocks (sparse or on disk)."""
    from . import backed, distributed  # they import this module
    from .counts import to_device

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
        )
        return train_epoch, evaluate, None, train_idx, np.empty(len(val_idx)), placement
    if multi_process:  # each process reads its own rows (also from disk) onto its own devices
        data = distributed.shard_cells(cells.x, cells.library, cells.batch_index, cells.max_count, mesh)
        train_rows = distributed.put(np.asarray(train_idx, np.int32), placement)
        val_rows = distributed.put(np.asarray(val_idx, np.int32), placement)
        return train_epoch, evaluate, data, train_rows, val_rows, placement
    data = CellData(
        to_device(cells.x, placement, cells.max_count),
        jax.device_put(cells.library, placement),
        jax.device_put(cells.batch_index, placement),
    )
    train_rows = jax.device_put(jnp.asarray(train_idx, jnp.int32), placement)
    val_rows = jax.device_put(jnp.asarray(val_idx, jnp.int32), placement)
    return train_epoch, evaluate, data, train_rows, val_rows, placement


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
        cells, chosen, split, block_cells, batch_size, compiled
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
