"""Interchange with scvi-tools: read ``scvi.external.SCAR`` saves, write saves it can load.

An scvi-tools save is a directory with ``model.pt``, a ``torch.save`` pickle of::

    {"model_state_dict": {name: tensor},       # the module's weights and batch-norm statistics
     "var_names": ndarray,                      # the genes, in order
     "attr_dict": {"init_params_": {"non_kwargs": {...hyper-parameters, "ambient_profile": tensor (1, G)},
                                    "kwargs": {"model_kwargs": {...}}},
                   "registry_": {"setup_args": {...}, ...}, "is_trained_": bool, "history_": ...}}

and, when saved with ``save_anndata=True``, ``adata.h5ad``. The ambient profile is not in the state
dict (scvi-tools keeps it as a plain attribute of the module): it comes from the saved constructor
arguments.

Weight correspondence (``i`` = hidden layer; ``*`` = ``z_encoder.encoder`` or ``decoder.px_decoder``)::

    *.fc_layers.Layer i.0.weight (out, in)     -> params    {encoder|decoder}/hidden/dense_i/kernel (in, out)
    *.fc_layers.Layer i.0.bias                 -> params    {encoder|decoder}/hidden/dense_i/bias
    *.fc_layers.Layer i.1.weight / .bias       -> params    {encoder|decoder}/hidden/batchnorm_i/scale / bias
    *.fc_layers.Layer i.1.running_mean / _var  -> batch_stats {encoder|decoder}/hidden/batchnorm_i/mean / var
    z_encoder.mean_encoder / var_encoder       -> encoder/mean, encoder/log_var
    decoder.px_scale_decoder.0                 -> decoder/native_frequencies
    decoder.px_noise_decoder.0                 -> decoder/noise_ratio
    decoder.px_dropout_decoder                 -> decoder/zi_logits
    px_r (G,)                                  -> px_r (1, G)

Not mapped: ``l_encoder.*`` (scvi-tools builds a library-size encoder that SCAR never evaluates, as it
uses the observed library), ``num_batches_tracked`` (unused with a fixed momentum) and
``pyro_param_store``.

Reading needs PyTorch (``pip install 'scar-jax[torch]'``); writing a save that scvi-tools loads builds
it with scvi-tools itself (``pip install 'scar-jax[parity]'``). Both are imported only inside the
functions that need them. ``model.pt`` is a pickle: load only files you trust.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

TORCH_EXTRA_MESSAGE = "reading scvi-tools saves needs PyTorch: pip install 'scar-jax[torch]'"
SCVI_EXTRA_MESSAGE = "writing saves for scvi-tools needs scvi-tools (and PyTorch): pip install 'scar-jax[parity]'"
MODEL_FILE = "model.pt"
ADATA_FILE = "adata.h5ad"
LEGACY_MODEL_FILE = "model_params.pt"

HYPERPARAMETERS = (
    "n_hidden",
    "n_latent",
    "n_layers",
    "dropout_rate",
    "gene_likelihood",
    "latent_distribution",
    "scale_activation",
    "sparsity",
)
SCVI_DEFAULTS: dict[str, Any] = {
    "n_hidden": 150,
    "n_latent": 15,
    "n_layers": 2,
    "dropout_rate": 0.0,
    "gene_likelihood": "b",
    "latent_distribution": "normal",
    "scale_activation": "softplus_sp",
    "sparsity": 0.9,
}
SETUP_ARGS = ("layer", "batch_key", "labels_key", "size_factor_key")
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
_ENCODER = "z_encoder.encoder.fc_layers"
_DECODER = "decoder.px_decoder.fc_layers"
_HEADS = (  # (torch module, scar-jax path under params)
    ("z_encoder.mean_encoder", ("encoder", "mean")),
    ("z_encoder.var_encoder", ("encoder", "log_var")),
    ("decoder.px_scale_decoder.0", ("decoder", "native_frequencies")),
    ("decoder.px_noise_decoder.0", ("decoder", "noise_ratio")),
    ("decoder.px_dropout_decoder", ("decoder", "zi_logits")),
)
_IGNORED_PREFIXES = ("l_encoder.", "pyro_param_store")


class TorchNotInstalledError(ModuleNotFoundError):
    """PyTorch (or scvi-tools) is needed for this operation and cannot be imported."""


def _import_torch():
    try:
        import torch
    except ImportError as err:  # also `sys.modules["torch"] = None` and broken installations
        raise TorchNotInstalledError(TORCH_EXTRA_MESSAGE, name="torch") from err
    return torch


def _import_scvi():
    try:
        import scvi
        import scvi.external
        import torch  # noqa: F401
    except ImportError as err:
        raise TorchNotInstalledError(SCVI_EXTRA_MESSAGE, name=getattr(err, "name", None) or "scvi") from err
    return scvi


# ---------------------------------------------------------------------------------------------- mapping
def _key_table(n_layers: int) -> list[tuple[str, str, tuple[str, ...], str]]:
    """``(torch key, flax collection, flax path, kind)`` of every mapped weight; kind: kernel/vector/px_r."""
    table: list[tuple[str, str, tuple[str, ...], str]] = []
    for torch_prefix, part in ((_ENCODER, "encoder"), (_DECODER, "decoder")):
        for i in range(n_layers):
            layer = f"{torch_prefix}.Layer {i}"
            dense, norm = (part, "hidden", f"dense_{i}"), (part, "hidden", f"batchnorm_{i}")
            table += [
                (f"{layer}.0.weight", "params", (*dense, "kernel"), "kernel"),
                (f"{layer}.0.bias", "params", (*dense, "bias"), "vector"),
                (f"{layer}.1.weight", "params", (*norm, "scale"), "vector"),
                (f"{layer}.1.bias", "params", (*norm, "bias"), "vector"),
                (f"{layer}.1.running_mean", "batch_stats", (*norm, "mean"), "vector"),
                (f"{layer}.1.running_var", "batch_stats", (*norm, "var"), "vector"),
            ]
    for torch_prefix, path in _HEADS:
        table += [
            (f"{torch_prefix}.weight", "params", (*path, "kernel"), "kernel"),
            (f"{torch_prefix}.bias", "params", (*path, "bias"), "vector"),
        ]
    table.append(("px_r", "params", ("px_r",), "px_r"))
    return table


def _n_layers_in(state_dict: dict[str, Any]) -> int:
    layers = {k.split(".")[3] for k in state_dict if k.startswith(_ENCODER + ".Layer ")}
    return len(layers)


def state_dict_to_variables(
    state_dict: dict[str, Any], n_layers: int | None = None
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Map an scvi-tools ``SCAR_VAE`` state dict (arrays) to scar-jax ``{"params", "batch_stats"}``.

    Parameters
    ----------
    state_dict
        ``module.state_dict()`` of ``scvi.external.SCAR``, values as numpy arrays (or anything
        ``np.asarray`` accepts).
    n_layers
        Number of hidden layers; inferred from the keys when ``None`` (and checked when given).

    Returns
    -------
    The variables pytree (float32 numpy leaves; kernels transposed to ``(in, out)``, ``px_r`` as
    ``(1, G)``) and the ambient profile ``(1, G)`` when the state dict holds one (scvi-tools 1.4 does
    not: see :func:`read_scvi_tools_save`), else ``None``.
    """
    found = _n_layers_in(state_dict)
    if n_layers is None:
        n_layers = found
    if n_layers < 1 or found != n_layers:
        raise ValueError(
            f"the state dict has {found} encoder hidden layers ({_ENCODER}.Layer i), expected {n_layers}: "
            "not an scvi-tools SCAR model of this configuration"
        )
    table = _key_table(n_layers)
    missing = [k for k, *_ in table if k not in state_dict]
    if missing:
        raise ValueError(f"the state dict lacks {len(missing)} SCAR weights, e.g. {missing[:3]}")
    known = {k for k, *_ in table} | {"ambient_profile"}
    unexpected = [
        k
        for k in state_dict
        if k not in known and not k.startswith(_IGNORED_PREFIXES) and not k.endswith(".num_batches_tracked")
    ]
    if unexpected:
        raise ValueError(
            f"the state dict has {len(unexpected)} weights scar-jax's SCAR does not have, e.g. {unexpected[:3]} "
            "(a different architecture: layer norm, covariates or another model class?)"
        )
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, collection, path, kind in table:
        value = np.asarray(state_dict[key], dtype=np.float32)
        if kind == "kernel":
            if value.ndim != 2:
                raise ValueError(f"{key} must be 2-d (out, in), got shape {value.shape}")
            value = value.T
        elif kind == "px_r":
            if value.ndim != 1:
                raise ValueError(f"px_r must be per gene, shape (n_genes,), got {value.shape}")
            value = value.reshape(1, -1)
        elif value.ndim != 1:
            raise ValueError(f"{key} must be 1-d, got shape {value.shape}")
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(value)
    _check_shapes(variables, n_layers)
    ambient = state_dict.get("ambient_profile")
    ambient = None if ambient is None else np.asarray(ambient, np.float32).reshape(1, -1)
    return variables, ambient


