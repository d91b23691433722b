"""Aggregators and weightings inside the train step: exact reductions and falling losses."""

import jax
import numpy as np
import pytest

from mtl import partition
from mtl.aggregation import AGGREGATORS
from mtl.data import synthetic
from mtl.data.batching import Dataset, epoch_batches
from mtl.models import build_model
from mtl.train import Stage, TrainConfig, Trainer
from mtl.weighting import WEIGHTINGS

SIZES = dict(trunk=(16,), tower=(8,))


@pytest.fixture(scope="module")
def data():
    f, l, fs, ts = synthetic.recsys(n=384, num_users=30, num_items=40, seed=2)
    return Dataset(f, l, fs, ts)


def host_params(state):
    return dict(
        zip(
            partition.paths(state.params),
            [np.array(x) for x in jax.tree.leaves(state.params)],
            strict=True,
        )
    )


def sgd_step(data, stage=None, steps=1, **cfg):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(optimizer="sgd", learning_rate=0.1, **cfg))
    st = tr.init(model)
    b = jax.tree.map(lambda x: x[:steps], epoch_batches(data, 128, jax.random.key(0)))
    before = host_params(st)
    st, _ = tr.run(st, b, stage or Stage(1))
    return tr, before, host_params(st)


def test_sum_aggregator_equals_plain_joint_step(data):
    """Σ_t λ_t ∇L_t on shared params via the Jacobian = the single-VJP joint gradient."""
    lam = {"click": 0.5, "like": 1.5, "rating": 0.2}
    _, before, plain = sgd_step(data, weights=lam)
    _, _, agg = sgd_step(data, weights=lam, aggregator="sum")
    for k in plain:
        np.testing.assert_allclose(agg[k], plain[k], rtol=1e-5, atol=1e-7)
        assert not np.array_equal(before[k], plain[k])


