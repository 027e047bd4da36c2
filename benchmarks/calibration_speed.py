"""Speed of the calibration loop (issue 10's default denoising): JAX (float32, one compiled loop) vs float64 NumPy.

Usage::

    python benchmarks/calibration_speed.py                                   # 300x20000 and 1500x33694
    python benchmarks/calibration_speed.py --sizes 2000x2000 20000x2000 --reference-max-entries 0
    python benchmarks/calibration_speed.py --rounds 20 --neighbours 30

Data: :func:`scar_jax.datasets.simulate_species_mixture` with neighbourhoods drawn within the cell's species
(as the latent space gives them) and the true ambient profile. Both implementations run exactly ``--rounds``
rounds (``tol=0``), so they do the same work:

* ``jax``: :func:`scar_jax.calibration.calibrated_native_share` on the default JAX device (``share_at="observed"``,
  as :meth:`scar_jax.SCAR.get_denoised_counts` uses it). ``first`` includes compiling; ``warm`` is a second
  call with the same shapes.
* ``numpy f64``: the whole-array float64 derivation that the unit tests use as the oracle
  (``tests/test_calibration.py::_dense_reference``; dense ``(n, G)`` arrays, so only up to
  ``--reference-max-entries`` cells x genes), and the largest relative difference of the noise ratios.

Columns: cells, genes, the stored pooled entries (fraction of cells x genes), seconds, milliseconds per round, the
peak resident memory of the warm call above what the process held before it (``_rss.PeakRSS``; on a CPU the
device arrays are host memory), and for the reference its time and the agreement.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
import scipy.sparse as sp
from _rss import PeakRSS  # benchmarks/_rss.py, beside this script

from scar_jax.calibration import _pool, calibrated_native_share
from scar_jax.datasets import simulate_species_mixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_calibration import _dense_reference, _oracle_neighbourhoods  # noqa: E402  (the tests' oracle)


def run(n_cells: int, n_genes: int, rounds: int, k: int, reference_max_entries: int) -> dict:
    adata = simulate_species_mixture(n_cells=n_cells, n_genes=n_genes, seed=0)
    neighbours = _oracle_neighbourhoods(adata, min(k, n_cells // 3))
    profile = adata.varm["true_ambient_profile"][:, 0]
    start = np.full(n_cells, 0.01)
    row: dict = {"cells": n_cells, "genes": n_genes}
    times = []
    for _ in range(2):
        t = time.perf_counter()
        with PeakRSS() as rss:
            eps, share = calibrated_native_share(
                adata.X, neighbours, profile, start, rounds, tol=0.0, expressed_prior_odds=0.1, share_at="observed"
            )
        times.append(time.perf_counter() - t)
    row["peak_mb"] = rss.peak - rss.start
    row["pooled_fraction"] = _pool(sp.csr_matrix(adata.X), neighbours).nnz / (n_cells * n_genes)
    row["jax_first_s"], row["jax_warm_s"] = times
    if n_cells * n_genes <= reference_max_entries:
        t = time.perf_counter()
        want, _ = _dense_reference(adata.X, neighbours, profile, start, n_iter=rounds, tol=0.0, odds=0.1)
        row["numpy_s"] = time.perf_counter() - t
        row["max_rel_diff"] = float(np.max(np.abs(eps - want) / want))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["300x20000", "1500x33694"], help="CELLSxGENES")
    parser.add_argument("--rounds", type=int, default=50, help="rounds of the loop (the default n_iter)")
    parser.add_argument("--neighbours", type=int, default=50)
    parser.add_argument("--reference-max-entries", type=int, default=60_000_000, help="0: no NumPy reference")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), "
          f"{args.rounds} rounds, k = {args.neighbours}")  # fmt: skip
    header = "| cells | genes | pooled | jax 1st (s) | jax warm (s) | ms/round | peak MB | numpy (s) | max rel diff |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for size in args.sizes:
        n_cells, n_genes = (int(v) for v in size.lower().split("x"))
        r = run(n_cells, n_genes, args.rounds, args.neighbours, args.reference_max_entries)
        ref = f"{r['numpy_s']:.1f} | {r['max_rel_diff']:.1e}" if "numpy_s" in r else "- | -"
        jax_s = f"{r['jax_first_s']:.1f} | {r['jax_warm_s']:.1f} | {1000 * r['jax_warm_s'] / args.rounds:.0f}"
        jax_s += f" | {r['peak_mb']:.0f}"
        print(f"| {n_cells} | {n_genes} | {r['pooled_fraction']:.0%} | {jax_s} | {ref} |", flush=True)


if __name__ == "__main__":
    main()
