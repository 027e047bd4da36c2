"""AnnData in, arrays out: the setup record, input validation and the ambient profile argument.

This module and :mod:`scar_jax.model` are the only places that touch AnnData. ``setup_anndata``
writes one documented field, ``adata.uns["_scar_jax"]``; nothing else in the user's AnnData changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any, Literal, NamedTuple

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


def check_unique_genes(adata: anndata.AnnData, name: str = "adata") -> None:
    """``ValueError`` when ``adata.var_names`` has duplicates: profiles and outputs are keyed by gene name."""
    names = adata.var_names
    if not names.is_unique:
        duplicated = names[names.duplicated(keep=False)]
        examples = list(dict.fromkeys(map(str, duplicated)))[:5]
        raise ValueError(
            f"{name}.var_names has {len(duplicated)} genes with duplicated names (e.g. {examples}); ambient "
            "profiles and outputs are keyed by gene name, so the result would be ambiguous. Call "
            f"{name}.var_names_make_unique() first (it renames the repeats GENE-1, GENE-2, ...), or sum the "
            "duplicates into one gene"
        )


def categories(adata: anndata.AnnData, key: str | None) -> tuple[str, ...]:
    if key is None:
        return ("0",)
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has missing values; fill them or drop those cells")
    if isinstance(col.dtype, pd.CategoricalDtype):
        return tuple(str(c) for c in col.cat.categories)
    return tuple(sorted({str(v) for v in col}))


SETUP_KEYS = ("layer", "batch_key", "labels_key", "size_factor_key")


def setup_anndata(adata: anndata.AnnData, keys: dict[str, str | None]) -> AnnDataSpec:
    """Validate the keys and counts, and record the setup in ``adata.uns["_scar_jax"]`` (no copy of X).

    ``keys``: ``layer``, ``batch_key``, ``labels_key`` and ``size_factor_key`` of ``SCAR.setup_anndata`` (an
    absent one is ``None``).

    Refused (``ValueError``/``TypeError`` naming the field): counts that are not finite non-negative
    integers, cells with zero counts, an empty AnnData, duplicated gene names, unknown keys. Genes with
    zero counts in every cell are accepted with a ``UserWarning`` (see :func:`warn_zero_genes`).
    """
    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an anndata.AnnData, got {type(adata).__name__}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    check_unique_genes(adata)
    layer, batch_key, labels_key, size_factor_key = (keys.get(k) for k in SETUP_KEYS)
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


def counts_field(adata: anndata.AnnData, spec: AnnDataSpec) -> Any:
    """The object stored where the setup says the counts are (``adata.X`` or the layer), as it is.

    This module is the only reader of the counts' field: every other module goes through here or
    :func:`get_counts`."""
    return adata.X if spec.layer is None else adata.layers[spec.layer]


def counts_are_sparse(adata: anndata.AnnData, spec: AnnDataSpec) -> bool:
    """Whether the counts are a sparse matrix, in memory or on disk (CSR dataset), without reading them."""
    x = counts_field(adata, spec)
    return sp.issparse(x) or isinstance(x, anndata.abc.CSRDataset)


def select_rows(n_obs: int, indices: Any) -> np.ndarray:
    """Cell positions ``(m,)`` from a boolean mask or integer positions (negative ones counted from the end)."""
    rows = np.asarray(indices)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
        raise ValueError("indices must be a non-empty 1-d sequence of integer cell positions")
    if rows.min() < -n_obs or rows.max() >= n_obs:
        raise ValueError(f"indices out of range for {n_obs} cells")
    return rows % n_obs


def get_counts(adata: anndata.AnnData, spec: AnnDataSpec) -> np.ndarray | sp.csr_matrix | BackedCounts:
    """The count matrix ``(n_cells, n_genes)`` named by the setup: CSR or dense, not copied when possible;
    a CSR matrix on disk (backed h5ad, zarr) stays there as :class:`scar_jax.backed.BackedCounts`."""
    x = counts_field(adata, spec)
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
    matrix.
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
    if ambient_profile is not None:
        _warn_ambient_zeros(profile, gene_totals, source)
    return (profile / sums).T.astype(np.float32)


def _warn_ambient_zeros(profile: np.ndarray, gene_totals: np.ndarray | None, source: str) -> None:
    """Warn when genes the cells count have ambient frequency 0 in a given profile ``(n_genes, n_profiles)``.

    Their counts are kept whole as native by every count-preserving method (the ambient cannot produce them),
    which is right for genes that are truly absent from the ambient and wrong for genes that a shallow sample
    of cell-free droplets just missed."""
    zero = (profile <= 0).any(axis=1)
    totals = None if gene_totals is None else np.asarray(gene_totals, np.float64).ravel()
    if totals is not None:
        zero &= totals > 0
    if not zero.any():
        return
    share = "" if totals is None else f", carrying {totals[zero].sum() / max(totals.sum(), 1.0):.2%} of the counts"
    warnings.warn(
        f"{source} is 0 on {int(zero.sum())} genes the cells express{share}: their counts are kept whole as native "
        "(the ambient cannot produce them). If the profile comes from a shallow sample of cell-free droplets, "
        "estimate it with SCAR.get_ambient_profile(adata, raw_adata), whose posterior gives unseen genes a small "
        "ambient frequency",
        UserWarning,
        stacklevel=4,
    )


def match_raw_genes(adata: anndata.AnnData, raw_adata: anndata.AnnData) -> np.ndarray:
    """Positions in ``raw_adata.var_names`` of each gene of ``adata`` (matched by name)."""
    if not isinstance(raw_adata, anndata.AnnData):
        raise TypeError(f"raw_adata must be an anndata.AnnData, got {type(raw_adata).__name__}")
    check_unique_genes(adata)
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


def raw_droplet_groups(
    adata: anndata.AnnData, raw_adata: anndata.AnnData, batch_key: str | None
) -> tuple[sp.csr_matrix, list[np.ndarray]]:
    """The raw droplets' counts on ``adata``'s genes and their rows per batch (one group without a batch key).

    ``batch_key=None`` takes the setup's batch key when ``raw_adata.obs`` has that column too; the groups
    follow the setup's category order (``ValueError`` for a batch without droplets)."""
    genes = match_raw_genes(adata, raw_adata)
    if batch_key is None and UNS_KEY in adata.uns:
        setup_key = read_spec(adata).batch_key
        batch_key = setup_key if setup_key is not None and setup_key in raw_adata.obs else None
    raw = raw_counts(raw_adata)
    if not np.array_equal(genes, np.arange(raw.shape[1])):  # no copy when the genes already match
        raw = raw[:, genes]
    if batch_key is None:
        return raw, [np.arange(raw_adata.n_obs)]
    if batch_key not in raw_adata.obs or batch_key not in adata.obs:
        raise ValueError(f"batch_key={batch_key!r} must be a column of both adata.obs and raw_adata.obs")
    names = read_spec(adata).batch_categories if UNS_KEY in adata.uns else categories(adata, batch_key)
    labels = raw_adata.obs[batch_key].astype(str).to_numpy()
    groups = [np.flatnonzero(labels == c) for c in names]
    for c, g in zip(names, groups, strict=True):
        if len(g) == 0:
            raise ValueError(f"raw_adata has no droplets of batch {c!r} (raw_adata.obs[{batch_key!r}])")
    return raw, groups


