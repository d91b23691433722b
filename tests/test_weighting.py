"""Loss weightings vs closed forms and independent numpy re-implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl import weighting as wt

KEY = jax.random.key(0)


def _info(losses, next_losses=None, jacobian=None, step=0, epoch_end=False):
    return wt.StepInfo(
        losses=jnp.asarray(losses, jnp.float32),
        next_losses=None if next_losses is None else jnp.asarray(next_losses, jnp.float32),
        jacobian=None if jacobian is None else jnp.asarray(jacobian, jnp.float32),
        step=jnp.asarray(step, jnp.int32),
        key=KEY,
        epoch_end=jnp.asarray(epoch_end),
    )


def _run_updates(w, state, infos):
    """Scan ``update`` over stacked StepInfos (one compilation), returning the final state."""

    def body(state, info):
        return w.update(state, info), None

    return jax.jit(lambda s, i: jax.lax.scan(body, s, i)[0])(state, infos)


def test_fixed():
    w = wt.get_weighting("fixed", 3, weights=(1.0, 0.5, 2.0))
    np.testing.assert_allclose(w.weights(w.init(3), jnp.ones(3), KEY), [1.0, 0.5, 2.0])
    w = wt.get_weighting("fixed", 2)
    np.testing.assert_allclose(w.weights(w.init(2), jnp.ones(2), KEY), [1.0, 1.0])
    with pytest.raises(ValueError, match="2 values for 3 tasks"):
        wt.get_weighting("fixed", 3, weights=(1.0, 2.0))


def test_uncertainty_converges_to_log_loss():
    losses = np.array([0.3, 1.0, 2.5, 7.0], np.float32)
    w = wt.get_weighting("uncertainty", 4, lr=0.1)
    n = 3000
    infos = wt.StepInfo(
        losses=jnp.tile(jnp.asarray(losses), (n, 1)),
        next_losses=None,
        jacobian=None,
        step=jnp.arange(n, dtype=jnp.int32),
        key=jax.random.split(KEY, n),
        epoch_end=jnp.zeros(n, bool),
    )
    state = _run_updates(w, w.init(4), infos)
    np.testing.assert_allclose(state["log_var"], np.log(losses), atol=1e-4)
    np.testing.assert_allclose(w.weights(state, jnp.asarray(losses), KEY), 1 / losses, rtol=1e-3)


def test_uncertainty_matches_numpy_adam_and_is_scale_free():
    """s follows Adam on ∂/∂s [exp(-s)L + s] = 1 - exp(-s)L (a numpy port, float64), so a step
    moves s by about lr whatever L: a loss of 1e5 does not throw s to ~1000 (λ = exp(-1000) = 0)
    as the SGD step lr·(L - 1) did."""
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    w = wt.get_weighting("uncertainty", 3, lr=lr)
    update = jax.jit(w.update)
    state = w.init(3)
    s, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
    rng = np.random.default_rng(5)
    for k in range(1, 41):
        losses = np.array([1e5, 0.2, 3.0]) * rng.uniform(0.8, 1.2, 3)
        state = update(state, _info(losses.astype(np.float32), step=k - 1))
        g = 1.0 - np.exp(-s) * losses
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        step = lr * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
        s = s - step
        np.testing.assert_allclose(state["log_var"], s, rtol=1e-5, atol=1e-6)
        assert np.all(np.abs(step) < 1.1 * lr)  # about lr per step, whatever the loss scale
    assert 1.5 < s[0] < 2.0  # 40 steps of ~lr towards log(1e5) = 11.5, not past it
    lam = np.asarray(w.weights(state, jnp.ones(3), KEY))
    np.testing.assert_allclose(lam, np.exp(-s), rtol=1e-5)


def _gradnorm_run(norms, losses_seq, lr=1e-3, alpha=1.5, n=3000):
    t = len(norms)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(40, t)))
    jac = (q.T * np.asarray(norms)[:, None]).astype(np.float32)  # fixed last-layer grads
    w = wt.get_weighting("gradnorm", t, lr=lr, alpha=alpha)
    infos = wt.StepInfo(
        losses=jnp.asarray(losses_seq(np.arange(n)), jnp.float32),
        next_losses=None,
        jacobian=jnp.tile(jnp.asarray(jac), (n, 1, 1)),
        step=jnp.arange(n, dtype=jnp.int32),
        key=jax.random.split(KEY, n),
        epoch_end=jnp.zeros(n, bool),
    )
    state = _run_updates(w, w.init(t), infos)
    weights = np.asarray(w.weights(state, infos.losses[-1], KEY))
    return weights, weights * np.asarray(norms)


def test_gradnorm_equalises_weighted_gradient_norms():
    # Equal loss ratios (r_i = 1): the fixed point is w_i |g_i| = mean_j w_j |g_j| for all i.
    norms = [1.0, 4.0, 10.0]
    weights, g = _gradnorm_run(norms, lambda s: np.outer(0.999**s, [1.0, 2.0, 3.0]), lr=2e-3)
    np.testing.assert_allclose(weights.sum(), 3.0, rtol=1e-5)
    np.testing.assert_allclose(g, g.mean(), rtol=0.05)
    assert np.ptp(g) / g.mean() < 0.05  # started at ratios 1 : 4 : 10


def test_gradnorm_follows_inverse_training_rate():
    # L_1 stays, L_2 halves after step 0: r = (4/3, 2/3), targets mean(G) r^1.5 = (1.54, 0.54)|g| for
    # equal |g_i| and Σw = 2 (mean(G) = |g|). They sum to more than ΣG, so the fixed point of the
    # update is w_2 at its target (2/3)^1.5 and w_1 = 2 - w_2 below its own: the slow task gains.
    def losses(s):
        out = np.ones((len(s), 2))
        out[s > 0, 1] = 0.5
        return out

    weights, _ = _gradnorm_run([3.0, 3.0], losses, lr=1e-3)
    np.testing.assert_allclose(weights, [2 - (2 / 3) ** 1.5, (2 / 3) ** 1.5], rtol=0.01)


def test_dwa_matches_formula():
    rng = np.random.default_rng(1)
    seq = rng.uniform(0.5, 2.0, size=(6, 3)).astype(np.float32)
    w = wt.get_weighting("dwa", 3, temperature=2.0, period=1)  # step-level ratios
    state = w.init(3)
    weights, update = jax.jit(w.weights), jax.jit(w.update)
    for k, losses in enumerate(seq):
        lam = np.asarray(weights(state, jnp.asarray(losses), KEY))
        if k < 2:
            np.testing.assert_allclose(lam, np.ones(3))
        else:
            r = seq[k - 1] / seq[k - 2]
            ref = 3 * np.exp(r / 2.0) / np.exp(r / 2.0).sum()
            np.testing.assert_allclose(lam, ref, rtol=1e-5)
        state = update(state, _info(losses, step=k))


def test_dwa_period_averages():
    rng = np.random.default_rng(2)
    seq = rng.uniform(0.5, 2.0, size=(6, 2)).astype(np.float32)
    w = wt.get_weighting("dwa", 2, temperature=1.5, period=3)
    state = w.init(2)
    for k, losses in enumerate(seq):
        state = w.update(state, _info(losses, step=k))
    r = seq[3:].mean(0) / seq[:3].mean(0)
    ref = 2 * np.exp(r / 1.5) / np.exp(r / 1.5).sum()
    np.testing.assert_allclose(w.weights(state, jnp.ones(2), KEY), ref, rtol=1e-5)


def _dwa_numpy(epoch_means, temperature):
    """LibMTL's DWA (weighting/DWA.py): λ = T softmax(w/τ), w = L̄(e-1) / L̄(e-2) from the
    per-epoch mean losses, 1 for the first two epochs."""
    t = epoch_means.shape[1]
    out = []
    for e in range(len(epoch_means) + 1):
        if e < 2:
            out.append(np.ones(t))
        else:
            r = epoch_means[e - 1] / epoch_means[e - 2]
            out.append(t * np.exp(r / temperature) / np.exp(r / temperature).sum())
    return np.asarray(out)


def test_dwa_by_default_weighs_by_epoch_mean_losses_as_libmtl():
    """The default period is the epoch: every step of epoch e uses λ from the mean losses of
    epochs e-1 and e-2, also when fit runs an epoch in chunks (save_every) that end mid-epoch."""
    from mtl.data import synthetic
    from mtl.data.batching import Dataset, epoch_batches
    from mtl.models import build_model
    from mtl.runner import fit
    from mtl.train import Stage, TrainConfig, Trainer

    f, l, fs, ts = synthetic.recsys(n=320, num_users=30, num_items=40, seed=4)
    data = Dataset(f, l, fs, ts)
    model = build_model("shared_bottom", fs, ts, trunk=(8,), tower=(4,))
    tr = Trainer(model, TrainConfig(learning_rate=5e-2, weighting="dwa"))
    st = tr.init(model, seed=0)
    losses, lams = [], []
    for e in range(4):  # one run per epoch of 5 steps
        st, m = tr.run(st, epoch_batches(data, 64, jax.random.key(e)), Stage(1))
        losses.append(np.asarray(m["losses"], np.float64).mean(0))
        lams.append(np.asarray(m["weights"]))
    ref = _dwa_numpy(np.asarray(losses), 2.0)
    for e in range(4):  # every step of epoch e: that epoch's λ
        np.testing.assert_allclose(lams[e], np.tile(ref[e], (5, 1)), rtol=2e-5)
    assert not np.allclose(ref[2], 1.0)  # the ratios moved the weights
    # fit in chunks of 2 steps (5 per epoch): the state holds the last two epochs' mean losses
    res = fit(tr, tr.init(model, seed=0), data, (Stage(3),), batch_size=64, save_every=2)
    means = np.asarray([[h["train_losses"][t.name] for t in ts] for h in res.history])
    w = res.state.weighting
    np.testing.assert_allclose(w["prev"], means[2], rtol=1e-5)
    np.testing.assert_allclose(w["prev2"], means[1], rtol=1e-5)
    assert int(w["periods"]) == 3 and int(w["count"]) == 0
    lam = tr.weighting.weights(w, jnp.ones(3), KEY)
    np.testing.assert_allclose(lam, _dwa_numpy(means, 2.0)[3], rtol=1e-5)


def test_rlw_random_weights():
    w = wt.get_weighting("rlw", 4)
    a = np.asarray(w.weights(w.init(4), jnp.ones(4), jax.random.key(1)))
    b = np.asarray(w.weights(w.init(4), jnp.ones(4), jax.random.key(2)))
    np.testing.assert_allclose(a.sum(), 4.0, rtol=1e-6)
    np.testing.assert_allclose(b.sum(), 4.0, rtol=1e-6)
    assert np.all(a > 0) and not np.allclose(a, b)
    z = np.asarray(jax.random.normal(jax.random.key(1), (4,)))  # λ = T softmax(z), z ~ N(0, I)
    np.testing.assert_allclose(a, 4 * np.exp(z) / np.exp(z).sum(), rtol=1e-5)


def _famo_numpy(xi, m, v, count, losses, next_losses, gamma, lr):
    """FAMO's official update: Adam(weight_decay=γ) on the logits, grad J_softmaxᵀ δ."""
    z = np.exp(xi) / np.exp(xi).sum()
    delta = np.log(losses + 1e-8) - np.log(next_losses + 1e-8)
    jac = np.diag(z) - np.outer(z, z)
    g = jac.T @ delta + gamma * xi
    count += 1
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g**2
    xi = xi - lr * (m / (1 - 0.9**count)) / (np.sqrt(v / (1 - 0.999**count)) + 1e-8)
    return xi, m, v, count


