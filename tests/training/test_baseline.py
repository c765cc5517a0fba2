"""Reference statistics for drift: bins, constant features and prediction shares."""

from __future__ import annotations

import numpy as np

from modelloop.training.baseline import (
    bin_index,
    build_baseline,
    feature_reference,
    prediction_reference,
    proportions,
    quantile_edges,
)


def test_quantile_bins_hold_about_equal_shares():
    values = np.random.default_rng(0).normal(size=10_000)
    edges = quantile_edges(values, bins=10)
    assert len(edges) == 9
    shares = proportions(values, edges)
    assert np.allclose(shares, 0.1, atol=0.005)
    assert abs(shares.sum() - 1.0) < 1e-12


def test_discrete_values_collapse_repeated_edges():
    values = np.array([0.0] * 80 + [16.0] * 20)
    edges = quantile_edges(values, bins=10)
    assert edges.tolist() == [0.0]
    assert proportions(values, edges).tolist() == [0.8, 0.2]


def test_bin_index_is_left_closed_on_the_edge_side():
    edges = np.array([1.0, 2.0])
    assert bin_index(np.array([0.5, 1.0, 1.5, 2.0, 9.0]), edges).tolist() == [0, 0, 1, 1, 2]


def test_constant_feature_is_flagged_with_a_single_bin():
    ref = feature_reference("pixel_0_0", 0, np.zeros(50, dtype=np.float32))
    assert ref["constant"] is True
    assert ref["edges"] == []
    assert ref["proportions"] == [1.0]
    assert ref["std"] == 0.0


def test_prediction_reference_for_each_task():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    cls = prediction_reference("multiclass", probs, ["a", "b"])
    assert cls == {"kind": "class", "labels": ["a", "b"], "proportions": [0.5, 0.5]}
    binary = prediction_reference("binary", np.array([[0.9], [0.1], [0.7], [0.8]]), ["neg", "pos"])
    assert binary["proportions"] == [0.25, 0.75]
    reg = prediction_reference("regression", np.arange(100, dtype=float).reshape(-1, 1), [])
    assert reg["kind"] == "binned"
    assert len(reg["proportions"]) == len(reg["edges"]) + 1


def test_baseline_sample_is_bounded_and_seeded():
    x = np.random.default_rng(0).normal(size=(3000, 3)).astype(np.float32)
    kwargs = dict(
        x_train=x,
        feature_names=["a", "b", "c"],
        input_name="features",
        task="regression",
        val_outputs=np.ones((10, 1)),
        class_labels=[],
        seed=5,
        sample_rows=200,
    )
    a = build_baseline(**kwargs)
    b = build_baseline(**kwargs)
    assert len(a["reference_sample"]) == 200
    assert a["reference_sample"] == b["reference_sample"]
    assert [f["name"] for f in a["features"]] == ["a", "b", "c"]
    assert a["rows"] == 3000