def test_mean_aggregator_scales_shared_gradient_only(data):
    """mean = (1/T)·sum on shared leaves; task-owned leaves keep their own full gradient."""
    tr, before, plain = sgd_step(data)
    _, _, agg = sgd_step(data, aggregator="mean")
    T = len(tr.names)
    for k in plain:
        step_plain, step_agg = plain[k] - before[k], agg[k] - before[k]
        scale = 1.0 / T if partition.owner_of(k, tr.names) == "shared" else 1.0
        np.testing.assert_allclose(step_agg, scale * step_plain, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("aggregate_on", ["params", "representation"])
def test_aggregators_see_only_the_stage_tasks(data, aggregate_on):
    """On a stage of 2 of the 3 tasks, mean = (1/2)·sum of their rows (not 1/3 with a zero row),
    and MGDA moves the shared parameters (the min-norm point of a hull holding 0 would be 0)."""
    stage = Stage(1, tasks=("click", "like"))
    tr, before, plain = sgd_step(data, stage)
    _, _, agg = sgd_step(data, stage, aggregator="mean", aggregate_on=aggregate_on)
    _, _, mgda = sgd_step(data, stage, aggregator="mgda", aggregate_on=aggregate_on)
    shared = [k for k in plain if partition.owner_of(k, tr.names) == "shared"]
    for k in plain:
        scale = 0.5 if k in shared else 1.0
        step_plain, step_agg = plain[k] - before[k], agg[k] - before[k]
        np.testing.assert_allclose(step_agg, scale * step_plain, rtol=1e-4, atol=1e-7, err_msg=k)
    assert all(np.abs(mgda[k] - before[k]).max() > 1e-6 for k in shared)


@pytest.mark.parametrize("name", ["mgda", "upgrad", "mean", "pcgrad", "gradvac"])
def test_alternating_steps_aggregate_the_picked_task_alone(data, name):
    """An alternating step trains one task: each of these aggregators returns a single row as it
    is, so the run equals the one without an aggregator."""
    stage = Stage(1, alternating=True)
    _, before, plain = sgd_step(data, stage, steps=3)
    _, _, agg = sgd_step(data, stage, steps=3, aggregator=name)
    for k in plain:
        np.testing.assert_allclose(agg[k], plain[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(not np.array_equal(before[k], plain[k]) for k in plain)


@pytest.mark.parametrize("aggregate_on", ["params", "representation"])
def test_gradnorm_reads_unweighted_rows_under_an_aggregator(data, aggregate_on):
    """GradNorm needs ∇L_i, not λ_i ∇L_i: with the 'sum' aggregator (the joint step) its weights
    and the parameters follow the run without an aggregator step for step."""
    cfg = dict(weighting="gradnorm", weighting_kwargs={"lr": 0.5})
    tr, before, plain = sgd_step(data, steps=4, **cfg)
    _, _, agg = sgd_step(data, steps=4, aggregator="sum", aggregate_on=aggregate_on, **cfg)
    for k in plain:
        np.testing.assert_allclose(agg[k], plain[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_gradvac_state_moves_only_for_the_stage_tasks(data):
    """GradVac's pairwise targets: a stage on click and like updates their pair only."""
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(aggregator="gradvac", aggregator_kwargs={"beta": 0.5}))
    st = tr.init(model)
    b = jax.tree.map(lambda x: x[:2], epoch_batches(data, 128, jax.random.key(0)))
    st, _ = tr.run(st, b, Stage(1, tasks=("click", "like")))
    target = np.asarray(st.aggregator)
    i, j, k = (tr.names.index(n) for n in ("click", "like", "rating"))
    assert target[i, j] != 0 and target[j, i] != 0
    assert np.all(target[k] == 0) and np.all(target[:, k] == 0) and np.all(np.diag(target) == 0)


def train_curve(data, epochs=6, model="shared_bottom", **cfg):
    m = build_model(model, data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(m, TrainConfig(learning_rate=1e-2, **cfg))
    st = tr.init(m)
    b = epoch_batches(data, 64, jax.random.key(1))
    losses = []
    for _ in range(epochs):
        st, met = tr.run(st, b, Stage(1))
        losses.append(np.asarray(met["losses"]).mean(0))  # unweighted per-task losses
    assert int(st.skipped) == 0
    return np.asarray(losses)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_each_aggregator_trains(data, name):
    curve = train_curve(data, aggregator=name)
    assert curve[-1].sum() < 0.8 * curve[0].sum(), curve


@pytest.mark.parametrize("name", ["mgda", "upgrad", "pcgrad"])
def test_representation_level_aggregation_trains(data, name):
    curve = train_curve(data, aggregator=name, aggregate_on="representation")
    assert curve[-1].sum() < 0.8 * curve[0].sum(), curve


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_each_weighting_trains(data, name):
    curve = train_curve(data, weighting=name)
    assert curve[-1].sum() < 0.8 * curve[0].sum(), curve


def test_weighting_state_moves_and_is_in_the_train_state(data):
    m = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(m, TrainConfig(weighting="uncertainty", weighting_kwargs={"lr": 0.05}))
    st = tr.init(m)
    before = [np.array(x) for x in jax.tree.leaves(st.weighting)]
    st, met = tr.run(st, epoch_batches(data, 64, jax.random.key(1)), Stage(1))
    after = [np.array(x) for x in jax.tree.leaves(st.weighting)]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    # the weights used by the step are exp(−s) of the log-variances held before that step
    assert np.all(np.asarray(met["weights"]) > 0)


def test_aggregator_needs_shared_parameters(data):
    m = build_model("single_task", data.feature_specs, data.task_specs, **SIZES)
    with pytest.raises(ValueError, match="aggregator: 'mgda' needs shared parameters"):
        Trainer(m, TrainConfig(aggregator="mgda"))
    with pytest.raises(ValueError, match="aggregator: unknown value 'pcgard'.*'pcgrad'"):
        Trainer(m, TrainConfig(aggregator="pcgard"))