def _famo_weights(xi, losses):
    z = np.exp(xi) / np.exp(xi).sum()
    return (z / losses) / (z / losses).sum()


def test_famo_matches_numpy():
    rng = np.random.default_rng(3)
    w = wt.get_weighting("famo", 3, gamma=0.01, lr=0.05)
    state = w.init(3)
    xi, m, v, count = np.zeros(3), np.zeros(3), np.zeros(3), 0
    update = jax.jit(w.update)
    for k in range(3):
        losses = rng.uniform(0.5, 2.0, 3).astype(np.float32)
        next_losses = (losses * rng.uniform(0.7, 1.0, 3)).astype(np.float32)
        lam = np.asarray(w.weights(state, jnp.asarray(losses), KEY))
        np.testing.assert_allclose(lam, _famo_weights(xi, losses), rtol=1e-5)
        np.testing.assert_allclose(lam.sum(), 1.0, rtol=1e-6)
        state = update(state, _info(losses, next_losses, step=k))
        xi, m, v, count = _famo_numpy(xi, m, v, count, losses, next_losses, 0.01, 0.05)
        np.testing.assert_allclose(state["xi"], xi, rtol=1e-4, atol=1e-6)
    assert np.any(np.abs(xi) > 0.01)  # the logits moved


def test_needs_and_stop_gradient():
    assert wt.get_weighting("gradnorm", 2).needs == {"jacobian"}
    assert wt.get_weighting("famo", 2).needs == {"next_losses"}
    assert wt.get_weighting("dwa", 2).needs == frozenset()
    for name in wt.WEIGHTINGS:
        w = wt.get_weighting(name, 3)
        state = w.init(3)
        grad = jax.grad(lambda losses, w=w, state=state: jnp.sum(w.weights(state, losses, KEY)))(
            jnp.array([0.5, 1.0, 2.0])
        )
        np.testing.assert_array_equal(grad, 0.0)
        lam = w.weights(state, jnp.array([0.5, 1.0, 2.0]), KEY)
        assert lam.shape == (3,) and np.all(np.isfinite(lam)), name


