"""Per-task losses and multi-task objectives: pure, jit-able functions of arrays and pytrees."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from mtl.spec import TASK_KINDS, unknown

Array = jax.Array


def _masked_mean(l_B: Array, mask_B: Array | None) -> Array:
    """Σ m·l / Σ m (0 when no example is present); plain mean without a mask."""
    if mask_B is None:
        return jnp.mean(l_B)
    mask_B = mask_B.astype(l_B.dtype)
    return jnp.sum(l_B * mask_B) / jnp.maximum(jnp.sum(mask_B), 1e-12) * (jnp.sum(mask_B) > 0)


@jax.custom_jvp
def sigmoid_cross_entropy(logits: Array, labels: Array) -> Array:
    """Elementwise −[y log σ(z) + (1−y) log(1−σ(z))] = max(z, 0) − z·y + log1p(e^−|z|).

    Stable for any z, and cheaper than two log-sigmoids: the value and the derivative
    σ(z) − y share the single e^−|z| (σ(z) = 1/(1+e) for z >= 0, e/(1+e) below).
    """
    return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


@sigmoid_cross_entropy.defjvp
def _sigmoid_cross_entropy_jvp(primals, tangents):
    z, y = primals
    dz, dy = tangents
    e = jnp.exp(-jnp.abs(z))
    loss = jnp.maximum(z, 0) - z * y + jnp.log1p(e)
    sigmoid = jnp.where(z >= 0, 1.0, e) / (1.0 + e)
    return loss, (sigmoid - y) * dz - z * dy


def binary_cross_entropy(logits_B: Array, y_B: Array, mask_B: Array | None = None) -> Array:
    """mean −[y log σ(z) + (1−y) log(1−σ(z))], computed stably from logits."""
    return _masked_mean(sigmoid_cross_entropy(logits_B, y_B.astype(logits_B.dtype)), mask_B)


def mean_squared_error(pred_B: Array, y_B: Array, mask_B: Array | None = None) -> Array:
    """mean (ŷ − y)²."""
    return _masked_mean(jnp.square(pred_B - y_B.astype(pred_B.dtype)), mask_B)


def softmax_cross_entropy(logits_BxC: Array, y_B: Array, mask_B: Array | None = None) -> Array:
    """mean −log softmax(z)_y with integer labels."""
    l_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, y_B.astype(jnp.int32))
    return _masked_mean(l_B, mask_B)


def multilabel_cross_entropy(logits_BxC: Array, y_BxC: Array, mask_B: Array | None = None) -> Array:
    """mean over examples of the mean over labels of the sigmoid BCE."""
    l_BxC = sigmoid_cross_entropy(logits_BxC, y_BxC.astype(logits_BxC.dtype))
    return _masked_mean(jnp.mean(l_BxC, axis=-1), mask_B)


def in_batch_softmax(
    logits_BxB: Array, y_B: Array | None = None, mask_B: Array | None = None
) -> Array:
    """mean −log softmax(s_b)_b: in-batch sampled softmax, positives on the diagonal."""
    del y_B
    labels_B = jnp.arange(logits_BxB.shape[0])
    # at least float32: the -1e9 fill below is -inf in float16, and a padded row then gives NaN
    logits_BxB = logits_BxB.astype(jnp.promote_types(logits_BxB.dtype, jnp.float32))
    if mask_B is not None:  # padded rows must not act as negatives either
        logits_BxB = jnp.where(mask_B[None, :] > 0, logits_BxB, -1e9)
    return softmax_cross_entropy(logits_BxB, labels_B, mask_B)


LOSSES = {
    "binary": binary_cross_entropy,
    "regression": mean_squared_error,
    "multiclass": softmax_cross_entropy,
    "multilabel": multilabel_cross_entropy,
    "retrieval": in_batch_softmax,
}
assert set(LOSSES) == set(TASK_KINDS)


def task_loss(kind: str, pred: Array, label: Array, mask: Array | None = None) -> Array:
    """The loss of one task of the given kind (see mtl.spec for label layouts)."""
    if kind not in LOSSES:
        raise unknown("task kind", kind, LOSSES)
    return LOSSES[kind](pred, label, mask)


def weighted_sum(
    losses: Mapping[str, Array] | Array, weights: Mapping[str, float] | Array
) -> Array:
    """Σ_i λ_i L_i over a task mapping (keys must match) or arrays with a leading task axis."""
    if isinstance(losses, Mapping):
        if not isinstance(weights, Mapping) or set(losses) != set(weights):
            wk = sorted(weights) if isinstance(weights, Mapping) else type(weights).__name__
            raise ValueError(
                f"weights: keys {wk} do not match the tasks {sorted(losses)}; "
                "give exactly one weight per task"
            )
        return sum(jnp.asarray(weights[k]) * losses[k] for k in losses)
    losses_T, weights_T = jnp.asarray(losses), jnp.asarray(weights)
    if losses_T.shape[:1] != weights_T.shape[:1]:
        raise ValueError(
            f"weights: shape {weights_T.shape} does not match losses {losses_T.shape} on the task axis"
        )
    return jnp.tensordot(weights_T, losses_T, axes=(0, 0))


def l2_to_mean(stacked) -> Array:
    """Σ_i ||θ_i − θ̄||² over all leaves of a pytree whose leading axis is the task."""
    leaves = jax.tree.leaves(stacked)
    return sum(jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True))) for x in leaves)


def soft_sharing(losses: Mapping[str, Array] | Array, stacked, lam: float) -> Array:
    """Σ_i L_i + λ Σ_i ||θ_i − θ̄||² (soft parameter sharing)."""
    total = sum(losses.values()) if isinstance(losses, Mapping) else jnp.sum(jnp.asarray(losses))
    return total + lam * l2_to_mean(stacked)
