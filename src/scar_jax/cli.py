"""The ``scar-jax`` command line.

``scar-jax denoise FILTERED RAW -o OUT.h5ad`` reads a cell matrix and the raw droplets (10x h5 v2/v3,
10x mtx folder or .h5ad, see :mod:`scar_jax.readers`), keeps one feature type, estimates the ambient
profile from the raw droplets, trains SCAR and writes a scanpy-ready ``.h5ad``.

``scar-jax demo`` simulates droplet data with known truth (:func:`scar_jax.datasets.simulate`), trains
SCAR on it and prints the data size, epochs, training time and how well the result matches the truth.

Errors a user can cause (paths, files, options) print one line, ``scar-jax: error: ...``, on stderr and
exit with a non-zero code (2 for command-line syntax, 1 for everything else).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ASSIGNED_TYPES = ("sgRNA", "tag", "CMO")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``scar-jax: error: <what> (see 'scar-jax <command> --help')``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"scar-jax: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def _fail(err: BaseException) -> int:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"scar-jax: error: {message}", file=sys.stderr)
    return 1


def _demo(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from . import __version__
    from .calibration import calibrate_model, calibrated_split
    from .datasets import raw_droplets, simulate, simulate_empty_droplets
    from .metrics import denoising_metrics, pearson, pseudobulk_l1
    from .model import SCAR

    say = (lambda *a: None) if args.quiet else print
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
    SCAR.setup_anndata(adata)
    profile = SCAR.get_ambient_profile(adata, raw, prob=args.prob, seed=args.seed)[:, 0]
    truth = adata.varm["true_ambient_profile"][:, 0]
    say(f"ambient profile from the raw droplets: L1 distance to the true profile {np.abs(profile - truth).sum():.3f}")
    model = SCAR(adata, ambient_profile="ambient_profile", gene_likelihood=args.likelihood, seed=args.seed)
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, enable_progress_bar=not args.quiet)
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
    native, groups = adata.layers["native"], adata.obs["cell_type"].to_numpy()
    results = {}
    labels = {
        "calibrated": "count-preserving, calibrated (default)",
        "split": "count-preserving split of the model's posterior",
        "expected": "'expected' (scvi-tools reference)",
    }
    for method, label in labels.items():
        if method == "calibrated":
            results[method] = calibrated_split(adata.X, share, seed=args.seed)
        else:
            results[method] = model.get_denoised_counts(method=method, seed=args.seed)
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


def _check_output(path: str, overwrite: bool) -> Path:
    out = Path(path)
    if out.suffix != ".h5ad":
        raise ValueError(f"--output must be an .h5ad path, got {path!r}")
    if not out.parent.is_dir():
        raise ValueError(f"--output: folder {str(out.parent)!r} does not exist")
    if out.is_dir() or (out.exists() and not overwrite):
        raise ValueError(f"--output {path!r} exists; pass --overwrite to replace it")
    return out


def _denoise(args: argparse.Namespace) -> int:
    try:
        return _run_denoise(args)
    except (ValueError, OSError, FloatingPointError, MemoryError) as err:
        return _fail(err)
    except KeyboardInterrupt:
        print("scar-jax: error: interrupted", file=sys.stderr)
        return 130


def _run_denoise(args: argparse.Namespace) -> int:
    out = _check_output(args.output, args.overwrite)
    if args.sparsity is not None and not 0.0 < args.sparsity <= 1.0:
        raise ValueError(f"--sparsity must be in (0, 1], got {args.sparsity}")
    if not 0.0 < args.prob < 1.0:
        raise ValueError(f"--prob must be in (0, 1), got {args.prob}")
    for name in ("epochs", "batch_size", "moi"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")

    from . import readers

    feature_type, tenx_types = readers.resolve_feature_type(args.feature_type)

    import anndata
    import numpy as np
    import scipy.sparse as sp

    from . import __version__
    from .calibration import calibrate_model, calibrated_split
    from .model import SCAR
    from .setup_record import select_device as _select_device

    say = (lambda *a: None) if args.quiet else print
    try:
        device = _select_device(args.device, "auto")  # a missing GPU fails before any work
    except ValueError as err:
        raise ValueError(f"--device {args.device}: no GPU visible to JAX (pip install 'jax[cuda12]')") from err
    say(f"scar-jax {__version__} denoise: {feature_type} ({' or '.join(tenx_types)} features) on {device.platform}")
    adata = readers.read(args.filtered, feature_type=args.feature_type, genome=args.genome)
    raw = readers.read(args.raw, feature_type=args.feature_type, genome=args.genome)
    say(
        f"read {adata.n_obs} cells x {adata.n_vars} features ({args.filtered}) "
        f"and {raw.n_obs} raw droplets ({args.raw})"
    )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{args.filtered}: no cells or no {feature_type} features to denoise")
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    if not (library > 0).any():
        raise ValueError(f"{args.filtered}: no cell has any {feature_type} count")
    if (library <= 0).any():
        adata = adata[library > 0].copy()
        say(f"left out {int((library <= 0).sum())} cells without {feature_type} counts ({adata.n_obs} remain)")
    if args.batch_key is not None and args.batch_key not in adata.obs:
        columns = ", ".join(map(str, adata.obs.columns)) or "none"
        raise ValueError(f"--batch-key {args.batch_key!r} is not a column of the cells' obs (columns: {columns})")

    SCAR.setup_anndata(adata, batch_key=args.batch_key)
    t0 = time.perf_counter()
    profile = SCAR.get_ambient_profile(adata, raw, prob=args.prob, seed=args.seed)
    say(
        f"ambient profile from the raw droplets ({profile.shape[1]} profile(s), prob={args.prob}, "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    model_kwargs = {} if args.sparsity is None else {"sparsity": args.sparsity}
    model = SCAR(
        adata,
        ambient_profile="ambient_profile",
        gene_likelihood=args.likelihood,
        feature_type=feature_type,
        seed=args.seed,
        **model_kwargs,
    )
    model.train(
        max_epochs=args.epochs, batch_size=args.batch_size, accelerator=args.device, enable_progress_bar=not args.quiet
    )
    n_epochs = len(model.history["elbo_train"])
    say(f"trained {n_epochs} epochs on {len(model.train_indices)} cells in {model.training_time_s:.1f} s")

    method = args.method or model.default_denoising_method
    if method == "calibrated":  # one calibration for both (get_noise_ratio(calibrated=True) would redo it)
        noise_ratio, share = calibrate_model(model, share_at="observed")
        denoised = calibrated_split(adata.X, share, seed=args.seed)
    else:
        noise_ratio = model.get_noise_ratio()
        denoised = model.get_denoised_counts(seed=args.seed, method=method)
    if not sp.issparse(denoised):
        denoised = sp.csr_matrix(denoised)
    adata.layers["denoised"] = denoised.astype(np.float32)
    adata.obs["noise_ratio"] = noise_ratio
    adata.obsm["X_scAR"] = model.get_latent_representation()
    kept = float(denoised.sum()) / max(float(library.sum()), 1.0)
    say(
        f"noise ratio: median {np.median(noise_ratio):.3f} (5%-95%: {np.quantile(noise_ratio, 0.05):.3f}-"
        f"{np.quantile(noise_ratio, 0.95):.3f}); denoised counts keep {kept:.1%} of the observed counts"
    )
    if feature_type in ASSIGNED_TYPES:
        assignment = model.assign_features(cutoff=args.cutoff, moi=args.moi)
        adata.obs[feature_type] = assignment[feature_type].astype(str)
        adata.obs[f"n_{feature_type}"] = assignment[f"n_{feature_type}"].to_numpy()
        adata.obs[f"{feature_type}_count"] = assignment["count"].to_numpy()
        n_assigned = assignment[f"n_{feature_type}"].to_numpy()
        say(
            f"assigned {feature_type}: {int((n_assigned == 1).sum())} cells with one, "
            f"{int((n_assigned > 1).sum())} with several, {int((n_assigned == 0).sum())} with none"
        )
    adata.uns["scar_jax"] = {
        "version": __version__,
        "command": "denoise",
        "filtered": str(args.filtered),
        "raw": str(args.raw),
        "feature_type": feature_type,
        "likelihood": args.likelihood,
        "sparsity": float(model.config.sparsity),
        "epochs": n_epochs,
        "batch_size": args.batch_size,
        "batch_key": args.batch_key or "",
        "prob": args.prob,
        "method": method,
        "seed": args.seed,
        "n_raw_droplets": raw.n_obs,
    }
    tmp = out.with_name(f".{out.stem}.partial.h5ad")
    try:
        anndata.AnnData.write_h5ad(adata, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"wrote {out}: X = raw counts, layers['denoised'], obs['noise_ratio'], obsm['X_scAR'], varm['ambient_profile']")
    return 0


DENOISE_DESCRIPTION = """\
Remove ambient RNA (or ambient antibodies, guides, tags) from droplet single-cell counts.

