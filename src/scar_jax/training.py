"""``SCAR.train``'s orchestration: check scvi-tools' arguments, pick the devices and split, call
:func:`scar_jax.fit.fit_model`, keep the result on the model (``model``: a :class:`scar_jax.SCAR`, not imported).

The arguments and what each does are listed in docs/compat.md.
"""

from __future__ import annotations

from typing import Any

from . import arguments as _arguments
from . import distributed as _distributed
from . import fit as _fit
from . import persist as _persist
from . import train as _train
from .train import positive_int as _positive_int


def train_model(
    model,
    max_epochs,
    accelerator,
    devices,
    sizes: dict,
    shuffle_set_split,
    batch_size,
    early_stopping,
    plan: dict,
    trainer: dict,
    options: _arguments.TrainerOptions,
    checkpoint_dir,
    checkpoint_every,
) -> None:
    """Train ``model`` in place; ``sizes``: ``train_size``, ``validation_size`` (and the datasplitter keywords);
    ``plan`` and ``trainer``: checked by :func:`scar_jax.arguments.plan_options` and ``trainer_options``
    (``options``)."""
    batch_size = _positive_int(batch_size, "batch_size")
    n_obs = model.adata.n_obs
    epochs = _positive_int(_train.max_epochs_heuristic(n_obs) if max_epochs is None else max_epochs, "max_epochs")
    single = checkpoint_dir is not None or trainer.get("block_cells") is not None
    chosen = _distributed.training_devices(accelerator, devices, batch_size, single)
    split = _train.split_indices(
        n_obs, sizes["train_size"], sizes["validation_size"], shuffle_set_split, batch_size, model.seed
    )
    checkpoint = None if checkpoint_dir is None else _persist.checkpoint(model, checkpoint_dir, checkpoint_every)
    run: dict[str, Any] = {"max_epochs": epochs, "batch_size": batch_size, "plan": plan, "trainer": trainer}
    try:
        result = _fit.fit_model(
            model.config,
            model._read_cells(model.adata),
            model.variables,
            model._train_key,
            model.ambient_profile,
            chosen,
            split,
            **run,
            options=options,
            early_stopping=early_stopping,
            checkpoint=checkpoint,
        )
    except _fit.TrainingDiverged as err:
        if err.rows:  # keep the last good epoch's parameters
            model._trained(err.state, err.rows, err.split)
        raise
    model._trained(result.state, result.rows, result.split)
    model.training_time_s = result.training_time_s
    model._calibration_cache = None  # for the earlier parameters (the key would not match; frees the memory)
