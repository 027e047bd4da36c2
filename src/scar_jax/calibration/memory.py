"""The calibration's memory contract in bytes, and the pre-flight check against what the process can use.

:func:`memory_needed` is an upper bound of what :func:`scar_jax.calibration.calibrate` and the split of its
shares hold beyond the counts, from sizes only (nothing is allocated); :func:`check_memory` compares it with
:func:`available_memory` and raises a ``ValueError`` naming the largest part and the fix before anything large is
allocated.
"""

from __future__ import annotations

import ctypes
import resource
import shutil
import tempfile
from typing import Any

from ..denoise import _SPLIT_ENTRIES
from .blocks import _GATHER_ENTRIES, _HOST_ENTRIES, BLOCK_ENTRIES, CHUNK_ENTRIES, ENTRY_BYTES
from .knn import _AFFINITY_ENTRIES, _KNN_DISTANCE_ENTRIES, NEIGHBOUR_CANDIDATES

_DEVICE_ENTRY_BYTES = 64  # device bytes per entry of a block: its fields and the float32 temporaries of a round
_CELL_BYTES = 256  # per-cell vectors besides the neighbourhoods (float64 host and float32 device, a few dozen)
_CANDIDATE_BYTES = 16  # per latent candidate of a cell: the search's heaps and graph copies, the int64 candidates
_SEARCH_BYTES = 1 << 29  # the approximate search's working memory beyond its per-cell arrays (threads, numba)
_SPLIT_BYTES = 32  # per count of a chunk of the split: float64 and int64 counts, float64 shares, int64 draws
_HOST_ENTRY_BYTES = 96  # per cell x gene of the building chunk: its CSR copies, the union, the fields in float64
_RUNTIME_BYTES = 1 << 30  # compiled code and caches: the loop's XLA programs, the neighbour search's numba code
_SPARSE_BYTES = 12  # per stored count of a CSR copy: float64 value and int32 index

# the parts of the contract, with what lowers each (the error names the largest)
_FIXES = {
    "neighbour candidates": "fewer neighbours (n_neighbours) or neighbour_candidates=1",
    "neighbourhoods": "fewer neighbours (n_neighbours)",
    "per-cell vectors": "fewer cells per call (calibrate a subset), or method='split'",
    "result": "method='split' (no calibration), or fewer cells per call",
    "denoised counts": "method='split' (no calibration), or fewer cells per call",
    "runtime": "method='split' (no calibration)",
    "blocks of stored entries": "a smaller block_entries",
    "building chunk": "fewer neighbours (n_neighbours), or method='split'",
    "chunks of rows": "a smaller chunk_entries",
    "dense share": "share_at='observed' with sparse counts",
    "canonical copy of the counts": "canonical CSR counts (sorted indices, no duplicates: x.sum_duplicates())",
}


def memory_terms(
    n_cells: int,
    n_genes: int,
    nnz: int,
    n_neighbours: int = 50,
    *,
    neighbour_candidates: int = NEIGHBOUR_CANDIDATES,
    block_entries: int = BLOCK_ENTRIES,
    chunk_entries: int = CHUNK_ENTRIES,
    n_batches: int = 1,
    share_at: str = "observed",
    ambient_gaps: bool = False,
) -> dict[str, int]:
    """The parts of :func:`memory_needed` in bytes, by name (sizes only; nothing is allocated). ``ambient_gaps``:
    some gene is absent from every ambient profile (the observed share then masks the counts of the others)."""
    n, g, nnz = int(n_cells), int(n_genes), int(nnz)
    k = min(int(n_neighbours), n)
    candidates = min(n, int(neighbour_candidates) * k)
    observed = share_at == "observed"
    index_bytes = 4 if nnz < 2**31 else 8  # the counts' (and so the denoised counts') column indices
    terms = {
        "neighbour candidates": n * candidates * _CANDIDATE_BYTES
        + _SEARCH_BYTES
        + max(_KNN_DISTANCE_ENTRIES * 24, _AFFINITY_ENTRIES * 16),  # exact: distances, their product, order
        "neighbourhoods": n * k * (8 + 4),  # host int64 and device int32
        "per-cell vectors": n * (_CELL_BYTES + 16 * int(n_batches)),
        # float32 share at the counts (their index arrays shared), with the gaps a mask and the masked shares
        "result": nnz * (4 + (5 if ambient_gaps else 0)) if observed else 0,
        # calibrated_split's CSR float32 and its own indices, and one chunk of draws; dense: its float64 and int64
        # counts and draws and the float32 result
        "denoised counts": nnz * (4 + index_bytes) + (n + 1) * 8 + _SPLIT_ENTRIES * _SPLIT_BYTES
        if observed
        else n * g * 28,
        "runtime": _RUNTIME_BYTES,
        "blocks of stored entries": int(block_entries) * (3 * ENTRY_BYTES + _DEVICE_ENTRY_BYTES),
        "building chunk": _HOST_ENTRIES * _HOST_ENTRY_BYTES + max(_GATHER_ENTRIES, k * g) * 2 * _SPARSE_BYTES,
        "chunks of rows": int(chunk_entries) * 4 * 8 + g * int(n_batches) * 8,
        "dense share": 0 if observed else n * g * (8 + 4 + 8),  # float64 host, float32 device, full
    }
    return terms


