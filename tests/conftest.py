"""Shared pytest configuration: strict JAX hygiene for every test, and hypothesis profiles."""

import os

import jax
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

# Property tests (tests/test_properties.py): "ci" (the default) is derandomized, so every run draws the
# same examples and a failure reproduces; "thorough" searches afresh with 20x the examples. Choose with
# `pytest --hypothesis-profile=thorough` or HYPOTHESIS_PROFILE=thorough.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=1200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# With `pytest -n 2 --dist loadfile` (README, CI) whole files go to the two workers in collection order, so the
# longest files (measured on the 2-core CI machine, 2026-12-03) are collected first and the short ones fill the
# gaps at the end: the longest-first rule for scheduling. Plain `pytest` is unaffected but for the order.
LONGEST_FILES_FIRST = (
    "test_notebooks.py",
    "test_model.py",
    "test_real_pbmc.py",
    "test_posterior.py",
    "test_cli.py",
    "test_train.py",
    "test_validation.py",
    "test_features.py",
    "test_calibration.py",
    "test_parity.py",
    "test_resume.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
