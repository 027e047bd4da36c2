"""Every numeric argument of every public method has a range, checked at the API boundary (issue 22).

Table-driven: the public surface (``SCAR``'s public methods and constructor, ``pl.knee_plot``, ``train``'s
``plan_kwargs`` and trainer keywords) is read from the signatures, each numeric parameter must have a
:class:`scar_jax.arguments.Range`, and values just outside each range (and NaN, infinity, wrong types) must
give an error naming the parameter. The range check runs before the method does anything, so most rows need
no data; the rows at the end call a real model to show the errors come from the public calls.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest

from scar_jax import SCAR, arguments, pl
from scar_jax.datasets import simulate

NUMERIC = re.compile(r"\b(int|float)\b")


def public_methods() -> list[str]:
    names = [n for n in dir(SCAR) if not n.startswith("_") and callable(getattr(SCAR, n))]
    return ["__init__", *sorted(names)]


def numeric_parameters() -> list[tuple[str, str]]:
    """``(method, parameter)`` of every parameter annotated with ``int`` or ``float``."""
    found = []
    for method in public_methods():
        function = inspect.unwrap(getattr(SCAR, method))
        for parameter in inspect.signature(function).parameters.values():
            if NUMERIC.search(str(parameter.annotation)):
                found.append((method, parameter.name))
    function = inspect.unwrap(pl.knee_plot)
    found += [
        ("knee_plot", p.name)
        for p in inspect.signature(function).parameters.values()
        if NUMERIC.search(str(p.annotation))
    ]
    return found


PARAMETERS = numeric_parameters()
RANGED = [(m, n) for m, n in PARAMETERS if (m, n) not in arguments.NOT_RANGES]


def test_the_public_surface_is_found():
    methods = {m for m, _ in PARAMETERS}
    assert {"__init__", "train", "get_denoised_counts", "get_ambient_profile", "differential_expression"} <= methods
    assert len(RANGED) > 60, len(RANGED)


@pytest.mark.parametrize(("method", "name"), PARAMETERS, ids=[f"{m}-{n}" for m, n in PARAMETERS])
def test_every_numeric_parameter_has_a_range(method, name):
    assert (method, name) in arguments.NOT_RANGES or arguments.argument_range(method, name) is not None, (
        f"{method}({name}=...) is numeric but has no Range in scar_jax.arguments.ARGUMENTS"
    )


def bad_values(r: arguments.Range) -> list[tuple[object, type[Exception]]]:
    """Values just outside ``r`` (and of the wrong type), with the exception each must raise."""
    out: list[tuple[object, type[Exception]]] = [("3", TypeError), (True, TypeError)]
    step = 1 if r.kind == "int" else 0.5
    if r.low is not None:
        out.append((r.low if r.open_low else r.low - step, ValueError))
    if r.high is not None:
        out.append((r.high if r.open_high else r.high + step, ValueError))
    if r.kind == "float":
        out += [(math.nan, ValueError), (math.inf if r.high is None else -math.inf, ValueError)]
    else:
        out.append((2.5, ValueError))
    if not r.none:
        out.append((None, TypeError))
    if r.each:
        out = [([0.5, v], e) for v, e in out if v is not None and not isinstance(v, str)] + [(0.5, TypeError)]
    return out


CASES = [
    (method, name, value, exc)
    for method, name in RANGED
    for value, exc in bad_values(arguments.argument_range(method, name))
]


def call(method: str, name: str, value: object) -> None:
    """Call ``method`` with ``name=value``; other required arguments are placeholders (the check comes first)."""
    if method == "knee_plot":
        pl.knee_plot(object(), **{name: value})
        return
    function = inspect.unwrap(getattr(SCAR, method))
    required = [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ("self", "cls", name)
    ]
    placeholders = {p: object() for p in required}
    if method == "__init__":
        SCAR(**placeholders, **{name: value})
    elif isinstance(inspect.getattr_static(SCAR, method), staticmethod | classmethod):
        getattr(SCAR, method)(**placeholders, **{name: value})
    else:
        getattr(SCAR.__new__(SCAR), method)(**placeholders, **{name: value})


@pytest.mark.parametrize(("method", "name", "value", "exc"), CASES, ids=[f"{m}-{n}={v!r}" for m, n, v, _ in CASES])
def test_values_outside_the_range_are_refused_naming_the_argument(method, name, value, exc):
    with pytest.raises(exc, match=rf"{re.escape(name)} must be .*got"):
        call(method, name, value)


def test_values_inside_the_range_pass_the_check():
    for method, name in RANGED:
        r = arguments.argument_range(method, name)
        good = 1 if r.kind == "int" else (0.5 if r.high is not None else 2.0)
        if r.low is not None and r.kind == "int":
            good = max(good, int(r.low))
        value = [good] if r.each else good
        assert r.check(value, name) == value, (method, name)


PLAN_CASES = [(k, v, e) for k, r in arguments.PLAN_RANGES.items() for v, e in bad_values(r) if v is not None]
TRAINER_CASES = [
    (k, v, e) for k, r in arguments.TRAINER_RANGES.items() if r is not None for v, e in bad_values(r) if v is not None
]


@pytest.mark.parametrize(("key", "value", "exc"), PLAN_CASES, ids=[f"{k}={v!r}" for k, v, _ in PLAN_CASES])
def test_plan_kwargs_out_of_range_are_refused(key, value, exc):
    with pytest.raises(exc, match=rf"plan_kwargs\['{key}'\] must be"):
        arguments.plan_options({key: value})


@pytest.mark.parametrize(("key", "value", "exc"), TRAINER_CASES, ids=[f"{k}={v!r}" for k, v, _ in TRAINER_CASES])
def test_trainer_keywords_out_of_range_are_refused(key, value, exc):
    with pytest.raises(exc, match=rf"{key} must be"):
        arguments.trainer_options({key: value})


def test_error_messages_say_the_range_and_how_to_choose():
    with pytest.raises(ValueError) as info:
        arguments.plan_options({"lr": -1e-3})
    assert str(info.value) == (
        "train(): plan_kwargs['lr'] must be a finite number > 0, got -0.001; the Adam learning rate (default 1e-3); "
        "a negative one would ascend the loss"
    )
    with pytest.raises(
        ValueError, match=r"get_ambient_profile\(\): prob must be .*a finite number in \[0, 1\).*got 1\.0"
    ):
        SCAR.get_ambient_profile(None, None, prob=1.0)
    with pytest.raises(TypeError, match=r"cred_interval_lvls must be a list of numbers each in \(0, 1\)"):
        call("differential_expression", "cred_interval_lvls", 0.9)


# ---------------------------------------------------------------------------------------------- on a real model
@pytest.fixture(scope="module")
def model() -> SCAR:
    adata = simulate(n_cells=60, n_genes=12, n_batches=2, seed=3)
    SCAR.setup_anndata(adata, batch_key="batch")
    model = SCAR(adata, n_hidden=8, n_latent=2, n_layers=1)
    model.is_trained = True  # the checks come before any computation: no training needed to reach them
    return model


REAL = [
    ("train", dict(max_epochs=1, plan_kwargs={"lr": -1e-3}), ValueError, r"plan_kwargs\['lr'\] must be .* > 0"),
    ("train", dict(max_epochs=1, plan_kwargs={"weight_decay": -1.0}), ValueError, "weight_decay"),
    ("train", dict(max_epochs=1, plan_kwargs={"eps": 0.0}), ValueError, "eps"),
    ("train", dict(max_epochs=1, plan_kwargs={"max_kl_weight": np.nan}), ValueError, "max_kl_weight"),
    ("train", dict(max_epochs=1, plan_kwargs={"n_epochs_kl_warmup": -5}), ValueError, "n_epochs_kl_warmup"),
    ("train", dict(max_epochs=2.5), ValueError, "max_epochs"),
    ("train", dict(max_epochs=1, train_size=0.0), ValueError, "train_size"),
    ("train", dict(max_epochs=1, validation_size=1.0), ValueError, "validation_size"),
    ("train", dict(max_epochs=1, early_stopping_patience=0), ValueError, "early_stopping_patience"),
    ("train", dict(max_epochs=1, check_val_every_n_epoch=0), ValueError, "check_val_every_n_epoch"),
    ("get_denoised_counts", dict(n_neighbours=0), ValueError, "n_neighbours"),
    ("get_denoised_counts", dict(expressed_prior_odds=-1.0), ValueError, "expressed_prior_odds"),
    ("get_latent_representation", dict(mc_samples=0), ValueError, "mc_samples"),
    ("get_marginal_ll", dict(n_mc_samples=0), ValueError, "n_mc_samples"),
    ("get_normalized_expression", dict(library_size=-1.0), ValueError, "library_size"),
    ("get_elbo", dict(batch_size=0), ValueError, "batch_size"),
    ("assign_features", dict(cutoff=-1.0), ValueError, "cutoff"),
    ("differential_expression", dict(groupby="batch", fdr_target=1.5), ValueError, "fdr_target"),
]


@pytest.mark.parametrize(("method", "kwargs", "exc", "match"), REAL, ids=[f"{m}-{sorted(k)}" for m, k, *_ in REAL])
def test_errors_from_the_public_calls(model, method, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(model, method)(**kwargs)


def test_scar_constructor_and_ambient_profile_on_real_data(model):
    with pytest.raises(ValueError, match=r"SCAR\(\): n_hidden must be an integer >= 1"):
        SCAR(model.adata, n_hidden=0)
    with pytest.raises(ValueError, match=r"SCAR\(\): dropout_rate must be a finite number in \[0, 1\)"):
        SCAR(model.adata, dropout_rate=float("nan"))
    with pytest.raises(ValueError, match="min_raw_counts"):
        SCAR.get_ambient_profile(model.adata, model.adata, min_raw_counts=-1)
    with pytest.raises(ValueError, match="iterations"):
        pl.knee_plot(model.adata, iterations=0)
