"""Denoising quality against simulated truth (used by the demo, the tests and the benchmarks)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _dense(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def denoising_metrics(
    raw: np.ndarray | sp.spmatrix, denoised: np.ndarray | sp.spmatrix, native: np.ndarray | sp.spmatrix
) -> dict[str, float]:
    """Compare denoised counts with the true native counts, all ``(n_cells, n_genes)``.

    Returns
    -------
    dict with

    ``l1_raw``, ``l1_denoised``
        ``sum |raw - native|`` (the ambient counts) and ``sum |denoised - native|``.
    ``l1_improvement``
        ``1 - l1_denoised / l1_raw``: 1 is perfect, 0 no better than doing nothing, < 0 worse.
    ``ambient_removed``
        ``(sum raw - sum denoised) / sum (raw - native)``: fraction of the contamination removed
        (above 1 means native counts were removed too).
    ``native_retained``
        ``sum min(denoised, native) / sum native``.
    ``ambient_removed_entrywise``
        ``sum min(raw - denoised, raw - native)^+ / sum (raw - native)``: the true ambient counts removed,
        entry by entry (removing native counts in one entry does not make up for ambient left in another).
    ``above_raw``
        fraction of entries where ``denoised > raw`` (counts that were never observed).
    ``new_nonzeros``
        fraction of entries where ``raw == 0`` but ``denoised > 0``.
    ``cell_correlation``
        mean over cells of the Pearson correlation, over genes, of the denoised with the native counts
        (cells where either row is constant are left out).
    """
    raw, denoised, native = _dense(raw), _dense(denoised), _dense(native)
    if not raw.shape == denoised.shape == native.shape:
        raise ValueError(f"shapes differ: raw {raw.shape}, denoised {denoised.shape}, native {native.shape}")
    l1_raw = float(np.abs(raw - native).sum())
    l1_denoised = float(np.abs(denoised - native).sum())
    ambient = float((raw - native).sum())
    removed_ambient = float(np.clip(np.minimum(raw - denoised, raw - native), 0, None).sum())
    return {
        "l1_raw": l1_raw,
        "l1_denoised": l1_denoised,
        "l1_improvement": 1.0 - l1_denoised / l1_raw if l1_raw > 0 else float("nan"),
        "ambient_removed": float(raw.sum() - denoised.sum()) / ambient if ambient > 0 else float("nan"),
        "ambient_removed_entrywise": removed_ambient / ambient if ambient > 0 else float("nan"),
        "native_retained": float(np.minimum(denoised, native).sum() / native.sum()),
        "above_raw": float((denoised > raw).mean()),
        "new_nonzeros": float(((raw == 0) & (denoised > 0)).mean()),
        "cell_correlation": _mean_row_correlation(denoised, native),
    }


def _mean_row_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Pearson correlation of ``a[i]`` with ``b[i]`` (constant rows left out)."""
    a = np.asarray(a, np.float64) - np.asarray(a, np.float64).mean(1, keepdims=True)
    b = np.asarray(b, np.float64) - np.asarray(b, np.float64).mean(1, keepdims=True)
    norm = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    ok = norm > 0
    return float(np.mean((a * b).sum(1)[ok] / norm[ok])) if ok.any() else float("nan")


def pseudobulk_l1(
    raw: np.ndarray | sp.spmatrix,
    denoised: np.ndarray | sp.spmatrix,
    native: np.ndarray | sp.spmatrix,
    groups: np.ndarray,
) -> dict[str, float]:
    """L1 distance to the truth of per-group sums (pseudobulk profiles, e.g. per cell type).

    Summing the cells of a group averages out the Poisson noise of single cells, which no denoiser
    can (or should) predict, so this measures how much contamination is removed from expression
    profiles. Returns ``l1_raw``, ``l1_denoised`` and ``l1_improvement = 1 - l1_denoised / l1_raw``.
    """
    raw, denoised, native = _dense(raw), _dense(denoised), _dense(native)
    if not raw.shape == denoised.shape == native.shape or len(groups) != raw.shape[0]:
        raise ValueError(
            f"shapes differ: raw {raw.shape}, denoised {denoised.shape}, native {native.shape}, groups {len(groups)}"
        )
    codes, _ = pd_factorize(groups)
    indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))))
    sums = [indicator @ m for m in (raw, denoised, native)]
    l1_raw = float(np.abs(sums[0] - sums[2]).sum())
    l1_denoised = float(np.abs(sums[1] - sums[2]).sum())
    improvement = 1.0 - l1_denoised / l1_raw if l1_raw > 0 else float("nan")
    return {"l1_raw": l1_raw, "l1_denoised": l1_denoised, "l1_improvement": improvement}


