"""Scale benchmark: training and inference throughput, host and device memory, scar-jax (and scvi-tools SCAR).

Usage::

    python benchmarks/scale.py                                       # 10k, 100k, 1M x 2000 and 100k x 33k
    python benchmarks/scale.py --sizes 10000x2000 100000x2000 --epochs 3 --scvi
    python benchmarks/scale.py --sizes 1000000x2000:1 --devices 1    # ":E" sets the timed epochs of one size
    python benchmarks/scale.py --sizes 10000x2000 --scvi --scvi-python /path/to/python

Every configuration runs in a fresh subprocess (so peak memory is that configuration's own). The child
generates CSR counts in row chunks (``generate_counts``: 5 cell types, 30% of the genes expressed per
type, log-normal libraries of mean 3000, Beta noise ratios of mean 0.15 mixed with an ambient profile,
Poisson counts; about 290 non-zeros per 1000 genes per cell at 2000 genes, like
``scar_jax.datasets.simulate``, whose three CSR layers would not fit in memory at 1M cells), then:

* training, scar-jax: a first model is trained for one epoch (``first epoch s``: the wall time of
  ``train``, which includes moving the data to the device and compiling the epoch); a second model with
  the same configuration then trains ``--epochs`` epochs reusing the compiled epoch (``s/epoch``,
  ``cells/s`` = training cells (90%) per second; the validation pass of every epoch is included);
  ``SCAR.train(devices=--devices, batch_size=--batch-size, train_size=0.9)``;
* inference, scar-jax: ``get_denoised_counts(method="split")`` (the count-preserving split that scales to
  atlases, sparse result) and
  ``get_latent_representation()`` on all cells, each compiled first on 2048 cells (not timed);
* with ``--scvi``: ``scvi.external.SCAR`` (in the interpreter ``--scvi-python``, default
  ``/work/venv-scvi/bin/python`` if it exists, else this one) on the same counts (the generator is
  deterministic), same ambient profile (the mean profile of the cells), epochs, batch size and train
  fraction, for sizes with at most ``--scvi-max-cells`` cells; no compilation, so its first epoch is
  not separate; its s/epoch is the wall time of ``train`` / epochs (no validation pass).

Memory: a thread samples the process's resident memory (``VmRSS`` in ``/proc/self/status``) every 5 ms;
``peak RSS`` is the peak during the phase, ``base`` the resident memory after importing JAX and
scar-jax but before generating data, and ``x CSR`` = (peak - base) / CSR size (data + indices + indptr
of ``X``), over both models' construction and training; ``one model x CSR`` is the same for the first
model alone (``SCAR(...)`` and one training call: what training a model costs, the goal's measure).
``peak device`` is ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` after the phase
(cumulative over the process), "n/a" where the backend has no memory stats (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from _rss import PeakRSS, resident_mb  # noqa: E402  (benchmarks/_rss.py, beside this script)

DEFAULT_SIZES = ["10000x2000", "100000x2000", "1000000x2000", "100000x33000"]


# ---------------------------------------------------------------------------------------------- helpers
def device_peak_mb() -> float | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def generate_counts(n_cells: int, n_genes: int, seed: int = 0, library_mean: float = 3000.0):
    """CSR ``int32`` counts ``(n_cells, n_genes)`` generated in row chunks, and the ambient profile.

    Cell types (5) express 30% of the genes (half of them shared housekeeping genes) with log-normal
    frequencies; each cell's counts are ``Poisson(L_i ((1 - eps_i) native_type + eps_i ambient))`` with
    ``L_i`` log-normal (mean ``library_mean``, sd of log 0.4, at least 200) and ``eps_i ~ Beta(3, 17)``.
    Row chunks of about 4M entries are drawn in parallel threads, each from its own stream
    ``default_rng([seed, first_row])``, so the result does not depend on the number of threads. Memory
    beyond the result: one dense chunk per thread.
    """
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_types = 5
    n_expr = max(2, int(0.3 * n_genes))
    n_hk = n_expr // 2
    native = np.zeros((n_types, n_genes))
    for t in range(n_types):
        genes = np.concatenate([np.arange(n_hk), rng.choice(np.arange(n_hk, n_genes), n_expr - n_hk, replace=False)])
        w = np.exp(rng.normal(0.0, 1.5, size=n_expr))
        native[t, genes] = w / w.sum()
    ambient = 0.99 * native.mean(axis=0) + 0.01 / n_genes
    ambient /= ambient.sum()
    cell_type = rng.integers(0, n_types, n_cells)
    library = np.maximum(rng.lognormal(np.log(library_mean) - 0.08, 0.4, n_cells), 200.0)
    eps = rng.beta(3.0, 17.0, n_cells)
    step = max(1, 4_000_000 // n_genes)

    def chunk(start: int) -> sp.csr_matrix:  # one Poisson stream per chunk: the same counts with any thread count
        rows = slice(start, min(start + step, n_cells))
        mu = library[rows, None] * ((1.0 - eps[rows, None]) * native[cell_type[rows]] + eps[rows, None] * ambient)
        counts = np.random.default_rng([seed, start]).poisson(mu).astype(np.int32)
        return sp.csr_matrix(counts)

    data, indices, indptr = [], [], [np.zeros(1, np.int64)]
    nnz = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # NumPy's sampler releases the GIL
        for part in pool.map(chunk, range(0, n_cells, step)):
            data.append(part.data)
            indices.append(part.indices.astype(np.int32))
            indptr.append(part.indptr[1:].astype(np.int64) + nnz)
            nnz += part.nnz
    index_dtype = np.int32 if nnz < 2**31 else np.int64
    x = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr).astype(index_dtype)),
        shape=(n_cells, n_genes),
    )
    del data, indices, indptr
    zero = np.flatnonzero(np.diff(x.indptr) == 0)
    if zero.size:  # vanishingly rare at these libraries: give such a cell one count of gene 0
        x = x.tolil()
        x[zero, 0] = 1
        x = x.tocsr()
    profile = np.asarray(x.sum(axis=0), np.float64).ravel()
    return x, profile / profile.sum()


def release_freed_memory() -> None:
    """Return the generator's freed chunks to the OS (glibc keeps them after its dynamic mmap threshold
    rises), so that the resident memory measured afterwards is the data's, not the allocator's."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def progress(what: str, data: dict) -> None:
    print(f"    [{time.strftime('%H:%M:%S')}] {what}: {json.dumps(data, default=str)}", file=sys.stderr, flush=True)


