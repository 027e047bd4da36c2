"""Differential-expression core: hand-computed statistics, FDR, group resolution, tables, simulations."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scar_jax import de

# ------------------------------------------------------------------------------------- hand-computed
S1 = np.array([[1, 2, 3], [2, 2, 1], [3, 1, 4], [4, 5, 2]], dtype=np.float32)
S2 = np.array([[2, 1, 3], [1, 3, 1], [1, 1, 5], [2, 6, 1]], dtype=np.float32)

# log2 fold changes per sample (rows) and gene (columns); scales are powers of two
LFC = np.array([[1, -1, 0], [2, -2, 1], [0, 1, -1], [1, -1, 0]], dtype=np.float64)
EXPO = np.array([[0, 1, 2], [1, 0, 3], [2, 2, 1], [3, 1, 0]], dtype=np.float64)
C1 = (2.0**EXPO).astype(np.float32)
C2 = (2.0 ** (EXPO - LFC)).astype(np.float32)


def bf(p):
    return math.log(p + 1e-8) - math.log(1 - p + 1e-8)


def test_vanilla_hand_computed():
    res = de.de_statistics(S1, S2, mode="vanilla")
    assert list(res) == ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
    np.testing.assert_array_equal(res["proba_m1"], [0.75, 0.25, 0.25])  # ties (1 vs 1, 3 vs 3) are not ">"
    np.testing.assert_array_equal(res["proba_m2"], [0.25, 0.75, 0.75])
    np.testing.assert_allclose(res["bayes_factor"], [bf(0.75), bf(0.25), bf(0.25)], rtol=1e-12)
    np.testing.assert_allclose(res["scale1"], [2.5, 2.5, 2.5])
    np.testing.assert_allclose(res["scale2"], [1.5, 2.75, 2.5])


def test_change_hand_computed_three_and_two():
    res = de.de_statistics(C1, C2, mode="change", delta=0.9, pseudocounts=0.0)
    assert list(res) == list(de.CHANGE_COLUMNS)
    # gene0: lfc 1,2,0,1 -> 3 up; gene1: -1,-2,1,-1 -> 1 up, 3 down; gene2: 0,1,-1,0 -> 1 up, 1 down
    np.testing.assert_array_equal(res["proba_de"], [0.75, 0.75, 0.25])
    np.testing.assert_array_equal(res["proba_not_de"], [0.25, 0.25, 0.75])
    np.testing.assert_allclose(res["bayes_factor"], [bf(0.75), bf(0.75), bf(0.25)], rtol=1e-12)
    np.testing.assert_allclose(res["lfc_mean"], [1.0, -0.75, 0.0], atol=1e-6)
    np.testing.assert_allclose(res["lfc_median"], [1.0, -1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(res["lfc_std"], [math.sqrt(0.5), math.sqrt(1.1875), math.sqrt(0.5)], rtol=1e-5)
    np.testing.assert_allclose(res["lfc_min"], [0.0, -2.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(res["lfc_max"], [2.0, 1.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(res["pseudocounts"], [0.0] * 3)
    np.testing.assert_array_equal(res["delta"], [0.9] * 3)
    np.testing.assert_allclose(res["scale1"], C1.mean(0), rtol=1e-6)
    np.testing.assert_allclose(res["scale2"], C2.mean(0), rtol=1e-6)

    two = de.de_statistics(C1, C2, mode="change", delta=0.9, pseudocounts=0.0, test_mode="two")
    np.testing.assert_array_equal(two["proba_de"], [0.75, 1.0, 0.5])
    np.testing.assert_allclose(two["bayes_factor"][1], bf(1.0), rtol=1e-12)


def test_change_boundaries_and_pseudocounts():
    # lfc >= delta counts as up, lfc == -delta does not count as down (scvi-tools' strict "<")
    s1 = np.array([[2.0], [1.0], [1.0], [1.0]], np.float32)
    s2 = np.array([[1.0], [2.0], [1.0], [1.0]], np.float32)
    res = de.de_statistics(s1, s2, mode="change", delta=1.0, pseudocounts=0.0)
    assert res["proba_de"][0] == pytest.approx(0.25)

    rng = np.random.default_rng(0)
    a = rng.uniform(0.01, 1, (50, 4)).astype(np.float32)
    b = rng.uniform(0.01, 1, (50, 4)).astype(np.float32)
    pc, delta = 0.3, 0.4
    res = de.de_statistics(a, b, mode="change", delta=delta, pseudocounts=pc, chunk_size=3)  # padded chunks
    lfc = np.log2(a + pc) - np.log2(b + pc)
    expected = np.maximum((lfc >= delta).mean(0), (lfc < -delta).mean(0))
    np.testing.assert_allclose(res["proba_de"], expected)
    small = np.log2(a + pc * 1e-3) - np.log2(b + pc * 1e-3)  # summaries use 1e-3 * pseudocounts
    np.testing.assert_allclose(res["lfc_mean"], small.mean(0), rtol=1e-5)
    np.testing.assert_allclose(res["lfc_median"], np.median(small, 0), rtol=1e-5)
    np.testing.assert_allclose(res["lfc_std"], small.std(0), rtol=1e-4)
    np.testing.assert_allclose(res["lfc_max"], small.max(0), rtol=1e-5)


def test_default_pseudocounts_and_estimate():
    a = np.full((5, 4), 0.25, np.float32)
    res = de.de_statistics(a, a, mode="change")
    assert res["pseudocounts"][0] == pytest.approx(1e-10)  # no non-expressed gene: scvi's floor
    scale1 = np.array([[0.1, 0.5, 0.2, 0.2], [0.3, 0.1, 0.4, 0.2]])
    scale2 = np.array([[0.2, 0.2, 0.4, 0.2], [0.1, 0.5, 0.3, 0.1]])
    z1 = np.array([True, True, False, False])
    z2 = np.array([False, False, True, False])
    # group 1: quantile_0.9 of max scales (0.3, 0.5) = 0.48; group 2: max 0.4 -> 0.48 / 4 genes
    assert de.estimate_pseudocounts_offset(scale1, scale2, z1, z2) == pytest.approx(0.12)
    res = de.de_statistics(scale1, scale2, mode="change", where_zero1=z1, where_zero2=z2)
    assert res["pseudocounts"][0] == pytest.approx(0.12)
    assert de.zero_expression_mask(np.array([[0, 1], [0, 3]]), 0.01).tolist() == [True, False]


def test_credible_intervals():
    samples = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    np.testing.assert_array_equal(de.credible_intervals(samples, 0.6), [0.0, 3.0])  # widths 3 and 9
    rng = np.random.default_rng(1)
    a = rng.lognormal(0, 1, (200, 5)).astype(np.float32)
    b = rng.lognormal(0, 1, (200, 5)).astype(np.float32)
    res = de.de_statistics(a, b, mode="change", pseudocounts=0.0, cred_interval_lvls=[0.5, 0.9])
    lfc = np.log2(a) - np.log2(b)
    for level in (0.5, 0.9):
        ci = de.credible_intervals(lfc, level)
        np.testing.assert_allclose(res[f"lfc_confidence_interval_{level}_min"], ci[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res[f"lfc_confidence_interval_{level}_max"], ci[:, 1], rtol=1e-4, atol=1e-5)


def test_swap_symmetry():
    rng = np.random.default_rng(2)
    a = rng.lognormal(0, 0.5, (300, 6)).astype(np.float32)
    b = rng.lognormal(0.2, 0.5, (300, 6)).astype(np.float32)
    v, vs = de.de_statistics(a, b), de.de_statistics(b, a)
    np.testing.assert_allclose(vs["bayes_factor"], -v["bayes_factor"], atol=1e-6)  # no ties in continuous samples
    c = de.de_statistics(a, b, mode="change", pseudocounts=1e-4)
    cs = de.de_statistics(b, a, mode="change", pseudocounts=1e-4)
    np.testing.assert_allclose(cs["lfc_mean"], -c["lfc_mean"], atol=1e-5)
    np.testing.assert_allclose(cs["lfc_median"], -c["lfc_median"], atol=1e-5)
    np.testing.assert_allclose(cs["lfc_min"], -c["lfc_max"], atol=1e-5)


def test_input_errors():
    with pytest.raises(ValueError, match="n_samples, n_genes"):
        de.de_statistics(S1, S2[:3])
    with pytest.raises(ValueError, match="mode"):
        de.de_statistics(S1, S2, mode="bogus")
    with pytest.raises(ValueError, match="test_mode"):
        de.de_statistics(S1, S2, mode="change", test_mode="four")
    with pytest.raises(ValueError, match="level"):
        de.de_statistics(S1, S2, mode="change", cred_interval_lvls=[1.0])


def test_estimate_delta():
    rng = np.random.default_rng(3)
    means = np.concatenate([rng.normal(-2, 0.1, 50), rng.normal(0, 0.1, 400), rng.normal(2, 0.1, 50)])
    assert de.estimate_delta(means) == pytest.approx(1.2, abs=0.05)
    assert de.estimate_delta(rng.normal(0, 0.01, 100)) == pytest.approx(0.1)  # floored at min_thres
    res = de.de_statistics(S1, S2, mode="change", delta=None, pseudocounts=0.0)
    assert res["delta"][0] >= 0.1


# ---------------------------------------------------------------------------------------------- FDR
def test_fdr_hand_computed():
    p = np.array([0.5, 0.99, 0.1, 0.9, 0.98, 0.7])
    # sorted 0.99, 0.98, 0.9, 0.7, 0.5, 0.1 -> expected FDR 0.01, 0.015, 0.0433, 0.1075, 0.186, 0.305
    assert de.fdr_flags(p, 0.05).tolist() == [False, True, False, True, True, False]
    assert de.fdr_flags(p, 0.2).tolist() == [True, True, False, True, True, True]
    assert not de.fdr_flags(p, 0.001).any()
    assert de.fdr_flags(p, 1.0).all()
    assert de.fdr_flags(np.array([]), 0.05).shape == (0,)
    with pytest.raises(ValueError):
        de.fdr_flags(np.ones((2, 2)))


# ------------------------------------------------------------------------------------ simulations
LOG2 = math.log(2.0)


def simulate(n_samples, n_genes, n_true, sigma, seed, shift=LOG2):
    rng = np.random.default_rng(seed)
    mu = rng.normal(-6, 1, n_genes)
    effect = np.zeros(n_genes)
    effect[:n_true] = shift * np.where(np.arange(n_true) % 2 == 0, 1, -1)  # up and down
    s1 = np.exp(mu + effect + sigma * rng.normal(size=(n_samples, n_genes))).astype(np.float32)
    s2 = np.exp(mu + sigma * rng.normal(size=(n_samples, n_genes))).astype(np.float32)
    return s1, s2


def auroc(scores, labels):
    ranks = pd.Series(scores).rank().to_numpy()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_simulated_true_genes_ranked_and_flagged():
    s1, s2 = simulate(1000, 60, 10, 0.12, seed=4)
    res = de.de_statistics(s1, s2, mode="change")
    truth = np.arange(60) < 10
    assert auroc(res["proba_de"], truth) >= 0.95
    flags = de.fdr_flags(res["proba_de"], 0.05)
    assert (flags & ~truth).sum() <= 2
    assert flags[truth].sum() >= 8
    lfc = res["lfc_mean"][:10]
    np.testing.assert_allclose(np.abs(lfc), 1.0, atol=0.1)  # 2x fold change, signs alternate
    assert (np.sign(lfc) == np.where(np.arange(10) % 2 == 0, 1, -1)).all()
    vanilla = de.de_statistics(s1, s2)
    assert auroc(np.abs(vanilla["bayes_factor"]), truth) >= 0.95


def test_null_comparison_flags_nothing():
    s1, s2 = simulate(1000, 60, 0, 0.12, seed=5)
    res = de.de_statistics(s1, s2, mode="change")
    assert de.fdr_flags(res["proba_de"], 0.05).sum() <= 1
    table = de.de_table(res, None, [f"g{i}" for i in range(60)], fdr_target=0.05)
    assert table["is_de_fdr_0.05"].sum() <= 1


# ---------------------------------------------------------------------------------------- groups
@pytest.fixture
def obs():
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical(["a", "b", "a", "c", "b", "a"], categories=["a", "b", "c", "unused"]),
            "score": [0.1, 0.5, 0.9, 0.3, 0.7, 0.2],
        },
        index=[f"cell{i}" for i in range(6)],
    )


def test_resolve_groupby_one_vs_rest(obs):
    comps = de.resolve_group_indices(obs, "cell_type")
    assert [(c.group1, c.group2) for c in comps] == [("a", "Rest"), ("b", "Rest"), ("c", "Rest")]
    assert comps[0].rows1.tolist() == [0, 2, 5] and comps[0].rows2.tolist() == [1, 3, 4]
    assert comps[2].comparison == "c vs Rest"
    comps = de.resolve_group_indices(obs, "cell_type", group1="b", group2="a")
    assert len(comps) == 1 and comps[0].comparison == "b vs a"
    assert comps[0].rows1.tolist() == [1, 4] and comps[0].rows2.tolist() == [0, 2, 5]
    comps = de.resolve_group_indices(obs, "cell_type", group1=["a", "c"], group2="b")
    assert [c.comparison for c in comps] == ["a vs b", "c vs b"]


def test_resolve_idx_forms(obs):
    mask = np.array([True, False, True, False, False, False])
    for idx in (mask, [0, 2], np.array([2, 0, 0]), ["cell0", "cell2"], "score < 0.15 or score > 0.8"):
        (comp,) = de.resolve_group_indices(obs, idx1=idx)
        assert comp.rows1.tolist() == [0, 2], idx
        assert comp.rows2.tolist() == [1, 3, 4, 5]
        assert comp.group1 is None and comp.comparison is None
    with pytest.warns(UserWarning, match="both idx1 and idx2"):
        (comp,) = de.resolve_group_indices(obs, idx1="cell_type == 'a'", idx2=pd.Series(obs["score"] > 0.6))
    assert comp.rows1.tolist() == [0, 5] and comp.rows2.tolist() == [2, 4]  # overlap (cell2) -> group 2
    (comp,) = de.resolve_group_indices(obs, idx1=[-1], idx2=[0])
    assert comp.rows1.tolist() == [5] and comp.rows2.tolist() == [0]


def test_resolve_errors(obs):
    cases = [
        ({}, "groupby"),
        ({"groupby": "nope"}, "not a column"),
        ({"groupby": "cell_type", "group1": "z"}, "no cells"),
        ({"groupby": "cell_type", "group1": "unused"}, "no cells"),
        ({"groupby": "cell_type", "group2": "z"}, "no cells"),
        ({"groupby": "cell_type", "group1": "a", "group2": "a"}, "itself"),
        ({"groupby": "cell_type", "idx1": [0]}, "not both"),
        ({"idx1": [0], "group1": "a"}, "group1/group2"),
        ({"idx2": [0]}, "requires idx1"),
        ({"idx1": np.zeros(6, bool)}, "no cells"),
        ({"idx1": np.ones(6, bool)}, "every cell"),
        ({"idx1": [True, False]}, "length"),
        ({"idx1": [7]}, "out of range"),
        ({"idx1": ["cell9"]}, "not found"),
        ({"idx1": "score +"}, "query"),
        ({"idx1": "score * 2"}, "boolean"),
        ({"idx1": [0], "idx2": "score > 5"}, "idx2 selects no cells"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            de.resolve_group_indices(obs, **kwargs)
    single = pd.DataFrame({"g": ["x", "x"]})
    with pytest.raises(ValueError, match="single group"):
        de.resolve_group_indices(single, "g")
    with pytest.raises(ValueError, match="no rest"):
        de.resolve_group_indices(single, "g", group1="x")


def test_sampling_helpers():
    rows = np.array([3, 7, 9])
    drawn = de.draw_cells(rows, 500, 0)
    assert drawn.shape == (500,) and set(drawn.tolist()) == {3, 7, 9}
    np.testing.assert_array_equal(drawn, de.draw_cells(rows, 500, 0))
    a, b = np.arange(6.0).reshape(3, 2), np.arange(8.0).reshape(4, 2)
    with pytest.raises(ValueError, match="n_pairs"):
        de.pairs_sampler(a, b)
    pa, pb = de.pairs_sampler(a, b, n_pairs=10, rng=1)
    assert pa.shape == pb.shape == (10, 2)
    with pytest.raises(ValueError):
        de.draw_cells(np.array([], int), 3)


# ----------------------------------------------------------------------------- counts and tables
def test_count_statistics_dense_and_sparse():
    x1 = np.array([[1, 0, 3], [0, 0, 1]], dtype=np.float32)
    x2 = np.array([[2, 2, 0], [0, 4, 0], [1, 0, 0]], dtype=np.float32)
    expected = {
        "raw_mean1": [0.5, 0.0, 2.0],
        "raw_mean2": [1.0, 2.0, 0.0],
        "non_zeros_proportion1": [0.5, 0.0, 1.0],
        "non_zeros_proportion2": [2 / 3, 2 / 3, 0.0],
        "raw_normalized_mean1": [1250.0, 0.0, 8750.0],  # libraries 4 and 1 scaled to 1e4
        "raw_normalized_mean2": [(5000 + 10000) / 3, (5000 + 10000) / 3, 0.0],
    }
    for a, b in ((x1, x2), (sp.csr_matrix(x1), sp.csr_matrix(x2))):
        res = de.count_statistics(a, b)
        assert list(res) == list(de.COUNT_COLUMNS)
        for key, value in expected.items():
            np.testing.assert_allclose(res[key], value, rtol=1e-12, err_msg=key)
    res = de.count_statistics(x1, x2, library1=np.array([8.0, 0.0]), library2=np.ones(3), target_sum=1.0)
    np.testing.assert_allclose(res["raw_normalized_mean1"], [1 / 16, 0.0, 3 / 16])  # empty library -> 0
    np.testing.assert_allclose(res["raw_normalized_mean2"], x2.mean(0))


def test_table_columns_sort_and_fdr():
    genes = ["g0", "g1", "g2"]
    counts = de.count_statistics(C1, C2)
    change = de.de_statistics(C1, C2, mode="change", delta=0.9, pseudocounts=0.0, cred_interval_lvls=[0.5])
    table = de.de_table(change, counts, genes, "a vs b", "a", "b", fdr_target=0.05)
    assert list(table.columns) == [
        *de.CHANGE_COLUMNS,
        "lfc_confidence_interval_0.5_min",
        "lfc_confidence_interval_0.5_max",
        *de.COUNT_COLUMNS,
        "is_de_fdr_0.05",
        "comparison",
        "group1",
        "group2",
    ]
    assert table.index.tolist() == ["g0", "g1", "g2"]  # proba_de 0.75, 0.75, 0.25 (stable for ties)
    assert table["is_de_fdr_0.05"].tolist() == [False, False, False]
    assert de.de_table(change, None, genes, fdr_target=0.3)["is_de_fdr_0.3"].tolist() == [True, True, False]
    assert (table["comparison"] == "a vs b").all() and (table["group2"] == "b").all()

    vanilla = de.de_statistics(S1, S2)
    table = de.de_table(vanilla, counts, genes, group1="x", group2="Rest", all_stats=True)
    assert list(table.columns) == [*de.VANILLA_COLUMNS, *de.COUNT_COLUMNS, "comparison", "group1", "group2"]
    assert table.index[0] == "g0" and (table["comparison"] == "x vs Rest").all()
    table = de.de_table(vanilla, counts, genes, all_stats=False)  # idx1/idx2: no group columns
    assert list(table.columns) == list(de.VANILLA_COLUMNS)


def test_filter_outlier_cells():
    rng = np.random.default_rng(6)
    latent = np.concatenate([rng.normal(size=(300, 3)), rng.normal(size=(10, 3)) + 12.0])
    keep = de.filter_outlier_cells(latent)
    assert not keep[300:].any()
    assert 0.88 <= keep.mean() <= 0.92
    with pytest.warns(UserWarning, match="Cov"):
        assert de.filter_outlier_cells(np.zeros((3, 4))).all()


def test_differential_expression_driver(obs):
    n_genes = 4
    rng = np.random.default_rng(7)
    x = rng.poisson(5, (6, n_genes)).astype(np.float32)
    x[:, 3] = 0
    base = np.full((6, n_genes), 0.25)
    base[obs["cell_type"].to_numpy() == "a", 0] = 0.6  # gene 0 up in group a

    def sample_scales(rows, n, seed):
        cells = de.draw_cells(rows, n, seed)
        noise = np.random.default_rng(seed).lognormal(0, 0.05, (n, n_genes))
        return (base[cells] * noise).astype(np.float32)

    genes = [f"g{i}" for i in range(n_genes)]
    table = de.differential_expression(
        sample_scales, obs, sp.csr_matrix(x), genes, {"groupby": "cell_type"}, {"mode": "change"}, n_samples_overall=400
    )
    assert len(table) == 3 * n_genes
    first = table[table["comparison"] == "a vs Rest"]
    assert first.index[0] == "g0" and first["is_de_fdr_0.05"].iloc[0]
    assert first["lfc_mean"].iloc[0] > 1.0
    expected_raw = x[[0, 2, 5]].mean(0)
    np.testing.assert_allclose(first.loc[genes, "raw_mean1"], expected_raw, rtol=1e-6)
    assert first["pseudocounts"].iloc[0] > 1e-10  # gene 3 is never expressed: offset estimated from it

    with pytest.warns(UserWarning, match="Cov"):  # group 2 has too few cells for a covariance
        table = de.differential_expression(
            sample_scales,
            obs,
            x,
            genes,
            {"idx1": "cell_type == 'a'", "idx2": [1, 4]},
            all_stats=False,
            n_samples_overall=200,
            latent=lambda rows: np.asarray(rows, float)[:, None],
        )
    assert list(table.columns) == list(de.VANILLA_COLUMNS)


def test_device_and_host_order_statistics_agree(monkeypatch):
    rng = np.random.default_rng(8)
    a = rng.lognormal(0, 1, (101, 7)).astype(np.float32)
    b = rng.lognormal(0, 1, (101, 7)).astype(np.float32)
    kwargs = {"mode": "change", "pseudocounts": 1e-3, "cred_interval_lvls": [0.8], "chunk_size": 4}
    host = de.de_statistics(a, b, **kwargs)
    host_no_levels = de.de_statistics(a, b, mode="change", pseudocounts=1e-3)  # np.median path
    monkeypatch.setattr(de.stats, "_order_stats_on_device", lambda: True)
    device = de.de_statistics(a, b, **kwargs)
    assert list(host) == list(device)
    for key in host:
        np.testing.assert_allclose(device[key], host[key], rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(host_no_levels["lfc_median"], host["lfc_median"], rtol=1e-6)
