"""Task-relationship instruments: which tasks help each other, and how a gated model uses experts.

Every function is pure and jit-able, so a train step can call it at a logging interval. Most take
``jacobian_TxP``: one row per task, the gradient of that task's loss with respect to the *shared*
parameters, flattened (see :func:`flatten_task_grads`). Shape suffixes: T tasks, P shared
parameters, S logged steps, B examples, E experts.

Zero-gradient rows are safe everywhere: their cosine with any row is 0 (so they never count as a
conflict), and no output is NaN.

References:
  Yu et al. 2020, "Gradient Surgery for Multi-Task Learning" (PCGrad): cosine conflict and
  gradient magnitude similarity.
  Fifty et al. 2021, "Efficiently Identifying Task Groupings for Multi-Task Learning" (TAG):
  lookahead inter-task affinity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

__all__ = [
    "conflict",
    "conflict_rate",
    "cosine_matrix",
    "flatten_task_grads",
    "gate_utilisation",
    "grad_norms",
    "lookahead_affinity",
    "magnitude_similarity",
    "summarize",
]


def _float(x: Array) -> Array:
    """``x`` as an array of at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_div(num: Array, den: Array, fill: float = 0.0) -> Array:
    """num / den where den != 0, else ``fill``; NaN-free in value and gradient."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), fill)


def flatten_task_grads(grads_T: PyTree) -> Array:
    """Per-task gradients (pytree, leaves [T, ...]) -> jacobian [T, P], leaves raveled in order."""
    leaves = jax.tree.leaves(grads_T)
    if not leaves:
        raise ValueError("flatten_task_grads: empty gradient pytree")
    num_tasks = leaves[0].shape[0]
    return jnp.concatenate([_float(leaf).reshape(num_tasks, -1) for leaf in leaves], axis=1)


def _scaled(jac_TxP: Array) -> tuple[Array, Array]:
    """(J with each row divided by its largest |entry|, those scales s_T); a zero or non-finite
    row keeps scale 1. Squares of the scaled rows cannot overflow or underflow to 0 (float32
    squares overflow from |g| ≈ 1.8e19, well inside a diverging run), and cosines and magnitude
    ratios are the same for the scaled rows."""
    s_T = jax.lax.stop_gradient(jnp.max(jnp.abs(jac_TxP), axis=-1))
    s_T = jnp.where((s_T > 0) & jnp.isfinite(s_T), s_T, 1.0)
    return jac_TxP / s_T[:, None], s_T


def _norms(jac_TxP: Array) -> Array:
    sq_T = jnp.sum(jac_TxP * jac_TxP, axis=-1)
    pos_T = sq_T > 0
    return jnp.where(pos_T, jnp.sqrt(jnp.where(pos_T, sq_T, 1.0)), 0.0)  # NaN-free gradient at 0


def grad_norms(jacobian_TxP: Array) -> Array:
    """norm_T[i] = ||g_i||_2, the size of task i's gradient on the shared parameters."""
    jac_TxP, s_T = _scaled(_float(jacobian_TxP))
    return s_T * _norms(jac_TxP)


def _cosine_from(jac_TxP: Array, norm_T: Array) -> Array:
    """Cosine matrix given precomputed row norms (0 wherever a row is zero)."""
    dot_TxT = jac_TxP @ jac_TxP.T
    cos_TxT = _safe_div(dot_TxT, norm_T[:, None] * norm_T[None, :])
    return jnp.clip(cos_TxT, -1.0, 1.0)


def cosine_matrix(jacobian_TxP: Array) -> Array:
    """cos_TxT[i, j] = <g_i, g_j> / (||g_i|| ||g_j||), and 0 where either gradient is zero."""
    jac_TxP, _ = _scaled(_float(jacobian_TxP))
    return _cosine_from(jac_TxP, _norms(jac_TxP))


def conflict(jacobian_TxP: Array) -> Array:
    """conflict_TxT[i, j] = 1.0 if cos(g_i, g_j) < 0 else 0.0 (this step; diagonal always 0)."""
    return (cosine_matrix(jacobian_TxP) < 0).astype(jnp.float32)


def conflict_rate(cosines_SxTxT: Array) -> Array:
    """rate_TxT[i, j] = #{s : cos_s[i, j] < 0} / S, the share of steps in conflict; diagonal 0."""
    cos_SxTxT = _float(cosines_SxTxT)
    rate_TxT = jnp.mean((cos_SxTxT < 0).astype(jnp.float32), axis=0)
    num_tasks = rate_TxT.shape[-1]
    return rate_TxT * (1.0 - jnp.eye(num_tasks, dtype=rate_TxT.dtype))


