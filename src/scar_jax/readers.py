"""Reading the count files users have: 10x Genomics h5 (v2 and v3), 10x mtx folders and ``.h5ad``.

The 10x formats are read with scanpy (``scanpy.read_10x_h5(..., gex_only=False)``,
``scanpy.read_10x_mtx``), the reference readers of the scverse ecosystem, so every Cell Ranger
version scanpy supports works here; ``.h5ad`` with anndata. On top of them this module

- detects the format from the file's content (a folder with ``matrix.mtx(.gz)``, an HDF5 file with
  ``/matrix`` (v3) or ``/<genome>/`` (v2), or an AnnData file), whatever the name;
- keeps the features of one type of a multi-modal file, named either as scar-jax names them
  (:data:`scar_jax.features.FEATURE_TYPES`) or as 10x does (:data:`TENX_FEATURE_TYPES`);
- makes the feature names unique (after subsetting, so ``CD4`` the antibody stays ``CD4`` when only
  antibodies are kept);
- turns every failure (missing path, unreadable file, unknown or absent feature type) into a one-line
  ``ValueError`` that names the file.

Examples
--------
>>> from scar_jax import readers
>>> adata = readers.read("filtered_feature_bc_matrix.h5", feature_type="ADT")  # doctest: +SKIP
>>> raw = readers.read("raw_feature_bc_matrix.h5", feature_type="ADT")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import features as _features

__all__ = [
    "TENX_FEATURE_TYPES",
    "detect_format",
    "read",
    "read_10x_h5",
    "read_10x_mtx",
    "read_h5ad",
    "resolve_feature_type",
    "select_feature_type",
    "write_10x_h5",
]

TENX_FEATURE_TYPES: dict[str, tuple[str, ...]] = {
    "mRNA": ("Gene Expression",),
    "ADT": ("Antibody Capture",),
    "sgRNA": ("CRISPR Guide Capture",),
    "CMO": ("Multiplexing Capture",),
    "tag": ("Multiplexing Capture", "Custom"),
    "ATAC": ("Peaks",),
}
"""The 10x ``feature_type`` values kept for each scar-jax feature type.

Hashtags (``tag``) are CellPlex ``Multiplexing Capture`` or ``Custom`` features; hashtag antibodies
that Cell Ranger files as ``Antibody Capture`` next to other antibodies cannot be told apart by type
(select them by name in Python and pass an ``.h5ad``)."""

FEATURE_TYPE_COLUMNS = ("feature_types", "feature_type")
"""``var`` columns holding the feature type (scanpy writes ``feature_types``)."""

_DUPLICATE_WARNING = r".*(names are not unique|Variable names are not unique).*"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def resolve_feature_type(feature_type: str) -> tuple[str, tuple[str, ...]]:
    """The scar-jax feature type and the 10x ``feature_type`` values to keep for ``feature_type``.

    ``feature_type`` is a scar-jax type (``"mRNA"``, ``"ADT"``, ``"sgRNA"``, ``"CMO"``, ``"tag"``,
    ``"ATAC"``) or a 10x type (``"Gene Expression"``, ``"Antibody Capture"``, ``"CRISPR Guide
    Capture"``, ``"Multiplexing Capture"``, ``"Custom"``, ``"Peaks"``), case-insensitive.

    >>> resolve_feature_type("sgrna")
    ('sgRNA', ('CRISPR Guide Capture',))
    >>> resolve_feature_type("Antibody Capture")
    ('ADT', ('Antibody Capture',))
    """
    if not isinstance(feature_type, str):
        raise ValueError(f"feature type must be a string, got {type(feature_type).__name__}")
    key = " ".join(feature_type.split()).lower()
    for name, tenx in TENX_FEATURE_TYPES.items():
        if key == name.lower():
            return name, tenx
    for name, tenx in TENX_FEATURE_TYPES.items():
        for t in tenx:
            if key == t.lower():
                return ("tag", (t,)) if t == "Custom" else (name, (t,))
    tenx_names = sorted({t for ts in TENX_FEATURE_TYPES.values() for t in ts})
    raise ValueError(
        f"unknown feature type {feature_type!r}; use one of {', '.join(_features.FEATURE_TYPES)} "
        f"or a 10x type ({', '.join(tenx_names)})"
    )


def detect_format(path: str | Path) -> str:
    """``"10x_h5"``, ``"10x_mtx"`` or ``"h5ad"`` from the content at ``path``; ``ValueError`` otherwise."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or directory")
    if p.is_dir():
        if any((p / f).is_file() for f in ("matrix.mtx.gz", "matrix.mtx")):
            return "10x_mtx"
        raise ValueError(
            f"{p}: a folder without matrix.mtx(.gz); a 10x mtx folder holds matrix.mtx.gz, features.tsv.gz "
            "and barcodes.tsv.gz (v3) or matrix.mtx, genes.tsv and barcodes.tsv (v2)"
        )
    if p.name.endswith((".mtx", ".mtx.gz")):
        return "10x_mtx"
    try:
        is_hdf5 = h5py.is_hdf5(p)
    except OSError as err:
        raise ValueError(f"{p}: cannot read ({_one_line(err)})") from err
    if not is_hdf5:
        raise ValueError(f"{p}: not a 10x .h5, an .h5ad or a 10x mtx folder (not an HDF5 file)")
    try:
        with h5py.File(p, "r") as f:
            if "matrix" in f:
                return "10x_h5"
            if f.attrs.get("encoding-type") == "anndata" or ("X" in f and "obs" in f):
                return "h5ad"
            groups = [f[k] for k in f if isinstance(f[k], h5py.Group)]
            if groups and all("barcodes" in g and "gene_names" in g for g in groups):
                return "10x_h5"
    except OSError as err:
        raise ValueError(f"{p}: cannot read ({_one_line(err)})") from err
    raise ValueError(f"{p}: an HDF5 file but neither a 10x feature-barcode matrix (/matrix) nor an AnnData")


