"""In-memory datasets and whole-epoch batching in the scanned shape [S, B, ...] on device.

``epoch_batches`` returns one pytree per epoch, ``{"features", "labels", "masks", "valid"}``, whose
every leaf is [S, B, ...] with S = ceil(n / B); the last batch is padded with copies of row 0 and
``valid`` is 0.0 on those rows, so no example is dropped and padding carries no weight.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl.spec import FeatureSpec, TaskSpec, integer, task_names

Array = Any  # np.ndarray on the host, jax.Array after ``to_device``


def _first_bad(mask_N: np.ndarray) -> int:
    return int(np.flatnonzero(mask_N.reshape(mask_N.shape[0], -1).any(-1))[0])


def _numeric(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_


def _host(field: str, value: Any) -> np.ndarray:
    """``value`` (np.ndarray, jax.Array, list, ...) as a numpy array on the host."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{field}: cannot be made an array ({e}); pass an np.ndarray with one row per example"
        ) from None


def _check_feature(spec: FeatureSpec, x: np.ndarray, n: int) -> np.ndarray:
    where = f"feature {spec.name!r} ({spec.kind}, dim {spec.dim})"
    if spec.kind == "categorical":
        if x.ndim != 1:
            raise ValueError(f"{where}: shape {x.shape}, expected [{n}] ids; pass one id per row")
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{where}: dtype {x.dtype}, expected integer ids; map values to ids")
        bad = (x < 0) | (x >= spec.dim)
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(
                f"{where}: id {int(x[i])} out of range [0, {spec.dim}) at row {i}; "
                f"remap the ids or raise FeatureSpec.dim"
            )
        return x.astype(np.int32, copy=False)
    if x.ndim != 2 or x.shape[1] != spec.dim:
        raise ValueError(f"{where}: shape {x.shape}, expected [{n}, {spec.dim}]; fix dim or array")
    if not _numeric(x):
        raise ValueError(
            f"{where}: dtype {x.dtype}, expected numbers; convert the values to floats"
        )
    x = x.astype(np.float32, copy=False)
    lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)  # NaN/inf show up here, no temporaries
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = ~np.isfinite(x)
        raise ValueError(
            f"{where}: {int(bad.sum())} NaN/inf values, first at row {_first_bad(bad)}; "
            f"impute or drop them before building the Dataset"
        )
    if spec.kind == "multihot" and lo < 0:
        raise ValueError(
            f"{where}: negative counts at row {_first_bad(x < 0)}; counts must be >= 0"
        )
    return x


