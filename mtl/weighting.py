"""Loss weighting for multi-task learning: per-task weights λ_T for the loss Σ_i λ_i L_i.

A ``Weighting`` is three pure, jit-able functions over a state of arrays (checkpointable):
``weights(state, losses_T, key) -> λ_T`` gives this step's loss weights (stop-gradient: no gradient
flows into the state through them), and ``update(state, StepInfo) -> state`` runs after the step
with what the method ``needs`` ("jacobian": per-task gradients [T, P] of the unweighted losses;
"next_losses": the losses on the same batch after the update).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl.spec import closest, integer, real, unknown

Array = jax.Array
PyTree = Any


class StepInfo(NamedTuple):
    """What ``Weighting.update`` sees after a training step."""

    losses: Array  # [T] task losses at the current params (before the update)
    next_losses: Array | None  # [T] losses on the same batch after the update
    jacobian: Array | None  # [T, P] per-task gradients of the unweighted losses (shared params)
    step: Array  # int32 scalar
    key: Array  # PRNG key
    epoch_end: Array  # bool scalar: the step is the last of its epoch
    active: Array | None = None  # [T] bool: the tasks that train in this step (None: all)


class Weighting(NamedTuple):
    """init(T) -> state; weights(state, losses_T, key, active_T=None) -> λ_T; update(state,
    info) -> state.

    ``active_T`` ([T] bool, None: all) are the tasks that train in the step (a stage on some
    tasks, an alternating step): weights that are normalised over the tasks (a softmax, Σλ = T)
    are normalised over these, and ``update`` leaves the other tasks' state alone, as their
    parameters would get no gradient in a loss without their term."""

    init: Callable[[int], PyTree]
    weights: Callable[..., Array]
    update: Callable[[PyTree, StepInfo], PyTree]
    needs: frozenset[str]
    # skip(state, info) -> state after a step skipped as non-finite (nan_policy='skip'); its
    # losses are not to be used. None: the state is unchanged.
    skip: Callable[[PyTree, StepInfo], PyTree] | None = None


def _all_active(active_T: Array | None, losses_T: Array) -> Array:
    return jnp.ones(losses_T.shape, bool) if active_T is None else jnp.asarray(active_T, bool)


def _softmax_over(x_T: Array, a_T: Array) -> Array:
    """softmax of x over the active entries a (0 elsewhere)."""
    x_T = jnp.where(a_T, x_T, -jnp.inf)
    e_T = jnp.where(a_T, jnp.exp(x_T - jnp.max(x_T)), 0.0)
    return e_T / jnp.sum(e_T)


def _stateless(weights_fn: Callable[[Array, Array, Array], Array]) -> Weighting:
    return Weighting(
        init=lambda t: (),
        weights=_stop(lambda state, losses_T, key, a_T: weights_fn(losses_T, key, a_T)),
        update=lambda state, info: state,
        needs=frozenset(),
    )


def _stop(fn: Callable[[PyTree, Array, Array, Array], Array]) -> Callable[..., Array]:
    """weights(state, losses_T, key, active_T=None) with no gradient; fn gets the active mask."""

    def weights(state, losses_T, key, active_T=None):
        return jax.lax.stop_gradient(fn(state, losses_T, key, _all_active(active_T, losses_T)))

    return weights


# --------------------------------------------------------------------------------------------------
# methods


def fixed(num_tasks: int, weights: Sequence[float] | None = None) -> Weighting:
    """λ = the configured weights (default 1 each)."""
    w = (1.0,) * num_tasks if weights is None else tuple(float(x) for x in weights)
    if len(w) != num_tasks:
        raise ValueError(f"weighting 'fixed' weights: got {len(w)} values for {num_tasks} tasks")
    if not all(x >= 0 for x in w):
        raise ValueError(f"weighting 'fixed' weights: {w} must all be >= 0")
    return _stateless(lambda losses_T, key, a_T: jnp.asarray(w, losses_T.dtype))


def uncertainty(num_tasks: int, lr: float = 0.01, init_log_var: float = 0.0) -> Weighting:
    """Kendall et al. 2018: λ = exp(-s); s -= Adam(∇_s Σ_i exp(-s_i) L_i + s_i) (optimum s = log L).

    s is trained by Adam (β = 0.9, 0.999, eps 1e-8), as Kendall's and LibMTL's s are trained by
    the model's optimizer: each step moves s by about ``lr`` whatever the loss scale. Plain SGD
    on s (the gradient 1 - exp(-s)L grows with L) overshot: a loss of 1e5 took s to ~1000 in one
    step, i.e. λ = exp(-1000) = 0, and the task stopped training for ~1e5 steps."""
    # No ½ factors: ½exp(-s)L + ½s (Kendall's regression form; LibMTL's) has its optimum at the
    # same s = log L, i.e. the same relative weights, each λ twice ours; the constant factor only
    # rescales the model's learning rate.

    def update(state, info):
        s_T = state["log_var"]
        grad_T = 1.0 - jnp.exp(-s_T) * jax.lax.stop_gradient(info.losses)
        s_T, adam = _adam_step(s_T, grad_T, state, lr, _all_active(info.active, info.losses))
        return {"log_var": s_T, **adam}

    return Weighting(
        init=lambda t: {"log_var": jnp.full((t,), init_log_var, jnp.float32), **_adam_init(t)},
        weights=_stop(lambda state, losses_T, key, a_T: jnp.exp(-state["log_var"])),
        update=update,
        needs=frozenset(),
    )


_B1, _B2, _EPS = 0.9, 0.999, 1e-8  # Adam (torch.optim.Adam's defaults), for uncertainty and FAMO


def _adam_init(t: int) -> dict:
    return {
        "m": jnp.zeros((t,), jnp.float32),
        "v": jnp.zeros((t,), jnp.float32),
        "count": jnp.zeros((t,), jnp.int32),
    }


def _adam_step(
    x_T: Array, grad_T: Array, state: dict, lr: float, active_T: Array
) -> tuple[Array, dict]:
    """One Adam step on the active entries of x_T, each with its own step count (an entry that
    starts later is bias-corrected afresh); the others and their moments unchanged."""
    count = state["count"] + active_T.astype(jnp.int32)
    m_T = jnp.where(active_T, _B1 * state["m"] + (1 - _B1) * grad_T, state["m"])
    v_T = jnp.where(active_T, _B2 * state["v"] + (1 - _B2) * grad_T**2, state["v"])
    n = jnp.maximum(count, 1)
    step_T = lr * (m_T / (1 - _B1**n)) / (jnp.sqrt(v_T / (1 - _B2**n)) + _EPS)
    return jnp.where(active_T, x_T - step_T, x_T), {"m": m_T, "v": v_T, "count": count}


def gradnorm(num_tasks: int, alpha: float = 1.5, lr: float = 0.025) -> Weighting:
    """Chen et al. 2018: G_i = w_i|∇_W L_i|; w -= lr ∇_w Σ_i |G_i - mean(G) r_i^α|; Σ w = T."""
    # The target mean(G) r_i^α is a constant in the gradient (as in the paper); r_i = L_i(t)/L_i(0)
    # over its mean; the jacobian rows must be gradients of the UNWEIGHTED task losses (the trainer
    # gives those of all shared parameters, as LibMTL does; the paper takes the last shared
    # layer W). The gradient
    # sign(G_i - target_i)|∇_W L_i| is divided by mean_j |∇_W L_j| so that lr is scale-free.

    def update(state, info):
        if info.jacobian is None:
            raise ValueError(
                "weighting 'gradnorm' needs StepInfo.jacobian (the per-task gradients of the "
                "unweighted losses with respect to the shared parameters)"
            )
        losses_T = jax.lax.stop_gradient(info.losses)
        a_T = _all_active(info.active, losses_T)
        n = jnp.sum(a_T)
        mean = lambda x_T: jnp.sum(jnp.where(a_T, x_T, 0.0)) / n  # over the active tasks
        loss0_T = jnp.where(state["has_loss0"] > 0, state["loss0"], losses_T)  # L_i(0)
        w_T = state["w"]
        norm_T = jnp.sqrt(jnp.sum(jnp.square(info.jacobian), axis=1))  # |∇_W L_i|
        g_T = w_T * norm_T
        ratio_T = jnp.where(loss0_T > 0, losses_T / jnp.where(loss0_T > 0, loss0_T, 1.0), 1.0)
        mean_ratio = mean(ratio_T)
        r_T = jnp.where(mean_ratio > 0, ratio_T / jnp.where(mean_ratio > 0, mean_ratio, 1.0), 1.0)
        target_T = mean(g_T) * r_T**alpha
        scale = mean(norm_T)
        grad_T = jnp.sign(g_T - target_T) * norm_T / jnp.where(scale > 0, scale, 1.0)
        new_T = jnp.maximum(w_T - lr * grad_T, 1e-6)
        # Σ w = T over all tasks: the active ones share what they held, the others keep theirs
        new_T = new_T * jnp.sum(jnp.where(a_T, w_T, 0.0)) / jnp.sum(jnp.where(a_T, new_T, 0.0))
        return {
            "w": jnp.where(a_T, new_T, w_T),
            "loss0": loss0_T,
            "has_loss0": jnp.ones((), jnp.int32),
        }

    return Weighting(
        init=lambda t: {
            "w": jnp.ones((t,), jnp.float32),
            "loss0": jnp.ones((t,), jnp.float32),
            "has_loss0": jnp.zeros((), jnp.int32),
        },
        weights=_stop(lambda state, losses_T, key, a_T: state["w"]),
        update=update,
        needs=frozenset({"jacobian"}),
    )


def dwa(num_tasks: int, temperature: float = 2.0, period: int | None = None) -> Weighting:
    """Liu et al. 2019: λ = T softmax(r/τ), r_i = L̄_i(k-1) / L̄_i(k-2), L̄ the mean loss of a period.

    ``period`` None (the default): a period is an epoch, as in the paper and LibMTL (λ = 1 for
    the first two epochs); an int: every ``period`` steps (period 1: ratios of consecutive
    mini-batch losses, noisier)."""

    def close(state, total_T, count, done):
        """End the period when ``done`` (and it holds a step): its mean becomes the newest."""
        done = done & (count > 0)
        return {
            "total": jnp.where(done, 0.0, total_T),
            "count": jnp.where(done, 0, count),
            "prev": jnp.where(done, total_T / jnp.maximum(count, 1), state["prev"]),
            "prev2": jnp.where(done, state["prev"], state["prev2"]),
            "periods": state["periods"] + done.astype(jnp.int32),
        }

    def update(state, info):
        total_T = state["total"] + jax.lax.stop_gradient(info.losses)
        count = state["count"] + 1
        return close(state, total_T, count, info.epoch_end if period is None else count >= period)

    def skip(state, info):  # a skipped step adds no loss, but an epoch still ends with it
        done = jnp.asarray(info.epoch_end) if period is None else jnp.asarray(False)
        return close(state, state["total"], state["count"], done)

    def weights(state, losses_T, key, a_T):
        r_T = state["prev"] / jnp.maximum(state["prev2"], 1e-12)
        lam_T = jnp.sum(a_T) * _softmax_over(r_T / temperature, a_T)
        return jnp.where(state["periods"] >= 2, lam_T, jnp.ones_like(lam_T))

    return Weighting(
        init=lambda t: {
            "total": jnp.zeros((t,), jnp.float32),
            "count": jnp.zeros((), jnp.int32),
            "prev": jnp.ones((t,), jnp.float32),
            "prev2": jnp.ones((t,), jnp.float32),
            "periods": jnp.zeros((), jnp.int32),
        },
        weights=_stop(weights),
        update=update,
        needs=frozenset(),
        skip=skip,
    )


def rlw(num_tasks: int) -> Weighting:
    """Lin et al. 2021: λ = T softmax(z), z ~ N(0, I) drawn from the step's key."""
    return _stateless(
        lambda losses_T, key, a_T: (
            jnp.sum(a_T)
            * _softmax_over(jax.random.normal(key, losses_T.shape, losses_T.dtype), a_T)
        )
    )


