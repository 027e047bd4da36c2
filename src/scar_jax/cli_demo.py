"""``scar-jax demo``: simulate droplet data with known truth, train SCAR and print how well it matches."""

from __future__ import annotations

import argparse
import time

LABELS = {
    "calibrated": "count-preserving, calibrated (default)",
    "split": "count-preserving split of the model's posterior",
    "expected": "'expected' (scvi-tools reference)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``demo`` subcommand and its options."""
    demo = sub.add_parser("demo", help="simulate droplet data with known truth, train SCAR, report accuracy")
    demo.add_argument("--n-cells", type=int, default=5000, help="number of simulated cells (default 5000)")
    demo.add_argument("--n-genes", type=int, default=1000, help="number of simulated genes (default 1000)")
    demo.add_argument("--noise-ratio", type=float, default=0.15, help="mean true noise ratio (default 0.15)")
    demo.add_argument(
        "--likelihood", default="b", choices=["b", "poisson", "nb", "zinb"], help="count likelihood (default b)"
    )
    demo.add_argument(
        "--n-empty", type=int, default=20000, help="simulated empty droplets for the ambient profile (default 20000)"
    )
    demo.add_argument(
        "--prob", type=float, default=0.5, help="get_ambient_profile's prob: cell-free if log p >= n_genes * log(prob)"
    )
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: scvi-tools' heuristic)")
    demo.add_argument("--batch-size", type=int, default=128, help="minibatch size (default 128)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the simulation and the model (default 0)")
    demo.add_argument("--output", default=None, help="write the simulated AnnData with the results to this .h5ad")
    demo.add_argument("--quiet", action="store_true", help="print nothing")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Simulate, train, calibrate and denoise; print each step's figures (the same for the same seed)."""
    import numpy as np

    from .data import calibrate_model
    from .metrics import pearson
    from .model import SCAR

    say = (lambda *a: None) if args.quiet else print
    adata, raw = _simulate(args, say)
    SCAR.setup_anndata(adata)
    profile = SCAR.get_ambient_profile(adata, raw, prob=args.prob, seed=args.seed)[:, 0]
    truth = adata.varm["true_ambient_profile"][:, 0]
    say(f"ambient profile from the raw droplets: L1 distance to the true profile {np.abs(profile - truth).sum():.3f}")
    model = SCAR(adata, ambient_profile="ambient_profile", gene_likelihood=args.likelihood, seed=args.seed)
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, enable_progress_bar=not args.quiet)
    _report_training(model, say)
    noise_ratio = model.get_noise_ratio()
    true_noise = adata.obs["noise_ratio"].to_numpy()
    say(
        f"noise ratio: Pearson r with the truth {pearson(noise_ratio, true_noise):.3f}; "
        f"mean estimated {noise_ratio.mean():.3f} vs true {true_noise.mean():.3f}"
    )
    # one calibration for the noise ratio and the default denoising (what get_denoised_counts() does)
    calibrated_noise, share = calibrate_model(model, share_at="observed")
    say(
        f"calibrated noise ratio (the default denoising's): Pearson r with the truth "
        f"{pearson(calibrated_noise, true_noise):.3f}; mean {calibrated_noise.mean():.3f}"
    )
    results = _denoise_and_score(model, adata, share, args.seed, say)
    if args.output:
        adata.obsm["X_scAR"] = model.get_latent_representation()
        adata.obs["noise_ratio_scar"] = noise_ratio
        adata.obs["noise_ratio_calibrated"] = calibrated_noise
        adata.layers["denoised"] = results["calibrated"]
        adata.layers["denoised_split"] = results["split"]
        adata.layers["denoised_expected"] = results["expected"]
        adata.write_h5ad(args.output)
        say(f"wrote {args.output}")
    return 0


def _simulate(args: argparse.Namespace, say):
    """The simulated cells (:func:`scar_jax.datasets.simulate`) and their raw droplets, announced."""
    import jax

    from . import __version__
    from .datasets import raw_droplets, simulate, simulate_empty_droplets

    say(f"scar-jax {__version__} demo on {jax.devices()[0].platform.upper()} ({jax.devices()[0].device_kind})")
    t0 = time.perf_counter()
    adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, noise_ratio_mean=args.noise_ratio, seed=args.seed)
    empty = simulate_empty_droplets(adata, n_droplets=args.n_empty, library_size_mean=100.0, seed=args.seed)
    raw = raw_droplets(adata, empty)
    sim = adata.uns["simulation"]
    say(
        f"simulated {adata.n_obs} cells x {adata.n_vars} genes ({sim['n_cell_types']} cell types, "
        f"{adata.X.nnz / (adata.n_obs * adata.n_vars):.1%} non-zero, mean true noise ratio "
        f"{adata.obs['noise_ratio'].mean():.3f}) and {empty.n_obs} empty droplets ({time.perf_counter() - t0:.1f} s)"
    )
    return adata, raw


def _report_training(model, say) -> None:
    history = model.history
    n_epochs = len(history["elbo_train"])
    n_train = len(model.train_indices)
    elbo = history["elbo_train"].iloc[:, 0]
    say(
        f"trained {n_epochs} epochs on {n_train} cells in {model.training_time_s:.1f} s "
        f"({n_epochs * n_train / model.training_time_s:,.0f} cells/s, compilation included); "
        f"negative ELBO per cell {elbo.iloc[0]:.1f} -> {elbo.iloc[-1]:.1f} "
        f"(validation {history['elbo_validation'].iloc[-1, 0]:.1f})"
    )


def _denoise_and_score(model, adata, share, seed: int, say) -> dict:
    """The denoised counts of each method and their scores against the true native counts."""
    from .denoise import calibrated_split
    from .metrics import denoising_metrics, pseudobulk_l1

    native, groups = adata.layers["native"], adata.obs["cell_type"].to_numpy()
    results = {}
    for method, label in LABELS.items():
        if method == "calibrated":
            results[method] = calibrated_split(adata.X, share, seed=seed)
        else:
            results[method] = model.get_denoised_counts(method=method, seed=seed)
        m = denoising_metrics(adata.X, results[method], native)
        pb = pseudobulk_l1(adata.X, results[method], native, groups)
        say(
            f"denoised, {label}:\n"
            f"  ambient counts removed {m['ambient_removed_entrywise']:.1%}, native counts kept "
            f"{m['native_retained']:.1%}, entries above the observed count {m['above_raw']:.2%}, "
            f"new non-zeros {m['new_nonzeros']:.2%}\n"
            f"  L1 distance to the true native counts {m['l1_denoised']:,.0f} vs {m['l1_raw']:,.0f} raw; "
            f"per-cell-type profiles {pb['l1_denoised']:,.0f} vs {pb['l1_raw']:,.0f} raw "
            f"({pb['l1_improvement']:.1%} closer)"
        )
    return results
