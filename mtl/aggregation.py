"""Gradient aggregation for multi-task learning: a [T, P] Jacobian -> one [P] update direction.

Each public function maps ``jacobian_TxP`` (row i = gradient of task i's loss w.r.t. the shared
parameters, or w.r.t. the shared representation flattened to [B*H]) to the vector that replaces the
shared gradient. Everything is pure JAX and jit-able: the small problems the methods need (min-norm
point, dual-cone projection, bargaining equation) are solved on the [T, T] Gram matrix with
``lax.while_loop`` solvers, never on the host. Bind hyper-parameters with ``functools.partial`` or
``get_aggregator`` before ``jax.jit`` (``cagrad``'s ``c`` and ``nash_mtl``'s ``max_norm`` may also be
traced; ``rescale`` must be static).

Solvers: ``_qp`` is an exact primal active-set method (Lawson-Hanson style) for
``min ½xᵀHx + pᵀx`` over ``x >= 0`` or over the simplex; it terminates in O(T) iterations, each one
(T+1)x(T+1) linear solve, and keeps a feasible iterate throughout.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from mtl.spec import closest, unknown

Array = jax.Array
PyTree = Any

_HI = lax.Precision.HIGHEST
_EPS = 1e-8  # the 1e-8 guards of the reference implementations, in normalised Gram units
_MAX_TARGET = 1.0 - 1e-4  # GradVac: the highest cosine target a lift aims at


# --------------------------------------------------------------------------------------------------
# helpers


_LONG_ROWS = 128 * 1024
_LONG_ROWS_APART = 32 * 1024
_ROWS_APART: contextvars.ContextVar[bool] = contextvars.ContextVar("rows_apart", default=False)


@contextlib.contextmanager
def _rows_made_apart() -> Iterator[None]:
    """While tracing inside this block, the Jacobians handed to the aggregators are stacks of
    rows that separate computations of the same program made (the trainer's per-task VJPs), not
    one array given whole: the row-by-row forms start at shorter rows (``_long``). A speed
    choice only; the results are the same sums up to float summation order. jax's trace caches
    do not key on it: trace a function inside the block that was not traced outside it (the
    trainer's step function is its own for each Trainer)."""
    token = _ROWS_APART.set(True)
    try:
        yield
    finally:
        _ROWS_APART.reset(token)


def _long(p: int) -> bool:
    """Rows of length ``p`` >= 128 x 1024 (e.g. a representation-level Jacobian over B x H) are
    handled row by row on CPU: ``_gram`` from sums over row pairs, ``_combine`` as a sum of
    scaled rows.
    Inside the trainer's step (``_rows_made_apart``) the row form starts at 32 x 1024: the sums
    then read the rows where their VJPs wrote them, and the stack is never built (with the
    pairwise sums: UPGrad, PCGrad, CAGrad, Nash-MTL at T = 3 on the 96,864 shared parameters -2%
    to -18% step time at batch 256 or 1024, -0.2% to -2% at 4096; representation-level MGDA at
    T = 8, batch 256, -5% to -7%;
    interleaved A/Bs of the trainer's step, docs/results/ablations.md). Called on one [T, P]
    array (a Jacobian given whole), the product stays below 128 x 1024: the pairwise form first
    copies each row out of the array (T = 8, P = 96,864: 0.85 ms against 0.45-0.49 ms per call),
    and the one-pass form was no faster there. Other backends keep the plain products: their
    GEMM libraries handle a few long rows well, and the row forms were measured on CPU only."""
    threshold = _LONG_ROWS_APART if _ROWS_APART.get() else _LONG_ROWS
    return p >= threshold and jax.default_backend() == "cpu"


_LANES = 128  # the one-pass Gram's partial sums: each row seen as [128, P/128]
_ONE_PASS_ROWS = 4  # from this many rows on, the long-row Gram is built in one pass


def _gram(jacobian_TxP: Array) -> Array:
    """G = J Jᵀ in at least float32, full precision (no TF32 / bf16 passes).

    A [T, P] x [P, T] product with T tiny and P huge is a poor GEMM shape: XLA:CPU runs it at
    ~25 GFLOP/s. For long rows (``_long``), G is built from the T(T+1)/2 sums Σ_p J_ip J_jp,
    reading the rows where their VJPs wrote them, so J is never stacked. With T >= 4 rows, in one
    pass: a single variadic ``lax.reduce`` carries all the sums, each row seen as [128, P/128]
    (128 partial sums per entry, then added; the last P mod 128 columns are one more partial), so
    every row is read once. With T <= 3, each sum is its own fused multiply-reduce over two
    whole rows, which XLA:CPU vectorises; the one-pass reduce runs element by element and only
    wins when it saves many passes. In the trainer's step, one pass against separate sums, over
    four interleaved A/Bs at batch 256 to 4096: representation-level MGDA at T = 8 -1% to -9%
    (-7% to -9% at 4096), MGDA on the shared parameters at T = 8 -4.6% to +1.5%, UPGrad at T = 3
    +3.6% to +7% at batch 1024, and within ±5% at T = 4 to 6 (experiments/ablate_step.py --only
    gram; docs/results/ablations.md). The same sums up to
    float summation order; G is exactly symmetric.
    """
    j = jacobian_TxP.astype(jnp.promote_types(jacobian_TxP.dtype, jnp.float32))
    t, p = j.shape
    if not _long(p):
        return jnp.matmul(j, j.T, precision=_HI)
    pairs = [(a, b) for a in range(t) for b in range(a, t)]
    if t < _ONE_PASS_ROWS:
        sums = jnp.stack([jnp.sum(j[a] * j[b]) for a, b in pairs])
    else:
        add = lambda xs, ys: tuple(x + y for x, y in zip(xs, ys, strict=True))
        zeros = tuple(jnp.zeros((), j.dtype) for _ in pairs)
        q, r = divmod(p, _LANES)
        parts = []  # [pairs, partials] blocks
        for lo, shape in ((0, (_LANES, q)), (_LANES * q, (1, r))):
            if shape[0] * shape[1] == 0:
                continue
            rows = [j[i, lo : lo + shape[0] * shape[1]].reshape(shape) for i in range(t)]
            prods = tuple(rows[a] * rows[b] for a, b in pairs)
            parts.append(jnp.stack(lax.reduce(prods, zeros, add, (1,))))
        sums = jnp.sum(jnp.concatenate(parts, axis=1), axis=1)
    index = np.zeros((t, t), np.int32)
    for k, (a, b) in enumerate(pairs):
        index[a, b] = index[b, a] = k
    return sums[index]


def _combine(w_T: Array, jacobian_TxP: Array) -> Array:
    """wᵀJ in full precision (for long rows a sum of T scaled rows, read where they were made).

    For a half-precision J the weights are scaled by their largest magnitude first and the sum
    scaled back in float32: weights beyond float16's 65504 (Nash-MTL's ~1/|g_i| for small rows)
    would otherwise become inf."""
    if jnp.finfo(jacobian_TxP.dtype).bits < 32:
        w_T = w_T.astype(jnp.float32)
        top = jnp.max(jnp.abs(w_T))
        top = jnp.where(top > 0, top, 1.0)
        v_P = _weighted_rows(w_T / top, jacobian_TxP)
        return (v_P.astype(jnp.float32) * top).astype(jacobian_TxP.dtype)
    return _weighted_rows(w_T, jacobian_TxP)


def _weighted_rows(w_T: Array, jacobian_TxP: Array) -> Array:
    """wᵀJ in J's dtype: one product, or for long rows a sum of scaled rows."""
    w_T = w_T.astype(jacobian_TxP.dtype)
    if not _long(jacobian_TxP.shape[1]):
        return jnp.matmul(w_T, jacobian_TxP, precision=_HI)
    v_P = w_T[0] * jacobian_TxP[0]
    for i in range(1, w_T.shape[0]):
        v_P = v_P + w_T[i] * jacobian_TxP[i]
    return v_P


def _solve(a_NxN: Array, b_N: Array) -> Array:
    """a⁻¹b by LU with partial pivoting (cheaper to compile than jnp.linalg.solve)."""
    return jsl.lu_solve(jsl.lu_factor(a_NxN), b_N)


def _normalized_gram(jacobian_TxP: Array) -> Array:
    """G / mean(diag G) (or G when J = 0); every method below is invariant to this scale."""
    gram_TxT = _gram(jacobian_TxP)
    scale = jnp.mean(jnp.diag(gram_TxT))
    return gram_TxT / jnp.where(scale > 0, scale, 1.0)


def _qp(h_TxT: Array, p_T: Array, simplex: bool, x0_T: Array | None = None) -> Array:
    """argmin ½xᵀHx + pᵀx over x >= 0 (and 1ᵀx = 1 if simplex), H PSD: primal active set."""
    # x0_T: optional feasible warm start (its support is the first active set).
    t = h_TxT.shape[0]
    eye = jnp.eye(t, dtype=h_TxT.dtype)
    idx = jnp.arange(t)

    def solve_on(mask_T):
        # Minimiser on the face {x_i = 0 for i not in mask} (and 1ᵀx = 1): one KKT solve.
        both = mask_T[:, None] & mask_T[None, :]
        a_TxT = jnp.where(both, h_TxT, eye)
        rhs_T = jnp.where(mask_T, -p_T, 0.0)
        if simplex:
            m_T = mask_T.astype(h_TxT.dtype)
            k = jnp.block([[a_TxT, -m_T[:, None]], [m_T[None, :], jnp.zeros((1, 1), h_TxT.dtype)]])
            sol = _solve(k, jnp.concatenate([rhs_T, jnp.ones((1,), h_TxT.dtype)]))
            x_T, mu = sol[:t], sol[t]
        else:
            x_T, mu = _solve(a_TxT, rhs_T), jnp.zeros((), h_TxT.dtype)
        x_T = jnp.where(mask_T & jnp.isfinite(x_T), x_T, 0.0)
        return x_T, jnp.where(jnp.isfinite(mu), mu, 0.0)

    def body(state):
        x_T, mask_T, _, it = state
        s_T, mu = solve_on(mask_T)
        feasible = jnp.all(jnp.where(mask_T, s_T > 0, True))
        # (a) s is feasible: accept it and free the most violated bound, if any.
        grad_T = jnp.matmul(h_TxT, s_T, precision=_HI) + p_T - mu
        tol = 1e-6 * (jnp.max(jnp.abs(h_TxT) @ jnp.abs(s_T)) + jnp.max(jnp.abs(p_T)) + jnp.abs(mu))
        cand_T = ~mask_T & (grad_T < -tol)
        j = jnp.argmin(jnp.where(cand_T, grad_T, jnp.inf))
        add = jnp.any(cand_T)
        mask_a = mask_T | (add & (idx == j))
        # (b) s is infeasible: move from x towards s until a coordinate hits 0, and fix it there.
        ratio_T = jnp.where(mask_T & (s_T <= 0), x_T / jnp.maximum(x_T - s_T, 1e-30), jnp.inf)
        k = jnp.argmin(ratio_T)
        alpha = jnp.clip(ratio_T[k], 0.0, 1.0)
        x_b = x_T + alpha * (s_T - x_T)
        mask_b = mask_T & (x_b > 0) & (idx != k)
        x_b = jnp.where(mask_b, x_b, 0.0)
        x_T = jnp.where(feasible, s_T, x_b)
        mask_T = jnp.where(feasible, mask_a, mask_b)
        return x_T, mask_T, feasible & ~add, it + 1

    if x0_T is not None:
        x0, mask0 = x0_T, x0_T > 0
    elif simplex:  # start at the best vertex
        j0 = jnp.argmin(0.5 * jnp.diag(h_TxT) + p_T)
        x0, mask0 = (idx == j0).astype(h_TxT.dtype), idx == j0
    else:
        x0, mask0 = jnp.zeros(t, h_TxT.dtype), jnp.zeros(t, bool)
    state = (x0, mask0, jnp.array(False), jnp.array(0))
    x_T, *_ = lax.while_loop(lambda s: ~s[2] & (s[3] < 10 * t + 10), body, state)
    return x_T


def _project_weights(u_T: Array, gram_TxT: Array) -> Array:
    """Weights of the projection of uᵀJ onto the dual cone {v: Jv >= 0}: argmin_{w >= u} wᵀGw."""
    # w = u + μ, μ = argmin_{μ >= 0} ½μᵀGμ + μᵀGu, solved in Jacobi-scaled y = √diag(G) μ so that
    # every constraint g_i·v >= 0 is enforced relative to |g_i| (tiny rows are not drowned out).
    diag_T = jnp.diag(gram_TxT)
    inv_T = jnp.where(diag_T > 0, 1.0 / jnp.sqrt(jnp.where(diag_T > 0, diag_T, 1.0)), 1.0)
    q_T = jnp.matmul(gram_TxT, u_T, precision=_HI)
    y_T = _qp(gram_TxT * inv_T[:, None] * inv_T, q_T * inv_T, simplex=False)
    return u_T + y_T * inv_T


def _torchjd_gram(jacobian_TxP: Array, reg_eps: float) -> Array:
    """TorchJD's normalised, regularised Gram: G / tr(G) + reg_eps·I (G / tr(G) := 0 when J = 0)."""
    gram_TxT = _gram(jacobian_TxP)
    trace = jnp.trace(gram_TxT)
    gram_TxT = jnp.where(trace > 0, gram_TxT / jnp.where(trace > 0, trace, 1.0), 0.0)
    return gram_TxT + reg_eps * jnp.eye(gram_TxT.shape[0], dtype=gram_TxT.dtype)


def _random_orders(key: Array, t: int) -> Array:
    """Row i: the other T-1 task indices in a random order (its own permutation per row)."""
    u_TxT = jax.random.uniform(key, (t, t))
    u_TxT = jnp.where(jnp.eye(t, dtype=bool), jnp.inf, u_TxT)
    return jnp.argsort(u_TxT, axis=1)[:, : t - 1]


# --------------------------------------------------------------------------------------------------
# aggregators


def mean(jacobian_TxP: Array) -> Array:
    """d = (1/T) Σ_i g_i."""
    t = jacobian_TxP.shape[0]
    return _combine(jnp.full((t,), 1.0 / t, jacobian_TxP.dtype), jacobian_TxP)


def sum(jacobian_TxP: Array) -> Array:
    """d = Σ_i g_i."""
    return _combine(jnp.ones(jacobian_TxP.shape[0], jacobian_TxP.dtype), jacobian_TxP)


def pcgrad(jacobian_TxP: Array, key: Array) -> Array:
    """PCGrad (Yu et al. 2020): d = Σ_i g_i', g_i' -= (g_i'·g_j/|g_j|²) g_j if g_i'·g_j < 0."""
    # j runs over the other tasks in a random order drawn per task from ``key``.
    t = jacobian_TxP.shape[0]
    gram_TxT = _normalized_gram(jacobian_TxP)
    order_TxTm1 = _random_orders(key, t)
    coef_TxT = jnp.eye(t, dtype=gram_TxT.dtype)  # projected g_i = coef[i] @ J
    for step in range(t - 1):  # trace-time loop over T; every task projects in parallel
        sel_TxT = jax.nn.one_hot(order_TxTm1[:, step], t, dtype=gram_TxT.dtype)  # row i: e_j(i)
        dot_T = jnp.sum(jnp.matmul(coef_TxT, gram_TxT, precision=_HI) * sel_TxT, axis=1)
        sq_T = jnp.sum(jnp.diag(gram_TxT) * sel_TxT, axis=1)  # |g_j|²
        shift_T = jnp.where((dot_T < 0) & (sq_T > 0), dot_T / jnp.where(sq_T > 0, sq_T, 1.0), 0.0)
        coef_TxT = coef_TxT - shift_T[:, None] * sel_TxT
    return _combine(jnp.sum(coef_TxT, axis=0), jacobian_TxP)


def mgda(jacobian_TxP: Array) -> Array:
    """MGDA (Désidéri 2012; Sener & Koltun 2018): d = wᵀJ, w = argmin_{w ∈ Δ} ||wᵀJ||² (exact)."""
    gram_TxT = _normalized_gram(jacobian_TxP)
    w_T = _qp(gram_TxT, jnp.zeros(gram_TxT.shape[0], gram_TxT.dtype), simplex=True)
    return _combine(w_T, jacobian_TxP)


def cagrad(jacobian_TxP: Array, c: float = 0.5, rescale: int = 1) -> Array:
    """CAGrad (Liu et al. 2021): d = g0 + c|g0| g_w/|g_w|, w = argmin_Δ g_w·g0 + c|g0||g_w|.

    When the optimum has g_w = 0 (c >= 1 with 0 in the rows' convex hull, or a zero row), the
    formula is undefined and d = g0 (TorchJD returns 0 there, the official code a direction of
    rounding noise)."""
    # rescale as the official code: 0 -> d, 1 (default) -> d / (1 + c²), 2 -> d / (1 + c).
    t = jacobian_TxP.shape[0]
    gram_TxT = _normalized_gram(jacobian_TxP)
    b_T = jnp.full((t,), 1.0 / t, gram_TxT.dtype)
    gb_T = jnp.matmul(gram_TxT, b_T, precision=_HI)
    radius = c * jnp.sqrt(jnp.maximum(b_T @ gb_T, 0.0))  # c·|g0|
    ok = radius > 1e-12
    safe_radius = jnp.where(ok, radius, 1.0)

    # The dual min_Δ F(w) = wᵀGb + c|g0||g_w| is solved through its scalar fixed point: at the
    # optimum w is the simplex QP argmin ½wᵀGw + s·wᵀGb with s = |g_w| / (c|g0|) (majorising
    # |x| <= |x|²/(2τ) + τ/2 at τ = |g_w|). ψ(s) = h(s) - s, h(s) = |g_w(s)| / (c|g0|), h non-
    # decreasing and <= s_max = max_i |g_i| / (c|g0|), is bracketed (ψ(lo) > 0 >= ψ(hi)) and its
    # root found by the Illinois method: each step one QP, the bracket always kept. s = 0 is a
    # spurious root when 0 is in the rows' hull (h(0) = |min-norm point| = 0); the bracket's lower
    # end is searched above it, at s0·10^-k (s0 = 1/c), and none up to k = 12 means the optimum
    # has g_w ≈ 0 (c >= 1 with 0 in the hull): then d = g0. (An unguarded Aitken-accelerated
    # fixed-point iteration fell into that spurious root, or oscillated, on rank-deficient rows.)
    def psi(s, w_T):
        w_T = _qp(gram_TxT, s * gb_T, simplex=True, x0_T=w_T)
        return jnp.sqrt(jnp.maximum(w_T @ gram_TxT @ w_T, 0.0)) / safe_radius - s, w_T

    tol = 10 * jnp.finfo(gram_TxT.dtype).eps
    s_max = jnp.sqrt(jnp.max(jnp.diag(gram_TxT))) / safe_radius
    s0 = jnp.minimum(jnp.sqrt(jnp.maximum(b_T @ gb_T, 0.0)) / safe_radius, s_max)
    f_max, w_T = psi(s_max, b_T)
    f0, w_T = psi(s0, w_T)

    def search(state):  # down from s0 until ψ > 0; (x_prev, f_prev): the last ψ <= 0
        x, fx, _, _, w_T, k = state
        fy, w_T = psi(0.1 * x, w_T)
        return 0.1 * x, fy, x, fx, w_T, k + 1

    init = (s0, f0, s_max, f_max, w_T, jnp.array(0))
    cond = lambda st: ok & (st[1] <= 0) & (st[5] < 12)
    lo, f_lo, x_prev, f_prev, w_T, _ = lax.while_loop(cond, search, init)
    hi, f_hi = jnp.where(f0 > 0, s_max, x_prev), jnp.where(f0 > 0, f_max, f_prev)
    bracketed = ok & (f_lo > 0) & (f_hi <= 0)

    def illinois(state):
        a, fa, b, fb, w_T, side, _, it = state
        x = (a * fb - b * fa) / (fb - fa)  # in [a, b]: fa > 0 >= fb
        fx, w_T = psi(x, w_T)
        up = fx > 0
        a, fa, b, fb = (
            jnp.where(up, x, a),
            jnp.where(up, fx, jnp.where(side < 0, 0.5 * fa, fa)),
            jnp.where(up, b, x),
            jnp.where(up, jnp.where(side > 0, 0.5 * fb, fb), fx),
        )
        done = (jnp.abs(fx) <= tol * x) | (b - a <= tol * b)
        return a, fa, b, fb, w_T, jnp.where(up, 1, -1), done, it + 1

    state = (lo, f_lo, hi, f_hi, w_T, jnp.array(0), ~bracketed, jnp.array(0))
    *_, w_T, _, _, _ = lax.while_loop(lambda st: ~st[6] & (st[7] < 60), illinois, state)
    # unbracketed: ψ <= 0 down to s0·1e-12 (g_w ≈ 0: w is the QP's there), or, by rounding only,
    # ψ > 0 up to s_max (take s_max)
    end = jnp.where(f_lo > 0, s_max, lo)
    w_T = lax.cond(bracketed | ~ok, lambda: w_T, lambda: psi(end, w_T)[1])
    gw_norm = jnp.sqrt(jnp.maximum(w_T @ gram_TxT @ w_T, 0.0))
    lam = jnp.where(ok & (gw_norm > 1e-6 * radius), radius / jnp.maximum(gw_norm, 1e-30), 0.0)
    denom = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    return _combine((b_T + lam * w_T) / denom, jacobian_TxP)


def imtl_g(jacobian_TxP: Array) -> Array:
    """IMTL-G (Liu et al. 2021): d = Σ α_i g_i, Σ α = 1, with equal projections d·g_i/|g_i| ∀i.

    Solved for β_i = α_i |g_i| (d = Σ β_i u_i, u_i = g_i/|g_i|): the system then holds the cosines
    u_i·u_j, not u_i·g_j, whose columns span the decades of the gradient norms and cost float32
    digits (tests/test_aggregation.py draws norms over 3 decades).
    """
    t = jacobian_TxP.shape[0]
    gram_TxT = _normalized_gram(jacobian_TxP)
    dtype = gram_TxT.dtype
    n_T = jnp.sqrt(jnp.maximum(jnp.diag(gram_TxT), 0.0))
    act_T = n_T > 1e-10  # zero rows get α_i = 0 (no direction to be impartial to)
    safe_T = jnp.where(act_T, n_T, 1.0)
    both = act_T[:, None] & act_T[None, :]
    cos_TxT = jnp.where(both, gram_TxT / safe_T[:, None] / safe_T[None, :], jnp.eye(t, dtype=dtype))
    inv_T = jnp.where(act_T, 1.0 / safe_T, 0.0)
    top = jnp.maximum(jnp.max(inv_T), 1e-30)  # the Σ α = 1 row, scaled to entries <= 1
    # [u_i·u_j]_ij β - s·1 = 0 on active rows, β_i = 0 on zero rows, Σ β_i/(|g_i|·top) = 1/top.
    a_T = act_T.astype(dtype)
    k = jnp.block([[cos_TxT, -a_T[:, None]], [inv_T[None, :] / top, jnp.zeros((1, 1), dtype)]])
    rhs = jnp.zeros(t + 1, dtype).at[t].set(1.0 / top)
    beta_T = jnp.linalg.lstsq(k, rhs)[0][:t]
    return _combine(jnp.where(act_T, beta_T / safe_T, 0.0), jacobian_TxP)


def aligned_mtl(jacobian_TxP: Array) -> Array:
    """Aligned-MTL (Senushkin et al. 2023): d = Jᵀ B 1, B = σ_min G^{-1/2} (rank-truncated)."""
    t = jacobian_TxP.shape[0]
    gram_TxT = _normalized_gram(jacobian_TxP)
    lam_T, v_TxT = jnp.linalg.eigh(gram_TxT)
    tol = jnp.max(lam_T) * t * jnp.finfo(gram_TxT.dtype).eps
    pos_T = lam_T > tol
    inv_sqrt_T = jnp.where(pos_T, 1.0 / jnp.sqrt(jnp.where(pos_T, lam_T, 1.0)), 0.0)
    sigma_min = jnp.sqrt(jnp.min(jnp.where(pos_T, lam_T, jnp.inf)))
    b_TxT = sigma_min * (v_TxT * inv_sqrt_T) @ v_TxT.T
    b_TxT = jnp.where(jnp.any(pos_T), b_TxT, jnp.eye(t, dtype=gram_TxT.dtype))
    return _combine(jnp.sum(b_TxT, axis=1), jacobian_TxP)


def upgrad(jacobian_TxP: Array, reg_eps: float = 0.0) -> Array:
    """UPGrad (Quinton & Rey 2024, TorchJD): d = (1/T) Σ_i π(g_i), π onto the cone {v: Jv >= 0}.

    ``reg_eps`` adds reg_eps·I to the trace-normalised Gram. The default 0 keeps the cone exact;
    TorchJD's default is 1e-4 (pass ``reg_eps=1e-4`` for its numbers), which loosens it slightly.
    """
    t = jacobian_TxP.shape[0]
    gram_TxT = _torchjd_gram(jacobian_TxP, reg_eps)
    u_TxT = jnp.eye(t, dtype=gram_TxT.dtype) / t
    w_TxT = jax.vmap(_project_weights, in_axes=(0, None))(u_TxT, gram_TxT)
    return _combine(jnp.sum(w_TxT, axis=0), jacobian_TxP)


def dualproj(jacobian_TxP: Array, reg_eps: float = 0.0) -> Array:
    """DualProj (TorchJD): d = π_{J}(mean g), the projection of the mean onto {v: Jv >= 0}.

    ``reg_eps`` as in ``upgrad`` (0 here, 1e-4 in TorchJD)."""
    t = jacobian_TxP.shape[0]
    gram_TxT = _torchjd_gram(jacobian_TxP, reg_eps)
    w_T = _project_weights(jnp.full((t,), 1.0 / t, gram_TxT.dtype), gram_TxT)
    return _combine(w_T, jacobian_TxP)


def nash_mtl(jacobian_TxP: Array, max_norm: float = 1.0, reg_eps: float = 1e-7) -> Array:
    """Nash-MTL (Navon et al. 2022): d = αᵀJ, α > 0 solving Gα = 1/α, clipped to |d| <= max_norm."""
    t = jacobian_TxP.shape[0]
    gram_TxT = _gram(jacobian_TxP)
    diag_T = jnp.diag(gram_TxT)
    act_T = diag_T > 1e-12 * jnp.max(diag_T)  # zero rows are decoupled from the rest: α_i := 0
    inv_T = jnp.where(act_T, 1.0 / jnp.sqrt(jnp.where(act_T, diag_T, 1.0)), 0.0)
    eye = jnp.eye(t, dtype=gram_TxT.dtype)
    # Jacobi scaling β = √diag(G) α turns Gα = 1/α into Cβ = 1/β, C the unit-diagonal cosine matrix.
    c_TxT = jnp.where(act_T[:, None] & act_T[None, :], gram_TxT * inv_T[:, None] * inv_T, eye)
    c_TxT = c_TxT + reg_eps * eye
    # Cβ = 1/β is the stationarity condition of the self-concordant f(β) = ½βᵀCβ - Σ log β_i:
    # damped Newton (step 1/(1+λ) until the decrement λ < 1/4) stays in β > 0 and converges.

    def body(state):
        b_T, _, it = state
        g_T = c_TxT @ b_T - 1.0 / b_T
        step_T = -jsl.cho_solve(jsl.cho_factor(c_TxT + jnp.diag(1.0 / b_T**2)), g_T)
        lam = jnp.sqrt(jnp.maximum(-g_T @ step_T, 0.0))
        b_T = b_T + jnp.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam)) * step_T
        return jnp.maximum(b_T, 1e-30), lam**2 < 1e-12 * t, it + 1

    state = (jnp.ones(t, gram_TxT.dtype), jnp.array(False), 0)
    b_T, _, _ = lax.while_loop(lambda s: ~s[1] & (s[2] < 100), body, state)
    a_T = b_T * inv_T
    norm = jnp.sqrt(jnp.maximum(a_T @ gram_TxT @ a_T, 0.0))
    clip = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    a_T = a_T * jnp.where(max_norm > 0, clip, 1.0)  # max_norm = 0: no clipping
    return _combine(a_T, jacobian_TxP)


