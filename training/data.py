"""Seeded splits: train/validation/test and K folds, stratified for classification."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from modelloop.training.spec import Dataset


@dataclass(frozen=True)
class Split:
    """Row indices of the three parts of one dataset."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_dataset(
    data: Dataset,
    *,
    classification: bool,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> Split:
    """Splits row indices into train, validation and test parts.

    Args:
        data: The dataset to split.
        classification: Stratify by class so each part keeps the class balance.
        seed: Seed of the shuffle; the same seed gives the same split.
        val_fraction: Share of all rows for validation. Defaults to 0.15.
        test_fraction: Share of all rows for the test. Defaults to 0.2.

    Returns:
        Disjoint index arrays that together cover every row.
    """
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(data.y))
    strat = data.y if classification else None
    rest, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=strat)
    strat_rest = data.y[rest] if classification else None
    train, val = train_test_split(
        rest, test_size=val_fraction / (1.0 - test_fraction), random_state=seed, stratify=strat_rest
    )
    return Split(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def kfold_indices(
    y: np.ndarray, *, folds: int, classification: bool, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (train, validation) positions of ``folds`` folds over ``y``."""
    from sklearn.model_selection import KFold, StratifiedKFold

    splitter = (
        StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        if classification
        else KFold(n_splits=folds, shuffle=True, random_state=seed)
    )
    yield from splitter.split(np.zeros(len(y)), y)
