"""The calibration's memory contract (:func:`scar_jax.calibration.memory_needed`) and its pre-flight check."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scar_jax import calibration


def test_memory_needed_is_a_formula_of_sizes_linear_in_cells_and_bounded_by_a_block() -> None:
    """Sizes only (no array of the declared shape is made): linear in the cells and stored counts; the block
    term grows with ``block_entries``, not with the cells; the dense share only with ``share_at="all"``."""
    one = calibration.memory_needed(10**6, 2000, 535 * 10**6)
    two = calibration.memory_needed(2 * 10**6, 2000, 2 * 535 * 10**6)
    constant = calibration.memory_needed(0, 2000, 0)
    assert two - constant == pytest.approx(2 * (one - constant), rel=1e-9)
    terms = calibration.memory_terms(10**6, 2000, 535 * 10**6, block_entries=1 << 20)
    smaller = calibration.memory_terms(10**6, 2000, 535 * 10**6, block_entries=1 << 10)
    assert terms["blocks of stored entries"] > smaller["blocks of stored entries"] > 0
    assert (
        terms["blocks of stored entries"]
        == calibration.memory_terms(10, 2000, 5350, block_entries=1 << 20)["blocks of stored entries"]
    )
    assert terms["dense share"] == 0
    assert calibration.memory_terms(10**6, 2000, 535 * 10**6, share_at="all")["dense share"] >= 10**6 * 2000 * 8
    # the share shares the counts' indices (4 bytes a count); the denoised counts own theirs, int64 past 2^31
    assert terms["result"] == 4 * 535 * 10**6
    assert calibration.memory_terms(10**6, 2000, 535 * 10**6, ambient_gaps=True)["result"] == 9 * 535 * 10**6
    small, large = (calibration.memory_terms(10**7, 2000, nnz)["denoised counts"] for nnz in (2**31 - 1, 2**31))
    assert large - small == 4 * 2**31 + 8


def test_a_calibration_that_cannot_fit_is_a_clear_error_before_any_allocation() -> None:
    """A billion cells against this machine's memory, and a tiny ``available``: a ValueError naming the largest
    part and the fix; nothing is allocated (only sizes are passed)."""
    needed = calibration.memory_needed(10**9, 2000, 535 * 10**9)
    terms = calibration.memory_terms(10**9, 2000, 535 * 10**9)
    with pytest.raises(
        ValueError,
        match=r"needs about .* GiB beyond the counts .* the largest part is the denoised counts ",
    ):
        calibration.check_memory(needed, terms=terms)
    with pytest.raises(ValueError, match=r"a smaller block_entries"):
        calibration.check_memory(10**9, 10**6, terms={"blocks of stored entries": 10**9})
    calibration.check_memory(10**6, 10**9)  # fits: silent
    available = calibration.available_memory()
    assert available is None or available > 0


def test_calibrate_checks_memory_before_it_allocates(monkeypatch) -> None:
    """``calibrate`` checks first: with a monkeypatched small available memory it raises before the
    neighbour search (which would allocate the ``(n, 2k)`` candidates) is ever called."""

    def never(*args, **kwargs):
        raise AssertionError("the neighbour search ran before the memory check")

    monkeypatch.setattr(calibration.memory, "available_memory", lambda: 10**6)
    monkeypatch.setattr(calibration, "count_checked_neighbours", never)
    x = sp.random(50, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    with pytest.raises(ValueError, match=r"this process can use 0.00 GiB.*method='split'"):
        calibration.calibrate(x, np.zeros((50, 3)), np.full(20, 0.05), n_neighbours=5, share_at="observed")
