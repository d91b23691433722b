"""The host loop: stages → epochs → compiled chunks of steps, evaluation, checkpoints, resume.

The only host work per chunk is one call into a compiled ``lax.scan`` and one transfer of its
per-step metrics. The data order of epoch e is ``permutation(fold_in(key(data_seed), e))``, so a
run resumed at any checkpointed step replays exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl import metrics as M
from mtl import parallel, partition
from mtl.checkpoint import Checkpointer, CheckpointMismatch
from mtl.data.batching import Dataset, epoch_batches, eval_batches, num_batches
from mtl.spec import integer, real
from mtl.train import Stage, Trainer, TrainState

log = logging.getLogger(__name__)


class Divergence(FloatingPointError):
    """A non-finite loss, gradient (nan_policy="stop") or update stopped the run."""


@dataclasses.dataclass
class FitResult:
    """``state``: the final state, or the best evaluation's with ``EarlyStopping(restore_best)``;
    ``best_epoch``: that evaluation's epoch (None without early stopping); ``stopped_early``."""

    state: TrainState
    history: list[dict]
    best_epoch: int | None = None
    stopped_early: bool = False


_LOWER_IS_BETTER = ("rmse", "mse", "mae")  # and every metric whose name ends in "loss"


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when the validation score has not improved for ``patience`` evaluations in a row.

    ``monitor``: ``"task/metric"`` (e.g. ``"rating/rmse"``), ``"mean/metric"`` (that metric
    averaged over the tasks that report it, e.g. ``"mean/auc"``), or a function of the evaluation
    dict ``{task: {metric: value}}`` returning a float. ``mode``: ``"max"``, ``"min"``, or
    ``"auto"`` (min for rmse, mse, mae and ``*loss``, e.g. log_loss; max otherwise). A score improves when it beats
    the best one by more than ``min_delta``. ``restore_best``: ``fit`` returns the state of the
    best evaluation instead of the last one (with a checkpointer it is also saved beside the run's
    checkpoints, in ``<dir>-best``, so a resumed run still has it: exactly the best epoch's step;
    a run that starts afresh refuses a ``<dir>-best`` left by an earlier run rather than delete
    it). Decisions are read off the history, so a resumed run stops where the uninterrupted one
    would.

    A monitored AUC must be defined on the validation split: ``fit`` refuses one of a task whose
    labelled validation rows hold one class. A non-finite score (NaN or ±inf) never counts as
    the best or as an improvement: the first finite score becomes the best, and a non-finite
    evaluation counts as one without improvement. If no evaluation has a finite score, the best
    epoch is None and ``fit`` returns the last state.
    """

    monitor: str | Callable[[dict], float]
    patience: int = 3
    mode: str = "auto"
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self) -> None:
        named = isinstance(self.monitor, str) and self.monitor.count("/") == 1
        if not (named or callable(self.monitor)):
            raise ValueError(
                f"early_stopping.monitor: {self.monitor!r} must be 'task/metric' or 'mean/metric' "
                "(e.g. 'rating/rmse', 'mean/auc'), or a function of the evaluation dict"
            )
        patience = integer("early_stopping.patience", self.patience)
        if patience < 1:
            raise ValueError(
                f"early_stopping.patience: {self.patience!r} must be an int >= 1 (the number of "
                "evaluations without improvement after which the run stops)"
            )
        object.__setattr__(self, "patience", patience)
        if not isinstance(self.mode, str) or self.mode not in ("auto", "max", "min"):
            raise ValueError(f"early_stopping.mode: {self.mode!r} must be 'auto', 'max' or 'min'")
        hint = "; pass a number >= 0 such as 0.0 (how much a score must beat the best by)"
        min_delta = real("early_stopping.min_delta", self.min_delta, hint)
        if min_delta < 0:
            raise ValueError(f"early_stopping.min_delta: {self.min_delta!r} must be >= 0{hint}")
        object.__setattr__(self, "min_delta", min_delta)
        if not isinstance(self.restore_best, bool | np.bool_):
            raise ValueError(
                f"early_stopping.restore_best: {self.restore_best!r} must be True or False"
            )
        object.__setattr__(self, "restore_best", bool(self.restore_best))

    def _sign(self) -> float:
        """+1 when higher is better, -1 when lower is."""
        mode = self.mode
        if mode == "auto":
            metric = self.monitor.split("/")[1] if isinstance(self.monitor, str) else ""
            lower = metric.lower() in _LOWER_IS_BETTER or metric.lower().endswith("loss")
            mode = "min" if lower else "max"
        return 1.0 if mode == "max" else -1.0

    def score(self, evaluation: dict) -> float:
        """The monitored value of one evaluation ({task: {metric: value}})."""
        if callable(self.monitor):
            return float(self.monitor(evaluation))
        task, metric = self.monitor.split("/")
        if task == "mean":
            values = [m[metric] for m in evaluation.values() if metric in m]
            if not values:
                raise ValueError(
                    f"early_stopping.monitor: {self.monitor!r}: no task reports {metric!r}; "
                    f"metrics reported: {sorted({k for m in evaluation.values() for k in m})}"
                )
            return float(np.mean(values))
        if task not in evaluation or metric not in evaluation[task]:
            have = [f"{t}/{k}" for t, m in evaluation.items() for k in m]
            raise ValueError(
                f"early_stopping.monitor: {self.monitor!r} is not in the evaluation; "
                f"choose one of {have} or 'mean/<metric>'"
            )
        return float(evaluation[task][metric])

    def status(self, history: Sequence[dict]) -> tuple[int | None, float, int]:
        """(best epoch, its signed score, evaluations since it) over ``history``'s evaluations;
        non-finite scores are never the best (see the class docstring)."""
        best_epoch, best, since = None, -np.inf, 0
        for rec in history:
            if "eval" not in rec:
                continue
            s = self._sign() * self.score(rec["eval"])
            if np.isfinite(s) and (best_epoch is None or s > best + self.min_delta):
                best_epoch, best, since = rec["epoch"], s, 0
            else:
                since += 1
        return best_epoch, best, since


EVAL_BATCH_SIZE = 4096  # evaluate's default, rounded up to a multiple of a mesh's devices


def check_stages(trainer: Trainer, params, stages: Sequence[Stage]) -> None:
    """Every stage, before any trains: a Stage with an integer epochs, known tasks and trainable
    selectors that match parameters of ``params``; errors name ``stages[i]``."""
    if isinstance(stages, Stage) or not isinstance(stages, Sequence) or not stages:
        raise ValueError(
            f"stages: {stages!r} must be a non-empty sequence of Stage; "
            "build it with mtl.train.make_schedule"
        )
    for i, stage in enumerate(stages):
        if not isinstance(stage, Stage):
            raise ValueError(
                f"stages[{i}]: {stage!r} is not a Stage; build the schedule with "
                "mtl.train.make_schedule (it turns dicts of Stage fields into Stages)"
            )
        integer(f"stages[{i}].epochs", stage.epochs, 1)
        try:
            ids = trainer.task_ids(stage)
        except ValueError as e:
            raise ValueError(f"stages[{i}].{str(e).removeprefix('stage ')}") from e
        if stage.alternating and trainer.config.order != "round_robin":
            try:
                trainer.stage_probs(ids)
            except ValueError as e:
                raise ValueError(
                    f"stages[{i}]: {e}; give one of its tasks a probability > 0"
                ) from e
        try:
            partition.selector_mask(params, stage.trainable)
        except ValueError as e:
            raise ValueError(f"stages[{i}].{e}") from e


def one_class_tasks(data: Dataset) -> dict[str, float]:
    """{task: its only class} for the binary and multilabel tasks whose labelled rows (mask > 0)
    hold one class: their AUC is undefined (``metrics.auc`` reports 0.5)."""
    out = {}
    for t in data.task_specs:
        if t.kind not in ("binary", "multilabel"):
            continue
        y = np.asarray(data.labels[t.name])
        if t.name in data.masks:
            y = y[np.asarray(data.masks[t.name]) > 0]
        classes = np.unique(y > 0.5)
        if len(classes) == 1:
            out[t.name] = float(classes[0])
    return out


def evaluate(
    trainer: Trainer,
    state: TrainState,
    data: Dataset,
    batch_size: int | None = None,
    mesh=None,
) -> dict:
    """{task: {metric: value}} on ``data`` (padding rows excluded; retrieval tasks skipped).

    ``batch_size`` defaults to EVAL_BATCH_SIZE, rounded up to a multiple of ``mesh``'s devices
    so that any mesh can evaluate; a batch size that is passed must divide by them.
    """
    for task, c in one_class_tasks(data).items():
        log.warning(
            "evaluate: every labelled row of task %r is %s on this split: its AUC is undefined "
            "(reported as 0.5)",
            task,
            int(c),
        )
    if batch_size is None:
        n = 1 if mesh is None else mesh.shape[parallel.DATA]
        batch_size = -(-EVAL_BATCH_SIZE // n) * n
    batch_size = integer("batch_size", batch_size, 1)
    batches = eval_batches(data, batch_size)
    if mesh is not None:
        parallel.check_batch_size(batch_size, mesh)
        batches = parallel.shard_batches(batches, mesh)
    preds, _ = trainer.predict(state, batches)
    valid = batches["valid"].reshape(-1)
    out = {}
    for t in trainer.tasks:
        if t.kind == "retrieval":
            continue
        y = batches["labels"][t.name]
        y = y.reshape((-1,) + y.shape[2:])
        m = valid * batches["masks"][t.name].reshape(-1)
        out[t.name] = {
            k: float(v) for k, v in M.task_metrics(t.kind, y, preds[t.name], mask=m).items()
        }
    return out


def plan(stages: Sequence[Stage]) -> list[tuple[int, Stage]]:
    """One (stage index, stage) entry per epoch, in order."""
    return [(i, s) for i, s in enumerate(stages) for _ in range(s.epochs)]


def _summarise(m: dict, names: Sequence[str]) -> dict:
    """Means of a chunk's per-step metrics (host numpy) over its finite (not skipped) steps (NaN
    when every step was skipped), with the number of steps and of finite steps."""
    ok = np.asarray(m["finite"], bool)
    mean = lambda x: float(np.mean(np.asarray(x)[ok])) if ok.any() else float("nan")
    out = {
        "loss": mean(m["loss"]),
        "losses": {n: mean(np.asarray(m["losses"])[:, i]) for i, n in enumerate(names)},
        "steps": int(ok.shape[0]),
        "finite_steps": int(ok.sum()),
    }
    if "analysis" in m and np.any(m["logged"]):
        sel = np.asarray(m["logged"], bool)
        out["analysis"] = {k: np.asarray(v)[sel].mean(0).tolist() for k, v in m["analysis"].items()}
        out["analysis"]["conflict_rate"] = out["analysis"].pop("conflict")
        out["analysis"]["cosine_steps"] = np.asarray(m["analysis"]["cosine"])[sel].tolist()
        out["analysis"]["logged_steps"] = int(sel.sum())
    return out


def _epoch_mean(chunk_means: Sequence[float], finite_steps: Sequence[int]) -> float:
    """The mean over an epoch's finite steps from its chunks' means: each chunk weighted by its
    finite steps, chunks without one left out; NaN when every step of the epoch was skipped."""
    w = np.asarray(finite_steps, float)
    sel = w > 0
    if not sel.any():
        return float("nan")
    return float(np.average(np.asarray(chunk_means, float)[sel], weights=w[sel]))


def _grad_culprits(trainer: Trainer, state: TrainState, batch: dict, w_T: np.ndarray) -> list:
    """Tasks whose weighted gradient λ_t ∇L_t is non-finite at ``state`` on ``batch``.

    Recomputed once, only on divergence: a halted state still holds the parameters and step of
    the bad update, and the step's dropout key is derived the same way as in Trainer._step_fn.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    k_drop = jax.random.split(jax.random.split(key, 4)[1], 3)[0]

    def finite_T(params, rest, batch, w_T):
        loss_fn = lambda p: trainer._losses_fn(p, rest, batch, k_drop)
        _, vjp = jax.vjp(loss_fn, params)
        J = jax.vmap(vjp)(jnp.diag(w_T))[0]
        rows = [jnp.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in jax.tree.leaves(J)]
        return jnp.stack(rows).all(0)

    ok = np.asarray(jax.jit(finite_T)(state.params, state.rest, batch, jnp.asarray(w_T)))
    return [n for n, f in zip(trainer.names, ok, strict=True) if not f]