def _set_legacy_types(adata: anndata.AnnData) -> anndata.AnnData:
    # v2 files (Cell Ranger < 3) hold gene expression only and have no feature types
    if not any(c in adata.var for c in FEATURE_TYPE_COLUMNS):
        adata.var["feature_types"] = "Gene Expression"
    return adata


def read_10x_h5(path: str | Path, genome: str | None = None) -> anndata.AnnData:
    """A 10x ``*_feature_bc_matrix.h5`` (v3+, every feature type) or v2 ``*_gene_bc_matrices_h5.h5``.

    Through ``scanpy.read_10x_h5(path, genome=genome, gex_only=False)``: counts in ``X`` (CSR,
    float32 for 10x's int32 counts), ``var["gene_ids"]``, ``var["feature_types"]`` (``"Gene
    Expression"`` for v2 files) and the other feature metadata. Feature names are *not* made unique
    here (see :func:`read`).
    """
    import scanpy as sc

    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DUPLICATE_WARNING)
            adata = sc.read_10x_h5(p, genome=genome, gex_only=False)
    except Exception as err:  # scanpy raises bare Exception for missing datasets
        raise ValueError(f"{p}: not a readable 10x h5 file ({_one_line(err)})") from err
    return _set_legacy_types(adata)


def read_10x_mtx(path: str | Path) -> anndata.AnnData:
    """A 10x mtx folder (v3: ``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``; v2: ``genes.tsv``).

    Through ``scanpy.read_10x_mtx(path, gex_only=False, make_unique=False)``; a path to the
    ``matrix.mtx(.gz)`` file itself reads its folder.
    """
    import scanpy as sc

    p = Path(path)
    folder = p.parent if p.is_file() else p
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DUPLICATE_WARNING)
            adata = sc.read_10x_mtx(folder, var_names="gene_symbols", make_unique=False, gex_only=False)
    except Exception as err:
        raise ValueError(f"{p}: not a readable 10x mtx folder ({_one_line(err)})") from err
    if sp.issparse(adata.X) and not sp.isspmatrix_csr(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    return _set_legacy_types(adata)


def read_h5ad(path: str | Path) -> anndata.AnnData:
    """An ``.h5ad`` file; its ``X`` must hold the raw counts."""
    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DUPLICATE_WARNING)
            return anndata.read_h5ad(p)
    except Exception as err:
        raise ValueError(f"{p}: not a readable .h5ad file ({_one_line(err)})") from err


