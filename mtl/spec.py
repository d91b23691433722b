"""Task and feature specifications: the one interface every model, loss and data loader shares.

A batch is a dict ``{"features": {name: array}, "labels": {task: array}, "masks": {task: array}}``
("masks" optional: 1.0 where the label is present, 0.0 where it is missing).

Feature kinds:
  dense        float32 [B, dim]                 fed as is
  categorical  int32   [B]      ids in [0, dim) looked up in an embedding table of ``dim`` rows
  multihot     float32 [B, dim] counts/indicators, embedded as a normalised bag (x @ E / sum x)

Task kinds and label layout (predictions are always logits or raw values):
  binary       labels float {0,1} [B]      prediction [B]     sigmoid BCE
  regression   labels float [B]            prediction [B]     MSE
  multiclass   labels int [B] in [0,size)  prediction [B, size] softmax CE
  multilabel   labels float {0,1} [B,size] prediction [B, size] mean sigmoid BCE over labels
  retrieval    labels int [B] (item id)    prediction [B, B]  in-batch softmax CE (diagonal)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

TASK_KINDS = ("binary", "regression", "multiclass", "multilabel", "retrieval")
FEATURE_KINDS = ("dense", "categorical", "multihot")


def closest(name: str, valid: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint listing the closest valid names, or all of them."""
    valid = list(valid)
    near = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if near:
        return f"did you mean {', '.join(repr(n) for n in near)}? valid: {', '.join(valid)}"
    return f"valid: {', '.join(valid)}"


def unknown(field: str, name: str, valid: Iterable[str]) -> ValueError:
    """The error for an unknown name in ``field``, with the closest valid names."""
    return ValueError(f"{field}: unknown value {name!r}; {closest(str(name), valid)}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: its name, kind, output size and loss weight λ."""

    name: str
    kind: str
    size: int = 1
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(
                f"task.name: {self.name!r} is not a valid name; use letters, digits and _"
            )
        if self.kind not in TASK_KINDS:
            raise unknown(f"task {self.name!r} kind", self.kind, TASK_KINDS)
        object.__setattr__(self, "size", integer(f"task {self.name!r} size", self.size, 1))
        object.__setattr__(self, "weight", _weight(f"task {self.name!r} weight", self.weight))
        if self.kind in ("binary", "regression", "retrieval") and self.size != 1:
            raise ValueError(
                f"task {self.name!r} size: {self.kind} tasks have size 1, got {self.size}"
            )
        if self.kind == "multiclass" and self.size < 2:
            raise ValueError(f"task {self.name!r} size: multiclass needs size >= 2, got 1")
        if self.kind == "multilabel" and self.size < 2:
            raise ValueError(
                f"task {self.name!r} size: multilabel needs size >= 2, got 1; "
                f"for one label use kind='binary'"
            )

    @property
    def out_dim(self) -> int:
        return self.size


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One input feature: dense width, or vocabulary size for categorical/multihot."""

    name: str
    kind: str
    dim: int
    embed_dim: int = 16

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise unknown(f"feature {self.name!r} kind", self.kind, FEATURE_KINDS)
        object.__setattr__(self, "dim", integer(f"feature {self.name!r} dim", self.dim, 1))
        object.__setattr__(
            self, "embed_dim", integer(f"feature {self.name!r} embed_dim", self.embed_dim, 1)
        )


def task_names(tasks: Sequence[TaskSpec]) -> tuple[str, ...]:
    names = tuple(t.name for t in tasks)
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: duplicate task names in {names}; give each task its own name")
    if not names:
        raise ValueError("tasks: no tasks given; pass at least one TaskSpec")
    return names


def resolve_weights(
    tasks: Sequence[TaskSpec], weights: Mapping[str, float] | None
) -> tuple[float, ...]:
    """Per-task λ in task order; ``weights`` overrides TaskSpec.weight and must name real tasks."""
    names = task_names(tasks)
    if weights is None:
        return tuple(float(t.weight) for t in tasks)
    extra = sorted(set(weights) - set(names))
    if extra:
        raise ValueError(
            f"weights: keys {extra} are not tasks; tasks are {list(names)} (remove or rename them)"
        )
    out = []
    for t in tasks:
        out.append(_weight(f"weights[{t.name!r}]", weights.get(t.name, t.weight)))
    return tuple(out)


def integer(field: str, value: Any, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as an int, or a ValueError naming ``field``: a bool, a float (even 32.0), a
    string or anything else that is not an integer is refused, never truncated; with ``minimum``
    the value must also be >= it (``hint`` follows that message: what the field means)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        what = "a bool" if isinstance(value, bool) else type(value).__name__
        fix = f"a whole number{'' if minimum is None else f' >= {minimum}'}"
        if isinstance(value, float | np.floating) and np.isfinite(value):
            lo, hi = int(np.floor(value)), int(np.ceil(value))
            if minimum is not None:
                lo, hi = max(lo, minimum), max(hi, minimum)
            what, fix = "a float (it is not truncated)", f"{lo}" if lo == hi else f"{lo} or {hi}"
        raise ValueError(f"{field}: {value!r} must be an integer, not {what}; pass {fix}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{field}: {value!r} must be >= {minimum}{hint}")
    return int(value)


def real(field: str, value: Any, hint: str = "") -> float:
    """``value`` as a float, or a ValueError naming ``field``: a bool, a string (even '0.3'), None
    or anything else that is not a real number is refused, never parsed, and so are NaN and inf
    (``hint`` follows the message: what the field means or its range)."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        what = "a bool" if isinstance(value, bool | np.bool_) else type(value).__name__
        raise ValueError(f"{field}: {value!r} must be a real number, not {what}{hint}")
    if not np.isfinite(value):
        raise ValueError(f"{field}: {value!r} must be a finite number{hint}")
    return float(value)


def _weight(field: str, value: Any) -> float:
    """A loss weight λ: a finite real number >= 0."""
    w = real(field, value, "; pass a number >= 0 such as 1.0")
    if w < 0.0:
        raise ValueError(f"{field}: {value!r} must be >= 0")
    return w
