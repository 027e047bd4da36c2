"""Cell groups of a DE comparison and the paired posterior samples (scvi-tools' ``_de_core`` semantics)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import pandas as pd


class GroupComparison(NamedTuple):
    """One comparison: group names and the cells of each group.

    ``group1``/``group2`` are the group labels (``group2 == "Rest"`` for one-vs-rest) with ``groupby``,
    and both ``None`` when the groups came from ``idx1``/``idx2`` (scvi-tools then omits the
    ``comparison``/``group1``/``group2`` columns). ``rows1``/``rows2`` are sorted, disjoint int64 row
    positions into ``obs``.
    """

    group1: Any
    group2: Any
    rows1: np.ndarray
    rows2: np.ndarray

    @property
    def comparison(self) -> str | None:
        """``"<group1> vs <group2>"``, or ``None`` for ``idx1``/``idx2`` comparisons."""
        return None if self.group1 is None else f"{self.group1} vs {self.group2}"


def _selection_mask(idx: Any, obs: pd.DataFrame, name: str) -> np.ndarray:
    """Boolean ``(n_obs,)`` mask from a mask, integer positions, obs names or an ``obs.query`` string."""
    n_obs = obs.shape[0]
    if isinstance(idx, str):
        try:
            selected = obs.eval(idx)
        except Exception as err:  # pandas raises many types (SyntaxError, UndefinedVariableError, ...)
            raise ValueError(f"{name}: could not evaluate the query {idx!r} on obs: {err}") from err
        if not isinstance(selected, pd.Series) or not pd.api.types.is_bool_dtype(selected.dtype):
            raise ValueError(f"{name}: the query {idx!r} must evaluate to one boolean per cell")
        return selected.to_numpy(dtype=bool, na_value=False)
    values = np.asarray(idx.to_numpy() if isinstance(idx, pd.Series | pd.Index) else idx)
    if values.ndim != 1:
        values = values.ravel()
    if values.dtype == bool:
        if values.shape[0] != n_obs:
            raise ValueError(f"{name}: boolean mask has length {values.shape[0]}, expected n_obs = {n_obs}")
        return values
    mask = np.zeros(n_obs, dtype=bool)
    if values.size == 0:
        return mask
    if values.dtype.kind in "iu":
        if values.min() < -n_obs or values.max() >= n_obs:
            raise ValueError(f"{name}: integer indices out of range for {n_obs} cells")
        mask[values] = True
        return mask
    if values.dtype.kind in "UO":
        positions = pd.Index(obs.index).get_indexer(values.astype(str))
        if (positions < 0).any():
            missing = values[positions < 0][:5].tolist()
            raise ValueError(f"{name}: obs names not found: {missing}")
        mask[positions] = True
        return mask
    raise ValueError(f"{name} must be a boolean mask, integer indices, obs names or a query string")


def resolve_group_indices(
    obs: pd.DataFrame,
    groupby: str | None = None,
    group1: Any = None,
    group2: Any = None,
    idx1: Any = None,
    idx2: Any = None,
) -> list[GroupComparison]:
    """The cell groups to compare, following ``scvi.model.base._de_core``.

    Parameters
    ----------
    obs
        Cell annotations ``(n_obs, n_columns)`` (``adata.obs``).
    groupby
        Column of ``obs`` defining the groups. Exclusive with ``idx1``.
    group1
        One group label or a list of them; each is compared with ``group2``. ``None``: every group present
        in ``obs[groupby]`` (category order, unused categories dropped).
    group2
        Reference group label; ``None`` compares each ``group1`` with all other cells ("Rest"; cells with
        a missing label count as "Rest", as in scvi-tools).
    idx1, idx2
        Alternative to ``groupby``: a boolean mask ``(n_obs,)``, integer positions, a list of obs names,
        or an ``obs.query``-style boolean expression string. ``idx2=None`` compares ``idx1`` with all
        other cells. Cells selected by both go to group 2 (scvi-tools' behaviour; a warning is issued).

    Returns
    -------
    list of GroupComparison
        ``(group1, group2, rows1, rows2)`` per comparison, rows as sorted int64 positions.

    Raises
    ------
    ValueError
        No grouping given; both ``groupby`` and ``idx1`` given (or ``group1``/``group2`` with ``idx1``);
        ``idx2`` without ``idx1``; unknown ``groupby`` column; a group absent from the column; a single
        group; a group compared with itself; an empty cell group; malformed indices or query.
    """
    if idx1 is not None:
        if groupby is not None:
            raise ValueError("Pass either groupby (with group1/group2) or idx1/idx2, not both")
        if group1 is not None or group2 is not None:
            raise ValueError("group1/group2 only apply with groupby; use idx1/idx2 alone")
        return [_index_groups(obs, idx1, idx2)]
    if idx2 is not None:
        raise ValueError("idx2 requires idx1")
    if groupby is None:
        raise ValueError("Pass groupby (a column of obs) or idx1 to define the groups")
    if groupby not in obs.columns:
        raise ValueError(f"groupby={groupby!r} is not a column of obs; columns: {list(obs.columns)}")
    return _label_groups(obs[groupby], groupby, group1, group2)


def _index_groups(obs: pd.DataFrame, idx1: Any, idx2: Any) -> GroupComparison:
    """The comparison of the cells selected by ``idx1`` with those of ``idx2`` (default: the rest)."""
    mask1 = _selection_mask(idx1, obs, "idx1")
    if idx2 is None:
        mask2 = ~mask1
    else:
        mask2 = _selection_mask(idx2, obs, "idx2")
        overlap = mask1 & mask2
        if overlap.any():
            warnings.warn(
                f"{int(overlap.sum())} cells are in both idx1 and idx2; they are assigned to group 2",
                UserWarning,
                stacklevel=3,
            )
            mask1 = mask1 & ~mask2
    if not mask1.any():
        raise ValueError("idx1 selects no cells")
    if not mask2.any():
        raise ValueError("idx2 selects no cells" if idx2 is not None else "idx1 selects every cell: no rest")
    return GroupComparison(None, None, np.flatnonzero(mask1), np.flatnonzero(mask2))


def _label_groups(labels: pd.Series, groupby: str, group1: Any, group2: Any) -> list[GroupComparison]:
    """Each ``group1`` label compared with ``group2`` (default: the rest) in the column ``labels``."""
    if group1 is None:
        present = labels.astype("category").cat.remove_unused_categories().cat.categories.tolist()
        if len(present) < 2:
            raise ValueError(f"Only a single group in obs[{groupby!r}]: cannot run DE on a single group")
        group1 = present
    elif isinstance(group1, str) or not isinstance(group1, Iterable):
        group1 = [group1]
    else:
        group1 = list(group1)
    if len(group1) == 0:
        raise ValueError("group1 is empty")

    def rows_of(group: Any, name: str) -> np.ndarray:
        mask = (labels == group).to_numpy(dtype=bool, na_value=False)
        if not mask.any():
            available = labels.astype("category").cat.remove_unused_categories().cat.categories.tolist()
            raise ValueError(f"{name}={group!r} has no cells in obs[{groupby!r}]; groups: {available}")
        return mask

    mask2 = None if group2 is None else rows_of(group2, "group2")
    out = []
    for g1 in group1:
        mask1 = rows_of(g1, "group1")
        if mask2 is None:
            rest = ~mask1
            if not rest.any():
                raise ValueError(f"group {g1!r} contains every cell: no rest to compare with")
            out.append(GroupComparison(g1, "Rest", np.flatnonzero(mask1), np.flatnonzero(rest)))
        else:
            if g1 == group2:
                raise ValueError(f"Cannot compare group {g1!r} with itself")
            out.append(GroupComparison(g1, group2, np.flatnonzero(mask1), np.flatnonzero(mask2)))
    return out


def draw_cells(rows: np.ndarray, n_samples: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Cells for ``n_samples`` posterior samples of a group, drawn uniformly with replacement.

    scvi-tools' ``scale_sampler`` draws ``n_samples // n_cells + 1`` posterior samples per cell and
    resamples ``n_samples`` of them with replacement; drawing the cells first and one posterior sample
    per drawn cell targets the same distribution at a fraction of the cost.

    Parameters
    ----------
    rows
        Cell positions of the group, ``(n_cells,)``.
    n_samples
        Number of samples (scvi-tools' ``n_samples_overall``, default 5000).
    rng
        Numpy generator or seed.

    Returns
    -------
    np.ndarray
        ``(n_samples,)`` cell positions (with repeats).
    """
    rows = np.asarray(rows)
    if rows.size == 0:
        raise ValueError("cannot draw cells from an empty group")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    return np.random.default_rng(rng).choice(rows, size=int(n_samples), replace=True)


def pairs_sampler(
    arr1: np.ndarray,
    arr2: np.ndarray,
    n_pairs: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair posterior samples of two groups (scvi-tools' ``pairs_sampler``).

    Parameters
    ----------
    arr1, arr2
        Samples ``(n1, n_genes)`` and ``(n2, n_genes)``.
    n_pairs
        ``None``: pair the samples in order (requires ``n1 == n2``; scvi-tools' default
        ``use_permutation=False``). An integer: draw ``n_pairs`` rows of each independently with
        replacement (``use_permutation=True, m_permutation=n_pairs``).
    rng
        Numpy generator or seed for the draws.

    Returns
    -------
    tuple of np.ndarray
        Paired samples, each ``(n_pairs, n_genes)``.
    """
    arr1, arr2 = np.asarray(arr1), np.asarray(arr2)
    if n_pairs is None:
        if arr1.shape[0] != arr2.shape[0]:
            raise ValueError(f"cannot pair {arr1.shape[0]} with {arr2.shape[0]} samples; pass n_pairs")
        return arr1, arr2
    rng = np.random.default_rng(rng)
    return arr1[rng.integers(0, arr1.shape[0], int(n_pairs))], arr2[rng.integers(0, arr2.shape[0], int(n_pairs))]