def csr_mb(x) -> float:
    return (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 2**20


def make_adata(x):
    import anndata
    import pandas as pd

    return anndata.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"cell_{i}" for i in range(x.shape[0])]),
        var=pd.DataFrame(index=[f"gene_{g}" for g in range(x.shape[1])]),
    )


# ---------------------------------------------------------------------------------------------- children
def child_jax(
    n_cells: int,
    n_genes: int,
    epochs: int,
    batch_size: int,
    devices: int,
    infer_cells: int | None = None,
    precisions: tuple[str, ...] = (),
    unrolls: tuple[int, ...] = (),
) -> dict:
    import jax
    import numpy as np

    from scar_jax import SCAR

    base = resident_mb()
    t0 = time.perf_counter()
    x, profile = generate_counts(n_cells, n_genes)
    gen_s = time.perf_counter() - t0
    release_freed_memory()
    adata = make_adata(x)
    SCAR.setup_anndata(adata)
    after_data = resident_mb()
    args = {"batch_size": batch_size, "train_size": 0.9, "devices": devices, "enable_progress_bar": False}
    out: dict = {"gen_s": gen_s, "base_mb": base, "data_mb": after_data, "csr_mb": csr_mb(x), "nnz": int(x.nnz)}
    out["max_row_nnz"] = int(np.diff(x.indptr).max())
    progress(f"generated {n_cells}x{n_genes} in {gen_s:.1f} s", out)
    with PeakRSS() as mem:
        with PeakRSS() as first_mem:  # one model, from construction to the end of its training
            t0 = time.perf_counter()
            first = SCAR(adata, ambient_profile=profile)
            first.train(max_epochs=1, **args)
            out["first_epoch_s"] = time.perf_counter() - t0
        del first
        model = SCAR(adata, ambient_profile=profile, seed=1)
        model.train(max_epochs=epochs, **args)
    out["train"] = {
        "s_per_epoch": model.training_time_s / epochs,
        "cells_per_s": len(model.train_indices) * epochs / model.training_time_s,
        "peak_mb": mem.peak,
        "one_model_peak_mb": first_mem.peak,
        "device_mb": device_peak_mb(),
        "elbo_validation": float(model.history["elbo_validation"]["elbo_validation"].iloc[-1]),
    }
    progress("trained", out)
    # variants: the same model (seed 1, same data and split) with another matmul precision or scan unroll;
    # each compiled on a throwaway one-epoch model first, then timed over the same epochs
    variants = [(f"matmul_precision={p}", {"matmul_precision": p}, {}) for p in precisions]
    variants += [(f"scan_unroll={u}", {}, {"scan_unroll": u}) for u in unrolls]
    out["variants"] = []
    for label, model_kwargs, train_kwargs in variants:
        t0 = time.perf_counter()
        SCAR(adata, ambient_profile=profile, seed=1, **model_kwargs).train(max_epochs=1, **args, **train_kwargs)
        first_s = time.perf_counter() - t0
        other = SCAR(adata, ambient_profile=profile, seed=1, **model_kwargs)
        other.train(max_epochs=epochs, **args, **train_kwargs)
        elbo = float(other.history["elbo_validation"]["elbo_validation"].iloc[-1])
        out["variants"].append(
            {
                "label": label,
                "first_epoch_s": first_s,
                "cells_per_s": len(other.train_indices) * epochs / other.training_time_s,
                "elbo_validation": elbo,
                "relative_to_float32": elbo / out["train"]["elbo_validation"] - 1.0,
            }
        )
        del other
        progress(label, out["variants"][-1])
    n_infer = n_cells if infer_cells is None else min(n_cells, infer_cells)
    timed = None if n_infer == n_cells else np.arange(n_infer)
    warm = np.arange(min(n_cells, 2048))
    for name, call in (
        ("denoised", lambda idx: model.get_denoised_counts(indices=idx, method="split")),
        ("latent", lambda idx: model.get_latent_representation(indices=idx)),
    ):
        call(warm)  # compile
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = call(timed)
            seconds = time.perf_counter() - t0
        assert result.shape[0] == n_infer
        del result
        out[name] = {
            "seconds": seconds,
            "cells_per_s": n_infer / seconds,
            "cells": n_infer,
            "peak_mb": mem.peak,
            "device_mb": device_peak_mb(),
        }
        progress(name, out[name])
    device = jax.devices()[0]
    out["device"] = f"{device.platform}:{device.device_kind} x {len(jax.devices())}"
    out["jax"] = jax.__version__
    return out