def test_unknown_names():
    with pytest.raises(ValueError, match="uncertainty"):
        wt.get_weighting("uncertainity", 2)
    with pytest.raises(ValueError, match="'temp'.*'temperature'"):
        wt.get_weighting("dwa", 2, temp=2.0)
    with pytest.raises(ValueError, match="no hyper-parameters"):
        wt.get_weighting("rlw", 2, lr=0.1)


@pytest.mark.parametrize("name", wt.WEIGHTINGS)
def test_state_keeps_its_dtype_under_float64_inputs(name):
    """With jax_enable_x64 and float64 losses / Jacobian, an update returns the state in the
    dtypes init gave it (a scanned carry cannot change dtype)."""
    with jax.enable_x64(True):
        w = wt.get_weighting(name, 3)
        state = w.init(3)
        info = wt.StepInfo(
            losses=jnp.asarray([0.5, 1.0, 2.0], jnp.float64),
            next_losses=jnp.asarray([0.4, 0.9, 1.9], jnp.float64),
            jacobian=jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float64),
            step=jnp.asarray(3, jnp.int32),
            key=KEY,
            epoch_end=jnp.asarray(True),
        )
        for _ in range(2):
            new = w.update(state, info)
            assert jax.tree.structure(new) == jax.tree.structure(state)
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
                assert jnp.asarray(a).dtype == jnp.asarray(b).dtype, name
            state = new


