"""The calibration loop: float32 JAX on the default device, rounds driven from the host over blocks of entries.

Each round sums the posterior over all genes as if every pooled count were zero (one compiled call, chunks of
rows, nothing ``(n, G)`` held) and corrects the sums at the stored entries, read back block by block from the
spill (:class:`.blocks.EntryStore`; one compiled call per block, every block padded to the same size so one
compilation serves them all); the share is evaluated once at the fitted parameters, block by block. Only the
per-cell vectors stay whole. Formulas: :mod:`scar_jax.calibration`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_DTYPE = jnp.float32  # of the calibration loop on the device
# A gene whose probability of being off is below this is on beyond doubt: its counts carry no information on the
# noise ratio, which is estimated from the genes that are off. Without the floor a neighbourhood in which every
# gene is on (an 87-ADT panel) would take its noise ratio from the ratio of two vanishing sums, dominated by the
# least certain expressed gene, above what the isotype controls imply (docs/benchmarks.md, CITE-seq).
# The float64 loop of earlier versions had it implicitly (1 - q rounds to 0 below 1.1e-16); it is that value.
OFF_PROBABILITY_FLOOR = 2.0**-53
# The genes that estimate the noise ratio and the prior ``pi``: those whose pooled neighbourhood holds at least this
# many counts under the ambient profile, ``a_g * median_i(sum_{j in J(i)} N_j) >= 10``. A gene with fewer cannot
# tell "on" from "off" (both likelihoods are near 1 at a zero count), so its posterior follows the prior; when
# thousands of them are called on with ``pi`` near 1 the off genes' ambient mass, the estimate's denominator,
# drains away and the noise ratio climbs to a spurious fixed point (real PBMC with all genes: 0.68 against 0.059
# with these genes; docs/model.md, "Which genes estimate the noise ratio"). Every gene still gets its share.
MIN_EXPECTED_POOLED_COUNT = 10.0
SCAN_ENTRIES = 1 << 18  # stored entries per step of the scan within a block (blocks are rounded up to a multiple)


class _Cells(NamedTuple):
    """The per-cell device arrays of one calibration: cells, their neighbourhoods and the ambient profiles."""

    library: jax.Array  # (n,) N_i
    neighbours: jax.Array  # (n, k)
    batch: jax.Array  # (n,) row of ``profiles`` of each cell
    profiles: jax.Array  # (n_batches, G), rows sum to one
    estimates: jax.Array  # (G,) 1 for the genes that estimate eps and pi (MIN_EXPECTED_POOLED_COUNT), else 0


def _log_odds(X, lgamma_ratio, mu, background, logit_pi, alpha):
    """``logit(pi) + log L_on - log L_off`` elementwise (module docstring; the ``lgamma(X + 1)`` of both cancels).

    ``lgamma_ratio = lgamma(X + alpha) - lgamma(alpha)``, a constant of the entries computed once. At ``X = 0``
    (``lgamma_ratio = 0``) it is ``logit(pi) + alpha log(alpha / (alpha + mu)) + background`` exactly."""
    tiny = jnp.finfo(mu.dtype).tiny
    return (
        logit_pi
        + lgamma_ratio
        + alpha * (jnp.log(alpha) - jnp.log(alpha + mu))
        + X * (jnp.log(jnp.maximum(mu, tiny)) - jnp.log(alpha + mu) - jnp.log(jnp.maximum(background, tiny)))
        + background
    )


def _on_off(log_odds):
    """``q = sigmoid(log_odds)`` and ``1 - q`` (one ``exp``, no overflow), ``1 - q`` set to zero below
    ``OFF_PROBABILITY_FLOOR``."""
    small = jnp.exp(-jnp.abs(log_odds))
    big = 1.0 / (1.0 + small)
    small = small * big
    positive = log_odds >= 0
    off = jnp.where(positive, small, big)
    return jnp.where(positive, big, small), jnp.where(off < OFF_PROBABILITY_FLOOR, 0.0, off)


def _native_share(X, mu, background, native_library, eps, cell_a, log_odds, alpha, odds):
    """``w = q' (1 - eps) theta / ((1 - eps) theta + eps a)``, ``q' = c q / (c q + 1 - q)``, elementwise; 1 where
    ``a = 0``."""
    tiny = jnp.finfo(mu.dtype).tiny
    rate = (alpha + X) / (alpha / jnp.maximum(mu, tiny) + 1.0)
    native = (1.0 - eps) * jnp.maximum(rate - background, 0.0) / jnp.maximum(native_library, tiny)
    total = native + eps * cell_a
    q, off = _on_off(log_odds)
    share = odds * q / (odds * q + off) * jnp.where(total > 0, native / jnp.where(total > 0, total, 1.0), 0.0)
    share = jnp.where(cell_a > 0, share, 1.0)  # a count the cell's ambient cannot produce is native
    return jnp.clip(share, 0.0, 1.0)  # float32 division on XLA can round a ratio of equals to 1 + 2^-23


def _libraries(eps, cells: _Cells) -> tuple[jax.Array, jax.Array]:
    """``T`` ``(n,)`` and each neighbourhood's ambient library by the batch it comes from ``(n, n_batches)``."""
    ambient = eps * cells.library
    native = ((cells.library - ambient)[cells.neighbours]).sum(1)
    n_batches = cells.profiles.shape[0]
    if n_batches == 1:
        return native, ambient[cells.neighbours].sum(1)[:, None]
    by_batch = [jnp.where(cells.batch == b, ambient, 0.0)[cells.neighbours].sum(1) for b in range(n_batches)]
    return native, jnp.stack(by_batch, 1)


