"""Acceptance tests of the mixture, cross-stitch, ESMM and two-tower models against independent
references: hand-counted parameters, numpy forward passes, weight-tied equivalences, numpy top-K."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import partition
from mtl.data import synthetic
from mtl.losses import task_loss
from mtl.models import MODELS, build_model
from mtl.models.esmm import product_logit
from mtl.models.two_tower import top_k
from mtl.spec import TaskSpec

# Numeric and training tests use one width everywhere (D = W) so that models share parameter
# shapes: eager initialisation compiles once per shape, which dominates the runtime on CPU.
D = W = 8
MMOE_FEATS, MMOE_TASKS = synthetic.mmoe_specs(D)
SMALL = {
    "mmoe": dict(num_experts=3, expert=(W, W), tower=(W,)),
    "omoe": dict(num_experts=3, expert=(W, W), tower=(W,)),
    "cgc": dict(num_task_experts=2, num_shared_experts=1, expert=(W,), tower=(W,)),
    "ple": dict(num_levels=2, num_task_experts=2, num_shared_experts=1, expert=(W,), tower=(W,)),
    "cross_stitch": dict(hidden=(W, W)),
    "esmm": dict(tower=(W,)),
    "two_tower": dict(embed_dim=W, rating=(W, W)),
}
ESMM_TASKS = (TaskSpec("ctr", "binary"), TaskSpec("ctcvr", "binary"))
TT_TASKS = (TaskSpec("rating", "regression"), TaskSpec("retrieval", "retrieval"))
TT_SIDES = {"user_features": ("user_id", "age"), "item_features": ("item_id", "genres")}


def n_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count(name: str, features, tasks, **kw) -> int:
    """Parameters of a model built abstractly (shapes only: no initialisation compute)."""
    return n_params(nnx.eval_shape(lambda: build_model(name, features, tasks, **kw)))


def arr(v) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def relu(x):
    return np.maximum(x, 0.0)


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_mlp(x, mlp) -> np.ndarray:
    """relu(x K + b) per layer of an mtl.models.base.MLP, in float64."""
    for layer in mlp.layers:
        x = relu(x @ arr(layer.kernel) + arr(layer.bias))
    return x


def np_narrow(x, lin) -> np.ndarray:
    """A head or gate (``mtl.models.base.NarrowLinear``): its kernel is stored [out, in]."""
    y = x @ arr(lin.kernel).T
    return y + arr(lin.bias) if lin.bias is not None else y


def np_expert(x, bank, *index) -> np.ndarray:
    """One expert of an ExpertBank (its weights sliced at ``index``) applied alone, in float64."""
    for layer in bank.layers:
        x = relu(x @ arr(layer.kernel)[index] + arr(layer.bias)[index])
    return x


def dense_data(n: int = 8, seed: int = 0):
    x, y = synthetic.mmoe_tasks(n, dim=D, seed=seed)
    return {"x": x}, {"t1": y[:, 0], "t2": y[:, 1]}


def recsys_data(n: int = 256):
    feats, labels, fspecs, _ = synthetic.recsys(n, num_users=32, num_items=32, seed=0)
    esmm = {"ctr": labels["click"], "ctcvr": labels["click"] * labels["like"]}
    tt = {"rating": labels["rating"], "retrieval": feats["item_id"]}
    return feats, fspecs, esmm, tt


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol
    )


# ---------------------------------------------------------------- parameter counts
def test_parameter_counts_match_hand_formulas():
    assert set(SMALL) <= set(MODELS)
    T, D = 2, 12
    feats, tasks = synthetic.mmoe_specs(D)
    # MMoE: E experts D→6→4, per-task gates D×E (+E with bias), towers 4→3, heads 3→1
    E, h1, h2, t = 3, 6, 4, 3
    experts = E * (D * h1 + h1 + h1 * h2 + h2)
    towers_heads = T * (h2 * t + t) + T * (t + 1)
    kw = dict(num_experts=E, expert=(h1, h2), tower=(t,))
    assert count("mmoe", feats, tasks, **kw) == (experts + T * D * E + towers_heads)
    assert (
        count("mmoe", feats, tasks, gate_bias=True, **kw)
        == experts + T * (D * E + E) + towers_heads
    )
    assert count("omoe", feats, tasks, **kw) == (experts + D * E + towers_heads)

    # PLE, 2 levels: M task experts each, S shared, experts width H, gates over M+S (and T·M+S)
    M, S, H = 2, 1, 5
    level0 = (S + T * M) * (D * H + H) + T * D * (M + S) + D * (T * M + S)
    level1 = (S + T * M) * (H * H + H) + T * H * (M + S)
    tail = T * (H * t + t) + T * (t + 1)
    kw = dict(num_task_experts=M, num_shared_experts=S, expert=(H,), tower=(t,))
    ple = count("ple", feats, tasks, num_levels=2, **kw)
    assert ple == level0 + level1 + tail
    assert count("cgc", feats, tasks, **kw) == level0 - D * (T * M + S) + tail

    # Cross-stitch: T columns D→6→4, one T×T unit per layer, towers 4→3, heads 3→1
    cs = count("cross_stitch", feats, tasks, hidden=(6, 4), tower=(3,))
    cols = T * (D * 6 + 6 + 6 * 4 + 4)
    assert cs == cols + 2 * T * T + T * (4 * 3 + 3) + T * (3 + 1)
    assert count("cross_stitch", feats, tasks, hidden=(6, 4)) == cols + 2 * T * T + T * (4 + 1)

    # recsys features: user_id 200×16, item_id 300×16, age 7×4, genres (multihot) 8×4
    fspecs = synthetic.recsys(8)[2]
    tables = 200 * 16 + 300 * 16 + 7 * 4 + 8 * 4
    width = 16 + 16 + 4 + 4
    esmm = count("esmm", fspecs, ESMM_TASKS, tower=(10, 6))
    assert esmm == tables + 2 * (width * 10 + 10 + 10 * 6 + 6) + 2 * (6 + 1)

    # Two-tower: tables, projections to 32, rating MLP 64→256→128 and head 128→1
    tt = count("two_tower", fspecs, TT_TASKS, **TT_SIDES)
    user, item = 200 * 16 + 7 * 4 + (20 * 32 + 32), 300 * 16 + 8 * 4 + (20 * 32 + 32)
    rating = 64 * 256 + 256 + 256 * 128 + 128 + 128 + 1
    assert tt == user + item + rating


# ---------------------------------------------------------------- numpy references
@pytest.mark.parametrize("use_bias", [True, False])
def test_narrow_linear_is_nnx_linear_with_its_kernel_stored_out_by_in(use_bias):
    """Heads and gates start from nnx.Linear's values (kernel transposed), and their outputs and
    gradients are nnx.Linear's, the kernel's gradient transposed too."""
    from mtl.models.base import NarrowLinear

    head = NarrowLinear(6, 5, use_bias=use_bias, rngs=nnx.Rngs(4))
    lin = nnx.Linear(6, 5, use_bias=use_bias, rngs=nnx.Rngs(4))
    assert head.kernel.shape == (5, 6)
    np.testing.assert_array_equal(arr(head.kernel).T, arr(lin.kernel))
    x = jax.random.normal(jax.random.key(0), (7, 6))
    y = jax.random.normal(jax.random.key(1), (7, 5))
    close(head(x), lin(x), 1e-6)
    close(head(x), np_narrow(np.asarray(x, np.float64), head), 1e-6)
    grad = lambda m: nnx.grad(lambda m: jnp.sum((m(x) - y) ** 2))(m)
    gh, gl = grad(head), grad(lin)
    close(gh["kernel"][...].T, gl["kernel"][...], 1e-6)
    if use_bias:
        close(gh["bias"][...], gl["bias"][...], 1e-6)
    else:
        assert head.bias is None


def test_mmoe_matches_numpy_reference_and_gates_sum_to_one():
    feats, _ = dense_data(8)
    model = build_model("mmoe", MMOE_FEATS, MMOE_TASKS, **SMALL["mmoe"])
    preds, aux = model(feats)
    x = feats["x"].astype(np.float64)
    experts_BxExH = np.stack([np_expert(x, model.experts, e) for e in range(3)], axis=1)
    for t in ("t1", "t2"):
        gate_BxE = softmax(np_narrow(x, model.gates[t]))
        mixed_BxH = np.einsum("be,beh->bh", gate_BxE, experts_BxExH)
        y_B = np_narrow(np_mlp(mixed_BxH, model.towers[t]), model.heads[t])[:, 0]
        close(preds[t], y_B)
        close(aux["gates"][t], gate_BxE)
        close(np.sum(aux["gates"][t], axis=-1), np.ones(8))


def test_ple_matches_numpy_reference_and_gates_sum_to_one():
    feats, _ = dense_data(8)
    M, S, T = 2, 1, 2
    model = build_model("ple", MMOE_FEATS, MMOE_TASKS, **SMALL["ple"])
    preds, aux = model(feats)
    x = feats["x"].astype(np.float64)
    task_in, shared_in = [x, x], x
    names = ("t1", "t2")
    for l in range(2):
        own = [[np_expert(task_in[k], model.columns[l], k, m) for m in range(M)] for k in range(T)]
        shared = [np_expert(shared_in, model.experts[l], s) for s in range(S)]
        new = []
        for k, t in enumerate(names):
            g = softmax(np_narrow(task_in[k], model.gates[t][l]))
            if l == 1:
                close(aux["gates"][t], g)
                close(np.sum(aux["gates"][t], -1), np.ones(8))
            new.append(sum(g[:, i : i + 1] * f for i, f in enumerate(own[k] + shared)))
        if l == 0:
            g = softmax(np_narrow(shared_in, model.shared_gates[0]))
            every = [f for fs in own for f in fs] + shared
            shared_in = sum(g[:, i : i + 1] * f for i, f in enumerate(every))
        task_in = new
    for k, t in enumerate(names):
        y = np_narrow(np_mlp(task_in[k], model.towers[t]), model.heads[t])[:, 0]
        close(preds[t], y)


def test_cross_stitch_matches_numpy_and_identity_units_give_independent_columns():
    feats, _ = dense_data(8)
    x = feats["x"].astype(np.float64)
    # identity units: each task's output is its own column run alone
    kw = SMALL["cross_stitch"]
    model = build_model("cross_stitch", MMOE_FEATS, MMOE_TASKS, stitch_self=1.0, **kw)
    close(arr(model.stitch), np.broadcast_to(np.eye(2), (2, 2, 2)), 0)
    preds, _ = model(feats)
    for k, t in enumerate(("t1", "t2")):
        h = x
        for layer in model.columns:
            h = relu(h @ arr(layer.kernel)[k] + arr(layer.bias)[k])
        close(preds[t], np_narrow(h, model.heads[t])[:, 0])
    # paper init (0.9 / 0.1); then asymmetric units against a numpy forward pass with the mixing
    model = build_model("cross_stitch", MMOE_FEATS, MMOE_TASKS, tower=(W,), **kw)
    close(arr(model.stitch)[0], [[0.9, 0.1], [0.1, 0.9]], 1e-7)
    model.stitch[...] = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 2, 2)), jnp.float32)
    preds, _ = model(feats)
    hs = [x, x]
    for l, layer in enumerate(model.columns):
        outs = [relu(hs[k] @ arr(layer.kernel)[k] + arr(layer.bias)[k]) for k in range(2)]
        a = arr(model.stitch)[l]
        hs = [a[k, 0] * outs[0] + a[k, 1] * outs[1] for k in range(2)]
    for k, t in enumerate(("t1", "t2")):
        close(preds[t], np_narrow(np_mlp(hs[k], model.towers[t]), model.heads[t])[:, 0])
    # three tasks: rows of the init sum to 1, off-diagonal (1 − 0.9)/2
    tasks3 = (*MMOE_TASKS, TaskSpec("t3", "regression"))
    a3 = arr(build_model("cross_stitch", MMOE_FEATS, tasks3).stitch)[0]
    close(a3, np.full((3, 3), 0.05) + np.eye(3) * 0.85, 1e-7)


# ---------------------------------------------------------------- weight-tied equivalences
def test_omoe_equals_mmoe_with_tied_gates():
    feats, _ = dense_data(8)
    omoe = build_model("omoe", MMOE_FEATS, MMOE_TASKS, seed=1, **SMALL["omoe"])
    mmoe = build_model("mmoe", MMOE_FEATS, MMOE_TASKS, seed=2, **SMALL["mmoe"])
    nnx.update(mmoe.experts, nnx.state(omoe.experts))
    for t in ("t1", "t2"):
        nnx.update(mmoe.gates[t], nnx.state(omoe.gate))
        nnx.update(mmoe.towers[t], nnx.state(omoe.towers[t]))
        nnx.update(mmoe.heads[t], nnx.state(omoe.heads[t]))
    (po, ao), (pm, am) = omoe(feats), mmoe(feats)
    for t in ("t1", "t2"):
        close(po[t], pm[t])
        close(ao["gates"][t], am["gates"][t])
    close(ao["gates"]["t1"], ao["gates"]["t2"])  # one gate for both tasks


def test_cgc_without_task_experts_equals_mmoe_over_shared_experts():
    feats, _ = dense_data(8)
    cgc = build_model(
        "cgc", MMOE_FEATS, MMOE_TASKS, seed=1, num_task_experts=0, num_shared_experts=3,
        expert=(W, W), tower=(W,),
    )  # fmt: skip
    mmoe = build_model("mmoe", MMOE_FEATS, MMOE_TASKS, seed=2, **SMALL["mmoe"])
    assert n_params(cgc) == n_params(mmoe)
    nnx.update(mmoe.experts, nnx.state(cgc.experts[0]))
    for t in ("t1", "t2"):
        nnx.update(mmoe.gates[t], nnx.state(cgc.gates[t][0]))
        nnx.update(mmoe.towers[t], nnx.state(cgc.towers[t]))
        nnx.update(mmoe.heads[t], nnx.state(cgc.heads[t]))
    (pc, ac), (pm, am) = cgc(feats), mmoe(feats)
    for t in ("t1", "t2"):
        close(pc[t], pm[t])
        close(ac["gates"][t], am["gates"][t])


# ---------------------------------------------------------------- ESMM
def test_esmm_ctcvr_is_ctr_times_cvr_and_losses_follow():
    feats, fspecs, labels, _ = recsys_data(64)
    model = build_model("esmm", fspecs, ESMM_TASKS, **SMALL["esmm"])
    preds, aux = model(feats)
    pctr = 1.0 / (1.0 + np.exp(-np.asarray(preds["ctr"], np.float64)))
    pctcvr = 1.0 / (1.0 + np.exp(-np.asarray(preds["ctcvr"], np.float64)))
    close(aux["pctr"], pctr)
    close(pctcvr, pctr * np.asarray(aux["pcvr"], np.float64))
    assert np.all((pctcvr >= 0) & (pctcvr <= 1))
    # the standard BCE on the ctcvr logit is −[y log(pCTR·pCVR) + (1 − y) log(1 − pCTR·pCVR)]
    y = labels["ctcvr"].astype(np.float64)
    p = pctr * np.asarray(aux["pcvr"], np.float64)
    want = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
    close(task_loss("binary", preds["ctcvr"], labels["ctcvr"]), want, 1e-5)

    # the logit: float64 reference where 1 − p is representable, asymptotics and finite gradients
    a, b = np.meshgrid(np.linspace(-12, 12, 13), np.linspace(-12, 12, 13))
    p64 = 1 / (1 + np.exp(-a)) / (1 + np.exp(-b))
    close(product_logit(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)),
          np.log(p64) - np.log1p(-p64), 1e-4)  # fmt: skip
    big = product_logit(jnp.float32(100.0), jnp.float32(100.0))
    close(big, 100.0 - np.log(2.0), 1e-5)  # 1 − p ≈ e^{−a} + e^{−b}
    close(product_logit(jnp.float32(-100.0), jnp.float32(-90.0)), -190.0, 1e-5)  # p ≈ e^{a+b}
    ext = jnp.asarray([-200.0, -30.0, 0.0, 30.0, 200.0])
    grid_a, grid_b = jnp.meshgrid(ext, ext)
    g = jax.grad(lambda u, v: jnp.sum(product_logit(u, v)), argnums=(0, 1))(grid_a, grid_b)
    assert np.isfinite(np.asarray(product_logit(grid_a, grid_b))).all()
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


# ---------------------------------------------------------------- two-tower
def test_two_tower_logits_and_top_k_match_numpy():
    feats, fspecs, _, _ = recsys_data(16)
    model = build_model("two_tower", fspecs, TT_TASKS, **SMALL["two_tower"], **TT_SIDES)
    preds, _ = model(feats)
    rep = model.represent(feats)
    assert rep["user"].shape == (16, 8) and preds["retrieval"].shape == (16, 16)
    close(preds["retrieval"], np.asarray(rep["user"]) @ np.asarray(rep["item"]).T)
    close(model.user_embeddings(feats), rep["user"])
    all_items = {"item_id": np.arange(32, dtype=np.int32), "genres": np.eye(8)[np.arange(32) % 8]}
    items_NxD = model.item_embeddings(all_items)
    assert items_NxD.shape == (32, W)
    scores, ids = top_k(rep["user"], items_NxD, 10)
    full = np.asarray(rep["user"], np.float64) @ np.asarray(items_NxD, np.float64).T
    want_ids = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    close(scores, np.take_along_axis(full, want_ids, 1), 1e-5)
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((5, 4)), rng.standard_normal((50, 4))
    np.testing.assert_array_equal(top_k(u, v, 7)[1], np.argsort(-(u @ v.T), axis=1)[:, :7])
    with pytest.raises(ValueError, match="k: 51"):
        top_k(u, v, 51)


def test_shared_bottom_fused_towers_match_numpy_and_per_tower_path():
    """The fused first tower layer: outputs vs a float64 numpy forward; outputs, dropout masks
    and parameter gradients equal to the per-tower path; the trainer unfuses for aggregators."""
    from mtl.train import TrainConfig, Trainer

    feats, labels = dense_data(16)
    tasks = MMOE_TASKS + (TaskSpec("t3", "multilabel", 3),)
    labels = {**labels, "t3": (np.arange(48).reshape(16, 3) % 2).astype(np.float32)}
    model = build_model("shared_bottom", MMOE_FEATS, tasks, trunk=(W,), tower=(W, W))
    model.eval()
    preds, _ = model(feats)
    h = np_mlp(np.asarray(feats["x"], np.float64), model.trunk)
    for t in tasks:
        want = np_narrow(np_mlp(h, model.towers[t.name]), model.heads[t.name])
        close(preds[t.name], want[:, 0] if t.size == 1 else want)

    def outputs_and_grads(fused, dropout_key):
        model.fuse_towers = fused
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            preds, _ = nnx.merge(graphdef, p, rest)(feats, rngs=nnx.Rngs(dropout=dropout_key))
            return sum(task_loss(t.kind, preds[t.name], labels[t.name]) for t in tasks), preds

        (_, preds), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return preds, grads

    model = build_model("shared_bottom", MMOE_FEATS, tasks, trunk=(W,), tower=(W, W), dropout=0.3)
    model.train()
    (pf, gf), (ps, gs) = outputs_and_grads(True, 3), outputs_and_grads(False, 3)
    for t in tasks:
        close(pf[t.name], ps[t.name], 1e-6)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gs), strict=True):
        close(a, b, 1e-6)
    model.fuse_towers = True
    plain = Trainer(model, TrainConfig()).graphdef
    apart = Trainer(model, TrainConfig(aggregator="mgda")).graphdef
    assert plain != apart
    assert Trainer(model, TrainConfig(weighting="gradnorm")).graphdef == apart  # per-task rows too
    assert model.fuse_towers  # restored after the aggregator trainer's split


def test_shared_bottom_decode_each_rows_match_per_task_autodiff():
    """decode_each (fused first tower layers, custom VJP): task t's prediction reads only its copy
    of rep, so the gradient w.r.t. copy t is w_t ∇_rep L_t, taken independently with jax.grad of
    task t's loss through the plain decode; predictions and the parameter gradient equal the plain
    decode's (same dropout masks); the generic MTLModel.decode_each agrees too."""
    from mtl.models.base import MTLModel

    feats, labels = dense_data(16)
    tasks = MMOE_TASKS + (TaskSpec("t3", "multilabel", 3),)
    labels = {**labels, "t3": (np.arange(48).reshape(16, 3) % 2).astype(np.float32)}
    model = build_model("shared_bottom", MMOE_FEATS, tasks, trunk=(W,), tower=(W, W), dropout=0.3)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rep = model.represent(feats, nnx.Rngs(dropout=1))
    w = np.array([0.7, 1.3, 2.0], np.float32)
    rngs = lambda: nnx.Rngs(dropout=5)

    def per_task(preds):
        return jnp.stack([task_loss(t.kind, preds[t.name], labels[t.name]) for t in tasks])

    def each(p, reps, decode_each):
        return per_task(decode_each(nnx.merge(graphdef, p, rest), reps, rngs())[0])

    def plain(p, r):
        return per_task(nnx.merge(graphdef, p, rest).decode(r, rngs())[0])

    want_rows = [w[i] * jax.grad(lambda r, i=i: plain(params, r)[i])(rep) for i in range(3)]
    want_g = jax.grad(lambda p: jnp.dot(jnp.asarray(w), plain(p, rep)))(params)
    for decode_each in (type(model).decode_each, MTLModel.decode_each):
        fn = lambda p, reps, d=decode_each: each(p, reps, d)
        losses, vjp = jax.vjp(fn, params, (rep,) * 3)
        close(losses, plain(params, rep), 1e-6)
        g, rows = vjp(jnp.asarray(w))
        for got, want in zip(rows, want_rows, strict=True):
            close(got, want, 1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g), strict=True):
            close(a, b, 1e-6)