Reads the cells (FILTERED) and all droplets (RAW), keeps the features of one type, estimates the
ambient profile from the cell-free droplets among RAW, trains SCAR and writes OUTPUT (.h5ad) with

  X                         the cells' raw counts, unchanged (scanpy reads denoised counts from the layer)
  layers['denoised']        denoised counts, sparse CSR: each observed count split into native and
                            ambient, so 0 <= denoised <= raw and zeros stay zero (--method: for
                            mRNA the calibrated shares by default, else the model's posterior split)
  obs['noise_ratio']        each cell's ambient fraction of its counts (calibrated with --method
                            calibrated)
  obsm['X_scAR']            the latent representation (e.g. sc.pp.neighbors(adata, use_rep='X_scAR'))
  varm['ambient_profile']   the ambient profile (one column per batch)
  obs[TYPE], obs['n_TYPE'], obs['TYPE_count']
                            for sgRNA, tag and CMO: the assigned features (comma-joined, '' for
                            none), how many, and their observed counts
  uns['scar_jax']           the settings of this run

Cells without any count of the feature type are left out of OUTPUT.
Input formats (detected from the content): 10x feature-barcode h5 (Cell Ranger v3+, all feature
types, or v2), 10x mtx folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz; or v2 genes.tsv),
.h5ad with raw counts in X.
"""

DENOISE_EPILOG = """\
example:
  scar-jax denoise filtered_feature_bc_matrix.h5 raw_feature_bc_matrix.h5 -o denoised.h5ad
  scar-jax denoise filtered_feature_bc_matrix.h5 raw_feature_bc_matrix.h5 -o adt.h5ad --feature-type ADT --prob 0.01