def _background(by_batch, profiles, cols=None):
    """Expected ambient counts ``sum_b by_batch[:, b] a_b`` (``(m, G)``, or at ``cols`` ``(m,)``), no matmul
    (a float32 matmul can run at reduced precision on accelerators)."""
    terms = [
        by_batch[:, b, None] * profiles[b, None] if cols is None else by_batch[:, b] * profiles[b, cols]
        for b in range(profiles.shape[0])
    ]
    return functools.reduce(jnp.add, terms)


def _by_row_chunks(fn, arrays: tuple, n: int, chunk: int):
    """``fn`` over chunks of ``chunk`` rows of the ``(n, ...)`` arrays (padded with row 0), rows concatenated."""
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n

    def split(a):
        a = jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]) if pad else a
        return a.reshape((n_chunks, chunk) + a.shape[1:])

    out = jax.lax.map(lambda args: fn(*args), tuple(split(a) for a in arrays))
    return jax.tree_util.tree_map(lambda o: o.reshape((n_chunks * chunk,) + o.shape[2:])[:n], out)


class _Parameters(NamedTuple):
    """What a round's sums and the share need of ``(eps, pi, s)``, per cell (:func:`_parameters`)."""

    native_library: jax.Array  # (n,) T_i
    by_batch: jax.Array  # (n, n_batches) the neighbourhood's ambient library by batch
    scale: jax.Array  # (n,) T_i s_i
    logit_pi: jax.Array  # (n,)


@jax.jit
def _parameters(eps, pi, s, cells: _Cells) -> _Parameters:
    native_library, by_batch = _libraries(eps, cells)
    return _Parameters(native_library, by_batch, native_library * s, jnp.log(pi) - jnp.log1p(-pi))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _zero_count_sums(p: _Parameters, cells: _Cells, alpha, chunk: int):
    """The round's sums ``(n,)`` over all genes as if every pooled count were 0: they are a function of the row's
    parameters and the gene's ambient frequencies (row chunks, nothing ``(n, G)`` held); the fourth (the off
    genes' counts) is then 0."""

    def zero_counts(scale, logit_pi, by_batch, batch):  # (c,) sums over all genes as if every X were 0
        cell_a = cells.profiles[batch]
        background = _background(by_batch, cells.profiles)
        log_odds = _log_odds(0.0, 0.0, scale[:, None] * cell_a + background, background, logit_pi[:, None], alpha)
        q, off = _on_off(log_odds)
        estimates = cells.estimates[None, :]
        return (q * estimates).sum(1), (q * cell_a).sum(1), (off * cell_a * estimates).sum(1)

    n = cells.library.shape[0]
    sums = _by_row_chunks(zero_counts, (p.scale, p.logit_pi, p.by_batch, cells.batch), n, chunk)
    return (*sums, jnp.zeros(n, p.scale.dtype))


@jax.jit
def _stored_sums(sums, p: _Parameters, cells: _Cells, block: dict, alpha):
    """``sums`` corrected at one block of stored entries (:data:`.blocks.FIELDS` ``(m, sub)``), added row by row,
    a ``lax.scan`` over its ``m`` sub-blocks (XLA on CPU runs the scan's body 2-3 times faster than the same
    operations on the whole block)."""

    def sub_block(sums, block):
        row, col = block["row"], block["col"]
        mu, background, cell_a = _entry_terms(p.scale, p.by_batch, cells, row, col)
        q, off = _on_off(_log_odds(block["pooled"], block["lgamma_ratio"], mu, background, p.logit_pi[row], alpha))
        q0, off0 = _on_off(_log_odds(0.0, 0.0, mu, background, p.logit_pi[row], alpha))
        estimates = cells.estimates[col]
        off_counts = jnp.where(cell_a > 0, off * block["counts"], 0.0) * estimates
        terms = ((q - q0) * estimates, (q - q0) * cell_a, (off - off0) * cell_a * estimates, off_counts)
        added = (total.at[row].add(term, indices_are_sorted=True) for total, term in zip(sums, terms, strict=True))
        return tuple(added), None

    return jax.lax.scan(sub_block, sums, block)[0]


