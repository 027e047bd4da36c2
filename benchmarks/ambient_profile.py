"""Ambient-profile estimation on a large sparse raw droplet matrix: time and peak memory.

Usage::

    python benchmarks/ambient_profile.py                       # 750,000 droplets x 20,000 genes
    python benchmarks/ambient_profile.py --droplets 100000 --genes 5000

Builds a synthetic 10x-like raw matrix (CSR int32): ``--cells`` cell droplets (log-normal totals, mean
3000) and empty droplets (log-normal totals, median ~5 counts), all counts drawn from profiles over the
genes, then runs ``scar_jax.SCAR.get_ambient_profile`` (the same sparse code path) with the reference's
defaults (``sample=50000``) and on all droplets. Peak memory is the peak of the memory allocated during
the call (``tracemalloc``, which sees every NumPy/SciPy array), compared with the size of the CSR matrix.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scar_jax import SCAR


def synthetic_raw(n_droplets: int, n_genes: int, n_cells: int, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    ambient = rng.dirichlet(np.full(n_genes, 0.1))
    cell_profile = rng.dirichlet(np.full(n_genes, 0.1))
    is_cell = np.zeros(n_droplets, bool)
    is_cell[rng.choice(n_droplets, n_cells, replace=False)] = True
    totals = np.where(is_cell, rng.lognormal(np.log(3000), 0.5, n_droplets), rng.lognormal(np.log(5), 1.0, n_droplets))
    totals = np.maximum(totals.astype(np.int64), 1)
    blocks = []
    for start in range(0, n_droplets, 50_000):  # bounded temporaries
        t = totals[start : start + 50_000]
        c = is_cell[start : start + 50_000]
        rows = np.repeat(np.arange(len(t)), t)
        genes = np.where(
            np.repeat(c, t),
            rng.choice(n_genes, size=t.sum(), p=cell_profile),
            rng.choice(n_genes, size=t.sum(), p=ambient),
        )
        block = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, genes)), shape=(len(t), n_genes))
        block.sum_duplicates()
        blocks.append(block)
    return sp.vstack(blocks, format="csr"), is_cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--droplets", type=int, default=750_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--cells", type=int, default=5_000)
    args = parser.parse_args()
    t0 = time.perf_counter()
    x, is_cell = synthetic_raw(args.droplets, args.genes, args.cells)
    var = pd.DataFrame(index=[f"g{i}" for i in range(args.genes)])
    raw = anndata.AnnData(x, obs=pd.DataFrame(index=[f"d{i}" for i in range(args.droplets)]), var=var)
    cells = raw[is_cell].copy()
    sparse_gb = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 1e9
    dense_gb = args.droplets * args.genes * 4 / 1e9
    print(
        f"raw matrix: {args.droplets:,} droplets x {args.genes:,} genes, {x.nnz:,} non-zeros, "
        f"{sparse_gb:.2f} GB as CSR ({dense_gb:,.0f} GB if densified as float32); built in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    print(f"{'sample':>10} {'time s':>8} {'peak allocated GB':>18} {'x CSR size':>11}")
    for sample in (50_000, None):
        tracemalloc.start()
        t = time.perf_counter()
        SCAR.get_ambient_profile(cells, raw, prob=0.995, sample=sample if sample else args.droplets)
        elapsed = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] / 1e9
        tracemalloc.stop()
        print(f"{sample or 'all':>10} {elapsed:>8.1f} {peak:>18.2f} {peak / sparse_gb:>10.1f}x")


if __name__ == "__main__":
    main()