def child_scvi(n_cells: int, n_genes: int, epochs: int, batch_size: int) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import numpy as np
    import scvi
    import torch

    base = resident_mb()
    x, profile = generate_counts(n_cells, n_genes)
    adata = make_adata(x)
    scvi.external.SCAR.setup_anndata(adata)
    out: dict = {"base_mb": base, "csr_mb": csr_mb(x)}
    scvi.settings.seed = 0
    model = scvi.external.SCAR(adata, ambient_profile=profile.astype(np.float32))
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        model.train(
            max_epochs=epochs,
            batch_size=batch_size,
            train_size=0.9,
            accelerator=accelerator,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        seconds = time.perf_counter() - t0
    n_train = int(round(0.9 * n_cells))
    device_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    out["train"] = {
        "s_per_epoch": seconds / epochs,
        "cells_per_s": n_train * epochs / seconds,
        "peak_mb": mem.peak,
        "device_mb": device_mb,
    }
    for name, call in (("denoised", model.get_denoised_counts), ("latent", model.get_latent_representation)):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = call()
            seconds = time.perf_counter() - t0
        del result
        device_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        out[name] = {"seconds": seconds, "cells_per_s": n_cells / seconds, "peak_mb": mem.peak, "device_mb": device_mb}
    out["versions"] = f"scvi-tools {scvi.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return out


# ---------------------------------------------------------------------------------------------- parent
def run_child(python: str, impl: str, n_cells: int, n_genes: int, epochs: int, args) -> dict:
    cmd = [
        python,
        os.path.abspath(__file__),
        "--child",
        impl,
        "--sizes",
        f"{n_cells}x{n_genes}",
        "--epochs",
        str(epochs),
        "--batch-size",
        str(args.batch_size),
        "--devices",
        str(args.devices),
    ]
    if args.inference_max_cells is not None:
        cmd += ["--inference-max-cells", str(args.inference_max_cells)]
    if impl == "jax" and args.precision:
        cmd += ["--precision", *args.precision]
    if impl == "jax" and args.unroll:
        cmd += ["--unroll", *map(str, args.unroll)]
    # the child's progress lines (stderr) pass through, so a run cut short still shows its finished phases;
    # SIGTERM (e.g. from `timeout`) ends the child too
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        previous = signal.signal(signal.SIGTERM, lambda *_: (proc.kill(), sys.exit(143)))
        stdout, _ = proc.communicate()
        signal.signal(signal.SIGTERM, previous)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode} (its stderr is above)"}
    return json.loads(stdout.strip().splitlines()[-1])


def on(phase: dict) -> str:
    return f" (on {phase['cells']:,})" if "cells" in phase else ""


