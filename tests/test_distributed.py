"""Multi-process data parallel training on JAX's own engine: two local CPU processes joined by
``jax.distributed`` (a coordinator on a free localhost port, gloo CPU collectives) train one model.

Each process opens the same ``.h5ad`` with its counts on disk (:func:`scar_jax.backed.read_backed`) and, during
training, reads only its own rows (recorded). The parameters must end identical (bitwise) on both processes
and equal those of a one-process run (in the test's own process) within float32 all-reduce rounding: the
global batch order is the same, only the order of the float32 sums across the processes differs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from scar_jax import SCAR, distributed, train
from scar_jax.backed import BackedCounts, read_backed
from scar_jax.counts import to_device
from scar_jax.datasets import simulate

N_CELLS = 200
# 180 training cells in 5 minibatches of 36 (no partial minibatch: one step to compile), 3 epochs
TRAIN = {"max_epochs": 3, "batch_size": 36, "enable_progress_bar": False}
MODEL = {"n_hidden": 16, "n_latent": 4, "n_layers": 1, "seed": 2}  # small: less to compile

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax

    process_id, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

    import numpy as np
    from scar_jax import SCAR
    from scar_jax.backed import BackedCounts, read_backed

    adata = read_backed(path)
    SCAR.setup_anndata(adata)
    model = SCAR(adata, **json.loads(sys.argv[5]))
    read, getitem = [], BackedCounts.__getitem__

    def recorded(self, rows):  # the rows of the file that training reads
        span = (rows.start, rows.stop) if isinstance(rows, slice) else (int(np.min(rows)), int(np.max(rows)) + 1)
        read.append(span)
        return getitem(self, rows)

    BackedCounts.__getitem__ = recorded
    model.train(**json.loads(sys.argv[6]))
    BackedCounts.__getitem__ = getitem
    np.savez(out + ".npz", *[np.asarray(leaf) for leaf in jax.tree.leaves(model.variables)])
    history = {name: frame.to_numpy().ravel().tolist() for name, frame in model.history.items()}
    summary = {"read": read, "history": history, "devices": len(jax.devices()), "processes": jax.process_count()}
    with open(out + ".json", "w") as f:
        json.dump(summary, f)
    jax.distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    adata = simulate(n_cells=N_CELLS, n_genes=30, seed=1)
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(X=sp.csr_matrix(adata.X), obs=adata.obs[[]], var=adata.var[[]]).write_h5ad(path)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(path), str(tmp_path / f"p{i}")]
            + [json.dumps(MODEL), json.dumps(TRAIN)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]

    # meanwhile, the one-process reference: the same file, in memory, on one device
    reference = anndata.read_h5ad(path)
    SCAR.setup_anndata(reference)
    model = SCAR(reference, **MODEL)
    model.train(**TRAIN)
    want = [np.asarray(leaf) for leaf in jax.tree.leaves(model.variables)]

    errors = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            _, err = process.communicate()
        errors.append(err)
    assert [p.returncode for p in processes] == [0, 0], "\n".join(e[-3000:] for e in errors)

    results = []
    for i in range(2):
        with np.load(tmp_path / f"p{i}.npz") as npz:
            leaves = [npz[f"arr_{k}"] for k in range(len(npz.files))]
        results.append((leaves, json.loads((tmp_path / f"p{i}.json").read_text())))
    (got0, out0), (got1, out1) = results
    assert out0["processes"] == out1["processes"] == 2 and out0["devices"] == out1["devices"] == 2
    # each process read only its own half of the rows while training
    assert out0["read"] and all(0 <= a < b <= N_CELLS // 2 for a, b in out0["read"]), out0["read"]
    assert out1["read"] and all(N_CELLS // 2 <= a < b <= N_CELLS for a, b in out1["read"]), out1["read"]
    assert len(got0) == len(got1) == len(want)
    for a, b in zip(got0, got1, strict=True):
        np.testing.assert_array_equal(a, b)  # identical on every process
    for a, b in zip(got0, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)  # float32 all-reduce rounding
    assert out0["history"] == out1["history"]
    for name in ("elbo_train", "elbo_validation"):
        np.testing.assert_allclose(out0["history"][name], model.history[name].to_numpy().ravel(), rtol=1e-5)


def test_row_bounds_and_process_devices():
    assert distributed.row_bounds(7, 3) == (0, 2, 4, 7)
    assert distributed.row_bounds(4, 4) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="cannot be shared among 3 devices"):
        distributed.row_bounds(2, 3)
    cpus = jax.devices("cpu")
    assert distributed.process_devices("cpu") == cpus[:1]
    assert distributed.process_devices("cpu", -1) == cpus
    with pytest.raises(ValueError, match="not a list of indices"):
        distributed.process_devices("cpu", [0])
    with pytest.raises(ValueError, match="pass a number from 1 to"):
        distributed.process_devices("cpu", len(cpus) + 1)


@pytest.mark.parametrize("layout", ["csr", "dense", "backed"])
def test_sharded_minibatches_equal_resident_ones(tmp_path, layout):
    """The minibatch a ShardedCellData gathers (here on a one-device mesh) is the resident one, exactly."""
    adata = simulate(n_cells=50, n_genes=12, n_batches=2, seed=4)
    x = sp.csr_matrix(adata.X)
    if layout == "backed":
        path = tmp_path / "cells.h5ad"
        anndata.AnnData(X=x, obs=adata.obs[[]], var=adata.var[[]]).write_h5ad(path)
        host = BackedCounts(read_backed(path).X)  # rows read from disk
    else:
        host = x if layout == "csr" else x.toarray()
    library = np.asarray(x.sum(axis=1), np.float32)
    batch_index = adata.obs["batch"].cat.codes.to_numpy().astype(np.int32)
    mesh = train.data_parallel_mesh(tuple(jax.devices()[:1]))
    sharded = distributed.shard_cells(host, library, batch_index, float(x.max()), mesh)
    resident = train.CellData(to_device(x), jnp.asarray(library), jnp.asarray(batch_index))
    rows = jnp.asarray([49, 0, 7, 7, 31, 12], jnp.int32)
    got, want = jax.jit(lambda d: d.batch(rows))(sharded), resident.batch(rows)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_put_and_one_replica_on_one_process():
    tree = {"w": np.arange(3.0), "key": jax.random.key(1)}
    device = jax.devices()[0]
    placed = distributed.put(tree, device)
    assert placed["w"].devices() == {device}
    back = distributed.one_replica(placed, device)
    np.testing.assert_array_equal(np.asarray(back["w"]), tree["w"])
    np.testing.assert_array_equal(jax.random.key_data(back["key"]), jax.random.key_data(tree["key"]))
