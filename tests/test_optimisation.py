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


def sgd_step(data, **cfg):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(optimizer="sgd", learning_rate=0.1, **cfg))
    st = tr.init(model)
    b = jax.tree.map(lambda x: x[:1], epoch_batches(data, 128, jax.random.key(0)))
    before = host_params(st)
    st, _ = tr.run(st, b, Stage(1))
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