@jax.jit
def _all_finite(parts: list) -> jax.Array:
    """One flag per list of leaves: all of its values are finite."""
    flag = lambda leaves: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
    return jnp.stack([flag(leaves) if leaves else jnp.asarray(True) for leaves in parts])


_STATE_PARTS = ("params", "opt_state", "weighting", "aggregator")


def _nonfinite_part(state: TrainState) -> str | None:
    """The first of the parameters, optimizer, weighting and aggregator states that holds a
    non-finite value (their floating leaves), or None. The step checks its losses and gradients;
    an update can still make the state non-finite from finite ones (a NaN learning rate, Adam with
    eps=0 on a zero gradient, a weighting's too large lr), so fit checks once per chunk."""
    parts = [
        [x for x in jax.tree.leaves(getattr(state, p)) if jnp.issubdtype(x.dtype, jnp.floating)]
        for p in _STATE_PARTS
    ]
    ok = np.asarray(_all_finite(parts))
    return next((p for p, f in zip(_STATE_PARTS, ok, strict=True) if not f), None)


def _nonfinite_weights(trainer: Trainer, state: TrainState, m: dict) -> np.ndarray | None:
    """The task weights the next step would use, when they are not all finite although the
    weighting state is (uncertainty's exp(-s) of a finite s < -88 in float32), else None.

    Read at the chunk's last finite losses (no finite step: not checked, the step's own check
    reports it). A state like that passes ``_nonfinite_part`` but makes the next step's loss
    non-finite, so saving it would keep a "last good" checkpoint that diverges on resume."""
    ok = np.asarray(m["finite"], bool)
    if not ok.any():
        return None
    losses = jnp.asarray(np.asarray(m["losses"])[np.flatnonzero(ok)[-1]])
    key = jax.random.key(0)  # keys only draw RLW's weights, a softmax: always finite
    w = np.asarray(trainer.weighting.weights(state.weighting, losses, key))
    return None if np.isfinite(w).all() else w