def pd_factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and unique values of a label vector."""
    uniques, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
    return codes, uniques


def oracle_native_share(adata) -> np.ndarray:
    """The true posterior native share of each count of data made by :func:`scar_jax.datasets.simulate`.

    ``w_ig = (1 - eps_i) rho_{t(i) g} / ((1 - eps_i) rho_{t(i) g} + eps_i a_{b(i) g})`` with the true noise
    ratio parameter, cell-type profile and batch ambient profile, ``(n_cells, n_genes)``. Splitting each
    observed count with it (:func:`oracle_split`) is the best any count-preserving method can do.
    """
    eps = adata.obs["noise_ratio_parameter"].to_numpy()[:, None]
    rho = adata.varm["true_native_profile"][:, adata.obs["cell_type"].cat.codes.to_numpy()].T
    batches = adata.obs["batch"].cat.codes.to_numpy()
    ambient = adata.varm["true_ambient_profile"][:, batches].T
    native = (1.0 - eps) * rho
    return native / (native + eps * ambient)


def oracle_split(adata, seed: int = 0) -> np.ndarray:
    """Binomial split of the observed counts with :func:`oracle_native_share`, seeded, ``(n_cells, n_genes)``."""
    x = _dense(adata.X).astype(np.int64)
    return np.random.default_rng(seed).binomial(x, oracle_native_share(adata)).astype(np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors."""
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


def species_mixture_metrics(adata, denoised: np.ndarray | sp.spmatrix) -> dict[str, float]:
    """Retention and removal on data made by :func:`scar_jax.datasets.simulate_species_mixture`.

    A count of gene ``g`` in cell ``i`` is *expressed* when ``g`` belongs to the cell's species
    (``var["species"] == obs["species"]``) and *foreign* otherwise; foreign counts are all ambient.

    Returns
    -------
    dict with

    ``expressed_kept``
        ``sum denoised / sum raw`` over expressed entries: the fraction of the observed counts of
        expressed genes that is kept (the oracle keeps about ``1 - 0.64 eps``: their ambient part goes).
    ``native_kept``
        ``sum min(denoised, native) / sum native`` over expressed entries: real expression kept.
    ``foreign_removed``
        ``1 - sum denoised / sum raw`` over foreign entries: the known contamination removed.
    ``ambient_removed``
        ``sum min(raw - denoised, ambient)^+ / sum ambient`` over all entries (entry by entry).
    """
    raw, den, native = _dense(adata.X), _dense(denoised), _dense(adata.layers["native"])
    if den.shape != raw.shape:
        raise ValueError(f"denoised has shape {den.shape}, the data {raw.shape}")
    foreign = adata.obs["species"].cat.codes.to_numpy()[:, None] != adata.var["species"].cat.codes.to_numpy()[None, :]
    ambient = raw - native
    return {
        "expressed_kept": float(den[~foreign].sum() / raw[~foreign].sum()),
        "native_kept": float(np.minimum(den, native)[~foreign].sum() / native[~foreign].sum()),
        "foreign_removed": float(1.0 - den[foreign].sum() / raw[foreign].sum()),
        "ambient_removed": float(np.clip(np.minimum(raw - den, ambient), 0, None).sum() / ambient.sum()),
    }
