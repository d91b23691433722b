"""The training engine: a pure step ``(state, batch) -> (state, metrics)`` and a whole epoch as one
``lax.scan`` over device-resident batches, for joint, alternating and staged schedules.

Every schedule reduces to a list of ``Stage``s. A stage fixes the tasks that contribute, which
parameters may change (``trainable``: groups or regexes, see mtl.partition) and whether steps are
joint (one update on Σ_i λ_i L_i) or alternating (one task per step, round-robin or sampled; only
that task's parameters and the shared ones change). Freezing is a masked update: frozen parameters
and their optimizer moments are selected unchanged (``jnp.where``), so they stay bit-identical.

Per-task gradients come from one forward pass and one VJP in which task i reads its own copy of
the shared parameters (or representation): the rows of the Jacobian, each task-specific part
differentiated once (weightings that read the raw Jacobian use a ``vmap``ped VJP over I); a
gradient aggregator (mtl.aggregation) replaces the shared gradient by aggregate(J) and a loss
weighting (mtl.weighting) supplies λ each step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from mtl import partition
from mtl.losses import l2_to_mean, task_loss
from mtl.spec import TaskSpec, closest, integer, resolve_weights, unknown

Array = jax.Array
SCHEDULES = ("joint", "alternating", "staged")
ORDERS = ("round_robin", "sampled")
NAN_POLICIES = ("stop", "skip")
AGGREGATE_ON = ("params", "representation")


@dataclasses.dataclass(frozen=True)
class Stage:
    """``epochs`` of training on ``tasks`` (None: all) changing only ``trainable`` parameters."""

    epochs: int
    trainable: tuple[str, ...] = ("all",)
    tasks: tuple[str, ...] | None = None
    alternating: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"stage epochs: {self.epochs!r} must be an integer >= 1")
        as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)
        object.__setattr__(self, "trainable", as_tuple(self.trainable))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", as_tuple(self.tasks))
        if not self.trainable:
            raise ValueError("stage trainable: empty; name at least one group or regex (or 'all')")
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("stage tasks: empty; name at least one task (or None for all)")
            twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            if twice:
                raise ValueError(
                    f"stage tasks: {self.tasks!r} names {twice} more than once; name each task "
                    "once (an alternating stage picks its tasks in turn or by TrainConfig.probs)"
                )


def make_schedule(
    kind: str, epochs: int = 1, stages: Sequence[Stage | dict] | None = None
) -> tuple[Stage, ...]:
    """joint / alternating: one stage of ``epochs``; staged: the given stages in order."""
    if kind not in SCHEDULES:
        raise unknown("schedule", kind, SCHEDULES)
    if kind == "staged":
        if not stages:
            raise ValueError("stages: a staged schedule needs at least one stage")
        if isinstance(stages, str | Mapping | Stage) or not isinstance(stages, Sequence):
            raise ValueError(
                f"stages: {stages!r} must be a list of stages (mappings of Stage fields), "
                "e.g. [{'epochs': 2}, {'epochs': 1, 'trainable': ('towers', 'heads')}]"
            )
        return tuple(_stage(i, s) for i, s in enumerate(stages))
    if stages:
        raise ValueError(f"stages: only the 'staged' schedule takes stages, not {kind!r}")
    return (Stage(epochs, alternating=kind == "alternating"),)


def _stage(i: int, s: Stage | Mapping) -> Stage:
    """``stages[i]`` as a Stage, or a ValueError naming it: an unknown field (with the closest
    valid names), no ``epochs``, an ``epochs`` that is not an integer, or not a mapping."""
    if isinstance(s, Stage):
        return s
    fields = [f.name for f in dataclasses.fields(Stage)]
    if not isinstance(s, Mapping):
        raise ValueError(
            f"stages[{i}]: {s!r} is not a mapping of Stage fields; "
            f"write it as {{'epochs': ..., ...}} with fields {fields}"
        )
    for k in s:
        if k not in fields:
            raise ValueError(f"stages[{i}]: unknown field {k!r}; {closest(str(k), fields)}")
    if "epochs" not in s:
        raise ValueError(f"stages[{i}]: no 'epochs'; give every stage its number of epochs")
    return Stage(**{**s, "epochs": integer(f"stages[{i}].epochs", s["epochs"])})


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree of arrays (checkpointed whole)."""

    step: Array  # int32 global step (the schedule and data position derive from it)
    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of everything else (dropout RNG counters, ...)
    opt_state: Any
    weighting: Any
    aggregator: Any
    key: Array  # uint32[2] raw PRNG key
    skipped: Array  # int32 number of non-finite steps skipped
    halted: Array  # bool: a non-finite step stopped training (nan_policy='stop')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static training options."""

    learning_rate: float = 1e-3
    optimizer: str = "adam"  # adam | adamw (optax's weight decay 1e-4) | sgd | adagrad
    weights: dict | None = None  # task -> λ of weighting 'fixed' (defaults to TaskSpec.weight)
    l1: float = 0.0
    l2: float = 0.0
    order: str = "round_robin"  # alternating schedule: round_robin | sampled
    probs: dict | None = None  # alternating 'sampled': task -> probability
    aggregator: str | None = None
    aggregator_kwargs: dict = dataclasses.field(default_factory=dict)
    aggregate_on: str = "params"  # params | representation (MGDA-UB style)
    weighting: str = "fixed"
    weighting_kwargs: dict = dataclasses.field(default_factory=dict)
    nan_policy: str = "stop"
    log_every: int = 0  # gradient-analysis interval in steps (0: off)
    # XLA options for the compiled step and predict (jax.jit's compiler_options). None: the
    # automatic choice (default_compiler_options: on CPU, CPU_JOINT_OPTIONS for steps without
    # per-task gradients, else XLA's defaults); {}: XLA's defaults; a dict: exactly those.
    compiler_options: dict | None = None
    # Microbatches of each step: the batch's rows split k ways (row r in microbatch r mod k), the
    # loss the count-weighted sum of the microbatch losses (the same loss, summed in another
    # order), each microbatch its own forward and backward in the one compiled step. None: the
    # automatic choice (default_microbatches: 2 on CPU for large steps without per-task gradients,
    # where XLA:CPU then runs the two halves side by side; else 1); an int: exactly that many.
    microbatches: int | None = None


