"""AnnData in, arrays out: the setup record, input validation and the ambient profile argument.

This module and :mod:`scar_jax.model` are the only places that touch AnnData. ``setup_anndata``
writes one documented field, ``adata.uns["_scar_jax"]``; nothing else in the user's AnnData changes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .backed import BackedCounts, prefetch
from .posterior import HostCells

UNS_KEY = "_scar_jax"
HOST_CHUNK_ENTRIES = 1 << 20  # stored entries per step of the host-side passes below (bounds their temporaries)


class CountSummary(NamedTuple):
    """What one validating pass over a count matrix learns: per-cell and per-gene totals, the largest count."""

    row_sums: np.ndarray  # (n_cells,) float64
    column_sums: np.ndarray  # (n_genes,) float64
    max_count: float


def row_chunks(x: np.ndarray | sp.spmatrix) -> list[slice]:
    """Row slices of ``x`` holding about ``HOST_CHUNK_ENTRIES`` stored entries each."""
    n = x.shape[0]
    stored = x.nnz if sp.issparse(x) or isinstance(x, BackedCounts) else x.size
    step = max(1, int(HOST_CHUNK_ENTRIES * n // max(stored, 1)))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


@dataclasses.dataclass(frozen=True)
class AnnDataSpec:
    """Where the model finds its data in an AnnData (the ``setup_anndata`` arguments)."""

    layer: str | None = None
    batch_key: str | None = None
    labels_key: str | None = None
    size_factor_key: str | None = None
    batch_categories: tuple[str, ...] = ("0",)
    labels_categories: tuple[str, ...] = ("0",)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnnDataSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(str(c) for c in v) if k.endswith("categories") else v for k, v in d.items() if k in known}
        return cls(**kw)


def _check_obs_key(adata: anndata.AnnData, key: str | None, name: str) -> None:
    if key is not None and key not in adata.obs:
        raise ValueError(f"{name}={key!r} is not a column of adata.obs; available: {list(adata.obs.columns)[:20]}")


def categories(adata: anndata.AnnData, key: str | None) -> tuple[str, ...]:
    if key is None:
        return ("0",)
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has missing values; fill them or drop those cells")
    if isinstance(col.dtype, pd.CategoricalDtype):
        return tuple(str(c) for c in col.cat.categories)
    return tuple(sorted({str(v) for v in col}))


def setup_anndata(
    adata: anndata.AnnData,
    batch_key: str | None = None,
    labels_key: str | None = None,
    layer: str | None = None,
    size_factor_key: str | None = None,
) -> AnnDataSpec:
    """Validate the keys and counts, and record the setup in ``adata.uns["_scar_jax"]`` (no copy of X).

    Refused (``ValueError``/``TypeError`` naming the field): counts that are not finite non-negative
    integers, cells with zero counts, an empty AnnData, unknown keys. Genes with zero counts in every
    cell are accepted with a ``UserWarning`` (see :func:`warn_zero_genes`).
    """
    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an anndata.AnnData, got {type(adata).__name__}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"layer={layer!r} is not in adata.layers; available: {list(adata.layers.keys())}")
    _check_obs_key(adata, batch_key, "batch_key")
    _check_obs_key(adata, labels_key, "labels_key")
    _check_obs_key(adata, size_factor_key, "size_factor_key")
    spec = AnnDataSpec(
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        batch_categories=categories(adata, batch_key),
        labels_categories=categories(adata, labels_key),
    )
    field = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    counts = get_counts(adata, spec)
    summary = validate_counts(counts, field)
    warn_zero_genes(summary.column_sums, adata.var_names, field)
    adata.uns[UNS_KEY] = spec.to_dict()
    return spec


def warn_zero_genes(column_totals: np.ndarray, var_names: pd.Index, field: str) -> None:
    """Warn (do not refuse) when genes have zero counts in every cell.

    Real matrices often keep such genes. They are harmless: their default ambient share is 0 and every
    likelihood gives them probability 1 with finite gradients, so training is unaffected and their
    count-preserving denoised counts are 0. They only cost memory and time.
    """
    zero = np.flatnonzero(column_totals == 0)
    if zero.size:
        names = [str(name) for name in var_names[zero[:5]]]
        warnings.warn(
            f"{field} has {zero.size} of {len(var_names)} genes with zero counts in every cell (e.g. {names}); "
            "they are kept but carry no information: remove them with scanpy.pp.filter_genes(adata, min_counts=1)",
            UserWarning,
            stacklevel=4,
        )


def read_spec(adata: anndata.AnnData) -> AnnDataSpec:
    if UNS_KEY not in adata.uns:
        raise ValueError("adata was not set up: call scar_jax.SCAR.setup_anndata(adata, ...) first")
    return AnnDataSpec.from_dict(dict(adata.uns[UNS_KEY]))


def get_counts(adata: anndata.AnnData, spec: AnnDataSpec) -> np.ndarray | sp.csr_matrix | BackedCounts:
    """The count matrix ``(n_cells, n_genes)`` named by the setup: CSR or dense, not copied when possible;
    a CSR matrix on disk (backed h5ad, zarr) stays there as :class:`scar_jax.backed.BackedCounts`."""
    x = adata.X if spec.layer is None else adata.layers[spec.layer]
    if x is None:
        raise ValueError("adata.X is None; pass the counts layer to setup_anndata(layer=...)")
    if isinstance(x, anndata.abc.CSRDataset):
        return BackedCounts(x)
    if isinstance(x, anndata.abc.CSCDataset):
        raise ValueError(
            "adata.X is a CSC matrix on disk, which cannot be read by cells; write the file with a CSR X "
            "(adata.X = scipy.sparse.csr_matrix(adata.X)) to use it out of core, or load it with adata.to_memory()"
        )
    if sp.issparse(x):
        return x if sp.isspmatrix_csr(x) else sp.csr_matrix(x)
    if hasattr(x, "to_memory"):  # backed / lazy arrays
        x = x.to_memory()
    return np.asarray(x)


def validate_counts(x: np.ndarray | sp.spmatrix | BackedCounts, field: str) -> CountSummary:
    """Counts must be finite, non-negative integers; every cell needs at least one count.

    One pass over row chunks (bounded temporaries; a matrix on disk is read once, the next chunk in the
    background), which also returns the row and column sums and the largest count.
    """
    dtype = x.dtype
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{field} must hold numbers (raw counts), got dtype {dtype}")
    floating = np.issubdtype(dtype, np.floating)
    totals, largest, genes = [], 0.0, np.zeros(x.shape[1], np.float64)
    for block in prefetch(x[rows] for rows in row_chunks(x)):
        chunk = block.data if sp.issparse(block) else np.asarray(block).reshape(-1)
        totals.append(np.asarray(block.sum(axis=1), np.float64).ravel())
        genes += np.asarray(block.sum(axis=0), np.float64).ravel()
        if chunk.size == 0:
            continue
        largest = max(largest, float(chunk.max()))
        if floating and not np.isfinite(chunk).all():
            raise ValueError(f"{field} contains NaN or infinite values; SCAR needs raw integer counts")
        if chunk.min() < 0:
            raise ValueError(f"{field} contains negative values; SCAR needs raw integer counts, not normalised data")
        if floating and not np.array_equal(chunk, np.round(chunk)):
            raise ValueError(
                f"{field} contains non-integer values; SCAR needs raw counts (use setup_anndata(layer='counts') "
                "if the raw counts are in a layer)"
            )
    totals = np.concatenate(totals) if totals else np.zeros(0)
    if (totals == 0).any():
        raise ValueError(
            f"{field} has {(totals == 0).sum()} cells with zero counts; remove them "
            "(e.g. adata = adata[adata.X.sum(axis=1) > 0])"
        )
    return CountSummary(totals, genes, largest)


def check_genes(adata: anndata.AnnData, var_names: np.ndarray) -> None:
    """The genes of ``adata`` must be the model's, in the same order."""
    if adata.n_vars != len(var_names) or not np.array_equal(np.asarray(adata.var_names), var_names):
        raise ValueError(
            f"adata.var_names do not match the genes the model was trained on ({adata.n_vars} vs "
            f"{len(var_names)} genes, or a different order); subset and reorder with adata[:, model_var_names]"
        )


