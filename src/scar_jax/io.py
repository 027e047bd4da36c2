"""Saving and loading: a directory with ``manifest.json`` and ``state.msgpack``, written atomically.

* ``manifest.json``: format version, package/jax/flax versions, the :class:`~scar_jax.vae.SCARConfig`,
  the AnnData setup, gene names, training history and split, seed;
* ``state.msgpack``: ``flax.serialization.to_bytes`` of the train state (parameters, batch-norm
  running statistics, optimizer state, step and key data) and the ambient profile.

The directory is first written under a temporary name beside the target and then renamed, so an
interrupted save never leaves a half-written model where a good one was. Replacing a directory takes
two renames (the old one aside, the new one in); a process killed between them leaves the previous
version beside the target as ``.{name}.old-{pid}``, and the next read puts it back.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from .vae import SCARConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.msgpack"
ADATA = "adata.h5ad"


def file_names(prefix: str | None) -> tuple[str, str, str]:
    p = prefix or ""
    return p + MANIFEST, p + STATE, p + ADATA


def state_to_bytes(state: Any, ambient_profile: np.ndarray) -> bytes:
    """Serialise a train state (its typed key stored as raw key data) and the ambient profile."""
    state = state.replace(key=jax.random.key_data(state.key))
    return flax.serialization.to_bytes({"state": state, "ambient_profile": np.asarray(ambient_profile)})


def state_from_bytes(template: Any, ambient_template: np.ndarray, data: bytes) -> tuple[Any, jax.Array]:
    """Inverse of :func:`state_to_bytes`, given a template state of the same structure."""
    target = {"state": template.replace(key=jax.random.key_data(template.key)), "ambient_profile": ambient_template}
    restored = flax.serialization.from_bytes(target, data)
    state = jax.tree.map(jnp.asarray, restored["state"])  # numpy leaves would compile the step a second time
    return state.replace(key=jax.random.wrap_key_data(state.key)), jnp.asarray(restored["ambient_profile"])


def write_model_dir(
    dir_path: str | os.PathLike,
    manifest: dict[str, Any],
    state_bytes: bytes,
    *,
    prefix: str | None = None,
    overwrite: bool = False,
    adata: Any = None,
) -> None:
    """Write the model directory atomically (temporary directory, then rename)."""
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists; pass overwrite=True to replace it, or choose another dir_path")
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest_name, state_name, adata_name = file_names(prefix)
    manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if target.exists():  # keep the files of other prefixes; drop this prefix's old ones
            ours = {manifest_name, state_name, adata_name}
            shutil.copytree(target, tmp, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in ours])
        (tmp / state_name).write_bytes(state_bytes)
        if adata is not None:
            adata.write_h5ad(tmp / adata_name)
        (tmp / manifest_name).write_text(json.dumps(manifest, indent=1))
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def restore_interrupted_save(dir_path: str | os.PathLike) -> None:
    """Put back the previous version of ``dir_path`` if a save was killed between its two renames.

    Then ``dir_path`` is missing and the previous version is ``.{name}.old-{pid}`` beside it (the most
    recent one is restored). Nothing happens when ``dir_path`` exists.
    """
    target = Path(dir_path)
    if target.exists() or not target.parent.is_dir():
        return
    pattern = glob.escape(f".{target.name}.old-") + "*"
    olds = [p for p in target.parent.glob(pattern) if p.is_dir() and any(p.glob(f"*{MANIFEST}"))]
    if olds:
        max(olds, key=lambda p: p.stat().st_mtime).rename(target)


def has_model(dir_path: str | os.PathLike, prefix: str | None = None) -> bool:
    """Whether ``dir_path`` holds a scar-jax save (its manifest and state files)."""
    restore_interrupted_save(dir_path)
    manifest_name, state_name, _ = file_names(prefix)
    return (Path(dir_path) / manifest_name).is_file() and (Path(dir_path) / state_name).is_file()


def missing_save(found_instead: Path, instead_message: str, message: str) -> ValueError:
    """The error for a directory without the save looked for: ``instead_message`` when it holds the file
    ``found_instead`` (a save of another format or version), else ``message``."""
    return ValueError(instead_message if found_instead.is_file() else message)


def read_model_dir(dir_path: str | os.PathLike, prefix: str | None = None) -> tuple[dict[str, Any], bytes, Path]:
    """Read and check a model directory; returns the manifest, the state bytes and the AnnData path."""
    from . import __version__

    path = Path(dir_path)
    restore_interrupted_save(path)
    manifest_name, state_name, adata_name = file_names(prefix)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory saved by SCAR.save")
    if not (path / manifest_name).is_file() or not (path / state_name).is_file():
        raise missing_save(
            path / f"{prefix or ''}model.pt",
            f"{path} holds a scvi-tools (PyTorch) save, not a scar-jax one; "
            "convert it with SCAR.convert_legacy_save or load it with SCAR.from_scvi_tools",
            f"{path} lacks {manifest_name} or {state_name}: not a scar-jax model directory",
        )
    try:
        manifest = json.loads((path / manifest_name).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / manifest_name} is corrupted ({err}); save the model again") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path / manifest_name} is not a scar-jax manifest (a JSON object); save the model again")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses save format {version!r}, newer than this scar-jax ({__version__}, format "
            f"{FORMAT_VERSION}) reads; upgrade scar-jax"
        )
    saved = str(manifest.get("scar_jax_version", "0"))
    if _version_tuple(saved) > _version_tuple(__version__):
        warnings.warn(
            f"{path} was saved by scar-jax {saved}, newer than this one ({__version__}); it is read because its "
            f"format ({version}) is known, but upgrading scar-jax is recommended",
            UserWarning,
            stacklevel=3,
        )
    return manifest, (path / state_name).read_bytes(), path / adata_name


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"1.2.3rc1"`` -> ``(1, 2, 3)``: the leading numeric release parts."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


# ---------------------------------------------------------------------------------------------- a model's files
def write_model(
    dir_path: str | os.PathLike,
    record: dict[str, Any],
    state: Any,
    ambient_profile: np.ndarray,
    rows: list[dict[str, float]],
    split: tuple[np.ndarray, np.ndarray, np.ndarray],
    is_trained: bool,
    *,
    prefix: str | None = None,
    overwrite: bool = False,
    adata: Any = None,
) -> None:
    """Save a model: its ``record`` (``config``, ``spec``, ``var_names``, ``seed``, ``feature_type``,
    ``training_time_s``), train state, ambient profile, history ``rows`` and ``split``."""
    from . import __version__

    manifest = {
        "scar_jax_version": __version__,
        **{k: record[k] for k in ("config", "spec", "var_names", "seed", "feature_type")},
        "ambient_profile_shape": list(ambient_profile.shape),
        "is_trained": is_trained,
        "history": rows,
        "training_time_s": record["training_time_s"],
        "split": {"train": split[0].tolist(), "validation": split[1].tolist(), "test": split[2].tolist()},
    }
    state_bytes = state_to_bytes(state, ambient_profile)
    write_model_dir(dir_path, manifest, state_bytes, prefix=prefix, overwrite=overwrite, adata=adata)


def read_state(dir_path: Any, manifest: dict[str, Any], state_bytes: bytes, template: Any) -> tuple[Any, np.ndarray]:
    """The train state and the ambient profile (float32) of a save, read into ``template``'s structure."""
    ambient_template = np.zeros(tuple(manifest["ambient_profile_shape"]), np.float32)
    try:
        state, ambient = state_from_bytes(template, ambient_template, state_bytes)
    except Exception as err:  # msgpack errors come in many types
        raise ValueError(
            f"{dir_path}: the saved state cannot be read ({err}); the file is truncated or corrupted"
        ) from err
    return state, np.asarray(ambient, np.float32)