def _check_shapes(variables: dict[str, Any], n_layers: int) -> None:
    """Consistency of the layer sizes (a mis-shaped weight fails here, not later inside a matmul)."""
    p, s = variables["params"], variables["batch_stats"]
    n_genes = p["px_r"].shape[1]
    for part, n_in in (("encoder", n_genes), ("decoder", p["encoder"]["mean"]["kernel"].shape[1])):
        for i in range(n_layers):
            dense = p[part]["hidden"][f"dense_{i}"]
            n_out = dense["kernel"].shape[1]
            expected = {
                f"{part}/hidden/dense_{i}/kernel": (dense["kernel"].shape, (n_in, n_out)),
                f"{part}/hidden/dense_{i}/bias": (dense["bias"].shape, (n_out,)),
            }
            for name, arr in (
                *p[part]["hidden"][f"batchnorm_{i}"].items(),
                *s[part]["hidden"][f"batchnorm_{i}"].items(),
            ):
                expected[f"{part}/hidden/batchnorm_{i}/{name}"] = (arr.shape, (n_out,))
            for name, (got, want) in expected.items():
                if got != want:
                    raise ValueError(f"{name} has shape {got}, expected {want}")
            n_in = n_out
    n_hidden = p["encoder"]["hidden"][f"dense_{n_layers - 1}"]["kernel"].shape[1]
    n_latent = p["encoder"]["mean"]["kernel"].shape[1]
    heads = {
        "encoder/mean": (p["encoder"]["mean"], n_latent),
        "encoder/log_var": (p["encoder"]["log_var"], n_latent),
        "decoder/native_frequencies": (p["decoder"]["native_frequencies"], n_genes),
        "decoder/noise_ratio": (p["decoder"]["noise_ratio"], 1),
        "decoder/zi_logits": (p["decoder"]["zi_logits"], n_genes),
    }
    for name, (leaf, n_out) in heads.items():
        if leaf["kernel"].shape != (n_hidden, n_out) or leaf["bias"].shape != (n_out,):
            raise ValueError(
                f"{name} has kernel {leaf['kernel'].shape} and bias {leaf['bias'].shape}, "
                f"expected ({n_hidden}, {n_out}) and ({n_out},)"
            )


