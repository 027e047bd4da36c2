"""The notebooks run top to bottom (small sizes) and reach their documented results."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, env: dict[str, str], tmp_path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def last_output_text(nb: nbformat.NotebookNode) -> str:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs)


@pytest.mark.slow
def test_quickstart_notebook_runs_and_recovers_the_truth(tmp_path):
    small = {"SCAR_NB_CELLS": "1000", "SCAR_NB_GENES": "200", "SCAR_NB_EPOCHS": "200"}
    nb = run_notebook("quickstart.ipynb", small, tmp_path)
    final = nb.cells[-1].outputs[-1]["data"]["text/plain"]
    result = eval(final, {})  # a dict literal of floats
    assert result["pearson"] > 0.85, result  # measured 0.943
    assert result["pseudobulk_l1_improvement"] > 0.6, result  # measured 0.769
    assert "saved and reloaded: identical latent space" in last_output_text(nb)