def _last_good(ckpt: Checkpointer | None) -> str:
    """'; last good checkpoint: step N in DIR' when the checkpointer holds one, else ''."""
    if ckpt and ckpt.steps():
        return f"; last good checkpoint: step {ckpt.steps()[-1]} in {ckpt.directory}"
    return ""


def _bad_update(
    trainer: Trainer,
    part: str,
    m: dict,
    e: int,
    offset: int,
    ckpt: Checkpointer | None,
    w: np.ndarray | None = None,
) -> Divergence:
    """``part``: a state part of ``_STATE_PARTS``, or "weights" (``w``: ``_nonfinite_weights``)."""
    ok = np.asarray(m["finite"], bool)
    steps = np.asarray(m["step"])
    # the culprit precedes the first non-finite step (its loss read the poisoned parameters)
    at = f"by step {int(steps[np.argmin(ok)]) - 1}" if not ok.all() else "within the chunk"
    where = f"{at} (epoch {e}, batches {offset}–{offset + len(ok) - 1})"
    last = _last_good(ckpt)
    if part == "weights":
        c = trainer.config
        return Divergence(
            f"non-finite task weights {w.tolist()} from a finite weighting state after an update "
            f"{where} whose losses and gradients were finite: the weighting {c.weighting!r} "
            f"overflowed (a too large lr){last}; lower the learning rate in weighting_kwargs (now "
            f"{dict(c.weighting_kwargs)}) or choose another weighting"
        )
    if part in ("weighting", "aggregator"):
        c = trainer.config
        name, kwargs = (
            (c.weighting, c.weighting_kwargs)
            if part == "weighting"
            else (c.aggregator, c.aggregator_kwargs)
        )
        return Divergence(
            f"non-finite {part} state after an update {where} whose losses and gradients were "
            f"finite: the {part} {name!r} made it (a too large lr, an overflow){last}; lower the "
            f"learning rate in {part}_kwargs (now {dict(kwargs)}) or choose another {part}"
        )
    return Divergence(
        f"non-finite parameters or optimizer state after an update {where} whose losses and "
        f"gradients were finite: the optimizer made them (a NaN or infinite learning rate, Adam "
        f"with eps=0, an overflow){last}; check the optimizer's settings or lower the learning rate"
    )


