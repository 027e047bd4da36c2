"""Training: the train state, the optimizer, one compiled epoch and the compiled validation pass.

The host-side loop that runs the epochs (:func:`scar_jax.fit.fit`) and a model's whole training run
(:func:`scar_jax.fit.fit_model`) are in :mod:`scar_jax.fit`; their names stay importable from here.

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

import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .counts import CsrCounts, DenseCounts, EllCounts
from .nets import SCARNet
from .vae import Batch, SCARConfig, init_variables, loss_terms

Counts = DenseCounts | CsrCounts | EllCounts
Split = tuple[np.ndarray, np.ndarray, np.ndarray]  # train, validation, test cell indices (split_indices)


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
    """Device-resident training data: counts plus per-cell library ``(n, 1)`` and batch index ``(n,)``, and
    optionally each cell's parameter-free log-likelihood ``(n,)`` (:attr:`scar_jax.vae.Batch.log_constant`)."""

    counts: Counts
    library: jax.Array
    batch_index: jax.Array
    log_constant: jax.Array | None = None

    def batch(self, rows: jax.Array) -> Batch:
        constant = None if self.log_constant is None else self.log_constant[rows]
        return Batch(self.counts.take(rows), self.library[rows], self.batch_index[rows], constant)


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
    return jax.lax.with_sharding_constraint(batch, Batch(*(None if a is None else sharding for a in batch)))


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