def calibrate_model(
    model,
    adata=None,
    n_neighbours: int = 50,
    n_iter: int = 50,
    alpha: float = 1.0,
    expressed_prior_odds: float = 0.1,
    batch_size: int | None = None,
    share_at: Literal["all", "observed"] = "all",
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> tuple[np.ndarray, np.ndarray | sp.csr_matrix]:
    """:func:`scar_jax.calibration.calibrate` for a trained :class:`scar_jax.SCAR`: its counts (``X`` or the setup's
    layer, read whole: backed counts are loaded), latent representation and ambient profile(s) (one per batch when
    it has several). Returns the calibrated noise ratio ``(n,)`` and native share ``(n, G)``."""
    from .calibration import _check_metric, calibrate

    _check_metric(metric)  # before the latent pass
    adata = model.adata if adata is None else adata
    profile = np.asarray(model.ambient_profile, np.float64)  # (n_batches, G): one row per batch, or one
    batches = batch_index(adata, model.spec) if profile.shape[0] > 1 else None  # checked against the setup
    x = counts_field(adata, model.spec)
    if isinstance(x, anndata.abc.CSRDataset | anndata.abc.CSCDataset):  # backed: the calibration needs all cells
        x = x.to_memory()
    elif not isinstance(x, np.ndarray) and not sp.issparse(x):  # e.g. an h5py or zarr dense array on disk
        x = np.asarray(x[...])
    latent = model.get_latent_representation(adata, batch_size=batch_size)
    ambient = profile if batches is not None else profile[0]
    return calibrate(x, latent, ambient, batches, n_neighbours, n_iter, alpha, expressed_prior_odds, share_at, metric)


def calibration_digest(adata, spec: AnnDataSpec, profile: np.ndarray, batch_index=None) -> str | None:
    """A digest (blake2b) of what a calibration reads from ``adata``: the counts (``X`` or the setup's layer), the
    ambient ``profile`` and the batch of each cell (``batch_index``, with more than one profile).

    ``None`` when the counts are not in memory (backed: reading them to hash costs what it saves). Hashing costs a
    small fraction of the calibration it lets :class:`scar_jax.SCAR` skip."""
    x = counts_field(adata, spec)
    if sp.issparse(x):
        parts = [x.data, x.indices, x.indptr]
    elif isinstance(x, np.ndarray):
        parts = [x]
    else:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((type(x).__name__, x.shape, str(x.dtype))).encode())
    for part in [*parts, np.asarray(profile), *([] if batch_index is None else [np.asarray(batch_index)])]:
        digest.update(np.ascontiguousarray(part))
    return digest.hexdigest()
