"""Split invariants: disjoint, complete, sized as asked, no cold entity in train, time order."""

import numpy as np
import pytest

from mtl.data import splits as S


def table(n_users=30, n_items=40, n=600, seed=0):
    rng = np.random.default_rng(seed)
    user_N = rng.integers(0, n_users, n)
    item_N = rng.integers(0, n_items, n)
    timestamp_N = rng.integers(0, 50, n)  # many ties on purpose
    return user_N, item_N, timestamp_N


def check_partition(sp: S.Split, n: int) -> None:
    allrows = np.concatenate(sp)
    assert allrows.size == n and np.unique(allrows).size == n  # no overlap, nothing lost
    for part in sp:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)


def test_random_split_sizes_and_seed():
    sp = S.random_split(1000)
    check_partition(sp, 1000)
    assert (sp.train.size, sp.val.size, sp.test.size) == (800, 0, 200)
    again = S.random_split(1000, seed=42)
    assert all(np.array_equal(a, b) for a, b in zip(sp, again))
    other = S.random_split(1000, seed=7)
    assert not np.array_equal(sp.test, other.test)
    sp = S.random_split(1000, test_fraction=0.2, val_fraction=0.25)
    check_partition(sp, 1000)
    assert (sp.train.size, sp.val.size, sp.test.size) == (600, 200, 200)


def test_temporal_leave_last_out():
    user_N, _, timestamp_N = table()
    user_N = np.r_[user_N, 99]  # a user with a single rating stays in train
    timestamp_N = np.r_[timestamp_N, 5]
    sp = S.temporal_split(user_N, timestamp_N)
    check_partition(sp, user_N.size)
    assert 99 in set(user_N[sp.train]) and 99 not in set(user_N[sp.test])
    counts = np.bincount(user_N)
    assert sp.test.size == (counts >= 2).sum() and sp.val.size == (counts >= 3).sum()
    assert np.unique(user_N[sp.test]).size == sp.test.size  # one test row per user
    for u in np.unique(user_N):
        tr, va, te = (timestamp_N[p[user_N[p] == u]] for p in sp)
        if te.size:
            assert te.max() >= np.r_[tr, va].max()
        if va.size and tr.size:
            assert va.min() >= tr.max()
    no_val = S.temporal_split(user_N, timestamp_N, val=False)
    assert no_val.val.size == 0 and no_val.test.size == sp.test.size


@pytest.mark.parametrize("column", [0, 1])
def test_cold_start_entities_never_in_train(column):
    cols = table()
    ids_N = cols[column]
    sp = S.cold_start_split(ids_N, test_fraction=0.2, val_fraction=0.25, seed=3)
    check_partition(sp, ids_N.size)
    train_ids, val_ids, test_ids = (set(ids_N[p].tolist()) for p in sp)
    assert not train_ids & test_ids and not train_ids & val_ids and not val_ids & test_ids
    n_ids = np.unique(ids_N).size
    assert len(test_ids) == round(0.2 * n_ids)
    kind = ("cold_user", "cold_item")[column]
    via = S.make_split(kind, user_N=cols[0], item_N=cols[1], val_fraction=0.25, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(sp, via))


def test_make_split_dispatch_and_errors():
    user_N, item_N, timestamp_N = table()
    sp = S.make_split("temporal", user_N=user_N, item_N=item_N, timestamp_N=timestamp_N)
    assert sp.val.size == 0
    assert S.make_split("random", user_N=user_N, item_N=item_N).test.size == 120
    with pytest.raises(ValueError, match="split kind: unknown value 'cold'.*cold_user"):
        S.make_split("cold", user_N=user_N, item_N=item_N)
    with pytest.raises(ValueError, match="timestamp_N"):
        S.make_split("temporal", user_N=user_N, item_N=item_N)


def test_empty_splits_raise():
    with pytest.raises(ValueError, match="split 'test': empty"):
        S.random_split(2, test_fraction=0.2)
    with pytest.raises(ValueError, match="split 'val': empty"):
        S.random_split(10, val_fraction=0.01)
    with pytest.raises(ValueError, match="split 'test': empty"):
        S.temporal_split(np.arange(5), np.zeros(5))  # every user has one rating
    with pytest.raises(ValueError, match="split 'test': empty"):
        S.cold_start_split(np.zeros(10, int))
    with pytest.raises(ValueError, match="test_fraction: 1.5"):
        S.random_split(10, test_fraction=1.5)
