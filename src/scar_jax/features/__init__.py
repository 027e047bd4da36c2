r"""Feature barcodes (sgRNA, tag, CMO, ADT, ATAC): Bayes factors and feature assignment.

After a scAR model is trained on feature-barcode counts, the original scAR (Novartis/scar) decides
which features (guides, hashtags, ...) a cell truly carries by comparing each observed count with the
count that ambient contamination alone would explain. This module implements that step as pure,
vectorised functions over arrays, so it works with any estimate of the noise ratio and of the ambient
profile (a trained model's ``get_noise_ratio()`` and ``ambient_profile``, or a simulation's truth).

Formulas
--------
With cell ``i``, feature ``g = 1..G``, observed counts ``x_ig``, observed library ``N_i = sum_g x_ig``,
noise ratio ``eps_i`` and ambient profile ``a_{b(i)}`` of the cell's batch ``b(i)``:

.. code-block:: text

    expected ambient counts   E_ig = N_i * eps_i * a_{b(i), g}
    ambient total             T_i  = sum_g E_ig = N_i * eps_i * sum_g a_{b(i), g}
    adjustment                adj_i = max(0, (N_i - T_i) / G)                          adjust='micro'
                              adj_i = max(0, sum_i (N_i - T_i) / (n_cells * G))        adjust='global'
                              adj_i = 0                                                adjust=None
    Poisson rate              lambda_ig = E_ig + adj_i
    Bayes factor              BF_ig = P(X <= x_ig) / P(X = x_ig),   X ~ Poisson(lambda_ig)
    log Bayes factor          log BF_ig = clip(logcdf - logpmf, -709.78, 709.78)

``'global'`` pools over *all the cells passed in* (the original pools over an inference minibatch),
so the result depends on which cells are given but never on ``chunk_size``.

Because ``P(X <= x) >= P(X = x)``, the exact ``log BF`` is ``>= 0``. The log-pmf is evaluated in closed
form, ``x log(lambda) - lambda - log(x!)``, and the log-cdf as ``log(pdtr(x, lambda))``. Where the cdf
underflows (``lambda`` far above ``x``), the original (``scipy.stats.poisson.logcdf``) returns
``-inf`` and its clip gives ``BF = exp(-709.78)``; here ``log BF`` is computed directly from the
continued fraction of the upper incomplete gamma function,
``P(X <= x) = Q(x + 1, lambda) = lambda^(x+1) e^(-lambda) / x! * CF``, so ``log BF = log(lambda) + log(CF)``,
which is accurate there (and small: ``BF ~ 1 / (1 - x / lambda)``).

Assignment
----------
``moi=None`` (the original rule): ``BF_ig < cutoff`` is set to 0; a cell is assigned the features tied
at its row maximum, none if that maximum is 0. ``moi=k`` (not implemented in the original): the up to
``k`` features with ``BF_ig >= cutoff``, in decreasing ``BF`` order (ties broken by the larger observed
count, then by feature order), for high-MOI or dual-guide experiments.

Examples
--------
>>> import numpy as np
>>> from scar_jax.features import bayes_factors, assign_features
>>> x = np.array([[50, 1, 0], [0, 2, 40]])
>>> bf = bayes_factors(x, x.sum(1), np.array([0.1, 0.1]), np.full(3, 1 / 3))
>>> assign_features(bf, x, ["sg_a", "sg_b", "sg_c"])["sgRNA"].tolist()
['sg_a', 'sg_c']
"""

from __future__ import annotations

from ._checks import FEATURE_TYPES, FORCED_SPARSITY, LOG_BF_CLIP, check_feature_type
from .assign import assign_features, assign_features_from_counts
from .bayes import bayes_factors, expected_ambient_counts, log_bayes_factors

__all__ = [
    "FEATURE_TYPES",
    "FORCED_SPARSITY",
    "LOG_BF_CLIP",
    "assign_features",
    "assign_features_from_counts",
    "bayes_factors",
    "check_feature_type",
    "expected_ambient_counts",
    "log_bayes_factors",
]
