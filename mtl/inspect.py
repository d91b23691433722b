"""Notebook helpers over a trained state and a run directory: TAG affinity, gate use, run logs.

``task_affinity`` and ``gate_usage`` wrap the pure instruments of mtl.analysis for a ``Trainer``
and its ``TrainState``; ``analysis_history`` turns the per-epoch "analysis" records that ``fit``
logs (``TrainConfig(log_every=k)``) into arrays; ``load_run`` reads a run directory written by
mtl.experiment.RunDir.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl import analysis
from mtl.data.batching import Dataset, eval_batches
from mtl.train import Trainer, TrainState

__all__ = ["analysis_history", "batch_of", "gate_usage", "load_run", "task_affinity"]


def batch_of(dataset: Dataset, size: int = 1024, seed: int = 0) -> dict[str, Any]:
    """One batch of ``size`` random rows (all rows if fewer) as ``{features, labels, masks, valid}``."""
    if int(size) < 1:
        raise ValueError(f"size: {size} must be >= 1")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset: 0 rows; pass a non-empty split")
    rows = np.sort(np.random.default_rng(seed).permutation(n)[: min(int(size), n)])
    tree = dataset.take(rows).tree()
    return {**jax.tree.map(jnp.asarray, tree), "valid": jnp.ones((rows.size,), jnp.float32)}


def _eval_losses(trainer: Trainer, params: Any, rest: Any, batch: Mapping) -> jax.Array:
    """Per-task losses [T] of the model at ``params`` on ``batch`` (eval mode: no dropout)."""
    model = nnx.merge(trainer.eval_graphdef, params, rest)
    preds, _ = model(batch["features"])
    return trainer._task_losses(preds, batch)


def task_affinity(
    trainer: Trainer, state: TrainState, batch: Mapping, lr: float = 1e-3, normalize: bool = False
) -> np.ndarray:
    """TAG lookahead affinity Z[i, j] = 1 − L_j(θ_s − lr·g_i) / L_j(θ) on the shared params θ_s.

    g_i = ∇_s L_i, task i's gradient on the shared parameters only (plain SGD step ``lr``, as in
    TAG), or g_i / ||g_i|| when ``normalize``: every row then takes a step of length ``lr``, which
    makes rows comparable when the losses differ in scale. ``batch``: a dict of [B, ...] leaves
    (e.g. :func:`batch_of`). Z > 0: a step on task i lowers task j's loss. Eval mode (no dropout).
    """
    if trainer.num_shared == 0:
        raise ValueError(
            f"task_affinity: {trainer.model_name} has no shared parameters; affinity is measured "
            "through shared parameters (use a hard-sharing or mixture model)"
        )
    batch = dict(batch)
    batch.setdefault("valid", jnp.ones(jax.tree.leaves(batch["labels"])[0].shape[:1]))
    z = _affinity_fn(trainer, bool(normalize))(state.params, state.rest, batch, jnp.float32(lr))
    return np.asarray(z)


@functools.lru_cache(maxsize=16)
def _affinity_fn(trainer: Trainer, normalize: bool):
    """The jitted TAG affinity of ``trainer``'s model (cached: compiled once per trainer)."""
    T = len(trainer.tasks)

    @jax.jit
    def affinity(params, rest, batch, lr):
        loss_fn = lambda p: _eval_losses(trainer, p, rest, batch)
        _, vjp = jax.vjp(loss_fn, params)
        (grads_T,) = jax.vmap(vjp)(jnp.eye(T))
        keep = lambda g, m: g if m else jnp.zeros_like(g)  # step the shared parameters only
        grads_T = jax.tree.map(keep, grads_T, trainer.shared)
        if normalize:
            norm_T = analysis.grad_norms(trainer._shared_rows(grads_T))
            scale_T = jnp.where(norm_T > 0, 1.0 / jnp.where(norm_T > 0, norm_T, 1.0), 0.0)
            grads_T = jax.tree.map(
                lambda g: g * scale_T.reshape((T,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads_T
            )
        return analysis.lookahead_affinity(loss_fn, params, grads_T, lr)

    return affinity


def gate_usage(
    trainer: Trainer, state: TrainState, dataset: Dataset, batch_size: int = 4096
) -> dict[str, Any]:
    """Expert use of a gated model over ``dataset``: {tasks, mean [T, E], entropy [T], balance [T]}.

    ``mean[t, e]``: the average weight task t's gate gives expert e; ``entropy[t]``: the average
    per-example gate entropy (nats); ``balance[t]``: the entropy of ``mean[t]`` (log E = uniform).
    Padding rows are excluded. Needs a model whose aux holds ``"gates"`` (mmoe, omoe, cgc, ple).
    """
    _, aux = trainer.predict(state, eval_batches(dataset, batch_size))
    gates = aux.get("gates") if isinstance(aux, Mapping) else None
    if not gates:
        raise ValueError(
            f"gate_usage: {trainer.model_name} returns no aux['gates']; use a gated model "
            "(mmoe, omoe, cgc, ple)"
        )
    names = [t for t in trainer.names if t in gates]
    flat = lambda x: np.asarray(x).reshape((-1, np.shape(x)[-1]))
    gates_TxNxE = np.stack([flat(gates[t]) for t in names])
    n = len(dataset)
    mask_N = (np.arange(gates_TxNxE.shape[1]) < n).astype(np.float32)  # eval padding is at the end
    util = analysis.gate_utilisation(gates_TxNxE, mask_N)
    return {"tasks": tuple(names), **{k: np.asarray(v) for k, v in util.items()}}


def analysis_history(history: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Arrays from the epochs of ``fit``'s history that logged gradient analysis.

    {epoch [E], cosine / conflict_rate / magnitude_similarity [E, T, T], norms [E, T] (epoch
    means), cosine_steps [L, T, T] (every logged step in order), step_epoch [L] (its epoch)}.
    """
    recs = [h for h in history if "analysis" in h]
    if not recs:
        raise ValueError(
            "history: no epoch logged gradient analysis; train with TrainConfig(log_every=k), k > 0"
        )
    out: dict[str, np.ndarray] = {"epoch": np.asarray([h["epoch"] for h in recs])}
    for key in ("cosine", "conflict_rate", "magnitude_similarity", "norms"):
        out[key] = np.asarray([h["analysis"][key] for h in recs], np.float64)
    steps = [(h["epoch"], c) for h in recs for c in h["analysis"]["cosine_steps"]]
    out["cosine_steps"] = np.asarray([c for _, c in steps], np.float64)
    out["step_epoch"] = np.asarray([e for e, _ in steps])
    return out


def load_run(workdir: str | os.PathLike) -> dict[str, Any]:
    """A run directory as python data: {path, config, metrics: {run: [epoch records]}, results}.

    ``config`` is config.json, ``results`` results.json (None when absent); ``metrics`` groups the
    lines of metrics.jsonl by their "run" name (records without one go under "").
    """
    path = Path(workdir)
    files = {name: path / name for name in ("config.json", "metrics.jsonl", "results.json")}
    if not path.is_dir() or not any(f.exists() for f in files.values()):
        raise FileNotFoundError(
            f"load_run: {str(path)!r} holds no config.json, metrics.jsonl or results.json; "
            "pass the --workdir of a finished or running study"
        )
    read = lambda f: json.loads(f.read_text()) if f.exists() else None
    metrics: dict[str, list[dict]] = {}
    if files["metrics.jsonl"].exists():
        for lineno, line in enumerate(files["metrics.jsonl"].read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{files['metrics.jsonl']}:{lineno}: not JSON ({e.msg})") from e
            metrics.setdefault(str(rec.get("run", "")), []).append(rec)
    return {
        "path": path,
        "config": read(files["config.json"]),
        "metrics": metrics,
        "results": read(files["results.json"]),
    }