# ---------------------------------------------------------------- contract and bad input
@pytest.mark.parametrize("name", ["mmoe", "omoe", "cgc", "ple", "cross_stitch"])
def test_contract_and_dropout(name):
    feats, _ = dense_data(8)
    model = build_model(name, MMOE_FEATS, MMOE_TASKS, dropout=0.5, **SMALL[name])
    model.eval()
    p1, _ = model(feats)
    p2, _ = model.decode(model.represent(feats))
    for t in ("t1", "t2"):
        close(p1[t], p2[t], 0)
    model.train()
    p3, _ = model(feats, rngs=nnx.Rngs(dropout=0))
    assert any(not np.allclose(p1[t], p3[t]) for t in ("t1", "t2"))


def test_bad_input_names_field_value_and_fix():
    f, t = MMOE_FEATS, MMOE_TASKS
    cases = [
        (lambda: build_model("mmoe", f, t, num_experts=0), "num_experts: 0 .*at least one"),
        (lambda: build_model("omoe", f, t, expert=()), "expert: .*empty"),
        (lambda: build_model("mmoe", f, t, tower=(8, -1)), "tower: -1"),
        (lambda: build_model("ple", f, t, num_levels=0), "num_levels: 0"),
        (
            lambda: build_model("cgc", f, t, num_task_experts=0, num_shared_experts=0),
            "num_shared_experts: 0 and 0",
        ),
        (lambda: build_model("cross_stitch", f, t, stitch_self=1.5), "stitch_self: 1.5"),
        (lambda: build_model("esmm", f, t), "tasks: ESMM needs .*ctr.*TaskSpec"),
    ]
    _, fspecs, _, _ = recsys_data(8)
    cases += [
        (
            lambda: build_model(
                "two_tower", fspecs, TT_TASKS, user_features=("usr_id",), item_features=("item_id",)
            ),  # fmt: skip
            "user_features: unknown value 'usr_id'; did you mean 'user_id'",
        ),
        (
            lambda: build_model("two_tower", fspecs, TT_TASKS[:1], **TT_SIDES),
            "tasks: TwoTower needs exactly one task of kind 'retrieval'",
        ),
    ]
    for make, msg in cases:
        with pytest.raises(ValueError, match=msg):
            make()


