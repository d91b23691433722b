"""Tests for mtl.analysis against independent numpy references and hand-computed closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl import analysis


def _np_cosine(jac):
    jac = np.asarray(jac, np.float64)
    out = np.zeros((jac.shape[0], jac.shape[0]))
    for i in range(jac.shape[0]):
        for j in range(jac.shape[0]):
            ni, nj = np.linalg.norm(jac[i]), np.linalg.norm(jac[j])
            if ni > 0 and nj > 0:
                out[i, j] = float(np.dot(jac[i], jac[j])) / (ni * nj)
    return out


def _np_gms(jac):
    norms = np.linalg.norm(np.asarray(jac, np.float64), axis=1)
    t = len(norms)
    return np.array(
        [
            [2 * norms[i] * norms[j] / (norms[i] ** 2 + norms[j] ** 2) for j in range(t)]
            for i in range(t)
        ]
    )


# ----------------------------------------------------------------------------- norms and cosine


def test_grad_norms_match_numpy():
    jac = np.random.default_rng(0).normal(size=(4, 37)).astype(np.float32)
    np.testing.assert_allclose(analysis.grad_norms(jac), np.linalg.norm(jac, axis=1), rtol=1e-5)


def test_statistics_of_huge_finite_gradients_match_numpy():
    """|g| ~ 1e19-1e30 (a diverging run): float32 squares overflow, the statistics must not."""
    rng = np.random.default_rng(7)
    jac = (rng.normal(size=(3, 40)) * np.array([[1e19], [3e30], [1e-3]])).astype(np.float32)
    ref = np.asarray(jac, np.float64)
    out = analysis.summarize(jac)
    np.testing.assert_allclose(out["norms"], np.linalg.norm(ref, axis=1), rtol=1e-5)
    np.testing.assert_allclose(analysis.grad_norms(jac), np.linalg.norm(ref, axis=1), rtol=1e-5)
    np.testing.assert_allclose(out["cosine"], _np_cosine(ref), atol=1e-5)
    np.testing.assert_allclose(analysis.cosine_matrix(jac), _np_cosine(ref), atol=1e-5)
    np.testing.assert_allclose(out["magnitude_similarity"], _np_gms(ref), atol=1e-6)
    np.testing.assert_allclose(analysis.magnitude_similarity(jac), _np_gms(ref), atol=1e-6)


def test_cosine_identical_and_negated():
    g = np.random.default_rng(1).normal(size=(50,)).astype(np.float32)
    cos = np.asarray(analysis.cosine_matrix(np.stack([g, 3.0 * g, -g])))
    np.testing.assert_allclose(cos[0, 1], 1.0, atol=1e-6)
    np.testing.assert_allclose(cos[0, 2], -1.0, atol=1e-6)
    np.testing.assert_allclose(cos[1, 2], -1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-6)


def test_cosine_matches_numpy_on_random_data():
    jac = np.random.default_rng(2).normal(size=(5, 64)).astype(np.float32)
    cos = np.asarray(analysis.cosine_matrix(jac))
    np.testing.assert_allclose(cos, _np_cosine(jac), atol=1e-5)
    np.testing.assert_allclose(cos, cos.T, atol=1e-7)


def test_cosine_orthogonal_is_zero():
    cos = np.asarray(analysis.cosine_matrix(np.array([[1.0, 0.0], [0.0, 2.0]])))
    np.testing.assert_allclose(cos, np.eye(2), atol=1e-7)


def test_zero_row_gives_zero_cosine_no_nan():
    jac = np.random.default_rng(3).normal(size=(3, 10)).astype(np.float32)
    jac[1] = 0.0
    cos = np.asarray(analysis.cosine_matrix(jac))
    assert np.all(np.isfinite(cos))
    np.testing.assert_array_equal(cos[1], 0.0)
    np.testing.assert_array_equal(cos[:, 1], 0.0)
    np.testing.assert_allclose(cos[[0, 2]][:, [0, 2]], _np_cosine(jac[[0, 2]]), atol=1e-5)
    assert np.asarray(analysis.conflict(jac))[1].sum() == 0
    summary = analysis.summarize(jac)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in summary.values())
    # the gradient of an analysis quantity through a zero row must stay finite too
    grad = jax.grad(lambda j: analysis.cosine_matrix(j).sum())(jnp.asarray(jac))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_all_zero_jacobian():
    summary = analysis.summarize(np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(summary["norms"], 0.0)
    np.testing.assert_array_equal(summary["cosine"], 0.0)
    np.testing.assert_array_equal(summary["conflict"], 0.0)
    assert np.all(np.isfinite(np.asarray(summary["magnitude_similarity"])))


def test_bfloat16_input_is_computed_in_float32():
    jac = np.random.default_rng(4).normal(size=(3, 20)).astype(np.float32)
    cos = analysis.cosine_matrix(jnp.asarray(jac, jnp.bfloat16))
    assert cos.dtype == jnp.float32
    ref = _np_cosine(np.asarray(jnp.asarray(jac, jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_allclose(cos, ref, atol=1e-5)


# ----------------------------------------------------------------------------- conflict


def test_conflict_matches_sign_of_dot_products():
    jac = np.random.default_rng(5).normal(size=(6, 8)).astype(np.float32)
    expected = (jac @ jac.T < 0).astype(np.float32)
    np.testing.assert_array_equal(analysis.conflict(jac), expected)
    assert np.all(np.diag(np.asarray(analysis.conflict(jac))) == 0)


def test_conflict_rate_on_constructed_sequence():
    e0, e1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    # 3 tasks over 4 steps; task 0 vs 1 conflicts at steps 1 and 3; task 0 vs 2 at step 2 only;
    # task 1 vs 2 never (orthogonal at step 0 counts as no conflict).
    steps = [
        np.stack([e0, e0, e1]),
        np.stack([e0, -e0 + 0.1 * e1, 0.05 * e0 + e1]),
        np.stack([e0, e1, -e0 + e1]),
        np.stack([e0, -e0, e1]),
    ]
    cos_SxTxT = jnp.stack([analysis.cosine_matrix(s) for s in steps])
    rate = np.asarray(analysis.conflict_rate(cos_SxTxT))
    # counted by hand from the construction
    expected = np.array([[0, 2, 1], [2, 0, 0], [1, 0, 0]]) / 4.0
    np.testing.assert_allclose(rate, expected)


def test_conflict_rate_matches_numpy_count_on_random_sequences():
    jac_SxTxP = np.random.default_rng(6).normal(size=(40, 4, 3)).astype(np.float32)
    cos_SxTxT = jax.vmap(analysis.cosine_matrix)(jac_SxTxP)
    rate = np.asarray(analysis.conflict_rate(cos_SxTxT))
    count = np.zeros((4, 4))
    for jac in jac_SxTxP:
        dots = jac.astype(np.float64) @ jac.T.astype(np.float64)
        count += dots < 0
    expected = count / len(jac_SxTxP)
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(rate, expected)
    assert 0 < rate.sum()  # the random data does contain conflicts


# ----------------------------------------------------------------------------- magnitude


def test_magnitude_similarity_matches_numpy():
    rng = np.random.default_rng(7)
    jac = (rng.normal(size=(4, 16)) * np.array([[0.1], [1.0], [5.0], [1.0]])).astype(np.float32)
    gms = np.asarray(analysis.magnitude_similarity(jac))
    np.testing.assert_allclose(gms, _np_gms(jac), rtol=1e-5)
    assert np.all((gms >= 0) & (gms <= 1 + 1e-6))


def test_magnitude_similarity_equal_norms_is_one():
    rng = np.random.default_rng(8)
    jac = rng.normal(size=(3, 12))
    jac /= np.linalg.norm(jac, axis=1, keepdims=True)  # different directions, same norm
    np.testing.assert_allclose(
        analysis.magnitude_similarity(jac.astype(np.float32)), 1.0, atol=1e-6
    )
    # norms 1 and 3: 2*3 / (1 + 9) = 0.6
    gms = analysis.magnitude_similarity(np.array([[1.0, 0.0], [0.0, 3.0]], np.float32))
    np.testing.assert_allclose(gms[0, 1], 0.6, rtol=1e-6)


def test_magnitude_similarity_zero_row_no_nan():
    gms = np.asarray(analysis.magnitude_similarity(np.array([[0.0, 0.0], [1.0, 2.0]], np.float32)))
    assert np.all(np.isfinite(gms))
    assert gms[0, 1] == 0.0 and gms[1, 0] == 0.0


# ----------------------------------------------------------------------------- lookahead affinity


def _toy_scalar_loss(c):
    def loss_fn(params):
        theta = params["theta"]
        return jnp.stack([(theta - 1.0) ** 2, (theta - 1.0) ** 2 + c, (theta + 1.0) ** 2])

    return loss_fn


def test_lookahead_affinity_signs_on_toy():
    c, theta, lr = 0.5, 0.0, 0.1
    loss_fn = _toy_scalar_loss(c)
    # per-task gradients dL_i/dθ written out by hand: 2(θ-1), 2(θ-1), 2(θ+1)
    grads_T = {"theta": jnp.array([2 * (theta - 1), 2 * (theta - 1), 2 * (theta + 1)])}
    z = np.asarray(analysis.lookahead_affinity(loss_fn, {"theta": jnp.array(theta)}, grads_T, lr))
    assert z.shape == (3, 3)
    assert z[0, 1] > 0  # task 0 pulls θ towards 1, which also lowers task 1's loss
    assert z[0, 2] < 0  # ... and away from -1, which raises task 2's loss
    assert z[2, 0] < 0 and z[2, 1] < 0
    assert np.all(np.diag(z) > 0)  # a small step on a task always helps that task

    # closed form for Z[0, 2] and Z[0, 1] by hand: θ' = θ - lr * 2(θ - 1)
    theta_new = theta - lr * 2 * (theta - 1)
    np.testing.assert_allclose(z[0, 2], 1 - (theta_new + 1) ** 2 / (theta + 1) ** 2, rtol=1e-5)
    np.testing.assert_allclose(
        z[0, 1], 1 - ((theta_new - 1) ** 2 + c) / ((theta - 1) ** 2 + c), rtol=1e-5
    )


def test_lookahead_affinity_pytree_matches_numpy_loop():
    """Two-leaf params with a task-specific head: grads of the head are zero, as the API expects."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(32, 5)).astype(np.float32)
    w_true = rng.normal(size=(3, 5)).astype(np.float32)
    y = x @ w_true.T
    params = {"shared": rng.normal(size=(5,)).astype(np.float32), "head": np.ones(3, np.float32)}

    def np_losses(shared, head):
        pred = (x @ shared)[:, None] * head[None, :]
        return ((pred - y) ** 2).mean(axis=0)

    def loss_fn(p):
        pred = (x @ p["shared"])[:, None] * p["head"][None, :]
        return jnp.mean((pred - y) ** 2, axis=0)

    # per-task gradient w.r.t. the shared vector, in closed form: (2/B) x^T (pred_t - y_t) * head_t
    pred = (x @ params["shared"])[:, None] * params["head"][None, :]
    g_shared = np.stack([2.0 / len(x) * x.T @ (pred[:, t] - y[:, t]) for t in range(3)])
    grads_T = {"shared": g_shared, "head": np.zeros((3, 3), np.float32)}
    lr = 0.05

    z = np.asarray(analysis.lookahead_affinity(loss_fn, params, grads_T, lr))
    base = np_losses(params["shared"], params["head"])
    expected = np.stack(
        [
            1.0 - np_losses(params["shared"] - lr * g_shared[i], params["head"]) / base
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-6)

    # the hand gradient agrees with autodiff, so the test's inputs are the ones the API expects
    jac = jax.jacrev(loss_fn)({k: jnp.asarray(v) for k, v in params.items()})["shared"]
    np.testing.assert_allclose(jac, g_shared, rtol=1e-4, atol=1e-5)


def test_lookahead_affinity_zero_base_loss_no_nan():
    loss_fn = lambda p: jnp.stack([p["theta"] ** 2, (p["theta"] - 1.0) ** 2])
    grads_T = {"theta": jnp.array([0.0, -2.0])}
    z = np.asarray(analysis.lookahead_affinity(loss_fn, {"theta": jnp.array(0.0)}, grads_T, 0.1))
    assert np.all(np.isfinite(z))
    np.testing.assert_array_equal(z[:, 0], 0.0)  # L_0(θ) == 0: affinity undefined, reported 0


# ----------------------------------------------------------------------------- gate utilisation


def test_gate_utilisation_mean_sums_to_one_and_matches_numpy():
    logits = np.random.default_rng(10).normal(size=(3, 16, 4)).astype(np.float32)
    gates = np.asarray(jax.nn.softmax(logits, axis=-1))
    util = analysis.gate_utilisation(gates)
    assert util["mean"].shape == (3, 4)
    assert util["entropy"].shape == (3,) and util["balance"].shape == (3,)
    np.testing.assert_allclose(np.asarray(util["mean"]).sum(axis=-1), 1.0, atol=1e-5)
    g64 = gates.astype(np.float64)
    np.testing.assert_allclose(util["mean"], g64.mean(axis=1), atol=1e-6)
    ent = -(g64 * np.log(g64)).sum(-1).mean(-1)
    np.testing.assert_allclose(util["entropy"], ent, rtol=1e-5)
    m = g64.mean(axis=1)
    np.testing.assert_allclose(util["balance"], -(m * np.log(m)).sum(-1), rtol=1e-5)
    # concavity of entropy: the mean distribution is at least as spread as the average example
    assert np.all(np.asarray(util["balance"]) >= np.asarray(util["entropy"]) - 1e-6)


def test_gate_utilisation_uniform_and_one_hot():
    num_experts = 5
    uniform = np.full((2, 7, num_experts), 1.0 / num_experts, np.float32)
    util = analysis.gate_utilisation(uniform)
    np.testing.assert_allclose(util["entropy"], np.log(num_experts), rtol=1e-6)
    np.testing.assert_allclose(util["balance"], np.log(num_experts), rtol=1e-6)

    # every example picks one expert (no NaN from 0 log 0); examples cycle through the experts
    one_hot = np.eye(num_experts, dtype=np.float32)[np.arange(10) % num_experts][None]
    util = analysis.gate_utilisation(one_hot)
    np.testing.assert_array_equal(util["entropy"], 0.0)
    np.testing.assert_allclose(util["balance"], np.log(num_experts), rtol=1e-6)

    # collapsed: every example picks expert 2
    collapsed = np.zeros((1, 6, num_experts), np.float32)
    collapsed[..., 2] = 1.0
    util = analysis.gate_utilisation(collapsed)
    np.testing.assert_array_equal(util["entropy"], 0.0)
    np.testing.assert_array_equal(util["balance"], 0.0)
    np.testing.assert_array_equal(util["mean"], [[0, 0, 1, 0, 0]])


def test_gate_utilisation_mask_excludes_examples():
    rng = np.random.default_rng(11)
    gates = np.asarray(jax.nn.softmax(rng.normal(size=(2, 9, 3)), axis=-1), np.float32)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0], np.float32)
    masked = analysis.gate_utilisation(gates, mask)
    kept = analysis.gate_utilisation(gates[:, mask > 0])
    for key in ("mean", "entropy", "balance"):
        np.testing.assert_allclose(masked[key], kept[key], rtol=1e-5, atol=1e-7)
    empty = analysis.gate_utilisation(gates, np.zeros(9, np.float32))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in empty.values())