@pytest.mark.parametrize("name", ["uncertainty", "gradnorm", "dwa", "rlw", "famo"])
def test_task_weights_with_a_weighting_that_sets_them_itself_are_refused(name):
    """TrainConfig.weights and TaskSpec.weight are weighting 'fixed''s λ; under another weighting
    they were silently ignored (a task given weight 0 still trained)."""
    import dataclasses

    from mtl.data import synthetic
    from mtl.models import build_model
    from mtl.train import TrainConfig, Trainer

    _, _, fs, ts = synthetic.recsys(n=8, num_users=4, num_items=4, seed=0)
    model = lambda ts: build_model("shared_bottom", fs, ts, trunk=(4,), tower=(2,))
    msg = (
        rf"^weights: {{'click': 0.0, 'like': 5.0, 'rating': 1.0}} \(TrainConfig.weights, else each "
        rf"TaskSpec.weight\) are the task weights of weighting 'fixed'; weighting '{name}' sets "
        r"them itself and would ignore these; drop them \(every weight 1\), or use "
        r"weighting='fixed'$"
    )
    with pytest.raises(ValueError, match=msg):
        Trainer(model(ts), TrainConfig(weighting=name, weights={"click": 0, "like": 5}))
    spec_weighted = [dataclasses.replace(t, weight=w) for t, w in zip(ts, (0.0, 5.0, 1.0))]
    with pytest.raises(ValueError, match=msg):
        Trainer(model(spec_weighted), TrainConfig(weighting=name))
    # weights of 1 say nothing, and 'fixed' takes any weights: the λ it uses are those given
    Trainer(model(ts), TrainConfig(weighting=name, weights={"click": 1.0}))
    tr = Trainer(model(spec_weighted), TrainConfig(weighting="fixed"))
    w = tr.weighting.weights(tr.weighting.init(3), jnp.ones(3), KEY)
    np.testing.assert_array_equal(np.asarray(w), [0.0, 5.0, 1.0])