@jax.jit
def _update(eps, sums, cells: _Cells):
    """The new ``(eps, pi, s)`` from a round's sums, and the largest relative change of ``eps``."""
    q_sum, q_ambient, off_ambient, off_counts = sums
    tiny = jnp.finfo(eps.dtype).tiny
    new_eps = jnp.clip(off_counts / jnp.maximum(cells.library * off_ambient, tiny), 1e-6, 1 - 1e-6)
    new_pi = jnp.clip(q_sum / cells.estimates.sum(), 1e-6, 1 - 1e-6)
    return new_eps, new_pi, 1.0 / jnp.maximum(q_ambient, 1e-12), jnp.max(jnp.abs(new_eps - eps) / eps)


def _device_block(entries: dict[str, np.ndarray], sub: int) -> dict[str, jax.Array]:
    """A block of entries on the device as ``(block / sub, sub)`` (the ``own`` flag stays on the host)."""
    return {name: jnp.asarray(a.reshape(-1, sub)) for name, a in entries.items() if name != "own"}


def _sub_block(block: int) -> tuple[int, int]:
    """``block`` rounded up to a multiple of the scan's sub-block ``min(SCAN_ENTRIES, block)``, and that."""
    sub = min(SCAN_ENTRIES, block)
    return -(-block // sub) * sub, sub


def _round(eps, pi, s, cells: _Cells, store, alpha, chunk: int, block: int):
    """One update of ``(eps, pi, s)`` (module docstring): the zero-count sums, corrected block by block (at most
    two blocks in flight, so the host holds a bounded number), then the updates and the change of ``eps``."""
    p = _parameters(eps, pi, s, cells)
    sums, previous = _zero_count_sums(p, cells, alpha, chunk), None
    block, sub = _sub_block(block)
    for entries, _ in store.blocks(block):
        sums = _stored_sums(sums, p, cells, _device_block(entries, sub), alpha)
        if previous is not None:
            jax.block_until_ready(previous)
        previous = sums
    return _update(eps, sums, cells)


def _fit(eps, pi, s, cells: _Cells, store, alpha, tol, n_iter: int, chunk: int, block: int):
    """Rounds of :func:`_round` until no noise ratio changes by more than a relative ``tol`` (at most ``n_iter``);
    ``(eps, pi, s)`` and the number of rounds."""
    alpha, tol = jnp.asarray(alpha, eps.dtype), np.asarray(tol, np.float32)  # compared in float32, as before
    done, change = 0, np.float32(np.inf)
    while done < n_iter and change >= tol:
        eps, pi, s, change = _round(eps, pi, s, cells, store, alpha, chunk, block)
        change, done = np.asarray(change), done + 1
    return eps, pi, s, done


def _entry_terms(scale, by_batch, cells: _Cells, row, col):
    """``mu = T s a + bg``, the background ``bg`` and the cell's ambient frequency ``a`` at entries ``(row, col)``,
    from ``scale = T s`` ``(n,)`` and the ambient libraries by batch ``(n, n_batches)``."""
    cell_a = cells.profiles[cells.batch[row], col]
    background = _background(by_batch[row], cells.profiles, col)
    return scale[row] * cell_a + background, background, cell_a


@jax.jit
def _share_block(eps, p: _Parameters, cells: _Cells, block: dict, alpha, odds):
    """The native share at one block of stored entries ``(m, sub)`` float32, sub-block by sub-block."""

    def sub_block(block):
        row, col, pooled = block["row"], block["col"], block["pooled"]
        mu, background, cell_a = _entry_terms(p.scale, p.by_batch, cells, row, col)
        log_odds = _log_odds(pooled, block["lgamma_ratio"], mu, background, p.logit_pi[row], alpha)
        return _native_share(pooled, mu, background, p.native_library[row], eps[row], cell_a, log_odds, alpha, odds)

    return jax.lax.map(sub_block, block)


def _shares(eps, p: _Parameters, cells: _Cells, store, alpha, odds, block: int):
    """The native share at the stored entries, block by block: yields each block's entries (host) and shares
    ``(block,)`` (host float32), of which the first ``size`` are real."""
    alpha, odds = jnp.asarray(alpha, eps.dtype), jnp.asarray(odds, eps.dtype)
    block, sub = _sub_block(block)
    for entries, size in store.blocks(block):
        yield entries, np.asarray(_share_block(eps, p, cells, _device_block(entries, sub), alpha, odds)).ravel(), size


@functools.partial(jax.jit, static_argnames=("chunk",))
def _share_dense(eps, p: _Parameters, cells: _Cells, alpha, odds, chunk: int):
    """The native share ``(n, G)`` with every pooled count at zero (the stored entries are then overwritten)."""

    def rows(native_library, scale, logit_pi, eps, by_batch, batch):
        cell_a = cells.profiles[batch]
        background = _background(by_batch, cells.profiles)
        mu = scale[:, None] * cell_a + background
        log_odds = _log_odds(0.0, 0.0, mu, background, logit_pi[:, None], alpha)
        return _native_share(0.0, mu, background, native_library[:, None], eps[:, None], cell_a, log_odds, alpha, odds)

    arrays = (p.native_library, p.scale, p.logit_pi, eps, p.by_batch, cells.batch)
    return _by_row_chunks(rows, arrays, cells.library.shape[0], chunk)