def _divergence(
    trainer: Trainer,
    m: dict,
    e: int,
    offset: int,
    ckpt: Checkpointer | None,
    state: TrainState,
    part: dict,
) -> Divergence:
    bad = int(np.argmin(np.asarray(m["finite"])))
    losses = np.asarray(m["losses"][bad])
    tasks = [n for n, v in zip(trainer.names, losses, strict=True) if not np.isfinite(v)]
    if tasks:
        what = (
            f"loss of task(s) {tasks} = {losses[[trainer.names.index(t) for t in tasks]].tolist()}"
        )
    else:
        try:
            batch = jax.tree.map(lambda x: x[bad], part)
            tasks = _grad_culprits(trainer, state, batch, np.asarray(m["weights"][bad]))
        except Exception:  # noqa: BLE001 - the diagnosis must never hide the divergence
            tasks = []
        what = (
            f"gradient of task(s) {tasks} (losses finite)"
            if tasks
            else "gradient (losses and per-task gradients finite: penalty or aggregator)"
        )
    last = _last_good(ckpt)
    return Divergence(
        f"non-finite {what} at step {int(m['step'][bad])} (epoch {e}, batch {offset + bad}){last}; "
        "lower the learning rate, check the data, or set nan_policy='skip' to skip such steps"
    )


def _stopped(state: TrainState, ckpt: Checkpointer | None) -> str:
    where = f"checkpoint in {ckpt.directory}" if ckpt is not None else "no checkpointer: not saved"
    return f"stopped at step {int(state.step)} ({where})"


