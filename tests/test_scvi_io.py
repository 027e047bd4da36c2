"""scvi-tools interchange without PyTorch: the errors raised when PyTorch or scvi-tools is missing (the parity
suite in tests/parity needs both; the weight mapping: test_scvi_format)."""

import subprocess
import sys

import pytest

from scar_jax import SCAR, scvi_io
from scar_jax.datasets import simulate


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ModuleNotFoundError


def test_reading_scvi_tools_saves_without_torch_says_which_extra(no_torch, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    for call in (
        lambda: scvi_io.read_scvi_tools_save(tmp_path),
        lambda: scvi_io.from_scvi_tools(SCAR, tmp_path),
        lambda: scvi_io.convert_legacy_save(SCAR, tmp_path, tmp_path / "out", adata=object()),
    ):
        with pytest.raises(ModuleNotFoundError, match=r"needs PyTorch: pip install 'scar-jax\[torch\]'") as info:
            call()
        assert isinstance(info.value, scvi_io.TorchNotInstalledError) and info.value.name == "torch"


@pytest.mark.parametrize("missing", ["torch", "scvi"])
def test_writing_scvi_tools_saves_without_scvi_says_which_extra(missing, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, missing, None)
    adata = simulate(n_cells=20, n_genes=10, seed=0)
    SCAR.setup_anndata(adata)
    model = SCAR(adata, n_hidden=4, n_latent=2)
    with pytest.raises(ImportError, match=r"pip install 'scar-jax\[parity\]'"):
        scvi_io.export_scvi_tools(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_importing_the_module_does_not_import_torch():
    code = "import sys, scar_jax.scvi_io, scar_jax.scvi_format, scar_jax.model; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
