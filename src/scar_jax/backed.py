"""Counts that stay on disk: an ``.h5ad`` opened backed or a zarr store, read in row blocks.

Out-of-core work has three parts, each a small piece here:

* :class:`BackedCounts` gives row access to a CSR matrix on disk (anndata's sparse dataset) with the few
  array operations scar-jax's host code uses (``shape``, ``nnz``, ``x[rows]``), so validation, library
  sizes, the ambient profile and chunked inference read it block by block;
* :func:`prefetch` reads the next block in a background thread while the device works on the current one;
* :func:`streamed_training` trains on blocks of consecutive training cells, each spanning about
  ``block_cells`` rows of the file (a multiple of the minibatch size of training cells): each block is
  read from disk (contiguous rows), put on the device in the narrow CSR format of :mod:`scar_jax.counts`, padded to
  fixed capacities so that the compiled epoch is reused, and the compiled epoch runs over its cells.

Shuffling is per block ("block shuffling", as out-of-core loaders do): the order of the blocks is
permuted every epoch and the minibatches are drawn from one block at a time, shuffled within it. With
one block holding every training cell the result equals in-memory training (tested); with several, the
minibatches differ (cells only meet cells of their block), so train with blocks of many cells (default
65,536 rows of the file) when the file is sorted by sample.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import anndata
import jax
import numpy as np
import scipy.sparse as sp

from .counts import CsrCounts, aligned_empty, narrow_dtypes
from .likelihoods import cell_log_constants, has_log_constant

DEFAULT_BLOCK_CELLS = 65_536


# ---------------------------------------------------------------------------------------------- reading
class BackedCounts:
    """Row access to a CSR count matrix on disk (``anndata.abc.CSRDataset``: backed h5ad or zarr).

    ``x[a:b]`` and ``x[rows]`` (any integer rows, repeats allowed) return in-memory ``csr_matrix`` blocks;
    an array of rows is read as the one contiguous range it spans, so callers pass nearby rows.
    """

    def __init__(self, dataset: anndata.abc.CSRDataset):
        if not isinstance(dataset, anndata.abc.CSRDataset):
            raise TypeError(
                f"out-of-core counts must be a CSR matrix on disk, got {type(dataset).__name__}; write the file "
                "with a CSR X (adata.X = scipy.sparse.csr_matrix(adata.X)) or load it into memory"
            )
        self.dataset = dataset
        self.shape = tuple(int(s) for s in dataset.shape)
        self.indptr = np.asarray(dataset.group["indptr"][...], np.int64)  # (n_cells + 1,): small
        self.nnz = int(self.indptr[-1])
        self.dtype = np.dtype(dataset.group["data"].dtype)

    def __getitem__(self, rows: Any) -> sp.csr_matrix:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step)]
            return sp.csr_matrix(self.dataset[start:stop]) if stop > start else sp.csr_matrix((0, self.shape[1]))
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).ravel()
        if rows.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        low, high = int(rows.min()), int(rows.max()) + 1
        return self[low:high][rows - low]


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate over ``items`` with the next ``depth`` of them produced in a background thread.

    Reading (disk, decompression, densifying) then overlaps with the device's work. An exception raised
    while producing an item is raised here, at that item.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put((None, err))
        q.put((done, None))

    thread = threading.Thread(target=produce, daemon=True, name="scar-jax-prefetch")
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)


def read_backed(path: str | Path) -> anndata.AnnData:
    """Open counts on disk without loading ``X``: an ``.h5ad`` file (``backed="r"``) or a zarr store.

    ``obs`` and ``var`` are read into memory; ``X`` (CSR) stays on disk. The AnnData can be given to
    :meth:`SCAR.setup_anndata` and ``SCAR`` like any other: training and the out-of-core methods stream
    ``X`` in blocks.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if path.is_dir():  # zarr store
        import zarr
        from anndata.io import read_elem, sparse_dataset

        group = zarr.open(str(path), mode="r")
        if "X" not in group:
            raise ValueError(f"{path} has no X; write it with AnnData.write_zarr")
        return anndata.AnnData(X=sparse_dataset(group["X"]), obs=read_elem(group["obs"]), var=read_elem(group["var"]))
    return anndata.read_h5ad(path, backed="r")


