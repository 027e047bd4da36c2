"""``scar-jax denoise`` keeps the trained model: a run killed (SIGKILL) while denoising is resumed with
``--resume`` from the model saved in ``--model-dir``, without training again, and writes the very file of
an uninterrupted run with the same seed.

Three subprocesses, one after the other: the uninterrupted reference (``python -m scar_jax.cli``), a run
whose denoising step blocks (a wrapper makes ``data.calibrate_model`` write a marker file and sleep, then calls
the same ``cli.main``) and is killed by the test once the marker exists, and ``--resume``. They share a
persistent compilation cache in ``tmp_path`` so that only the reference compiles.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from scar_jax import cli
from scar_jax.datasets import raw_droplets, simulate, simulate_empty_droplets

EPOCHS = 4

BLOCKED_DENOISING = textwrap.dedent(
    """
    import sys, time
    import scar_jax.data as data
    from scar_jax import cli

    marker = sys.argv[1]

    def blocked(*args, **kwargs):  # the denoising step of `scar-jax denoise` (method 'calibrated')
        open(marker, "w").close()
        time.sleep(600)

    data.calibrate_model = blocked
    sys.exit(cli.main(sys.argv[2:]))
    """
)


def _inputs(folder: Path) -> tuple[Path, Path]:
    adata = simulate(n_cells=120, n_genes=20, seed=3)
    empty = simulate_empty_droplets(adata, n_droplets=400, seed=4)
    filtered, raw = folder / "filtered.h5ad", folder / "raw.h5ad"
    anndata.AnnData(X=sp.csr_matrix(adata.X), obs=adata.obs[[]], var=adata.var[[]]).write_h5ad(filtered)
    raw_droplets(adata, empty).write_h5ad(raw)
    return filtered, raw


def _start(args: list[str], folder: Path, name: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(folder / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    out, err = open(folder / f"{name}.out", "w"), open(folder / f"{name}.err", "w")  # noqa: SIM115
    with out, err:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, env=env)


def _finish(process: subprocess.Popen, folder: Path, name: str) -> tuple[str, str]:
    try:
        process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    out, err = (folder / f"{name}.out").read_text(), (folder / f"{name}.err").read_text()
    assert process.returncode == 0, f"{name} failed ({process.returncode}):\n{err[-3000:]}"
    return out, err


def _files(model_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(model_dir.iterdir())}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_denoise_killed_while_denoising_resumes_without_training(tmp_path, capsys):
    filtered, raw = _inputs(tmp_path)
    common = [str(filtered), str(raw), "--prob", "0.05", "--epochs", str(EPOCHS), "--batch-size", "32", "--seed", "5"]
    reference = tmp_path / "reference.h5ad"
    ref_run = _start(["-m", "scar_jax.cli", "denoise", *common, "-o", str(reference)], tmp_path, "reference")
    _finish(ref_run, tmp_path, "reference")
    assert (tmp_path / "reference.model" / "manifest.json").is_file()  # the default --model-dir

    output, model_dir, marker = tmp_path / "out.h5ad", tmp_path / "saved", tmp_path / "denoising"
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED_DENOISING)
    argv = ["denoise", *common, "-o", str(output), "--model-dir", str(model_dir)]
    killed = _start([str(script), str(marker), *argv], tmp_path, "killed")
    deadline = time.monotonic() + 240
    while not marker.exists():  # denoising has begun: training is over
        if killed.poll() is not None or time.monotonic() > deadline:
            killed.kill()
            killed.wait()
            err = (tmp_path / "killed.err").read_text()[-3000:]
            pytest.fail(f"denoising never began ({killed.returncode}):\n{err}")
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not output.exists()
    killed_out, killed_err = (tmp_path / "killed.out").read_text(), (tmp_path / "killed.err").read_text()
    assert f"trained {EPOCHS} epochs" in killed_out and "Training" in killed_err  # it trained (progress bar)
    saved = _files(model_dir)
    assert set(saved) == {"manifest.json", "state.msgpack"}

    # without --resume (or --overwrite) the saved model is not replaced
    rc = cli.main([*argv, "--quiet"])
    assert rc == 1 and not output.exists() and _files(model_dir) == saved
    assert "holds a saved model; pass --resume" in capsys.readouterr().err

    resumed = _start(["-m", "scar_jax.cli", *argv, "--resume"], tmp_path, "resumed")
    out, err = _finish(resumed, tmp_path, "resumed")
    assert f"resumed the trained model from {model_dir} ({EPOCHS} epochs): no training" in out
    assert "epochs on" not in out and "Training" not in err  # no epoch ran (no progress bar either)
    assert _files(model_dir) == saved  # not written again: same bytes, same modification times

    want, got = anndata.read_h5ad(reference), anndata.read_h5ad(output)
    assert got.obs_names.equals(want.obs_names) and got.var_names.equals(want.var_names)
    for name in ("X", "denoised"):
        a = got.X if name == "X" else got.layers[name]
        b = want.X if name == "X" else want.layers[name]
        assert (a != b).nnz == 0, name
    np.testing.assert_array_equal(got.obs["noise_ratio"].to_numpy(), want.obs["noise_ratio"].to_numpy())
    np.testing.assert_array_equal(got.obsm["X_scAR"], want.obsm["X_scAR"])
    np.testing.assert_array_equal(got.varm["ambient_profile"], want.varm["ambient_profile"])
    assert dict(got.uns["scar_jax"]) == dict(want.uns["scar_jax"])

    # a saved model of another ambient profile, or trained longer than asked, is refused, not resumed
    rc = cli.main([*argv, "--resume", "--overwrite", "--prob", "0.2", "--quiet"])
    assert rc == 1 and _files(model_dir) == saved
    assert "was trained with another ambient profile" in capsys.readouterr().err
    rc = cli.main([*argv, "--resume", "--overwrite", "--epochs", str(EPOCHS - 1), "--quiet"])
    assert rc == 1 and _files(model_dir) == saved
    assert f"was trained {EPOCHS} epochs, more than the {EPOCHS - 1} asked for" in capsys.readouterr().err


def test_model_dir_that_is_not_a_model_is_never_touched(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine\n")
    argv = ["denoise", "f.h5ad", "r.h5ad", "-o", str(tmp_path / "o.h5ad"), "--model-dir", str(folder), "--overwrite"]
    assert cli.main([*argv, "--resume"]) == 1
    assert "is not a scar-jax model" in capsys.readouterr().err
    assert (folder / "keep.txt").read_text() == "mine\n"
