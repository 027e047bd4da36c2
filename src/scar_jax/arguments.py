"""Argument checking at the API boundary: numeric ranges of every public ``SCAR`` method, and Lightning's
trainer keywords (what each one does in scar-jax).

Every numeric argument of every public method of :class:`scar_jax.SCAR` has a :class:`Range` in
:data:`ARGUMENTS` (by parameter name; :data:`METHOD_ARGUMENTS` where one method differs), checked before
the method runs by the wrapper :func:`validate_methods` installs, so a bad value gives a ``ValueError``
(``TypeError`` for a value that is not a number) naming the method, the argument, the range and the
default. ``tests/test_argument_ranges.py`` checks that the table covers every numeric parameter.

``train``'s ``plan_kwargs`` and trainer keywords are checked by :func:`plan_options` and
:func:`trainer_options`; ``docs/compat.md`` lists what each trainer keyword does here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
    """An allowed range: ``kind`` ``"int"`` or ``"float"``, bounds (``None``: unbounded; ``open_low`` /
    ``open_high``: the bound itself is excluded), ``none``: ``None`` allowed, ``also``: other allowed
    values (e.g. ``"latent"``), ``each``: a list or tuple whose every element is in the range, ``hint``: how
    to choose a value (appended to the error)."""

    kind: str = "float"
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    none: bool = False
    also: tuple[Any, ...] = ()
    each: bool = False
    hint: str = ""

    def describe(self) -> str:
        what = "an integer" if self.kind == "int" else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            where = f"in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        elif self.low is not None:
            where = f"{'>' if self.open_low else '>='} {_fmt(self.low)}"
        elif self.high is not None:
            where = f"{'<' if self.open_high else '<='} {_fmt(self.high)}"
        else:
            where = ""
        extra = [repr(v) for v in self.also] + (["None"] if self.none else [])
        text = " ".join(filter(None, [what, where]))
        text = f"a list of numbers each {text.removeprefix('a finite number ')}" if self.each else text
        return text + (f" (or {', '.join(extra)})" if extra else "")

    def check(self, value: Any, name: str, where: str = "") -> Any:
        """``value`` (``int`` / ``float``) if allowed, else ``ValueError`` / ``TypeError`` naming ``name``."""
        if value is None and self.none:
            return None
        if any(value is v or (isinstance(value, str) and value == v) for v in self.also):
            return value
        prefix = f"{where}: " if where else ""
        message = f"{prefix}{name} must be {self.describe()}, got {value!r}" + (f"; {self.hint}" if self.hint else "")
        if self.each:
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise TypeError(message)
            element = dataclasses.replace(self, each=False, none=False, also=())
            for item in value:
                try:
                    element.check(item, name)
                except (TypeError, ValueError) as err:
                    raise type(err)(message) from None
            return value
        wanted = numbers.Integral if self.kind == "int" else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            if self.kind == "int" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                raise ValueError(message)  # 2.5 epochs: a value error, the type is close enough
            raise TypeError(message)
        number = int(value) if self.kind == "int" else float(value)
        if self.kind == "float" and not math.isfinite(number):
            raise ValueError(message)
        if self.low is not None and (number < self.low or (self.open_low and number == self.low)):
            raise ValueError(message)
        if self.high is not None and (number > self.high or (self.open_high and number == self.high)):
            raise ValueError(message)
        return number


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def positive(kind: str = "int", hint: str = "", none: bool = False) -> Range:
    """``>= 1`` for integers, ``> 0`` for floats."""
    if kind == "int":
        return Range("int", 1, none=none, hint=hint)
    return Range("float", 0.0, open_low=True, none=none, hint=hint)


def fraction(open_low: bool = False, open_high: bool = False, none: bool = False, hint: str = "") -> Range:
    """A number in ``[0, 1]`` (each end excluded with ``open_low`` / ``open_high``)."""
    return Range("float", 0.0, 1.0, open_low, open_high, none, hint=hint)


SEED = Range("int", 0, hint="any non-negative integer")
BATCH_SIZE = positive(none=True, hint="cells per minibatch (default 1024 for inference, 128 for training)")

# numeric parameters of SCAR's public methods, by name (the same meaning wherever the name appears)
ARGUMENTS: dict[str, Range] = {
    # model
    "n_hidden": positive(hint="hidden units per layer (default 150)"),
    "n_latent": positive(hint="latent dimensions (default 15)"),
    "n_layers": positive(hint="hidden layers (default 2)"),
    "dropout_rate": fraction(open_high=True, hint="default 0.0"),
    "sparsity": fraction(hint="default 0.9 (1 for sgRNA, tag and CMO)"),
    "seed": SEED,
    # training
    "max_epochs": positive(none=True, hint="None: scvi-tools' heuristic min(round(20000 / n_cells * 400), 400)"),
    "train_size": fraction(open_low=True, none=True, hint="share of the cells trained on (default 0.9)"),
    "validation_size": fraction(open_high=True, none=True, hint="default: the cells not trained on"),
    "batch_size": BATCH_SIZE,
    "checkpoint_every": positive(hint="epochs between checkpoints (default 10)"),
    # ambient profile
    "prob": fraction(
        open_high=True,
        none=True,
        hint="default None: the barcode-rank rule; scvi-tools' rule with a number (its default 0.995; 0: all)",
    ),
    "min_raw_counts": Range("int", 0, hint="droplets with fewer counts are not scored (default 2)"),
    "iterations": positive(hint="default 3"),
    "n_batch": positive(hint="row chunks of the raw matrix (default 1)"),
    "sample": positive(none=True, hint="droplets scored (default 50000; None: all)"),
    # inference
    "mc_samples": positive(hint="Monte Carlo draws (default 5000)"),
    "n_mc_samples": positive(hint="importance samples per cell"),
    "n_mc_samples_per_pass": positive(hint="importance samples per pass (default 250)"),
    "n_samples": positive(hint="posterior draws (default 1)"),
    "n_samples_overall": positive(none=True, hint="cells drawn in all"),
    "max_cells": positive(hint="default 1024"),
    "library_size": Range("float", 0.0, open_low=True, also=("latent",), hint="default 1 (frequencies)"),
    "rna_size_factor": positive("float", hint="default 1000"),
    "n_neighbours": positive(hint="cells per latent neighbourhood (default 50)"),
    "expressed_prior_odds": positive("float", hint="the removal/retention knob (default 0.1)"),
    "block_cells": positive(hint="cells per block"),
    # differential expression and abundance
    "delta": Range("float", 0.0, none=True, hint="the effect size of mode='change' (default 0.25; None: estimated)"),
    "fdr_target": fraction(open_low=True, hint="default 0.05"),
    "cred_interval_lvls": Range("float", 0.0, 1.0, True, True, none=True, each=True, hint="e.g. [0.5, 0.9]"),
    "pseudocounts": Range("float", 0.0, none=True, hint="default None (chosen from the data)"),
    "num_cells_posterior": positive(none=True, hint="cells per sample (default: all)"),
    "dof": positive("float", none=True, hint="Student-t degrees of freedom (None: Normal)"),
    # feature barcodes
    "cutoff": Range("float", 0.0, hint="Bayes factor threshold (default 3)"),
    "moi": positive(none=True, hint="features per cell at most (None: the original scAR's rule)"),
}

# where a method's parameter has another range than its name's default
METHOD_ARGUMENTS: dict[tuple[str, str], Range] = {
    ("train", "batch_size"): positive(hint="cells per minibatch (default 128)"),
    ("differential_abundance", "batch_size"): positive(hint="default 128"),
    ("get_feature_correlation_matrix", "batch_size"): positive(hint="default 64"),
    ("get_importance_weights", "n_mc_samples"): positive(hint="default 500"),
    ("get_marginal_ll", "n_mc_samples"): positive(hint="default 1000"),
    ("write_denoised_counts", "block_cells"): positive(hint="cells per block (default 65536)"),
    ("get_denoised_counts", "n_samples"): positive(hint="draws of z (default 1)"),
}

# annotated with int or float but not a range: checked where used, with their own message
NOT_RANGES: dict[tuple[str, str], str] = {
    ("train", "devices"): "'auto', a count or a list of indices: checked by distributed.select_devices",
    ("to_device", "device"): "a jax.Device, a platform name or an index: checked by distributed.select_device",
    ("get_ambient_profile", "prior_counts"): "'auto' or a number >= 0: checked by ambient.estimate_ambient_profile",
}


def refuse_dataloader(dataloader: Any) -> None:
    """scvi-tools' ``dataloader`` argument: accepted as ``None`` only (a ``ValueError`` naming the fix)."""
    if dataloader is not None:
        raise ValueError("dataloader is not supported; pass adata and indices")


