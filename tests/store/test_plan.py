"""The cross-fitting folds: scikit-learn's KFold(shuffle=True) without importing it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import KFold

from gaussian_ad.store.plan import fold_ids, holdout_split, kfold_held_out


@pytest.mark.parametrize(("n", "n_folds", "seed"), [(7, 3, 0), (100, 5, 0), (542, 5, 3), (5, 5, 1)])
def test_folds_equal_sklearn_kfold(n, n_folds, seed):
    reference = list(KFold(n_folds, shuffle=True, random_state=seed).split(np.arange(n)))
    folds = kfold_held_out(n, n_folds, seed)
    assert len(folds) == n_folds
    for fold, (_, held) in zip(folds, reference, strict=True):
        np.testing.assert_array_equal(fold, held)
    fit_idx, held_idx = holdout_split(n, n_folds, seed)
    np.testing.assert_array_equal(fit_idx, reference[0][0])
    np.testing.assert_array_equal(held_idx, reference[0][1])


def test_fold_ids_group_copies_of_an_image():
    keys = ["b.png", "a.png", "c.png", "a.png", "b.png", "d.png"]
    folds = fold_ids(keys, n_folds=2, seed=0)
    assert folds[1] == folds[3] and folds[0] == folds[4]
    assert set(folds) == {0, 1}


def test_bad_fold_counts_are_refused():
    with pytest.raises(ValueError, match="n_folds"):
        kfold_held_out(3, 4, 0)