def variables_to_state_dict(
    variables: dict[str, Any], n_layers: int | None = None, num_batches_tracked: int = 0
) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_dict_to_variables`: scar-jax variables to scvi-tools state-dict arrays.

    Returns numpy arrays (float32; kernels ``(out, in)``; ``px_r`` ``(G,)``; ``num_batches_tracked`` int64
    scalars) for every SCAR weight except the library encoder ``l_encoder.*``, which scvi-tools builds
    but SCAR never evaluates: :func:`export_scvi_tools` keeps scvi-tools' own initial values for it.
    """
    params = variables["params"]
    if n_layers is None:
        n_layers = len([k for k in params["encoder"]["hidden"] if k.startswith("dense_")])
    _check_shapes({"params": params, "batch_stats": variables["batch_stats"]}, n_layers)
    out: dict[str, np.ndarray] = {}
    for key, collection, path, kind in _key_table(n_layers):
        node = variables[collection]
        for name in path:
            node = node[name]
        value = np.asarray(node, dtype=np.float32)
        if kind == "kernel":
            value = value.T
        elif kind == "px_r":
            value = value.reshape(-1)
        out[key] = np.ascontiguousarray(value)
        if key.endswith(".1.running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return out


# ---------------------------------------------------------------------------------------------- reading
def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return value


def _indices(value: Any) -> np.ndarray:
    """A saved split (``None`` before training) as int64 positions."""
    return np.zeros(0, np.int64) if value is None else np.asarray(_to_numpy(value), np.int64).ravel()


def _history_rows(history: Any) -> list[dict[str, float]]:
    """scvi-tools ``history_`` (name -> DataFrame indexed by epoch) as scar-jax per-epoch rows."""
    if not isinstance(history, dict):
        return []
    rows: dict[int, dict[str, float]] = {}
    for name, frame in history.items():
        try:
            series = frame[name] if name in getattr(frame, "columns", ()) else frame.iloc[:, 0]
            for epoch, value in series.items():
                rows.setdefault(int(epoch), {"epoch": int(epoch)})[str(name)] = float(value)
        except (AttributeError, TypeError, ValueError, IndexError):
            continue  # a history entry that is not a per-epoch series: not needed to use the model
    return [rows[e] for e in sorted(rows)]


def read_scvi_tools_save(dir_path: str | os.PathLike, prefix: str | None = None) -> dict[str, Any]:
    """Read ``{prefix}model.pt`` of an ``scvi.external.SCAR`` save (needs PyTorch; no scvi-tools needed).

    Returns a dict with

    * ``state_dict``: ``{name: ndarray}``, the module's weights and buffers;
    * ``hyperparameters``: ``n_hidden``, ``n_latent``, ``n_layers``, ``dropout_rate``, ``gene_likelihood``,
      ``latent_distribution``, ``scale_activation``, ``sparsity`` (scvi-tools defaults filled in);
    * ``model_kwargs``: the extra keyword arguments the scvi-tools model was built with;
    * ``ambient_profile``: float32 ``(1, n_genes)`` as saved (scvi-tools stores it in the constructor
      arguments, not in the state dict), or ``None`` if the save has none;
    * ``var_names``: ndarray of str; ``setup_args``: ``layer``, ``batch_key``, ``labels_key``,
      ``size_factor_key``; ``batch_categories``: the batch categories of the setup, or ``None``;
    * ``is_trained``, ``history_rows``, ``train_indices``, ``validation_indices``, ``test_indices``,
      ``model_name``, ``scvi_version``; ``adata_path``: ``{prefix}adata.h5ad`` if saved, else ``None``.

    ``model.pt`` is a pickle (``torch.load(weights_only=False)``, as scvi-tools loads it): read only
    files you trust.
    """
    torch = _import_torch()
    path = Path(dir_path)
    p = prefix or ""
    model_path = path / f"{p}{MODEL_FILE}"
    if not model_path.is_file():
        if (path / f"{p}{LEGACY_MODEL_FILE}").is_file():
            raise ValueError(
                f"{path} is a save of scvi-tools < 0.15 ({LEGACY_MODEL_FILE}); convert it first with "
                "scvi.external.SCAR.convert_legacy_save (scvi-tools) and read the result"
            )
        raise ValueError(f"{model_path} not found: not a directory saved by scvi.external.SCAR.save")
    try:
        saved = torch.load(model_path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle and zip errors come in many types
        raise ValueError(
            f"{model_path} cannot be read by torch.load ({err}); the file is truncated or corrupted"
        ) from err
    if not isinstance(saved, dict) or "model_state_dict" not in saved or "attr_dict" not in saved:
        raise ValueError(f"{model_path} is not an scvi-tools model save (no model_state_dict / attr_dict)")
    attr = saved["attr_dict"]
    registry = attr.get("registry_", {}) or {}
    model_name = registry.get("model_name")
    if model_name is not None and model_name != "SCAR":
        raise ValueError(f"{model_path} holds an scvi-tools {model_name!r} model, not SCAR")
    init = attr.get("init_params_")
    if not isinstance(init, dict):
        raise ValueError(f"{model_path} has no init_params_: cannot recover the model's hyper-parameters")
    if "non_kwargs" in init:
        non_kwargs = dict(init["non_kwargs"])
        model_kwargs = {k: v for group in init.get("kwargs", {}).values() for k, v in dict(group).items()}
    else:  # older scvi-tools layout: a flat dict whose dict values are the **kwargs
        non_kwargs = {k: v for k, v in init.items() if not isinstance(v, dict)}
        model_kwargs = {k: v for group in init.values() if isinstance(group, dict) for k, v in group.items()}
    hyper = {name: non_kwargs.get(name, SCVI_DEFAULTS[name]) for name in HYPERPARAMETERS}
    for name in ("n_hidden", "n_latent", "n_layers"):
        hyper[name] = int(hyper[name])
    for name in ("dropout_rate", "sparsity"):
        hyper[name] = float(hyper[name])
    state_dict = {
        k: _to_numpy(v) for k, v in saved["model_state_dict"].items() if k != "pyro_param_store" and hasattr(v, "shape")
    }
    ambient = non_kwargs.get("ambient_profile")
    if ambient is None and "ambient_profile" in state_dict:
        ambient = state_dict["ambient_profile"]
    if ambient is not None and not isinstance(ambient, str):
        ambient = np.nan_to_num(np.asarray(_to_numpy(ambient), np.float64)).astype(np.float32).reshape(1, -1)
    setup = registry.get("setup_args", {}) or {}
    batch_categories = None
    try:
        mapping = registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
        batch_categories = tuple(str(c) for c in np.asarray(mapping).tolist())
    except (KeyError, TypeError):
        pass
    adata_path = path / f"{p}{ADATA_FILE}"
    return {
        "state_dict": state_dict,
        "hyperparameters": hyper,
        "model_kwargs": model_kwargs,
        "ambient_profile": ambient,
        "var_names": np.asarray(saved.get("var_names"), dtype=str),
        "setup_args": {name: setup.get(name) for name in SETUP_ARGS},
        "batch_categories": batch_categories,
        "is_trained": bool(attr.get("is_trained_", True)),
        "history_rows": _history_rows(attr.get("history_")),
        "train_indices": _indices(attr.get("train_indices_")),
        "validation_indices": _indices(attr.get("validation_indices_")),
        "test_indices": _indices(attr.get("test_indices_")),
        "model_name": model_name,
        "scvi_version": registry.get("scvi_version"),
        "adata_path": adata_path if adata_path.is_file() else None,
    }


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
    import anndata
    import jax

    saved = read_scvi_tools_save(dir_path, prefix)
    _check_model_kwargs(saved["model_kwargs"])
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

    ambient = np.asarray(model.ambient_profile, np.float32)
    if ambient.shape[0] != 1:
        raise ValueError(
            f"the model has {ambient.shape[0]} ambient profiles (one per batch); scvi-tools' SCAR has a single "
            "ambient profile for all cells, so it cannot represent this model"
        )
    config = model.config
    spec = model.spec
    if spec.size_factor_key is not None and config.gene_likelihood == "b":
        raise ValueError("size_factor_key with gene_likelihood='b' has no scvi-tools equivalent")
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
    scvi_model.is_trained_ = bool(model.is_trained)
    scvi_model.train_indices_ = np.asarray(model.train_indices, np.int64)
    scvi_model.validation_indices_ = np.asarray(model.validation_indices, np.int64)
    scvi_model.test_indices_ = np.asarray(model.test_indices, np.int64)
    history = model.history
    scvi_model.history_ = history if history else None
    scvi_model.save(str(path), prefix=prefix, overwrite=overwrite, save_anndata=False)
    if save_anndata:
        model.adata.write_h5ad(path / f"{prefix or ''}{ADATA_FILE}")


def _numpy_tree(variables: dict[str, Any]) -> dict[str, Any]:
    import jax

    return jax.tree.map(lambda a: np.asarray(a), jax.device_get(variables))
