"""Peak host memory and time of ``SCAR.get_marginal_ll`` as the number of importance samples grows.

Each configuration runs in a fresh subprocess: simulate ``--cells`` x ``--genes`` counts (CSR), train one
epoch (memory does not depend on training), compile on 256 cells, then call
``get_marginal_ll(n_mc_samples=S, batch_size=256)`` on all cells while a thread samples the process's
resident memory (``VmRSS``) every 5 ms. The table gives the resident memory when the call starts, the
peak during it, and their difference (what the call itself needs). Samples are evaluated one at a time
inside the compiled chunk, so the difference should not grow with ``S``.

    python benchmarks/marginal_ll_memory.py                     # 10,000 x 2,000; S = 10, 100, 1000
    python benchmarks/marginal_ll_memory.py --cells 2000 --samples 10 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _rss import PeakRSS  # benchmarks/_rss.py, beside this script


def child(n_cells: int, n_genes: int, n_samples: int) -> dict:
    import jax
    import numpy as np

    from scar_jax import SCAR
    from scar_jax.datasets import simulate

    adata = simulate(n_cells=n_cells, n_genes=n_genes, seed=0)
    SCAR.setup_anndata(adata)
    model = SCAR(adata)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.get_marginal_ll(indices=np.arange(256), n_mc_samples=n_samples, batch_size=256)  # compile
    with PeakRSS() as memory:
        start = time.perf_counter()
        values = model.get_marginal_ll(n_mc_samples=n_samples, batch_size=256, return_mean=False)
        seconds = time.perf_counter() - start
    before, peak = memory.start, memory.peak
    csr_mb = (adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes) / 2**20
    return {
        "cells": n_cells,
        "genes": n_genes,
        "samples": n_samples,
        "seconds": seconds,
        "peak_mb": peak,
        "peak_before_mb": before,
        "csr_mb": csr_mb,
        "dense_mb": n_cells * n_genes * 4 / 2**20,
        "finite": bool(np.isfinite(values).all()),
        "mean": float(values.mean()),
        "device": str(jax.devices()[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--samples", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.cells, args.genes, args.child)))
        return
    header = "| cells x genes | samples | s | cells/s | RSS at start MB | peak MB | call needs MB | CSR MB | log p(x) |"
    print(header)
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.samples:
        cmd = [sys.executable, __file__, "--cells", str(args.cells), "--genes", str(args.genes), "--child", str(n)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(
            f"| {r['cells']:,} x {r['genes']:,} | {r['samples']} | {r['seconds']:.1f} "
            f"| {r['cells'] / r['seconds']:,.0f} "
            f"| {r['peak_before_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['peak_before_mb']:.0f} "
            f"| {r['csr_mb']:.0f} "
            f"| {r['mean']:.1f} |",
            flush=True,
        )
    print(f"device: {r['device']}")


if __name__ == "__main__":
    main()
