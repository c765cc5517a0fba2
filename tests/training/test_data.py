"""Seeded, stratified splits and folds."""

from __future__ import annotations

import numpy as np

from modelloop.training.data import kfold_indices, split_dataset
from modelloop.training.spec import Dataset


def _dataset(n: int = 300) -> Dataset:
    rng = np.random.default_rng(1)
    y = np.array([0] * (n * 2 // 3) + [1] * (n - n * 2 // 3))
    return Dataset(rng.normal(size=(n, 3)).astype(np.float32), y, ["a", "b", "c"], ["no", "yes"])


def test_split_is_disjoint_and_complete():
    data = _dataset()
    split = split_dataset(data, classification=True, seed=3)
    parts = [split.train, split.val, split.test]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(data.y)
    assert len(split.test) == 60
    assert len(split.val) == 45


def test_split_is_stratified():
    data = _dataset()
    split = split_dataset(data, classification=True, seed=3)
    for part in (split.train, split.val, split.test):
        assert abs(data.y[part].mean() - data.y.mean()) < 0.03


def test_split_depends_only_on_the_seed():
    data = _dataset()
    a = split_dataset(data, classification=True, seed=7)
    b = split_dataset(data, classification=True, seed=7)
    c = split_dataset(data, classification=True, seed=8)
    assert np.array_equal(a.test, b.test)
    assert not np.array_equal(a.test, c.test)


def test_regression_split_is_not_stratified_but_complete():
    data = _dataset()
    data = Dataset(data.x, data.y.astype(np.float32) * 3.5, data.feature_names)
    split = split_dataset(data, classification=False, seed=0)
    assert len(np.concatenate([split.train, split.val, split.test])) == 300


def test_kfold_covers_every_row_once_as_validation():
    y = _dataset().y
    seen = np.concatenate([va for _, va in kfold_indices(y, folds=4, classification=True, seed=0)])
    assert sorted(seen.tolist()) == list(range(len(y)))
    for tr, va in kfold_indices(y, folds=4, classification=True, seed=0):
        assert not set(tr.tolist()) & set(va.tolist())
        assert abs(y[va].mean() - y.mean()) < 0.05
