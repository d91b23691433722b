"""Orbax checkpoints of the whole train state, with a fingerprint that refuses foreign checkpoints
and a fallback to the previous good step when the latest one is broken."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """A checkpoint written by a different model or configuration."""


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


def make_writable_dir(path: Path) -> None:
    """Create ``path`` (with parents) and prove it writable with a probe file of this call's own,
    so that runs starting together in one folder do not delete each other's probe (OSError if not)."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


class Checkpointer:
    """Saves ``state`` (a pytree) plus JSON ``extra`` every call to ``save``; keeps the last K."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep: {max_to_keep} must be >= 1")
        try:
            make_writable_dir(self.directory)
        except OSError as e:
            raise ValueError(
                f"checkpoint directory: cannot write to {str(self.directory)!r} ({e.strerror}); "
                "choose a writable run directory"
            ) from e
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
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

    def save(self, step: int, state: Any, extra: dict | None = None) -> None:
        """Write step ``step`` (skipped if it already exists)."""
        if step in self.manager.all_steps():
            return
        meta = {"fingerprint": self.fingerprint, "extra": extra or {}}
        self.manager.save(  # force: orbax silently skips steps below its latest otherwise
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=float))),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def _set_aside(self, step: int, problem: str, error: Exception) -> None:
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
            "checkpoint step %d in %s is %s (%s); moved it to %s and trying the previous one",
            step,
            self.directory,
            problem,
            first,
            dst.name,
        )

    def restore(self, template: Any) -> tuple[Any, dict, int] | None:
        """(state, extra, step) from the newest readable checkpoint, or None when there is none.

        A broken newest checkpoint is skipped with a warning and renamed ``<step>.broken`` (so it
        is neither read nor kept in the way of new saves); one whose fingerprint differs from this
        run's raises CheckpointMismatch naming what differs.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        had_any = bool(self.steps())
        for step in reversed(self.steps()):
            try:
                meta = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
            except Exception as e:  # noqa: BLE001 - any read failure means a broken checkpoint
                self._set_aside(step, "unreadable", e)
                continue
            diffs = _diff(meta.get("fingerprint"), self.fingerprint)
            if diffs:
                raise CheckpointMismatch(
                    f"checkpoint {self.directory}/{step} was written by a different model/config: "
                    + "; ".join(diffs[:8])
                    + " (use a new run directory, or restore with the original settings)"
                )
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, "corrupted", e)
                continue
            return restored["state"], meta.get("extra", {}), step
        if had_any:
            log.warning("no readable checkpoint in %s; starting from step 0", self.directory)
        return None

    def close(self) -> None:
        self.manager.close()