def select_feature_type(
    adata: anndata.AnnData, feature_type: str | None, source: str = "the data"
) -> tuple[anndata.AnnData, str]:
    """Keep the features of one type: ``(subset AnnData, scar-jax feature type)``.

    Features are selected by ``var["feature_types"]`` (or ``var["feature_type"]``) against
    :func:`resolve_feature_type`; an AnnData without such a column is taken to hold only features of
    the requested type. ``feature_type=None`` keeps everything (type ``"mRNA"``). Raises
    ``ValueError`` (naming ``source``) when no feature has the requested type.
    """
    if feature_type is None:
        return adata, "mRNA"
    name, tenx = resolve_feature_type(feature_type)
    column = next((c for c in FEATURE_TYPE_COLUMNS if c in adata.var), None)
    if column is None:
        return adata, name
    types = adata.var[column].astype(str).to_numpy()
    keep = np.isin(types, tenx)
    if not keep.any():
        present = ", ".join(f"{t!r}" for t in pd.unique(types)) or "none"
        wanted = " or ".join(repr(t) for t in tenx)
        raise ValueError(f"{source} has no {name} features ({wanted}); its feature types: {present}")
    if keep.all():
        return adata, name
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DUPLICATE_WARNING)
        return adata[:, keep].copy(), name


def read(path: str | Path, feature_type: str | None = None, genome: str | None = None) -> anndata.AnnData:
    """Read counts from a 10x h5 (v2/v3), a 10x mtx folder or an ``.h5ad``, optionally one feature type.

    Parameters
    ----------
    path
        The file or folder; the format is detected from its content (:func:`detect_format`).
    feature_type
        Keep only these features (:func:`select_feature_type`): a scar-jax type (``"mRNA"``, ``"ADT"``,
        ``"sgRNA"``, ``"CMO"``, ``"tag"``, ``"ATAC"``) or a 10x type (``"Gene Expression"``,
        ``"Antibody Capture"``, ...). ``None`` keeps all features.
    genome
        For 10x h5 files: keep this genome's features (v2 files with several genomes need it).

    Returns
    -------
    anndata.AnnData
        Droplets x features, counts in ``X`` (CSR for 10x files), unique ``var_names`` (``-1``,
        ``-2``, ... appended to repeats after subsetting), the file's feature metadata in ``var``.

    Raises
    ------
    ValueError
        One line naming the file: missing path, unreadable or unrecognised file, unknown feature
        type, or a feature type the file does not hold.
    """
    if feature_type is not None:
        resolve_feature_type(feature_type)  # an unknown type fails before any reading
    fmt = detect_format(path)
    if fmt == "10x_h5":
        adata = read_10x_h5(path, genome=genome)
    elif fmt == "10x_mtx":
        adata = read_10x_mtx(path)
    else:
        adata = read_h5ad(path)
    if adata.X is None:
        raise ValueError(f"{path}: X is empty; it must hold the counts")
    adata, _ = select_feature_type(adata, feature_type, source=str(path))
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def write_10x_h5(adata: anndata.AnnData, path: str | Path, genome: str = "GRCh38") -> None:
    """Write ``adata`` (droplets x features, integer counts in ``X``) as a 10x v3 feature-barcode h5.

    The layout Cell Ranger documents: ``/matrix/{barcodes, data, indices, indptr, shape}`` with the
    features x barcodes matrix in CSC form and ``/matrix/features/{id, name, feature_type, genome,
    _all_tag_keys}``. Feature types come from ``var["feature_types"]`` (default ``"Gene
    Expression"``), ids from ``var["gene_ids"]`` (default: the names). Useful to try ``scar-jax
    denoise`` on simulated data.
    """
    import h5py

    x = sp.csr_matrix(adata.X)
    if x.data.size and not np.array_equal(x.data, np.round(x.data)):
        raise ValueError("write_10x_h5 needs integer counts in X")
    n_obs, n_vars = x.shape
    names = np.asarray(adata.var_names).astype(str)
    ids = adata.var["gene_ids"].astype(str).to_numpy() if "gene_ids" in adata.var else names
    if "feature_types" in adata.var:
        types = adata.var["feature_types"].astype(str).to_numpy()
    else:
        types = np.full(n_vars, "Gene Expression")
    # 10x stores features x barcodes in CSC order, which is the CSR matrix of droplets x features.
    x.sort_indices()
    with h5py.File(Path(path), "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.asarray(adata.obs_names).astype("S"))
        m.create_dataset("data", data=x.data.astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=x.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=x.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([n_vars, n_obs], np.int32))
        feats = m.create_group("features")
        feats.create_dataset("id", data=ids.astype("S"))
        feats.create_dataset("name", data=names.astype("S"))
        feats.create_dataset("feature_type", data=types.astype("S"))
        feats.create_dataset("genome", data=np.full(n_vars, genome).astype("S"))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
