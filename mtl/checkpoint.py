"""Orbax checkpoints of the whole train state, with a fingerprint that refuses foreign checkpoints
and a fallback to the previous good step when the latest one is broken.

A checkpoint directory belongs to mtl: when a Checkpointer finds it missing or empty it writes the
marker file ``.mtl-checkpoints`` at its root, and it refuses a non-empty directory without that
marker (a user's folder, another tool's checkpoints) instead of reading, renaming or writing
anything there. Inside a marked directory a step folder that holds neither a ``state`` nor a
``meta`` item (and is not empty) is refused the same way; only this library's own damaged steps
(an unreadable item, a deleted item, an empty folder left by an interrupted save) are set aside as
``<step>.broken``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtl.spec import integer

log = logging.getLogger(__name__)

MARKER = ".mtl-checkpoints"  # at the root of every checkpoint directory mtl writes
_ITEMS = ("state", "meta")  # the items of every step mtl writes
_ORBAX_FILES = {"_CHECKPOINT_METADATA", "commit_success.txt"}  # in every orbax step folder


class CheckpointMismatch(ValueError):
    """A checkpoint (or checkpoint directory) that does not belong to this run: written by a
    different model or configuration, for other data or batches, or not by mtl at all."""


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in a:
                out.append(f"{p}: missing in the checkpoint, run has {b[k]!r}")
            elif k not in b:
                out.append(f"{p}: checkpoint has {a[k]!r}, missing in this run")
            else:
                out.extend(_diff(a[k], b[k], p))
        return out
    return [] if a == b else [f"{prefix}: checkpoint has {a!r}, this run has {b!r}"]


def _json(x: Any) -> Any:
    """``x`` as it reads back from a checkpoint's JSON meta."""
    return json.loads(json.dumps(x, default=float))


