"""The scvi-tools ``SCAR`` save format: reading ``model.pt``, and the state dict <-> flax variables mapping.

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

Reading needs PyTorch (``pip install 'scar-jax[torch]'``), imported only inside the functions that need
it; the mapping needs neither PyTorch nor scvi-tools. ``model.pt`` is a pickle: load only files you trust.
Turning a save into a scar-jax model and writing saves for scvi-tools: :mod:`scar_jax.scvi_io`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .io import missing_save

TORCH_EXTRA_MESSAGE = "reading scvi-tools saves needs PyTorch: pip install 'scar-jax[torch]'"
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
    _check_keys(state_dict, table)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, collection, path, kind in table:
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _flax_layout(key, kind, state_dict[key])
    _check_shapes(variables, n_layers)
    ambient = state_dict.get("ambient_profile")
    ambient = None if ambient is None else np.asarray(ambient, np.float32).reshape(1, -1)
    return variables, ambient


def _check_keys(state_dict: dict[str, Any], table: list[tuple[str, str, tuple[str, ...], str]]) -> None:
    """Every weight of the ``table`` present, and none SCAR lacks (ignored: ``l_encoder.*``, the Pyro store,
    ``num_batches_tracked`` and an ``ambient_profile``)."""
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


def _flax_layout(key: str, kind: str, value: Any) -> np.ndarray:
    """One torch weight as its flax leaf (float32, contiguous): a kernel ``(out, in)`` transposed to ``(in, out)``,
    ``px_r`` ``(G,)`` as ``(1, G)``, a vector kept; a wrong number of dimensions raises ``ValueError``."""
    value = np.asarray(value, dtype=np.float32)
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
    return np.ascontiguousarray(value)


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
    path = Path(dir_path)
    p = prefix or ""
    model_path = path / f"{p}{MODEL_FILE}"
    saved = _load_model_file(path, p)
    attr = saved["attr_dict"]
    registry = attr.get("registry_", {}) or {}
    model_name = registry.get("model_name")
    if model_name is not None and model_name != "SCAR":
        raise ValueError(f"{model_path} holds an scvi-tools {model_name!r} model, not SCAR")
    hyper, model_kwargs, non_kwargs = _init_params(attr.get("init_params_"), model_path)
    state_dict = {
        k: _to_numpy(v) for k, v in saved["model_state_dict"].items() if k != "pyro_param_store" and hasattr(v, "shape")
    }
    setup = registry.get("setup_args", {}) or {}
    adata_path = path / f"{p}{ADATA_FILE}"
    return {
        "state_dict": state_dict,
        "hyperparameters": hyper,
        "model_kwargs": model_kwargs,
        "ambient_profile": _ambient_profile(non_kwargs, state_dict),
        "var_names": np.asarray(saved.get("var_names"), dtype=str),
        "setup_args": {name: setup.get(name) for name in SETUP_ARGS},
        "batch_categories": _batch_categories(registry),
        "is_trained": bool(attr.get("is_trained_", True)),
        "history_rows": _history_rows(attr.get("history_")),
        "train_indices": _indices(attr.get("train_indices_")),
        "validation_indices": _indices(attr.get("validation_indices_")),
        "test_indices": _indices(attr.get("test_indices_")),
        "model_name": model_name,
        "scvi_version": registry.get("scvi_version"),
        "adata_path": adata_path if adata_path.is_file() else None,
    }


def _load_model_file(path: Path, p: str) -> dict[str, Any]:
    """``torch.load`` of ``{p}model.pt`` in ``path`` (PyTorch imported first), checked to be an scvi-tools save."""
    torch = _import_torch()
    model_path = path / f"{p}{MODEL_FILE}"
    if not model_path.is_file():
        raise missing_save(
            path / f"{p}{LEGACY_MODEL_FILE}",
            f"{path} is a save of scvi-tools < 0.15 ({LEGACY_MODEL_FILE}); convert it first with "
            "scvi.external.SCAR.convert_legacy_save (scvi-tools) and read the result",
            f"{model_path} not found: not a directory saved by scvi.external.SCAR.save",
        )
    try:
        saved = torch.load(model_path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle and zip errors come in many types
        raise ValueError(
            f"{model_path} cannot be read by torch.load ({err}); the file is truncated or corrupted"
        ) from err
    if not isinstance(saved, dict) or "model_state_dict" not in saved or "attr_dict" not in saved:
        raise ValueError(f"{model_path} is not an scvi-tools model save (no model_state_dict / attr_dict)")
    return saved


def _init_params(init: Any, model_path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(hyperparameters, model_kwargs, non_kwargs)`` from a save's ``init_params_`` (scvi-tools defaults filled
    in; sizes as ``int``, rates as ``float``)."""
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
    return hyper, model_kwargs, non_kwargs


def _ambient_profile(non_kwargs: dict[str, Any], state_dict: dict[str, Any]) -> Any:
    """The saved ambient profile: float32 ``(1, G)`` (NaN as 0), an ``adata.varm``/``.var`` key, or ``None``."""
    ambient = non_kwargs.get("ambient_profile")
    if ambient is None and "ambient_profile" in state_dict:
        ambient = state_dict["ambient_profile"]
    if ambient is not None and not isinstance(ambient, str):
        ambient = np.nan_to_num(np.asarray(_to_numpy(ambient), np.float64)).astype(np.float32).reshape(1, -1)
    return ambient


def _batch_categories(registry: dict[str, Any]) -> tuple[str, ...] | None:
    """The batch categories of the save's setup registry, or ``None`` when it records none."""
    try:
        mapping = registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
        return tuple(str(c) for c in np.asarray(mapping).tolist())
    except (KeyError, TypeError):
        return None
