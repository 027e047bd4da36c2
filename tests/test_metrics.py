"""Tests of the denoising metrics (``scar_jax.metrics``) on hand-made matrices with hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

from scar_jax.metrics import denoising_metrics, pd_factorize, pearson, pseudobulk_l1

# 2 cells x 3 genes
RAW = np.array([[3, 0, 2], [1, 4, 0]])
NATIVE = np.array([[2, 0, 1], [1, 3, 0]])
DENOISED = np.array([[2, 1, 1], [0, 3, 0]])

# 3 cells x 2 genes, cell types t, u, t
PB_RAW = np.array([[2, 1], [0, 3], [4, 0]])
PB_NATIVE = np.array([[1, 1], [0, 2], [3, 0]])
PB_DENOISED = np.array([[1, 0], [1, 2], [3, 1]])
PB_GROUPS = np.array(["t", "u", "t"])


def expected_metrics() -> dict[str, float]:
    # |raw - native|: [[1, 0, 1], [0, 1, 0]] -> 3;  |denoised - native|: [[0, 1, 0], [1, 0, 0]] -> 2
    # sum raw 10, sum native 7, sum denoised 7 -> ambient 3, removed (10 - 7) / 3 = 1
    # min(denoised, native): [[2, 0, 1], [0, 3, 0]] -> 6 of 7;  denoised > raw only at (0, 1): 1 of 6
    return {
        "l1_raw": 3.0,
        "l1_denoised": 2.0,
        "l1_improvement": 1.0 - 2.0 / 3.0,
        "ambient_removed": 3.0 / 3.0,
        # min(raw - denoised, raw - native) clipped at 0: [[1, 0, 1], [0, 1, 0]] -> 3 of 3
        "ambient_removed_entrywise": 3.0 / 3.0,
        "native_retained": 6.0 / 7.0,
        "above_raw": 1.0 / 6.0,
        "new_nonzeros": 1.0 / 6.0,  # raw 0 but denoised 1 at (0, 1)
    }


def test_denoising_metrics_hand_values():
    got = denoising_metrics(RAW, DENOISED, NATIVE)
    # per-cell Pearson r: cell 0 [2, 1, 1] vs [2, 0, 1]: 1 / sqrt(6/9 * 2) = sqrt(3) / 2;
    # cell 1 [0, 3, 0] vs [1, 3, 0]: 5 / sqrt(6 * 42/9) = 5 / sqrt(28)
    assert got.pop("cell_correlation") == pytest.approx((np.sqrt(3) / 2 + 5 / np.sqrt(28)) / 2, rel=1e-12)
    assert got == expected_metrics()  # exact: the same float64 operations on small integers
    assert all(type(v) is float for v in got.values())


def test_denoising_metrics_perfect_and_identity():
    perfect = denoising_metrics(RAW, NATIVE, NATIVE)
    assert perfect["l1_denoised"] == 0.0
    assert perfect["l1_improvement"] == 1.0
    assert perfect["ambient_removed"] == 1.0
    assert perfect["native_retained"] == 1.0
    assert perfect["above_raw"] == 0.0
    assert perfect["cell_correlation"] == pytest.approx(1.0, rel=1e-12)
    nothing = denoising_metrics(RAW, RAW, NATIVE)  # doing nothing
    assert nothing["l1_improvement"] == 0.0
    assert nothing["ambient_removed"] == 0.0
    assert nothing["native_retained"] == 1.0


def test_denoising_metrics_no_contamination_is_nan():
    got = denoising_metrics(NATIVE, DENOISED, NATIVE)  # raw == native: l1_raw = 0, ambient = 0
    assert got["l1_raw"] == 0.0
    assert got["l1_denoised"] == 2.0
    assert math.isnan(got["l1_improvement"])
    assert math.isnan(got["ambient_removed"])
    assert got["native_retained"] == 6.0 / 7.0
    assert got["above_raw"] == 1.0 / 6.0  # denoised > raw (= native) only at (0, 1): 1 > 0


@pytest.mark.parametrize("fmt", [sp.csr_matrix, sp.csc_matrix, sp.csr_array, sp.coo_matrix])
def test_denoising_metrics_sparse_equals_dense(fmt):
    rng = np.random.default_rng(0)
    native = rng.poisson(2.0, (20, 15))
    raw = native + rng.poisson(0.5, (20, 15))
    denoised = np.maximum(raw - rng.poisson(0.4, (20, 15)), 0)
    dense = denoising_metrics(raw, denoised, native)
    assert denoising_metrics(fmt(raw), fmt(denoised), fmt(native)) == dense
    assert denoising_metrics(fmt(raw), denoised, fmt(native)) == dense  # mixed
    groups = rng.choice(["a", "b", "c"], 20)
    assert pseudobulk_l1(fmt(raw), fmt(denoised), fmt(native), groups) == pseudobulk_l1(raw, denoised, native, groups)


@pytest.mark.parametrize(
    ("raw", "denoised", "native"),
    [
        (RAW, DENOISED[:, :2], NATIVE),
        (RAW, DENOISED, NATIVE[:1]),
        (RAW.T, DENOISED, NATIVE),
        (RAW[:, :1], DENOISED, NATIVE),  # (2, 1) would broadcast against (2, 3)
    ],
)
def test_denoising_metrics_shape_mismatch(raw, denoised, native):
    with pytest.raises(ValueError, match="shapes differ"):
        denoising_metrics(raw, denoised, native)


def test_pseudobulk_hand_values():
    # group t (cells 0, 2): raw [6, 1], native [4, 1], denoised [4, 1]
    # group u (cell 1):     raw [0, 3], native [0, 2], denoised [1, 2]
    # l1_raw = 2 + 0 + 0 + 1 = 3;  l1_denoised = 0 + 0 + 1 + 0 = 1
    got = pseudobulk_l1(PB_RAW, PB_DENOISED, PB_NATIVE, PB_GROUPS)
    assert got == {"l1_raw": 3.0, "l1_denoised": 1.0, "l1_improvement": 1.0 - 1.0 / 3.0}
    # the per-cell L1 is worse (3): summing a group cancels errors of opposite sign
    assert denoising_metrics(PB_RAW, PB_DENOISED, PB_NATIVE)["l1_denoised"] == 3.0


def test_pseudobulk_group_labels_only_matter_as_partition():
    base = pseudobulk_l1(PB_RAW, PB_DENOISED, PB_NATIVE, PB_GROUPS)
    assert pseudobulk_l1(PB_RAW, PB_DENOISED, PB_NATIVE, np.array([10, 2, 10])) == base
    assert pseudobulk_l1(PB_RAW, PB_DENOISED, PB_NATIVE, ["z", "a", "z"]) == base
    # one group: sums [6, 4] raw, [4, 3] native, [5, 3] denoised -> l1 3 and 1
    one = pseudobulk_l1(PB_RAW, PB_DENOISED, PB_NATIVE, np.zeros(3))
    assert one == {"l1_raw": 3.0, "l1_denoised": 1.0, "l1_improvement": 1.0 - 1.0 / 3.0}
    # every cell its own group: equals the per-cell L1 (3 raw, 3 denoised)
    own = pseudobulk_l1(PB_RAW, PB_DENOISED, PB_NATIVE, np.arange(3))
    assert own == {"l1_raw": 3.0, "l1_denoised": 3.0, "l1_improvement": 0.0}


def test_pseudobulk_group_length_mismatch_raises():
    with pytest.raises(ValueError):
        pseudobulk_l1(PB_RAW, PB_DENOISED, PB_NATIVE, PB_GROUPS[:2])
    with pytest.raises(ValueError):
        pseudobulk_l1(PB_RAW[:2], PB_DENOISED[:2], PB_NATIVE[:2], PB_GROUPS)


def test_pseudobulk_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        pseudobulk_l1(PB_RAW, PB_DENOISED[:, :1], PB_NATIVE, PB_GROUPS)


def test_pseudobulk_no_contamination_is_nan():
    got = pseudobulk_l1(PB_NATIVE, PB_DENOISED, PB_NATIVE, PB_GROUPS)
    assert got["l1_raw"] == 0.0
    assert math.isnan(got["l1_improvement"])  # as denoising_metrics does


def test_pd_factorize():
    codes, uniques = pd_factorize(np.array(["b", "a", "b", "c"]))
    np.testing.assert_array_equal(uniques, ["a", "b", "c"])
    np.testing.assert_array_equal(codes, [1, 0, 1, 2])
    np.testing.assert_array_equal(uniques[codes], ["b", "a", "b", "c"])


def test_pearson_against_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=50)
    b = 0.6 * a + rng.normal(size=50)
    expected = scipy.stats.pearsonr(a, b).statistic
    assert pearson(a, b) == pytest.approx(expected, rel=1e-12)
    # float32 input and 2-d input are raveled and computed in float64
    assert pearson(a.astype(np.float32).reshape(5, 10), b.reshape(10, 5)) == pytest.approx(
        scipy.stats.pearsonr(a.astype(np.float32).astype(np.float64), b).statistic, rel=1e-12
    )
    assert type(pearson(a, b)) is float


def test_pearson_hand_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0, abs=1e-15)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-15)
    # x = [1, 2, 3, 4], y = [1, 3, 2, 4]: sum dx dy = 4, sum dx^2 = sum dy^2 = 5 -> r = 4 / 5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # zero variance


def test_oracle_share_is_the_true_posterior_of_the_simulation():
    from scar_jax.datasets import simulate
    from scar_jax.metrics import oracle_native_share, oracle_split

    adata = simulate(n_cells=400, n_genes=30, n_batches=2, seed=1)
    share = oracle_native_share(adata)
    assert share.shape == adata.shape and share.min() >= 0 and share.max() <= 1
    # genes the cell's type does not express are pure ambient: share 0
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    off = adata.varm["true_native_profile"][:, codes].T == 0
    assert (share[off] == 0).all()
    # given x, native ~ Binomial(x, share) exactly, and the split is an independent draw of the same law:
    # their totals differ by 0 on average with variance 2 sum x share (1 - share); allow 4 sd
    x = adata.X.toarray()
    split = oracle_split(adata, seed=0)
    assert (split <= x).all()
    sd = np.sqrt(2 * (x * share * (1 - share)).sum())
    assert abs(split.sum() - adata.layers["native"].sum()) < 4 * sd
