"""Out-of-core demonstration: train and denoise from an .h5ad whose counts are several times the memory cap.

Usage::

    python benchmarks/out_of_core.py                          # 2 GiB cap, a file 3x the cap
    python benchmarks/out_of_core.py --cap-gib 3 --factor 3 --epochs 1 --block-cells 65536
    python benchmarks/out_of_core.py --method calibrated --no-cap --cap-gib 2.8 --factor 1.5   # ~1M cells

Steps (each printed with its wall time):

1. write ``--dir``/counts.h5ad, block by block (``scale.generate_counts`` with a seed per block, appended to
   a CSR ``X`` with anndata's ``sparse_dataset(...).append``), until the CSR arrays (data + indices +
   indptr) are ``--factor`` x the cap; never more than one block in memory;
2. in a child process whose address space is capped with ``resource.setrlimit(RLIMIT_AS, cap)`` (an
   enforced limit: any allocation beyond it fails; it counts virtual memory, so it is stricter than a cap
   on resident memory): ``scar_jax.backed.read_backed``, ``SCAR.setup_anndata`` (one validating pass),
   ``SCAR(...)`` (another validating pass, which also gives the default ambient profile),
   ``train(max_epochs=--epochs)`` streamed in blocks
   of ``--block-cells``, and ``write_denoised_counts`` to ``--dir``/denoised.h5ad block by block (the
   child runs with ``MALLOC_ARENA_MAX=2``: every glibc arena reserves address space the cap counts);
3. the parent checks the output (shape, and denoised <= raw on the first 1,000 cells) and prints a table:
   file size, cap, the child's peak resident memory (``VmHWM``), the time of each phase. (One epoch shows
   the memory bound, not denoising quality.) The child's training cells/s include compiling the epoch.

``--method`` is ``write_denoised_counts``' method: ``split`` (the default here: the out-of-core path, one block
in memory) or ``calibrated`` (the default for mRNA: it calibrates all cells at once, so it needs their counts and
per-cell state in memory; run it with ``--no-cap``, which sizes the file by ``--factor`` x ``--cap-gib`` without
capping the child). The ``write peak above model (MB)`` column is the peak resident memory during
``write_denoised_counts`` (VmRSS sampled every 5 ms) above the level before it, i.e. above the trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_file(path: Path, target_bytes: int, n_genes: int, block: int) -> dict:
    import anndata
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem
    from scale import generate_counts

    written, n_cells, index = 0, 0, 0
    profile_sum = np.zeros(n_genes)
    anndata.AnnData(var=pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)])).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        while written < target_bytes:
            x, _ = generate_counts(block, n_genes, seed=1000 + index)
            x.data = x.data.astype(np.float32)  # as 10x h5ad files store counts
            profile_sum += np.asarray(x.sum(axis=0)).ravel()
            if index == 0:
                if "X" in f:
                    del f["X"]
                write_elem(f, "X", x)
            else:
                sparse_dataset(f["X"]).append(x)
            written += x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
            n_cells += block
            index += 1
        del f["obs"]
        write_elem(f, "obs", pd.DataFrame(index=[f"cell_{i}" for i in range(n_cells)]))
    return {"n_cells": n_cells, "csr_bytes": written, "file_bytes": path.stat().st_size}


def child(args) -> None:
    import resource

    if not args.no_cap:
        cap = int(args.cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import warnings

    from _rss import PeakRSS

    warnings.filterwarnings("ignore")
    from scar_jax import SCAR
    from scar_jax.backed import read_backed

    out, t0 = {}, time.perf_counter()
    adata = read_backed(Path(args.dir) / "counts.h5ad")
    SCAR.setup_anndata(adata)
    out["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = SCAR(adata)
    out["model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, block_cells=args.block_cells, enable_progress_bar=False)
    out["train_s"] = time.perf_counter() - t0
    out["train_cells_per_s"] = len(model.train_indices) * args.epochs / model.training_time_s
    t0 = time.perf_counter()
    target = Path(args.dir) / "denoised.h5ad"
    with PeakRSS() as rss:
        options = {"method": args.method, "block_cells": args.block_cells}
        model.write_denoised_counts(target, **options, overwrite=True, progress_bar=False)
    out["denoise_s"] = time.perf_counter() - t0
    out["write_peak_mb"] = rss.peak - rss.start
    out["n_cells"] = adata.n_obs
    out["peak_rss_mb"] = next(
        int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")
    )
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap-gib", type=float, default=2.0, help="address-space cap of the child (GiB)")
    parser.add_argument("--factor", type=float, default=3.0, help="CSR size of the file / cap")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--block-cells", type=int, default=32_768)
    parser.add_argument("--method", choices=["split", "calibrated"], default="split", help="write_denoised_counts")
    parser.add_argument("--no-cap", action="store_true", help="no address-space cap (--cap-gib only sizes the file)")
    parser.add_argument("--reuse-file", action="store_true", help="reuse --dir/counts.h5ad written by an earlier run")
    parser.add_argument("--write-block", type=int, default=50_000, help="cells generated per block of the file")
    parser.add_argument("--dir", default="/tmp/scar_jax_out_of_core")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "counts.h5ad"
    sidecar = folder / "counts.json"
    if args.reuse_file and sidecar.exists():
        info = json.loads(sidecar.read_text())
        print(f"reusing {path}: {info}", flush=True)
    else:
        t0 = time.perf_counter()
        info = write_file(path, int(args.factor * args.cap_gib * 2**30), args.genes, args.write_block)
        sidecar.write_text(json.dumps(info))
        print(f"wrote {path}: {info} in {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *sys.argv[1:]]
    # fewer glibc malloc arenas: each thread's arena reserves address space that the cap counts
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    if proc.returncode != 0:
        print(f"child failed with exit {proc.returncode} (its stderr is above)")
        sys.exit(1)
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    import anndata

    denoised = anndata.read_h5ad(folder / "denoised.h5ad", backed="r")
    raw = anndata.read_h5ad(path, backed="r")
    first = slice(0, 1000)
    den_block = anndata.io.sparse_dataset(denoised.file["layers"]["denoised"])[first]
    below = (den_block > raw.X[first]).nnz == 0
    assert denoised.shape == raw.shape, (denoised.shape, raw.shape)
    cap_mb = args.cap_gib * 1024
    print(
        "\n| cells x genes | CSR of X (MB) | file (MB) | address-space cap (MB) | X / cap | child peak RSS (MB) "
        "| setup s | SCAR() s | train s (epochs) | train cells/s | write_denoised_counts s (method) "
        "| write peak above model (MB) | write cells/s | denoised <= raw (first 1,000 cells) |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(
        f"| {result['n_cells']:,} x {args.genes:,} | {info['csr_bytes'] / 2**20:,.0f} "
        f"| {info['file_bytes'] / 2**20:,.0f} "
        f"| {'none' if args.no_cap else f'{cap_mb:,.0f}'} | {info['csr_bytes'] / 2**20 / cap_mb:.2f} "
        f"| {result['peak_rss_mb']:,.0f} "
        f"| {result['setup_s']:.0f} | {result['model_s']:.0f} | {result['train_s']:.0f} ({args.epochs}) "
        f"| {result['train_cells_per_s']:,.0f} | {result['denoise_s']:.0f} ({args.method}) "
        f"| {result['write_peak_mb']:,.0f} | {result['n_cells'] / result['denoise_s']:,.0f} | {below} |"
    )


if __name__ == "__main__":
    main()