# ---------------------------------------------------------------------------------------------- blocks
class BlockPlan(NamedTuple):
    """Blocks of consecutive selected cells and the fixed capacities every block is padded to."""

    groups: list[np.ndarray]  # selected rows of each block, sorted (file positions)
    row_capacity: int  # most file rows any block spans
    nnz_capacity: int  # most stored entries any block's span holds


def plan_blocks(indptr: np.ndarray, rows: np.ndarray, block_cells: int, multiple: int = 1) -> BlockPlan:
    """Cut sorted ``rows`` into blocks that each span about ``block_cells`` rows of the file.

    A block holds ``ceil(block_cells x len(rows) / n_cells)`` selected cells rounded up to a multiple of
    ``multiple`` (the minibatch size, so that only the last block has a partial minibatch), so sparse
    selections (e.g. 10% validation cells) do not read ten times ``block_cells`` rows per block. The
    capacities (most file rows and stored entries of any block's span) come from the file's ``indptr``.
    """
    rows = np.sort(np.asarray(rows, np.int64))
    n_file_rows = max(len(indptr) - 1, 1)
    per_block = math.ceil(block_cells * len(rows) / n_file_rows / multiple) * multiple
    per_block = max(per_block, multiple, 1)
    groups = [rows[i : i + per_block] for i in range(0, len(rows), per_block)]
    spans = [(int(g[0]), int(g[-1]) + 1) for g in groups]
    row_capacity = max((b - a for a, b in spans), default=1)
    nnz_capacity = max((int(indptr[b] - indptr[a]) for a, b in spans), default=1)
    return BlockPlan(groups, max(row_capacity, 1), max(nnz_capacity, 1))


class HostBlock(NamedTuple):
    """One block on the host, padded: CSR arrays, library and batch index of its span, local cell rows."""

    indptr: np.ndarray  # (row_capacity + 1,) int32
    indices: np.ndarray  # (nnz_capacity,) uint16 or int32
    data: np.ndarray  # (nnz_capacity,) uint16 or float32
    library: np.ndarray  # (row_capacity, 1) float32
    batch_index: np.ndarray  # (row_capacity,) int32
    rows: np.ndarray  # (len(group),) int32: the selected cells, relative to the span's first row
    log_constant: np.ndarray | None = None  # (row_capacity,) float32: each row's sum_g c(x_g), or None


def read_block(
    counts: BackedCounts,
    group: np.ndarray,
    plan: BlockPlan,
    library: np.ndarray,
    batch_index: np.ndarray,
    index_dtype: type,
    data_dtype: type,
    gene_likelihood: str | None = None,
) -> HostBlock:
    """Read the file rows spanned by ``group`` and pad them to the plan's capacities (host side); with a
    ``gene_likelihood`` that has one, each row's parameter-free log-likelihood too
    (:func:`scar_jax.likelihoods.cell_log_constants`, the values the resident data would carry)."""
    first, stop = int(group[0]), int(group[-1]) + 1
    block = counts[first:stop]
    if not block.has_canonical_format:
        block.sum_duplicates()
        if data_dtype == np.uint16 and block.nnz and block.data.max() > np.iinfo(np.uint16).max:
            raise ValueError(
                "the counts on disk have duplicate entries whose sums exceed 65,535; rewrite the file with a "
                "canonical CSR matrix (X.sum_duplicates())"
            )
    n_rows, nnz = stop - first, block.nnz
    constant = None
    if gene_likelihood is not None and has_log_constant(gene_likelihood):
        constant = np.zeros(plan.row_capacity, np.float32)
        constant[:n_rows] = cell_log_constants(gene_likelihood, block, library[first:stop])
    # filled straight into 64-byte aligned buffers: on the CPU backend they become the device arrays
    indptr = aligned_empty(plan.row_capacity + 1, np.int32)
    indptr[: n_rows + 1] = block.indptr
    indptr[n_rows + 1 :] = nnz
    indices = aligned_empty(plan.nnz_capacity, index_dtype)
    indices[:nnz] = block.indices
    indices[nnz:] = 0
    data = aligned_empty(plan.nnz_capacity, data_dtype)
    data[:nnz] = block.data
    data[nnz:] = 0
    del block
    lib = np.ones((plan.row_capacity, 1), np.float32)
    lib[:n_rows] = library[first:stop]
    bidx = np.zeros(plan.row_capacity, np.int32)
    bidx[:n_rows] = batch_index[first:stop]
    return HostBlock(indptr, indices, data, lib, bidx, (group - first).astype(np.int32), constant)