# ---------------------------------------------------------------- training
def scanned(features, labels, batch: int) -> dict:
    """[S, B, ...] leaves (n divisible by B), all rows valid."""
    n = len(next(iter(labels.values())))
    S = n // batch
    cut = lambda a: np.asarray(a)[: S * batch].reshape(S, batch, *np.shape(a)[1:])
    return {
        "features": {k: cut(v) for k, v in features.items()},
        "labels": {k: cut(v) for k, v in labels.items()},
        "valid": np.ones((S, batch), np.float32),
    }


def small_setup(name: str):
    """(model, batches) with tiny widths on a few hundred synthetic rows."""
    if name in ("esmm", "two_tower"):
        feats, fspecs, esmm_labels, tt_labels = recsys_data(256)
        if name == "esmm":
            model = build_model("esmm", fspecs, ESMM_TASKS, **SMALL["esmm"])
            return model, scanned(feats, esmm_labels, 32)
        model = build_model("two_tower", fspecs, TT_TASKS, **SMALL["two_tower"], **TT_SIDES)
        return model, scanned(feats, tt_labels, 32)
    feats, labels = dense_data(256)
    model = build_model(name, MMOE_FEATS, MMOE_TASKS, **SMALL[name])
    return model, scanned(feats, labels, 32)


def epoch_loss(metrics) -> float:
    """Σ_tasks mean over the epoch's steps of every task's loss (all are computed each step)."""
    return float(np.asarray(metrics["losses"]).mean(0).sum())


