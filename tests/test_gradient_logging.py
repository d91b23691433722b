"""Gradient analysis logged during training: it tracks task correlation, lands on the right steps
and equals an independently computed Jacobian's statistics; the notebook helpers of mtl.inspect."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import analysis, partition
from mtl import inspect as mi
from mtl.data import synthetic
from mtl.data.batching import Dataset, epoch_batches
from mtl.experiment import RunDir
from mtl.models import build_model
from mtl.runner import fit
from mtl.train import Stage, TrainConfig, Trainer, make_schedule

DIM = 32
SIZES = dict(trunk=(32,), tower=(8,))


def mmoe_dataset(n: int, correlation: float, seed: int) -> Dataset:
    """The MMoE paper's two regression tasks with label correlation ``correlation``."""
    x, y = synthetic.mmoe_tasks(n, DIM, correlation, seed=seed)
    feats, tasks = synthetic.mmoe_specs(DIM)
    return Dataset({"x": x}, {"t1": y[:, 0], "t2": y[:, 1]}, feats, tasks)


def shared_bottom(seed: int = 0) -> nnx.Module:
    feats, tasks = synthetic.mmoe_specs(DIM)
    return build_model("shared_bottom", feats, tasks, seed=seed, **SIZES)


def test_logged_cosine_increases_with_task_correlation():
    """Mean logged cos(∇_s L_1, ∇_s L_2) over training: p = 0 < p = 0.5 < p = 1 (2 seeds each)."""
    trainer = Trainer(shared_bottom(), TrainConfig(learning_rate=1e-2, log_every=2))
    mean_cos, conflict = {}, {}
    for p in (0.0, 0.5, 1.0):
        cos, rate = [], []
        for seed in (0, 1):
            data = mmoe_dataset(2048, p, seed)
            state = trainer.init(shared_bottom(seed), seed=seed)
            res = fit(
                trainer, state, data, make_schedule("joint", 3), batch_size=128, data_seed=seed
            )
            hist = mi.analysis_history(res.history)
            assert len(hist["cosine_steps"]) == 3 * math.ceil(16 / 2)
            cos.append(hist["cosine_steps"][:, 0, 1].mean())
            rate.append(hist["conflict_rate"][:, 0, 1].mean())
        mean_cos[p], conflict[p] = float(np.mean(cos)), float(np.mean(rate))
    assert mean_cos[0.0] < mean_cos[0.5] < mean_cos[1.0], mean_cos
    assert mean_cos[1.0] - mean_cos[0.0] > 0.2, mean_cos
    assert conflict[1.0] < conflict[0.0], conflict


