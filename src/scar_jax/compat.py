"""scvi-tools' setup-record functions over scar-jax's plain setup record.

scvi-tools keeps an ``AnnDataManager`` per AnnData; scar-jax's record is the
:class:`~scar_jax.data.AnnDataSpec` dataclass that ``setup_anndata`` resolved, stored in
``adata.uns["_scar_jax"]``. Each function here takes that record (and the AnnData or genes it
concerns); :class:`~scar_jax.SCAR` keeps one-line methods with scvi-tools' names calling them.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import anndata
import jax
import numpy as np
import pandas as pd

from . import data as _data
from . import io as _io
from .distributed import select_device

Records = dict[int, tuple[weakref.ref, _data.AnnDataSpec]]
# setup records registered with the class (register_manager), by id of the AnnData, checked by weak reference
CLASS_RECORDS: Records = {}


def parse_device(device: str | int | jax.Device) -> jax.Device:
    """A ``jax.Device``, a platform (``"cpu"``, ``"gpu"``, ``"cuda:1"``) or an index into ``jax.devices()``."""
    if isinstance(device, str):
        platform, _, index = device.partition(":")
        return select_device(platform, int(index) if index else "auto")
    if isinstance(device, int | np.integer):
        return select_device("auto", int(device))
    return device


def setup_args(spec: _data.AnnDataSpec) -> dict[str, Any]:
    """The ``setup_anndata`` arguments of a record."""
    return {
        "layer": spec.layer,
        "batch_key": spec.batch_key,
        "labels_key": spec.labels_key,
        "size_factor_key": spec.size_factor_key,
    }


def setup_table(spec: _data.AnnDataSpec) -> str:
    """The record as printed by ``view_anndata_setup``."""
    rows = [f"{k}: {v}" for k, v in setup_args(spec).items()]
    rows.append(f"batch categories ({len(spec.batch_categories)}): {list(spec.batch_categories)}")
    rows.append(f"labels categories ({len(spec.labels_categories)}): {list(spec.labels_categories)}")
    return "SCAR setup (adata.uns['_scar_jax'])\n  " + "\n  ".join(rows)


def get_setup_arg(spec: _data.AnnDataSpec, setup_arg: str) -> Any:
    """One ``setup_anndata`` argument (``layer``, ``batch_key``, ``labels_key``, ``size_factor_key``)."""
    args = setup_args(spec)
    if setup_arg not in args:
        raise ValueError(f"setup_arg must be one of {sorted(args)}, got {setup_arg!r}")
    return args[setup_arg]


def get_state_registry(spec: _data.AnnDataSpec, registry_key: str) -> dict[str, Any]:
    """The categories recorded for ``"batch"`` or ``"labels"`` (scvi-tools' state registry, simplified)."""
    registries = {
        "batch": {"categorical_mapping": list(spec.batch_categories), "original_key": spec.batch_key},
        "labels": {"categorical_mapping": list(spec.labels_categories), "original_key": spec.labels_key},
    }
    if registry_key not in registries:
        raise ValueError(f"registry_key must be one of {sorted(registries)}, got {registry_key!r}")
    return registries[registry_key]


def get_from_registry(spec: _data.AnnDataSpec, adata: anndata.AnnData, registry_key: str) -> Any:
    """What the record reads for ``"X"`` (the counts), ``"batch"`` / ``"labels"`` (codes ``(n, 1)`` int32, the
    record's category order, zeros without a key) or ``"size_factor"`` (``(n, 1)`` float32, when set up)."""
    if registry_key == "X":
        return _data.get_counts(adata, spec)
    if registry_key == "batch":
        return _data.batch_index(adata, spec).reshape(-1, 1)
    if registry_key == "labels":
        if spec.labels_key is None:
            return np.zeros((adata.n_obs, 1), np.int32)
        codes = pd.Categorical(adata.obs[spec.labels_key].astype(str), categories=list(spec.labels_categories))
        return np.asarray(codes.codes, np.int32).reshape(-1, 1)
    if registry_key == "size_factor" and spec.size_factor_key is not None:
        return np.asarray(adata.obs[spec.size_factor_key], np.float32).reshape(-1, 1)
    raise ValueError(f"registry_key must be 'X', 'batch', 'labels' or 'size_factor' (if set up), got {registry_key!r}")


def registry_fields(spec: _data.AnnDataSpec) -> dict[str, dict[str, Any]]:
    """Where each field is read from: ``{"X": {"attr_name": "X" | "layers", "attr_key": layer}, "batch": ...}``."""
    return {
        "X": {"attr_name": "X" if spec.layer is None else "layers", "attr_key": spec.layer},
        "batch": {"attr_name": "obs", "attr_key": spec.batch_key},
        "labels": {"attr_name": "obs", "attr_key": spec.labels_key},
        "size_factor": {"attr_name": "obs", "attr_key": spec.size_factor_key},
    }


def check_compatible(spec: _data.AnnDataSpec, var_names: np.ndarray, adata: anndata.AnnData) -> None:
    """``ValueError`` naming the field unless the record can read ``adata`` (genes, layer, keys, batches)."""
    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
    _data.check_genes(adata, var_names)
    if spec.layer is not None and spec.layer not in adata.layers:
        raise ValueError(f"layer={spec.layer!r} (the model's setup) is not in adata.layers; add it")
    for name in ("batch_key", "labels_key", "size_factor_key"):
        key = getattr(spec, name)
        if key is not None and key not in adata.obs:
            raise ValueError(f"{name}={key!r} (the model's setup) is not a column of adata.obs; add it")
    _data.batch_index(adata, spec)  # unseen batch categories: ValueError naming them


def transfer_fields(
    spec: _data.AnnDataSpec, var_names: np.ndarray, adata: anndata.AnnData, records: Records, extend_categories: bool
) -> None:
    """Check ``adata`` against the record, write the record to ``adata.uns["_scar_jax"]`` and into ``records``.

    New batch categories cannot be added (one ambient profile per training batch): ``ValueError``."""
    if extend_categories:
        raise ValueError(
            "extend_categories=True is not possible for SCAR: each batch needs its own ambient profile from "
            "training; train a model on the new batches instead"
        )
    check_compatible(spec, var_names, adata)
    adata.uns[_data.UNS_KEY] = spec.to_dict()
    records[id(adata)] = (weakref.ref(adata), spec)


def updated_spec(
    spec: _data.AnnDataSpec, var_names: np.ndarray, adata: anndata.AnnData, setup_method_args: dict[str, Any]
) -> _data.AnnDataSpec:
    """The record with ``setup_method_args`` changed, checked against ``adata`` (the new fields must exist and a
    renamed batch or labels column must hold the record's categories); ``adata.uns["_scar_jax"]`` updated."""
    if not isinstance(setup_method_args, dict):
        raise TypeError(f"setup_method_args must be a dict, got {type(setup_method_args).__name__}")
    unknown = set(setup_method_args) - set(setup_args(spec))
    if unknown:
        raise ValueError(f"setup_method_args has unknown keys {sorted(unknown)}; allowed: {sorted(setup_args(spec))}")
    new = dataclasses.replace(spec, **setup_method_args)
    for name, key in (("batch_key", "batch_categories"), ("labels_key", "labels_categories")):
        column = getattr(new, name)
        if column != getattr(spec, name):
            found = _data.categories(adata, column) if column in adata.obs else None
            if found != getattr(spec, key):
                raise ValueError(
                    f"{name}={column!r} must be a column of adata.obs with the model's categories "
                    f"{list(getattr(spec, key))}, found {None if found is None else list(found)}"
                )
    check_compatible(new, var_names, adata)
    adata.uns[_data.UNS_KEY] = new.to_dict()
    return new


def load_registry(dir_path: str, prefix: str | None = None) -> dict[str, Any]:
    """The setup and model record saved with a model, without loading weights or data.

    ``{"setup_args", "categories", "model_args", "var_names", "scar_jax_version", "format_version",
    "is_trained"}``; missing, truncated or foreign directories raise ``ValueError`` as ``SCAR.load`` does.
    """
    manifest, _, _ = _io.read_model_dir(dir_path, prefix)
    spec = _data.AnnDataSpec.from_dict(manifest["spec"])
    return {
        "setup_args": setup_args(spec),
        "categories": {"batch": list(spec.batch_categories), "labels": list(spec.labels_categories)},
        "model_args": dict(manifest["config"]),
        "var_names": list(manifest["var_names"]),
        "scar_jax_version": manifest.get("scar_jax_version"),
        "format_version": manifest.get("format_version"),
        "is_trained": bool(manifest["is_trained"]),
    }


def register_manager(adata_manager: anndata.AnnData | tuple[anndata.AnnData, _data.AnnDataSpec]) -> None:
    """Register the setup record of an AnnData with the class (scvi-tools' ``register_manager``).

    ``adata_manager`` is an AnnData set up with ``setup_anndata`` (its record is read) or an
    ``(adata, AnnDataSpec)`` pair. A later registration for the same AnnData replaces the earlier one.
    """
    if isinstance(adata_manager, tuple) and len(adata_manager) == 2:
        adata, spec = adata_manager
        if not isinstance(spec, _data.AnnDataSpec):
            raise TypeError(f"expected (AnnData, AnnDataSpec), got a {type(spec).__name__} record")
    else:
        adata = adata_manager
        if not isinstance(adata, anndata.AnnData):
            kind = type(adata).__name__
            raise TypeError(f"adata_manager must be an AnnData or (AnnData, AnnDataSpec), got {kind}")
        spec = _data.read_spec(adata)
    CLASS_RECORDS[id(adata)] = (weakref.ref(adata), spec)


def deregister(records: Records, adata: anndata.AnnData | None, own: anndata.AnnData) -> None:
    """Forget the record of ``adata`` in the class store and ``records``; ``None``: all but ``own``'s."""
    for store in (CLASS_RECORDS, records):
        for key in list(store):
            target = store[key][0]()
            if (adata is None and target is not own) or (adata is not None and target is adata):
                del store[key]


def find_record(
    spec: _data.AnnDataSpec, own: anndata.AnnData, records: Records, adata: anndata.AnnData, required: bool
) -> _data.AnnDataSpec | None:
    """The record a model (``spec``, AnnData ``own``) uses for ``adata``: its own for ``own``, otherwise one
    registered in ``records`` or the class store that equals ``spec``; ``None``, or ``ValueError`` if
    ``required``."""
    if adata is own:
        return spec
    for store in (records, CLASS_RECORDS):
        entry = store.get(id(adata))
        if entry is not None and entry[0]() is adata:
            if entry[1] != spec:
                break  # set up differently from the model
            return entry[1]
    if required:
        raise ValueError(
            "adata has no setup record compatible with this model; call model.transfer_fields(adata) "
            "(or SCAR.setup_anndata with the model's arguments)"
        )
    return None


def summary_string(config, is_trained: bool) -> str:
    """scvi-tools' ``summary_string`` of ``SCAR``: the architecture (``config``) and the training status."""
    c = config
    return (
        f"SCAR model with n_hidden: {c.n_hidden}, n_latent: {c.n_latent}, n_layers: {c.n_layers}, "
        f"dropout_rate: {c.dropout_rate}, gene_likelihood: {c.gene_likelihood}, "
        f"latent_distribution: {c.latent_distribution}, scale_activation: {c.scale_activation}, "
        f"sparsity: {c.sparsity}\nTraining status: {'Trained' if is_trained else 'Not Trained'}"
    )