def famo(num_tasks: int, gamma: float = 1e-3, lr: float = 0.025) -> Weighting:
    """FAMO (Liu et al. 2023): λ_i ∝ z_i/L_i, z = softmax(ξ); ξ -= Adam(J_zᵀ log(L/L') + γξ)."""
    # As the official code: λ sums to 1, Adam (β = 0.9, 0.999, eps 1e-8) with coupled weight decay γ
    # (torch.optim.Adam(weight_decay=γ)), minimum losses taken as 0 (+1e-8).

    def weights(state, losses_T, key, a_T):
        z_T = _softmax_over(state["xi"], a_T)
        zl_T = z_T / (losses_T + 1e-8)
        return zl_T / jnp.sum(zl_T)

    def update(state, info):
        if info.next_losses is None:
            raise ValueError("weighting 'famo' needs StepInfo.next_losses")
        a_T = _all_active(info.active, info.losses)
        xi_T = state["xi"]
        z_T = _softmax_over(xi_T, a_T)
        delta_T = jnp.where(a_T, jnp.log(info.losses + 1e-8) - jnp.log(info.next_losses + 1e-8), 0)
        grad_T = z_T * (delta_T - jnp.dot(z_T, delta_T)) + gamma * xi_T  # J_softmaxᵀ δ + γξ
        xi_T, adam = _adam_step(xi_T, grad_T, state, lr, a_T)
        return {"xi": jax.lax.stop_gradient(xi_T), **adam}

    return Weighting(
        init=lambda t: {"xi": jnp.zeros((t,), jnp.float32), **_adam_init(t)},
        weights=_stop(weights),
        update=update,
        needs=frozenset({"next_losses"}),
    )


