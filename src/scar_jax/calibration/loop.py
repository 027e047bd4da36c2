"""The calibration loop on the device: float32 JAX, one jit-compiled ``while_loop`` of rounds.

Each round sums the posterior over all genes as if every pooled count were zero (chunks of rows, nothing
``(n, G)`` held) and corrects the sums at the stored entries, block by block (a ``jax.lax.scan``); the share
is evaluated once at the fitted parameters. Formulas: :mod:`scar_jax.calibration`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

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


class _Problem(NamedTuple):
    """The device arrays of one calibration: cells, their neighbourhoods, and the stored entries.

    The entries are the union of the stored entries of the counts ``x`` and of their pooled counts, as
    ``(row, col)`` in row-major order with the pooled count ``pooled`` and the cell's own count ``counts``, in
    blocks of a fixed number of entries ``(n_blocks, block)`` (the last padded with ``(n - 1, 0)`` and
    ``pooled = counts = lgamma_ratio = 0``, which adds exactly zero to every sum). The rounds and the share go
    over the blocks one at a time, so their temporaries are bounded by a block, not by the entries."""

    library: jax.Array  # (n,) N_i
    neighbours: jax.Array  # (n, k)
    batch: jax.Array  # (n,) row of ``profiles`` of each cell
    profiles: jax.Array  # (n_batches, G), rows sum to one
    estimates: jax.Array  # (G,) 1 for the genes that estimate eps and pi (MIN_EXPECTED_POOLED_COUNT), else 0
    row: jax.Array  # (n_blocks, block)
    col: jax.Array  # (n_blocks, block)
    pooled: jax.Array  # (n_blocks, block) X_ig
    lgamma_ratio: jax.Array  # (n_blocks, block) lgamma(X_ig + alpha) - lgamma(alpha)
    counts: jax.Array  # (n_blocks, block) x_ig


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


def _libraries(eps, problem: _Problem) -> tuple[jax.Array, jax.Array]:
    """``T`` ``(n,)`` and each neighbourhood's ambient library by the batch it comes from ``(n, n_batches)``."""
    ambient = eps * problem.library
    native = ((problem.library - ambient)[problem.neighbours]).sum(1)
    n_batches = problem.profiles.shape[0]
    if n_batches == 1:
        return native, ambient[problem.neighbours].sum(1)[:, None]
    by_batch = [jnp.where(problem.batch == b, ambient, 0.0)[problem.neighbours].sum(1) for b in range(n_batches)]
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