# the TrainConfig fields a resumed run must share with the run that wrote the checkpoint
_TRAJECTORY_FIELDS = (
    "learning_rate",
    "optimizer",
    "weights",
    "l1",
    "l2",
    "order",
    "probs",
    "aggregator",
    "aggregator_kwargs",
    "aggregate_on",
    "weighting",
    "weighting_kwargs",
)


class PerLeafState(NamedTuple):
    """The state of ``per_leaf(tx)``: one state of ``tx`` per parameter leaf, in leaf order."""

    leaves: list


def _state_mask(x: jax.Array, m: jax.Array, shape: tuple, stacked: bool) -> jax.Array:
    """The mask of one optimizer-state array ``x`` of a leaf of ``shape`` whose update mask is
    ``m``: a scalar (a step count) moves when any of the leaf trains, the [T] counts of a stacked
    leaf (``per_leaf(..., stacked)``) each when any of its slice does, moments follow ``m``."""
    if x.ndim == 0:
        return jnp.any(m)
    if stacked and x.shape == shape[:1]:  # one count per task slice
        return jnp.broadcast_to(m, shape).reshape(shape[0], -1).any(1)
    return m


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite (no inf, no NaN): one fused reduction."""
    flat = jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(tree)])
    return jnp.isfinite(flat).all()


def per_leaf(
    tx: optax.GradientTransformation, stacked: Sequence[bool] | None = None
) -> optax.GradientTransformation:
    """``tx`` applied to every parameter leaf on its own: each leaf keeps its own step count, so
    a group frozen for a stage (its update masked, its moments unchanged) starts Adam's bias
    correction afresh when it trains, as PyTorch's per-parameter ``step`` does; one shared count
    would have corrected its fresh moments as old ones (the first step up to ~3x, later ones up
    to ~6x the learning rate). ``stacked`` (per leaf, in leaf order): leaves whose leading axis
    holds one slice per task (soft sharing's, PLE's and cross-stitch's ``columns``) get ``tx``
    vmapped over that axis, so each task's slice has its own count too. Only for element-wise
    optimizers (the built-in ones): a transform that reads the whole tree
    (clip_by_global_norm) would see one leaf at a time."""

    def flags(n):
        return [False] * n if stacked is None else list(stacked)

    def init(params):
        leaves = jax.tree.leaves(params)
        return PerLeafState(
            [
                jax.vmap(tx.init)(p) if f else tx.init(p)
                for p, f in zip(leaves, flags(len(leaves)), strict=True)
            ]
        )

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        ps = jax.tree.leaves(params) if params is not None else [None] * len(leaves)
        out = [
            (jax.vmap(tx.update) if f else tx.update)(u, s, p)
            for u, s, p, f in zip(leaves, state.leaves, ps, flags(len(leaves)), strict=True)
        ]
        return treedef.unflatten([u for u, _ in out]), PerLeafState([s for _, s in out])

    return optax.GradientTransformation(init, update)


OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "adagrad": optax.adagrad}


# XLA:CPU without its YNNPACK fusions (dots through Eigen, reductions and elementwise ops through
# XLA's own emitters) and with copy insertion's region analysis (the scanned step then updates its
# Adam moments in place instead of copying them first; buffers change, arithmetic does not). In
# `experiments/ablate_step.py --only xla` (docs/results/ablations.md) this made steps without
# per-task gradients faster (shared bottom and MMoE: -8% to -12% at batch 256, -1% to -9% at 1024,
# -2% to -4% at 4096) and steps with them slower (UPGrad +6% to +38%, representation-level MGDA up
# to +75%: their Gram's reductions over long rows run fastest in YNNPACK). So it is the automatic
# choice (TrainConfig.compiler_options=None) for the former, on CPU only, except steps with a
# retrieval task: the in-batch softmax over [B, B] logits also runs fastest in YNNPACK (the TFRS
# protocol's two-tower steps at batch 8192 trained in 12.0-12.2 s with these options against 9.2 s
# with XLA's defaults; ours at batch 1024 within the noise, 10.2-10.7 against 10.3-10.5 s).
CPU_JOINT_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_copy_insertion_use_region_analysis": True,
}


def default_compiler_options(per_task: bool, retrieval: bool = False) -> dict:
    """What ``TrainConfig.compiler_options=None`` stands for: on the CPU backend, CPU_JOINT_OPTIONS
    for a step that computes no per-task gradients (``per_task`` False) and has no retrieval task
    (``retrieval`` False), when this jaxlib accepts them; XLA's defaults (``{}``) otherwise. Only
    speed depends on it: dots summed in another order move results in the last float digits."""
    if per_task or retrieval or jax.default_backend() != "cpu":
        return {}
    if _xla_refusal(tuple(CPU_JOINT_OPTIONS.items())) is not None:  # a jaxlib without the option
        return {}
    return dict(CPU_JOINT_OPTIONS)


# the smallest batch that the automatic choice splits on CPU (smaller ones gained nothing)
CPU_MICROBATCH_MIN = 512


def default_microbatches(batch_size: int, per_task: bool, exact: bool) -> int:
    """What ``TrainConfig.microbatches=None`` stands for at ``batch_size``: 2 on the CPU backend for
    a step that computes no per-task gradients (``per_task`` False) when splitting changes nothing
    but the order of sums (``exact``: no retrieval task, no active dropout) and the batch is even
    and at least CPU_MICROBATCH_MIN; 1 otherwise. Two independent halves let XLA:CPU keep both
    cores busy (its ops on a whole batch leave a core idle part of the time)."""
    if per_task or not exact or jax.default_backend() != "cpu":
        return 1
    return 2 if batch_size >= CPU_MICROBATCH_MIN and batch_size % 2 == 0 else 1


@functools.cache
def _xla_refusal(options: tuple[tuple[str, Any], ...]) -> str | None:
    """Why XLA refuses to compile a one-op program with ``options`` (None: it accepts them)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros(())).compile()
    except Exception as e:  # noqa: BLE001 - XLA's own message says which option and why
        return str(e)
    return None