def read_cells(
    adata: anndata.AnnData, spec: AnnDataSpec, gene_likelihood: str, rows: np.ndarray | None = None
) -> HostCells:
    """Counts, per-cell library ``(n, 1)`` and batch index ``(n,)`` of ``adata`` as the setup says.

    ``rows``: only these cells will be used (in-memory counts): only their counts are validated and
    their libraries computed; the other rows' libraries are NaN and ``gene_totals`` is ``None``. A
    call for a few cells of a large AnnData then costs in proportion to those cells, not to the whole
    matrix (measured on 2 CPU cores: the latent representation of 1,000 of 200,000 cells x 2,000 genes
    takes 0.07 s once compiled, where validating the whole matrix alone took 0.5-1.0 s).
    """
    x = get_counts(adata, spec)
    field = "adata.X" if spec.layer is None else f"adata.layers[{spec.layer!r}]"
    if rows is None:
        summary = validate_counts(x, field)
        library, gene_totals = summary.row_sums.reshape(-1, 1), summary.column_sums
    else:
        selected = np.unique(np.asarray(rows, np.int64))
        summary = validate_counts(x[selected], field)
        library, gene_totals = np.full((adata.n_obs, 1), np.nan), None
        library[selected, 0] = summary.row_sums
    if spec.size_factor_key is not None:
        if gene_likelihood == "b":
            raise ValueError(
                "size_factor_key cannot be used with gene_likelihood='b' (the binomial total count is the "
                "observed library); use 'poisson', 'nb' or 'zinb'"
            )
        _check_obs_key(adata, spec.size_factor_key, "size_factor_key")
        library = np.asarray(adata.obs[spec.size_factor_key], dtype=np.float64).reshape(-1, 1)
        if not (np.isfinite(library).all() and (library > 0).all()):
            raise ValueError(f"adata.obs[{spec.size_factor_key!r}] (size_factor_key) must be positive and finite")
    return HostCells(x, library.astype(np.float32), batch_index(adata, spec), summary.max_count, gene_totals)


