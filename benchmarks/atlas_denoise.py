"""Atlas-scale calibrated denoising: time and peak host memory of the calibration from latent vectors and counts.

Usage::

    python benchmarks/atlas_denoise.py                                   # 100k, 300k, 1M cells x 2000 genes
    python benchmarks/atlas_denoise.py --sizes 10000x2000 100000x2000 --block-entries 1048576

Every size runs in a fresh subprocess (so the peak memory is that size's own). The child generates CSR counts
(``benchmarks/scale.py``'s ``generate_counts``: 5 cell types, log-normal libraries of mean 3000, Beta noise
ratios of mean 0.15, Poisson counts) and, instead of a trained model's latent representation (no training is
timed), a cheap deterministic one: ``log1p(1e4 x / N)`` projected on ``--latent-dim`` Gaussian directions
(seeded), which separates the cell types. Then ``calibration.calibrate(x, latent, profile,
share_at="observed")`` (the default denoising's calibration: latent neighbours checked against the counts,
then the calibrated noise ratio and the share at the stored counts) and ``calibrated_split`` (the
count-preserving split that ``get_denoised_counts()`` returns), each timed, with the peak resident memory
(``VmRSS`` sampled every 5 ms) above the resident memory once the counts and latent are loaded, in GB and as
a multiple of the CSR (data + indices + indptr). ``neighbours s`` is the part of ``calibrate`` spent in
``count_checked_neighbours``; ``spill GB`` the stored entries written to the temporary directory. After the
table, the peak by phase (``_rss.PhasePeaks``: each sample credited to the innermost phase running): the
neighbour search, the count check (ranking the candidates), the spill, the rounds, the share, the split.
``method="split"`` needs a trained model's decoder and is not measured here (``benchmarks/scale.py`` measures
its inference).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _rss import PeakRSS, PhasePeaks, resident_mb  # noqa: E402  (benchmarks/_rss.py, beside this script)


def projected_latent(x, dim: int, seed: int = 0):
    """``log1p(1e4 x / N) @ R`` ``(n, dim)`` float32, ``R`` Gaussian ``(G, dim)``, in chunks of rows."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(x.shape[1], dim)) / np.sqrt(dim)
    out = np.empty((x.shape[0], dim), np.float32)
    for start in range(0, x.shape[0], 50_000):
        rows = sp.csr_matrix(x[start : start + 50_000], dtype=np.float64)
        library = np.maximum(np.asarray(rows.sum(1)).ravel(), 1.0)
        rows = sp.csr_matrix(sp.diags(1e4 / library) @ rows)
        rows.data = np.log1p(rows.data)
        out[start : start + rows.shape[0]] = rows @ directions
    return out


def child(size: str, args: argparse.Namespace) -> dict:
    """One size in this process: the counts, the latent, then the timed calibration and split."""
    from scale import generate_counts

    from scar_jax import calibration
    from scar_jax.calibration import knn as knn_module
    from scar_jax.calibration import share as share_module

    n_cells, n_genes = (int(v) for v in size.split("x"))
    x, profile = generate_counts(n_cells, n_genes, seed=0)
    latent = projected_latent(x, args.latent_dim)
    csr_gb = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 1e9
    timing, spilled = {}, {}
    knn, store = calibration.count_checked_neighbours, getattr(share_module, "EntryStore", None)

    def timed_knn(*a, **k):
        start = time.perf_counter()
        out = knn(*a, **k)
        timing["neighbours"] = time.perf_counter() - start
        return out

    def recorded_store(*a, **k):
        out = store(*a, **k)
        spilled["entries"] = out.n_entries
        return out

    phases = PhasePeaks()
    calibration.count_checked_neighbours = phases.wrap("count check", timed_knn)
    knn_module.knn_indices = phases.wrap("neighbour search", knn_module.knn_indices)
    if store is not None:  # (absent before the spill)
        share_module.EntryStore = phases.wrap("spill", recorded_store)
    share_module._fit = phases.wrap("rounds", share_module._fit)
    share_module._observed_share = phases.wrap("share", share_module._observed_share)
    split = phases.wrap("split", calibration.calibrated_split)
    options = {} if args.block_entries is None else {"block_entries": args.block_entries}
    base = resident_mb()
    with PeakRSS() as rss, phases:
        start = time.perf_counter()
        eps, share = calibration.calibrate(x, latent, profile, n_neighbours=args.neighbours, share_at="observed",
                                           **options)  # fmt: skip
        calibrate_s = time.perf_counter() - start
    with PeakRSS() as rss_split, phases:
        start = time.perf_counter()
        split(x, share, seed=0)
        split_s = time.perf_counter() - start
    return {
        "size": size,
        "csr_gb": csr_gb,
        "neighbours_s": timing.get("neighbours", float("nan")),
        "calibrate_s": calibrate_s,
        "split_s": split_s,
        "peak_gb": (rss.peak - base) / 1e3,
        "split_peak_gb": (rss_split.peak - base) / 1e3,
        "spill_gb": spilled.get("entries", 0) * getattr(calibration, "ENTRY_BYTES", 20) / 1e9,
        "mean_eps": float(eps.mean()),
        "phases_gb": {name: (peak - base) / 1e3 for name, peak in phases.peaks.items()},
    }


def _machine() -> str:
    memory = "?"
    try:
        with open("/proc/meminfo") as f:
            memory = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {memory} RAM, {platform.platform()}"


def _row(r: dict) -> str:
    n = int(r["size"].split("x")[0])
    total = r["calibrate_s"] + r["split_s"]
    peak = max(r["peak_gb"], r["split_peak_gb"])
    return (
        f"| {r['size']} | {r['csr_gb']:.2f} | {r['neighbours_s']:.1f} | {r['calibrate_s']:.1f} | {r['split_s']:.1f} "
        f"| {n / total:,.0f} | {peak:.2f} | {peak / r['csr_gb']:.2f} | {r['spill_gb']:.1f} | {r['mean_eps']:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["100000x2000", "300000x2000", "1000000x2000"])
    parser.add_argument("--neighbours", type=int, default=50)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--block-entries", type=int, default=None, help="default: the calibration's default")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; machine: {_machine()}")
    print("latent: log1p(1e4 x / N) projected on Gaussian directions (no training); calibrate(share_at='observed')")
    print("| cells x genes | CSR GB | neighbours s | calibrate s | split s | cells/s | peak RSS GB | x CSR | spill GB "
          "| mean eps |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    phases = []
    for size in args.sizes:
        command = [sys.executable, os.path.abspath(__file__), "--child", size] + sys.argv[1:]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"| {size} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]} |")
            continue
        result = json.loads(lines[-1])
        print(_row(result), flush=True)
        phases.append(f"{size}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.get("phases_gb", {}).items()))
    print("peak RSS GB above the loaded counts by phase (the innermost running; 'other': the rest of calibrate):")
    print("\n".join(phases))


if __name__ == "__main__":
    main()
