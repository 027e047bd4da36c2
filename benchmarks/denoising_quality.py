"""Denoising quality against simulated truth: learned count-preserving split vs oracle vs the reference.

Usage::

    python benchmarks/denoising_quality.py                     # 2000 cells x 1000 genes, noise 0.05 / 0.15 / 0.3
    python benchmarks/denoising_quality.py --cells 5000 --noise 0.15 --epochs 200

For each setting: simulate cells and 20,000 empty droplets, estimate the ambient profile from the raw
droplets (``prob=0.5``), train SCAR at default settings, and compare, entry by entry with the true native
and ambient counts:

* ``split``: ``get_denoised_counts(method="split")`` (the model's count-preserving binomial split; the default
  before the calibrated method);
* ``oracle``: the same split with the TRUE noise ratio, native and ambient profiles (the best possible);
* ``expected``: the scvi-tools reference ``method="expected"``;
* ``calibrated``: the default ``get_denoised_counts()`` (issue 10's empirical-Bayes shares on latent
  neighbourhoods, default knob); its noise-ratio correlation (``get_noise_ratio(calibrated=True)``) is printed
  in ``noise r``.
"""

from __future__ import annotations

import argparse

from scar_jax import SCAR
from scar_jax.calibration import calibrated_split
from scar_jax.data import calibrate_model
from scar_jax.datasets import raw_droplets, simulate, simulate_empty_droplets
from scar_jax.metrics import denoising_metrics, oracle_split, pearson


def run(n_cells: int, n_genes: int, noise: float, epochs: int | None, seed: int) -> list[tuple[str, dict]]:
    adata = simulate(n_cells=n_cells, n_genes=n_genes, noise_ratio_mean=noise, seed=seed)
    raw = raw_droplets(adata, simulate_empty_droplets(adata, n_droplets=20000, seed=seed + 1))
    SCAR.setup_anndata(adata)
    SCAR.get_ambient_profile(adata, raw, prob=0.5)
    model = SCAR(adata, ambient_profile="ambient_profile", seed=seed)
    model.train(max_epochs=epochs, enable_progress_bar=False)
    r = pearson(model.get_noise_ratio(), adata.obs["noise_ratio"])
    native = adata.layers["native"]
    # one calibration for the noise ratio and the counts (= get_denoised_counts(method="calibrated", seed=seed))
    calibrated_noise, share = calibrate_model(model, share_at="observed")
    calibrated_r = pearson(calibrated_noise, adata.obs["noise_ratio"])
    rows = []
    for name, denoised, noise_r in (
        ("split", model.get_denoised_counts(seed=seed, method="split"), r),
        ("oracle", oracle_split(adata, seed=seed), r),
        ("expected", model.get_denoised_counts(method="expected", seed=seed), r),
        ("calibrated", calibrated_split(adata.X, share, seed=seed), calibrated_r),
    ):
        rows.append((name, {**denoising_metrics(adata.X, denoised, native), "pearson": noise_r}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.15, 0.3])
    parser.add_argument("--epochs", type=int, default=None, help="default: the scvi-tools heuristic")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = (
        f"{'noise':>6} {'method':>10} {'ambient removed':>16} {'native kept':>12} {'above raw':>10} "
        f"{'new non-zeros':>14} {'L1 vs raw':>10} {'noise r':>8}"
    )
    print(f"{args.cells} cells x {args.genes} genes, default SCAR settings, ambient profile from raw droplets")
    print(header)
    print("-" * len(header))
    for noise in args.noise:
        for name, m in run(args.cells, args.genes, noise, args.epochs, args.seed):
            print(
                f"{noise:>6.2f} {name:>10} {m['ambient_removed_entrywise']:>16.1%} {m['native_retained']:>12.1%} "
                f"{m['above_raw']:>10.2%} {m['new_nonzeros']:>14.2%} {1 - m['l1_improvement']:>10.3f} "
                f"{m['pearson']:>8.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