def _round(eps, pi, s, problem: _Problem, alpha, chunk: int):
    """One update of ``(eps, pi, s)`` (module docstring): the posterior at every zero pooled count is a
    function of the row's parameters and the gene's ambient frequencies (row chunks, nothing ``(n, G)`` held);
    the stored entries correct it."""
    n = problem.library.shape[0]
    native_library, by_batch = _libraries(eps, problem)
    logit_pi = jnp.log(pi) - jnp.log1p(-pi)
    scale = native_library * s

    def zero_counts(scale, logit_pi, by_batch, batch):  # (c,) sums over all genes as if every X were 0
        cell_a = problem.profiles[batch]
        background = _background(by_batch, problem.profiles)
        log_odds = _log_odds(0.0, 0.0, scale[:, None] * cell_a + background, background, logit_pi[:, None], alpha)
        q, off = _on_off(log_odds)
        estimates = problem.estimates[None, :]
        return (q * estimates).sum(1), (q * cell_a).sum(1), (off * cell_a * estimates).sum(1)

    q_sum, q_ambient, off_ambient = _by_row_chunks(zero_counts, (scale, logit_pi, by_batch, problem.batch), n, chunk)

    def stored(sums, block):  # the corrections at one block of stored entries, added row by row
        row, col, pooled, lgamma_ratio, counts = block
        mu, background, cell_a = _entry_terms(scale, by_batch, problem, row, col)
        q, off = _on_off(_log_odds(pooled, lgamma_ratio, mu, background, logit_pi[row], alpha))
        q0, off0 = _on_off(_log_odds(0.0, 0.0, mu, background, logit_pi[row], alpha))
        estimates = problem.estimates[col]
        off_counts = jnp.where(cell_a > 0, off * counts, 0.0) * estimates
        terms = ((q - q0) * estimates, (q - q0) * cell_a, (off - off0) * cell_a * estimates, off_counts)
        added = (total.at[row].add(term, indices_are_sorted=True) for total, term in zip(sums, terms, strict=True))
        return tuple(added), None

    blocks = (problem.row, problem.col, problem.pooled, problem.lgamma_ratio, problem.counts)
    sums, _ = jax.lax.scan(stored, (q_sum, q_ambient, off_ambient, jnp.zeros(n, eps.dtype)), blocks)
    q_sum, q_ambient, off_ambient, off_counts = sums
    tiny = jnp.finfo(eps.dtype).tiny
    new_eps = jnp.clip(off_counts / jnp.maximum(problem.library * off_ambient, tiny), 1e-6, 1 - 1e-6)
    new_pi = jnp.clip(q_sum / problem.estimates.sum(), 1e-6, 1 - 1e-6)
    return new_eps, new_pi, 1.0 / jnp.maximum(q_ambient, 1e-12)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _fit(eps, pi, s, problem: _Problem, alpha, tol, n_iter, chunk: int):
    """Rounds of :func:`_round` until no noise ratio changes by more than a relative ``tol`` (at most ``n_iter``)."""

    def keep_going(carry):
        done, _, _, _, change = carry
        return (done < n_iter) & (change >= tol)

    def step(carry):
        done, eps, pi, s, _ = carry
        new_eps, pi, s = _round(eps, pi, s, problem, alpha, chunk)
        return done + 1, new_eps, pi, s, jnp.max(jnp.abs(new_eps - eps) / eps)

    done, eps, pi, s, _ = jax.lax.while_loop(
        keep_going, step, (jnp.int32(0), eps, pi, s, jnp.asarray(jnp.inf, eps.dtype))
    )
    return eps, pi, s, done


def _entry_terms(scale, by_batch, problem: _Problem, row, col):
    """``mu = T s a + bg``, the background ``bg`` and the cell's ambient frequency ``a`` at entries ``(row, col)``,
    from ``scale = T s`` ``(n,)`` and the ambient libraries by batch ``(n, n_batches)``."""
    cell_a = problem.profiles[problem.batch[row], col]
    background = _background(by_batch[row], problem.profiles, col)
    return scale[row] * cell_a + background, background, cell_a


@jax.jit
def _share_at(eps, pi, s, problem: _Problem, at, alpha, odds):
    """The native share at the stored entries ``at`` ``(m_blocks, block)`` (positions in the flattened
    ``problem.row``), one block at a time."""
    native_library, by_batch = _libraries(eps, problem)
    scale = native_library * s
    logit_pi = jnp.log(pi) - jnp.log1p(-pi)

    def block(at):
        row, col, pooled = problem.row.ravel()[at], problem.col.ravel()[at], problem.pooled.ravel()[at]
        mu, background, cell_a = _entry_terms(scale, by_batch, problem, row, col)
        log_odds = _log_odds(pooled, problem.lgamma_ratio.ravel()[at], mu, background, logit_pi[row], alpha)
        return _native_share(pooled, mu, background, native_library[row], eps[row], cell_a, log_odds, alpha, odds)

    return jax.lax.map(block, at)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _share_dense(eps, pi, s, problem: _Problem, alpha, odds, chunk: int):
    """The native share ``(n, G)`` with every pooled count at zero (the stored entries are then overwritten)."""
    native_library, by_batch = _libraries(eps, problem)
    logit_pi = jnp.log(pi) - jnp.log1p(-pi)

    def rows(native_library, s, logit_pi, eps, by_batch, batch):
        cell_a = problem.profiles[batch]
        background = _background(by_batch, problem.profiles)
        mu = (native_library * s)[:, None] * cell_a + background
        log_odds = _log_odds(0.0, 0.0, mu, background, logit_pi[:, None], alpha)
        return _native_share(0.0, mu, background, native_library[:, None], eps[:, None], cell_a, log_odds, alpha, odds)

    arrays = (native_library, s, logit_pi, eps, by_batch, problem.batch)
    return _by_row_chunks(rows, arrays, problem.library.shape[0], chunk)