def _check_label(task: TaskSpec, y: np.ndarray, n: int) -> np.ndarray:
    where = f"label {task.name!r} ({task.kind})"
    shape = (n, task.size) if task.kind == "multilabel" else (n,)
    if y.shape != shape:
        raise ValueError(
            f"{where}: shape {y.shape}, expected {list(shape)}; reshape the labels or fix the spec"
        )
    if task.kind in ("multiclass", "retrieval"):
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{where}: dtype {y.dtype}, expected integer class/item ids; map labels to ids"
            )
        hi = task.size if task.kind == "multiclass" else np.iinfo(np.int32).max
        bad = (y < 0) | (y >= hi)
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(f"{where}: id {int(y[i])} out of range [0, {hi}) at row {i}")
        return y.astype(np.int32, copy=False)
    if not _numeric(y):
        raise ValueError(
            f"{where}: dtype {y.dtype}, expected numbers; convert the labels to floats"
        )
    y = y.astype(np.float32, copy=False)
    bad = ~np.isfinite(y)
    if bad.any():
        raise ValueError(f"{where}: NaN/inf at row {_first_bad(bad)}; mask missing labels instead")
    if task.kind in ("binary", "multilabel"):
        bad = (y != 0.0) & (y != 1.0)
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(
                f"{where}: value {y.reshape(n, -1)[i]} at row {i} is not 0/1; "
                "binarise the labels or use a regression task"
            )
    return y


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Rows of features and labels as arrays [n, ...], with the specs that describe them.

    The constructor takes any array-like leaves (np.ndarray, jax.Array, lists), converts each to
    numpy on the host with ``np.asarray`` and checks it against its spec (shapes, dtypes, id
    ranges, 0/1 labels, NaN/inf); ``to_device`` then makes the device copy used for batching."""

    features: dict[str, Array]
    labels: dict[str, Array]
    feature_specs: tuple[FeatureSpec, ...]
    task_specs: tuple[TaskSpec, ...]
    masks: dict[str, Array] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_specs", tuple(self.feature_specs))
        object.__setattr__(self, "task_specs", tuple(self.task_specs))
        names = task_names(self.task_specs)
        fnames = [f.name for f in self.feature_specs]
        if len(set(fnames)) != len(fnames):
            raise ValueError(f"feature_specs: duplicate feature names in {fnames}")
        for field, have, want in (
            ("features", set(self.features), set(fnames)),
            ("labels", set(self.labels), set(names)),
        ):
            if have != want:
                raise ValueError(
                    f"{field}: keys {sorted(have)} do not match the specs {sorted(want)} "
                    f"(missing {sorted(want - have)}, extra {sorted(have - want)})"
                )
        extra = sorted(set(self.masks) - set(names))
        if extra:
            raise ValueError(f"masks: keys {extra} are not tasks; tasks are {list(names)}")
        for field in ("features", "labels", "masks"):
            d = getattr(self, field)
            object.__setattr__(self, field, {k: _host(f"{field}[{k!r}]", v) for k, v in d.items()})
        leaves = {**self.features, **self.labels, **self.masks}
        sizes = {k: int(v.shape[0]) if v.ndim else -1 for k, v in leaves.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"rows: arrays disagree on the number of rows: {sizes}; give each one row per example"
            )
        self._check_host()

    def _check_host(self) -> None:
        n = len(self)
        feats = {s.name: _check_feature(s, self.features[s.name], n) for s in self.feature_specs}
        labels = {t.name: _check_label(t, self.labels[t.name], n) for t in self.task_specs}
        masks = {}
        for k, m in self.masks.items():
            m = m.astype(np.float32, copy=False) if _numeric(m) else m
            if not _numeric(m) or m.shape != (n,) or not np.all((m >= 0.0) & (m <= 1.0)):
                raise ValueError(f"masks[{k!r}]: expected shape [{n}] with values in [0, 1]")
            masks[k] = m
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "masks", masks)

    def __len__(self) -> int:
        return int(np.shape(next(iter(self.labels.values())))[0])

    def take(self, idx_N: Sequence[int] | np.ndarray) -> Dataset:
        """The rows ``idx_N`` (e.g. one side of a split), same specs: integer row indices in
        [0, len), or a boolean mask with one entry per row (the rows where it is True)."""
        n = len(self)
        idx = np.asarray(idx_N)
        if idx.dtype == np.bool_:
            if idx.shape != (n,):
                raise ValueError(
                    f"idx_N: a boolean mask of shape {idx.shape}; a mask needs shape [{n}], one "
                    f"entry per row; pass such a mask or integer row indices"
                )
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)  # [] has dtype float64 and selects nothing
        elif not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"idx_N: dtype {idx.dtype} (e.g. {idx.reshape(-1)[0].item()!r}): row indices must be "
                f"integers (floats are not truncated); pass integer row indices in [0, {n}) or a "
                f"boolean mask of shape [{n}]"
            )
        if idx.ndim != 1:
            raise ValueError(f"idx_N: shape {idx.shape}; pass a 1-D array of row indices")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][0]
            raise ValueError(f"idx_N: index {bad} out of range; indices must lie in [0, {n})")
        pick = lambda d: {k: v[idx] for k, v in d.items()}
        return self._trusted(pick(self.features), pick(self.labels), pick(self.masks))

    def _trusted(self, features: dict, labels: dict, masks: dict) -> Dataset:
        """A copy with new arrays already known to be valid (rows of this one): no re-validation."""
        out = object.__new__(Dataset)
        for k, v in dict(features=features, labels=labels, masks=masks).items():
            object.__setattr__(out, k, v)
        object.__setattr__(out, "feature_specs", self.feature_specs)
        object.__setattr__(out, "task_specs", self.task_specs)
        return out

    def tree(self) -> dict[str, dict[str, Array]]:
        """The arrays as ``{"features", "labels", "masks"}``; absent masks are ones."""
        ones = lambda: np.ones(len(self), np.float32)
        masks = {t.name: self.masks.get(t.name, None) for t in self.task_specs}
        masks = {k: ones() if v is None else v for k, v in masks.items()}
        return {"features": dict(self.features), "labels": dict(self.labels), "masks": masks}

    def to_device(self, sharding: jax.sharding.Sharding | None = None) -> Dataset:
        """A copy whose arrays live on device (one transfer; then batching needs no host work)."""
        t = jax.device_put(self.tree(), sharding)
        return self._trusted(t["features"], t["labels"], t["masks"])


def _check_batch_size(ds: Dataset, batch_size: int) -> int:
    if len(ds) == 0:
        raise ValueError("dataset: 0 rows (empty split?); check the split fractions and the data")
    return integer("batch_size", batch_size, 1)


@functools.partial(jax.jit, static_argnames=("batch_size", "shuffle"))
def _batches(tree: Mapping[str, Any], key: jax.Array, batch_size: int, shuffle: bool) -> dict:
    n = next(iter(tree["labels"].values())).shape[0]
    s = -(-n // batch_size)
    order_N = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    idx_SxB = jnp.concatenate([order_N, jnp.zeros(s * batch_size - n, order_N.dtype)])
    idx_SxB = idx_SxB.reshape(s, batch_size)
    out = jax.tree.map(lambda x: jnp.take(x, idx_SxB, axis=0), dict(tree))
    out["valid"] = (jnp.arange(s * batch_size) < n).astype(jnp.float32).reshape(s, batch_size)
    return out


def epoch_batches(dataset: Dataset, batch_size: int, key: jax.Array) -> dict[str, Any]:
    """One shuffled epoch as a pytree of [S, B, ...] leaves plus ``valid`` [S, B] (0 on padding)."""
    return _batches(dataset.tree(), key, _check_batch_size(dataset, batch_size), True)


def eval_batches(dataset: Dataset, batch_size: int) -> dict[str, Any]:
    """All rows in order as a pytree of [S, B, ...] leaves plus ``valid`` [S, B] (0 on padding)."""
    return _batches(
        dataset.tree(), jax.random.key(0), _check_batch_size(dataset, batch_size), False
    )


def num_batches(n: int, batch_size: int) -> int:
    """S = ceil(n / B)."""
    return -(-integer("n", n, 0) // integer("batch_size", batch_size, 1))
