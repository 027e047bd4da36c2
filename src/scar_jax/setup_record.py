"""Setup-record and device methods of :class:`~scar_jax.SCAR` (scvi-tools' names).

scvi-tools keeps an ``AnnDataManager`` per AnnData; scar-jax's record is the plain
:class:`~scar_jax.data.AnnDataSpec` dataclass of what ``setup_anndata`` resolved, stored in
``adata.uns["_scar_jax"]``. These functions of the model (``self``) are bound as methods in
:mod:`scar_jax.model`.
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

# setup records registered with the class (register_manager), by id of the AnnData, checked by weak reference
_CLASS_RECORDS: dict[int, tuple[weakref.ref, _data.AnnDataSpec]] = {}


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


def view_anndata_setup(self, adata: anndata.AnnData | None = None, hide_state_registries: bool = False) -> None:
    """Print what ``setup_anndata`` recorded (layer, keys, categories) for ``adata`` (default: the model's)."""
    spec = self.spec if adata is None else _data.read_spec(adata)
    print(self._setup_table(spec))


def view_setup_args(self) -> None:
    """Print the ``setup_anndata`` arguments of the model."""
    print(self._setup_table(self.spec))


def get_setup_arg(self, setup_arg: str) -> Any:
    """One ``setup_anndata`` argument (``layer``, ``batch_key``, ``labels_key``, ``size_factor_key``)."""
    args = _setup_args(self.spec)
    if setup_arg not in args:
        raise ValueError(f"setup_arg must be one of {sorted(args)}, got {setup_arg!r}")
    return args[setup_arg]


def get_state_registry(self, registry_key: str) -> dict[str, Any]:
    """The categories recorded for ``"batch"`` or ``"labels"`` (scvi-tools' state registry, simplified)."""
    registries = {
        "batch": {"categorical_mapping": list(self.spec.batch_categories), "original_key": self.spec.batch_key},
        "labels": {"categorical_mapping": list(self.spec.labels_categories), "original_key": self.spec.labels_key},
    }
    if registry_key not in registries:
        raise ValueError(f"registry_key must be one of {sorted(registries)}, got {registry_key!r}")
    return registries[registry_key]


def get_from_registry(self, adata: anndata.AnnData, registry_key: str) -> np.ndarray:
    """The data the model reads for ``"X"``, ``"batch"`` (codes), ``"labels"`` (codes) or ``"size_factor"``."""
    spec = self.spec
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


def transfer_fields(self, adata: anndata.AnnData, extend_categories: bool = False, **kwargs: Any) -> None:
    """Set ``adata`` up the way the model's AnnData is (scvi-tools' ``transfer_fields``).

    Checks that ``adata`` has the model's genes in the same order and the setup's ``obs`` columns and
    layer, that its batch categories are ones the model was trained with, then writes the model's setup
    record (layer, keys and the model's category order) to ``adata.uns["_scar_jax"]``, the only field
    written, and registers it with this model (:meth:`get_anndata_manager`). SCAR has one ambient
    profile per training batch, so new batch categories cannot be added: ``extend_categories=True``
    raises ``ValueError``.
    """
    if kwargs:
        raise TypeError(f"transfer_fields() got unknown keyword arguments {sorted(kwargs)}")
    if extend_categories:
        raise ValueError(
            "extend_categories=True is not possible for SCAR: each batch needs its own ambient profile from "
            "training; train a model on the new batches instead"
        )
    self._check_compatible(adata)
    adata.uns[_data.UNS_KEY] = self.spec.to_dict()
    self._instance_records()[id(adata)] = (weakref.ref(adata), self.spec)


def _check_compatible(self, adata: anndata.AnnData) -> None:
    """``ValueError`` naming the field unless the model can read ``adata`` (genes, layer, keys, batches)."""
    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
    _data.check_genes(adata, self.var_names)
    spec = self.spec
    if spec.layer is not None and spec.layer not in adata.layers:
        raise ValueError(f"layer={spec.layer!r} (the model's setup) is not in adata.layers; add it")
    for name in ("batch_key", "labels_key", "size_factor_key"):
        key = getattr(spec, name)
        if key is not None and key not in adata.obs:
            raise ValueError(f"{name}={key!r} (the model's setup) is not a column of adata.obs; add it")
    _data.batch_index(adata, spec)  # unseen batch categories: ValueError naming them


def update_setup_method_args(self, setup_method_args: dict[str, Any]) -> None:
    """Update recorded ``setup_anndata`` arguments, e.g. after renaming a layer or an ``obs`` column.

    Keys: ``layer``, ``batch_key``, ``labels_key``, ``size_factor_key``. The model's AnnData must have
    the new fields, and a renamed batch or labels column must hold the same categories (the model's
    ambient profiles and codes depend on them). Updates the model's record and
    ``adata.uns["_scar_jax"]`` of the model's AnnData.
    """
    if not isinstance(setup_method_args, dict):
        raise TypeError(f"setup_method_args must be a dict, got {type(setup_method_args).__name__}")
    unknown = set(setup_method_args) - set(_setup_args(self.spec))
    if unknown:
        raise ValueError(
            f"setup_method_args has unknown keys {sorted(unknown)}; allowed: {sorted(_setup_args(self.spec))}"
        )
    new = dataclasses.replace(self.spec, **setup_method_args)
    for name, key in (("batch_key", "batch_categories"), ("labels_key", "labels_categories")):
        if getattr(new, name) != getattr(self.spec, name):
            column = getattr(new, name)
            found = _data.categories(self.adata, column) if column in self.adata.obs else None
            if found != getattr(self.spec, key):
                raise ValueError(
                    f"{name}={getattr(new, name)!r} must be a column of adata.obs with the model's categories "
                    f"{list(getattr(self.spec, key))}, found {None if found is None else list(found)}"
                )
    old_spec, self.spec = self.spec, new
    try:
        self._check_compatible(self.adata)
    except (ValueError, TypeError):
        self.spec = old_spec
        raise
    self.adata.uns[_data.UNS_KEY] = new.to_dict()


def load_registry(dir_path: str, prefix: str | None = None) -> dict[str, Any]:
    """The setup and model record saved with a model, without loading weights or data.

    ``{"setup_args", "categories", "model_args", "var_names", "scar_jax_version", "format_version",
    "is_trained"}``; missing, truncated or foreign directories raise ``ValueError`` as :meth:`load` does.
    """
    manifest, _, _ = _io.read_model_dir(dir_path, prefix)
    spec = _data.AnnDataSpec.from_dict(manifest["spec"])
    return {
        "setup_args": _setup_args(spec),
        "categories": {"batch": list(spec.batch_categories), "labels": list(spec.labels_categories)},
        "model_args": dict(manifest["config"]),
        "var_names": list(manifest["var_names"]),
        "scar_jax_version": manifest.get("scar_jax_version"),
        "format_version": manifest.get("format_version"),
        "is_trained": bool(manifest["is_trained"]),
    }


def _instance_records(self) -> dict[int, tuple[weakref.ref, _data.AnnDataSpec]]:
    return self.__dict__.setdefault("_records", {})


def register_manager(cls: type, adata_manager: anndata.AnnData | tuple[anndata.AnnData, _data.AnnDataSpec]) -> None:
    """Register the setup record of an AnnData with the class (scvi-tools' ``register_manager``).

    ``adata_manager`` is an AnnData set up with :meth:`setup_anndata` (its record is read) or an
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
    _CLASS_RECORDS[id(adata)] = (weakref.ref(adata), spec)


def deregister_manager(self, adata: anndata.AnnData | None = None) -> None:
    """Forget the setup record of ``adata`` (class and instance stores); ``None``: all but the model's own."""
    for store in (_CLASS_RECORDS, self._instance_records()):
        for key in list(store):
            target = store[key][0]()
            if (adata is None and target is not self.adata) or (adata is not None and target is adata):
                del store[key]


def get_anndata_manager(self, adata: anndata.AnnData, required: bool = False) -> _data.AnnDataSpec | None:
    """The setup record the model uses for ``adata`` (scvi-tools' ``get_anndata_manager``).

    The model's own AnnData gives the model's record; another AnnData gives its record from
    :meth:`transfer_fields` or :meth:`register_manager` if it is compatible with the model. ``None`` when
    there is none, or ``ValueError`` saying how to make one when ``required``.
    """
    if adata is self.adata:
        return self.spec
    for store in (self._instance_records(), _CLASS_RECORDS):
        entry = store.get(id(adata))
        if entry is not None and entry[0]() is adata:
            if entry[1] != self.spec:
                break  # set up differently from the model
            return entry[1]
    if required:
        raise ValueError(
            "adata has no setup record compatible with this model; call model.transfer_fields(adata) "
            "(or SCAR.setup_anndata with the model's arguments)"
        )
    return None


def data_registry(self) -> dict[str, dict[str, str | None]]:
    """Where each field is read from in the AnnData (scvi-tools' data registry, simplified)."""
    spec = self.spec
    return {
        "X": {"attr_name": "X" if spec.layer is None else "layers", "attr_key": spec.layer},
        "batch": {"attr_name": "obs", "attr_key": spec.batch_key},
        "labels": {"attr_name": "obs", "attr_key": spec.labels_key},
        "size_factor": {"attr_name": "obs", "attr_key": spec.size_factor_key},
    }


def device(self) -> jax.Device:
    """The JAX device holding the model's parameters."""
    return next(iter(jax.tree.leaves(self._variables)[0].devices()))


def to_device(self, device: str | int | jax.Device) -> None:
    """Move the parameters to a JAX device: a ``jax.Device``, a platform (``"cpu"``, ``"gpu"``, ``"cuda:1"``) or
    an index into ``jax.devices()``."""
    if isinstance(device, str):
        platform, _, index = device.partition(":")
        target = select_device(platform, int(index) if index else "auto")
    elif isinstance(device, int | np.integer):
        target = select_device("auto", int(device))
    else:
        target = device
    self._variables = jax.device_put(self._variables, target)


def _setup_args(spec: _data.AnnDataSpec) -> dict[str, Any]:
    return {
        "layer": spec.layer,
        "batch_key": spec.batch_key,
        "labels_key": spec.labels_key,
        "size_factor_key": spec.size_factor_key,
    }


def _setup_table(self, spec: _data.AnnDataSpec) -> str:
    rows = [f"{k}: {v}" for k, v in _setup_args(spec).items()]
    rows.append(f"batch categories ({len(spec.batch_categories)}): {list(spec.batch_categories)}")
    rows.append(f"labels categories ({len(spec.labels_categories)}): {list(spec.labels_categories)}")
    return "SCAR setup (adata.uns['_scar_jax'])\n  " + "\n  ".join(rows)
