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
