"""Train/val/test splits of a ratings table as sorted index arrays.

random: rows shuffled with a seed (default 42, as in the TFRS tutorials), 80/20 by default.
temporal: leave-last-out per user (last rating -> test, the one before -> val). It is
deterministic and has no sizes to choose: it takes no ``test_fraction`` or ``seed`` (``make_split``
refuses them), and ``val_fraction`` only switches validation on (any value > 0) or off (0).
cold_user / cold_item: a random share of users (items) is held out with all its ratings, so a
test user (item) never appears in train; validation users (items) are carved from the train ones
and are likewise absent from train.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mtl.spec import integer, real, unknown

SPLITS = ("random", "temporal", "cold_user", "cold_item")


class Split(NamedTuple):
    """Row indices of each side, sorted ascending; disjoint; together all rows."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _fraction(name: str, value: float) -> float:
    v = real(name, value, "; pass a fraction in [0, 1) such as 0.2")
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}: {value} must lie in [0, 1)")
    return v


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
    n = integer("n", n, 0)
    _fraction("test_fraction", test_fraction)
    _fraction("val_fraction", val_fraction)
    perm = np.random.default_rng(integer("seed", seed)).permutation(n)
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
    seed = integer("seed", seed)
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
    test_fraction: float | None = None,
    val_fraction: float = 0.0,
    seed: int | None = None,
) -> Split:
    """The split named ``kind`` (one of SPLITS) over a ratings table given as columns.

    random, cold_user, cold_item: ``test_fraction`` and ``val_fraction`` of the rows (users, items)
    shuffled with ``seed``; None takes the default of ``random_split`` / ``cold_start_split`` (0.2,
    42). temporal: each user's last rating is test and, when ``val_fraction`` > 0, the one before
    is val (the value sets no size); it needs ``timestamp_N``, is deterministic, and refuses
    ``test_fraction`` and ``seed`` (pass neither)."""
    if kind not in SPLITS:
        raise unknown("split kind", kind, SPLITS)
    if kind == "temporal":
        for name, value, why in (
            ("test_fraction", test_fraction, "each user's last rating is the test row"),
            ("seed", seed, "the split is deterministic"),
        ):
            if value is not None:
                raise ValueError(
                    f"{name}: {value!r} given, but the temporal split takes no {name} ({why}); "
                    f"omit {name} for kind='temporal'"
                )
        if timestamp_N is None:
            raise ValueError("timestamp_N: the temporal split needs timestamps; pass timestamp_N")
        return temporal_split(user_N, timestamp_N, val=_fraction("val_fraction", val_fraction) > 0)
    given = {k: v for k, v in (("test_fraction", test_fraction), ("seed", seed)) if v is not None}
    if kind == "random":
        return random_split(len(user_N), val_fraction=val_fraction, **given)
    entity_N = user_N if kind == "cold_user" else item_N
    return cold_start_split(entity_N, val_fraction=val_fraction, **given)