# ----------------------------------------------------------------------------- summarize and jit


def test_summarize_agrees_with_individual_functions():
    jac = np.random.default_rng(12).normal(size=(4, 30)).astype(np.float32)
    summary = analysis.summarize(jac)
    assert set(summary) == {"norms", "cosine", "conflict", "magnitude_similarity"}
    np.testing.assert_allclose(summary["norms"], analysis.grad_norms(jac))
    np.testing.assert_allclose(summary["cosine"], analysis.cosine_matrix(jac))
    np.testing.assert_array_equal(summary["conflict"], analysis.conflict(jac))
    np.testing.assert_allclose(summary["magnitude_similarity"], analysis.magnitude_similarity(jac))


def test_flatten_task_grads():
    grads_T = {"a": np.arange(6.0).reshape(2, 3), "b": np.arange(8.0).reshape(2, 2, 2)}
    jac = np.asarray(analysis.flatten_task_grads(grads_T))
    assert jac.shape == (2, 7)
    np.testing.assert_array_equal(jac[1], [3, 4, 5, 4, 5, 6, 7])


@pytest.mark.parametrize(
    "fn",
    [
        analysis.grad_norms,
        analysis.cosine_matrix,
        analysis.conflict,
        analysis.magnitude_similarity,
        analysis.summarize,
    ],
)
def test_jacobian_functions_under_jit(fn):
    jac = np.random.default_rng(13).normal(size=(4, 25)).astype(np.float32)
    jac[2] = 0.0
    eager, jitted = fn(jac), jax.jit(fn)(jac)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), eager, jitted)


def test_other_functions_under_jit():
    cos = jax.vmap(analysis.cosine_matrix)(np.random.default_rng(14).normal(size=(10, 3, 4)))
    np.testing.assert_allclose(
        analysis.conflict_rate(cos), jax.jit(analysis.conflict_rate)(cos), rtol=1e-6
    )

    gates = jax.nn.softmax(jnp.asarray(np.random.default_rng(15).normal(size=(2, 8, 3))), axis=-1)
    mask = jnp.array([1, 1, 0, 1, 0, 1, 1, 1], jnp.float32)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        analysis.gate_utilisation(gates, mask),
        jax.jit(analysis.gate_utilisation)(gates, mask),
    )

    loss_fn = _toy_scalar_loss(0.5)
    params = {"theta": jnp.array(0.3)}
    grads_T = {"theta": jnp.array([-1.4, -1.4, 2.6])}
    eager = analysis.lookahead_affinity(loss_fn, params, grads_T, 0.1)
    # lr traced too: the train step may pass the scheduled learning rate
    jitted = jax.jit(lambda p, g, lr: analysis.lookahead_affinity(loss_fn, p, g, lr))(
        params, grads_T, jnp.float32(0.1)
    )
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