def fmt_mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="CELLSxGENES[:EPOCHS]")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after the first, compiling one)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--devices", type=int, default=1, help="SCAR.train(devices=N); -1: all local devices")
    parser.add_argument(
        "--inference-max-cells",
        type=int,
        help="time scar-jax inference on the first N cells only (default: all); the table gives N",
    )
    parser.add_argument(
        "--precision",
        nargs="*",
        default=[],
        choices=["tensorfloat32", "bfloat16"],
        help="also train with these SCAR(matmul_precision=...) and report cells/s and the held-out ELBO change",
    )
    parser.add_argument(
        "--unroll", nargs="*", type=int, default=[], help="also train with these train(scan_unroll=...) values"
    )
    parser.add_argument("--scvi", action="store_true", help="also run scvi-tools SCAR (sizes up to --scvi-max-cells)")
    parser.add_argument("--scvi-max-cells", type=int, default=10_000)
    default_scvi = "/work/venv-scvi/bin/python" if os.path.exists("/work/venv-scvi/bin/python") else sys.executable
    parser.add_argument("--scvi-python", default=default_scvi)
    parser.add_argument("--child", choices=["jax", "scvi"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    sizes = []
    for spec in args.sizes:
        shape, _, ep = spec.lower().partition(":")
        n_cells, n_genes = (int(v) for v in shape.split("x"))
        sizes.append((n_cells, n_genes, int(ep) if ep else args.epochs))
    if args.child == "jax":
        result = child_jax(
            *sizes[0],
            args.batch_size,
            args.devices,
            args.inference_max_cells,
            tuple(args.precision),
            tuple(args.unroll),
        )
        print(json.dumps(result))
        return
    if args.child == "scvi":
        print(json.dumps(child_scvi(*sizes[0], args.batch_size)))
        return

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(
        f"host: {cpu}, {os.cpu_count()} cores, {platform.platform()}; batch {args.batch_size}, "
        f"devices {args.devices}, train_size 0.9",
        flush=True,
    )
    header = (
        "| impl | cells x genes | nnz/cell (max) | epochs | first epoch s | s/epoch | train cells/s "
        "| train peak RSS MB (base) | CSR MB | x CSR | one model x CSR | denoise cells/s | denoise peak RSS MB "
        "| latent cells/s | latent peak RSS MB | peak device MB (train/denoise/latent) |"
    )
    rows, variant_rows = [], []
    info = set()
    for n_cells, n_genes, epochs in sizes:
        runs = [("scar-jax", run_child(sys.executable, "jax", n_cells, n_genes, epochs, args))]
        if args.scvi and n_cells <= args.scvi_max_cells:
            runs.append(("scvi-tools", run_child(args.scvi_python, "scvi", n_cells, n_genes, epochs, args)))
        for impl, r in runs:
            size = f"{n_cells:,} x {n_genes:,}"
            if "error" in r:
                rows.append(f"| {impl} | {size} | | {epochs} | failed: {r['error']} ||||||||||||")
            else:
                t, d, lat = r["train"], r["denoised"], r["latent"]
                nnz = f"{r['nnz'] / n_cells:.0f} ({r['max_row_nnz']})" if "nnz" in r else ""
                first = f"{r['first_epoch_s']:.1f}" if "first_epoch_s" in r else "-"
                ratio = (t["peak_mb"] - r["base_mb"]) / r["csr_mb"]
                one = t.get("one_model_peak_mb")
                one_ratio = "-" if one is None else f"{(one - r['base_mb']) / r['csr_mb']:.2f}"
                devs = "/".join(fmt_mb(p["device_mb"]) for p in (t, d, lat))
                rows.append(
                    f"| {impl} | {size} | {nnz} | {epochs} | {first} | {t['s_per_epoch']:.2f} "
                    f"| {t['cells_per_s']:,.0f} | {t['peak_mb']:,.0f} ({r['base_mb']:,.0f}) | {r['csr_mb']:,.0f} "
                    f"| {ratio:.2f} | {one_ratio} | {d['cells_per_s']:,.0f}{on(d)} | {d['peak_mb']:,.0f} "
                    f"| {lat['cells_per_s']:,.0f} | {lat['peak_mb']:,.0f} | {devs} |"
                )
                info.add(r.get("versions") or f"scar-jax on {r['device']}, jax {r['jax']}")
                for v in r.get("variants", []):
                    variant_rows.append(
                        f"| {size} | {v['label']} | {v['first_epoch_s']:.1f} | {v['cells_per_s']:,.0f} "
                        f"({t['cells_per_s']:,.0f}) | {v['elbo_validation']:.3f} ({t['elbo_validation']:.3f}) "
                        f"| {100 * v['relative_to_float32']:+.4f}% |"
                    )
            print(f"  done {impl} {n_cells}x{n_genes}: {rows[-1]}", file=sys.stderr, flush=True)
    print("\n" + "; ".join(sorted(info)) + "\n")
    print(header)
    print("|" + "---|" * header.count(" |"))
    print("\n".join(rows))
    if variant_rows:
        print(
            "\nVariants (same seed, data and epochs; in parentheses the default float32, scan_unroll=1 model):\n\n"
            "| cells x genes | variant | first epoch s | train cells/s (default) | held-out -ELBO (default) "
            "| ELBO change |\n|---|---|---|---|---|---|"
        )
        print("\n".join(variant_rows))


if __name__ == "__main__":
    main()
