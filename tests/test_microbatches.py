"""Microbatches (TrainConfig.microbatches): the same loss and trajectory as the whole batch, the
automatic choice, and clear errors."""

import jax
import numpy as np
import pytest
from flax import nnx

from mtl import losses, parallel
from mtl.data import synthetic
from mtl.data.batching import Dataset, eval_batches
from mtl.models import build_model
from mtl.spec import TaskSpec
from mtl.train import CPU_MICROBATCH_MIN, Stage, TrainConfig, Trainer, default_microbatches

B = 64
SIZES = dict(trunk=(16,), tower=(8,))


@pytest.fixture(scope="module")
def data():
    """'like' is labelled on rows 0, 4, 8, ... of each batch only (a mask), so with 2 or 4
    microbatches some microbatches hold no 'like' example at all; 'rating' on a random half."""
    f, l, fs, ts = synthetic.recsys(n=B * 5 - 7, num_users=40, num_items=50, seed=3)
    n = len(l["click"])
    rng = np.random.default_rng(0)
    masks = {"like": (np.arange(n) % 4 == 0).astype(np.float32), "rating": rng.random(n) < 0.5}
    return Dataset(f, l, fs, ts, masks={k: v.astype(np.float32) for k, v in masks.items()})


def batches(data):
    # unshuffled order keeps the 'like' rows at positions 0 mod 4 of every batch; the last batch
    # is padded (valid = 0 on 7 rows)
    return eval_batches(data, B)


def run(data, steps=5, **config):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=1e-2, **config))
    st = tr.init(model, seed=1)
    first = jax.tree.map(np.array, st.params)
    st, m = tr.run(st, jax.tree.map(lambda x: x[:steps], batches(data)), Stage(1))
    return tr, first, jax.tree.map(np.array, st.params), jax.tree.map(np.asarray, m)


def full_batch_losses(tr, params, batch):
    """The tasks' losses of the whole batch, computed outside the trainer: model forward on all
    rows, then each task's masked mean (losses.task_loss)."""
    model = nnx.merge(tr.graphdef, params, tr._template[1])
    preds, _ = model(batch["features"])
    return np.asarray(
        [
            losses.task_loss(
                t.kind,
                preds[t.name],
                batch["labels"][t.name],
                batch["masks"][t.name] * batch["valid"],
            )
            for t in tr.tasks
        ]
    )