def _check_monitor_defined(es: EarlyStopping, eval_data: Dataset) -> None:
    """A monitored AUC ('task/auc', or 'mean/auc' over the tasks) must be defined on eval_data: of
    a task whose labelled rows hold one class it is 0.5 at every evaluation, never improves, and
    early stopping would end the run after ``patience`` evaluations for no reason."""
    if not isinstance(es.monitor, str) or es.monitor.split("/")[1] != "auc":
        return
    task = es.monitor.split("/")[0]
    for name, c in one_class_tasks(eval_data).items():
        if task in ("mean", name):
            raise ValueError(
                f"early_stopping.monitor: {es.monitor!r}: every labelled row of task {name!r} in "
                f"eval_data is {int(c)}, so its AUC is undefined (0.5 at every evaluation, never "
                "improving); pass a validation split that holds both classes (a larger or "
                f"stratified one), or monitor another metric (e.g. '{name}/log_loss')"
            )


def _check_eval_data(eval_data: Any, train: Dataset) -> None:
    """``eval_data``: None, or a non-empty Dataset with the training set's tasks and features."""
    if eval_data is None:
        return
    if not isinstance(eval_data, Dataset):
        raise ValueError(
            f"eval_data: a {type(eval_data).__name__} is not a Dataset; pass the validation "
            "split as an mtl.data.batching.Dataset (e.g. data.take(rows)), or None"
        )
    if len(eval_data) == 0:
        raise ValueError(
            "eval_data: 0 rows (empty split?); check the split fractions and the data, or pass "
            "eval_data=None"
        )
    for what, have, want in (
        ("tasks", eval_data.task_specs, train.task_specs),
        ("features", eval_data.feature_specs, train.feature_specs),
    ):
        have, want = {s.name: s for s in have}, {s.name: s for s in want}
        problems = [
            f"{label} {names}"
            for label, names in (
                ("missing", [n for n in want if n not in have]),
                ("not in train", [n for n in have if n not in want]),
                ("with other specs", [n for n in want if n in have and have[n] != want[n]]),
            )
            if names
        ]
        if problems:
            raise ValueError(
                f"eval_data: its {what} differ from train's ({'; '.join(problems)}); evaluate on "
                "a split of the training data set (same tasks and features)"
            )


def _data_digest(data: Dataset) -> str:
    """sha1 of a data set's features, labels and masks (names, dtypes, shapes and bytes)."""
    h = hashlib.sha1()
    for part, arrays in data.tree().items():
        for name in sorted(arrays):
            x = np.ascontiguousarray(np.asarray(arrays[name]))
            h.update(f"{part}/{name}/{x.dtype}/{x.shape}".encode())
            h.update(x.tobytes())
    return h.hexdigest()


_RUN_FIELDS = ("batch_size", "data_seed", "train_rows", "train_data")


def _run_record(
    train: Dataset, batch_size: int, data_seed: int, stages: Sequence[Stage], steps: int
) -> dict:
    """What a checkpoint's step count stands for, saved with every checkpoint fit writes: the
    batches (batch size, data seed, the training rows and their digest, steps per epoch) and the
    stages (a step's epoch and stage follow from them)."""
    return {
        "batch_size": batch_size,
        "data_seed": data_seed,
        "train_rows": len(train),
        "train_data": _data_digest(train),
        "steps_per_epoch": steps,
        "stages": [
            {
                "epochs": s.epochs,
                "tasks": None if s.tasks is None else list(s.tasks),
                "trainable": list(s.trainable),
                "alternating": bool(s.alternating),
            }
            for s in stages
        ],
    }


def _per_epoch(stages: Sequence[dict]) -> list[tuple[int, dict]]:
    """(stage index, the stage's fields but epochs) for every epoch of a run record's stages."""
    return [
        (i, {k: v for k, v in s.items() if k != "epochs"})
        for i, s in enumerate(stages)
        for _ in range(int(s["epochs"]))
    ]


