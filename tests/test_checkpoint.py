"""Checkpoints: resume is bit-identical, foreign checkpoints are refused, broken ones skipped."""

import logging
import shutil

import jax
import numpy as np
import pytest

from mtl.checkpoint import Checkpointer, CheckpointMismatch
from mtl.data import synthetic
from mtl.data.batching import Dataset, epoch_batches
from mtl.models import build_model
from mtl.runner import fit
from mtl.train import Stage, TrainConfig, Trainer

STAGES = (Stage(2), Stage(1, trainable=("towers", "heads")), Stage(1, alternating=True))


@pytest.fixture(scope="module")
def data():
    f, l, fs, ts = synthetic.recsys(n=300, num_users=40, num_items=50, seed=1)
    return Dataset(f, l, fs, ts)


def make(data, trunk=(16,)):
    model = build_model(
        "shared_bottom", data.feature_specs, data.task_specs, trunk=trunk, tower=(8,), dropout=0.3
    )
    tr = Trainer(model, TrainConfig(learning_rate=5e-3))
    return tr, tr.init(model, seed=3)


def host(state):
    return [np.array(x) for x in jax.tree.leaves(state)]


def strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_resume_is_bit_identical(data, tmp_path):
    tr, st = make(data)
    ref_ck = Checkpointer(tmp_path / "ref", tr.fingerprint())  # same chunking, never interrupted
    ref = fit(tr, st, data, STAGES, batch_size=64, data_seed=7, checkpointer=ref_ck, save_every=2)

    calls = {"n": 0}

    def stop_after_four_chunks():
        calls["n"] += 1
        return calls["n"] == 4

    tr1, st1 = make(data)
    ck = Checkpointer(tmp_path / "ck", tr1.fingerprint(), max_to_keep=2)
    with pytest.raises(KeyboardInterrupt):
        fit(
            tr1,
            st1,
            data,
            STAGES,
            batch_size=64,
            data_seed=7,
            checkpointer=ck,
            save_every=2,
            should_stop=stop_after_four_chunks,
        )
    assert ck.steps() == [5, 7]  # chunks end at steps 2, 4, 5 (epoch end), 7: stopped there
    tr2, st2 = make(data)  # a fresh process would build everything anew
    res = fit(
        tr2,
        st2,
        data,
        STAGES,
        batch_size=64,
        data_seed=7,
        checkpointer=Checkpointer(tmp_path / "ck", tr2.fingerprint()),
        save_every=2,
    )
    for a, b in zip(host(ref.state), host(res.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert strip(res.history) == strip(ref.history)
    assert int(res.state.step) == 20


def test_a_restored_state_compiles_the_fresh_states_program(data, tmp_path):
    """A resumed run lowers its steps to the same program text as a run from a fresh state (no
    sharding annotations from committed arrays), so the persistent compilation cache serves it;
    the restored values are the saved ones."""
    tr, st = make(data)
    batches = epoch_batches(data, 64, jax.random.key(0))
    st, _ = tr.run(st, batches, Stage(1))
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint())
    ck.save(int(st.step), st, {})
    tr2, fresh = make(data)
    restored, _, step = Checkpointer(tmp_path / "ck", tr2.fingerprint()).restore(fresh)
    assert step == int(st.step)
    for a, b in zip(host(st), host(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    leaves = jax.tree.leaves(restored)
    assert not any(x.committed for x in leaves)
    assert {x.sharding for x in leaves} == {x.sharding for x in jax.tree.leaves(fresh)}
    program = lambda s: tr2.lower(s, batches, Stage(1)).as_text()
    assert program(restored) == program(fresh)


def test_a_state_on_a_mesh_is_restored_on_that_mesh(data, tmp_path):
    """A replicated state on the 8-device mesh (committed arrays) comes back with the template's
    shardings, so the resumed run lowers to the program it had before the save."""
    from mtl import parallel

    mesh = parallel.make_mesh()
    tr, st = make(data)
    batches = parallel.shard_batches(epoch_batches(data, 64, jax.random.key(0)), mesh)
    st, _ = tr.run(parallel.replicate(st, mesh), batches, Stage(1))
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint())
    ck.save(int(st.step), st, {})
    tr2, fresh = make(data)
    fresh = parallel.replicate(fresh, mesh)
    restored, _, _ = Checkpointer(tmp_path / "ck", tr2.fingerprint()).restore(fresh)
    for a, b in zip(host(st), host(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    for x, y in zip(jax.tree.leaves(fresh), jax.tree.leaves(restored), strict=True):
        assert y.committed and y.sharding == x.sharding
    program = lambda s: tr2.lower(s, batches, Stage(1)).as_text()
    assert program(restored) == program(fresh)


def test_foreign_checkpoint_is_refused(data, tmp_path):
    tr, st = make(data)
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint())
    fit(tr, st, data, (Stage(1),), batch_size=100, checkpointer=ck)
    tr2, st2 = make(data, trunk=(24,))
    with pytest.raises(
        CheckpointMismatch,
        match=r"params\.trunk/layers/0/kernel: checkpoint has \[.*16\], this run has \[.*24\]",
    ):
        fit(
            tr2,
            st2,
            data,
            (Stage(2),),
            batch_size=100,
            checkpointer=Checkpointer(tmp_path / "ck", tr2.fingerprint()),
        )


def test_broken_latest_checkpoint_falls_back(data, tmp_path, caplog):
    tr, st = make(data)
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint(), max_to_keep=3)
    res = fit(tr, st, data, (Stage(2),), batch_size=100, checkpointer=ck)
    assert ck.steps() == [3, 6]
    latest = tmp_path / "ck" / "6" / "state"
    for f in latest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    tr2, st2 = make(data)
    with caplog.at_level(logging.WARNING):
        restored = Checkpointer(tmp_path / "ck", tr2.fingerprint()).restore(st2)
    assert restored is not None and restored[2] == 3
    assert "step 6" in caplog.text
    assert int(restored[0].step) == 3
    del res
    shutil.rmtree(tmp_path / "ck")


def test_unwritable_directory(data, tmp_path):
    tr, _ = make(data)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="checkpoint directory: cannot write"):
        Checkpointer(blocker / "sub", tr.fingerprint())


def test_checkpoint_of_another_optimizer_state_layout_is_refused(data, tmp_path):
    """A whole-tree optax state (a tx passed to Trainer) and the built-in per-leaf one differ in
    layout: the fingerprint names it instead of orbax failing on the tree."""
    import optax

    model = build_model("shared_bottom", data.feature_specs, data.task_specs, trunk=(16,),
                        tower=(8,))  # fmt: skip
    tree = Trainer(model, TrainConfig(learning_rate=5e-3), tx=optax.adam(5e-3))
    ck = Checkpointer(tmp_path / "ck", tree.fingerprint())
    ck.save(0, tree.init(model, seed=3))
    ck.close()
    tr, st = make(data)
    with pytest.raises(CheckpointMismatch, match=r"opt_state: checkpoint has 'tree \w{12}', this "
                       r"run has 'per-leaf \w{12}'"):  # fmt: skip
        Checkpointer(tmp_path / "ck", tr.fingerprint()).restore(st)


def test_a_study_rerun_resumes_only_the_same_run_on_the_same_rows(data, tmp_path):
    """``train_run`` in a run directory restores a finished run only when everything that shapes
    its trajectory matches: a changed learning rate, dropout or set of training rows (of the same
    size) is refused by name instead of being evaluated as if it had been trained."""
    from mtl.experiment import RunDir, train_run

    rows = np.arange(len(data))
    train, test = data.take(rows[:200]), data.take(rows[200:])
    spec = {
        "model": "shared_bottom",
        "model_kwargs": {"trunk": (8,), "tower": (4,), "dropout": 0.1},
    }
    spec |= {"epochs": 1, "batch_size": 50, "learning_rate": 1e-2, "seed": 0, "name": "run"}
    rundir = RunDir(tmp_path / "study")
    first = train_run(spec, train, test, rundir=rundir, progress=False)
    again = train_run(spec, train, test, rundir=rundir, progress=False)  # resumes: nothing to do
    for a, b in zip(host(again["_state"].params), host(first["_state"].params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again["tasks"] == first["tasks"]
    other_rows = data.take(rows[100:300])  # as many rows, not the same ones
    for change, field in (
        ({"learning_rate": 0.5}, "config.learning_rate"),
        ({"model_kwargs": spec["model_kwargs"] | {"dropout": 0.9}}, "model_kwargs.dropout"),
        ({"l2": 1.0}, "config.l2"),
    ):
        with pytest.raises(CheckpointMismatch, match=field):
            train_run(spec | change, train, test, rundir=rundir, progress=False)
    with pytest.raises(CheckpointMismatch, match="train_data"):
        train_run(spec, other_rows, test, rundir=rundir, progress=False)