def _shared_jacobian_cosine(model: nnx.Module, params, batch) -> np.ndarray:
    """cos of jax.jacrev of the per-task MSEs w.r.t. the non-tower, non-head parameters."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    shared = [not p.startswith(("towers", "heads")) for p in partition.paths(params)]
    assert any(shared) and not all(shared)

    def losses(shared_leaves):
        it = iter(shared_leaves)
        full = [next(it) if s else x for x, s in zip(leaves, shared)]
        preds, _ = nnx.merge(graphdef, jax.tree.unflatten(treedef, full), rest)(batch["features"])
        return jnp.stack([jnp.mean((preds[t] - batch["labels"][t]) ** 2) for t in ("t1", "t2")])

    jac = jax.jit(jax.jacrev(losses))([x for x, s in zip(leaves, shared) if s])
    jac_TxP = jnp.concatenate([j.reshape(2, -1) for j in jac], axis=1)
    return np.asarray(analysis.cosine_matrix(jac_TxP))


def test_log_every_k_logs_ceil_s_over_k_steps_and_matches_jacrev():
    data = mmoe_dataset(640, 0.5, seed=3)  # S = 10 batches of 64, no padding
    S, k, batch_size = 10, 3, 64
    model = shared_bottom(seed=3)
    trainer = Trainer(model, TrainConfig(learning_rate=1e-2, log_every=k))
    copy = lambda st: jax.tree.map(jnp.copy, st)  # states are donated to the step
    state0 = trainer.init(model, seed=3)
    train = lambda epochs, save_every=0: fit(
        trainer,
        copy(state0),
        data,
        make_schedule("joint", epochs),
        batch_size=batch_size,
        save_every=save_every,  # 5: each epoch runs as two chunks, the second at phase 5 % 3
    )
    runs = {save_every: train(2, save_every).history for save_every in (0, 5)}
    for history in runs.values():
        assert [len(h["analysis"]["cosine_steps"]) for h in history] == [math.ceil(S / k)] * 2
    for e in range(2):  # chunked epochs log the same positions (0, 3, 6, 9) with the same values
        np.testing.assert_allclose(
            runs[5][e]["analysis"]["cosine_steps"],
            runs[0][e]["analysis"]["cosine_steps"],
            atol=1e-6,
        )
    # the first logged step of epoch 1 runs at the parameters after epoch 0 (10 updates)
    after_epoch0 = train(1).state
    batches = epoch_batches(data.to_device(), batch_size, jax.random.fold_in(jax.random.key(0), 1))
    expected = _shared_jacobian_cosine(
        model, after_epoch0.params, jax.tree.map(lambda x: x[0], batches)
    )
    logged = np.asarray(runs[0][1]["analysis"]["cosine_steps"][0])
    np.testing.assert_allclose(logged, expected, atol=2e-5)
    assert abs(expected[0, 1]) > 1e-3  # a non-trivial value, not two zeros agreeing
    assert not np.allclose(logged, runs[0][0]["analysis"]["cosine_steps"][0], atol=1e-3)


def test_a_chunk_without_a_logged_position_logs_nothing():
    """log_every=3, a chunk of positions 4, 5 of an epoch: no multiple of 3, so nothing logs."""
    data = mmoe_dataset(128, 0.5, seed=0)
    model = shared_bottom()
    trainer = Trainer(model, TrainConfig(learning_rate=1e-2, log_every=3))
    batches = epoch_batches(data.to_device(), 64, jax.random.key(0))  # 2 batches
    state, m = trainer.run(trainer.init(model), batches, Stage(1), start=4)
    assert np.asarray(m["logged"]).tolist() == [False, False]
    assert np.asarray(m["analysis"]["cosine"]).shape == (2, 2, 2)
    assert np.all(np.asarray(m["analysis"]["cosine"]) == 0) and int(state.step) == 2


def test_log_every_zero_logs_nothing():
    data = mmoe_dataset(256, 0.5, seed=0)
    model = shared_bottom()
    trainer = Trainer(model, TrainConfig(learning_rate=1e-2))
    res = fit(trainer, trainer.init(model), data, make_schedule("joint", 1), batch_size=64)
    assert "analysis" not in res.history[0]
    with pytest.raises(ValueError, match="log_every"):
        mi.analysis_history(res.history)


def test_task_affinity_matches_lookahead_by_hand():
    """Row i: one SGD step of the shared params along ∇_s L_i, then 1 − L_j(θ') / L_j(θ)."""
    data = mmoe_dataset(512, 0.5, seed=1)
    model = shared_bottom(seed=1)
    trainer = Trainer(model, TrainConfig(learning_rate=1e-2))
    state = trainer.init(model, seed=1)
    batch = mi.batch_of(data, 256, seed=0)
    lr = 0.05
    z = mi.task_affinity(trainer, state, batch, lr=lr)
    assert z.shape == (2, 2) and np.all(np.isfinite(z))

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    shared = jax.tree.leaves(trainer.shared)

    def losses(params):
        preds, _ = nnx.merge(graphdef, params, rest)(batch["features"])
        return jnp.stack([jnp.mean((preds[t] - batch["labels"][t]) ** 2) for t in ("t1", "t2")])

    z_unit = mi.task_affinity(trainer, state, batch, lr=lr, normalize=True)
    base = losses(state.params)
    for i in range(2):
        g = jax.grad(lambda p, i=i: losses(p)[i])(state.params)
        leaves, treedef = jax.tree.flatten(state.params)
        g_s = [gx if s else None for gx, s in zip(jax.tree.leaves(g), shared)]
        norm = float(np.sqrt(sum(float(jnp.sum(gx**2)) for gx in g_s if gx is not None)))
        for scale, expected in ((lr, z[i]), (lr / norm, z_unit[i])):
            stepped = [x - scale * gx if gx is not None else x for x, gx in zip(leaves, g_s)]
            after = losses(jax.tree.unflatten(treedef, stepped))
            np.testing.assert_allclose(expected, 1 - after / base, rtol=1e-4, atol=1e-6)


def test_gate_usage_of_mmoe_and_error_without_gates():
    data = mmoe_dataset(300, 0.5, seed=2)
    feats, tasks = synthetic.mmoe_specs(DIM)
    mmoe = build_model("mmoe", feats, tasks, num_experts=4, expert=(8,), tower=(4,))
    trainer = Trainer(mmoe, TrainConfig())
    state = trainer.init(mmoe)
    usage = mi.gate_usage(trainer, state, data, batch_size=128)  # 3 batches, 84 padding rows
    assert usage["tasks"] == ("t1", "t2") and usage["mean"].shape == (2, 4)
    np.testing.assert_allclose(usage["mean"].sum(-1), 1.0, rtol=1e-5)
    x = jnp.asarray(data.features["x"])
    _, aux = trainer.model(state)({"x": x})
    gates = np.stack([np.asarray(aux["gates"][t]) for t in ("t1", "t2")])
    np.testing.assert_allclose(usage["mean"], gates.mean(1), rtol=1e-5)
    assert np.all(usage["balance"] <= np.log(4) + 1e-6)

    sb = shared_bottom()
    sb_trainer = Trainer(sb, TrainConfig())
    with pytest.raises(ValueError, match="no aux\\['gates'\\]"):
        mi.gate_usage(sb_trainer, sb_trainer.init(sb), data)


def test_load_run_reads_a_run_directory(tmp_path):
    rd = RunDir(tmp_path / "run", config={"epochs": 2})
    rd.log(
        {"run": "a", "epoch": 0, "train_loss": 1.0, "analysis": {"cosine": [[1, 0.5], [0.5, 1]]}}
    )
    rd.log({"run": "b", "epoch": 0, "train_loss": 2.0})
    rd.log({"run": "a", "epoch": 1, "train_loss": 0.5})
    (rd.path / "results.json").write_text(json.dumps({"dataset": "x", "runs": []}))
    run = mi.load_run(rd.path)
    assert run["config"] == {"epochs": 2}
    assert [r["epoch"] for r in run["metrics"]["a"]] == [0, 1]
    assert run["metrics"]["b"][0]["train_loss"] == 2.0
    assert run["results"]["dataset"] == "x"
    with pytest.raises(FileNotFoundError, match="load_run"):
        mi.load_run(tmp_path / "missing")
