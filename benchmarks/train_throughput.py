"""Training throughput of scar-jax on simulated data: prints a table of cells/s and s/epoch.

Usage::

    python benchmarks/train_throughput.py                      # the three default sizes
    python benchmarks/train_throughput.py --sizes 2000x1000 --epochs 20 --likelihood nb

For each size: simulate (``scar_jax.datasets.simulate``), train one epoch to compile (the compiled
epoch is cached per configuration), then time ``--epochs`` epochs of a second model with the same
configuration through the public ``SCAR.train`` (validation pass included, as in real use). Cells/s
counts training cells (90% of the data) per second of training.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import jax

from scar_jax import SCAR, __version__
from scar_jax.datasets import simulate


def bench(n_cells: int, n_genes: int, epochs: int, likelihood: str, batch_size: int, dense: bool) -> dict:
    adata = simulate(n_cells=n_cells, n_genes=n_genes, seed=0)
    if dense:
        adata.X = adata.X.toarray()
    SCAR.setup_anndata(adata)
    t0 = time.perf_counter()
    warm = SCAR(adata, gene_likelihood=likelihood)
    warm.train(max_epochs=1, batch_size=batch_size, enable_progress_bar=False)
    first = time.perf_counter() - t0
    model = SCAR(adata, gene_likelihood=likelihood, seed=1)
    model.train(max_epochs=epochs, batch_size=batch_size, enable_progress_bar=False)
    s_per_epoch = model.training_time_s / epochs
    return {
        "cells": n_cells,
        "genes": n_genes,
        "X": "dense" if dense else "CSR",
        "likelihood": likelihood,
        "epochs": epochs,
        "first_epoch_s": first,
        "s_per_epoch": s_per_epoch,
        "cells_per_s": len(model.train_indices) / s_per_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2000x1000", "10000x2000", "50000x2000"])
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs (default: about 200k cells' worth)")
    parser.add_argument("--likelihood", default="b", choices=["b", "poisson", "nb", "zinb"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dense", action="store_true", help="dense X instead of CSR")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(
        f"scar-jax {__version__}, jax {jax.__version__}, device {device.platform}:{device.device_kind}, "
        f"{platform.processor() or platform.machine()}, batch {args.batch_size}"
    )
    header = (
        f"{'cells':>7} {'genes':>6} {'X':>5} {'lik':>7} {'epochs':>6} {'1st epoch s':>11} {'s/epoch':>8} {'cells/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        n_cells, n_genes = (int(v) for v in size.lower().split("x"))
        epochs = args.epochs or max(2, min(50, round(200_000 / n_cells)))
        r = bench(n_cells, n_genes, epochs, args.likelihood, args.batch_size, args.dense)
        print(
            f"{r['cells']:>7} {r['genes']:>6} {r['X']:>5} {r['likelihood']:>7} {r['epochs']:>6} "
            f"{r['first_epoch_s']:>11.2f} {r['s_per_epoch']:>8.3f} {r['cells_per_s']:>9,.0f}",
            flush=True,
        )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"peak host memory (RSS): {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