@pytest.mark.parametrize("name", ["uncertainty", "gradnorm", "rlw", "famo"])  # DWA: as RLW
def test_a_stage_on_some_tasks_leaves_the_other_tasks_weighting_state_alone(name):
    """In a loss without task i's term, i's weighting parameters get no gradient (Kendall's s_i,
    FAMO's ξ_i): on a stage on 'click' and 'like', 'rating''s state entries stay bit-identical,
    and weights normalised over the tasks (RLW: Σλ = n; FAMO: Σλ = 1) are normalised over
    the two. With one task (an alternating step), FAMO and RLW give it λ = 1. Before, FAMO's λ of
    a lone training task fell 0.48 -> 0.19 in 40 steps, as if the idle tasks failed to improve."""
    from mtl.data import synthetic
    from mtl.data.batching import Dataset, epoch_batches
    from mtl.models import build_model
    from mtl.train import Stage, TrainConfig, Trainer

    f, l, fs, ts = synthetic.recsys(n=320, num_users=30, num_items=40, seed=4)
    data = Dataset(f, l, fs, ts)
    model = build_model("shared_bottom", fs, ts, trunk=(8,), tower=(4,))
    tr = Trainer(model, TrainConfig(learning_rate=5e-2, weighting=name))
    st = tr.init(model, seed=0)
    before = jax.tree.map(np.asarray, st.weighting)
    batches = epoch_batches(data, 32, jax.random.key(0))  # 10 steps
    st, m = tr.run(st, batches, Stage(1, tasks=("click", "like")))
    after = jax.tree.map(np.asarray, st.weighting)
    trained = {  # the per-task parameters of each weighting and their optimizer state
        "uncertainty": ("log_var", "m", "v", "count"),
        "gradnorm": ("w",),  # (loss0 records every task's first loss, as its name says)
        "famo": ("xi", "m", "v", "count"),
    }
    for k in trained.get(name, ()):
        np.testing.assert_array_equal(after[k][2], before[k][2])
        assert not np.array_equal(after[k][:2], before[k][:2])  # the active ones moved
    lam = np.asarray(m["weights"])
    np.testing.assert_array_equal(lam[:, 2], 0.0)
    sums = {"rlw": 2.0, "famo": 1.0}
    if name in sums:
        np.testing.assert_allclose(lam.sum(1), sums[name], rtol=1e-5)
    if name in ("famo", "rlw"):
        _, m1 = tr.run(st, batches, Stage(1, tasks=("like",)))
        np.testing.assert_allclose(np.asarray(m1["weights"])[:, 1], 1.0, rtol=1e-6)


def test_dwa_closes_an_epoch_whose_last_step_is_skipped():
    """nan_policy='skip': a non-finite step adds no loss, but when it is the last of its epoch the
    epoch still ends there. Before, the whole weighting state was rolled back with the step, and
    DWA merged that epoch with the next (periods 0, count 3 after epoch 0)."""
    from mtl.data import synthetic
    from mtl.data.batching import Dataset, epoch_batches
    from mtl.models import build_model
    from mtl.train import Stage, TrainConfig, Trainer

    f, l, fs, ts = synthetic.recsys(n=128, num_users=30, num_items=40, seed=4)
    data = Dataset(f, l, fs, ts)
    model = build_model("shared_bottom", fs, ts, trunk=(8,), tower=(4,))
    tr = Trainer(model, TrainConfig(learning_rate=1e-2, nan_policy="skip", weighting="dwa"))
    b = jax.tree.map(np.array, epoch_batches(data, 32, jax.random.key(0)))  # 4 steps
    name = next(t.name for t in ts if t.kind == "regression")
    b["labels"][name][3, 0] = np.nan  # the epoch's last step: a NaN loss
    st, m = tr.run(tr.init(model, seed=0), b, Stage(1))
    finite = np.asarray(m["finite"])
    assert finite.tolist() == [True, True, True, False]
    w = jax.device_get(st.weighting)
    losses = np.asarray(m["losses"], np.float64)[:3].mean(0)  # the finite steps' mean (numpy)
    assert int(w["periods"]) == 1 and int(w["count"]) == 0
    np.testing.assert_allclose(w["prev"], losses, rtol=1e-6)
    np.testing.assert_array_equal(w["total"], 0.0)
