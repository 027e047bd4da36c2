"""The count-preserving splits (``scar_jax.denoise``): the calibrated split against one NumPy call over the
canonical stored counts, whatever the chunking, the input's layout or the row blocks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scar_jax import denoise


@pytest.fixture
def counts_and_share():
    """A canonical CSR of counts ``(40, 30)`` and a share CSR with its pattern."""
    rng = np.random.default_rng(0)
    x = sp.random(40, 30, density=0.3, random_state=1, data_rvs=lambda n: rng.integers(1, 50, n)).tocsr()
    x = sp.csr_matrix(x, dtype=np.float32)
    share = sp.csr_matrix((rng.random(x.nnz).astype(np.float32), x.indices, x.indptr), shape=x.shape)
    return x, share


def one_call(x: sp.csr_matrix, share: sp.csr_matrix, seed: int) -> np.ndarray:
    """The reference: one ``Binomial`` call over every stored count, dense ``(n, G)``."""
    drawn = np.random.default_rng(seed).binomial(np.rint(x.data).astype(np.int64), share.data.astype(np.float64))
    return sp.csr_matrix((drawn.astype(np.float32), x.indices, x.indptr), shape=x.shape).toarray()


def test_calibrated_split_is_one_stream_whatever_the_chunk(counts_and_share, monkeypatch):
    x, share = counts_and_share
    expected = one_call(x, share, seed=3)
    for entries in (1, 7, x.nnz, 1 << 22):
        monkeypatch.setattr(denoise, "_SPLIT_ENTRIES", entries)
        out = denoise.calibrated_split(x, share, seed=3)
        assert sp.issparse(out) and not (out.data == 0).any()  # drawn zeros are not stored
        np.testing.assert_array_equal(out.toarray(), expected)
    assert (expected <= x.toarray()).all() and (expected >= 0).all()


def test_calibrated_split_continues_a_generator_over_row_blocks(counts_and_share):
    x, share = counts_and_share
    rng = np.random.default_rng(5)
    blocks = [denoise.calibrated_split(x[a:b], share[a:b], rng) for a, b in ((0, 13), (13, 14), (14, 40))]
    np.testing.assert_array_equal(sp.vstack(blocks).toarray(), one_call(x, share, seed=5))


def test_calibrated_split_of_a_non_canonical_input_leaves_it_unchanged(counts_and_share):
    x, share = counts_and_share
    data, indices, indptr = [], [], [0]
    for i in range(40):  # each row's counts stored as two halves, columns in descending order
        cols, values = x.indices[x.indptr[i] : x.indptr[i + 1]][::-1], x.data[x.indptr[i] : x.indptr[i + 1]][::-1]
        data += [*np.floor(values / 2), *np.ceil(values / 2)]
        indices += [*cols, *cols]
        indptr.append(len(data))
    messy = sp.csr_matrix((np.float32(data), np.int32(indices), np.int32(indptr)), shape=x.shape)
    assert not messy.has_canonical_format
    kept = (messy.data.copy(), messy.indices.copy())
    out = denoise.calibrated_split(messy, share, seed=2)
    np.testing.assert_array_equal(out.toarray(), denoise.calibrated_split(x, share, seed=2).toarray())
    np.testing.assert_array_equal(messy.data, kept[0])
    np.testing.assert_array_equal(messy.indices, kept[1])
