"""Train/val/test splits of a ratings table as sorted index arrays.

random: rows shuffled with a seed (default 42, as in the TFRS tutorials), 80/20 by default.
temporal: leave-last-out per user (last rating -> test, the one before -> val).
cold_user / cold_item: a random share of users (items) is held out with all its ratings, so a
test user (item) never appears in train; validation users (items) are carved from the train ones
and are likewise absent from train.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mtl.spec import unknown

SPLITS = ("random", "temporal", "cold_user", "cold_item")


class Split(NamedTuple):
    """Row indices of each side, sorted ascending; disjoint; together all rows."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: {value} must lie in [0, 1)")
    return float(value)


def _finish(
    train: np.ndarray, val: np.ndarray, test: np.ndarray, how: str, want_val: bool
) -> Split:
    for name, idx, needed in (("train", train, True), ("test", test, True), ("val", val, want_val)):
        if needed and idx.size == 0:
            raise ValueError(
                f"split {name!r}: empty ({how}); use more data or other split parameters"
            )
    return Split(*(np.sort(np.asarray(i, dtype=np.int64)) for i in (train, val, test)))


def _carve(n: int, fraction: float) -> int:
    return int(round(n * fraction))


def random_split(
    n: int, test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 42
) -> Split:
    """Shuffle rows with ``seed``; test = round(n·test_fraction); val = round(rest·val_fraction)."""
    _fraction("test_fraction", test_fraction)
    _fraction("val_fraction", val_fraction)
    perm = np.random.default_rng(seed).permutation(int(n))
    n_test = _carve(n, test_fraction)
    rest = perm[n_test:]
    n_val = _carve(rest.size, val_fraction)
    how = f"random over {n} rows, test_fraction={test_fraction}, val_fraction={val_fraction}"
    return _finish(rest[n_val:], rest[:n_val], perm[:n_test], how, val_fraction > 0)


def temporal_split(user_N: np.ndarray, timestamp_N: np.ndarray, val: bool = True) -> Split:
    """Leave-last-out per user: last rating -> test (>= 2 ratings), next-to-last -> val (>= 3)."""
    user_N, timestamp_N = np.asarray(user_N), np.asarray(timestamp_N)
    if user_N.shape != timestamp_N.shape or user_N.ndim != 1:
        raise ValueError(f"user_N, timestamp_N: shapes {user_N.shape}, {timestamp_N.shape} differ")
    n = user_N.size
    order = np.lexsort((np.arange(n), timestamp_N, user_N))  # by user, then time, then row
    u = user_N[order]
    start = np.r_[True, u[1:] != u[:-1]]
    group = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    count = np.diff(np.r_[first, n])[group]
    rank_from_end = count - 1 - (np.arange(n) - first[group])
    to_test = (rank_from_end == 0) & (count >= 2)
    to_val = (rank_from_end == 1) & (count >= 3) & val
    how = f"temporal leave-last-out over {n} rows and {first.size} users"
    return _finish(order[~(to_test | to_val)], order[to_val], order[to_test], how, val)


def cold_start_split(
    entity_N: np.ndarray, test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 42
) -> Split:
    """Hold out a ``test_fraction`` of the distinct ids in ``entity_N`` (user or item ids) with all
    their rows; ``val_fraction`` of the remaining ids goes to val."""
    _fraction("test_fraction", test_fraction)
    _fraction("val_fraction", val_fraction)
    entity_N = np.asarray(entity_N)
    ids = np.unique(entity_N)
    perm = np.random.default_rng(seed).permutation(ids)
    n_test = _carve(ids.size, test_fraction)
    rest = perm[n_test:]
    n_val = _carve(rest.size, val_fraction)
    test_rows = np.flatnonzero(np.isin(entity_N, perm[:n_test]))
    val_rows = np.flatnonzero(np.isin(entity_N, rest[:n_val]))
    train_rows = np.flatnonzero(np.isin(entity_N, rest[n_val:]))
    how = (
        f"cold start over {ids.size} ids, test_fraction={test_fraction}, "
        f"val_fraction={val_fraction}"
    )
    return _finish(train_rows, val_rows, test_rows, how, val_fraction > 0)


def make_split(
    kind: str,
    *,
    user_N: np.ndarray,
    item_N: np.ndarray,
    timestamp_N: np.ndarray | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 42,
) -> Split:
    """The split named ``kind`` (one of SPLITS) over a ratings table given as columns."""
    if kind == "random":
        return random_split(len(user_N), test_fraction, val_fraction, seed)
    if kind == "temporal":
        if timestamp_N is None:
            raise ValueError("timestamp_N: the temporal split needs timestamps; pass timestamp_N")
        return temporal_split(user_N, timestamp_N, val=val_fraction > 0)
    if kind == "cold_user":
        return cold_start_split(user_N, test_fraction, val_fraction, seed)
    if kind == "cold_item":
        return cold_start_split(item_N, test_fraction, val_fraction, seed)
    raise unknown("split kind", kind, SPLITS)