@pytest.mark.parametrize(
    "name", ["mmoe", "omoe", "cgc", "ple", "cross_stitch", "esmm", "two_tower"]
)
def test_trains_joint_alternating_staged(name):
    from mtl.train import Stage, TrainConfig, Trainer

    model, batches = small_setup(name)
    trainer = Trainer(model, TrainConfig(learning_rate=1e-2))
    init = trainer.init(model)
    epochs = 8

    def fit(stages):  # run donates its state: start each schedule from a copy
        state, first, last = jax.tree.map(jnp.array, init), None, None
        for stage in stages:
            for _ in range(stage.epochs):
                state, m = trainer.run(state, batches, stage)
                first = epoch_loss(m) if first is None else first
                last = epoch_loss(m)
        assert np.isfinite(last) and not bool(state.halted)
        return state, first, last

    _, first, last = fit([Stage(epochs)])
    assert last < 0.9 * first, ("joint", first, last)
    _, first, last = fit([Stage(epochs, alternating=True)])
    assert last < 0.9 * first, ("alternating", first, last)
    state, first, mid = fit([Stage(epochs)])
    before = jax.tree.map(np.array, state.params)
    heads = Stage(2, trainable=("heads",))
    for _ in range(heads.epochs):
        state, m = trainer.run(state, batches, heads)
    last = epoch_loss(m)
    assert last < 0.9 * first and last <= mid * 1.05, ("staged", first, mid, last)
    for p, a, b in zip(
        partition.paths(before), jax.tree.leaves(before), jax.tree.leaves(state.params)
    ):
        if partition.group_of(p) != "heads":
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=p)