def blocks_on_device(
    counts: BackedCounts,
    plan: BlockPlan,
    order: np.ndarray,
    library: np.ndarray,
    batch_index: np.ndarray,
    dtypes: tuple[type, type],
    device: Any,
    gene_likelihood: str | None = None,
    constants: dict[int, np.ndarray | None] | None = None,
) -> Iterator[tuple[Any, jax.Array]]:
    """``(CellData, local rows)`` for the plan's blocks in ``order``; the next block is read in the background.
    ``gene_likelihood``: the blocks carry each cell's parameter-free log-likelihood (:func:`read_block`);
    ``constants``, by block index, keeps them from the first read of a block to the next (computed once per
    block, not every epoch; about 4 bytes a cell)."""
    from .train import CellData

    def read(i: int) -> HostBlock:
        known = None if constants is None else constants.get(i)
        law = gene_likelihood if known is None else None
        block = read_block(counts, plan.groups[i], plan, library, batch_index, *dtypes, law)
        if known is not None:
            return block._replace(log_constant=known)
        if constants is not None:
            constants[i] = block.log_constant
        return block

    max_row_nnz = int(np.diff(counts.indptr).max(initial=0))
    for block in prefetch((read(i) for i in order), depth=1):  # host memory: this block, the next one, one being read
        csr = CsrCounts(
            jax.device_put(block.indptr, device),
            jax.device_put(block.indices, device),
            jax.device_put(block.data, device),
            n_genes=counts.shape[1],
            max_row_nnz=max_row_nnz,
        )
        constant = None if block.log_constant is None else jax.device_put(block.log_constant, device)
        data = CellData(csr, jax.device_put(block.library, device), jax.device_put(block.batch_index, device), constant)
        yield data, jax.device_put(block.rows, device)


def streamed_training(
    train_epoch: Callable[..., Any],
    evaluate: Callable[..., Any],
    counts: BackedCounts,
    library: np.ndarray,
    batch_index: np.ndarray,
    train_rows: np.ndarray,
    validation_rows: np.ndarray,
    block_cells: int,
    max_count: float,
    device: Any,
    batch_size: int = 128,
    gene_likelihood: str | None = None,
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(epoch, evaluate)`` with the signatures :func:`scar_jax.fit.fit` expects, streaming blocks from disk.
    With ``gene_likelihood`` the blocks carry each cell's parameter-free log-likelihood, as resident data do.

    The block order of an epoch is a permutation drawn from ``(state.key, state.step)``, like every other
    random choice of training; the ``data`` and ``rows`` arguments ``fit`` passes are ignored.
    """
    from .train import EpochSums

    dtypes = narrow_dtypes(counts.shape[1], max_count)
    train_plan = plan_blocks(counts.indptr, train_rows, block_cells, batch_size)
    val_plan = plan_blocks(counts.indptr, validation_rows, block_cells) if len(validation_rows) else None
    train_constants, val_constants = {}, {}  # each block's parameter-free log-likelihood, from its first read

    def add(total: EpochSums | None, sums: EpochSums) -> EpochSums:
        return sums if total is None else EpochSums(*(a + b for a, b in zip(total, sums, strict=True)))

    def epoch(state, _data, _rows, ambient_profile, kl_weight):
        key = jax.random.fold_in(jax.random.fold_in(state.key, 3), state.step)
        order = np.asarray(jax.random.permutation(key, len(train_plan.groups)))
        total = None
        options = (dtypes, device, gene_likelihood, train_constants)
        for data, rows in blocks_on_device(counts, train_plan, order, library, batch_index, *options):
            state, sums = train_epoch(state, data, rows, ambient_profile, kl_weight)
            total = add(total, sums)
        return state, total

    def streamed_evaluate(variables, _data, _rows, ambient_profile, kl_weight, key):
        total = None
        order = np.arange(len(val_plan.groups))
        options = (dtypes, device, gene_likelihood, val_constants)
        blocks = blocks_on_device(counts, val_plan, order, library, batch_index, *options)
        for i, (data, rows) in enumerate(blocks):  # cell keys fold in local rows: one stream per block
            block_key = key if len(order) == 1 else jax.random.fold_in(key, i)
            total = add(total, evaluate(variables, data, rows, ambient_profile, kl_weight, block_key))
        return total

    return epoch, streamed_evaluate