def graddrop(jacobian_TxP: Array, key: Array) -> Array:
    """GradDrop (Chen et al. 2020): P = ½(1 + Σg/Σ|g|); keep g_i > 0 if P > U, g_i < 0 if P < U."""
    # P and U in at least float32: in bfloat16 (128 levels in [0.5, 1)) P == U on ~0.4% of the
    # mixed-sign coordinates, where neither sign would be kept
    ones_T = jnp.ones(jacobian_TxP.shape[0], jacobian_TxP.dtype)
    f32 = jnp.promote_types(jacobian_TxP.dtype, jnp.float32)
    total_P = _combine(ones_T, jacobian_TxP).astype(f32)  # sums over T as matmuls: fast anywhere
    purity_P = 0.5 * (1.0 + total_P / (_combine(ones_T, jnp.abs(jacobian_TxP)).astype(f32) + 1e-30))
    u_P = jax.random.uniform(key, purity_P.shape, f32)
    keep_TxP = ((purity_P > u_P) & (jacobian_TxP > 0)) | ((purity_P < u_P) & (jacobian_TxP < 0))
    return _combine(ones_T, jnp.where(keep_TxP, jacobian_TxP, 0.0))


def gradvac(
    jacobian_TxP: Array, target_TxT: Array, key: Array, beta: float = 0.5
) -> tuple[Array, Array]:
    """GradVac (Wang et al. 2021): g_i' += w g_j lifting cos(g_i', g_j) = ρ to its EMA target φ̂.

    ``beta``: the EMA rate of φ̂, 0.5 by default as in LibMTL and TorchJD."""
    # w = |g_i'|(φ̂√(1-ρ²) - ρ√(1-φ̂²)) / (|g_j|√(1-φ̂²)) when ρ < φ̂_ij; φ̂_ij ← (1-β)φ̂_ij + βρ.
    # j runs over the other tasks in a random order per task; one parameter group (whole model).
    t, target_dtype = jacobian_TxP.shape[0], target_TxT.dtype  # the state keeps its dtype
    gram_TxT = _normalized_gram(jacobian_TxP)
    norm_T = jnp.sqrt(jnp.maximum(jnp.diag(gram_TxT), 0.0))
    order_TxTm1 = _random_orders(key, t)
    coef_TxT = jnp.eye(t, dtype=gram_TxT.dtype)  # vaccinated g_i = coef[i] @ J
    for step in range(t - 1):  # trace-time loop over T; every task is vaccinated in parallel
        sel_TxT = jax.nn.one_hot(order_TxTm1[:, step], t, dtype=gram_TxT.dtype)  # row i: e_j(i)
        cg_TxT = jnp.matmul(coef_TxT, gram_TxT, precision=_HI)
        pc_norm_T = jnp.sqrt(jnp.maximum(jnp.sum(cg_TxT * coef_TxT, axis=1), 0.0))
        gj_norm_T = jnp.sum(norm_T * sel_TxT, axis=1)
        rho_T = jnp.sum(cg_TxT * sel_TxT, axis=1) / (pc_norm_T * gj_norm_T + _EPS)
        rho_T = jnp.clip(rho_T, -1.0, 1.0)
        ema_T = jnp.sum(target_TxT * sel_TxT, axis=1)
        # The lift grows like 1/√(1-φ̂²): once the EMA reaches 1 (tasks with equal gradients for a
        # while) it would divide by ~0, so the lift aims at φ̂ clamped to at most 1 - 1e-4 (the
        # stored EMA stays unclamped). LibMTL and TorchJD divide as is.
        phi_T = jnp.minimum(ema_T, _MAX_TARGET)
        root_T = jnp.sqrt(jnp.maximum(1.0 - phi_T**2, 0.0))
        w_T = (
            pc_norm_T
            * (phi_T * jnp.sqrt(1.0 - rho_T**2) - rho_T * root_T)
            / (gj_norm_T * root_T + _EPS)
        )
        coef_TxT = coef_TxT + jnp.where(rho_T < phi_T, w_T, 0.0)[:, None] * sel_TxT
        new_T = (1.0 - beta) * ema_T + beta * rho_T
        target_TxT = jnp.where(sel_TxT > 0, new_T[:, None], target_TxT)
    return _combine(jnp.sum(coef_TxT, axis=0), jacobian_TxP), target_TxT.astype(target_dtype)