def saved_split(manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train, validation and test cell indices of a save."""
    split = manifest["split"]
    return tuple(np.asarray(split[k], np.int64) for k in ("train", "validation", "test"))


def read_checkpoint(
    dir_path: str | os.PathLike, record: dict[str, Any], template: Any, split: tuple[np.ndarray, ...]
) -> tuple[Any, list[dict[str, float]]]:
    """The train state and history of a checkpoint of the same model (``record``) and data split."""
    manifest, state_bytes, _ = read_model_dir(dir_path)
    same = (
        SCARConfig(**manifest["config"]) == SCARConfig(**record["config"])
        and manifest["seed"] == record["seed"]
        and manifest["var_names"] == record["var_names"]
        and all(np.array_equal(a, b) for a, b in zip(saved_split(manifest), split, strict=True))
    )
    if not same:
        raise ValueError(
            f"checkpoint_dir {dir_path} holds a different model or data split (configuration, seed, genes "
            "or train_size); use another checkpoint_dir or delete it"
        )
    ambient = np.zeros(tuple(manifest["ambient_profile_shape"]), np.float32)
    state, _ = state_from_bytes(template, ambient, state_bytes)
    return state, manifest["history"]


def write_layer_by_blocks(
    path: Path, adata: Any, layer: str, block: int, make_counts: Any, progress_bar: bool = True
) -> None:
    """Write a new ``.h5ad`` with ``adata``'s ``obs`` and ``var`` and the CSR ``layers[layer]``, whose rows
    ``make_counts(rows)`` gives ``block`` cells at a time (memory holds one block). Written under a temporary
    name and renamed when complete, so an interrupted call leaves no partial file."""
    import anndata
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem
    from tqdm.auto import tqdm

    obs = adata.obs if isinstance(adata.obs, pd.DataFrame) else pd.DataFrame(index=adata.obs_names)
    partial = path.with_name(path.name + ".partial")
    anndata.AnnData(obs=obs.copy(), var=adata.var.copy()).write_h5ad(partial)
    starts = range(0, adata.n_obs, block)
    try:
        with h5py.File(partial, "r+") as f:
            for start in tqdm(starts, desc="Denoising", unit="block", disable=not progress_bar):
                counts = make_counts(np.arange(start, min(start + block, adata.n_obs)))
                if start == 0:
                    write_elem(f["layers"], layer, counts)
                else:
                    sparse_dataset(f["layers"][layer]).append(counts)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
