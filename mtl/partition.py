"""Parameter groups, owners and masks, read off the path naming convention in mtl.models.base.

A mask is a pytree shaped like the params whose leaves are booleans broadcastable to the leaf:
scalars for whole leaves, [T, 1, ...] for ``columns`` leaves stacked on a task axis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

GROUPS = ("embeddings", "shared", "towers", "heads", "gates")
_TOP = {"towers": "towers", "heads": "heads", "gates": "gates", "columns": "columns"}


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def path_of(kp) -> str:
    """'encoder/embed/user_id/embedding' for a jax key path (the '.value' attribute of nnx
    Variables dropped; a module or task named 'value' keeps its name)."""
    variable = lambda k: isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"
    return "/".join(_key(k) for k in kp if not variable(k))


def paths(params) -> list[str]:
    """The path string of every leaf, in leaf order."""
    return [path_of(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]


def group_of(path: str) -> str:
    """The staged-schedule group of a parameter path."""
    parts = path.split("/")
    if parts[0] == "columns":  # a stacked per-task network: group by its inner name
        parts = parts[1:]
    if parts[0] in ("towers", "tower", "heads", "gates"):
        return "towers" if parts[0] == "tower" else parts[0]
    if "embed" in parts:
        return "embeddings"
    return "shared"


def owner_of(path: str, task_names: Sequence[str]) -> str:
    """'shared', 'columns' (stacked per task) or the owning task's name."""
    parts = path.split("/")
    if parts[0] == "columns":
        return "columns"
    if parts[0] in ("towers", "heads", "gates") and len(parts) > 1 and parts[1] in task_names:
        return parts[1]
    return "shared"


def _leaf_masks(params, fn):
    leaves, treedef = jax.tree.flatten(params)
    ps = paths(params)
    return jax.tree.unflatten(treedef, [fn(p, x) for p, x in zip(ps, leaves, strict=True)])


def selector_mask(params, selectors: Sequence[str]):
    """True on leaves whose group is in ``selectors`` or whose path matches one of them as a regex.

    'all' selects everything. A selector that matches no parameter is an error.
    """
    if isinstance(selectors, str):
        selectors = (selectors,)
    if not selectors:
        raise ValueError("trainable: empty list; name at least one group or regex (or 'all')")
    ps = paths(params)
    for s in selectors:
        if s == "all" or s in GROUPS and any(group_of(p) == s for p in ps):
            continue
        try:
            rx = re.compile(s)
        except re.error as e:
            raise ValueError(
                f"trainable: {s!r} is neither a group {GROUPS} nor a regex ({e})"
            ) from e
        if not any(rx.fullmatch(p) or rx.search(p) for p in ps):
            raise ValueError(
                f"trainable: {s!r} matches no parameter; groups are {GROUPS}, "
                f"paths look like {ps[0]!r}"
            )

    def sel(p: str, _) -> bool:
        return any(
            s == "all" or s == group_of(p) or (s not in GROUPS and re.search(s, p))
            for s in selectors
        )

    return _leaf_masks(params, lambda p, x: np.bool_(sel(p, x)))


def owner_table(params, task_names: Sequence[str]):
    """Per leaf: a static [T] float vector, 1 where the task may change the leaf (shared: all ones).

    Leaves of ``columns`` get the marker None (their task axis is the leading dimension).
    """
    T = len(task_names)

    def table(p: str, _):
        o = owner_of(p, task_names)
        if o == "columns":
            return None
        return np.ones(T, bool) if o == "shared" else np.arange(T) == task_names.index(o)

    leaves, treedef = jax.tree.flatten(params)
    return [table(p, x) for p, x in zip(paths(params), leaves, strict=True)], treedef


def task_mask(params, task_names: Sequence[str], t: jax.Array):
    """Mask of what a step on task ``t`` (traced int) may change: shared leaves and task t's own."""
    table, treedef = owner_table(params, task_names)
    leaves = jax.tree.leaves(params)
    out = []
    for row, x in zip(table, leaves, strict=True):
        if row is None:
            out.append((jnp.arange(x.shape[0]) == t).reshape((-1,) + (1,) * (x.ndim - 1)))
        else:
            out.append(jnp.asarray(row)[t])
    return jax.tree.unflatten(treedef, out)


def tasks_mask(params, task_names: Sequence[str], ids: Sequence[int]):
    """Static mask of what a step on the tasks ``ids`` may change: shared leaves and theirs."""
    table, treedef = owner_table(params, task_names)
    leaves = jax.tree.leaves(params)
    on = np.isin(np.arange(len(task_names)), list(ids))
    out = [
        on.reshape((-1,) + (1,) * (x.ndim - 1)) if row is None else np.bool_(row[on].any())
        for row, x in zip(table, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def shared_mask(params, task_names: Sequence[str]):
    """True on leaves no task owns: the set per-task gradients are aggregated on.

    Ownership follows the path (``owner_of``), not reachability: a task's column in cross-stitch
    and PLE (its slice of a stacked leaf) and ESMM's CTR tower belong to their task although the
    other tasks' losses reach them too (through the stitch units, the upper-level gates, and
    pCTCVR = pCTR·pCVR). Their per-task gradients are summed, not aggregated, and an alternating
    step on another task leaves them alone.
    """
    return _leaf_masks(params, lambda p, x: np.bool_(owner_of(p, task_names) == "shared"))


def and_masks(a, b):
    return jax.tree.map(jnp.logical_and, a, b)
