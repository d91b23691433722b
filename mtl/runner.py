"""The host loop: stages → epochs → compiled chunks of steps, evaluation, checkpoints, resume.

The only host work per chunk is one call into a compiled ``lax.scan`` and one transfer of its
per-step metrics. The data order of epoch e is ``permutation(fold_in(key(data_seed), e))``, so a
run resumed at any checkpointed step replays exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl import metrics as M
from mtl import parallel, partition
from mtl.checkpoint import Checkpointer
from mtl.data.batching import Dataset, epoch_batches, eval_batches, num_batches
from mtl.spec import integer
from mtl.train import Stage, Trainer, TrainState


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
    checkpoints, in ``<dir>-best``, so a resumed run still has it). Decisions are read off the
    history, so a resumed run stops where the uninterrupted one would.
    """

    monitor: str | Callable[[dict], float]
    patience: int = 3
    mode: str = "auto"
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"early_stopping.patience: {self.patience!r} must be an int >= 1")
        if self.mode not in ("auto", "max", "min"):
            raise ValueError(f"early_stopping.mode: {self.mode!r} must be 'auto', 'max' or 'min'")
        if not self.min_delta >= 0:
            raise ValueError(f"early_stopping.min_delta: {self.min_delta!r} must be >= 0")
        if isinstance(self.monitor, str) and self.monitor.count("/") != 1:
            raise ValueError(
                f"early_stopping.monitor: {self.monitor!r} must be 'task/metric' or 'mean/metric' "
                "(e.g. 'rating/rmse', 'mean/auc'), or a function of the evaluation dict"
            )

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
        """(best epoch, its signed score, evaluations since it) over ``history``'s evaluations."""
        best_epoch, best, since = None, -np.inf, 0
        for rec in history:
            if "eval" not in rec:
                continue
            s = self._sign() * self.score(rec["eval"])
            if best_epoch is None or s > best + self.min_delta:
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
            trainer.task_ids(stage)
        except ValueError as e:
            raise ValueError(f"stages[{i}].{str(e).removeprefix('stage ')}") from e
        try:
            partition.selector_mask(params, stage.trainable)
        except ValueError as e:
            raise ValueError(f"stages[{i}].{e}") from e


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
    """Means of a chunk's per-step metrics (host numpy) over its finite (not skipped) steps."""
    ok = np.asarray(m["finite"], bool)
    sel = ok if ok.any() else np.ones_like(ok)
    out = {
        "loss": float(np.mean(m["loss"][sel])),
        "losses": {n: float(np.mean(m["losses"][sel, i])) for i, n in enumerate(names)},
        "steps": int(m["loss"].shape[0]),
    }
    if "analysis" in m and np.any(m["logged"]):
        sel = np.asarray(m["logged"], bool)
        out["analysis"] = {k: np.asarray(v)[sel].mean(0).tolist() for k, v in m["analysis"].items()}
        out["analysis"]["conflict_rate"] = out["analysis"].pop("conflict")
        out["analysis"]["cosine_steps"] = np.asarray(m["analysis"]["cosine"])[sel].tolist()
        out["analysis"]["logged_steps"] = int(sel.sum())
    return out


