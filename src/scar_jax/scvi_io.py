"""Interchange with scvi-tools: a scar-jax model from an ``scvi.external.SCAR`` save, saves scvi-tools loads.

* :func:`from_scvi_tools` builds a scar-jax ``SCAR`` with every weight, statistic, hyper-parameter, the
  ambient profile, split and history of a save (needs PyTorch, ``pip install 'scar-jax[torch]'``);
* :func:`convert_legacy_save` turns such a save into a scar-jax save, read later without PyTorch;
* :func:`export_scvi_tools` writes what ``scvi.external.SCAR.load`` loads, made by scvi-tools itself
  (``pip install 'scar-jax[parity]'``).

The save format and the weight correspondence are in :mod:`scar_jax.scvi_format` (its names stay importable
from here). PyTorch and scvi-tools are imported only inside the functions that need them. ``model.pt`` is a
pickle: load only files you trust.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .scvi_format import (  # noqa: F401  (re-exported: the format's names, importable from here as before)
    ADATA_FILE,
    HYPERPARAMETERS,
    LEGACY_MODEL_FILE,
    MODEL_FILE,
    SCVI_DEFAULTS,
    SETUP_ARGS,
    TORCH_EXTRA_MESSAGE,
    TorchNotInstalledError,
    read_scvi_tools_save,
    state_dict_to_variables,
    variables_to_state_dict,
)

SCVI_EXTRA_MESSAGE = "writing saves for scvi-tools needs scvi-tools (and PyTorch): pip install 'scar-jax[parity]'"
# model_kwargs of scvi.external.SCAR (passed on to scvi's VAE) that scar-jax can honour: only at these values.
ACCEPTED_MODEL_KWARGS: dict[str, Any] = {
    "log_variational": True,
    "use_observed_lib_size": True,
    "dispersion": "gene",
    "encode_covariates": False,
    "use_batch_norm": "both",
    "use_layer_norm": "none",
    "var_activation": None,
}


def _import_scvi():
    try:
        import scvi
        import scvi.external
        import torch  # noqa: F401
    except ImportError as err:
        raise TorchNotInstalledError(SCVI_EXTRA_MESSAGE, name=getattr(err, "name", None) or "scvi") from err
    return scvi


def _check_model_kwargs(model_kwargs: dict[str, Any]) -> None:
    unsupported = {
        k: v for k, v in model_kwargs.items() if k not in ACCEPTED_MODEL_KWARGS or v != ACCEPTED_MODEL_KWARGS[k]
    }
    if unsupported:
        raise ValueError(
            f"the scvi-tools model was built with model_kwargs {unsupported}, which change the SCAR architecture "
            f"or likelihood; scar-jax supports only {ACCEPTED_MODEL_KWARGS}"
        )


def _ambient_from_adata(adata: Any, key: str) -> np.ndarray:
    if key in adata.varm:
        return np.asarray(adata.varm[key], np.float64)
    if key in adata.var:
        return np.asarray(adata.var[key], np.float64)
    raise ValueError(f"the saved ambient profile is adata.varm[{key!r}], which this adata lacks")


def _saved_ambient(ambient: Any, adata: Any, n_genes: int) -> tuple[np.ndarray, float]:
    """The ``(1, n_genes)`` float32 profile an scvi-tools model used, and its sum (warned unless 1)."""
    if ambient is None:  # scvi-tools' default: the mean profile of adata.X
        x = adata.X
        ambient = np.asarray(x.sum(axis=0), np.float64).reshape(1, -1)
        ambient = (ambient / ambient.sum()).astype(np.float32)
    elif isinstance(ambient, str):
        ambient = np.nan_to_num(_ambient_from_adata(adata, ambient)).astype(np.float32).reshape(1, -1)
    if ambient.shape != (1, n_genes):
        raise ValueError(f"the saved ambient profile has shape {ambient.shape}, expected (1, {n_genes})")
    total = float(ambient.astype(np.float64).sum())
    if not np.isfinite(ambient).all() or (ambient < 0).any() or total <= 0:
        raise ValueError("the saved ambient profile must be finite, non-negative and not all zero")
    if abs(total - 1.0) > 1e-3:
        warnings.warn(
            f"the scvi-tools model's ambient profile sums to {total:.6g}, not 1; scvi-tools uses it "
            "unnormalised, and so does the imported model",
            UserWarning,
            stacklevel=3,
        )
    return ambient, total


def from_scvi_tools(
    cls: type,
    dir_path: str | os.PathLike,
    adata: Any = None,
    prefix: str | None = None,
    *,
    seed: int = 0,
) -> Any:
    """A scar-jax ``cls`` (the ``SCAR`` class) model with the weights of an ``scvi.external.SCAR`` save.

    Parameters
    ----------
    cls
        ``scar_jax.SCAR`` (passed in to keep this module free of the model class).
    dir_path
        Directory written by ``scvi.external.SCAR.save``.
    adata
        AnnData with the model's genes in the same order; ``None``: the ``adata.h5ad`` saved beside the
        model. It is set up with the saved ``setup_anndata`` arguments (as ``scvi.external.SCAR.load``
        does); only ``adata.uns["_scar_jax"]`` is written.
    prefix
        File-name prefix of the save.
    seed
        Seed of the scar-jax model's later random draws (sampling, further training).

    Every weight, batch-norm running statistic, the per-gene dispersion, the ambient profile (kept
    exactly as scvi-tools used it), the hyper-parameters, the training flag, split and history are taken
    over. Needs PyTorch (``pip install 'scar-jax[torch]'``), not scvi-tools.
    """
    import jax

    saved = read_scvi_tools_save(dir_path, prefix)
    _check_model_kwargs(saved["model_kwargs"])
    adata = _adata_of_save(saved, adata, dir_path)
    hyper = saved["hyperparameters"]
    variables, _ = state_dict_to_variables(saved["state_dict"], hyper["n_layers"])
    n_genes = variables["params"]["px_r"].shape[1]
    if n_genes != adata.n_vars:
        raise ValueError(f"the saved weights are for {n_genes} genes, adata has {adata.n_vars}")
    ambient, total = _saved_ambient(saved["ambient_profile"], adata, n_genes)
    cls.setup_anndata(adata, **saved["setup_args"])
    # checks the data and the hyper-parameters as SCAR(...) does
    checked = cls(adata, ambient_profile=(ambient[0] / total).astype(np.float64), seed=seed, **hyper)
    # same tree as the model's own (raises if the structures differ), with its dtypes, as device arrays
    variables = jax.tree.map(lambda t, v: jax.numpy.asarray(v, t.dtype), checked.variables, variables)
    return cls._from_parts(
        adata,
        checked.spec,
        checked.config,
        seed=seed,
        feature_type=checked.feature_type,
        ambient_profile=np.ascontiguousarray(ambient, dtype=np.float32),  # exactly the profile scvi used
        variables=variables,
        is_trained=saved["is_trained"],
        history_rows=saved["history_rows"],
        split=(saved["train_indices"], saved["validation_indices"], saved["test_indices"]),
    )


def _adata_of_save(saved: dict[str, Any], adata: Any, dir_path: str | os.PathLike) -> Any:
    """``adata``, or the ``adata.h5ad`` saved beside the model when ``None``, checked to hold the save's genes in
    its order."""
    import anndata

    if adata is None:
        if saved["adata_path"] is None:
            raise ValueError(f"{dir_path} was saved without its AnnData; pass adata=... (the model's genes)")
        adata = anndata.read_h5ad(saved["adata_path"])
    var_names = saved["var_names"]
    if adata.n_vars != len(var_names) or not np.array_equal(np.asarray(adata.var_names).astype(str), var_names):
        raise ValueError(
            f"adata.var_names do not match the genes of the scvi-tools model ({adata.n_vars} vs {len(var_names)} "
            "genes, or a different order); subset and reorder with adata[:, saved_var_names]"
        )
    return adata


def convert_legacy_save(
    cls: type,
    dir_path: str | os.PathLike,
    output_dir_path: str | os.PathLike,
    overwrite: bool = False,
    prefix: str | None = None,
    adata: Any = None,
) -> None:
    """Convert an ``scvi.external.SCAR`` save (the PyTorch format) into a scar-jax save.

    The result is read by ``SCAR.load(output_dir_path, adata)`` without PyTorch. ``adata`` defaults to the
    ``adata.h5ad`` saved with the scvi-tools model; when the source holds one, it is saved with the
    converted model too (``save_anndata=True``). The same ``prefix`` is used for reading and writing.
    """
    saved_adata = Path(dir_path) / f"{prefix or ''}{ADATA_FILE}"
    if Path(output_dir_path).exists() and not overwrite:
        raise ValueError(f"{output_dir_path} already exists; pass overwrite=True to replace it")
    if adata is None and not saved_adata.is_file():
        raise ValueError(
            f"{dir_path} was saved without its AnnData (no {saved_adata.name}); pass adata=... with the "
            "model's genes to convert it"
        )
    model = from_scvi_tools(cls, dir_path, adata, prefix)
    model.save(output_dir_path, prefix=prefix, overwrite=overwrite, save_anndata=saved_adata.is_file())


# ---------------------------------------------------------------------------------------------- writing
def _minimal_adata(model: Any) -> Any:
    """An AnnData holding only what ``scvi.external.SCAR.setup_anndata`` reads (the user's is not touched)."""
    import anndata
    import pandas as pd

    from .data import counts_field

    source, spec = model.adata, model.spec
    counts = counts_field(source, spec)  # X or the setup's layer, as stored
    columns = [k for k in (spec.batch_key, spec.labels_key, spec.size_factor_key) if k is not None]
    obs = source.obs[list(dict.fromkeys(columns))].copy() if columns else pd.DataFrame(index=source.obs_names)
    obs.index = np.asarray(source.obs_names).astype(str)
    var = pd.DataFrame(index=np.asarray(source.var_names).astype(str))
    if spec.layer is None:
        return anndata.AnnData(X=counts, obs=obs, var=var)
    return anndata.AnnData(X=counts, obs=obs, var=var, layers={spec.layer: counts})


def export_scvi_tools(
    model: Any,
    dir_path: str | os.PathLike,
    prefix: str | None = None,
    overwrite: bool = False,
    save_anndata: bool = False,
) -> None:
    """Write a directory that ``scvi.external.SCAR.load(dir_path, adata)`` loads, with this model's weights.

    The save is made by scvi-tools itself (a ``scvi.external.SCAR`` with the same hyper-parameters, setup
    arguments and ambient profile, its module's state dict replaced by the mapped weights), so it is
    exactly what ``scvi.external.SCAR.save`` writes. Needs scvi-tools (``pip install 'scar-jax[parity]'``).
    With ``save_anndata``, ``model.adata`` is written beside it as ``adata.h5ad``.

    Raises ``ValueError`` for what scvi-tools' SCAR cannot represent: one ambient profile per batch (it has
    a single profile for all cells) and ``size_factor_key`` with the binomial likelihood. A
    ``feature_type`` other than mRNA is carried over only through the sparsity it sets. Batch-norm
    running variances are written as scar-jax keeps them (the biased batch variance; PyTorch would
    keep the unbiased one): evaluation-mode outputs are the same, further training in scvi-tools starts
    from these statistics.
    """
    path = Path(dir_path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it, or choose another dir_path")
    scvi = _import_scvi()
    import torch

    ambient = _exportable_ambient(model)
    config = model.config
    spec = model.spec
    small = _minimal_adata(model)
    setup_args = {name: getattr(spec, name) for name in SETUP_ARGS}
    scvi.external.SCAR.setup_anndata(small, **setup_args)
    hyper = {name: getattr(config, name) for name in HYPERPARAMETERS}
    with torch.random.fork_rng():
        torch.manual_seed(0)  # scvi-tools' initial l_encoder weights (never evaluated) are then reproducible
        scvi_model = scvi.external.SCAR(small, ambient_profile=torch.from_numpy(ambient.copy()), **hyper)
    module = scvi_model.module
    state = module.state_dict()
    mapped = variables_to_state_dict(_numpy_tree(model.variables), config.n_layers)
    for key, value in mapped.items():
        if key not in state:
            raise RuntimeError(f"scvi-tools' SCAR module has no weight {key!r}: an incompatible scvi-tools version")
        if tuple(state[key].shape) != value.shape:
            raise RuntimeError(f"{key}: scvi-tools expects shape {tuple(state[key].shape)}, scar-jax has {value.shape}")
        state[key] = torch.from_numpy(value.copy()).to(state[key].dtype)
    module.load_state_dict(state)
    module.eval()
    _copy_training_record(model, scvi_model)
    scvi_model.save(str(path), prefix=prefix, overwrite=overwrite, save_anndata=False)
    if save_anndata:
        model.adata.write_h5ad(path / f"{prefix or ''}{ADATA_FILE}")


def _exportable_ambient(model: Any) -> np.ndarray:
    """The model's float32 ``(1, G)`` ambient profile, once checked that scvi-tools' SCAR can represent the model:
    a single profile for all cells, and no ``size_factor_key`` with the binomial likelihood."""
    ambient = np.asarray(model.ambient_profile, np.float32)
    if ambient.shape[0] != 1:
        raise ValueError(
            f"the model has {ambient.shape[0]} ambient profiles (one per batch); scvi-tools' SCAR has a single "
            "ambient profile for all cells, so it cannot represent this model"
        )
    if model.spec.size_factor_key is not None and model.config.gene_likelihood == "b":
        raise ValueError("size_factor_key with gene_likelihood='b' has no scvi-tools equivalent")
    return ambient


def _copy_training_record(model: Any, scvi_model: Any) -> None:
    """The training flag, the train / validation / test split and the history, onto the scvi-tools model."""
    scvi_model.is_trained_ = bool(model.is_trained)
    scvi_model.train_indices_ = np.asarray(model.train_indices, np.int64)
    scvi_model.validation_indices_ = np.asarray(model.validation_indices, np.int64)
    scvi_model.test_indices_ = np.asarray(model.test_indices, np.int64)
    history = model.history
    scvi_model.history_ = history if history else None


def _numpy_tree(variables: dict[str, Any]) -> dict[str, Any]:
    import jax

    return jax.tree.map(lambda a: np.asarray(a), jax.device_get(variables))
