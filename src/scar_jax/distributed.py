"""Training over several processes (``jax.distributed``): each process holds its own rows of the cells.

Multi-process training is the data parallel training of :func:`scar_jax.train.make_train_epoch` on a mesh
spanning the devices of every process (JAX's multi-controller model: every process runs the same program on
its own devices, and XLA's collectives connect them: NCCL on GPUs, the TPU interconnect, gloo on CPUs). The
compiled epoch is the one-process one; only the placement of the data differs:

* the cells are cut into one contiguous range of rows per device (:func:`row_bounds`), and each process reads
  only the rows of its own devices (from memory, or from disk for counts opened with
  :func:`scar_jax.backed.read_backed`) and puts them on those devices (:func:`shard_cells`);
* the parameters, the optimizer state, the training rows and the ambient profile are replicated;
* a minibatch is the same global draw as in one process: every device densifies the chosen cells it holds
  and a sum over the devices (one all-reduce of the minibatch, exact for counts) gives the whole minibatch
  to all (:class:`ShardedCellData`), which XLA then splits over the devices as in one process;
* the gradients and the BatchNorm moments are all-reduced by XLA, so the parameters stay identical on every
  process, and they equal those of one process up to float32 summation order.

Launch: ``jax.distributed.initialize()`` in every process before any other JAX call, then the same script
(``docs/distributed.md``). With one process only the device selection (:func:`training_devices`) is used.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.sharding import NamedSharding, PartitionSpec

from .backed import BlockPlan, read_block
from .counts import CsrCounts, DenseCounts, narrow_dtypes
from .train import Counts
from .vae import Batch


def select_device(accelerator: str, devices: int | str | list[int]) -> jax.Device:
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


def select_devices(accelerator: str, devices: int | str | list[int]) -> list[jax.Device]:
    """The devices to train on, with PyTorch Lightning's meaning of ``devices`` (as scvi-tools passes it).

    ``"auto"``: one device; an int ``n``: the first ``n`` devices (``-1``: all); a list: those indices.
    """
    if devices in ("auto", None):
        return [select_device(accelerator, "auto")]
    available = jax.devices(select_device(accelerator, "auto").platform)
    if isinstance(devices, list | tuple):
        return [select_device(accelerator, [int(i)]) for i in devices]
    count = len(available) if int(devices) == -1 else int(devices)
    if not 1 <= count <= len(available):
        raise ValueError(
            f"devices={devices!r}: {len(available)} {available[0].platform} device(s) here; pass a number from 1 to "
            f"{len(available)}, -1 for all, or a list of indices"
        )
    return available[:count]


def training_devices(
    accelerator: str, devices: int | str | list[int], batch_size: int, single_process_only: bool
) -> list[jax.Device]:
    """The devices ``train`` uses: :func:`select_devices`, or with several processes every process's own
    (:func:`process_devices`; ``single_process_only``: ``ValueError``); ``batch_size`` must divide over them."""
    chosen = select_devices(accelerator, devices)
    if is_multi_process():  # jax.distributed: the devices of every process, each holding its own rows
        chosen = process_devices(chosen[0].platform, devices)
        if single_process_only:
            raise ValueError("checkpoint_dir and block_cells are not supported with several processes")
    if len(chosen) > 1 and batch_size % len(chosen):
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the number of devices ({len(chosen)}) for data "
            "parallel training"
        )
    return chosen


def is_multi_process() -> bool:
    """Whether JAX runs as several processes (``jax.distributed.initialize`` with more than one)."""
    return jax.process_count() > 1


def process_devices(platform: str, devices: int | str | list[int] = "auto") -> list[jax.Device]:
    """The devices of a multi-process training: the first ``n`` devices of every process, process by process.

    ``devices`` counts the devices of each process: ``"auto"`` one, an int ``n`` the first ``n``, ``-1`` all.
    Every process must have as many (``ValueError`` otherwise, and for a list of indices).
    """
    per_process: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(platform), key=lambda d: (d.process_index, d.id)):
        per_process.setdefault(device.process_index, []).append(device)
    fewest = min(len(local) for local in per_process.values())
    if isinstance(devices, list | tuple):
        raise ValueError(
            f"devices={devices!r}: with several processes, devices is a count per process ('auto': one, n, or -1 "
            "for all), not a list of indices"
        )
    count = 1 if devices in ("auto", None) else fewest if int(devices) == -1 else int(devices)
    if not 1 <= count <= fewest:
        raise ValueError(
            f"devices={devices!r}: the processes have {fewest} {platform} device(s) each (at least); pass a number "
            f"from 1 to {fewest}, or -1 for all"
        )
    return [device for p in sorted(per_process) for device in per_process[p][:count]]


def put(tree: Any, placement: jax.Device | jax.sharding.Sharding) -> Any:
    """``jax.device_put(tree, placement)``, also for a sharding spanning other processes' devices.

    Then every process passes the same host values and each one fills its own devices' shards
    (``jax.make_array_from_callback``); typed PRNG keys are placed as their key data.
    """
    if not isinstance(placement, jax.sharding.Sharding) or placement.is_fully_addressable:
        return jax.device_put(tree, placement)

    def one(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, placement, lambda index: host[index])

    return jax.tree.map(one, tree)


def one_replica(tree: Any, device: jax.Device) -> Any:
    """Replicated arrays on one device: ``device`` when this process holds every copy, else its own first copy.

    After a multi-process training the parameters are replicated on every process; each process keeps its
    own copy for inference.
    """

    def one(leaf: jax.Array) -> jax.Array:
        if leaf.is_fully_addressable:
            return jax.device_put(leaf, device)
        if not leaf.is_fully_replicated:
            raise ValueError("only replicated arrays have a copy on every process")
        return leaf.addressable_data(0)

    return jax.tree.map(one, tree)


def row_bounds(n_cells: int, n_devices: int) -> tuple[int, ...]:
    """``(n_devices + 1,)`` row bounds: device ``g`` holds rows ``bounds[g]:bounds[g + 1]`` (sizes differ by <= 1)."""
    if n_cells < n_devices:
        raise ValueError(f"{n_cells} cells cannot be shared among {n_devices} devices (at least one each)")
    return tuple(n_cells * g // n_devices for g in range(n_devices + 1))


class ShardedCellData(flax.struct.PyTreeNode):
    """Training data split by rows over the devices of a mesh (one contiguous range of cells per device).

    Every leaf has a leading axis of one entry per device of the mesh's ``"data"`` axis, each padded to the
    most rows (and stored entries) any device holds. :meth:`batch` has the meaning of
    :meth:`scar_jax.train.CellData.batch` (global row numbers in, the dense minibatch out), so the compiled
    epoch and validation take either.
    """

    counts: Counts  # leaves (n_devices, ...): DenseCounts (n_devices, rows, G) or CsrCounts of each device's rows
    library: jax.Array  # (n_devices, rows, 1) float32
    batch_index: jax.Array  # (n_devices, rows) int32
    bounds: tuple[int, ...] = flax.struct.field(pytree_node=False)  # (n_devices + 1,) first rows, then n_cells
    mesh: jax.sharding.Mesh = flax.struct.field(pytree_node=False)

    def batch(self, rows: jax.Array) -> Batch:
        """The minibatch of global ``rows`` ``(b,)``: each device densifies the rows it holds (zeros for the
        others) and a sum over the devices (an all-reduce, exact: one non-zero term per entry) joins them."""
        bounds = jnp.asarray(self.bounds, rows.dtype)

        def local(counts: Counts, library: jax.Array, batch_index: jax.Array, rows: jax.Array) -> Batch:
            g = jax.lax.axis_index("data")
            first, stop = bounds[g], bounds[g + 1]
            mine = (rows >= first) & (rows < stop)
            local_rows = jnp.where(mine, rows - first, 0)
            counts = jax.tree.map(lambda a: a[0], counts)
            x = jnp.where(mine[:, None], counts.take(local_rows), 0.0)
            lib = jnp.where(mine[:, None], library[0][local_rows], 0.0)
            bidx = jnp.where(mine, batch_index[0][local_rows], 0)
            return jax.lax.psum(Batch(x, lib, bidx), "data")

        spec = PartitionSpec("data")
        return jax.shard_map(
            local, mesh=self.mesh, in_specs=(spec, spec, spec, PartitionSpec()), out_specs=PartitionSpec()
        )(self.counts, self.library, self.batch_index, rows)


def shard_cells(
    x: Any,
    library: np.ndarray,
    batch_index: np.ndarray,
    max_count: float,
    mesh: jax.sharding.Mesh,
) -> ShardedCellData:
    """Put each device's rows of the cells on it, reading only the rows of this process's devices.

    Parameters
    ----------
    x
        Counts ``(n_cells, n_genes)``: dense, ``scipy.sparse`` CSR or :class:`scar_jax.backed.BackedCounts`
        (read by rows from disk). Every process passes the same cells; each reads only its own rows.
    library, batch_index
        ``(n_cells, 1)`` float32 and ``(n_cells,)`` int32 of every cell.
    max_count
        The largest count of all cells (it picks the device dtypes, which must agree across processes).
    mesh
        The training mesh (axis ``"data"``), its devices ordered process by process (:func:`process_devices`).

    Returns
    -------
    ShardedCellData
        Sparse counts as :class:`~scar_jax.counts.CsrCounts` per device, dense ones as
        :class:`~scar_jax.counts.DenseCounts`.
    """
    devices = list(mesh.devices.ravel())
    bounds = row_bounds(x.shape[0], len(devices))
    mine = [g for g, d in enumerate(devices) if d.process_index == jax.process_index()]
    rows_capacity = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    library = np.asarray(library, np.float32).reshape(-1, 1)
    batch_index = np.asarray(batch_index, np.int32)
    if isinstance(x, np.ndarray):
        blocks, lib, bidx = _dense_blocks(x, library, batch_index, bounds, mine, rows_capacity)
        counts: Counts = DenseCounts(_global_array(mesh, blocks))
    else:
        counts, lib, bidx = _sparse_counts(x, library, batch_index, bounds, mine, rows_capacity, max_count, mesh)
    return ShardedCellData(counts, _global_array(mesh, lib), _global_array(mesh, bidx), bounds, mesh)


def _global_array(mesh: jax.sharding.Mesh, leaves: dict[int, np.ndarray]) -> jax.Array:
    """One array split over the mesh's ``"data"`` axis, ``(n_devices, *block shape)``, from this process's
    blocks ``{device number in the mesh: block}``."""
    devices = list(mesh.devices.ravel())
    shape = (len(devices), *next(iter(leaves.values())).shape)
    arrays = [jax.device_put(leaves[g][None], devices[g]) for g in sorted(leaves)]
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, PartitionSpec("data")), arrays)


def _pad(values: np.ndarray, rows: int, fill: float | int) -> np.ndarray:
    """``values`` with ``fill`` rows appended up to ``rows`` rows."""
    out = np.full((rows, *values.shape[1:]), fill, values.dtype)
    out[: len(values)] = values
    return out


def _dense_blocks(
    x: np.ndarray, library: np.ndarray, batch_index: np.ndarray, bounds: tuple[int, ...], mine: list[int], rows: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per device of this process, its float32 counts, library and batch index, padded to ``rows`` rows (counts
    0, library 1, batch 0)."""
    own = {g: slice(bounds[g], bounds[g + 1]) for g in mine}
    return (
        {g: _pad(np.asarray(x[r], np.float32), rows, 0.0) for g, r in own.items()},
        {g: _pad(library[r], rows, 1.0) for g, r in own.items()},
        {g: _pad(batch_index[r], rows, 0) for g, r in own.items()},
    )


