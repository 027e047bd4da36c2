"""A training run killed mid-way (SIGKILL, in a subprocess) resumes from its checkpoint to the very
parameters of an uninterrupted run with the same seed.

Three processes run the same script, one after the other: an uninterrupted reference, a run that is
killed once its first checkpoint exists (its epochs are slowed by a sleep so that the kill lands early,
without changing any number), and a run that resumes from the killed run's ``checkpoint_dir``. The full
train state (parameters, batch-norm statistics, optimizer state, step) and the per-epoch losses must be
bitwise equal. The processes share a persistent compilation cache in ``tmp_path``, so only the reference
compiles (the three would otherwise spend most of the time compiling the same code).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

MAX_EPOCHS = 30
CHECKPOINT_EVERY = 2

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax, numpy as np
    import scar_jax.fit as fit_module
    from scar_jax import SCAR
    from scar_jax.datasets import simulate

    mode, checkpoint_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    schedule, epochs_run = fit_module.kl_weight_schedule, []

    def counted_schedule(epoch, *args, **kwargs):  # fit() calls it once at the start of every epoch
        epochs_run.append(epoch)
        if mode == "killed":
            time.sleep(0.25)  # slow epochs: the kill lands between checkpoints, long before the end
        return schedule(epoch, *args, **kwargs)

    fit_module.kl_weight_schedule = counted_schedule
    adata = simulate(n_cells=150, n_genes=25, n_batches=2, seed=11)
    SCAR.setup_anndata(adata, batch_key="batch")
    model = SCAR(adata, n_hidden=16, n_latent=3, seed=7)
    model.train(
        max_epochs=int(sys.argv[4]),
        batch_size=32,
        enable_progress_bar=False,
        checkpoint_dir=None if mode == "reference" else checkpoint_dir,
        checkpoint_every=int(sys.argv[5]),
    )
    state = model._state
    leaves = jax.tree.leaves(state.replace(key=jax.random.key_data(state.key)))
    np.savez(out + ".npz", *[np.asarray(leaf) for leaf in leaves])
    losses = [row["train_loss_epoch"] for row in model.history_rows]
    with open(out + ".json", "w") as f:
        json.dump({"epochs_run": epochs_run, "losses": losses}, f)
    """
)


def start(script: Path, mode: str, checkpoint_dir: Path, out: Path) -> subprocess.Popen:
    args = [sys.executable, str(script), mode, str(checkpoint_dir), str(out), str(MAX_EPOCHS), str(CHECKPOINT_EVERY)]
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(script.parent / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen, timeout: float = 240) -> None:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    assert process.returncode == 0, f"training subprocess failed ({process.returncode}):\n{err[-3000:]}"


def checkpointed_epochs(checkpoint_dir: Path) -> int:
    """Epochs recorded in the checkpoint's manifest (0 while there is no complete checkpoint)."""
    try:
        return len(json.loads((checkpoint_dir / "manifest.json").read_text())["history"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def load(out: Path) -> tuple[list[np.ndarray], dict]:
    with np.load(f"{out}.npz") as npz:
        leaves = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return leaves, json.loads(Path(f"{out}.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_killed_run_resumes_to_the_uninterrupted_parameters(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    checkpoint_dir = tmp_path / "checkpoint"
    finish(start(script, "reference", tmp_path / "unused", tmp_path / "reference"))
    killed = start(script, "killed", checkpoint_dir, tmp_path / "killed")
    deadline = time.monotonic() + 240
    while checkpointed_epochs(checkpoint_dir) == 0:  # poll until the first checkpoint is complete
        if killed.poll() is not None or time.monotonic() > deadline:
            killed.kill()
            pytest.fail(f"no checkpoint appeared (return code {killed.returncode}):\n{killed.communicate()[1][-3000:]}")
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    done = checkpointed_epochs(checkpoint_dir)
    assert CHECKPOINT_EVERY <= done < MAX_EPOCHS and done % CHECKPOINT_EVERY == 0  # killed mid-way
    assert not Path(f"{tmp_path / 'killed'}.npz").exists()

    resumed = start(script, "resumed", checkpoint_dir, tmp_path / "resumed")
    finish(resumed)
    want, want_log = load(tmp_path / "reference")
    got, got_log = load(tmp_path / "resumed")
    assert got_log["epochs_run"] == list(range(done, MAX_EPOCHS))  # resumed, not restarted
    assert want_log["epochs_run"] == list(range(MAX_EPOCHS))
    assert got_log["losses"] == want_log["losses"]  # the history too, epoch by epoch, exactly
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)  # bitwise: parameters, batch statistics, optimizer state, step
    assert checkpointed_epochs(checkpoint_dir) == MAX_EPOCHS  # the final checkpoint


def test_a_save_killed_between_its_two_renames_is_restored(tmp_path):
    """Replacing a save renames the old directory aside, then the new one in; a kill in between leaves
    no directory at the target: the next read (``has_model``, ``load``) puts the previous version back."""
    from scar_jax import io

    target = tmp_path / "checkpoint"
    io.write_model_dir(target, {"history": [1, 2]}, b"state of epoch 2")
    target.rename(tmp_path / ".checkpoint.old-4242")  # the first rename of the next save ...
    (tmp_path / ".checkpoint.tmp-x1y2").mkdir()  # ... whose new version was still being written
    (tmp_path / ".checkpoint.tmp-x1y2" / "state.msgpack").write_bytes(b"state of ep")
    assert io.has_model(target)
    manifest, state, _ = io.read_model_dir(target)
    assert manifest["history"] == [1, 2] and state == b"state of epoch 2"
    assert not (tmp_path / ".checkpoint.old-4242").exists()
    io.write_model_dir(target, {"history": [1, 2, 3, 4]}, b"state of epoch 4", overwrite=True)  # saving goes on
    assert io.read_model_dir(target)[0]["history"] == [1, 2, 3, 4]
    assert not io.has_model(tmp_path / "other")  # nothing to restore: still no model