def test_mmoe_representation_feeds_representation_level_aggregation():
    """MGDA-UB style: the aggregator acts on rep = {inputs, experts [B, E, H]}; training still works."""
    from mtl.train import Stage, TrainConfig, Trainer

    model, batches = small_setup("mmoe")
    rep = model.represent({"x": batches["features"]["x"][0]})
    assert rep["experts"].shape == (32, 3, W) and rep["inputs"].shape == (32, D)
    config = TrainConfig(learning_rate=1e-2, aggregator="mgda", aggregate_on="representation")
    trainer = Trainer(model, config)
    state, losses = trainer.init(model), []
    for _ in range(6):
        state, m = trainer.run(state, batches, Stage(1))
        losses.append(epoch_loss(m))
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- partition convention
def test_a_task_named_value_owns_its_tower_and_head():
    """nnx's '.value' attribute is dropped from paths, a task (or module) named 'value' is not."""
    feats, fspecs, _, _ = recsys_data(8)
    tasks = (TaskSpec("value", "binary"), TaskSpec("like", "binary"))
    model = nnx.eval_shape(lambda: build_model("shared_bottom", fspecs, tasks, trunk=(4,)))
    params = nnx.state(model, nnx.Param)
    owners = {p: partition.owner_of(p, ("value", "like")) for p in partition.paths(params)}
    assert {o for p, o in owners.items() if p.startswith(("towers/value/", "heads/value/"))} == {
        "value"
    }
    assert "towers/value/layers/0/kernel" in owners
    shared = jax.tree.leaves(partition.shared_mask(params, ("value", "like")))
    n_shared = sum(x.size for x, m in zip(jax.tree.leaves(params), shared, strict=True) if m)
    renamed = (TaskSpec("click", "binary"), tasks[1])
    other = nnx.state(
        nnx.eval_shape(lambda: build_model("shared_bottom", fspecs, renamed, trunk=(4,))), nnx.Param
    )
    mask = jax.tree.leaves(partition.shared_mask(other, ("click", "like")))
    assert n_shared == sum(x.size for x, m in zip(jax.tree.leaves(other), mask, strict=True) if m)


