"""Isotype-control removal vs retention of the other antibodies on real CITE-seq data (issue 10).

Data: ``shared/data/dsb_citeseq_87adt_cells_and_empty.h5ad`` (87 ADTs, 2,872 cells + 8,005 empty droplets from
6 lanes, 4 isotype controls flagged in ``var.isotype_control``; see ``shared/data/SOURCES.md``). Isotype
controls bind nothing specific: their counts in cells are background, so a denoising should remove them, while
the other antibodies carry real signal and most of their counts should be kept.

Usage::

    python benchmarks/real_citeseq.py                        # pooled profile, the settings of the tests
    python benchmarks/real_citeseq.py --per-lane             # + one model per lane with that lane's profile
    python benchmarks/real_citeseq.py --lane-profiles        # + one model, batch_key="lane", a profile per lane
    python benchmarks/real_citeseq.py --odds 1 0.1 0.01 --epochs 200

Three ways: **pooled** (default): one profile estimated from the empty droplets of all lanes together, one model
for all cells (no batch key); **per lane** (``--per-lane``): one model per lane, each with the profile of its own
lane's empty droplets, calibrated lane by lane; **lane profiles** (``--lane-profiles``): one model for all cells
with ``batch_key="lane"`` and one profile per lane (the calibrated method then mixes the lanes' profiles in each
neighbourhood). Profiles: :meth:`SCAR.get_ambient_profile` with ``prob=0.01``
(see ``tests/test_ambient.py``). Training as in ``tests/test_ambient.py``: ``n_latent=10``, ``sparsity=1``,
60 epochs, seed 0.

Rows: the count-preserving ``"split"`` (default) and ``method="calibrated"`` (``n_neighbours=50``) at each
``expressed_prior_odds`` of ``--odds``. Columns: isotype-control counts removed, other-ADT counts kept, all
counts kept, and the mean noise ratio (the model's for the split, ``get_noise_ratio(calibrated=True)`` for
the calibrated rows). "empty-implied" is the contamination that the isotype controls imply,
``isotype counts in cells / (library x isotype share of the profile)`` (an upper bound, in the manner of SoupX).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scar_jax import SCAR

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb_citeseq_87adt_cells_and_empty.h5ad"


def load(path: Path = DATA) -> tuple[ad.AnnData, ad.AnnData]:
    """The cells (CSR counts) and all droplets (cells + empties) of the CITE-seq file."""
    adt = ad.read_h5ad(path)
    adt.X = sp.csr_matrix(adt.X)
    cells = adt[adt.obs["droplet"] == "cell"].copy()
    return cells, adt


def _fit(
    cells: ad.AnnData, raw: ad.AnnData, epochs: int, seed: int, batch_key: str | None = None
) -> tuple[SCAR, np.ndarray]:
    """The model and its ambient profile(s), ``(n_features, n_profiles)``."""
    SCAR.setup_anndata(cells, batch_key=batch_key)
    profile = SCAR.get_ambient_profile(cells, raw, prob=0.01, batch_key=batch_key)
    model = SCAR(cells, ambient_profile="ambient_profile", n_latent=10, sparsity=1.0, seed=seed)
    model.train(max_epochs=epochs, enable_progress_bar=False)
    return model, profile


def _denoise(model: SCAR, odds: tuple[float, ...], n_neighbours: int) -> dict[str, tuple[sp.csr_matrix, np.ndarray]]:
    out = {"split": (sp.csr_matrix(model.get_denoised_counts(method="split")), model.get_noise_ratio())}
    noise = model.get_noise_ratio(calibrated=True, n_neighbours=n_neighbours)
    for c in odds:
        den = model.get_denoised_counts(method="calibrated", n_neighbours=n_neighbours, expressed_prior_odds=c)
        out[f"calibrated, odds {c:g}"] = (sp.csr_matrix(den), noise)
    return out


def stats(raw: sp.csr_matrix, den: sp.csr_matrix, isotype: np.ndarray) -> dict[str, float]:
    raw_iso, raw_other = raw[:, isotype].sum(), raw[:, ~isotype].sum()
    return {
        "iso_removed": 1.0 - den[:, isotype].sum() / raw_iso,
        "other_kept": den[:, ~isotype].sum() / raw_other,
        "all_kept": den.sum() / raw.sum(),
        "above_raw": int(((den - raw) > 0).nnz),
    }


def run(
    mode: str = "pooled",
    odds: tuple[float, ...] = (1.0, 0.1),
    epochs: int = 60,
    seed: int = 0,
    n_neighbours: int = 50,
    path: Path = DATA,
) -> dict:
    """Per method: the stats of :func:`stats` and the mean noise ratio; ``mode``: ``"pooled"``, ``"per-lane"`` or
    ``"lane-profiles"``."""
    cells, adt = load(path)
    isotype = cells.var["isotype_control"].to_numpy().astype(bool)
    t0 = time.perf_counter()
    lanes = cells.obs["lane"].astype(str).to_numpy()
    if mode in ("pooled", "lane-profiles"):
        batch_key = "lane" if mode == "lane-profiles" else None
        model, profiles = _fit(cells, adt, epochs, seed, batch_key)
        codes = np.searchsorted(np.unique(lanes), lanes) if batch_key else np.zeros(cells.n_obs, int)
        parts = [(np.arange(cells.n_obs), _denoise(model, odds, n_neighbours), profiles[:, codes].T)]
    else:
        parts = []
        for lane in np.unique(lanes):
            rows = np.flatnonzero(lanes == lane)
            sub = cells[rows].copy()
            model, profile = _fit(sub, adt[adt.obs["lane"].astype(str) == lane].copy(), epochs, seed)
            parts.append((rows, _denoise(model, odds, n_neighbours), np.tile(profile[:, 0], (len(rows), 1))))
    elapsed = time.perf_counter() - t0
    order = np.concatenate([rows for rows, _, _ in parts])
    raw = cells.X[order]
    result = {"mode": mode, "n_cells": cells.n_obs, "seconds": elapsed, "methods": {}}
    for name in parts[0][1]:
        den = sp.vstack([d[name][0] for _, d, _ in parts]).tocsr()
        noise = np.concatenate([d[name][1] for _, d, _ in parts])
        result["methods"][name] = stats(raw, den, isotype) | {"noise_mean": float(noise.mean())}
    implied = []  # per cell profile rows (n_cells_part, n_features): pooled over the cells of each lane
    for lane in np.unique(lanes):
        for rows, _, cell_profiles in parts:
            in_lane = lanes[rows] == lane
            if in_lane.any():
                x = cells.X[rows[in_lane]]
                iso_share = cell_profiles[np.flatnonzero(in_lane)[0], isotype].sum()
                implied.append(x[:, isotype].sum() / (x.sum() * iso_share))
    result["empty_implied"] = float(np.mean(implied))
    result["iso_share_cells"] = float(cells.X[:, isotype].sum() / cells.X.sum())
    return result


def print_result(r: dict) -> None:
    print(
        f"\n{r['mode']}: {r['n_cells']} cells, {r['seconds']:.0f} s (training + denoising); isotype controls are "
        f"{100 * r['iso_share_cells']:.2f}% of cell counts; empty-implied contamination {r['empty_implied']:.3f}"
    )
    header = f"{'method':<22} | {'isotype removed':>15} | {'other ADT kept':>14} | {'all kept':>8} | "
    header += f"{'mean noise ratio':>16} | above raw"
    print(header)
    print("-" * len(header))
    for name, s in r["methods"].items():
        print(
            f"{name:<22} | {100 * s['iso_removed']:>14.1f}% | {100 * s['other_kept']:>13.1f}% | "
            f"{100 * s['all_kept']:>7.1f}% | {s['noise_mean']:>16.4f} | {s['above_raw']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--odds", type=float, nargs="+", default=[1.0, 0.1], help="expressed_prior_odds values")
    parser.add_argument("--neighbours", type=int, default=50)
    parser.add_argument("--per-lane", action="store_true", help="also one model per lane (its own profile)")
    parser.add_argument("--lane-profiles", action="store_true", help="also one model with a profile per lane")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"data not found: {args.data} (see shared/data/SOURCES.md)")
    print(f"87-ADT CITE-seq, n_latent 10, sparsity 1, {args.epochs} epochs, seed {args.seed}, prob=0.01 profiles")
    modes = ["pooled"] + ["per-lane"] * args.per_lane + ["lane-profiles"] * args.lane_profiles
    for mode in modes:
        print_result(run(mode, tuple(args.odds), args.epochs, args.seed, args.neighbours, args.data))


if __name__ == "__main__":
    main()