def config(jacobian_TxP: Array) -> Array:
    """ConFIG (Liu et al. 2024): u = pinv([g_i/|g_i|]) 1, d = (Σ_i g_i·û) û with û = u/|u|."""
    gram_TxT = _normalized_gram(jacobian_TxP)
    n_T = jnp.sqrt(jnp.maximum(jnp.diag(gram_TxT), 0.0))
    inv_T = jnp.where(n_T > 1e-10, 1.0 / jnp.where(n_T > 1e-10, n_T, 1.0), 0.0)
    unit_gram_TxT = gram_TxT * inv_T[:, None] * inv_T[None, :]
    # pinv(U) 1 = Uᵀ (U Uᵀ)⁺ 1 = Jᵀ c with c = D⁻¹ (U Uᵀ)⁺ 1 (zero rows drop out of U).
    c_T = inv_T * jnp.matmul(jnp.linalg.pinv(unit_gram_TxT, hermitian=True), jnp.ones_like(n_T))
    gc_T = jnp.matmul(gram_TxT, c_T, precision=_HI)
    sq = c_T @ gc_T  # |u|²
    length = jnp.where(sq > 0, jnp.sum(gc_T) / jnp.where(sq > 0, sq, 1.0), 0.0)  # (Σ g_i·û) / |u|
    return _combine(length * c_T, jacobian_TxP)