@pytest.mark.parametrize("k", [2, 4])
def test_microbatches_give_the_whole_batch_loss_and_trajectory(data, k):
    """k microbatches: the first step's losses are the whole batch's masked means (computed outside
    the trainer), and 5 steps (the last one padded) end at the parameters of the unsplit run to
    float32 rounding, although some microbatches hold no example of a task."""
    tr1, first, end1, m1 = run(data, microbatches=1)
    trk, _, endk, mk = run(data, microbatches=k)
    batch0 = jax.tree.map(lambda x: x[0], batches(data))
    expected = full_batch_losses(tr1, first, batch0)
    np.testing.assert_allclose(mk["losses"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(m1["losses"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(mk["losses"], m1["losses"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(endk), jax.tree.leaves(end1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the runs really moved: a split that dropped gradients would not match the unsplit one
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(end1), jax.tree.leaves(first))]
    assert min(moved) > 1e-4


def test_microbatches_with_an_aggregator_match_the_whole_batch(data):
    """UPGrad on the shared parameters: the per-task Jacobian summed over 2 microbatches is the
    whole batch's, so the aggregated trajectory matches too."""
    _, _, end1, m1 = run(data, aggregator="upgrad", microbatches=1)
    _, _, end2, m2 = run(data, aggregator="upgrad", microbatches=2)
    np.testing.assert_allclose(m2["losses"], m1["losses"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(end2), jax.tree.leaves(end1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_microbatches_on_a_data_parallel_mesh_match_one_device(data):
    """2 microbatches with the batch sharded over the 8 devices: the same losses as one device,
    and the split (row r in microbatch r mod 2) needs no data moved between devices."""
    mesh = parallel.make_mesh()
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=1e-2, microbatches=2))
    b = jax.tree.map(lambda x: x[:3], batches(data))
    _, single = tr.run(tr.init(model, seed=1), b, Stage(1))
    st = parallel.replicate(tr.init(model, seed=1), mesh)
    sharded = parallel.shard_batches(b, mesh)
    hlo = tr.lower(st, sharded, Stage(1)).compile().as_text()
    _, multi = tr.run(st, sharded, Stage(1))
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
    assert "all-to-all" not in hlo and "collective-permute" not in hlo and "all-gather" not in hlo


def test_automatic_microbatches():
    """None: 2 on CPU for an even batch of at least CPU_MICROBATCH_MIN rows of a step without
    per-task gradients whose split is exact; 1 otherwise (and 1 on every other backend)."""
    cpu = jax.default_backend() == "cpu"
    assert default_microbatches(CPU_MICROBATCH_MIN, False, True) == (2 if cpu else 1)
    assert default_microbatches(4096, False, True) == (2 if cpu else 1)
    assert default_microbatches(CPU_MICROBATCH_MIN - 2, False, True) == 1
    assert default_microbatches(CPU_MICROBATCH_MIN + 1, False, True) == 1  # odd
    assert default_microbatches(4096, True, True) == 1  # per-task gradients
    assert default_microbatches(4096, False, False) == 1  # dropout or a retrieval task


def test_the_trainer_reads_the_step_kind_for_the_automatic_choice(data):
    """The trainer's automatic choice: 1 with dropout on, with an aggregator or with gradient
    logging; an explicit value holds whatever the step."""
    cpu = jax.default_backend() == "cpu"
    make = lambda cfg, **kw: Trainer(
        build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES, **kw), cfg
    )
    assert make(TrainConfig()).microbatches(1024) == (2 if cpu else 1)
    assert make(TrainConfig(), dropout=0.1).microbatches(1024) == 1
    assert make(TrainConfig(aggregator="mgda")).microbatches(1024) == 1
    assert make(TrainConfig(log_every=5)).microbatches(1024) == 1
    assert make(TrainConfig(microbatches=4), dropout=0.1).microbatches(1024) == 4
    assert make(TrainConfig(microbatches=1)).microbatches(4096) == 1


def test_bad_microbatches_are_clear_errors(data):
    make = lambda **kw: Trainer(
        build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES),
        TrainConfig(**kw),
    )
    with pytest.raises(ValueError, match=r"microbatches: 0 must be >= 1"):
        make(microbatches=0)
    with pytest.raises(ValueError, match=r"microbatches: 2\.0 must be an integer.*pass 2"):
        make(microbatches=2.0)
    with pytest.raises(ValueError, match=r"microbatches: 2 is not supported with aggregate_on"):
        make(microbatches=2, aggregator="mgda", aggregate_on="representation")
    tr = make(microbatches=3)
    with pytest.raises(ValueError, match=r"microbatches: 3 does not divide the batch size 64.*2"):
        tr.microbatches(64)
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    with pytest.raises(ValueError, match=r"microbatches: 3 does not divide the batch size 64"):
        tr.run(tr.init(model), jax.tree.map(lambda x: x[:1], batches(data)), Stage(1))


def test_microbatches_refuse_a_retrieval_task():
    """The in-batch softmax takes its negatives from the whole batch: no split, and the automatic
    choice keeps the batch whole."""
    fs = synthetic.recsys(8)[2]
    tasks = (TaskSpec("rating", "regression"), TaskSpec("retrieval", "retrieval"))
    sides = {"user_features": ("user_id", "age"), "item_features": ("item_id", "genres")}
    model = build_model("two_tower", fs, tasks, **sides)
    with pytest.raises(
        ValueError, match=r"microbatches: 2 would split the batch, but task 'retrieval'"
    ):
        Trainer(model, TrainConfig(microbatches=2))
    assert Trainer(model, TrainConfig()).microbatches(4096) == 1
