"""Tests of the ``scar-jax`` command line (``scar_jax.cli``).

The demo trains a default-size model, so it runs only twice here (once quiet, once verbose with
``--output``); the printed numbers are checked against a re-computation from the written file.
"""

from __future__ import annotations

import contextlib
import io
import re

import anndata
import numpy as np
import pytest

from scar_jax import cli
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


def test_top_level_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


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
    assert "usage: scar-jax" in captured.err


def test_invalid_likelihood_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--likelihood", "gaussian"])
    assert "invalid choice: 'gaussian'" in capsys.readouterr().err


def test_parser_defaults():
    args = cli.build_parser().parse_args(["demo"])
    assert (args.n_cells, args.n_genes, args.noise_ratio, args.likelihood) == (5000, 1000, 0.15, "b")
    assert (args.epochs, args.batch_size, args.seed, args.output, args.quiet) == (None, 128, 0, None, False)
