"""Aggregators vs independent references: closed forms, brute force, optimality conditions."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl import aggregation as agg

KEY = jax.random.key(0)


P = 24  # one parameter count for (almost) every test: fewer shapes, fewer compilations


@pytest.mark.parametrize(
    ("p", "apart", "rows"),
    [
        (96, False, False),
        (40_000, False, False),
        (40_000, True, True),
        (128 * 1024 + 5, False, True),
    ],
)
def test_gram_and_combination_match_float64_products(p, apart, rows):
    """Short rows take the plain products, long ones row sums and a sum of scaled rows (from
    32k inside the trainer's step, where the rows are made apart; from 128k on a whole array):
    G equals J Jᵀ (and is exactly symmetric) and the combination equals wᵀJ, both in float64;
    the traced program has a dot exactly when the plain products are taken, one variadic reduce
    per block at T = 5 and one multiply-reduce per pair at T = 3."""
    j = np.random.default_rng(1).normal(size=(5, p)).astype(np.float32)
    w = np.linspace(-1.0, 2.0, 5).astype(np.float32)
    j64 = j.astype(np.float64)
    # fresh functions: jax's trace caches do not key on the hint (the trainer's step is one
    # function per Trainer)
    gram, combine = (lambda j: agg._gram(j)), (lambda w, j: agg._combine(w, j))
    with agg._rows_made_apart() if apart else contextlib.nullcontext():
        assert agg._long(p) == rows
        jaxprs = [jax.make_jaxpr(f)(*a).jaxpr for f, a in ((gram, (j,)), (combine, (w, j)))]
        got_g = np.asarray(jax.jit(gram)(jnp.asarray(j)), np.float64)
        got_c = np.asarray(jax.jit(combine)(jnp.asarray(w), jnp.asarray(j)), np.float64)
    assert agg._long(40_000) is False  # the hint ends with its block
    prims = [[e.primitive.name for e in jaxpr.eqns] for jaxpr in jaxprs]
    assert all(("dot_general" in names) == (not rows) for names in prims)
    if rows:  # T = 5: one variadic reduce over all 15 row pairs per block (128 lanes, rest)
        passes = [e for e in jaxprs[0].eqns if e.primitive.name == "reduce"]
        assert len(passes) == (2 if p % 128 else 1)
        assert all(len(e.outvars) == 15 for e in passes)
        with agg._rows_made_apart() if apart else contextlib.nullcontext():  # T = 3: pair sums
            j3 = j[:3]
            names = [e.primitive.name for e in jax.make_jaxpr(gram)(j3).jaxpr.eqns]
            got3 = np.asarray(jax.jit(gram)(jnp.asarray(j3)), np.float64)
        assert "reduce" not in names and names.count("reduce_sum") == 6
        np.testing.assert_allclose(got3, j64[:3] @ j64[:3].T, rtol=1e-5, atol=1e-3 * np.sqrt(p))
        np.testing.assert_array_equal(got3, got3.T)
    np.testing.assert_allclose(got_g, j64 @ j64.T, rtol=1e-5, atol=1e-3 * np.sqrt(p))
    if rows:
        np.testing.assert_array_equal(got_g, got_g.T)
    np.testing.assert_allclose(got_c, w.astype(np.float64) @ j64, rtol=1e-5, atol=1e-5)


def _conflicting(rng, t, p=P, scales=True, rank=None):
    """Random rows with a conflicting pair, norms over 3 decades, optionally rank-deficient."""
    j = rng.normal(size=(t, p))
    if rank is not None:
        j[:, rank:] = 0.0  # rows live in a rank-dim subspace: more tasks than dimensions
    if t >= 2:
        j[1] = -0.7 * j[0] + 0.4 * j[1]
    if scales:
        j *= 10 ** rng.uniform(-1.5, 1.5, size=(t, 1))
    return j.astype(np.float32)


@functools.cache
def _jitted(name, hp):
    a = agg.get_aggregator(name, **dict(hp))
    return a.init, jax.jit(a.apply)


def _run(name, jac, **hp):
    init, apply = _jitted(name, tuple(sorted(hp.items())))
    out, _ = apply(jnp.asarray(jac), init(*jac.shape), KEY)
    return np.asarray(out, np.float64)


def _zoom_min(f, t, rounds=40):
    """Brute force: min of f over the simplex by a fine grid, then repeatedly zoomed grids."""
    best, h = np.full(t, 1 / t), 0.5
    for _ in range(rounds):
        axes = np.meshgrid(*[np.linspace(-h, h, 61)] * (t - 1))
        ws = np.stack([best[i] + a.ravel() for i, a in enumerate(axes)], 1)
        ws = np.concatenate([ws, 1 - ws.sum(1, keepdims=True)], 1)
        ws = ws[(ws >= 0).all(1)]
        vals = f(ws)
        best, h = ws[vals.argmin()], h * 0.75
    return best, vals.min()


def test_mean_sum_exact():
    j = np.random.default_rng(0).normal(size=(6, P)).astype(np.float32)
    np.testing.assert_allclose(_run("mean", j), j.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run("sum", j), j.astype(np.float64).sum(0), rtol=1e-6, atol=1e-5)


def test_pcgrad_two_tasks_closed_form():
    rng = np.random.default_rng(1)
    g1, g2 = rng.normal(size=(2, P))
    g2 = g2 - 2 * (g1 @ g2 + abs(g1 @ g2)) / (g1 @ g1) * g1  # make them conflict
    assert g1 @ g2 < 0
    ref = g1 - (g1 @ g2) / (g2 @ g2) * g2 + g2 - (g2 @ g1) / (g1 @ g1) * g1
    j = np.stack([g1, g2]).astype(np.float32)
    pcgrad = jax.jit(agg.pcgrad)
    for k in range(3):  # any projection order
        got = np.asarray(pcgrad(jnp.asarray(j), jax.random.key(k)), np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    h2 = g2 - 2 * (g1 @ g2) / (g1 @ g1) * g1  # non-conflicting pair
    j = np.stack([g1, h2]).astype(np.float32)
    assert g1 @ h2 > 0
    np.testing.assert_allclose(pcgrad(jnp.asarray(j), KEY), g1 + h2, rtol=1e-5, atol=1e-5)


def test_pcgrad_no_conflict_is_sum():
    j = np.abs(np.random.default_rng(2).normal(size=(6, P))).astype(np.float32)
    np.testing.assert_allclose(_run("pcgrad", j), j.sum(0), rtol=1e-5)


@pytest.mark.parametrize("t", [2, 3])
def test_mgda_matches_brute_force(t):
    rng = np.random.default_rng(10 + t)
    for _ in range(4):
        j = _conflicting(rng, t).astype(np.float64)
        gram = j @ j.T
        w_ref, sq_ref = _zoom_min(lambda ws, g=gram: np.einsum("ni,ij,nj->n", ws, g, ws), t)
        d = _run("mgda", j.astype(np.float32))
        scale = np.max(np.diag(gram))
        assert abs(d @ d - sq_ref) <= 1e-6 * scale
        np.testing.assert_allclose(d, w_ref @ j, atol=2e-4 * np.sqrt(scale))


def test_mgda_kkt_conditions():
    rng = np.random.default_rng(3)
    for _ in range(5):
        j = _conflicting(rng, 6)
        j64 = j.astype(np.float64)
        d = _run("mgda", j)
        w = np.linalg.lstsq(j64.T, d, rcond=None)[0]  # rows independent: d = wᵀJ recovers w
        n = np.linalg.norm(j64, axis=1)
        tol = 1e-5 * n * np.linalg.norm(d)
        assert np.all(w >= -1e-4) and abs(w.sum() - 1) < 1e-4
        assert np.all(j64 @ d >= d @ d - tol)
        active = w > 1e-3
        assert active.any()
        np.testing.assert_allclose((j64 @ d)[active], d @ d, atol=tol.max())


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone(name):
    rng = np.random.default_rng(4)
    for t, rank in [(3, None), (6, None), (6, 4), (6, 4), (6, 2)]:
        j = _conflicting(rng, t, rank=rank)
        j64 = j.astype(np.float64)
        n = np.linalg.norm(j64, axis=1)
        d = _run(name, j)  # default reg_eps = 0 (TorchJD's 1e-4 loosens the cone slightly)
        assert np.all(j64 @ d >= -1e-5 * n * n.max())


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_no_conflict_gives_mean(name):
    rng = np.random.default_rng(5)
    j = np.abs(rng.normal(size=(6, P))) * rng.uniform(0.1, 10, (6, 1))
    j = j.astype(np.float32)
    assert np.all(j @ j.T >= 0)
    np.testing.assert_allclose(_run(name, j), j.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)


def test_upgrad_two_tasks_closed_form():
    # Projecting g1 onto {v: g1·v >= 0, g2·v >= 0} when g1·g2 < 0 is g1 - (g1·g2/|g2|²) g2.
    rng = np.random.default_rng(6)
    j = _conflicting(rng, 2).astype(np.float64)
    g1, g2 = j
    assert g1 @ g2 < 0
    ref = (g1 - (g1 @ g2) / (g2 @ g2) * g2 + g2 - (g2 @ g1) / (g1 @ g1) * g1) / 2
    np.testing.assert_allclose(_run("upgrad", j.astype(np.float32)), ref, rtol=2e-4, atol=1e-5)


def test_dualproj_is_projection_of_mean():
    # KKT of min |v - ḡ|² s.t. Jv >= 0: v = ḡ + Jᵀμ, μ >= 0, μ_i (Jv)_i = 0.
    rng = np.random.default_rng(7)
    for _ in range(4):
        j = _conflicting(rng, 6, scales=False)
        j64 = j.astype(np.float64)
        v = _run("dualproj", j)
        mu = np.linalg.lstsq(j64.T, v - j64.mean(0), rcond=None)[0]
        scale = np.max(np.linalg.norm(j64, axis=1))
        assert np.all(mu >= -1e-4)
        assert np.all(np.abs(mu * (j64 @ v)) <= 1e-4 * scale)


_cagrad = jax.jit(agg.cagrad, static_argnames="rescale")  # c traced: one compilation per shape


def _disk_max(f, center, radius, rounds=40):
    """Brute force: max of a concave f over the 2-D disk |d - center| <= radius (zoomed grids)."""
    best, h = center.copy(), radius
    for _ in range(rounds):
        a, b = np.meshgrid(np.linspace(-h, h, 81), np.linspace(-h, h, 81))
        ds = best + np.stack([a.ravel(), b.ravel()], 1)
        ds = ds[np.linalg.norm(ds - center, axis=1) <= radius]
        vals = f(ds)
        best, h = ds[vals.argmax()], h * 0.7
    return vals.max()


@pytest.mark.parametrize("t, c", [(3, 0.9), (6, 0.5), (6, 0.9), (8, 0.7)])
def test_cagrad_reaches_the_optimum_on_rows_in_a_plane(t, c):
    """Rank-2 rows (more tasks than directions, 0 often inside their hull): CAGrad's primal
    max_d min_i g_i·d over |d - g0| <= c|g0| is a concave maximum over a disk in the rows' plane,
    found by brute force. An unguarded fixed-point iteration returned d = g0 on 41 of 200 such
    draws at T = 6 (its spurious root s = 0) and oscillated on others."""
    rng = np.random.default_rng(30 + t)
    for _ in range(12):
        j = _conflicting(rng, t, rank=2).astype(np.float64)
        g0 = j.mean(0)
        radius = c * np.linalg.norm(g0)
        opt = _disk_max(lambda ds, j=j: (ds @ j[:, :2].T).min(1), g0[:2], radius)
        d = np.asarray(_cagrad(j.astype(np.float32), c=c, rescale=0), np.float64)
        scale = np.max(np.linalg.norm(j, axis=1)) * np.linalg.norm(g0)
        # float32: g_w = wᵀJ nearly cancels here (0 close to the hull), so its norm carries ~1e-5
        assert np.linalg.norm(d - g0) <= radius * (1 + 1e-4)
        assert np.min(j @ d) >= opt - 1e-5 * scale, (np.min(j @ d), opt)


def test_cagrad_c0_is_mean():
    j = _conflicting(np.random.default_rng(8), 6)
    np.testing.assert_allclose(_cagrad(j, c=0.0), j.astype(np.float64).mean(0), rtol=1e-5)


@pytest.mark.parametrize("t", [2, 3])
def test_cagrad_primal_dual_sandwich(t):
    # For feasible d (|d - g0| <= c|g0|): min_i g_i·d <= OPT = min_{w∈Δ} g_wᵀg0 + c|g0||g_w|.
    rng = np.random.default_rng(20 + t)
    for c in (0.2, 0.5, 1.0, 2.0):
        j = _conflicting(rng, t).astype(np.float64)
        g0 = j.mean(0)
        radius = c * np.linalg.norm(g0)

        def dual(ws, j=j, g0=g0, radius=radius):
            x = ws @ j
            return x @ g0 + radius * np.linalg.norm(x, axis=1)

        _, opt = _zoom_min(dual, t)
        d = np.asarray(_cagrad(j.astype(np.float32), c=c, rescale=0), np.float64)
        scale = np.max(np.linalg.norm(j, axis=1)) * np.linalg.norm(g0)
        assert np.linalg.norm(d - g0) <= radius * (1 + 1e-5)
        assert np.min(j @ d) >= opt - 2e-5 * scale
        d1 = np.asarray(_cagrad(j.astype(np.float32), c=c), np.float64)  # rescale=1: / (1 + c²)
        np.testing.assert_allclose(d1 * (1 + c**2), d, rtol=1e-5, atol=1e-6 * np.linalg.norm(d))


def test_imtl_g_equal_projections():
    # 70 draws, T = 2..8, norms over 3 decades. Solved in u_i·g_j rather than in the cosines,
    # 18 of these draws missed 1e-4 in float32 (worst 7e-4); in the cosines the worst is 2e-5.
    rng = np.random.default_rng(9)
    for t in range(2, 9):
        for _ in range(10):
            j = _conflicting(rng, t)
            j64 = j.astype(np.float64)
            d = _run("imtl_g", j)
            proj = j64 @ d / np.linalg.norm(j64, axis=1)
            np.testing.assert_allclose(proj, proj.mean(), rtol=1e-4, err_msg=f"T = {t}")
            alpha = np.linalg.lstsq(j64.T, d, rcond=None)[0]
            assert abs(alpha.sum() - 1) < 1e-4


def test_config_equal_cosines():
    rng = np.random.default_rng(11)
    for t in (2, 3, 6):
        j = _conflicting(rng, t)
        j64 = j.astype(np.float64)
        d = _run("config", j)
        cos = j64 @ d / np.linalg.norm(j64, axis=1) / np.linalg.norm(d)
        assert np.all(cos > 0)
        np.testing.assert_allclose(cos, cos.mean(), rtol=1e-4)
        # length: |d| = Σ_i g_i·d̂
        np.testing.assert_allclose(
            np.linalg.norm(d), np.sum(j64 @ d) / np.linalg.norm(d), rtol=1e-5
        )


def test_nash_mtl_bargaining_solution():
    rng = np.random.default_rng(12)
    nash = jax.jit(agg.nash_mtl)  # max_norm traced
    for t in (2, 3, 6):
        j = _conflicting(rng, t)
        j64 = j.astype(np.float64)
        d = np.asarray(nash(j, max_norm=0.0), np.float64)
        alpha = np.linalg.lstsq(j64.T, d, rcond=None)[0]
        assert np.all(alpha > 0)
        np.testing.assert_allclose(j64 @ j64.T @ alpha, 1 / alpha, rtol=1e-4)
        np.testing.assert_allclose(d @ d, t, rtol=1e-4)  # |d|² = αᵀGα = Σ α_i / α_i = T
        clipped = np.asarray(nash(j, max_norm=1.0), np.float64)  # the default
        np.testing.assert_allclose(clipped, d / np.sqrt(t), rtol=1e-4, atol=1e-6)


def test_aligned_mtl_orthogonal_rows():
    # Orthogonal rows, norms n_i: G^{-1/2} = diag(1/n_i), σ_min = min n → d = min(n) Σ_i g_i/n_i.
    q, _ = np.linalg.qr(np.random.default_rng(13).normal(size=(P, 6)))
    n = np.array([0.5, 1.0, 3.0, 10.0, 2.0, 1.5])
    j = (q.T * n[:, None]).astype(np.float32)
    np.testing.assert_allclose(_run("aligned_mtl", j), n.min() * q.sum(1), rtol=1e-4, atol=1e-5)
    j = (q.T * 2.0).astype(np.float32)  # equal norms: B = I, d = Σ g_i
    np.testing.assert_allclose(_run("aligned_mtl", j), j.sum(0), rtol=1e-4, atol=1e-5)


def test_aligned_mtl_balances_singular_values():
    # d = Jᵀ B 1 with B = σ_min G^{-1/2}, so J d = σ_min G^{1/2} 1 and |d|² = T σ_min².
    rng = np.random.default_rng(14)
    j = _conflicting(rng, 6, scales=False)
    j64 = j.astype(np.float64)
    lam, v = np.linalg.eigh(j64 @ j64.T)
    d = _run("aligned_mtl", j)
    ref = np.sqrt(lam.min()) * (v * np.sqrt(lam)) @ v.T @ np.ones(6)
    np.testing.assert_allclose(j64 @ d, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(d @ d, 6 * lam.min(), rtol=1e-3)


def test_graddrop_sign_consistency():
    rng = np.random.default_rng(15)
    j = rng.normal(size=(4, 2000)).astype(np.float32)
    j64 = j.astype(np.float64)
    d = np.asarray(agg.graddrop(jnp.asarray(j), KEY), np.float64)
    pos, neg = np.clip(j64, 0, None).sum(0), np.clip(j64, None, 0).sum(0)
    assert np.all(np.isclose(d, pos, atol=1e-5) | np.isclose(d, neg, atol=1e-5))
    same = (j > 0).all(0) | (j < 0).all(0)  # purity 1 or 0: nothing dropped
    np.testing.assert_allclose(d[same], j64.sum(0)[same], rtol=1e-5)
    d2 = np.asarray(agg.graddrop(jnp.asarray(j), jax.random.key(1)))
    assert not np.allclose(d, d2)


def test_graddrop_keeps_positive_side_with_probability_purity():
    # g1 = 3, g2 = -1 everywhere: purity P = ½(1 + 2/4) = 0.75, so ~75% of coordinates keep +3.
    j = np.stack([np.full(20_000, 3.0), np.full(20_000, -1.0)]).astype(np.float32)
    d = np.asarray(agg.graddrop(jnp.asarray(j), KEY))
    assert set(np.unique(d)) <= {3.0, -1.0}
    assert abs(np.mean(d == 3.0) - 0.75) < 0.015


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_graddrop_in_half_precision_keeps_one_sign_of_every_mixed_coordinate(dtype):
    """P > U keeps the positive entries, P < U the negative ones: one of the two always, as long
    as P and U are never equal. Drawn in bfloat16 (128 levels in [0.5, 1)), they were equal on
    ~0.4% of the mixed-sign coordinates, which then lost both signs (out = 0)."""
    j = np.random.default_rng(17).normal(size=(3, 30_000)).astype(np.float32)
    jh = jnp.asarray(j, dtype)
    d = np.asarray(agg.graddrop(jh, KEY), np.float32)
    jf = np.asarray(jh, np.float32)
    mixed = (jf > 0).any(0) & (jf < 0).any(0)
    assert mixed.sum() > 20_000
    assert np.count_nonzero(d[mixed] == 0) == 0  # a sum of entries of one sign is never 0


def test_nash_mtl_with_float16_rows_of_small_norm():
    """Orthogonal rows of equal norm n: Gα = 1/α gives α_i = 1/n and d = Σ g_i / n, the sum of
    the unit vectors (closed form). At n = 1e-5, α = 1e5 exceeds float16's 65504: the
    combination now scales the weights, where it returned NaN."""
    n = 1e-5
    j = np.zeros((3, 64), np.float32)
    j[0, 0], j[1, 1], j[2, 2] = n, n, n
    nash = jax.jit(agg.nash_mtl)
    d = np.asarray(nash(jnp.asarray(j, jnp.float16), max_norm=0.0), np.float64)
    ref = np.zeros(64)
    ref[:3] = 1.0
    np.testing.assert_allclose(d, ref, atol=3e-3)  # float16 rows: 1e-5 is subnormal (~0.3%)
    clipped = np.asarray(nash(jnp.asarray(j, jnp.float16), max_norm=1.0), np.float64)
    np.testing.assert_allclose(clipped, ref / np.sqrt(3), atol=3e-3)


def test_gradvac_reaches_target_cosine():
    # With target φ̂ > ρ = cos(g1, g2), g_i' = g_i + w g_j has cos(g_i', g_j) = φ̂ (the paper, eq. 5).
    rng = np.random.default_rng(16)
    j = _conflicting(rng, 2).astype(np.float64)
    g1, g2 = j
    rho = g1 @ g2 / np.linalg.norm(g1) / np.linalg.norm(g2)
    phi = 0.3
    assert rho < phi
    target = jnp.full((2, 2), phi, jnp.float32)
    d, new = agg.gradvac(jnp.asarray(j, jnp.float32), target, KEY, beta=0.25)
    a, b = np.linalg.lstsq(j.T, np.asarray(d, np.float64), rcond=None)[0]  # d = a g1 + b g2
    g1v, g2v = g1 + (b - 1) * g2, g2 + (a - 1) * g1
    cos = lambda x, y: x @ y / np.linalg.norm(x) / np.linalg.norm(y)
    np.testing.assert_allclose([cos(g1v, g2), cos(g2v, g1)], [phi, phi], atol=1e-5)
    off = ~np.eye(2, dtype=bool)
    np.testing.assert_allclose(np.asarray(new)[off], 0.75 * phi + 0.25 * rho, atol=1e-6)


def test_gradvac_target_of_one_lifts_to_the_clamped_target():
    # An EMA target of exactly 1 (tasks with equal gradients for a while) would need an infinite
    # lift; the lift aims at 1 - 1e-4 instead and the stored EMA is left unclamped.
    rng = np.random.default_rng(20)
    g1 = rng.normal(size=P)
    g2 = g1 + 0.05 * rng.normal(size=P)  # nearly parallel: ρ ≈ 0.999 < 1 - 1e-4
    j = np.stack([g1, g2])
    cos = lambda x, y: x @ y / np.linalg.norm(x) / np.linalg.norm(y)
    rho = cos(g1, g2)
    assert rho < 1 - 1e-4
    d, new = agg.gradvac(jnp.asarray(j, jnp.float32), jnp.ones((2, 2), jnp.float32), KEY, beta=0.5)
    d = np.asarray(d, np.float64)
    assert np.all(np.isfinite(d)) and np.linalg.norm(d) < 100 * np.linalg.norm(g1 + g2)
    a, b = np.linalg.lstsq(j.T, d, rcond=None)[0]  # d = a g1 + b g2
    g1v, g2v = g1 + (b - 1) * g2, g2 + (a - 1) * g1
    np.testing.assert_allclose([cos(g1v, g2), cos(g2v, g1)], [1 - 1e-4] * 2, atol=2e-5)
    off = ~np.eye(2, dtype=bool)
    np.testing.assert_allclose(np.asarray(new)[off], 0.5 + 0.5 * rho, atol=1e-5)


def test_gradvac_target_keeps_its_dtype_under_float64_rows():
    with jax.enable_x64(True):
        j = jnp.asarray(_conflicting(np.random.default_rng(21), 3), jnp.float64)
        d, new = agg.gradvac(j, jnp.zeros((3, 3), jnp.float32), KEY, beta=0.5)
        assert new.dtype == jnp.float32 and d.dtype == jnp.float64
        assert np.any(np.asarray(new) != 0)


def test_gradvac_zero_target_is_pcgrad():
    # φ̂ = 0 turns the vaccine into PCGrad's projection (same random order from the same key).
    j = jnp.asarray(_conflicting(np.random.default_rng(17), 6, scales=False))
    d, _ = jax.jit(agg.gradvac)(j, jnp.zeros((6, 6)), KEY)
    np.testing.assert_allclose(d, jax.jit(agg.pcgrad)(j, KEY), rtol=1e-4, atol=1e-5)


def test_gradvac_state_through_registry():
    a = agg.get_aggregator("gradvac", beta=0.5)
    state = a.init(3, P)
    assert state.shape == (3, 3)
    j = jnp.asarray(_conflicting(np.random.default_rng(18), 3))
    _, state = jax.jit(a.apply)(j, state, KEY)
    assert np.any(np.asarray(state) != 0)


@pytest.mark.parametrize("name", agg.AGGREGATORS)
def test_finite_on_degenerate_inputs(name):
    rng = np.random.default_rng(19)
    a = agg.get_aggregator(name)
    base = _conflicting(rng, 6)
    cases = {"regular": base, "all_zero": np.zeros_like(base)}
    cases["zero_row"] = base.copy()
    cases["zero_row"][2] = 0.0
    cases["duplicates"] = np.repeat(base[:1], 6, axis=0)
    cases["opposite"] = np.concatenate([base[:1], -base[:1], np.zeros_like(base[:4])])
    cases["more_tasks_than_dims"] = _conflicting(rng, 6, rank=3)
    cases["tiny_and_huge"] = base * np.array([1e-12, 1, 1e6, 1, 1, 1], np.float32)[:, None]
    batch = jnp.asarray(np.stack(list(cases.values())))
    apply = jax.jit(jax.vmap(a.apply, in_axes=(0, None, None)))  # one compilation for all cases
    out, _ = apply(batch, a.init(6, P), KEY)
    for case, o in zip(cases, np.asarray(out)):
        assert np.all(np.isfinite(o)), (name, case)
    g = _conflicting(rng, 1)  # one task: a positive multiple of its gradient
    out, _ = jax.jit(a.apply)(jnp.asarray(g), a.init(1, P), KEY)
    out = np.asarray(out, np.float64)
    cos = out @ g[0] / np.linalg.norm(out) / np.linalg.norm(g[0])
    assert np.isfinite(out).all() and cos > 1 - 1e-5, name


def test_zero_row_does_not_change_gradient_free_methods():
    # A task with zero gradient imposes no constraint on dual-cone / min-norm methods' other rows.
    rng = np.random.default_rng(21)
    j = _conflicting(rng, 3, scales=False)
    jz = np.concatenate([j, np.zeros((3, P), np.float32)])
    for name in ("upgrad", "dualproj"):
        np.testing.assert_allclose(
            _run(name, jz) * 6 / 3, _run(name, j), rtol=1e-4, atol=1e-6, err_msg=name
        )
    assert np.allclose(_run("mgda", jz), 0.0, atol=1e-6)  # 0 is in the hull: MGDA stops


def test_registry_errors():
    assert set(agg.AGGREGATORS) >= {"mean", "mgda", "upgrad", "gradvac", "config"}
    with pytest.raises(ValueError, match="upgrad"):
        agg.get_aggregator("upgard")
    with pytest.raises(ValueError, match="'cc'.*'c'"):
        agg.get_aggregator("cagrad", cc=0.5)
    with pytest.raises(ValueError, match="no hyper-parameters"):
        agg.get_aggregator("mean", c=1.0)
    with pytest.raises(ValueError, match="c"):
        agg.get_aggregator("cagrad", c=-1.0)
