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
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import cli_demo

ASSIGNED_TYPES = ("sgRNA", "tag", "CMO")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``scar-jax: error: <what> (see 'scar-jax <command> --help')``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"scar-jax: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def _fail(err: BaseException) -> int:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"scar-jax: error: {message}", file=sys.stderr)
    return 1


def _check_output(path: str, overwrite: bool) -> Path:
    out = Path(path)
    if out.suffix != ".h5ad":
        raise ValueError(f"--output must be an .h5ad path, got {path!r}")
    if not out.parent.is_dir():
        raise ValueError(f"--output: folder {str(out.parent)!r} does not exist")
    if out.is_dir() or (out.exists() and not overwrite):
        raise ValueError(f"--output {path!r} exists; pass --overwrite to replace it")
    return out


def _check_model_dir(args: argparse.Namespace, out: Path) -> Path:
    """``--model-dir`` (default ``OUTPUT`` with ``.model`` for ``.h5ad``), checked before any work.

    A saved model there is reused with ``--resume``, replaced with ``--overwrite``, else an error; a folder
    that is not a scar-jax model is never touched.
    """
    from . import io as _io

    model_dir = Path(args.model_dir) if args.model_dir is not None else out.with_suffix(".model")
    if not model_dir.parent.is_dir():
        raise ValueError(f"--model-dir: folder {str(model_dir.parent)!r} does not exist")
    if model_dir.exists() and not _io.has_model(model_dir):
        if not model_dir.is_dir() or any(model_dir.iterdir()):
            raise ValueError(f"--model-dir {str(model_dir)!r} exists and is not a scar-jax model; choose another path")
    elif _io.has_model(model_dir) and not args.resume:
        if not args.overwrite:
            raise ValueError(
                f"--model-dir {str(model_dir)!r} holds a saved model; pass --resume to denoise with it (no "
                "training), or --overwrite to train again"
            )
        shutil.rmtree(model_dir)
    return model_dir


def _saved_model(model_dir: Path) -> tuple[int, Any]:
    """Epochs in the history of the model saved in ``model_dir`` and its ambient profile ``(n_batches, G)``
    (0 and ``None`` when there is none)."""
    import flax.serialization

    from . import io as _io

    if not _io.has_model(model_dir):
        return 0, None
    manifest, state_bytes, _ = _io.read_model_dir(model_dir)
    return len(manifest["history"]), flax.serialization.msgpack_restore(state_bytes)["ambient_profile"]


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
    model_dir = _check_model_dir(args, out)
    _check_denoise_options(args)

    from . import __version__, readers
    from .distributed import select_device as _select_device

    feature_type, tenx_types = readers.resolve_feature_type(args.feature_type)
    say = (lambda *a: None) if args.quiet else print
    try:
        device = _select_device(args.device, "auto")  # a missing GPU fails before any work
    except ValueError as err:
        raise ValueError(f"--device {args.device}: no GPU visible to JAX (pip install 'jax[cuda12]')") from err
    say(f"scar-jax {__version__} denoise: {feature_type} ({' or '.join(tenx_types)} features) on {device.platform}")
    adata, raw, library = _read_cells(args, feature_type, say)
    model, n_epochs = _trained_model(args, adata, raw, feature_type, model_dir, say)
    method = args.method or model.default_denoising_method
    noise_ratio, denoised = _denoised(model, adata, method, args.seed)
    adata.layers["denoised"] = denoised
    adata.obs["noise_ratio"] = noise_ratio
    adata.obsm["X_scAR"] = model.get_latent_representation()
    kept = float(denoised.sum()) / max(float(library.sum()), 1.0)
    say(
        f"noise ratio: median {np.median(noise_ratio):.3f} (5%-95%: {np.quantile(noise_ratio, 0.05):.3f}-"
        f"{np.quantile(noise_ratio, 0.95):.3f}); denoised counts keep {kept:.1%} of the observed counts"
    )
    if feature_type in ASSIGNED_TYPES:
        _assign(model, adata, feature_type, args, say)
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
    _write(adata, out)
    say(f"wrote {out}: X = raw counts, layers['denoised'], obs['noise_ratio'], obsm['X_scAR'], varm['ambient_profile']")
    return 0


