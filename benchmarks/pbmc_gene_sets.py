"""The calibrated noise ratio on real PBMC cells over growing gene sets (issue 19: all genes, the soup as given).

Usage::

    python benchmarks/pbmc_gene_sets.py                        # the default calibration
    python benchmarks/pbmc_gene_sets.py --every-gene-estimates # as before MIN_EXPECTED_POOLED_COUNT (the trap)

Trains SCAR on the 1,914 genes of ``tests/test_real_pbmc.py`` (seed 0, sparsity 0.6, 150 epochs), then calibrates
the counts of the same cells over the 1,914 genes, the genes detected in >= 10 cells, in >= 1 cell and all 33,694
(the soup restricted to them and renormalised; zero on 18,181 genes) with that latent space, and prints the mean
noise ratio and, per marker group, the fraction removed outside / kept inside the lineage
(``benchmarks/real_pbmc.py``'s ``marker_stats``) of the split's expectation ``x * share``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import scipy.sparse as sp
from real_pbmc import MARKERS, load, marker_stats, soup_implied_contamination

import scar_jax.calibration.share as share_module
from scar_jax import SCAR
from scar_jax.calibration import calibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every-gene-estimates", action="store_true", help="MIN_EXPECTED_POOLED_COUNT = 0")
    args = parser.parse_args()
    if args.every_gene_estimates:
        share_module.MIN_EXPECTED_POOLED_COUNT = 0.0
    warnings.filterwarnings("ignore", category=UserWarning)
    everything, soup, _ = load(all_genes=True)
    fitted, profile, _ = load()
    SCAR.setup_anndata(fitted)
    model = SCAR(fitted, ambient_profile=profile, sparsity=0.6, seed=0)
    model.train(max_epochs=150, enable_progress_bar=False)
    latent = model.get_latent_representation()
    rho = soup_implied_contamination(everything, soup)
    detected = np.diff(sp.csc_matrix(everything.X).indptr)
    markers = everything.var_names.isin(MARKERS)
    gene_sets = {
        "the 1,914 of the fit": everything.var_names.isin(fitted.var_names),
        "detected in >= 10 cells": (detected >= 10) | markers,
        "detected in >= 1 cell": (detected >= 1) | markers,
        "all": np.ones(everything.n_vars, bool),
    }
    for name, keep in gene_sets.items():
        cells = everything[:, keep].copy()
        cells.X = sp.csr_matrix(cells.X)
        genes_soup = soup[keep] / soup[keep].sum()
        start = time.perf_counter()
        noise, share = calibrate(cells.X, latent, genes_soup, share_at="observed")
        seconds = time.perf_counter() - start
        stats = marker_stats(cells, cells.X.multiply(share).tocsr(), genes_soup, rho)
        groups = ", ".join(
            f"{g.split()[0]} {100 * s['removed_out']:.1f} / {100 * s['kept_in']:.2f}%"
            for g, s in stats.items()
            if s["raw_in"] > 0
        )
        print(f"{name:<24} {cells.n_vars:>6} genes: noise ratio {noise.mean():.4f} ({seconds:.0f} s); {groups}")


if __name__ == "__main__":
    main()