def check_compiler_options(options: dict) -> dict | None:
    """``options`` (TrainConfig.compiler_options) as jax.jit takes them, after XLA accepted them on
    a one-op program: a misspelt name or a bad value fails here, naming it, not at the first step."""
    if not isinstance(options, dict):
        raise TypeError(
            f"compiler_options: {options!r} must be a dict of XLA option name -> value, e.g. "
            f"{CPU_JOINT_OPTIONS}"
        )
    for k, v in options.items():
        if not isinstance(k, str) or not isinstance(v, str | bool | int | float):
            raise TypeError(
                f"compiler_options: {k!r}: {v!r} must map an option name (str) to a str, bool, "
                "int or float"
            )
    if not options:
        return None
    refused = _xla_refusal(tuple(options.items()))
    if refused is not None:
        raise ValueError(
            f"compiler_options: XLA ({jax.default_backend()}, jaxlib {jax.__version__}) rejected "
            f"{options}: {refused}; fix the name or value, or drop the option"
        )
    return dict(options)


class Trainer:
    """Holds the static parts (graphdefs, optimizer, tasks, methods) and the compiled functions."""

    def __init__(self, model: nnx.Module, config: TrainConfig = TrainConfig(), tx=None):
        from mtl import aggregation, weighting  # imported lazily: optional methods

        c = self.config = config
        self.tasks: tuple[TaskSpec, ...] = tuple(model.tasks)
        self.names = tuple(t.name for t in self.tasks)
        T = len(self.tasks)
        self.lam_T = np.asarray(resolve_weights(self.tasks, c.weights), np.float32)
        if c.order not in ORDERS:
            raise unknown("order", c.order, ORDERS)
        if c.nan_policy not in NAN_POLICIES:
            raise unknown("nan_policy", c.nan_policy, NAN_POLICIES)
        if c.aggregate_on not in AGGREGATE_ON:
            raise unknown("aggregate_on", c.aggregate_on, AGGREGATE_ON)
        if c.log_every < 0:
            raise ValueError(f"log_every: {c.log_every} must be >= 0 (0 turns logging off)")
        for field in ("l1", "l2"):
            if not getattr(c, field) >= 0:
                raise ValueError(f"{field}: {getattr(c, field)} must be >= 0")
        self.probs_T = None
        if c.probs is not None and c.order != "sampled":
            raise ValueError(
                f"probs: {c.probs} apply only to order='sampled' (order is {c.order!r}); set "
                "order='sampled' or drop probs"
            )
        if c.aggregator_kwargs and c.aggregator is None:
            raise ValueError(
                f"aggregator_kwargs: {c.aggregator_kwargs} without an aggregator would be ignored; "
                "set aggregator= or drop aggregator_kwargs"
            )
        if c.probs is not None:
            extra = sorted(set(c.probs) - set(self.names))
            if extra:
                raise ValueError(f"probs: keys {extra} are not tasks {list(self.names)}")
            p = np.asarray([float(c.probs.get(n, 0.0)) for n in self.names], np.float32)
            if (p < 0).any() or p.sum() <= 0:
                raise ValueError(f"probs: {c.probs} must be >= 0 with a positive sum")
            self.probs_T = p / p.sum()
        table, _ = partition.owner_table(nnx.state(model, nnx.Param), self.names)
        self._stacked = [row is None for row in table]  # columns: one slice per task
        if tx is None:
            if c.optimizer not in OPTIMIZERS:
                raise unknown("optimizer", c.optimizer, OPTIMIZERS)
            if not c.learning_rate > 0:
                raise ValueError(f"learning_rate: {c.learning_rate} must be > 0")
            tx = per_leaf(OPTIMIZERS[c.optimizer](c.learning_rate), self._stacked)
        self.tx = tx
        self.aggregator = (
            None
            if c.aggregator is None
            else aggregation.get_aggregator(c.aggregator, **c.aggregator_kwargs)
        )
        wkw = dict(c.weighting_kwargs)
        if c.weighting == "fixed":
            wkw.setdefault("weights", self.lam_T)
        elif (self.lam_T != 1).any():  # another weighting sets λ itself: they would be ignored
            lam = dict(zip(self.names, self.lam_T.tolist(), strict=True))
            raise ValueError(
                f"weights: {lam} (TrainConfig.weights, else each TaskSpec.weight) are the task "
                f"weights of weighting 'fixed'; weighting {c.weighting!r} sets them itself and "
                "would ignore these; drop them (every weight 1), or use weighting='fixed'"
            )
        self.weighting = weighting.get_weighting(c.weighting, T, **wkw)
        self.penalty_lam = float(getattr(model, "penalty", 0.0))

        self.model_name = type(model).__name__
        model.train()  # the step's graphdef has dropout on, the eval graphdef has it off
        # Fused towers (one matmul for all first tower layers) only pay off when one backward
        # pass carries every task at once. With an aggregator each task decodes its own copy of
        # the shared part, and a weighting that reads the Jacobian backpropagates one task per
        # vmapped row: a fused layer would then carry every tower's gradient in every copy/row.
        per_task = self.aggregator is not None or "jacobian" in self.weighting.needs
        retrieval = [t.name for t in self.tasks if t.kind == "retrieval"]
        dropout = any(isinstance(m, nnx.Dropout) and m.rate > 0 for _, m in nnx.iter_graph(model))
        # the automatic choices read the step's kind (gradient logging computes per-task
        # gradients too) and whether a split would change more than the order of sums
        self._per_task = per_task or c.log_every > 0
        self._split_exact = not retrieval and not dropout
        if c.microbatches is not None:
            k = integer(
                "microbatches", c.microbatches, 1, " (1 keeps the batch whole; None: automatic)"
            )
            if k > 1 and retrieval:
                raise ValueError(
                    f"microbatches: {k} would split the batch, but task {retrieval[0]!r} is a "
                    "retrieval task whose in-batch softmax takes its negatives from the whole "
                    "batch; use microbatches=1 (or None)"
                )
            if k > 1 and self.aggregator is not None and c.aggregate_on == "representation":
                raise ValueError(
                    f"microbatches: {k} is not supported with aggregate_on='representation' (the "
                    "aggregator combines the whole batch's representation gradients); use "
                    "microbatches=1 (or None), or aggregate_on='params'"
                )
        fused = getattr(model, "fuse_towers", None)
        if fused is not None:
            model.fuse_towers = fused and not per_task
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        if fused is not None:
            model.fuse_towers = fused
        model.eval()
        self.eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
        model.train()
        self.shared = partition.shared_mask(params, self.names)
        self.num_shared = sum(
            int(np.prod(x.shape))
            for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(self.shared), strict=True)
            if m
        )
        if self.aggregator is not None and self.num_shared == 0 and c.aggregate_on == "params":
            raise ValueError(
                f"aggregator: {c.aggregator!r} needs shared parameters, but {type(model).__name__} has none; "
                "use a hard-sharing or mixture model, or aggregator=None"
            )
        if c.log_every and self.num_shared == 0:
            raise ValueError(
                f"log_every: {c.log_every} logs statistics of the tasks' gradients on the shared "
                f"parameters, but {type(model).__name__} has none; use a hard-sharing or mixture "
                "model, or log_every=0"
            )
        self._template = (params, rest)
        self._masks: dict = {}  # stage_mask's cache
        opts = check_compiler_options(  # gradient logging computes per-task gradients too
            default_compiler_options(self._per_task, bool(retrieval))
            if c.compiler_options is None
            else c.compiler_options
        )
        self.compiler_options = opts or {}  # what the step and predict are compiled with
        self._epoch = jax.jit(
            self._epoch_fn,
            donate_argnums=(0,),
            static_argnames=("task_ids", "alternating", "phase"),
            compiler_options=opts,
        )
        self._predict = jax.jit(self._predict_fn, compiler_options=opts)

    # ------------------------------------------------------------------ state
    def init(self, model: nnx.Module, seed: int = 0) -> TrainState:
        """The initial train state of ``model`` (its current parameters)."""
        _, params, rest = nnx.split(model, nnx.Param, ...)
        # copies: the step donates the state's buffers, which must not be the model's own
        params, rest = jax.tree.map(jnp.copy, (params, rest))
        P = self.num_shared if self.config.aggregate_on == "params" else 0
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            rest=rest,
            opt_state=self.tx.init(params),
            weighting=self.weighting.init(len(self.tasks)),
            aggregator=() if self.aggregator is None else self.aggregator.init(len(self.tasks), P),
            key=jax.random.key_data(jax.random.key(seed)),
            skipped=jnp.zeros((), jnp.int32),
            halted=jnp.zeros((), bool),
        )

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be restored into this trainer: the model, tasks and
        parameter shapes, the options that shape the trajectory (learning rate, optimizer, λ,
        penalties, order, aggregator, weighting and their arguments) and the optimizer state's
        layout."""
        params = self._template[0]
        shapes = {
            p: list(x.shape)
            for p, x in zip(partition.paths(params), jax.tree.leaves(params), strict=True)
        }
        cfg = dataclasses.asdict(self.config)
        opt = jax.tree.structure(jax.eval_shape(self.tx.init, params))
        layout = "per-leaf" if opt.node_data() and opt.node_data()[0] is PerLeafState else "tree"
        return {
            "model": self.model_name,
            "tasks": [dataclasses.asdict(t) for t in self.tasks],
            "params": shapes,
            # what shapes the trajectory (not nan_policy, log_every, compiler_options, microbatches)
            "config": {k: cfg[k] for k in _TRAJECTORY_FIELDS},
            # the optimizer state's layout (a checkpoint of another one cannot be restored)
            "opt_state": f"{layout} {hashlib.sha1(str(opt).encode()).hexdigest()[:12]}",
        }

    def model(self, state: TrainState, train: bool = False) -> nnx.Module:
        """A stateful nnx model holding the state's parameters (for inspection and notebooks)."""
        return nnx.merge(self.graphdef if train else self.eval_graphdef, state.params, state.rest)

    def stage_mask(self, state: TrainState, stage: Stage):
        """The trainable mask of ``stage`` as device arrays, built once per stage and params layout
        (a fresh numpy mask costs a path walk and a transfer per leaf on every ``run``)."""
        key = (jax.tree.structure(state.params), stage.trainable)
        if key not in self._masks:
            mask = partition.selector_mask(state.params, stage.trainable)
            self._masks[key] = jax.device_put(mask)
        return self._masks[key]

    def stage_probs(self, ids: Sequence[int]) -> np.ndarray:
        """The sampling probabilities of a sampled alternating stage's tasks ``ids`` (TrainConfig
        .probs, else uniform), normalised over them; refused when they are all 0."""
        p = (self.probs_T if self.probs_T is not None else np.ones(len(self.tasks), np.float32))[
            list(ids)
        ]
        if p.sum() <= 0:
            names = [self.names[i] for i in ids]
            raise ValueError(f"probs: every task of the stage {names} has probability 0")
        return p / p.sum()

    def task_ids(self, stage: Stage) -> tuple[int, ...]:
        if stage.tasks is None:
            return tuple(range(len(self.tasks)))
        for n in stage.tasks:
            if n not in self.names:
                raise unknown("stage tasks", n, self.names)
        return tuple(self.names.index(n) for n in stage.tasks)

    # ------------------------------------------------------------------ losses
    def _task_mask(self, i: int, batch) -> Array | None:
        """Task i's example weights on ``batch`` (its label mask times ``valid``; None: all 1)."""
        valid = batch.get("valid")
        m = batch.get("masks", {}).get(self.tasks[i].name)
        return valid if m is None else (m if valid is None else m * valid)

    def _task_loss(self, i: int, preds, batch) -> Array:
        t = self.tasks[i]
        return task_loss(t.kind, preds[t.name], batch["labels"][t.name], self._task_mask(i, batch))

    def _task_losses(self, preds, batch) -> Array:
        return jnp.stack([self._task_loss(i, preds, batch) for i in range(len(self.tasks))])

    def _rngs(self, key):
        return nnx.Rngs(dropout=key)

    def microbatches(self, batch_size: int) -> int:
        """How many microbatches a step on ``batch_size`` rows splits into (TrainConfig.microbatches,
        or the automatic choice ``default_microbatches``); a ValueError if they do not divide it."""
        k = self.config.microbatches
        if k is None:
            return default_microbatches(batch_size, self._per_task, self._split_exact)
        if batch_size % k:
            divisors = [d for d in (2, 4, 8) if batch_size % d == 0]
            fix = f"e.g. {divisors[0]}, " if divisors else ""
            raise ValueError(
                f"microbatches: {k} does not divide the batch size {batch_size}; use a divisor of "
                f"it ({fix}or 1 to keep the batch whole)"
            )
        return k

    def _over_microbatches(self, batch, key, losses_of) -> Array:
        """losses_T = ``losses_of(batch, key)`` computed over the step's microbatches.

        Microbatch j holds rows j, j + k, j + 2k, ... (a data-parallel batch stays evenly spread
        over its devices), with dropout key fold_in(key, j). Every loss is a weighted mean over
        examples, so task i's loss is Σ_j s_ji L_ji with s_ji microbatch j's share of task i's
        example weight: the loss of the whole batch, summed in another order. The microbatches'
        forward and backward passes are independent parts of the one compiled step."""
        B = jax.tree.leaves(batch)[0].shape[0]
        k = self.microbatches(B)
        if k == 1:
            return losses_of(batch, key)
        parts = [
            jax.tree.map(lambda x, j=j: x.reshape(B // k, k, *x.shape[1:])[:, j], batch)
            for j in range(k)
        ]
        weight = lambda i, part: (
            jnp.float32(B // k)
            if (m := self._task_mask(i, part)) is None
            else jnp.sum(m, dtype=jnp.float32)
        )
        counts_kT = jnp.stack(
            [jnp.stack([weight(i, p) for i in range(len(self.tasks))]) for p in parts]
        )
        share_kT = counts_kT / jnp.maximum(jnp.sum(counts_kT, 0), 1e-12)
        losses_kT = jnp.stack(
            [losses_of(p, jax.random.fold_in(key, j)) for j, p in enumerate(parts)]
        )
        return jnp.sum(share_kT * losses_kT, 0)

    def _losses_fn(self, params, rest, batch, key) -> Array:
        """losses_T of the model at ``params`` on ``batch`` (over the step's microbatches); ``key``
        drives dropout."""
        model = nnx.merge(self.graphdef, params, rest)
        losses_of = lambda b, k: self._task_losses(model(b["features"], self._rngs(k))[0], b)
        return self._over_microbatches(batch, key, losses_of)

    def _penalty(self, params) -> Array:
        """λ_soft Σ_i ||θ_i − θ̄||² over stacked columns + l2 Σθ² + l1 Σ|θ|."""
        c, total = self.config, jnp.zeros(())
        if self.penalty_lam > 0 and "columns" in params:
            total += self.penalty_lam * l2_to_mean(params["columns"])
        leaves = jax.tree.leaves(params)
        if c.l2 > 0:
            total += c.l2 * sum(jnp.sum(jnp.square(x)) for x in leaves)
        if c.l1 > 0:
            total += c.l1 * sum(jnp.sum(jnp.abs(x)) for x in leaves)
        return total

    def _shared_rows(self, J):
        """[T, P] flat Jacobian of the shared leaves of a task-stacked gradient pytree."""
        leaves = zip(jax.tree.leaves(J), jax.tree.leaves(self.shared), strict=True)
        rows = [x.reshape(x.shape[0], -1) for x, m in leaves if m]
        return jnp.concatenate(rows, axis=1) if rows else jnp.zeros((len(self.tasks), 0))

    def _unflatten_shared(self, vec_P, like):
        """Place a flat shared vector back into the shared leaves of ``like`` (others unchanged)."""
        leaves, treedef = jax.tree.flatten(like)
        out, i = [], 0
        for x, m in zip(leaves, jax.tree.leaves(self.shared), strict=True):
            if m:
                n = int(np.prod(x.shape))
                out.append(vec_P[i : i + n].reshape(x.shape).astype(x.dtype))
                i += n
            else:
                out.append(x)
        return jax.tree.unflatten(treedef, out)

    # ------------------------------------------------------------------ step
    def _aggregate(self, J_TxP, agg_state, key, rows):
        """The aggregator on the rows of the tasks that train in this step (``rows``: their
        indices; None: all), its state restricted to them and written back: a task outside the
        stage, or not picked by an alternating step, is not a zero row (MGDA would return 0,
        the mean would divide by T)."""
        from mtl import aggregation  # imported lazily, as in __init__

        with aggregation._rows_made_apart():  # J is a stack of the per-task VJPs' rows
            if rows is None:
                return self.aggregator.apply(J_TxP, agg_state, key)
            sub = self.aggregator.restrict(agg_state, rows)
            v_P, sub = self.aggregator.apply(jnp.take(J_TxP, rows, axis=0), sub, key)
        return v_P, self.aggregator.expand(agg_state, sub, rows)

    def _grads(self, state: TrainState, batch, key, active_T, rows=None):
        """(losses_T, λ_T, grads, jacobian_TxP or None, new aggregator state).

        λ_T = weighting(losses) · active_T: tasks outside the stage, or not picked by an
        alternating step, contribute nothing; the aggregator sees only the ``rows`` that train.
        With an aggregator, task i's loss reads its own copy of the shared parameters (or of the
        representation): the copies are the same arrays, so XLA computes the forward once (CSE)
        and drops what loss i does not read (DCE), and one VJP with cotangent λ gives every row
        λ_i ∇L_i while each tower is differentiated once — not T backward passes of the whole
        model. Weightings that read the Jacobian (GradNorm) get the raw rows ∇L_i: a vmapped VJP
        over the rows of I, or with an aggregator one more VJP with cotangent 1.
        """
        c, T = self.config, len(self.tasks)
        k_drop, k_w, k_agg = jax.random.split(key, 3)
        needs_J = "jacobian" in self.weighting.needs
        weights = lambda losses_T: jax.lax.stop_gradient(
            self.weighting.weights(state.weighting, losses_T, k_w, active_T > 0) * active_T
        )
        if self.aggregator is not None and c.aggregate_on == "representation":
            # MGDA-UB style (Sener & Koltun 2018): aggregate on the shared representation z,
            # then one VJP through the encoder with the aggregated cotangent.
            def rep_fn(params):
                model = nnx.merge(self.graphdef, params, state.rest)
                return model.represent(batch["features"], self._rngs(k_drop))

            def dec_fn(params, reps):  # task i decodes its own copy reps[i] of rep
                model = nnx.merge(self.graphdef, params, state.rest)
                preds, aux = model.decode_each(reps, self._rngs(jax.random.fold_in(k_drop, 1)))
                return self._task_losses(preds, batch), aux

            rep, enc_vjp = jax.vjp(rep_fn, state.params)
            losses_T, dec_vjp, aux = jax.vjp(dec_fn, state.params, (rep,) * T, has_aux=True)
            w_T = weights(losses_T)
            g_dec, Jr = dec_vjp(w_T)
            stack = lambda reps: jnp.stack([ravel_pytree(r)[0] for r in reps])
            unravel = ravel_pytree(rep)[1]
            v_R, agg_state = self._aggregate(stack(Jr), state.aggregator, k_agg, rows)
            (g_enc,) = enc_vjp(unravel(v_R))
            grads = jax.tree.map(jnp.add, g_dec, g_enc)
            J = None
            if needs_J:
                raw_TxR = stack(dec_vjp(jnp.ones_like(w_T))[1])
                J = self._shared_rows(jax.vmap(lambda ct: enc_vjp(unravel(ct))[0])(raw_TxR))
            return losses_T, w_T, grads, J, agg_state

        if self.aggregator is None:
            losses_T, vjp = jax.vjp(
                lambda p: self._losses_fn(p, state.rest, batch, k_drop), state.params
            )
            w_T = weights(losses_T)
            (grads,) = vjp(w_T)
            J = self._shared_rows(jax.vmap(vjp)(jnp.eye(T))[0]) if needs_J else None
            return losses_T, w_T, grads, J, state.aggregator
        flags = jax.tree.leaves(self.shared)
        leaves, treedef = jax.tree.flatten(state.params)
        shared = [x for x, m in zip(leaves, flags, strict=True) if m]
        own = [x for x, m in zip(leaves, flags, strict=True) if not m]

        def params_of(shared, own):
            s, o = iter(shared), iter(own)
            return jax.tree.unflatten(treedef, [next(s) if m else next(o) for m in flags])

        def losses_fn(copies, own):  # task i reads its own copy copies[i] of the shared leaves
            models = [nnx.merge(self.graphdef, params_of(c, own), state.rest) for c in copies]

            def losses_of(b, key):
                outs = [m(b["features"], self._rngs(key))[0] for m in models]
                return jnp.stack([self._task_loss(i, outs[i], b) for i in range(T)])

            return self._over_microbatches(batch, k_drop, losses_of)

        losses_T, vjp = jax.vjp(losses_fn, (shared,) * T, own)
        w_T = weights(losses_T)
        copies, g_own = vjp(w_T)
        stack = lambda copies: jnp.stack(
            [jnp.concatenate([g.reshape(-1) for g in row]) for row in copies]
        )
        J = stack(copies)
        v_P, agg_state = self._aggregate(J, state.aggregator, k_agg, rows)
        grads = self._unflatten_shared(v_P, params_of(shared, g_own))
        J = stack(vjp(jnp.ones_like(w_T))[0]) if needs_J else None
        return losses_T, w_T, grads, J, agg_state

    def _step_fn(self, state: TrainState, xs, trainable, task_ids, alternating: bool):
        """One update on ``xs`` = (batch, whether the step ends its epoch); returns (new state,
        per-step metrics)."""
        from mtl.weighting import StepInfo

        batch, epoch_end = xs
        c, T = self.config, len(self.tasks)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        k_task, k_grad, k_w, k_next = jax.random.split(key, 4)
        ids = np.asarray(task_ids)
        if alternating:
            if c.order == "round_robin":
                t = jnp.asarray(ids)[state.step % len(ids)]
            else:
                p = self.stage_probs(ids)
                t = jnp.asarray(ids)[jax.random.choice(k_task, len(ids), p=jnp.asarray(p))]
            active_T = jax.nn.one_hot(t, T)
            mask = partition.and_masks(trainable, partition.task_mask(state.params, self.names, t))
        else:
            t = jnp.asarray(-1)
            active_T = jnp.asarray(np.isin(np.arange(T), ids), jnp.float32)
            mask = trainable
            if len(ids) < T:  # a stage on some tasks leaves the others' own parameters alone
                mask = partition.and_masks(
                    mask, partition.tasks_mask(state.params, self.names, ids)
                )

        # the aggregator's rows: the task picked by an alternating step, or the stage's tasks
        rows = t[None] if alternating else jnp.asarray(ids) if len(ids) < T else None
        losses_T, w_T, grads, J, agg_state = self._grads(state, batch, k_grad, active_T, rows)
        loss = jnp.dot(w_T, losses_T)
        if c.l1 > 0 or c.l2 > 0 or (self.penalty_lam > 0 and "columns" in state.params):
            pen, pen_grads = jax.value_and_grad(self._penalty)(state.params)
            grads = jax.tree.map(jnp.add, grads, pen_grads)
            loss = loss + pen

        # One fused reduction over all leaves: a check per leaf cost ~30% of the compile time.
        # Checking the new parameters as well (an update that is non-finite from finite
        # gradients, e.g. a NaN learning rate) cost +15% per step at batch 256, so the runner
        # checks the state once per chunk instead (runner.fit, before it saves).
        grads_finite = all_finite(grads)
        finite = jnp.isfinite(losses_T).all() & grads_finite
        ok = finite & ~state.halted
        updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        mask = jax.tree.map(lambda m: jnp.logical_and(m, ok), mask)
        params = jax.tree.map(jnp.where, mask, new_params, state.params)
        # per leaf: the moments take the leaf's mask (a slice of stacked per-task columns too),
        # its step count moves when any of it trains (for stacked columns: a count per slice)
        if isinstance(state.opt_state, PerLeafState):
            leaves = zip(
                state.opt_state.leaves,
                jax.tree.leaves(mask),
                jax.tree.leaves(state.params),
                self._stacked,
                strict=True,
            )
            opt_mask = PerLeafState(
                [
                    jax.tree.map(lambda x, m=m, p=p, f=f: _state_mask(x, m, p.shape, f), s)
                    for s, m, p, f in leaves
                ]
            )
        else:
            opt_mask = optax.tree_utils.tree_map_params(
                self.tx, lambda _, m: m, state.opt_state, mask, transform_non_params=lambda _: ok
            )
        opt_state = jax.tree.map(jnp.where, opt_mask, new_opt, state.opt_state)

        next_losses = None
        if "next_losses" in self.weighting.needs:
            next_losses = self._losses_fn(params, state.rest, batch, k_next)
        info = StepInfo(
            losses=losses_T,
            next_losses=next_losses,
            jacobian=J,
            step=state.step,
            key=k_w,
            epoch_end=epoch_end,
            active=active_T > 0,
        )
        new_w = self.weighting.update(state.weighting, info)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        halted = state.halted | (~finite if c.nan_policy == "stop" else jnp.zeros((), bool))
        new_state = TrainState(
            step=state.step + (~halted).astype(jnp.int32),
            params=params,
            rest=state.rest,
            opt_state=opt_state,
            weighting=keep(new_w, self._skipped_weighting(state.weighting, info, halted)),
            aggregator=keep(agg_state, state.aggregator),
            key=state.key,
            skipped=state.skipped + (~finite & ~state.halted).astype(jnp.int32),
            halted=halted,
        )
        metrics = {
            "loss": loss,
            "losses": losses_T,
            "weights": w_T,
            "finite": finite,
            "grads_finite": grads_finite,
            "task": t,
            "step": state.step,
        }
        return new_state, metrics

    def _skipped_weighting(self, w_state, info, halted):
        """The weighting state after a non-finite step: unchanged, or under nan_policy='skip' its
        ``skip`` (DWA still closes the epoch that a skipped step ends)."""
        if self.weighting.skip is None:
            return w_state
        skipped = self.weighting.skip(w_state, info)
        return jax.tree.map(lambda o, n: jnp.where(halted, o, n), w_state, skipped)

    def _analysis(self, state: TrainState, batch) -> dict:
        """Gradient statistics (mtl.analysis.summarize) of the raw per-task shared Jacobian, at the
        state before a step, with that step's dropout key."""
        from mtl import analysis

        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        k_drop = jax.random.split(jax.random.split(key, 4)[1], 3)[0]  # as in _step_fn / _grads
        _, vjp = jax.vjp(lambda p: self._losses_fn(p, state.rest, batch, k_drop), state.params)
        J = self._shared_rows(jax.vmap(vjp)(jnp.eye(len(self.tasks)))[0])
        return analysis.summarize(J)

    def _epoch_fn(
        self, state, batches, trainable, task_ids, alternating, phase, start, epoch_steps
    ):
        """Scan the steps; with logging, epoch positions phase + i ≡ 0 (mod log_every) also log.

        Step i is at position ``start`` + i of an epoch of ``epoch_steps`` steps (traced scalars:
        a chunk's offset does not recompile); StepInfo.epoch_end marks the epoch's last step.

        Logging keeps the step itself unchanged: a scan over groups [logged position, next one),
        whose body computes the gradient statistics at the group's first step and then loops over
        the group's steps. Steps pay nothing for logging, and the step and the statistics compile
        once each. Metrics gain "analysis" (zeros where not logged) and "logged" ([S] bool).
        """
        step = functools.partial(
            self._step_fn, trainable=trainable, task_ids=task_ids, alternating=alternating
        )
        k = self.config.log_every
        n = jax.tree.leaves(batches)[0].shape[0]
        xs = (batches, start + jnp.arange(n, dtype=jnp.int32) == epoch_steps - 1)
        if not (k and self.num_shared):
            return jax.lax.scan(step, state, xs)
        at = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False), xs)
        shapes = jax.eval_shape(step, state, at(0))[1]
        buf = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), shapes)

        def one_step(i, carry):
            st, buf = carry
            st, m = step(st, at(i))
            return st, jax.tree.map(
                lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x, i, 0), buf, m
            )

        head = min((-phase) % k, n)  # steps before the first logged position (a chunk's start)
        logged_at = np.arange(head, n, k)
        starts = np.concatenate([[0] if head else [], logged_at]).astype(np.int32)
        ends = np.append(starts[1:], n).astype(np.int32)
        measure = lambda st, i: self._analysis(st, at(i)[0])
        stats = measure
        if head:  # the head group logs nothing: one lax.cond per group, none per step
            zeros = lambda st, i: jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(measure, st, i)
            )
            stats = lambda st, i: jax.lax.cond(i >= head, measure, zeros, st, i)

        def group(carry, bounds):
            i, end = bounds
            out = stats(carry[0], i)
            return jax.lax.fori_loop(i, end, one_step, carry), out

        (state, metrics), logged_stats = jax.lax.scan(group, (state, buf), (starts, ends))
        if head:
            logged_stats = jax.tree.map(lambda x: x[1:], logged_stats)
        metrics["analysis"] = jax.tree.map(
            lambda x: jnp.zeros((n, *x.shape[1:]), x.dtype).at[logged_at].set(x), logged_stats
        )
        metrics["logged"] = jnp.asarray(np.isin(np.arange(n), logged_at))
        return state, metrics

    def run(
        self,
        state: TrainState,
        batches,
        stage: Stage,
        start: int = 0,
        epoch_steps: int | None = None,
    ) -> tuple[TrainState, dict]:
        """Run the scanned steps of ``batches`` (leaves [S, B, ...]) in one compiled call.

        ``start`` is the position of the first batch within its epoch of ``epoch_steps`` steps
        (default: the epoch ends with these batches), for chunks of an epoch: gradient analysis
        logs at positions 0, log_every, 2·log_every, ... of every epoch, and epoch-level
        weightings (DWA) close an epoch at its last step.
        """
        args, kwargs = self._epoch_call(state, batches, stage, start, epoch_steps)
        return self._epoch(*args, **kwargs)

    def lower(
        self,
        state: TrainState,
        batches,
        stage: Stage,
        start: int = 0,
        epoch_steps: int | None = None,
    ) -> jax.stages.Lowered:
        """The compiled call ``run`` makes with these arguments, lowered but not run (``state`` is
        not donated): ``.compile()`` gives its executable (``as_text()``, ``cost_analysis()``),
        which jax caches, so a ``run`` with the same shapes then reuses it."""
        args, kwargs = self._epoch_call(state, batches, stage, start, epoch_steps)
        return self._epoch.lower(*args, **kwargs)

    def _epoch_call(self, state, batches, stage, start, epoch_steps) -> tuple[tuple, dict]:
        k = self.config.log_every
        n = jax.tree.leaves(batches)[0].shape[0]
        epoch_steps = start + n if epoch_steps is None else epoch_steps
        args = (state, batches, self.stage_mask(state, stage))
        kwargs = dict(
            task_ids=self.task_ids(stage),
            alternating=stage.alternating,
            phase=int(start) % k if k else 0,
            start=jnp.asarray(start, jnp.int32),
            epoch_steps=jnp.asarray(epoch_steps, jnp.int32),
        )
        return args, kwargs

    # ------------------------------------------------------------------ eval
    def _predict_fn(self, params, rest, batches):
        def body(carry, batch):  # params ride in the carry so nnx sees them at the scan's level
            model = nnx.merge(self.eval_graphdef, *carry)
            preds, aux = model(batch["features"])
            return carry, (preds, aux)

        return jax.lax.scan(body, (params, rest), batches)[1]

    def predict(self, state: TrainState, batches) -> tuple[dict, dict]:
        """Predictions for scanned eval batches, flattened to [S·B, ...] (padding rows included)."""
        preds, aux = self._predict(state.params, state.rest, batches)
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        return jax.tree.map(flat, preds), aux
