"""Test helpers: write 10x Genomics files with h5py / scipy directly, in the layouts Cell Ranger documents.

Kept independent of :mod:`scar_jax.readers` (which reads them through scanpy) so that a shared
misunderstanding of the format cannot hide in both.

- v3 h5 (Cell Ranger >= 3): ``/matrix/{barcodes, data, indices, indptr, shape}`` (features x barcodes,
  CSC), ``/matrix/features/{id, name, feature_type, genome, _all_tag_keys}``;
- v2 h5 (Cell Ranger 2): ``/<genome>/{barcodes, data, gene_names, genes, indices, indptr, shape}``;
- mtx folders: ``matrix.mtx.gz`` + ``features.tsv.gz`` (id, name, type) + ``barcodes.tsv.gz`` (v3),
  ``matrix.mtx`` + ``genes.tsv`` (id, name) + ``barcodes.tsv`` (v2).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp


def _csc_features_by_barcodes(counts) -> sp.csc_matrix:
    """Droplets x features counts -> the features x barcodes CSC matrix 10x stores."""
    m = sp.csc_matrix(sp.csr_matrix(counts).T.astype(np.int32))
    m.sort_indices()
    return m


def write_v3_h5(path, counts, barcodes, names, feature_types, ids=None, genome="GRCh38") -> Path:
    m = _csc_features_by_barcodes(counts)
    ids = [f"ID{i:05d}" for i in range(len(names))] if ids is None else ids
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
        feats = g.create_group("features")
        feats.create_dataset("id", data=np.array(ids, dtype="S"))
        feats.create_dataset("name", data=np.array(names, dtype="S"))
        feats.create_dataset("feature_type", data=np.array(feature_types, dtype="S"))
        feats.create_dataset("genome", data=np.array([genome] * len(names), dtype="S"))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    return Path(path)


def write_v2_h5(path, counts, barcodes, names, ids=None, genome="hg19") -> Path:
    m = _csc_features_by_barcodes(counts)
    ids = [f"ENSG{i:08d}" for i in range(len(names))] if ids is None else ids
    with h5py.File(path, "w") as f:
        g = f.create_group(genome)
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("gene_names", data=np.array(names, dtype="S"))
        g.create_dataset("genes", data=np.array(ids, dtype="S"))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
    return Path(path)


def _write_text(path: Path, lines: list[str], compress: bool) -> None:
    text = "".join(line + "\n" for line in lines).encode()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(text)
    else:
        path.write_bytes(text)


def write_mtx(folder, counts, barcodes, names, feature_types=None, ids=None) -> Path:
    """v3 folder (gzip'ed, with feature types) or, with ``feature_types=None``, a v2 folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"ID{i:05d}" for i in range(len(names))] if ids is None else ids
    v3 = feature_types is not None
    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, sp.coo_matrix(sp.csr_matrix(counts).T.astype(np.int64)), field="integer")
    if v3:
        with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
            f.write(buffer.getvalue())
        feature_lines = [f"{i}\t{n}\t{t}" for i, n, t in zip(ids, names, feature_types, strict=True)]
        _write_text(folder / "features.tsv.gz", feature_lines, compress=True)
        _write_text(folder / "barcodes.tsv.gz", list(barcodes), compress=True)
    else:
        (folder / "matrix.mtx").write_bytes(buffer.getvalue())
        _write_text(folder / "genes.tsv", [f"{i}\t{n}" for i, n in zip(ids, names, strict=True)], compress=False)
        _write_text(folder / "barcodes.tsv", list(barcodes), compress=False)
    return folder
