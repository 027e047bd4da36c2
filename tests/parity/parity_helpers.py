"""Cases and helpers of the scvi-tools parity suite (no torch or scvi import here)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import numpy as np

HAVE_SCVI = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("scvi") is not None
REPORT: dict[tuple[str, str], float] = {}  # (case, quantity) -> measured relative error


@dataclasses.dataclass(frozen=True)
class Case:
    gene_likelihood: str
    latent_distribution: str
    scale_activation: str
    n_layers: int = 2
    dropout_rate: float = 0.0
    batches: bool = False  # two batches, batch_key="batch", counts in layers["counts"]

    @property
    def name(self) -> str:
        extra = f"-L{self.n_layers}" + ("-drop" if self.dropout_rate else "") + ("-batch-layer" if self.batches else "")
        return f"{self.gene_likelihood}-{self.latent_distribution}-{self.scale_activation}{extra}"


# Every likelihood, latent distribution and scale activation at least once; 1 to 3 hidden layers.
CASES = (
    Case("b", "normal", "softplus_sp"),
    Case("poisson", "ln", "softplus", n_layers=1),
    Case("nb", "normal", "softmax", dropout_rate=0.1, batches=True),
    Case("zinb", "ln", "softplus_sp", n_layers=3),
    Case("b", "ln", "softmax", n_layers=1),
    Case("zinb", "normal", "softplus"),
)
N_CELLS, N_GENES, N_HIDDEN, N_LATENT, EPOCHS = 200, 50, 32, 6, 3


def rel_err(ours: Any, ref: Any) -> float:
    """``max |ours - ref| / max |ref|`` (error relative to the quantity's magnitude), in float64."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def rel_err_elementwise(ours: Any, ref: Any) -> float:
    """``max_i |ours_i - ref_i| / |ref_i|``: for per-cell scalars (losses, KL)."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def record(case: str, quantity: str, value: float) -> float:
    REPORT[(case, quantity)] = max(value, REPORT.get((case, quantity), 0.0))
    return value


def make_adata(case: Case, seed: int = 0):
    from scar_jax.datasets import simulate

    adata = simulate(n_cells=N_CELLS, n_genes=N_GENES, n_batches=2 if case.batches else 1, seed=seed)
    if case.batches:
        adata.layers["counts"] = adata.X.copy()
        adata.X = adata.X.log1p()  # X is not the counts: the setup's layer must be used
        adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
    return adata


def setup_args(case: Case) -> dict[str, Any]:
    return {"layer": "counts", "batch_key": "batch"} if case.batches else {}


def hyperparameters(case: Case) -> dict[str, Any]:
    return {
        "n_hidden": N_HIDDEN,
        "n_latent": N_LATENT,
        "n_layers": case.n_layers,
        "dropout_rate": case.dropout_rate,
        "gene_likelihood": case.gene_likelihood,
        "latent_distribution": case.latent_distribution,
        "scale_activation": case.scale_activation,
        "sparsity": 0.9,
    }


def counts(adata, case: Case) -> np.ndarray:
    x = adata.layers["counts"] if case.batches else adata.X
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float32)