def _grad_culprits(trainer: Trainer, state: TrainState, batch: dict, w_T: np.ndarray) -> list:
    """Tasks whose weighted gradient λ_t ∇L_t is non-finite at ``state`` on ``batch``.

    Recomputed once, only on divergence: a halted state still holds the parameters and step of
    the bad update, and the step's dropout key is derived the same way as in Trainer._step_fn.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    k_drop = jax.random.split(jax.random.split(key, 4)[1], 3)[0]

    def finite_T(params, rest, batch, w_T):
        loss_fn = lambda p: trainer._losses_fn(p, rest, batch, k_drop)
        _, vjp, _ = jax.vjp(loss_fn, params, has_aux=True)
        J = jax.vmap(vjp)(jnp.diag(w_T))[0]
        rows = [jnp.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in jax.tree.leaves(J)]
        return jnp.stack(rows).all(0)

    ok = np.asarray(jax.jit(finite_T)(state.params, state.rest, batch, jnp.asarray(w_T)))
    return [n for n, f in zip(trainer.names, ok, strict=True) if not f]


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _state_finite(state: TrainState) -> bool:
    """Whether the parameters and optimizer state hold finite values only. The step checks its
    losses and gradients; an update can still make the state non-finite from finite ones (a NaN
    learning rate, Adam with eps=0 on a zero gradient), so fit checks once per chunk."""
    leaves = jax.tree.leaves((state.params, state.opt_state))
    return bool(_all_finite([x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]))


def _last_good(ckpt: Checkpointer | None) -> str:
    """'; last good checkpoint: step N in DIR' when the checkpointer holds one, else ''."""
    if ckpt and ckpt.steps():
        return f"; last good checkpoint: step {ckpt.steps()[-1]} in {ckpt.directory}"
    return ""


def _bad_update(m: dict, e: int, offset: int, ckpt: Checkpointer | None) -> Divergence:
    ok = np.asarray(m["finite"], bool)
    steps = np.asarray(m["step"])
    # the culprit precedes the first non-finite step (its loss read the poisoned parameters)
    at = f"by step {int(steps[np.argmin(ok)]) - 1}" if not ok.all() else "within the chunk"
    last = _last_good(ckpt)
    return Divergence(
        f"non-finite parameters or optimizer state after an update {at} (epoch {e}, batches "
        f"{offset}–{offset + len(ok) - 1}) whose losses and gradients were finite: the optimizer "
        f"made them (a NaN or infinite learning rate, Adam with eps=0, an overflow){last}; check "
        "the optimizer's settings or lower the learning rate"
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
    Everything is validated before the first step: the integers and every stage (tasks,
    trainable), so a bad later stage fails at once rather than after the earlier ones trained.
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
    integer("data_seed", data_seed)
    if len(train) == 0:
        raise ValueError("train: the training split is empty; check the split and the data")
    if early_stopping is not None and eval_data is None:
        raise ValueError(
            "early_stopping: needs eval_data (the validation split it monitors); pass eval_data"
        )
    check_stages(trainer, state.params, stages)
    if mesh is not None:
        parallel.check_batch_size(batch_size, mesh)
    S = num_batches(len(train), batch_size)
    history: list[dict] = []
    partial: list[dict] = []  # summaries of the chunks already run in the current epoch
    if checkpointer is not None:
        restored = checkpointer.restore(state)
        if restored is not None:
            state, extra, _ = restored
            history, partial = list(extra.get("history", [])), list(extra.get("partial", []))
    train = train.to_device()
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    epochs = plan(stages)
    data_key = jax.random.key(data_seed)
    chunk = save_every if save_every > 0 else S
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(epochs), desc="epochs", initial=min(int(state.step) // S, len(epochs)))

    def save(state, history, partial=()):
        if checkpointer is not None:
            checkpointer.save(
                int(state.step), state, {"history": history, "partial": list(partial)}
            )

    es, best_state, best_ck = early_stopping, None, None
    if es is not None and es.restore_best and checkpointer is not None:
        best_ck = checkpointer.beside("best", max_to_keep=1)
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
            state, m = trainer.run(state, part, stage, start=offset)
            m = jax.device_get(m)
            if not _state_finite(state):  # before any save: a checkpoint is never poisoned
                raise _bad_update(m, e, offset, checkpointer)
            if not np.all(m["finite"]):
                if trainer.config.nan_policy == "stop":
                    raise _divergence(trainer, m, e, offset, checkpointer, state, part)
            summaries.append(_summarise(m, trainer.names))
            offset = end
            if save_every > 0 and offset < S:
                save(state, history, summaries)
            if offset < S and should_stop is not None and should_stop():
                save(state, history, summaries)
                raise KeyboardInterrupt(_stopped(state, checkpointer))
        w = np.asarray([s["steps"] for s in summaries], float)
        record: dict[str, Any] = {
            "epoch": e,
            "stage": stage_idx,
            "step": int(state.step),
            "train_loss": float(np.average([s["loss"] for s in summaries], weights=w)),
            "train_losses": {
                n: float(np.average([s["losses"][n] for s in summaries], weights=w))
                for n in trainer.names
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
        if es is not None and "eval" in record:
            best_epoch, _, since = es.status(history)
            stopped = since >= es.patience
            if es.restore_best and best_epoch == e:
                best_state = jax.tree.map(jnp.copy, state)  # the next run donates state's buffers
                if best_ck is not None:
                    best_ck.save(int(state.step), state, {"epoch": e})
        if on_epoch is not None:
            on_epoch(record)
        save(state, history)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.4f}")
        if e + 1 < len(epochs) and not stopped and should_stop is not None and should_stop():
            raise KeyboardInterrupt(_stopped(state, checkpointer))
    if bar is not None:
        bar.close()
    if es is None:
        return FitResult(state, history)
    best_epoch = es.status(history)[0]
    if best_ck is not None:
        if best_state is None and best_epoch is not None:  # resumed after the best evaluation
            restored = best_ck.restore(state)
            best_state = None if restored is None else restored[0]
        best_ck.close()
    if es.restore_best and best_epoch is not None:
        if best_state is None:
            raise RuntimeError(
                f"early_stopping.restore_best: the state of epoch {best_epoch} is gone (its "
                f"checkpoint in {best_ck.directory if best_ck else '-'} was removed); rerun "
                "in a fresh run directory"
            )
        state = best_state if mesh is None else parallel.replicate(best_state, mesh)
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
