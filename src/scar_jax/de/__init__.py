"""Differential expression from posterior samples of normalized expression (scvi-tools semantics).

The functions here are the array-level core of ``SCAR.differential_expression``; they follow
``scvi.model.base.DifferentialComputation.get_bayes_factors`` and ``scvi.model.base._de_core``:

- :func:`resolve_group_indices` turns ``groupby``/``group1``/``group2`` or ``idx1``/``idx2`` into the
  list of cell-group comparisons (one-vs-rest when ``group2`` is ``None``);
- :func:`draw_cells` and :func:`pairs_sampler` build the paired posterior samples: each sample is the
  normalized expression of a uniformly drawn cell of the group under one posterior draw;
- :func:`de_statistics` computes the ``"vanilla"`` (Lopez et al. 2018) or ``"change"`` (Boyeau et al.
  2019) Bayes factors, probabilities and log-fold-change summaries (JAX, jit-compiled, gene-chunked);
- :func:`fdr_flags` tags genes by the posterior expected false discovery rate;
- :func:`count_statistics` gives the raw-count summaries of ``all_stats=True``;
- :func:`de_table` assembles one comparison's table with scvi-tools' columns and sort order;
- :func:`differential_expression` drives all of the above from a posterior-sampling callable.

All per-sample work (comparisons, log-fold changes, sorting for medians and credible intervals) runs
in JAX; probabilities are formed from integer counts and the Bayes factors ``log(p + 1e-8) -
log(1 - p + 1e-8)`` (natural log) are evaluated in float64 on the host, as scvi-tools does with numpy.
"""

from __future__ import annotations

from .groups import GroupComparison, draw_cells, pairs_sampler, resolve_group_indices
from .stats import (
    CHANGE_COLUMNS,
    COUNT_COLUMNS,
    EPS,
    VANILLA_COLUMNS,
    credible_intervals,
    de_statistics,
    estimate_delta,
    estimate_pseudocounts_offset,
    fdr_flags,
    zero_expression_mask,
)
from .table import count_statistics, de_table, differential_expression, filter_outlier_cells

__all__ = [
    "CHANGE_COLUMNS",
    "COUNT_COLUMNS",
    "EPS",
    "VANILLA_COLUMNS",
    "GroupComparison",
    "count_statistics",
    "credible_intervals",
    "de_statistics",
    "de_table",
    "differential_expression",
    "draw_cells",
    "estimate_delta",
    "estimate_pseudocounts_offset",
    "fdr_flags",
    "filter_outlier_cells",
    "pairs_sampler",
    "resolve_group_indices",
    "zero_expression_mask",
]
