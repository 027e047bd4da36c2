"""Cell-free (empty) droplets of a simulation, and the raw droplet matrix of cells and empty droplets."""

from __future__ import annotations

import math

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._common import (
    _STREAM_EMPTY,
    _alias_table,
    _check_float,
    _check_int,
    _chunk_rows,
    _CSRBuilder,
    _even_blocks,
    _names,
    _profile_counts,
)


# long: the parameter and output reference (about 35 lines of docstring); the body is about 45 lines
def simulate_empty_droplets(
    adata: anndata.AnnData,
    n_droplets: int = 5000,
    library_size_mean: float = 100.0,
    library_size_sd_log: float = 0.8,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate cell-free (empty) droplets matching a dataset made by :func:`simulate`.

    Each droplet ``j`` in batch ``b_j`` receives pure ambient counts
    ``y_jg ~ Poisson(L_j a_{b_j g})`` with ``L_j ~ LogNormal(log(library_size_mean) - s^2 / 2, s^2)``
    and ``a_b = adata.varm["true_ambient_profile"][:, b]``. Droplets are split into contiguous,
    evenly sized batch blocks. No floor is applied: droplets with zero counts can occur (as in a real
    raw feature-barcode matrix) and are kept.

    Parameters
    ----------
    adata
        Output of :func:`simulate` (needs ``varm["true_ambient_profile"]`` and ``uns["simulation"]``).
    n_droplets
        Number of empty droplets, ``>= 1``.
    library_size_mean
        Mean expected counts per empty droplet, ``> 0``.
    library_size_sd_log
        Standard deviation of ``log L_j``, ``>= 0``.
    seed
        Seed (``>= 0``); the generator is ``numpy.random.default_rng([1, seed])``, a stream independent
        of :func:`simulate`'s for the same seed.

    Returns
    -------
    anndata.AnnData
        ``(n_droplets, n_genes)`` object with ``X`` (CSR ``int32``), ``obs["batch"]`` (categorical with
        the same categories as ``adata``), ``obs["library_size"]`` (float64 ``L_j``), ``obs_names``
        ``"empty_00000"``, ..., the ``var_names`` of ``adata`` and ``uns["simulation"]`` (the
        parameters, JSON-serialisable).

    Raises
    ------
    ValueError
        If ``adata`` was not made by :func:`simulate` or an argument is out of range.
    """
    if not isinstance(adata, anndata.AnnData):
        raise ValueError(f"adata must be an AnnData made by simulate(), got {type(adata).__name__}")
    if "true_ambient_profile" not in adata.varm:
        raise ValueError("adata has no varm['true_ambient_profile']; it was not made by scar_jax.datasets.simulate")
    n_droplets = _check_int("n_droplets", n_droplets, 1)
    library_size_mean = _check_float("library_size_mean", library_size_mean, low=0.0)
    library_size_sd_log = _check_float("library_size_sd_log", library_size_sd_log, low=0.0, low_inclusive=True)
    seed = _check_int("seed", seed, 0)

    profile, batch_names = _ambient_truth(adata)
    G, B = profile.shape

    rng = np.random.default_rng([_STREAM_EMPTY, seed])
    batch = _even_blocks(n_droplets, B)
    mu_log = math.log(library_size_mean) - 0.5 * library_size_sd_log**2
    library = rng.lognormal(mu_log, library_size_sd_log, size=n_droplets)
    tables = [_alias_table(profile[:, b]) for b in range(B)]

    builder = _CSRBuilder(G)
    step = _chunk_rows(G)
    for start in range(0, n_droplets, step):
        rows = slice(start, min(start + step, n_droplets))
        builder.add(_profile_counts(rng, library[rows], batch[rows], tables, G)[0])

    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, categories=batch_names),
            "library_size": library,
        },
        index=pd.Index(_names("empty", n_droplets, 5)),
    )
    params = {
        "generator": "scar_jax.datasets.simulate_empty_droplets",
        "n_droplets": n_droplets,
        "library_size_mean": library_size_mean,
        "library_size_sd_log": library_size_sd_log,
        "seed": seed,
        "batch_categories": batch_names,
    }
    return anndata.AnnData(
        X=builder.build(),
        obs=obs,
        var=pd.DataFrame(index=adata.var_names.copy()),
        uns={"simulation": params},
    )


def _ambient_truth(adata: anndata.AnnData) -> tuple[np.ndarray, list[str]]:
    """The true ambient profiles ``(G, B)`` of a simulation, each normalised, and the batch names."""
    profile = np.asarray(adata.varm["true_ambient_profile"], dtype=np.float64)
    if profile.ndim == 1:
        profile = profile[:, None]
    B = profile.shape[1]
    sim = adata.uns.get("simulation", {})
    if "batch_categories" in sim:
        batch_names = [str(x) for x in sim["batch_categories"]]
    elif "batch" in adata.obs and isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype):
        batch_names = [str(x) for x in adata.obs["batch"].cat.categories]
    else:
        batch_names = [f"batch_{b}" for b in range(B)]
    if len(batch_names) != B:
        raise ValueError(f"adata.varm['true_ambient_profile'] has {B} columns but there are {len(batch_names)} batches")
    if np.any(profile < 0) or np.any(profile.sum(axis=0) <= 0):
        raise ValueError("adata.varm['true_ambient_profile'] must be non-negative with positive columns")
    return profile / profile.sum(axis=0, keepdims=True), batch_names


def raw_droplets(adata: anndata.AnnData, empty: anndata.AnnData) -> anndata.AnnData:
    """Concatenate cells and empty droplets into a raw (unfiltered) droplet matrix.

    Mimics a 10x Genomics ``raw_feature_bc_matrix``: all barcodes, cells first, counts only.

    Parameters
    ----------
    adata
        Cell-containing droplets, ``(n_cells, n_genes)``, e.g. from :func:`simulate`.
    empty
        Empty droplets, ``(n_droplets, n_genes)``, e.g. from :func:`simulate_empty_droplets`; must have
        the same ``var_names`` as ``adata``.

    Returns
    -------
    anndata.AnnData
        ``(n_cells + n_droplets, n_genes)`` object with ``X`` (CSR ``int32``, observed counts only),
        ``obs["is_cell"]`` (bool, ``True`` for the first ``n_cells`` rows) and ``obs["batch"]``
        (categorical; the categories of ``adata`` followed by any new ones of ``empty``).

    Raises
    ------
    ValueError
        If the gene names differ, the droplet names overlap or ``obs["batch"]`` is missing.
    """
    for name, obj in (("adata", adata), ("empty", empty)):
        if not isinstance(obj, anndata.AnnData):
            raise ValueError(f"{name} must be an AnnData, got {type(obj).__name__}")
        if "batch" not in obj.obs:
            raise ValueError(f"{name}.obs has no 'batch' column")
    if not adata.var_names.equals(empty.var_names):
        raise ValueError("adata and empty must have identical var_names")
    obs_names = adata.obs_names.append(empty.obs_names)
    if not obs_names.is_unique:
        raise ValueError("adata and empty share droplet names (obs_names)")

    def as_csr(x: object) -> sp.csr_matrix:
        m = sp.csr_matrix(x)
        return m.astype(np.int32) if m.dtype != np.int32 else m

    X = sp.vstack([as_csr(adata.X), as_csr(empty.X)], format="csr").astype(np.int32)
    X.sort_indices()
    cell_batch = adata.obs["batch"].astype(str)
    empty_batch = empty.obs["batch"].astype(str)
    if isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype):
        categories = [str(c) for c in adata.obs["batch"].cat.categories]
    else:
        categories = list(pd.unique(cell_batch))
    categories += [c for c in pd.unique(empty_batch) if c not in categories]
    obs = pd.DataFrame(
        {
            "is_cell": np.concatenate([np.ones(adata.n_obs, bool), np.zeros(empty.n_obs, bool)]),
            "batch": pd.Categorical(
                np.concatenate([cell_batch.to_numpy(), empty_batch.to_numpy()]), categories=categories
            ),
        },
        index=obs_names,
    )
    return anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