"""


def _add_denoise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "denoise",
        help="denoise 10x (h5, mtx) or .h5ad counts: filtered cells + raw droplets -> .h5ad",
        description=DENOISE_DESCRIPTION,
        epilog=DENOISE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("filtered", metavar="FILTERED", help="the cells: filtered_feature_bc_matrix.h5, mtx folder or .h5ad")
    p.add_argument(
        "raw",
        metavar="RAW",
        help="all droplets, for the ambient profile: raw_feature_bc_matrix.h5, mtx folder or .h5ad",
    )
    p.add_argument("-o", "--output", required=True, help="the .h5ad file to write (required)")
    p.add_argument(
        "--feature-type",
        default="mRNA",
        metavar="TYPE",
        help="features to denoise (default mRNA): mRNA (10x 'Gene Expression'), ADT ('Antibody Capture'), "
        "sgRNA ('CRISPR Guide Capture'), CMO ('Multiplexing Capture'), tag ('Multiplexing Capture' or "
        "'Custom'), ATAC ('Peaks'); a 10x type name is accepted too. sgRNA, tag and CMO use sparsity 1 "
        "and add the feature assignment to obs",
    )
    p.add_argument(
        "--likelihood",
        default="b",
        choices=["b", "poisson", "nb", "zinb"],
        help="count likelihood (default b, binomial with the observed library, as scvi-tools)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="expected sparsity of the native signal, in (0, 1] (default 0.9; always 1 for sgRNA, tag, CMO)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (default: scvi-tools' heuristic, min(400, 400 * 20000 / n_cells))",
    )
    p.add_argument("--batch-size", type=int, default=128, help="training minibatch size (default 128)")
    p.add_argument(
        "--batch-key",
        default=None,
        metavar="COLUMN",
        help="obs column of FILTERED (.h5ad) naming each cell's batch/lane: one ambient profile per batch, "
        "from RAW's droplets of that batch when RAW has the column too (default: one batch)",
    )
    p.add_argument(
        "--prob",
        type=float,
        default=0.995,
        help="cell-free threshold of the ambient estimate, in (0, 1): a droplet is cell-free if its "
        "multinomial log-probability >= n_features * log(prob) (default 0.995, as scvi-tools; with few "
        "features such as ADTs, or if too few cell-free droplets are found, lower it, e.g. 0.01)",
    )
    p.add_argument(
        "--method",
        default=None,
        choices=["calibrated", "split"],
        help="count-preserving denoising: 'calibrated' (noise ratio and native shares from latent neighbourhoods; "
        "the default for mRNA) or 'split' (the model's own posterior; faster, for atlases; the default for the "
        "other feature types)",
    )
    p.add_argument(
        "--cutoff", type=float, default=3.0, help="sgRNA/tag/CMO: Bayes-factor cutoff of the assignment (default 3)"
    )
    p.add_argument(
        "--moi",
        type=int,
        default=None,
        help="sgRNA/tag/CMO: assign up to this many features per cell (default: the original scAR's rule, "
        "the strongest feature(s) only)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="where to train (default auto: a GPU when JAX sees one, else the CPU)",
    )
    p.add_argument("--genome", default=None, help="10x h5 only: keep the features of this genome (default: all)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the model, the training and the denoised draws (default 0)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (no status lines, no progress bar)")
    p.set_defaults(func=_denoise)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scar-jax", description="scAR ambient-RNA removal in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_denoise(sub)
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
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