def memory_needed(n_cells: int, n_genes: int, nnz: int, n_neighbours: int = 50, **options: Any) -> int:
    """An upper bound, in bytes, of the memory a calibration of ``(n_cells, n_genes)`` counts with ``nnz`` stored
    entries and the count-preserving split that follows it (:func:`scar_jax.denoise.calibrated_split`) hold beyond
    the counts themselves (host and device together; on a CPU device they are one), a sum over the phases.

    .. code-block:: text

        n (16 m + 12 k + 256 + 16 b) + (8 + i) nnz + 8 (n + 1) + block_entries (3 x 21 + 64)
          + 32 chunk_entries + S + H + R   [+ 5 nnz when a gene is absent from every ambient profile]

    with ``k = n_neighbours``, ``m = neighbour_candidates k`` latent candidates (16 bytes each: the approximate
    search's heaps and graph copies, the int64 candidates; the affinities are ranked a chunk of rows at a time),
    ``b`` batches, ``4 nnz`` the float32 share at the observed counts (the result; it shares the counts' index
    arrays), ``(4 + i) nnz + 8 (n + 1)`` the denoised counts (float32, and column indices of ``i`` bytes as the
    counts': 4 below 2^31 stored counts, else 8), 21 bytes an entry of a block read back from the spill (three in
    flight) and 64 of device temporaries, ``S`` = 512 MiB the approximate search's working memory, ``H`` the
    constant chunks (the building chunk, the distance and affinity chunks, the profiles, the split's chunk of
    2^22 counts at 32 bytes each; a few hundred MB) and ``R`` = 1 GiB for compiled code (XLA, numba). With
    ``share_at="all"`` the share and the denoised counts are dense, ``20 n G + 28 n G`` instead of their ``nnz``
    and ``n + 1`` terms. The stored entries themselves are on disk (:func:`check_disk`). ``options``: the
    keywords of :func:`memory_terms`, which gives the parts.
    """
    return sum(memory_terms(n_cells, n_genes, nnz, n_neighbours, **options).values())


def release_freed_memory() -> None:
    """Return the pages the C heap holds freed to the system (glibc's ``malloc_trim(0)``; nothing where there is
    none). Between the calibration's phases the freed temporaries otherwise stay resident and the next phase's
    large arrays, mapped afresh, come on top of them."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _read_int(path: str, key: str | None = None) -> int | None:
    """An integer from a file (its first word, or the value of ``key:`` in kB), ``None`` if unreadable/absent."""
    try:
        with open(path) as f:
            if key is None:
                word = f.read().split()[0]
                return None if word == "max" else int(word)
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> int | None:
    """Bytes this process can still use: the least of ``MemAvailable`` (``/proc/meminfo``), the cgroup's
    ``memory.max`` less its ``memory.current``, and ``RLIMIT_AS`` less the process's ``VmSize``; each read
    defensively (``None`` when none can be read)."""
    found = []
    if (meminfo := _read_int("/proc/meminfo", "MemAvailable")) is not None:
        found.append(meminfo)
    limit = _read_int("/sys/fs/cgroup/memory.max")
    if limit is not None:
        found.append(limit - (_read_int("/sys/fs/cgroup/memory.current") or 0))
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        soft = resource.RLIM_INFINITY
    if soft != resource.RLIM_INFINITY:
        found.append(soft - (_read_int("/proc/self/status", "VmSize") or 0))
    return max(0, min(found)) if found else None


def check_memory(needed: int, available: int | None = None, terms: dict[str, int] | None = None) -> None:
    """Raise a ``ValueError`` when ``needed`` bytes exceed ``available`` (default :func:`available_memory`; no
    check when it cannot be read), naming the largest of ``terms`` (:func:`memory_terms`) and its fix."""
    available = available_memory() if available is None else int(available)
    if available is None or needed <= available:
        return
    largest = max(terms, key=terms.get) if terms else None
    part = "" if largest is None else f"; the largest part is the {largest} ({terms[largest] / 2**30:.2f} GiB)"
    fix = _FIXES.get(largest, "a smaller block_entries, fewer neighbours (n_neighbours)")
    raise ValueError(
        f"the calibration needs about {needed / 2**30:.2f} GiB beyond the counts but this process can use "
        f"{available / 2**30:.2f} GiB{part}: use {fix}; or method='split', which needs no calibration"
    )


def check_disk(needed: int, directory: str | None = None) -> None:
    """Raise a ``ValueError`` when the spill of the stored entries (``needed`` bytes) does not fit in the free
    space of the temporary directory (``tempfile.gettempdir()``, set by ``TMPDIR``)."""
    directory = tempfile.gettempdir() if directory is None else directory
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if needed > free:
        raise ValueError(
            f"the calibration spills up to {needed / 2**30:.2f} GiB of stored neighbourhood entries to "
            f"{directory!r}, which has {free / 2**30:.2f} GiB free: set TMPDIR to a larger disk, use fewer "
            f"neighbours (n_neighbours), or method='split'"
        )


__all__ = ["available_memory", "check_disk", "check_memory", "memory_needed", "memory_terms", "release_freed_memory"]
