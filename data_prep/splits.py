"""Train/validation/test assignment: grouped (no id in two splits), stratified, deterministic for a seed."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

SPLITS = ("train", "validation", "test")


def _take_fold(indices: np.ndarray, strata: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices (into ``indices``) of one stratified, grouped fold holding about ``fraction`` of the groups."""
    n_groups = len(set(groups[indices]))
    if fraction <= 0 or n_groups < 2:
        return np.array([], dtype=int)
    n_splits = min(max(2, round(1 / fraction)), n_groups)
    largest_stratum = max(Counter(strata[indices].tolist()).values())
    if largest_stratum < n_splits:  # too few rows to stratify at all (tiny inputs): grouped only
        splitter = GroupShuffleSplit(n_splits=1, test_size=1 / n_splits, random_state=seed)
        _, fold = next(splitter.split(indices, groups=groups[indices]))
        return indices[fold]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare scenarios have fewer groups than folds; that is expected
        warnings.simplefilter("ignore", UserWarning)
        _, fold = next(splitter.split(indices, strata[indices], groups[indices]))
    return indices[fold]


def assign_splits(
    groups: Sequence[str],
    strata: Sequence[str],
    sources: Sequence[str],
    validation_fraction: float,
    test_fraction: float,
    holdout_sources: Sequence[str] = (),
    seed: int = 0,
) -> list[str]:
    """One split name per row.

    Rows sharing a group (a SafeMT id: all its lengths and prefixes) always share a split. Rows whose
    source is in ``holdout_sources`` all go to test; the rest are split by ``StratifiedGroupKFold``
    (stratified by ``strata``, the scenario): first a test fold of about ``test_fraction``, then from
    what is left a validation fold of about ``validation_fraction`` of the whole.
    """
    groups_a = np.asarray(groups, dtype=object)
    strata_a = np.asarray(strata, dtype=object)
    held = np.isin(np.asarray(sources, dtype=object), list(holdout_sources))
    split = np.full(len(groups_a), "train", dtype=object)
    split[held] = "test"
    rest = np.flatnonzero(~held)
    test = _take_fold(rest, strata_a, groups_a, test_fraction, seed)
    split[test] = "test"
    rest = np.setdiff1d(rest, test)
    relative = validation_fraction / (1 - test_fraction) if test_fraction < 1 else 0
    validation = _take_fold(rest, strata_a, groups_a, relative, seed + 1)
    split[validation] = "validation"
    return split.tolist()
