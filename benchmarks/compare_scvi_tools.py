"""scar-jax against scvi-tools' ``scvi.external.SCAR``: training speed, held-out ELBO, denoising quality.

Usage (in an environment with scvi-tools: ``pip install 'scar-jax[parity]'``)::

    python benchmarks/compare_scvi_tools.py                                   # 2000x1000 and 10000x2000, b and nb
    python benchmarks/compare_scvi_tools.py --sizes 2000x1000 --likelihoods b --epochs 10

For each size and likelihood: simulate data with known truth (``scar_jax.datasets.simulate``), give both
models the same ambient profile (the simulation's true one, or with ``--ambient mean`` the mean profile
of the cells), the same hyper-parameters, epochs, batch size and train/validation cells (scar-jax's
split is passed to scvi-tools with ``external_indexing``), and train both on the CPU.

Printed per run:

* training cells/s (training cells x epochs / seconds): scvi-tools (wall time of ``train``), scar-jax
  warm (the same configuration compiled by a previous run, which is the cost of every later model of that
  shape) and cold (including compilation), one row per ``--precisions`` entry (``matmul_precision``:
  ``float32`` and ``bfloat16`` by default); the ratio is warm cells/s / scvi-tools cells/s.
  With ``--repeats k`` each is trained k times from scratch and the fastest run counts (on a shared
  machine, other jobs only ever slow a run down). scar-jax's time includes a validation pass per epoch,
  scvi-tools' does not (it validates only when asked, e.g. for early stopping);
* held-out ELBO per cell (higher is better) on the validation cells, both models evaluated by the same
  code (the scvi-tools model imported with ``scar_jax.scvi_io.from_scvi_tools``; same z draws, exact
  binomial library), and scvi-tools' own ``get_elbo`` for its model as a cross-check;
* denoising against the simulated native counts (``scar_jax.metrics.denoising_metrics``): scar-jax's
  default count-preserving split, ``method="expected"`` (the scvi-tools estimator) and
  ``method="calibrated"``, and scvi-tools' ``get_denoised_counts()``; columns: L1 improvement over the raw
  counts, fraction of the true ambient counts removed entry by entry, native counts retained, entries
  above the raw count, new non-zeros, mean per-cell Pearson correlation with the native counts (raw
  counts: the "raw" row); plus the Pearson correlation of the estimated noise ratio with the truth.
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
import warnings

import jax
import numpy as np


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)


# long: one comparison, each step a few lines (simulate, scar-jax per precision, scvi-tools, evaluate, denoise)
def run(
    n_cells: int,
    n_genes: int,
    likelihood: str,
    epochs: int,
    batch_size: int,
    ambient: str,
    seed: int,
    repeats: int,
    precisions: tuple[str, ...] = ("float32",),
) -> dict:
    import scvi
    import torch

    from scar_jax import SCAR, scvi_io
    from scar_jax.datasets import simulate
    from scar_jax.metrics import denoising_metrics, pearson

    adata = simulate(n_cells=n_cells, n_genes=n_genes, seed=seed)
    profile = np.asarray(adata.varm["true_ambient_profile"], np.float64).ravel()
    if ambient == "mean":
        profile = np.asarray(adata.X.sum(axis=0), np.float64).ravel()
    profile = profile / profile.sum()
    native = adata.layers["native"]
    train_args = {"max_epochs": epochs, "batch_size": batch_size, "train_size": 0.9, "accelerator": "cpu"}

    # scar-jax, per matmul precision: a warm-up model compiles the configuration; the timed models reuse it
    jax_runs = {}
    for precision in precisions:
        options = {"gene_likelihood": likelihood, "matmul_precision": precision}
        SCAR.setup_anndata(adata)
        t0 = time.perf_counter()
        cold = SCAR(adata, ambient_profile=profile, seed=seed + 1, **options)
        cold.train(**{**train_args, "max_epochs": 1}, enable_progress_bar=False)
        cold_one_epoch = time.perf_counter() - t0
        walls = []
        for _ in range(repeats):  # the first model is the one evaluated below
            trained = SCAR(adata, ambient_profile=profile, seed=seed, **options)
            t0 = time.perf_counter()
            trained.train(**train_args, enable_progress_bar=False)
            if not walls:
                first = trained
            walls.append(time.perf_counter() - t0)
        # compile time: the first epoch's excess over a warm one
        jax_runs[precision] = (first, walls, max(0.0, cold_one_epoch - min(walls) / epochs))
    model = jax_runs[precisions[0]][0]
    train_idx, val_idx = model.train_indices, model.validation_indices

    # scvi-tools, on the same training and validation cells
    sdata = adata.copy()
    scvi.external.SCAR.setup_anndata(sdata)
    scvi_walls = []
    for _ in range(repeats):
        scvi.settings.seed = seed
        strained = scvi.external.SCAR(sdata, ambient_profile=profile.astype(np.float32), gene_likelihood=likelihood)
        t0 = time.perf_counter()
        strained.train(
            **train_args,
            datasplitter_kwargs={"external_indexing": [np.asarray(train_idx), np.asarray(val_idx)]},
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        if not scvi_walls:
            smodel = strained
        scvi_walls.append(time.perf_counter() - t0)
    scvi_wall = min(scvi_walls)
    scvi_elbo_own = float(smodel.get_elbo(indices=val_idx, batch_size=1024))
    with tempfile.TemporaryDirectory() as tmp:
        smodel.save(tmp, overwrite=True)
        imported = scvi_io.from_scvi_tools(SCAR, tmp, adata.copy())

    n_train = len(train_idx)
    raw = adata.X
    denoise = {
        "raw": raw,
        "scar-jax split": model.get_denoised_counts(seed=seed, method="split"),
        "scar-jax expected": model.get_denoised_counts(method="expected", seed=seed),
        "scar-jax calibrated": model.get_denoised_counts(method="calibrated", seed=seed),
        "scvi-tools": smodel.get_denoised_counts(batch_size=1024),
    }
    true_noise = adata.obs["noise_ratio"].to_numpy()
    n_cells_trained = n_train * epochs
    precision_rows = {
        precision: {
            "cells_s": n_cells_trained / min(walls),
            "cold_cells_s": n_cells_trained / (min(walls) + compile_s),
            "compile_s": compile_s,
            "elbo": trained.get_elbo(indices=val_idx, seed=seed),
            "runs": [n_cells_trained / w for w in walls],
        }
        for precision, (trained, walls, compile_s) in jax_runs.items()
    }
    return {
        "precisions": precision_rows,
        "size": f"{n_cells}x{n_genes}",
        "likelihood": likelihood,
        "epochs": epochs,
        "n_train": n_train,
        "scvi_cells_s": n_train * epochs / scvi_wall,
        "elbo_scvi": imported.get_elbo(indices=val_idx, seed=seed),
        "elbo_scvi_own": scvi_elbo_own,
        "noise_r_jax": pearson(model.get_noise_ratio(), true_noise),
        "noise_r_scvi": pearson(imported.get_noise_ratio(), true_noise),
        "denoising": {name: denoising_metrics(raw, d, native) for name, d in denoise.items()},
        "torch_threads": torch.get_num_threads(),
        "scvi_runs": [n_train * epochs / w for w in scvi_walls],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2000x1000", "10000x2000"])
    parser.add_argument("--likelihoods", nargs="+", default=["b", "nb"], choices=["b", "poisson", "nb", "zinb"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ambient", choices=["true", "mean"], default="true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "tensorfloat32", "bfloat16"],
        help="scar-jax's matmul_precision, one row each (the first is the model evaluated for denoising)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="train each model this many times and time the fastest (noisy machines)"
    )
    args = parser.parse_args()
    _quiet()
    import scvi
    import torch

    from scar_jax import __version__

    print(
        f"scar-jax {__version__} (jax {jax.__version__}, {jax.devices()[0].platform}) vs "
        f"scvi-tools {scvi.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads); "
        f"{platform.processor() or platform.machine()}; batch {args.batch_size}, train_size 0.9, "
        f"ambient profile: {args.ambient}"
    )
    results = []
    for size in args.sizes:
        n_cells, n_genes = (int(v) for v in size.lower().split("x"))
        for likelihood in args.likelihoods:
            r = run(
                n_cells,
                n_genes,
                likelihood,
                args.epochs,
                args.batch_size,
                args.ambient,
                args.seed,
                args.repeats,
                tuple(args.precisions),
            )
            results.append(r)
            jax_runs = "; ".join(
                f"scar-jax {k} (warm) {', '.join(f'{v:,.0f}' for v in p['runs'])}" for k, p in r["precisions"].items()
            )
            print(
                f"  done {r['size']} {likelihood}: cells/s of each run: scvi-tools "
                f"{', '.join(f'{v:,.0f}' for v in r['scvi_runs'])}; {jax_runs}",
                flush=True,
            )

    print("\nTraining throughput (training cells x epochs / s) and held-out ELBO per cell (validation cells)")
    header = (
        f"{'size':>11} {'lik':>4} {'ep':>3} {'implementation':>20} {'cells/s':>9} {'ratio':>6} {'cold c/s':>9} "
        f"{'compile s':>9} {'ELBO':>10} {'r_eps':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        lead = f"{r['size']:>11} {r['likelihood']:>4} {r['epochs']:>3}"
        print(
            f"{lead} {'scvi-tools':>20} {r['scvi_cells_s']:>9,.0f} {1.0:>5.1f}x {'':>9} {'':>9} "
            f"{r['elbo_scvi']:>10.1f} {r['noise_r_scvi']:>6.3f}   (scvi-tools' own get_elbo: {r['elbo_scvi_own']:.1f})"
        )
        for precision, p in r["precisions"].items():
            print(
                f"{lead} {'scar-jax ' + precision:>20} {p['cells_s']:>9,.0f} {p['cells_s'] / r['scvi_cells_s']:>5.1f}x "
                f"{p['cold_cells_s']:>9,.0f} {p['compile_s']:>9.1f} {p['elbo']:>10.1f}"
                + (f" {r['noise_r_jax']:>6.3f}" if precision == args.precisions[0] else "")
            )
    print("\nDenoising against the simulated native counts")
    header = (
        f"{'size':>11} {'lik':>4} {'method':>18} {'L1 impr.':>9} {'amb. rem.':>9} {'native ret.':>11} "
        f"{'> raw':>7} {'new nz':>7} {'cell r':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        for name, m in r["denoising"].items():
            print(
                f"{r['size']:>11} {r['likelihood']:>4} {name:>18} {m['l1_improvement']:>9.3f} "
                f"{m['ambient_removed_entrywise']:>9.3f} {m['native_retained']:>11.3f} "
                f"{m['above_raw']:>7.3f} {m['new_nonzeros']:>7.3f} {m['cell_correlation']:>7.4f}"
            )


if __name__ == "__main__":
    main()