# --------------------------------------------------------------------------------------------------
# registry


def _same_state(state: PyTree, rows: Array) -> PyTree:
    return state


def _sub_state(state: PyTree, sub: PyTree, rows: Array) -> PyTree:
    return sub


class Aggregator(NamedTuple):
    """A uniform (stateful) interface: ``vector_P, state = apply(jacobian_TxP, state, key)``.

    ``restrict(state, rows)`` is the state for the sub-Jacobian ``J[rows]`` (the tasks that train
    in a step) and ``expand(state, sub_state, rows)`` writes its update back into the full state.
    """

    init: Callable[[int, int], PyTree]
    apply: Callable[[Array, PyTree, Array], tuple[Array, PyTree]]
    restrict: Callable[[PyTree, Array], PyTree] = _same_state
    expand: Callable[[PyTree, PyTree, Array], PyTree] = _sub_state


_FUNCS: dict[str, Callable[..., Any]] = {
    "mean": mean,
    "sum": sum,
    "pcgrad": pcgrad,
    "mgda": mgda,
    "cagrad": cagrad,
    "imtl_g": imtl_g,
    "aligned_mtl": aligned_mtl,
    "upgrad": upgrad,
    "dualproj": dualproj,
    "nash_mtl": nash_mtl,
    "graddrop": graddrop,
    "gradvac": gradvac,
    "config": config,
}
AGGREGATORS: tuple[str, ...] = tuple(_FUNCS)
_ARGS = ("jacobian_TxP", "target_TxT", "key")