def _sparse_counts(
    x: Any,
    library: np.ndarray,
    batch_index: np.ndarray,
    bounds: tuple[int, ...],
    mine: list[int],
    rows: int,
    max_count: float,
    mesh: jax.sharding.Mesh,
) -> tuple[CsrCounts, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Sparse or on-disk counts as :class:`~scar_jax.counts.CsrCounts` over the mesh, each process reading only its
    devices' rows; with their library and batch index blocks (:func:`scar_jax.backed.read_block`)."""
    n_genes = x.shape[1]
    if sp.issparse(x):
        x = sp.csr_matrix(x)
    indptr = np.asarray(x.indptr, np.int64)
    nnz = [int(indptr[b] - indptr[a]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if max(nnz) >= 2**31:
        raise ValueError(
            f"one device's rows hold {max(nnz)} stored counts, past the 2**31 of int32 offsets; train on more devices"
        )
    groups = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    plan = BlockPlan(groups, rows, max(max(nnz), 1))
    dtypes = narrow_dtypes(n_genes, max_count)
    read = {g: read_block(x, groups[g], plan, library, batch_index, *dtypes) for g in mine}  # own rows only
    counts = CsrCounts(
        _global_array(mesh, {g: b.indptr for g, b in read.items()}),
        _global_array(mesh, {g: b.indices for g, b in read.items()}),
        _global_array(mesh, {g: b.data for g, b in read.items()}),
        n_genes=n_genes,
        max_row_nnz=int(np.diff(indptr).max(initial=0)),
    )
    return counts, {g: b.library for g, b in read.items()}, {g: b.batch_index for g, b in read.items()}
