"""Saving and loading a :class:`~scar_jax.SCAR` (a shell over :mod:`scar_jax.io`, which owns the file format).

``model``: a :class:`scar_jax.SCAR` (not imported here). :func:`write` is what ``save`` and the training checkpoints
call; :func:`load_parts` returns what ``SCAR._from_parts`` takes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import anndata
import numpy as np

from . import data as _data
from . import fit as _fit
from . import io as _io
from . import train as _train
from .vae import SCARConfig


def record(model) -> dict[str, Any]:
    """The model's manifest entries besides its state (configuration, setup, genes, seed, feature type)."""
    return {
        "config": dataclasses.asdict(model.config),
        "spec": model.spec.to_dict(),
        "var_names": model.var_names.tolist(),
        "seed": model.seed,
        "feature_type": model.feature_type,
        "training_time_s": model.training_time_s,
    }


def write(model, dir_path, state, rows, split, is_trained, overwrite, prefix=None, save_anndata=False) -> None:
    """Write ``state`` (with the history ``rows`` and ``split``) and the model's record to ``dir_path`` atomically."""
    adata = model.adata if save_anndata else None
    ambient = model.ambient_profile
    _io.write_model(
        dir_path,
        record(model),
        state,
        ambient,
        rows,
        split,
        is_trained,
        prefix=prefix,
        overwrite=overwrite,
        adata=adata,
    )


def save(model, dir_path: str, prefix, overwrite: bool, save_anndata: bool) -> None:
    """``SCAR.save``: the training state (a fresh optimizer's when untrained or imported: one file format)."""
    state = model._state
    if state is None:
        state = _train.init_train_state(model.variables, _train.make_optimizer(), model._train_key)
    split = (model.train_indices, model.validation_indices, model.test_indices)
    write(model, dir_path, state, model.history_rows, split, model.is_trained, overwrite, prefix, save_anndata)


def checkpoint(model, checkpoint_dir: str, every: int) -> _fit.Checkpoint:
    """Training checkpoints in ``checkpoint_dir`` every ``every`` epochs (read back to resume)."""
    return _fit.Checkpoint(
        _io.has_model(checkpoint_dir),
        every,
        lambda template, split: _io.read_checkpoint(checkpoint_dir, record(model), template, split),
        lambda state, rows, split: write(model, checkpoint_dir, state, rows, split, True, True),
    )


def load_parts(dir_path: str, adata: anndata.AnnData | None, prefix: str | None) -> dict[str, Any]:
    """The keywords of ``SCAR._from_parts`` for a save of ``SCAR.save`` (its AnnData when ``adata`` is None)."""
    manifest, state_bytes, adata_path = _io.read_model_dir(dir_path, prefix)
    if adata is None:
        if not adata_path.is_file():
            raise ValueError(f"{dir_path} was saved without its AnnData; pass adata=... to SCAR.load")
        adata = anndata.read_h5ad(adata_path)
    _data.check_genes(adata, np.asarray(manifest["var_names"]))
    spec = _data.AnnDataSpec.from_dict(manifest["spec"])
    if adata.uns.get(_data.UNS_KEY) is None:
        _data.setup_anndata(adata, {key: getattr(spec, key) for key in _data.SETUP_KEYS})
    config, seed, trained = SCARConfig(**manifest["config"]), int(manifest["seed"]), bool(manifest["is_trained"])
    state, ambient = _io.read_state(dir_path, manifest, state_bytes, _train.template_state(config, seed))
    return {
        "adata": adata,
        "spec": spec,
        "config": config,
        "seed": seed,
        "feature_type": manifest.get("feature_type", "mRNA"),
        "ambient_profile": ambient,
        "variables": state.variables,
        "state": state if trained else None,
        "is_trained": trained,
        "history_rows": manifest["history"],
        "split": _io.saved_split(manifest),
        "training_time_s": float(manifest.get("training_time_s", 0.0)),
    }