def _check(name: str, hparams: dict[str, Any]) -> None:
    """Reject hyper-parameter values the papers do not define."""
    if name == "cagrad":
        if not hparams.get("c", 0.5) >= 0:
            raise ValueError(f"aggregator 'cagrad' c: {hparams['c']} must be >= 0")
        if hparams.get("rescale", 1) not in (0, 1, 2):
            raise ValueError(f"aggregator 'cagrad' rescale: {hparams['rescale']} must be 0, 1 or 2")
    if name == "gradvac" and not 0 <= hparams.get("beta", 0.5) <= 1:
        raise ValueError(f"aggregator 'gradvac' beta: {hparams['beta']} must be in [0, 1]")
    for k in ("reg_eps", "max_norm"):
        if k in hparams and not hparams[k] >= 0:
            raise ValueError(f"aggregator {name!r} {k}: {hparams[k]} must be >= 0")


def get_aggregator(name: str, **hparams: Any) -> Aggregator:
    """The registered aggregator ``name`` with its hyper-parameters bound."""
    if name not in _FUNCS:
        raise unknown("aggregator", name, AGGREGATORS)
    fn = _FUNCS[name]
    params = inspect.signature(fn).parameters
    valid = [p for p in params if p not in _ARGS]
    for k in hparams:
        if k not in valid:
            hint = closest(k, valid) if valid else f"{name!r} takes no hyper-parameters"
            raise ValueError(f"aggregator {name!r}: unknown hyper-parameter {k!r}; {hint}")
    _check(name, hparams)
    fn = functools.partial(fn, **hparams)
    if name == "gradvac":
        return Aggregator(
            init=lambda t, p: jnp.zeros((t, t), jnp.float32),
            apply=lambda jac, state, key: fn(jac, state, key),
            restrict=lambda state, rows: state[rows[:, None], rows[None, :]],
            expand=lambda state, sub, rows: state.at[rows[:, None], rows[None, :]].set(sub),
        )
    if "key" in params:
        return Aggregator(init=lambda t, p: (), apply=lambda jac, state, key: (fn(jac, key), state))
    return Aggregator(init=lambda t, p: (), apply=lambda jac, state, key: (fn(jac), state))