def argument_range(method: str, name: str) -> Range | None:
    """The :class:`Range` of parameter ``name`` of ``method``, or ``None`` when it is not a number."""
    return METHOD_ARGUMENTS.get((method, name), ARGUMENTS.get(name))


def _checked(method_name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(function)
    ranges = {
        name: r
        for name in signature.parameters
        if (method_name, name) not in NOT_RANGES and (r := argument_range(method_name, name)) is not None
    }
    if not ranges:
        return function
    label = "SCAR()" if method_name == "__init__" else f"{method_name}()"

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return function(*args, **kwargs)  # Python's own message for a wrong call
        for name, value in bound.arguments.items():
            if name in ranges:
                ranges[name].check(value, name, label)
        return function(*args, **kwargs)

    return wrapper


def checked(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: the numeric arguments of a public function (e.g. of :mod:`scar_jax.pl`) checked by name."""
    return _checked(function.__name__, function)


def validate_methods(cls: type) -> type:
    """Wrap the public methods of ``cls`` (and ``__init__``) so that their numeric arguments are checked."""
    for name, raw in list(vars(cls).items()):
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(raw, staticmethod | classmethod):
            wrapped = _checked(name, raw.__func__)
            if wrapped is not raw.__func__:
                setattr(cls, name, type(raw)(wrapped))
        elif inspect.isfunction(raw):
            wrapped = _checked(name, raw)
            if wrapped is not raw:
                setattr(cls, name, wrapped)
    return cls


# ---------------------------------------------------------------------------------------------- train()
PLAN_RANGES: dict[str, Range] = {
    "lr": positive("float", hint="the Adam learning rate (default 1e-3); a negative one would ascend the loss"),
    "weight_decay": Range("float", 0.0, hint="L2 penalty (default 1e-6)"),
    "eps": positive("float", hint="Adam's eps (default 0.01)"),
    "n_epochs_kl_warmup": Range("int", 0, none=True, hint="epochs of KL warm-up (default 400; 0 or None: none)"),
    "max_kl_weight": Range("float", 0.0, hint="default 1"),
    "min_kl_weight": Range("float", 0.0, hint="default 0"),
}


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """Checked ``plan_kwargs`` of ``train`` (scvi-tools' ``TrainingPlan`` arguments SCAR uses)."""

    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = 400
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0


def plan_options(plan: dict[str, Any]) -> PlanOptions:
    """``plan_kwargs`` checked: unknown keys ``TypeError``, values out of range ``ValueError``."""
    unknown = set(plan) - set(PLAN_RANGES) - {"optimizer"}
    if unknown:
        supported = sorted([*PLAN_RANGES, "optimizer"])
        raise TypeError(f"train(): unsupported plan_kwargs {sorted(unknown)}; supported: {supported}")
    if str(plan.get("optimizer", "Adam")) != "Adam":
        raise ValueError("plan_kwargs['optimizer'] must be 'Adam' (the only optimizer scvi-tools SCAR uses)")
    values = {
        key: PLAN_RANGES[key].check(value, f"plan_kwargs[{key!r}]", "train()")
        for key, value in plan.items()
        if key != "optimizer"
    }
    return PlanOptions(**values)


# Lightning Trainer keywords scar-jax honours (train() reads them), with their ranges where numeric
TRAINER_RANGES: dict[str, Range | None] = {
    "early_stopping_monitor": None,
    "early_stopping_patience": positive(hint="checks without improvement before stopping (default 45)"),
    "early_stopping_min_delta": Range("float", 0.0, hint="default 0"),
    "enable_progress_bar": None,
    "check_val_every_n_epoch": positive(hint="epochs between validation passes (default 1)"),
    "gradient_clip_val": Range("float", 0.0, none=True, hint="0 or None: no clipping (default)"),
    "gradient_clip_algorithm": None,
    "max_steps": Range("int", -1, none=True, hint="optimizer steps at most; -1 or None: no limit (default)"),
    "precision": None,
    "scan_unroll": positive(hint="optimizer steps per iteration of the compiled epoch's loop (default 1)"),
    "block_cells": positive(none=True, hint="rows per streamed block (default None)"),
}

# accepted for compatibility with one warning naming them: nothing to do in scar-jax
NO_EFFECT_TRAINER_KWARGS: dict[str, str] = {
    "logger": "metrics are in model.history; there is no Lightning logger",
    "enable_checkpointing": "use checkpoint_dir= to save training checkpoints",
    "log_every_n_steps": "metrics are logged once per epoch",
    "enable_model_summary": "there is no Lightning model summary",
    "num_sanity_val_steps": "there is no sanity validation pass",
    "default_root_dir": "nothing is written unless checkpoint_dir= is given",
    "deterministic": "training is deterministic for a seed already",
    "benchmark": "there is no cuDNN autotuner to set",
    "simple_progress_bar": "the progress bar is tqdm's",
    "profiler": "use jax.profiler to profile",
    "detect_anomaly": "training stops with FloatingPointError at a NaN or infinite loss already",
    "inference_mode": "there is no autograd mode to set",
}

# Lightning's precision -> scar-jax's matmul_precision (None: the model's own setting)
PRECISIONS: dict[Any, str] = {
    32: "float32",
    "32": "float32",
    "32-true": "float32",
    "bf16": "bfloat16",
    "bf16-mixed": "bfloat16",
}
REFUSED_PRECISIONS: dict[Any, str] = {
    16: "there is no float16 option",
    "16": "there is no float16 option",
    "16-mixed": "there is no float16 option",
    "16-true": "parameters are kept in float32",
    "bf16-true": "parameters are kept in float32",
    64: "training runs in float32",
    "64": "training runs in float32",
    "64-true": "training runs in float32",
}


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """Checked trainer keywords of ``train`` (``docs/compat.md``: what each Lightning keyword does here)."""

    early_stopping_monitor: str = "elbo_validation"
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    enable_progress_bar: bool = True
    check_val_every_n_epoch: int = 1
    gradient_clip: tuple[float, str] | None = None
    max_steps: int | None = None
    matmul_precision: str | None = None
    scan_unroll: int = 1
    block_cells: int | None = None


def trainer_options(trainer: dict[str, Any]) -> TrainerOptions:
    """Trainer keywords checked and mapped; those without effect in scar-jax are warned about once.

    Unknown keywords: ``TypeError`` listing the supported ones. Values out of range: ``ValueError``.
    """
    unknown = set(trainer) - set(TRAINER_RANGES) - set(NO_EFFECT_TRAINER_KWARGS)
    if unknown:
        raise TypeError(
            f"train(): unsupported trainer keywords {sorted(unknown)}; supported: {sorted(TRAINER_RANGES)}, "
            f"accepted without effect: {sorted(NO_EFFECT_TRAINER_KWARGS)} (docs/compat.md)"
        )
    ignored = sorted(set(trainer) & set(NO_EFFECT_TRAINER_KWARGS))
    if ignored:
        reasons = "; ".join(f"{k}: {NO_EFFECT_TRAINER_KWARGS[k]}" for k in ignored)
        warnings.warn(f"train(): trainer keywords {ignored} have no effect in scar-jax ({reasons})", stacklevel=4)
    values = {
        key: rng.check(trainer[key], key, "train()")
        for key, rng in TRAINER_RANGES.items()
        if rng is not None and key in trainer
    }
    monitor = trainer.get("early_stopping_monitor", "elbo_validation")
    if not isinstance(monitor, str):
        raise TypeError(f"train(): early_stopping_monitor must be a metric name (str), got {monitor!r}")
    clip = values.get("gradient_clip_val")
    algorithm = trainer.get("gradient_clip_algorithm", "norm")
    if algorithm not in ("norm", "value", None):
        raise ValueError(f"train(): gradient_clip_algorithm must be 'norm' (default) or 'value', got {algorithm!r}")
    max_steps = values.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ValueError(f"train(): max_steps must be >= 1, or -1 / None for no limit, got {max_steps!r}")
    precision = trainer.get("precision")
    matmul_precision = None
    if precision is not None:
        integer = isinstance(precision, numbers.Integral) and not isinstance(precision, bool)
        key = int(precision) if integer else precision
        if key in REFUSED_PRECISIONS:
            raise ValueError(
                f"train(): precision={precision!r} is not supported: {REFUSED_PRECISIONS[key]} in scar-jax. Use "
                "precision='bf16-mixed' (bfloat16 Dense-layer inputs, float32 accumulation, on GPUs) or '32-true'; "
                "SCAR(..., matmul_precision='tensorfloat32') gives TF32"
            )
        if key not in PRECISIONS:
            raise ValueError(
                f"train(): precision must be one of {sorted(map(str, PRECISIONS))} (Lightning's names), "
                f"got {precision!r}"
            )
        matmul_precision = PRECISIONS[key]
    return TrainerOptions(
        early_stopping_monitor=monitor,
        early_stopping_patience=values.get("early_stopping_patience", 45),
        early_stopping_min_delta=values.get("early_stopping_min_delta", 0.0),
        enable_progress_bar=bool(trainer.get("enable_progress_bar", True)),
        check_val_every_n_epoch=values.get("check_val_every_n_epoch", 1),
        gradient_clip=None if not clip else (float(clip), algorithm or "norm"),
        max_steps=None if max_steps in (None, -1) else int(max_steps),
        matmul_precision=matmul_precision,
        scan_unroll=values.get("scan_unroll", 1),
        block_cells=values.get("block_cells"),
    )