def _check_denoise_options(args: argparse.Namespace) -> None:
    if args.sparsity is not None and not 0.0 < args.sparsity <= 1.0:
        raise ValueError(f"--sparsity must be in (0, 1], got {args.sparsity}")
    if args.prob is not None and not 0.0 <= args.prob < 1.0:
        raise ValueError(f"--prob must be in [0, 1) (or left out: the barcode-rank rule), got {args.prob}")
    for name in ("epochs", "batch_size", "moi"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _read_cells(args: argparse.Namespace, feature_type: str, say) -> tuple[Any, Any, Any]:
    """The cells with some count of the feature type, the raw droplets and the cells' libraries (before the
    cells without counts are left out)."""
    from . import readers

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
    return adata, raw, library


def _trained_model(args: argparse.Namespace, adata, raw, feature_type: str, model_dir: Path, say) -> tuple[Any, int]:
    """SCAR on ``adata`` with the ambient profile of ``raw``, trained (or resumed from ``model_dir``), and its
    number of epochs."""
    from . import train as _train
    from .model import SCAR

    SCAR.setup_anndata(adata, batch_key=args.batch_key)
    saved_epochs, saved_profile = _saved_model(model_dir)  # only with --resume (else an error, or removed)
    max_epochs = args.epochs or _train.max_epochs_heuristic(adata.n_obs)
    if saved_epochs > max_epochs:
        raise ValueError(
            f"--resume: the model in {str(model_dir)!r} was trained {saved_epochs} epochs, more than the "
            f"{max_epochs} asked for (--epochs)"
        )
    _ambient_profile(args, adata, raw, saved_profile, model_dir, say)
    model_kwargs = {} if args.sparsity is None else {"sparsity": args.sparsity}
    model = SCAR(
        adata,
        ambient_profile="ambient_profile",
        gene_likelihood=args.likelihood,
        feature_type=feature_type,
        seed=args.seed,
        **model_kwargs,
    )
    try:  # saved after every 10 epochs and at the end, before denoising; resumed from the last save
        model.train(
            max_epochs=max_epochs,
            batch_size=args.batch_size,
            accelerator=args.device,
            enable_progress_bar=not args.quiet,
            checkpoint_dir=str(model_dir),
        )
    except ValueError as err:
        if saved_epochs:
            raise ValueError(f"--resume: {err}") from err
        raise
    n_epochs = len(model.history["elbo_train"])
    if saved_epochs == n_epochs:
        say(f"resumed the trained model from {model_dir} ({n_epochs} epochs): no training")
    else:
        resumed = f" (resumed from {model_dir} at epoch {saved_epochs})" if saved_epochs else ""
        say(
            f"trained {n_epochs - saved_epochs} epochs{resumed} on {len(model.train_indices)} cells in "
            f"{model.training_time_s:.1f} s; the model is saved in {model_dir} (--resume reuses it)"
        )
    return model, n_epochs


def _ambient_profile(args: argparse.Namespace, adata, raw, saved_profile, model_dir: Path, say) -> None:
    """``adata.varm["ambient_profile"]`` from the raw droplets; with ``--resume`` it must be the saved model's."""
    from .model import SCAR

    t0 = time.perf_counter()
    profile = SCAR.get_ambient_profile(adata, raw, prob=args.prob, seed=args.seed)
    say(
        f"ambient profile from the raw droplets ({profile.shape[1]} profile(s), prob={args.prob}, "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    if saved_profile is not None and (  # the model keeps it as (n_batches, n_features)
        saved_profile.shape != profile.shape[::-1] or not np.allclose(saved_profile, profile.T, rtol=1e-5, atol=1e-9)
    ):
        raise ValueError(
            f"--resume: the model in {str(model_dir)!r} was trained with another ambient profile (RAW, --prob "
            "or --batch-key differ); rerun with the same ones, or with --overwrite instead of --resume"
        )


def _denoised(model, adata, method: str, seed: int) -> tuple[Any, Any]:
    """The noise ratio ``(n,)`` and the denoised counts (CSR float32) of ``method``."""
    import scipy.sparse as sp

    from .data import calibrate_model
    from .denoise import calibrated_split

    if method == "calibrated":  # one calibration for both the noise ratio and the counts
        noise_ratio, share = calibrate_model(model, share_at="observed")
        denoised = calibrated_split(adata.X, share, seed=seed)
    else:
        noise_ratio = model.get_noise_ratio()
        denoised = model.get_denoised_counts(seed=seed, method=method)
    if not sp.issparse(denoised):
        denoised = sp.csr_matrix(denoised)
    return noise_ratio, denoised.astype(np.float32)


def _assign(model, adata, feature_type: str, args: argparse.Namespace, say) -> None:
    """sgRNA, tag, CMO: the assigned features, how many, and their counts, into ``adata.obs``."""
    assignment = model.assign_features(cutoff=args.cutoff, moi=args.moi)
    adata.obs[feature_type] = assignment[feature_type].astype(str)
    adata.obs[f"n_{feature_type}"] = assignment[f"n_{feature_type}"].to_numpy()
    adata.obs[f"{feature_type}_count"] = assignment["count"].to_numpy()
    n_assigned = assignment[f"n_{feature_type}"].to_numpy()
    say(
        f"assigned {feature_type}: {int((n_assigned == 1).sum())} cells with one, "
        f"{int((n_assigned > 1).sum())} with several, {int((n_assigned == 0).sum())} with none"
    )


def _write(adata, out: Path) -> None:
    """``adata`` to ``out`` through a partial file, so a failed write leaves no half-written OUTPUT."""
    import anndata

    tmp = out.with_name(f".{out.stem}.partial.h5ad")
    try:
        anndata.AnnData.write_h5ad(adata, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


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
The trained model is saved in --model-dir (every 10 epochs and before denoising); if the run fails or
is killed, the same command with --resume continues from it without training again.
Input formats (detected from the content): 10x feature-barcode h5 (Cell Ranger v3+, all feature
types, or v2), 10x mtx folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz; or v2 genes.tsv),
.h5ad with raw counts in X.
"""

DENOISE_EPILOG = """\
example:
  scar-jax denoise filtered_feature_bc_matrix.h5 raw_feature_bc_matrix.h5 -o denoised.h5ad
  scar-jax denoise filtered_feature_bc_matrix.h5 raw_feature_bc_matrix.h5 -o adt.h5ad --feature-type ADT --prob 0.01
  scar-jax denoise filtered_feature_bc_matrix.h5 raw_feature_bc_matrix.h5 -o denoised.h5ad --resume
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
    _add_denoise_options(p)


def _add_denoise_options(p: argparse.ArgumentParser) -> None:
    """The options of ``denoise`` from ``--prob`` on (the ambient rule, the method, the assignment, the run)."""
    p.add_argument(
        "--prob",
        type=float,
        default=None,
        help="cell-free rule of the ambient estimate: by default the droplets below the steepest fall of the "
        "barcode-rank curve; a number in [0, 1) runs scvi-tools' rule instead (cell-free if the multinomial "
        "log-probability >= n_features * log(prob); scvi-tools' default is 0.995)",
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
    p.add_argument(
        "--model-dir",
        default=None,
        metavar="DIR",
        help="where the trained model is saved, every 10 epochs and before denoising (default: OUTPUT with "
        ".model for .h5ad); scar_jax.SCAR.load(DIR, adata) reads it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the model in --model-dir: a finished one is not trained again (e.g. after a "
        "failure while denoising), one killed during training trains only its remaining epochs; without a "
        "saved model, train from the start",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT, and the model in --model-dir, if they exist"
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (no status lines, no progress bar)")
    p.set_defaults(func=_denoise)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scar-jax", description="scAR ambient-RNA removal in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_denoise(sub)
    cli_demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
