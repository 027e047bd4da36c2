"""Tests of the ``scar-jax`` command line (``scar_jax.cli``).

The demo trains a default-size model, so it runs only twice here (once quiet, once verbose with
``--output``); the printed numbers are checked against a re-computation from the written file.

``denoise`` runs on a 10x v3 h5 written by the test (``_tenx``: Gene Expression + Antibody Capture +
CRISPR Guide Capture, cells and empty droplets) once per feature type. Every type has the same
number of features, cells and widest row, so the three runs share one compiled training step.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata
import jax
import numpy as np
import pytest
import scipy.sparse as sp
from _tenx import write_mtx, write_v3_h5

from scar_jax import cli
from scar_jax.datasets import simulate, simulate_empty_droplets
from scar_jax.feature_datasets import simulate_adt, simulate_feature_empty_droplets, simulate_guides
from scar_jax.metrics import denoising_metrics, pearson, pseudobulk_l1

N_CELLS, N_GENES, EPOCHS = 300, 50, 3
DEMO = ["demo", "--n-cells", str(N_CELLS), "--n-genes", str(N_GENES), "--epochs", str(EPOCHS)]
DEMO_OPTIONS = [
    "--n-cells",
    "--n-genes",
    "--noise-ratio",
    "--likelihood",
    "--epochs",
    "--batch-size",
    "--seed",
    "--output",
    "--quiet",
    "--n-empty",
    "--prob",
]


@pytest.fixture(scope="module")
def verbose_run(tmp_path_factory):
    """Run the verbose demo once with ``--output``: (return code, stdout, stderr, output path)."""
    path = tmp_path_factory.mktemp("cli") / "tmp.h5ad"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([*DEMO, "--output", str(path)])
    return rc, out.getvalue(), err.getvalue(), path


def test_demo_quiet_prints_nothing(capsys):
    assert cli.main([*DEMO, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""  # no progress bar either


def test_demo_verbose_reports(verbose_run):
    rc, out, _, path = verbose_run
    assert rc == 0
    assert f"{N_CELLS} cells x {N_GENES} genes" in out
    assert f"trained {EPOCHS} epochs" in out
    assert "epochs" in out
    assert "Pearson" in out
    assert "L1" in out
    assert f"wrote {path}" in out


def test_demo_output_file(verbose_run):
    _, _, _, path = verbose_run
    assert path.is_file()
    adata = anndata.read_h5ad(path)
    assert adata.shape == (N_CELLS, N_GENES)
    assert adata.obsm["X_scAR"].shape == (N_CELLS, 15)  # default n_latent
    assert np.isfinite(adata.obsm["X_scAR"]).all()
    denoised = adata.layers["denoised"].toarray()  # count-preserving split: sparse like X
    assert denoised.shape == (N_CELLS, N_GENES)
    np.testing.assert_array_equal(denoised, np.round(denoised))
    assert denoised.min() >= 0 and (denoised <= adata.X.toarray()).all()
    expected = np.asarray(adata.layers["denoised_expected"])
    assert expected.shape == (N_CELLS, N_GENES) and expected.min() >= 0
    noise = adata.obs["noise_ratio_scar"].to_numpy()
    assert ((noise >= 0) & (noise <= 1)).all()


def test_demo_printed_numbers_match_output_file(verbose_run):
    # the numbers printed are the metrics of the written results (same formatting: exact string match)
    _, out, _, path = verbose_run
    adata = anndata.read_h5ad(path)
    r = pearson(adata.obs["noise_ratio_scar"].to_numpy(), adata.obs["noise_ratio"].to_numpy())
    assert f"Pearson r with the truth {r:.3f}" in out
    denoised, native = adata.layers["denoised"], adata.layers["native"]
    m = denoising_metrics(adata.X, denoised, native)
    pb = pseudobulk_l1(adata.X, denoised, native, adata.obs["cell_type"].to_numpy())
    assert f"per-cell-type profiles {pb['l1_denoised']:,.0f} vs {pb['l1_raw']:,.0f} raw" in out
    assert f"ambient counts removed {m['ambient_removed_entrywise']:.1%}" in out
    assert f"native counts {m['l1_denoised']:,.0f} vs {m['l1_raw']:,.0f} raw" in out
    match = re.search(r"mean estimated ([0-9.]+) vs true ([0-9.]+)", out)
    assert match is not None
    assert match.group(1) == f"{adata.obs['noise_ratio_scar'].mean():.3f}"
    assert match.group(2) == f"{adata.obs['noise_ratio'].mean():.3f}"


def test_help_documents_every_demo_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in DEMO_OPTIONS:
        assert option in text
    for default in ("default 5000", "default 1000", "default 0.15", "default 128"):
        assert default in text
    for choice in ("b", "poisson", "nb", "zinb"):
        assert choice in text


def test_top_level_help_lists_demo_and_denoise(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "denoise" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--likelihood", "gaussian"],
        ["demo", "--n-cells", "many"],
        ["demo", "--bogus"],
        [],  # the sub-command is required
    ],
)
def test_invalid_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("scar-jax: error: ") and captured.err.count("\n") == 1  # one line
    assert "--help" in captured.err


def test_invalid_likelihood_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--likelihood", "gaussian"])
    assert "invalid choice: 'gaussian'" in capsys.readouterr().err


def test_parser_defaults():
    args = cli.build_parser().parse_args(["demo"])
    assert (args.n_cells, args.n_genes, args.noise_ratio, args.likelihood) == (5000, 1000, 0.15, "b")
    assert (args.epochs, args.batch_size, args.seed, args.output, args.quiet) == (None, 128, 0, None, False)


# ---------------------------------------------------------------------------------------------- denoise
N_TENX, N_FEATURES, N_EMPTY, DENOISE_EPOCHS = 120, 8, 600, 5
TENX_TYPES = {"mRNA": "Gene Expression", "ADT": "Antibody Capture", "sgRNA": "CRISPR Guide Capture"}
# explicit --sparsity 1 for mRNA/ADT matches the forced sparsity of sgRNA (one compiled model for all);
# sgRNA is given 0.5 to show that sparsity 1 is forced anyway
DENOISE_RUNS = {"mRNA": ["--sparsity", "1"], "ADT": ["--sparsity", "1"], "sgRNA": ["--sparsity", "0.5"]}
DENOISE_OPTIONS = [
    "--output",
    "--feature-type",
    "--likelihood",
    "--sparsity",
    "--epochs",
    "--batch-key",
    "--batch-size",
    "--device",
    "--seed",
    "--prob",
    "--cutoff",
    "--moi",
    "--genome",
    "--model-dir",
    "--resume",
    "--overwrite",
    "--quiet",
]


def _run(argv) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process: (exit code, stdout, stderr); argparse's SystemExit becomes the code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tenx(tmp_path_factory):
    """filtered.h5 (cells) and raw.h5 (cells + empty droplets), 10x v3 with three feature types.

    Returns the folder and, per scar-jax feature type, the cells' counts and the simulation.
    """
    mrna = simulate(n_cells=N_TENX, n_genes=N_FEATURES, seed=0)
    adt = simulate_adt(n_cells=N_TENX, n_proteins=N_FEATURES, n_isotype_controls=2, seed=0)
    guides = simulate_guides(n_cells=N_TENX, n_guides=N_FEATURES, seed=0)
    empties = [
        simulate_empty_droplets(mrna, n_droplets=N_EMPTY, seed=1).X,
        simulate_feature_empty_droplets(adt, n_droplets=N_EMPTY, seed=1).X,
        simulate_feature_empty_droplets(guides, n_droplets=N_EMPTY, seed=1).X,
    ]
    blocks = []
    for sim in (mrna, adt, guides):
        x = sim.X.toarray()
        x[0] += 1  # one cell with every feature: the same widest row in every type (one compilation)
        blocks.append(x)
    # a barcode called a cell that has no counts at all: every run must leave it out
    cells = np.vstack([np.hstack(blocks), np.zeros((1, 3 * N_FEATURES), np.int64)])
    names = [*mrna.var_names, *adt.var_names, *guides.var_names]
    types = [t for t in TENX_TYPES.values() for _ in range(N_FEATURES)]
    barcodes = [f"AAACCCAAG{i:05d}-1" for i in range(N_TENX + 1)]
    raw = sp.vstack([sp.csr_matrix(cells), sp.hstack(empties)]).tocsr()
    folder = tmp_path_factory.mktemp("tenx")
    write_v3_h5(folder / "filtered.h5", cells, barcodes, names, types)
    raw_barcodes = barcodes + [f"TTTGGGCCA{i:05d}-1" for i in range(N_EMPTY)]
    write_v3_h5(folder / "raw.h5", raw, raw_barcodes, names, types)
    counts = {ft: blocks[i] for i, ft in enumerate(TENX_TYPES)}
    sims = {"mRNA": mrna, "ADT": adt, "sgRNA": guides}
    return folder, counts, sims, barcodes


def _denoise_argv(folder, feature_type, output, *extra):
    return [
        "denoise",
        str(folder / "filtered.h5"),
        str(folder / "raw.h5"),
        "--output",
        str(output),
        "--feature-type",
        feature_type,
        "--prob",
        "0.1",
        "--epochs",
        str(DENOISE_EPOCHS),
        *extra,
    ]


@pytest.fixture(scope="module")
def denoised(tenx):
    """Run ``denoise`` once per feature type (mRNA verbose, the others quiet): {type: (rc, out, err, path)}."""
    folder = tenx[0]
    runs = {}
    for ft, extra in DENOISE_RUNS.items():
        path = folder / f"denoised_{ft}.h5ad"
        quiet = [] if ft == "mRNA" else ["--quiet"]
        runs[ft] = (*_run(_denoise_argv(folder, ft, path, *extra, *quiet)), path)
    return runs


@pytest.mark.parametrize("feature_type", list(TENX_TYPES))
def test_denoise_writes_the_documented_h5ad(denoised, tenx, feature_type):
    rc, _, err, path = denoised[feature_type]
    assert rc == 0, err
    _, counts, _, barcodes = tenx
    out = anndata.read_h5ad(path)
    assert out.shape == (N_TENX, N_FEATURES)  # the cell without counts is left out
    assert list(out.obs_names) == barcodes[:N_TENX]
    assert (out.var["feature_types"] == TENX_TYPES[feature_type]).all()
    raw = out.X.toarray()
    np.testing.assert_array_equal(raw, counts[feature_type])  # X stays the raw counts
    denoised_counts = out.layers["denoised"]
    assert sp.isspmatrix_csr(denoised_counts)
    d = denoised_counts.toarray()
    np.testing.assert_array_equal(d, np.round(d))
    assert (d >= 0).all() and (d <= raw).all()
    noise = out.obs["noise_ratio"].to_numpy()
    if feature_type == "mRNA":
        # 8 genes, and every one the pooled counts can judge (expected >= 10 counts) is expressed in every
        # neighbourhood: no gene is off, so there is no evidence of contamination and nothing is removed
        # (docs/model.md, "Which genes estimate the noise ratio"); before, a gene of expected ~1 count set it
        assert d.sum() <= raw.sum() and noise.max() < 1e-3
    else:
        assert d.sum() < raw.sum()  # ambient counts were removed
    assert noise.shape == (N_TENX,) and ((noise >= 0) & (noise <= 1)).all()
    assert out.obsm["X_scAR"].shape == (N_TENX, 15) and np.isfinite(out.obsm["X_scAR"]).all()
    profile = out.varm["ambient_profile"]
    assert profile.shape == (N_FEATURES, 1)
    np.testing.assert_allclose(profile.sum(axis=0), 1.0, rtol=1e-6)
    settings = out.uns["scar_jax"]
    assert settings["feature_type"] == feature_type and settings["epochs"] == DENOISE_EPOCHS
    assert settings["method"] == ("calibrated" if feature_type == "mRNA" else "split")  # the default --method
    assert settings["sparsity"] == 1.0  # given for mRNA/ADT, forced for sgRNA (asked for 0.5)
    assigned = {"sgRNA", "n_sgRNA", "sgRNA_count"}
    if feature_type == "sgRNA":
        assert assigned <= set(out.obs)
    else:
        assert not assigned & set(out.obs)


def test_denoise_guide_assignment_matches_the_truth(denoised, tenx):
    out = anndata.read_h5ad(denoised["sgRNA"][3])
    truth = tenx[2]["sgRNA"].obs["true_guides"].to_numpy()
    assert (out.obs["sgRNA"].to_numpy() == truth).mean() >= 0.9
    n = out.obs["n_sgRNA"].to_numpy()
    assert ((n == 0) == (out.obs["sgRNA"] == "").to_numpy()).all()
    assert (out.obs["sgRNA_count"].to_numpy()[n > 0] > 0).all()


def test_denoised_layer_goes_straight_into_scanpy(denoised):
    import scanpy as sc

    out = anndata.read_h5ad(denoised["mRNA"][3])
    raw_before = out.X.copy()
    sc.pp.normalize_total(out, target_sum=1e4, layer="denoised")
    sc.pp.log1p(out, layer="denoised")
    layer = out.layers["denoised"].toarray()
    assert np.isfinite(layer).all() and (layer >= 0).all()
    totals = np.expm1(layer).sum(axis=1)
    kept = totals > 0
    np.testing.assert_allclose(totals[kept], 1e4, rtol=1e-3)
    assert (out.X != raw_before).nnz == 0  # X untouched


def test_denoise_status_lines_and_quiet(denoised):
    rc, out, err, path = denoised["mRNA"]
    assert rc == 0
    assert f"read {N_TENX + 1} cells x {N_FEATURES} features" in out
    assert "left out 1 cells without mRNA counts" in out
    assert f"trained {DENOISE_EPOCHS} epochs" in out
    assert "noise ratio: median" in out
    assert f"wrote {path}" in out
    assert "Training" in err  # the progress bar
    for ft in ("ADT", "sgRNA"):  # --quiet: nothing at all
        assert denoised[ft][1:3] == ("", "")
    sg = anndata.read_h5ad(denoised["sgRNA"][3])
    assert sg.n_obs == N_TENX


def test_denoise_reads_mtx_folders_and_h5ad_alike(denoised, tenx, tmp_path):
    # the same cells from a 10x mtx folder and the raw droplets from an .h5ad give the same result
    from scar_jax import readers

    folder, _, _, _ = tenx
    filtered = readers.read(folder / "filtered.h5")
    mtx = write_mtx(
        tmp_path / "filtered_feature_bc_matrix",
        filtered.X,
        list(filtered.obs_names),
        list(filtered.var_names),
        list(filtered.var["feature_types"]),
    )
    readers.read(folder / "raw.h5").write_h5ad(tmp_path / "raw.h5ad")
    path = tmp_path / "from_mtx.h5ad"
    argv = ["denoise", str(mtx), str(tmp_path / "raw.h5ad"), "-o", str(path), "--prob", "0.1"]
    rc, _, err = _run([*argv, "--epochs", str(DENOISE_EPOCHS), "--sparsity", "1", "--quiet"])
    assert rc == 0, err
    a, b = anndata.read_h5ad(path), anndata.read_h5ad(denoised["mRNA"][3])
    np.testing.assert_array_equal(a.layers["denoised"].toarray(), b.layers["denoised"].toarray())
    np.testing.assert_allclose(a.obs["noise_ratio"], b.obs["noise_ratio"], rtol=1e-6)


def test_denoise_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["denoise", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in DENOISE_OPTIONS:
        assert option in text
    for phrase in ("raw counts", "layers['denoised']", "obs['noise_ratio']", "obsm['X_scAR']", "Antibody Capture"):
        assert phrase in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--feature-type", "protein"], "unknown feature type 'protein'"),
        (["--feature-type", "CMO"], "has no CMO features ('Multiplexing Capture')"),
        (["--sparsity", "0"], "--sparsity must be in (0, 1]"),
        (["--prob", "1.5"], "--prob must be in [0, 1)"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--batch-key", "lane"], "--batch-key 'lane' is not a column"),
        (["--prob", "0.999"], "cell-free droplets found"),
    ],
)
def test_denoise_errors_are_one_line(tenx, tmp_path, extra, message):
    folder = tenx[0]
    output = tmp_path / "out.h5ad"
    rc, _, err = _run([*_denoise_argv(folder, "mRNA", output, "--quiet"), *extra])
    assert rc == 1
    assert err.startswith("scar-jax: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert not output.exists()


def test_denoise_path_errors(tenx, tmp_path):
    folder = tenx[0]
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("hello\n")
    existing = tmp_path / "exists.h5ad"
    existing.write_text("")
    cases = [
        ([str(tmp_path / "missing.h5"), str(folder / "raw.h5")], "out.h5ad", "missing.h5: no such file or directory"),
        ([str(folder / "filtered.h5"), str(tmp_path / "nope")], "out.h5ad", "nope: no such file or directory"),
        ([str(not_hdf5), str(folder / "raw.h5")], "out.h5ad", "not an HDF5 file"),
        ([str(folder / "filtered.h5"), str(folder / "raw.h5")], "out.csv", "--output must be an .h5ad path"),
        ([str(folder / "filtered.h5"), str(folder / "raw.h5")], "no_dir/out.h5ad", "does not exist"),
        ([str(folder / "filtered.h5"), str(folder / "raw.h5")], "exists.h5ad", "pass --overwrite"),
    ]
    for inputs, output, message in cases:
        rc, out, err = _run(["denoise", *inputs, "-o", str(tmp_path / output), "--quiet"])
        assert rc == 1 and out == ""
        assert err.startswith("scar-jax: error: ") and err.count("\n") == 1, err
        assert message in err


@pytest.mark.skipif(any(d.platform == "gpu" for d in jax.devices()), reason="a GPU is present")
def test_denoise_missing_gpu_is_an_error(tenx, tmp_path):
    rc, _, err = _run(_denoise_argv(tenx[0], "mRNA", tmp_path / "o.h5ad", "--device", "gpu"))
    assert rc == 1
    assert err.startswith("scar-jax: error: --device gpu: no GPU visible to JAX") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["denoise", "a.h5", "b.h5"], "the following arguments are required: -o/--output"),
        (["denoise", "a.h5", "b.h5", "-o", "x.h5ad", "--likelihood", "gaussian"], "invalid choice: 'gaussian'"),
        (["denoise", "a.h5", "b.h5", "-o", "x.h5ad", "--epochs", "many"], "invalid int value: 'many'"),
        (["denoise", "a.h5", "-o", "x.h5ad"], "required: RAW"),
    ],
)
def test_denoise_bad_command_lines(argv, message):
    rc, out, err = _run(argv)
    assert rc == 2 and out == ""
    assert err.startswith("scar-jax: error: ") and err.count("\n") == 1, err
    assert message in err and "scar-jax denoise --help" in err


def _entry_point() -> str:
    found = shutil.which("scar-jax", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the scar-jax entry point is not installed next to this Python")
    return found


def test_entry_point_denoise_help_and_error(tmp_path):
    exe = _entry_point()
    result = subprocess.run([exe, "denoise", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "layers['denoised']" in result.stdout
    missing = tmp_path / "missing.h5"
    result = subprocess.run(
        [exe, "denoise", str(missing), str(missing), "-o", str(tmp_path / "o.h5ad")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"scar-jax: error: {missing}: no such file or directory"]