# --------------------------------------------------------------------------------------------------
# registry

_FUNCS: dict[str, Callable[..., Weighting]] = {
    "fixed": fixed,
    "uncertainty": uncertainty,
    "gradnorm": gradnorm,
    "dwa": dwa,
    "rlw": rlw,
    "famo": famo,
}
WEIGHTINGS: tuple[str, ...] = tuple(_FUNCS)


def get_weighting(name: str, num_tasks: int, **hparams: Any) -> Weighting:
    """The registered loss weighting ``name`` for ``num_tasks`` tasks with its hyper-parameters."""
    if name not in _FUNCS:
        raise unknown("weighting", name, WEIGHTINGS)
    if int(num_tasks) < 1:
        raise ValueError(f"weighting {name!r}: num_tasks {num_tasks} must be >= 1")
    fn = _FUNCS[name]
    valid = [p for p in inspect.signature(fn).parameters if p != "num_tasks"]
    for k in hparams:
        if k not in valid:
            hint = closest(k, valid) if valid else f"{name!r} takes no hyper-parameters"
            raise ValueError(f"weighting {name!r}: unknown hyper-parameter {k!r}; {hint}")
    if "lr" in hparams:  # uncertainty, gradnorm, famo: a finite step size > 0
        hint = "; pass a learning rate > 0 such as 0.01"
        lr = real(f"weighting {name!r} lr", hparams["lr"], hint)
        if not lr > 0:
            raise ValueError(
                f"weighting {name!r} lr: {hparams['lr']!r} must be > 0 (with 0 the weights never "
                f"change: use weighting='fixed' for constant weights){hint}"
            )
        hparams["lr"] = lr
    for k in ("gamma", "alpha"):
        if k in hparams and not hparams[k] >= 0:
            raise ValueError(f"weighting {name!r} {k}: {hparams[k]} must be >= 0")
    if "temperature" in hparams and not hparams["temperature"] > 0:  # the weights divide by it
        raise ValueError(
            f"weighting {name!r} temperature: {hparams['temperature']} must be > 0; "
            f"a small value such as 0.1 makes the weights nearly one-hot"
        )
    if name == "dwa" and hparams.get("period") is not None:
        hint = "; pass None (a period is an epoch) or a number of steps"
        hparams["period"] = integer("weighting 'dwa' period", hparams["period"], 1, hint)
    w = fn(int(num_tasks), **hparams)
    skip = None if w.skip is None else _keeping_dtypes(w.skip)
    return w._replace(update=_keeping_dtypes(w.update), skip=skip)


def _keeping_dtypes(update: Callable[[PyTree, StepInfo], PyTree]) -> Callable:
    """``update`` whose new state keeps the old state's dtypes: float64 losses (jax_enable_x64)
    would otherwise promote a float32 state, and a scanned carry must keep its dtype."""

    def same(state: PyTree, info: StepInfo) -> PyTree:
        new = update(state, info)
        return jax.tree.map(lambda n, o: jnp.asarray(n, jnp.asarray(o).dtype), new, state)

    return same