def batch_index(adata: anndata.AnnData, spec: AnnDataSpec) -> np.ndarray:
    """Integer batch code of every cell, ``(n,)``, against the categories seen at setup."""
    if spec.batch_key is None:
        return np.zeros(adata.n_obs, np.int32)
    _check_obs_key(adata, spec.batch_key, "batch_key")
    values = adata.obs[spec.batch_key].astype(str).to_numpy()
    codes = pd.Categorical(values, categories=list(spec.batch_categories)).codes
    if (codes < 0).any():
        unseen = sorted(set(values[codes < 0]))[:5]
        raise ValueError(f"adata.obs[{spec.batch_key!r}] has batch categories unseen at setup: {unseen}")
    return codes.astype(np.int32)


def resolve_ambient_profile(
    adata: anndata.AnnData, ambient_profile: Any, spec: AnnDataSpec, gene_totals: np.ndarray
) -> np.ndarray:
    """The ambient profile argument of ``SCAR`` as a ``(n_profiles, n_genes)`` float32 matrix.

    ``None``: the mean profile of the cells (scvi-tools' default). ``str``: a key of ``adata.varm``
    (or ``adata.var``). An array ``(n_genes,)``, ``(n_genes, 1)`` or ``(n_genes, n_batches)`` (one column
    per batch category), or a DataFrame indexed by gene names (matched by name). Each profile must be
    finite, non-negative and not all zero; one that does not sum to 1 (within 1e-3) is normalised
    with a warning. ``gene_totals`` ``(n_genes,)``: the cells' counts per gene (``HostCells.gene_totals``).
    """
    if ambient_profile is None:
        profile = np.asarray(gene_totals, np.float64).reshape(-1, 1)
        source = "the mean profile of the cells"
    elif isinstance(ambient_profile, str):
        source = f"ambient_profile={ambient_profile!r}"
        if ambient_profile in adata.varm:
            profile = adata.varm[ambient_profile]
        elif ambient_profile in adata.var:
            profile = adata.var[ambient_profile]
        else:
            raise ValueError(f"{source} is neither a key of adata.varm nor of adata.var")
        profile = np.asarray(profile, dtype=np.float64)
    elif isinstance(ambient_profile, pd.DataFrame | pd.Series):
        source = "ambient_profile (DataFrame)"
        frame = ambient_profile.to_frame() if isinstance(ambient_profile, pd.Series) else ambient_profile
        missing = adata.var_names.difference(frame.index)
        if len(missing):
            raise ValueError(f"{source} lacks {len(missing)} genes of adata, e.g. {list(missing[:5])}")
        profile = frame.loc[adata.var_names].to_numpy(dtype=np.float64)
    else:
        source = "ambient_profile"
        profile = np.asarray(ambient_profile, dtype=np.float64)
    profile = profile.reshape(-1, 1) if profile.ndim == 1 else profile
    if profile.ndim != 2 or profile.shape[0] != adata.n_vars:
        raise ValueError(f"{source} must have one row per gene ({adata.n_vars}), got shape {profile.shape}")
    n_batches = len(spec.batch_categories)
    if profile.shape[1] not in (1, n_batches):
        raise ValueError(f"{source} must have 1 or {n_batches} (one per batch) columns, got {profile.shape[1]}")
    if not np.isfinite(profile).all() or (profile < 0).any():
        raise ValueError(f"{source} must be finite and non-negative")
    sums = profile.sum(axis=0)
    if (sums <= 0).any():
        raise ValueError(f"{source} is all zero; give a profile with positive mass")
    if ambient_profile is not None and np.abs(sums - 1.0).max() > 1e-3:
        warnings.warn(f"{source} does not sum to 1 (sums {sums}); normalising it", UserWarning, stacklevel=3)
    return (profile / sums).T.astype(np.float32)