def make_writable_dir(path: Path) -> None:
    """Create ``path`` (with parents) and prove it writable with a probe file of this call's own,
    so that runs starting together in one folder do not delete each other's probe (OSError if not)."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def _foreign(directory: Path, entries: list[str], why: str) -> CheckpointMismatch:
    shown = ", ".join(repr(e) for e in entries[:3]) + (
        f" and {len(entries) - 3} more" if len(entries) > 3 else ""
    )
    return CheckpointMismatch(
        f"checkpoint directory: {str(directory)!r} holds {shown}, which mtl did not write ({why}); "
        "use a new directory (or an empty one) for the checkpoints"
    )


def _restore_target(x: Any) -> Any:
    """What orbax restores a template leaf as: an array placed like a committed one (a mesh's
    sharding, an explicit device), or a host array for an uncommitted one (``_placed_like``)."""
    if isinstance(x, jax.Array) and not x.committed:
        return np.empty(x.shape, x.dtype)  # only its shape and dtype are read
    return ocp.utils.to_shape_dtype_struct(x)


def _placed_like(template: Any, restored: Any) -> Any:
    """A restored leaf placed as its template was: an uncommitted template (a fresh state on the
    default device) gives an uncommitted array. A committed one would make jit lower the resumed
    run's steps with sharding annotations the fresh run's lack: other programs, compiled anew
    and missed by the persistent compilation cache."""
    if isinstance(template, jax.Array) and isinstance(restored, np.ndarray):
        return jax.device_put(restored)
    return restored


class Checkpointer:
    """Saves ``state`` (a pytree) plus JSON ``extra`` every call to ``save``; keeps the last K.

    ``directory`` must be new, empty, or one that mtl created (it holds the ``.mtl-checkpoints``
    marker); anything else raises CheckpointMismatch before a file is touched.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        max_to_keep = integer(
            "max_to_keep", max_to_keep, 1, "; it is the number of checkpoints to keep"
        )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._claim()
            make_writable_dir(self.directory)
        except OSError as e:
            raise ValueError(
                f"checkpoint directory: cannot write to {str(self.directory)!r} ({e.strerror}); "
                "choose a writable run directory"
            ) from e
        self._check_steps()
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.max_to_keep = max_to_keep
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
            item_names=_ITEMS,  # never the single-item mode of another tool's checkpoints
        )

    def _claim(self) -> None:
        """Mark a new or empty directory as mtl's; refuse a non-empty one without the marker."""
        marker = self.directory / MARKER
        if marker.exists():
            return
        entries = sorted(p.name for p in self.directory.iterdir() if p.name != MARKER)
        # a run starting at the same moment may have marked it since the listing (and then probed)
        if entries and not marker.exists():
            raise _foreign(
                self.directory,
                entries,
                f"it is not empty and has no {MARKER} marker; an mtl older than the marker wrote "
                "none, and its checkpoints cannot be resumed either",
            )
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another run marked it first
            return
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"written_by": "mtl.checkpoint", "format": 2}) + "\n")

    def _check_steps(self) -> None:
        """Refuse step folders that are not this library's (neither a 'state' nor a 'meta' item,
        nor empty but for orbax's own files: what an interrupted save or a deleted item leaves),
        before orbax reads any of them."""
        foreign = []
        for p in sorted(self.directory.iterdir()):
            if not p.name.isdigit():
                continue  # the marker, <step>.broken, orbax's *.orbax-checkpoint-tmp, ...
            if not p.is_dir():
                foreign.append(p.name)
                continue
            names = {q.name for q in p.iterdir()} - _ORBAX_FILES
            if names and not names & set(_ITEMS):
                foreign.append(p.name)
        if foreign:
            raise _foreign(
                self.directory,
                foreign,
                "a step folder of mtl holds a 'state' and a 'meta' item; these hold neither",
            )

    def beside(self, suffix: str, max_to_keep: int = 1) -> Checkpointer:
        """A checkpointer with this one's fingerprint in the sibling directory ``<dir>-<suffix>``."""
        return Checkpointer(
            self.directory.with_name(f"{self.directory.name}-{suffix}"),
            self.fingerprint,
            max_to_keep=max_to_keep,
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def meta(self, step: int) -> dict:
        """The JSON metadata of step ``step``: ``fingerprint``, ``extra`` and, when the saver gave
        one, ``run`` (orbax's error if it cannot be read)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return meta["meta"]

    def extra(self, step: int) -> dict:
        """The JSON ``extra`` saved with step ``step``."""
        return self.meta(step).get("extra", {})

    def save(
        self, step: int, state: Any, extra: dict | None = None, run: dict | None = None
    ) -> None:
        """Write step ``step`` with JSON ``extra`` and ``run`` (what the saver needs to tell
        whether the checkpoint belongs to its run; fit records the batches and stages there).

        A step that already exists is kept when it holds the same ``extra`` and ``run`` (saving
        one step twice); otherwise it belongs to another run, and CheckpointMismatch is raised
        instead of keeping either silently; an unreadable one is set aside (``<step>.broken``) and
        written anew."""
        meta = {"fingerprint": self.fingerprint, "extra": extra or {}}
        if run is not None:
            meta["run"] = run
        meta = _json(meta)
        if step in self.manager.all_steps():
            try:
                stored = _json(self.meta(step))
            except Exception as e:  # noqa: BLE001 - a broken step of ours: replaced
                self._set_aside(step, "unreadable", e, "writing it anew")
            else:
                if json.dumps(stored, sort_keys=True) == json.dumps(meta, sort_keys=True):
                    return
                raise CheckpointMismatch(
                    f"checkpoint {self.directory}/{step} already exists and holds another run's "
                    "state (its metadata differs from this run's at the same step); use a new run "
                    "directory"
                )
        self.manager.save(  # force: orbax silently skips steps below its latest otherwise
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def _set_aside(
        self, step: int, problem: str, error: Exception, then: str = "trying the previous one"
    ) -> None:
        """Rename a broken step's folder to ``<step>.broken`` (kept for inspection, never read)."""
        src = self.directory / str(step)
        dst, k = src.with_name(f"{step}.broken"), 1
        while dst.exists():
            dst, k = src.with_name(f"{step}.broken-{k}"), k + 1
        if src.is_dir():
            src.rename(dst)
        self.manager.reload()
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        log.warning(
            "checkpoint step %d in %s is %s (%s); moved it to %s and %s",
            step,
            self.directory,
            problem,
            first,
            dst.name,
            then,
        )

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """(state, extra, step) from the newest readable checkpoint (or from step ``step`` only),
        or None when there is none.

        A broken checkpoint is skipped with a warning and renamed ``<step>.broken`` (so it is
        neither read nor kept in the way of new saves); one whose fingerprint differs from this
        run's raises CheckpointMismatch naming what differs.
        """
        abstract = jax.tree.map(_restore_target, template)
        candidates = self.steps() if step is None else [s for s in self.steps() if s == step]
        for s in reversed(candidates):
            try:
                meta = self.manager.restore(
                    s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
            except Exception as e:  # noqa: BLE001 - any read failure means a broken checkpoint
                self._set_aside(s, "unreadable", e)
                continue
            diffs = _diff(meta.get("fingerprint"), self.fingerprint)
            if diffs:
                raise CheckpointMismatch(
                    f"checkpoint {self.directory}/{s} was written by a different model/config: "
                    + "; ".join(diffs[:8])
                    + " (use a new run directory, or restore with the original settings)"
                )
            try:
                restored = self.manager.restore(
                    s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
            except Exception as e:  # noqa: BLE001
                self._set_aside(s, "corrupted", e)
                continue
            state = jax.tree.map(_placed_like, template, restored["state"])
            return state, meta.get("extra", {}), s
        if candidates and step is None:
            log.warning("no readable checkpoint in %s; starting from step 0", self.directory)
        return None

    def close(self) -> None:
        self.manager.close()
