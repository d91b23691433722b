"""Dataset validation and whole-epoch batching: each row once per epoch, padding weight 0."""

import jax
import numpy as np
import pytest

from mtl.data.batching import Dataset, epoch_batches, eval_batches, num_batches
from mtl.spec import FeatureSpec, TaskSpec

N = 23


def make(n=N, masks=None, **overrides) -> Dataset:
    rng = np.random.default_rng(0)
    features = {
        "row": np.arange(n),  # identifies each example
        "x": rng.standard_normal((n, 3)).astype(np.float32),
        "bag": rng.integers(0, 3, (n, 5)).astype(np.float32),
    }
    labels = {
        "click": (rng.random(n) < 0.5).astype(np.float32),
        "score": rng.standard_normal(n).astype(np.float32),
        "tags": (rng.random((n, 4)) < 0.5).astype(np.float32),
        "item": rng.integers(0, 9, n),
    }
    features.update({k: v for k, v in overrides.items() if k in features})
    labels.update({k: v for k, v in overrides.items() if k in labels})
    return Dataset(
        features=features,
        labels=labels,
        feature_specs=(
            FeatureSpec("row", "categorical", max(n, 1)),
            FeatureSpec("x", "dense", 3),
            FeatureSpec("bag", "multihot", 5),
        ),
        task_specs=(
            TaskSpec("click", "binary"),
            TaskSpec("score", "regression"),
            TaskSpec("tags", "multilabel", size=4),
            TaskSpec("item", "retrieval"),
        ),
        masks=masks or {},
    )


def test_epoch_shapes_and_every_row_once():
    ds = make()
    b = epoch_batches(ds, 5, jax.random.key(0))
    s = num_batches(N, 5)
    assert s == 5
    assert b["features"]["x"].shape == (s, 5, 3) and b["labels"]["tags"].shape == (s, 5, 4)
    assert b["valid"].shape == (s, 5) and b["valid"].dtype == np.float32
    assert set(b) == {"features", "labels", "masks", "valid"}
    assert all(m.shape == (s, 5) for m in b["masks"].values())
    valid = np.asarray(b["valid"]).reshape(-1) > 0
    rows = np.asarray(b["features"]["row"]).reshape(-1)
    np.testing.assert_array_equal(np.sort(rows[valid]), np.arange(N))  # each row exactly once
    assert valid.sum() == N and (~valid).sum() == s * 5 - N
    assert np.all(rows[~valid] == 0)  # padding rows are copies of row 0 ...
    assert np.all(valid[:N])  # ... at the end of the last batch, with weight 0
    np.testing.assert_array_equal(np.asarray(b["masks"]["click"]).reshape(-1), 1.0)
    x = np.asarray(b["features"]["x"]).reshape(-1, 3)
    np.testing.assert_array_equal(x[valid], ds.features["x"][rows[valid]])  # rows stay aligned
    lab = np.asarray(b["labels"]["item"]).reshape(-1)
    np.testing.assert_array_equal(lab[valid], ds.labels["item"][rows[valid]])


def test_shuffle_depends_on_key():
    ds = make().to_device()
    order = lambda k: np.asarray(epoch_batches(ds, 4, jax.random.key(k))["features"]["row"])
    np.testing.assert_array_equal(order(1), order(1))
    assert not np.array_equal(order(1), order(2))
    assert not np.array_equal(order(1).reshape(-1)[:N], np.arange(N))


def test_eval_batches_in_order_and_big_batch():
    ds = make()
    b = eval_batches(ds, 10)
    rows = np.asarray(b["features"]["row"]).reshape(-1)
    np.testing.assert_array_equal(rows[:N], np.arange(N))
    assert np.asarray(b["valid"]).sum() == N
    one = eval_batches(ds, 100)
    assert one["valid"].shape == (1, 100) and float(one["valid"].sum()) == N
    exact = eval_batches(make(20), 5)
    assert exact["valid"].shape == (4, 5) and float(exact["valid"].min()) == 1.0


def test_masks_are_carried_and_device_matches_host():
    m = (np.arange(N) % 2).astype(np.float32)
    ds = make(masks={"score": m})
    host = eval_batches(ds, 6)
    dev = eval_batches(ds.to_device(), 6)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(dev)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(host["masks"]["score"]).reshape(-1)[:N], m)
    np.testing.assert_array_equal(np.asarray(host["masks"]["click"]).reshape(-1), 1.0)


def test_take_and_len():
    ds = make()
    sub = ds.take([3, 5, 7])
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.features["row"], [3, 5, 7])
    assert sub.task_specs == ds.task_specs


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"x": np.full((N, 3), np.nan, np.float32)}, r"feature 'x' .*NaN/inf.*first at row 0"),
        (
            {"x": np.where(np.arange(N)[:, None] == 4, np.inf, np.zeros((N, 3)))},
            r"feature 'x' .*row 4",
        ),
        ({"row": np.arange(N) + 1}, r"feature 'row' .*id 23 out of range \[0, 23\) at row 22"),
        ({"row": np.arange(N) - 1}, r"feature 'row' .*id -1 out of range"),
        ({"row": np.arange(N, dtype=np.float32)}, r"feature 'row' .*expected integer ids"),
        ({"x": np.zeros((N, 2), np.float32)}, r"feature 'x' .*shape \(23, 2\), expected \[23, 3\]"),
        ({"bag": -np.ones((N, 5), np.float32)}, r"feature 'bag' .*negative"),
        ({"click": np.full(N, 2.0, np.float32)}, r"label 'click' .*not 0/1"),
        ({"score": np.full(N, np.nan, np.float32)}, r"label 'score' .*NaN/inf"),
        ({"tags": np.zeros((N, 3), np.float32)}, r"label 'tags' .*shape"),
        ({"item": np.full(N, -2)}, r"label 'item' .*id -2 out of range"),
        ({"click": np.zeros(N - 1, np.float32)}, r"rows: arrays disagree"),
    ],
)
def test_bad_arrays_raise_naming_the_field(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(**overrides)


def test_bad_structure_and_empty():
    ds = make()
    with pytest.raises(ValueError, match=r"features: keys .*missing \['bag'\]"):
        Dataset(
            {"row": ds.features["row"], "x": ds.features["x"]},
            ds.labels,
            ds.feature_specs,
            ds.task_specs,
        )
    with pytest.raises(ValueError, match=r"masks: keys \['nope'\] are not tasks"):
        make(masks={"nope": np.ones(N, np.float32)})
    with pytest.raises(ValueError, match=r"masks\['click'\]"):
        make(masks={"click": np.full(N, 3.0, np.float32)})
    empty = ds.take(np.array([], np.int64))
    assert len(empty) == 0
    with pytest.raises(ValueError, match="0 rows"):
        epoch_batches(empty, 4, jax.random.key(0))
    with pytest.raises(ValueError, match="batch_size: 0"):
        eval_batches(ds, 0)