def _check_run(ck: Checkpointer, step: int, had: Any, run: dict) -> None:
    """Refuse checkpoint ``step``, whose run record is ``had``, unless fit wrote it for the
    batches and stages of ``run`` (the stages up to the checkpoint; later ones may be added or
    extended)."""
    where = f"checkpoint {ck.directory}/{step}"
    if not isinstance(had, dict) or not {*_RUN_FIELDS, "steps_per_epoch", "stages"} <= set(had):
        raise CheckpointMismatch(
            f"{where} does not record what its step count stands for (batch size, data seed, "
            "training data, stages): fit did not write it, or an older mtl did; use a new run "
            "directory"
        )
    diffs = [
        f"{k}: checkpoint has {had[k]!r}, this run has {run[k]!r}"
        for k in _RUN_FIELDS
        if had[k] != run[k]
    ]
    old, new = _per_epoch(had["stages"]), _per_epoch(run["stages"])
    started = -(-step // int(had["steps_per_epoch"]))  # the epochs it trained, wholly or in part
    for e in range(min(started, len(old), len(new))):
        if old[e] != new[e]:
            diffs.append(
                f"stages: epoch {e} was trained as stages[{old[e][0]}] {old[e][1]}, this run's "
                f"stages have stages[{new[e][0]}] {new[e][1]} there"
            )
            break
    if diffs:
        raise CheckpointMismatch(
            f"{where} was written by fit for other batches or stages: "
            + "; ".join(diffs)
            + " (its step count means other batches here: use a new run directory, or resume "
            "with the original settings)"
        )


def _check_best(ck: Checkpointer, step: int, meta: dict, epoch: int, run: dict) -> None:
    """Refuse a ``<dir>-best`` entry (its metadata ``meta``) that is not this run's state of
    evaluation ``epoch``."""
    _check_run(ck, step, meta.get("run"), run)
    extra = meta.get("extra", {})
    if extra.get("epoch") != epoch:
        raise CheckpointMismatch(
            f"checkpoint {ck.directory}/{step} holds the best state of epoch "
            f"{extra.get('epoch')!r}, but this run's step {step} ends epoch {epoch}; use a new run "
            "directory"
        )


def _keep_best(ck: Checkpointer, state: TrainState, epoch: int, run: dict) -> None:
    """Save ``state`` as the best one (of ``epoch``) in ``ck``, unless it already holds it."""
    step = int(state.step)
    if step in ck.steps():
        try:
            meta = ck.meta(step)
        except Exception:  # noqa: BLE001 - unreadable: Checkpointer.save sets it aside
            meta = None
        if meta is not None:
            _check_best(ck, step, meta, epoch, run)
            return
    ck.save(step, state, {"epoch": epoch}, run=run)


def _resumed_best(
    ck: Checkpointer, history: list[dict], epoch: int, state: TrainState, run: dict
) -> TrainState:
    """The state of the best evaluation (``epoch``) of a resumed run: exactly its step in ``ck``,
    or the restored state itself when that is the step (the run was interrupted between its own
    checkpoint and the best one's; the best one is written now)."""
    step = next(int(h["step"]) for h in history if h["epoch"] == epoch)
    if step in ck.steps():
        got = ck.restore(state, step=step)
        if got is not None:
            _check_best(ck, step, ck.meta(step), epoch, run)
            return got[0]
    if step == int(state.step):
        _keep_best(ck, state, epoch, run)
        return jax.tree.map(jnp.copy, state)  # the next chunk donates state's buffers
    raise CheckpointMismatch(
        f"early_stopping.restore_best: the state of the best epoch {epoch} (step {step}) is not "
        f"in {ck.directory} (the run that wrote these checkpoints did not keep it, or it was "
        "removed); pass restore_best=False, or rerun in a new run directory"
    )


def fit(
    trainer: Trainer,
    state: TrainState,
    train: Dataset,
    stages: Sequence[Stage],
    *,
    batch_size: int,
    data_seed: int = 0,
    eval_data: Dataset | None = None,
    eval_every: int = 1,
    checkpointer: Checkpointer | None = None,
    save_every: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    mesh=None,
    early_stopping: EarlyStopping | None = None,
) -> FitResult:
    """Train through ``stages``; resume from ``checkpointer`` if it holds a checkpoint.

    ``save_every`` > 0 also saves every that many steps of an epoch (chunks end there); epoch ends
    always save.
    ``should_stop`` is polled after every chunk; when it returns True a checkpoint is written and
    KeyboardInterrupt is raised. ``mesh`` (mtl.parallel.make_mesh) shards every batch over its
    'data' axis and replicates the state: data-parallel training with the same results.
    ``early_stopping`` ends training once ``eval_data``'s score stops improving (EarlyStopping).
    Everything is validated before the first step: the integers, ``data_seed`` (in [0, 2**32)),
    the data sets, the callbacks and every stage (tasks, trainable), so a bad later stage fails at
    once rather than after the earlier ones trained.

    Every checkpoint records what its step count stands for: the batch size, data seed, training
    rows (their number and digest) and stages. A resume with other batches, or with other stages
    for the epochs already trained, raises CheckpointMismatch naming what differs; adding epochs
    or stages after the checkpoint resumes. A checkpoint past the end of ``stages`` is refused.

    Each history record's ``train_loss``/``train_losses`` are means over the epoch's finite steps
    (nan_policy='skip' leaves the skipped ones out; NaN when every step was skipped).
    """
    batch_size = integer("batch_size", batch_size, 1)
    eval_every = integer(
        "eval_every",
        eval_every,
        1,
        "; pass 1 to evaluate after every epoch, N for every N-th "
        "(the last epoch is always evaluated)",
    )
    save_every = integer(
        "save_every",
        save_every,
        0,
        "; pass 0 to save at epoch ends only, or N to also save every N steps",
    )
    data_seed = integer("data_seed", data_seed)
    if not 0 <= data_seed < 2**32:
        raise ValueError(
            f"data_seed: {data_seed!r} must be in [0, 2**32) (jax.random.key takes 32-bit seeds: "
            "another value would wrap onto one in that range and replay its data order); pass a "
            "seed in 0..4294967295"
        )
    if not isinstance(train, Dataset):
        raise ValueError(
            f"train: a {type(train).__name__} is not a Dataset; pass an mtl.data.batching.Dataset"
        )
    if len(train) == 0:
        raise ValueError("train: the training split is empty; check the split and the data")
    _check_eval_data(eval_data, train)
    for field, fn in (("on_epoch", on_epoch), ("should_stop", should_stop)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{field}: {fn!r} is not callable; pass a function, or None")
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise ValueError(
            f"early_stopping: {early_stopping!r} is not an EarlyStopping; pass "
            "EarlyStopping(monitor, patience=...), or None"
        )
    if checkpointer is not None and not isinstance(checkpointer, Checkpointer):
        raise ValueError(
            f"checkpointer: {checkpointer!r} is not a Checkpointer; pass "
            "mtl.checkpoint.Checkpointer(directory, trainer.fingerprint()), or None"
        )
    if early_stopping is not None and eval_data is not None:
        _check_monitor_defined(early_stopping, eval_data)
    if early_stopping is not None and eval_data is None:
        raise ValueError(
            "early_stopping: needs eval_data (the validation split it monitors); pass eval_data"
        )
    check_stages(trainer, state.params, stages)
    if mesh is not None:
        parallel.check_batch_size(batch_size, mesh)
    S = num_batches(len(train), batch_size)
    epochs = plan(stages)
    history: list[dict] = []
    partial: list[dict] = []  # summaries of the chunks already run in the current epoch
    run, restored = None, None
    if checkpointer is not None:
        run = _run_record(train, batch_size, data_seed, stages, S)
        restored = checkpointer.restore(state)
        if restored is not None:
            state, extra, step = restored
            _check_run(checkpointer, step, checkpointer.meta(step).get("run"), run)
            if step > len(epochs) * S:
                raise CheckpointMismatch(
                    f"checkpoint {checkpointer.directory}/{step}: restored step {step} is past "
                    f"the end of this run's stages ({len(epochs)} epochs of {S} steps = "
                    f"{len(epochs) * S} steps); ask for at least {-(-step // S)} epochs, or use "
                    "a new run directory"
                )
            history, partial = list(extra.get("history", [])), list(extra.get("partial", []))
    es, best_state, best_ck = early_stopping, None, None
    if es is not None and es.restore_best and checkpointer is not None:
        best_ck = checkpointer.beside("best", max_to_keep=1)
        if restored is None and best_ck.steps():
            # a fresh run: these are an earlier run's (never cleared: they may be its only copy)
            raise CheckpointMismatch(
                f"checkpoint directory: {str(best_ck.directory)!r} holds the best state of an "
                f"earlier run (step {best_ck.steps()[-1]}), but {str(checkpointer.directory)!r} "
                "holds no checkpoint of it to resume; move or delete that directory, or use a new "
                "run directory"
            )
        best_epoch = es.status(history)[0]
        if best_epoch is not None:  # resumed after the best evaluation
            best_state = _resumed_best(best_ck, history, best_epoch, state, run)
    train = train.to_device()
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    data_key = jax.random.key(data_seed)
    chunk = save_every if save_every > 0 else S
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(epochs), desc="epochs", initial=min(int(state.step) // S, len(epochs)))

    def save(state, history, partial=()):
        if checkpointer is not None:
            extra = {"history": history, "partial": list(partial)}
            checkpointer.save(int(state.step), state, extra, run=run)

    stopped = es is not None and es.status(history)[2] >= es.patience
    for e, (stage_idx, stage) in enumerate(epochs):
        start = e * S
        if stopped or int(state.step) >= start + S:
            continue
        t0 = time.perf_counter()
        batches = epoch_batches(train, batch_size, jax.random.fold_in(data_key, e))
        if mesh is not None:
            batches = parallel.shard_batches(batches, mesh)
        offset = int(state.step) - start
        summaries, partial = (partial if offset > 0 else []), []
        while offset < S:
            end = min(S, (offset // chunk + 1) * chunk)
            part = (
                jax.tree.map(lambda x, sl=slice(offset, end): x[sl], batches)
                if (offset, end) != (0, S)
                else batches
            )
            state, m = trainer.run(state, part, stage, start=offset, epoch_steps=S)
            m = jax.device_get(m)
            bad = _nonfinite_part(state)
            if bad is not None:  # before any save: a checkpoint is never poisoned
                raise _bad_update(trainer, bad, m, e, offset, checkpointer)
            w = _nonfinite_weights(trainer, state, m)
            if w is not None:  # nor one whose next step cannot be finite
                raise _bad_update(trainer, "weights", m, e, offset, checkpointer, w)
            if not np.all(m["finite"]):
                if trainer.config.nan_policy == "stop":
                    raise _divergence(trainer, m, e, offset, checkpointer, state, part)
            summaries.append(_summarise(m, trainer.names))
            offset = end
            if save_every > 0 and offset < S:
                save(state, history, summaries)
            if offset < S and should_stop is not None and should_stop():
                save(state, history, summaries)  # a no-op when save_every saved it just now
                raise KeyboardInterrupt(_stopped(state, checkpointer))
        # means over the epoch's finite steps: chunks weighted by theirs, all-skipped ones left out
        w = [s["finite_steps"] for s in summaries]
        record: dict[str, Any] = {
            "epoch": e,
            "stage": stage_idx,
            "step": int(state.step),
            "train_loss": _epoch_mean([s["loss"] for s in summaries], w),
            "train_losses": {
                n: _epoch_mean([s["losses"][n] for s in summaries], w) for n in trainer.names
            },
            "skipped": int(state.skipped),
            "seconds": time.perf_counter() - t0,
        }
        an = [s["analysis"] for s in summaries if "analysis" in s]
        if an:  # means over the epoch's logged steps (chunks weighted by their logged steps)
            n_logged = [a.get("logged_steps", len(a["cosine_steps"])) for a in an]
            record["analysis"] = {
                k: np.average([a[k] for a in an], axis=0, weights=n_logged).tolist()
                for k in an[0]
                if k not in ("cosine_steps", "logged_steps")
            }
            record["analysis"]["cosine_steps"] = [c for a in an for c in a["cosine_steps"]]
        if eval_data is not None and ((e + 1) % eval_every == 0 or e == len(epochs) - 1):
            record["eval"] = evaluate(trainer, state, eval_data, mesh=mesh)
        history.append(record)
        new_best = False
        if es is not None and "eval" in record:
            best_epoch, _, since = es.status(history)
            stopped = since >= es.patience
            if es.restore_best and best_epoch == e:
                best_state = jax.tree.map(jnp.copy, state)  # the next run donates state's buffers
                new_best = True
        if on_epoch is not None:
            on_epoch(record)
        save(state, history)
        if new_best and best_ck is not None:  # after the run's own checkpoint (_resumed_best)
            _keep_best(best_ck, best_state, e, run)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.4f}")
        if e + 1 < len(epochs) and not stopped and should_stop is not None and should_stop():
            raise KeyboardInterrupt(_stopped(state, checkpointer))
    if bar is not None:
        bar.close()
    if best_ck is not None:
        best_ck.close()
    if es is None:
        return FitResult(state, history)
    best_epoch = es.status(history)[0]
    if es.restore_best and best_epoch is not None:
        if best_state is None:  # cannot happen: kept in the loop or read back on resume
            raise RuntimeError(
                f"early_stopping.restore_best: the state of epoch {best_epoch} is gone"
            )
        state = best_state if mesh is None else parallel.replicate(best_state, mesh)
    elif es.restore_best and any("eval" in h for h in history):
        log.warning(
            "early_stopping: no evaluation had a finite %r score; returning the last state",
            es.monitor,
        )
    return FitResult(state, history, best_epoch, stopped)


def examples_per_second(history: Sequence[dict], n: int) -> float:
    """Training throughput over the epochs after the first (which includes compilation)."""
    secs = [h["seconds"] for h in history[1:]] or [h["seconds"] for h in history]
    return float(n * len(secs) / max(sum(secs), 1e-9))


__all__ = [
    "EVAL_BATCH_SIZE",
    "Divergence",
    "EarlyStopping",
    "FitResult",
    "check_stages",
    "evaluate",
    "examples_per_second",
    "fit",
    "plan",
]