def match_raw_genes(adata: anndata.AnnData, raw_adata: anndata.AnnData) -> np.ndarray:
    """Positions in ``raw_adata.var_names`` of each gene of ``adata`` (matched by name)."""
    if not isinstance(raw_adata, anndata.AnnData):
        raise TypeError(f"raw_adata must be an anndata.AnnData, got {type(raw_adata).__name__}")
    if not raw_adata.var_names.is_unique:
        raise ValueError("raw_adata.var_names are not unique; call raw_adata.var_names_make_unique() first")
    positions = raw_adata.var_names.get_indexer(adata.var_names)
    if (positions < 0).any():
        missing = list(adata.var_names[positions < 0][:5])
        raise ValueError(
            f"{int((positions < 0).sum())} genes of adata are not in raw_adata.var_names, e.g. {missing}; "
            "raw_adata must be the unfiltered droplet matrix of the same experiment"
        )
    return positions


def raw_counts(raw_adata: anndata.AnnData) -> sp.csr_matrix:
    """The raw droplets' counts as CSR (validated: finite, non-negative integers; zero droplets allowed)."""
    x = raw_adata.X
    if x is None:
        raise ValueError("raw_adata.X is None; it must hold the raw droplet counts")
    x = sp.csr_matrix(x) if not sp.isspmatrix_csr(x) else x
    values = x.data
    if values.size and (
        not np.isfinite(values).all() or values.min() < 0 or not np.array_equal(values, np.round(values))
    ):
        raise ValueError("raw_adata.X must hold raw counts (finite, non-negative integers)")
    return x


def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