def test_partition_classifies_parameters_and_alternating_keeps_other_task_bit_identical():
    from mtl.train import Stage, TrainConfig, Trainer

    names = ("t1", "t2")

    def classes(model, tasks=names):
        ps = partition.paths(nnx.state(model, nnx.Param))
        return {p: (partition.group_of(p), partition.owner_of(p, tasks)) for p in ps}

    def by_prefix(cls, prefix):
        return {v for p, v in cls.items() if p.startswith(prefix)}

    models = {n: small_setup(n) for n in ("mmoe", "omoe", "ple", "cross_stitch")}
    c = classes(models["mmoe"][0])
    assert by_prefix(c, "gates/t1") == {("gates", "t1")}
    assert by_prefix(c, "gates/t2") == {("gates", "t2")}
    assert by_prefix(c, "towers/t2") == {("towers", "t2")}
    assert by_prefix(c, "experts") == {("shared", "shared")}
    assert by_prefix(classes(models["omoe"][0]), "gate/") == {("shared", "shared")}
    c = classes(models["ple"][0])
    assert by_prefix(c, "columns") == {("shared", "columns")}  # task experts: one slice per task
    assert by_prefix(c, "experts") | by_prefix(c, "shared_gates") == {("shared", "shared")}
    assert by_prefix(c, "gates/t2") == {("gates", "t2")}
    c = classes(models["cross_stitch"][0])
    assert by_prefix(c, "columns") == {("shared", "columns")}
    assert c["stitch"] == ("shared", "shared")
    feats, fspecs, _, _ = recsys_data(8)
    c = classes(nnx.eval_shape(lambda: build_model("esmm", fspecs, ESMM_TASKS)), ("ctr", "ctcvr"))
    assert by_prefix(c, "encoder/embed") == {("embeddings", "shared")}
    assert by_prefix(c, "towers/ctcvr") == {("towers", "ctcvr")}  # the CVR tower
    tt = nnx.eval_shape(lambda: build_model("two_tower", fspecs, TT_TASKS, **TT_SIDES))
    c = classes(tt, ("rating", "retrieval"))
    assert by_prefix(c, "user_tower/encoder/embed") == {("embeddings", "shared")}
    assert by_prefix(c, "item_tower/out") == {("shared", "shared")}
    assert by_prefix(c, "towers/rating") == {("towers", "rating")}

    # alternating on t1 only: t2's gate, task experts, tower and head stay bit-identical
    for name in ("mmoe", "ple", "cross_stitch"):
        model, batches = models[name]
        trainer = Trainer(model, TrainConfig(learning_rate=1e-2))
        state = trainer.init(model)
        before = jax.tree.map(np.array, state.params)
        state, _ = trainer.run(state, batches, Stage(1, tasks=("t1",), alternating=True))
        after = jax.tree.map(np.asarray, state.params)
        leaves = zip(partition.paths(before), jax.tree.leaves(before), jax.tree.leaves(after))
        for p, a, b in leaves:
            owner = partition.owner_of(p, names)
            if owner == "t2":
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {p}")
            elif owner == "columns":
                np.testing.assert_array_equal(a[1], b[1], err_msg=f"{name} {p}[t2]")
                assert not np.array_equal(a[0], b[0]), f"{name} {p}[t1] did not train"
            else:  # t1's own and the shared parameters move
                assert not np.array_equal(a, b), f"{name} {p} did not train"


def test_two_tower_steps_keep_xla_defaults_on_cpu():
    """A step with a retrieval task (in-batch softmax over [B, B] logits) keeps XLA's defaults
    under the automatic choice; the same step kind without one gets CPU_JOINT_OPTIONS on CPU."""
    from mtl.train import (
        CPU_JOINT_OPTIONS,
        TrainConfig,
        Trainer,
        _xla_refusal,
        default_compiler_options,
    )

    _, fspecs, _, _ = recsys_data(16)
    model = build_model("two_tower", fspecs, TT_TASKS, **SMALL["two_tower"], **TT_SIDES)
    assert Trainer(model, TrainConfig()).compiler_options == {}
    assert default_compiler_options(False, retrieval=True) == {}
    cpu_auto = (
        jax.default_backend() == "cpu" and _xla_refusal(tuple(CPU_JOINT_OPTIONS.items())) is None
    )
    assert default_compiler_options(False) == (CPU_JOINT_OPTIONS if cpu_auto else {})