def _magnitude_from(norm_T: Array) -> Array:
    """Magnitude similarity given row norms, as 2r / (1 + r²) with r = min / max of the pair (no
    squares of the norms, which overflow); 1 where both norms are zero: equal magnitudes."""
    hi_TxT = jnp.maximum(norm_T[:, None], norm_T[None, :])
    r_TxT = _safe_div(jnp.minimum(norm_T[:, None], norm_T[None, :]), hi_TxT, fill=1.0)
    return 2.0 * r_TxT / (1.0 + r_TxT * r_TxT)


def magnitude_similarity(jacobian_TxP: Array) -> Array:
    """gms_TxT[i, j] = 2 ||g_i|| ||g_j|| / (||g_i||^2 + ||g_j||^2), in [0, 1]; 1 for equal norms."""
    return _magnitude_from(grad_norms(jacobian_TxP))


def lookahead_affinity(
    loss_fn: Callable[[PyTree], Array],
    params: PyTree,
    grads_T: PyTree,
    lr: float | Array,
) -> Array:
    """Z_TxT[i, j] = 1 - L_j(θ - lr·g_i) / L_j(θ) (TAG); > 0 means a step on task i lowers L_j.

    ``loss_fn(params) -> [T]`` per-task losses; ``grads_T`` has the structure of ``params`` with a
    leading task axis on every leaf (the task-specific parts already zero). Entries with
    L_j(θ) == 0 are 0.
    """
    base_T = _float(loss_fn(params))

    def lookahead_losses(grad: PyTree) -> Array:
        stepped = jax.tree.map(lambda p, g: (p - lr * g).astype(jnp.asarray(p).dtype), params, grad)
        return _float(loss_fn(stepped))

    look_TxT = jax.vmap(lookahead_losses)(grads_T)  # row i: all task losses after a step on i
    return _safe_div(base_T[None, :] - look_TxT, jnp.broadcast_to(base_T[None, :], look_TxT.shape))


def _entropy(p: Array, axis: int = -1) -> Array:
    """H(p) = -sum p log p in nats, with 0 log 0 = 0."""
    pos = p > 0
    return -jnp.sum(jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0), axis=axis)


def gate_utilisation(gates_TxBxE: Array, mask_B: Array | None = None) -> dict[str, Array]:
    """mean[t, e] = E_b[w_tbe]; entropy[t] = E_b[H(w_tb)]; balance[t] = H(mean[t]) (nats, masked).

    ``gates_TxBxE`` holds each task's gate distribution (rows summing to 1) over E experts for B
    examples; ``mask_B`` (1 = keep) weights the examples. H(·) ≤ log E, with equality at uniform
    use; a high ``balance`` with a low ``entropy`` means each example picks few experts but the
    batch as a whole spreads over all of them.
    """
    gates_TxBxE = _float(gates_TxBxE)
    num_examples = gates_TxBxE.shape[1]
    if mask_B is None:
        weight_B = jnp.ones((num_examples,), gates_TxBxE.dtype)
    else:
        weight_B = _float(mask_B).reshape(num_examples)
    total = jnp.sum(weight_B)
    mean_TxE = _safe_div(jnp.einsum("tbe,b->te", gates_TxBxE, weight_B), total)
    entropy_TxB = _entropy(gates_TxBxE, axis=-1)
    entropy_T = _safe_div(entropy_TxB @ weight_B, total)
    balance_T = _entropy(mean_TxE, axis=-1)
    return {"mean": mean_TxE, "entropy": entropy_T, "balance": balance_T}


def summarize(jacobian_TxP: Array) -> dict[str, Array]:
    """{norms: ||g_i||, cosine: cos(g_i, g_j), conflict: [cos < 0], magnitude_similarity: GMS}."""
    jac_TxP, s_T = _scaled(_float(jacobian_TxP))
    cos_TxT = _cosine_from(jac_TxP, _norms(jac_TxP))
    norm_T = s_T * _norms(jac_TxP)
    return {
        "norms": norm_T,
        "cosine": cos_TxT,
        "conflict": (cos_TxT < 0).astype(jnp.float32),
        "magnitude_similarity": _magnitude_from(norm_T),
    }
