"""fit's own checks: what a checkpoint's step count means (batches, data, stages), a checkpoint
past the plan, non-finite weighting/aggregator states, foreign content in a checkpoint directory,
stale best states, skipped steps in the epoch means, the arguments of fit, EarlyStopping and
Checkpointer, non-finite monitored scores and the range of data_seed."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl import weighting as wt
from mtl.checkpoint import MARKER, Checkpointer, CheckpointMismatch
from mtl.data import synthetic
from mtl.data.batching import Dataset, epoch_batches
from mtl.models import build_model
from mtl.runner import Divergence, EarlyStopping, _epoch_mean, _nonfinite_part, fit
from mtl.train import Stage, TrainConfig, Trainer

B = 64  # 300 rows: 5 steps per epoch


@pytest.fixture(scope="module")
def data():
    f, l, fs, ts = synthetic.recsys(n=300, num_users=40, num_items=50, seed=1)
    return Dataset(f, l, fs, ts)


@pytest.fixture(scope="module")
def val():
    f, l, fs, ts = synthetic.recsys(n=128, num_users=40, num_items=50, seed=3)
    return Dataset(f, l, fs, ts)


def make(data, **config):
    model = build_model(
        "shared_bottom", data.feature_specs, data.task_specs, trunk=(8,), tower=(4,), dropout=0.2
    )
    tr = Trainer(model, TrainConfig(**({"learning_rate": 5e-3} | config)))
    return tr, model


@pytest.fixture(scope="module")
def trainer(data):
    """One trainer (compiled once) for the tests that only vary fit's arguments."""
    return make(data)


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
    la, lb = host(a), host(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def stop_after(n):
    calls = {"n": 0}

    def poll():
        calls["n"] += 1
        return calls["n"] == n

    return poll


# ---------------------------------------------------------------------- 1. what a step means
def test_resume_with_other_batches_data_or_stages_is_refused_by_field(data, trainer, tmp_path):
    tr, model = trainer
    ck = tmp_path / "ck"
    fit(tr, tr.init(model, seed=3), data, (Stage(1),), batch_size=B, data_seed=7,
        checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip
    labels = {k: v.copy() for k, v in data.labels.items()}
    labels["rating"][0] += 1.0  # as many rows, one label differs
    other = Dataset(dict(data.features), labels, data.feature_specs, data.task_specs)
    for kw, match in [
        (dict(batch_size=32), r"batch_size: checkpoint has 64, this run has 32"),
        (dict(data_seed=99), r"data_seed: checkpoint has 7, this run has 99"),
        (dict(train=data.take(np.arange(290))), r"train_rows: checkpoint has 300, this run has 290"),
        (dict(train=other), r"train_data: checkpoint has '[0-9a-f]{40}', this run has '[0-9a-f]"),
        (dict(stages=(Stage(2, alternating=True),)), r"stages: epoch 0 was trained as stages\[0\]"),
        (dict(stages=(Stage(1, trainable=("towers", "heads")), Stage(1))), r"'trainable': \['all'\]"),
    ]:  # fmt: skip
        args = dict(train=data, stages=(Stage(2),), batch_size=B, data_seed=7) | kw
        with pytest.raises(CheckpointMismatch, match=match) as err:
            fit(tr, tr.init(model, seed=3), args.pop("train"), args.pop("stages"), **args,
                checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip
        assert f"checkpoint {ck.absolute()}/5 was written by fit for other batches" in str(
            err.value
        )
        assert str(err.value).endswith(
            "use a new run directory, or resume with the original settings)"
        )


def test_a_mid_epoch_checkpoint_refuses_another_stage_for_its_epoch(data, trainer, tmp_path):
    tr, model = trainer
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        fit(tr, tr.init(model, seed=3), data, (Stage(2),), batch_size=B, save_every=2,
            checkpointer=Checkpointer(ck, tr.fingerprint()), should_stop=stop_after(1))  # fmt: skip
    with pytest.raises(CheckpointMismatch, match=r"/2 was written by fit .* stages: epoch 0 was "
                       r"trained as stages\[0\] .*'alternating': False.* this run's stages have "
                       r"stages\[0\] .*'alternating': True"):  # fmt: skip
        fit(tr, tr.init(model, seed=3), data, (Stage(2, alternating=True),), batch_size=B,
            save_every=2, checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip


def test_more_epochs_or_stages_after_the_checkpoint_resume_like_an_uninterrupted_run(
    data, trainer, tmp_path
):
    tr, model = trainer
    longer = (Stage(2), Stage(1, trainable=("towers", "heads")))
    ref = fit(tr, tr.init(model, seed=3), data, longer, batch_size=B, data_seed=7)
    ck = tmp_path / "ck"
    fit(tr, tr.init(model, seed=3), data, (Stage(1),), batch_size=B, data_seed=7,
        checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip
    fit(tr, tr.init(model, seed=3), data, (Stage(2),), batch_size=B, data_seed=7,
        checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip
    res = fit(tr, tr.init(model, seed=3), data, longer, batch_size=B, data_seed=7,
              checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip
    assert int(res.state.step) == 15
    assert_same(res.state, ref.state)
    assert strip(res.history) == strip(ref.history)


def test_a_checkpoint_fit_did_not_write_is_refused(data, trainer, tmp_path):
    tr, model = trainer
    st = tr.init(model, seed=3)
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint())
    ck.save(5, st, {"history": []})
    with pytest.raises(CheckpointMismatch, match=r"/5 does not record what its step count stands "
                       r"for \(batch size, data seed, training data, stages\)"):  # fmt: skip
        fit(tr, st, data, (Stage(2),), batch_size=B, checkpointer=ck)


# ---------------------------------------------------------------------- 2. past the plan
def test_a_checkpoint_past_the_plan_is_refused(data, trainer, tmp_path):
    tr, model = trainer
    ck = tmp_path / "ck"
    done = fit(tr, tr.init(model, seed=3), data, (Stage(2),), batch_size=B,
               checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip
    with pytest.raises(CheckpointMismatch, match=(
        rf"checkpoint {ck.absolute()}/10: restored step 10 is past the end of this run's stages "
        r"\(1 epochs of 5 steps = 5 steps\); ask for at least 2 epochs, or use a new run "
        r"directory")):  # fmt: skip
        fit(tr, tr.init(model, seed=3), data, (Stage(1),), batch_size=B,
            checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip
    again = fit(tr, tr.init(model, seed=3), data, (Stage(2),), batch_size=B,
                checkpointer=Checkpointer(ck, tr.fingerprint()))  # fmt: skip
    assert_same(again.state, done.state)  # the plan's exact end: the finished run, nothing to do
    assert strip(again.history) == strip(done.history)


# ---------------------------------------------------------------------- 3. non-finite states
def test_a_non_finite_weighting_state_stops_the_run_unsaved(data, tmp_path):
    """lr=1e38 passes validation (finite); its first update overflows the uncertainty state."""
    tr, model = make(data, weighting="uncertainty", weighting_kwargs={"lr": 1e38})
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint(), max_to_keep=5)
    with pytest.raises(Divergence, match=(
        r"^non-finite weighting state after an update within the chunk \(epoch 0, batches 0–0\) "
        r"whose losses and gradients were finite: the weighting 'uncertainty' made it .*lower the "
        r"learning rate in weighting_kwargs \(now \{'lr': 1e\+38\}\)")):  # fmt: skip
        fit(tr, tr.init(model, seed=3), data, (Stage(1),), batch_size=B, checkpointer=ck,
            save_every=1)  # fmt: skip
    assert ck.steps() == []  # never saved, never called the last good one


def test_finite_weighting_state_with_overflowing_weights_stops_the_run_unsaved(data, tmp_path):
    """lr=1000: Adam's first step takes uncertainty's log-variance s of a task with loss L < 1 to
    about -1000, a finite state whose weight exp(-s) overflows float32: the next step cannot be
    finite."""
    tr, model = make(data, weighting="uncertainty", weighting_kwargs={"lr": 1000.0})
    first = jax.tree.map(lambda x: x[:1], epoch_batches(data, B, jax.random.key(0)))
    st1, _ = tr.run(tr.init(model, seed=3), first, Stage(1))  # run donates the state it is given
    s = np.asarray(st1.weighting["log_var"])  # the independent reference: numpy's exp
    with np.errstate(over="ignore"):
        assert np.isfinite(s).all() and not np.isfinite(np.exp(-s.astype(np.float32))).all()
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint(), max_to_keep=5)
    with pytest.raises(Divergence, match=(
        r"^non-finite task weights \[.*inf.*\] from a finite weighting state after an update "
        r"within the chunk \(epoch 0, batches 0–0\) whose losses and gradients were finite: the "
        r"weighting 'uncertainty' overflowed .*lower the learning rate in weighting_kwargs "
        r"\(now \{'lr': 1000.0\}\)")):  # fmt: skip
        fit(tr, tr.init(model, seed=3), data, (Stage(1),), batch_size=B, checkpointer=ck,
            save_every=1)  # fmt: skip
    assert ck.steps() == []  # the state after step 0 is never kept as the last good one


def test_the_finiteness_check_covers_the_weighting_and_aggregator_states(data):
    tr, model = make(data, weighting="uncertainty", aggregator="pcgrad")
    st = tr.init(model, seed=3)
    assert _nonfinite_part(st) is None
    nan_first = lambda x: x.at[0].set(jnp.nan) if x.ndim and x.dtype.kind == "f" else x
    w = jax.tree.map(nan_first, st.weighting)
    assert _nonfinite_part(st._replace(weighting=w)) == "weighting"
    agg = {"ema": jnp.asarray([1.0, jnp.inf]), "count": jnp.zeros((), jnp.int32)}
    assert _nonfinite_part(st._replace(aggregator=agg)) == "aggregator"
    p = jax.tree.map(lambda x: x * jnp.inf, st.params)
    assert _nonfinite_part(st._replace(params=p, weighting=w)) == "params"


@pytest.mark.parametrize("name", ["uncertainty", "gradnorm", "famo"])
@pytest.mark.parametrize(
    "lr, match",
    [
        (math.inf, r"lr: inf must be a finite number; pass a learning rate > 0"),
        (math.nan, r"lr: nan must be a finite number"),
        (0.0, r"lr: 0.0 must be > 0 \(with 0 the weights never change"),
        (-0.1, r"lr: -0.1 must be > 0"),
        ("0.1", r"lr: '0.1' must be a real number, not str"),
        (True, r"lr: True must be a real number, not a bool"),
    ],
)
def test_a_weightings_lr_must_be_a_finite_number_above_zero(name, lr, match):
    with pytest.raises(ValueError, match=rf"^weighting '{name}' {match}"):
        wt.get_weighting(name, 2, lr=lr)


# ---------------------------------------------------------------------- 4. foreign content
def test_a_directory_mtl_did_not_write_is_refused_and_left_as_it_is(trainer, tmp_path):
    tr, _ = trainer
    ck = tmp_path / "ck"
    (ck / "2024").mkdir(parents=True)
    (ck / "2024" / "notes.txt").write_text("mine")
    (ck / "7").mkdir()
    (ck / "7" / "data.bin").write_bytes(b"xyz")
    with pytest.raises(CheckpointMismatch, match=(
        rf"^checkpoint directory: '{ck.absolute()}' holds '2024', '7', which mtl did not write "
        rf"\(it is not empty and has no {MARKER} marker; .*\); use a new directory")):  # fmt: skip
        Checkpointer(ck, tr.fingerprint())
    assert sorted(os.listdir(ck)) == ["2024", "7"]
    assert os.listdir(ck / "7") == ["data.bin"]


def test_another_tools_orbax_checkpoint_is_refused(trainer, tmp_path):
    import orbax.checkpoint as ocp

    tr, _ = trainer
    other = tmp_path / "other"
    m = ocp.CheckpointManager(
        other, options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    )
    m.save(100, args=ocp.args.StandardSave({"w": np.ones(3)}))
    m.wait_until_finished()
    m.close()
    with pytest.raises(CheckpointMismatch, match=r"holds '100', which mtl did not write"):
        Checkpointer(other, tr.fingerprint())
    assert os.listdir(other) == ["100"]
    (other / MARKER).write_text("{}")  # even in a directory marked as mtl's
    with pytest.raises(CheckpointMismatch, match=r"holds '100', which mtl did not write \(a step "
                       r"folder of mtl holds a 'state' and a 'meta' item; these hold neither\)"):  # fmt: skip
        Checkpointer(other, tr.fingerprint())
    assert sorted(os.listdir(other)) == [MARKER, "100"]


def test_a_new_or_empty_directory_is_marked_and_reused(trainer, tmp_path):
    tr, model = trainer
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "new" / "ck", tmp_path / "empty"):
        ck = Checkpointer(d, tr.fingerprint())
        assert os.listdir(d) == [MARKER]
        ck.save(1, tr.init(model, seed=3))
        assert Checkpointer(d, tr.fingerprint()).steps() == [1]


@pytest.fixture(scope="module")
def two_epochs(data, trainer, tmp_path_factory):
    """A finished 2-epoch run's checkpoint directory (steps 5, 10) and a 3-epoch reference."""
    tr, model = trainer
    d = tmp_path_factory.mktemp("two") / "ck"
    fit(tr, tr.init(model, seed=3), data, (Stage(2),), batch_size=B, data_seed=7,
        checkpointer=Checkpointer(d, tr.fingerprint(), max_to_keep=3))  # fmt: skip
    ref = fit(tr, tr.init(model, seed=3), data, (Stage(3),), batch_size=B, data_seed=7)
    return d, ref


@pytest.mark.parametrize(
    "damage", ["meta-garbage", "meta-deleted", "items-deleted", "empty-folder"]
)
def test_our_own_damaged_newest_step_still_falls_back(data, trainer, two_epochs, tmp_path, damage):
    tr, model = trainer
    src, ref = two_epochs
    ck = tmp_path / "ck"
    shutil.copytree(src, ck)
    latest = ck / "10"
    if damage == "meta-garbage":
        for f in (latest / "meta").rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")
    elif damage == "meta-deleted":
        shutil.rmtree(latest / "meta")
    elif damage == "items-deleted":  # only orbax's own files are left
        shutil.rmtree(latest / "meta")
        shutil.rmtree(latest / "state")
    else:  # what an interrupted save can leave
        for p in latest.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    res = fit(tr, tr.init(model, seed=3), data, (Stage(3),), batch_size=B, data_seed=7,
              checkpointer=Checkpointer(ck, tr.fingerprint(), max_to_keep=3))  # fmt: skip
    assert "10.broken" in os.listdir(ck)
    assert_same(res.state, ref.state)
    assert strip(res.history) == strip(ref.history)


# ---------------------------------------------------------------------- 5. the best state
def test_checkpointer_save_of_an_existing_step_keeps_it_only_when_it_is_the_same(trainer, tmp_path):
    tr, model = trainer
    st = tr.init(model, seed=3)
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint())
    ck.save(3, st, {"epoch": 0, "x": [1.0, float("nan")]})
    ck.save(3, st, {"epoch": 0, "x": [1.0, float("nan")]})  # the same: kept, no error
    with pytest.raises(CheckpointMismatch, match=rf"checkpoint {ck.directory}/3 already exists and "
                       r"holds another run's state"):  # fmt: skip
        ck.save(3, st, {"epoch": 1})
    assert ck.extra(3)["epoch"] == 0


def es_fit(tr, model, data, val, d, monitor, **kw):
    es = EarlyStopping(monitor, patience=3)
    ck = None if d is None else Checkpointer(d, tr.fingerprint())
    kw = dict(batch_size=B, data_seed=5, eval_data=val, early_stopping=es, checkpointer=ck) | kw
    return fit(tr, tr.init(model, seed=1), data, (Stage(6),), **kw)


def test_a_fresh_run_refuses_an_earlier_runs_best_state(data, val, trainer, tmp_path):
    tr, model = trainer
    const = lambda ev: 0.0
    es_fit(tr, model, data, val, tmp_path / "ck", const, data_seed=1)  # an earlier run
    shutil.rmtree(tmp_path / "ck")  # "start over": the main directory only
    before = sorted(os.listdir(tmp_path / "ck-best"))
    with pytest.raises(CheckpointMismatch, match=(
        rf"^checkpoint directory: '{tmp_path.absolute()}/ck-best' holds the best state of an "
        rf"earlier run \(step 5\), but '{tmp_path.absolute()}/ck' holds no checkpoint of it to "
        r"resume; move or delete that directory, or use a new run directory$")):  # fmt: skip
        es_fit(tr, model, data, val, tmp_path / "ck", const)
    assert sorted(os.listdir(tmp_path / "ck-best")) == before  # never cleared


def test_a_resumed_run_returns_exactly_its_best_epochs_state(data, val, trainer, tmp_path):
    """The monitor picks epoch 1 (its evaluation only scores 1). An interruption after epoch 1
    whose best checkpoint was never written (it comes after the run's own), and an earlier
    monitor's best state in ``-best`` (epoch 0): the resumed run still returns epoch 1's state."""
    tr, model = trainer
    ref0 = es_fit(tr, model, data, val, None, lambda ev: 0.0)
    target = ref0.history[1]["eval"]
    pick = lambda ev: float(ev == target)
    ref = es_fit(tr, model, data, val, tmp_path / "ref", pick)
    assert (ref.best_epoch, ref.stopped_early, len(ref.history)) == (1, True, 5)
    # epoch 0 is the best under a constant monitor: its state goes to ck-best (step 5)
    with pytest.raises(KeyboardInterrupt):
        es_fit(tr, model, data, val, tmp_path / "ck", lambda ev: 0.0, should_stop=stop_after(2))
    assert Checkpointer(tmp_path / "ck-best", tr.fingerprint()).steps() == [5]
    res = es_fit(tr, model, data, val, tmp_path / "ck", pick)  # epoch 1 (step 10) is the best
    assert (res.best_epoch, res.stopped_early) == (1, True)
    assert strip(res.history) == strip(ref.history)
    assert_same(res.state, ref.state)
    assert Checkpointer(tmp_path / "ck-best", tr.fingerprint()).steps() == [10]


def test_a_best_state_that_was_never_kept_is_reported_before_training(data, val, trainer, tmp_path):
    """Interrupted with restore_best=False (no ``-best``), resumed with it: epoch 0's state is
    nowhere, which is said before a step trains (the old code trained, then failed)."""
    tr, model = trainer
    with pytest.raises(KeyboardInterrupt):
        fit(tr, tr.init(model, seed=1), data, (Stage(6),), batch_size=B, data_seed=5,
            eval_data=val, early_stopping=EarlyStopping(lambda ev: 0.0, 3, restore_best=False),
            checkpointer=Checkpointer(tmp_path / "ck", tr.fingerprint()),
            should_stop=stop_after(2))  # fmt: skip
    calls = []
    run = tr.run
    tr.run = lambda *a, **k: (calls.append(1), run(*a, **k))[1]
    try:
        with pytest.raises(CheckpointMismatch, match=r"early_stopping.restore_best: the state of "
                           r"the best epoch 0 \(step 5\) is not in .*ck-best"):  # fmt: skip
            es_fit(tr, model, data, val, tmp_path / "ck", lambda ev: 0.0)
    finally:
        del tr.run
    assert calls == []


# ---------------------------------------------------------------------- 6. skipped steps
@pytest.fixture(scope="module")
def poisoned(data):
    """``data`` with one overflowing rating in batch 3 of epoch 0 (data_seed 0)."""
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(0), 0), len(data)))
    labels = {k: v.copy() for k, v in data.labels.items()}
    labels["rating"][order[3 * 50 + 7]] = 3e38
    return Dataset(dict(data.features), labels, data.feature_specs, data.task_specs)


def test_skipped_steps_leave_the_epoch_means_whatever_the_chunks(poisoned):
    """6 steps of 50, step 3 skipped: the record is the mean over the 5 finite steps, for chunks
    of 6 (one), 2 (one of them half skipped) and 1 (one of them all skipped)."""
    tr, model = make(poisoned, nan_policy="skip")
    steps = []
    run = tr.run

    def recording(*a, **k):
        state, m = run(*a, **k)
        steps.append(jax.device_get(m))
        return state, m

    tr.run = recording
    for save_every in (0, 2, 1):
        steps.clear()
        res = fit(tr, tr.init(model, seed=3), poisoned, (Stage(1),), batch_size=50,
                  save_every=save_every)  # fmt: skip
        ok = np.concatenate([m["finite"] for m in steps]).astype(bool)
        loss = np.concatenate([m["loss"] for m in steps])
        losses = np.concatenate([m["losses"] for m in steps])
        assert ok.tolist() == [True, True, True, False, True, True]
        rec = res.history[0]
        assert rec["skipped"] == 1
        assert rec["train_loss"] == pytest.approx(float(np.mean(loss[ok])), rel=1e-6), save_every
        for i, n in enumerate(tr.names):
            assert rec["train_losses"][n] == pytest.approx(float(np.mean(losses[ok, i])), rel=1e-6)


def test_an_epoch_whose_every_step_was_skipped_reports_nan(poisoned):
    tr, model = make(poisoned, nan_policy="skip")
    res = fit(tr, tr.init(model, seed=3), poisoned, (Stage(1),), batch_size=len(poisoned))
    rec = res.history[0]
    assert rec["skipped"] == 1 and math.isnan(rec["train_loss"])
    assert all(math.isnan(v) for v in rec["train_losses"].values())
    assert math.isnan(_epoch_mean([math.inf, math.nan], [0, 0]))
    assert _epoch_mean([2.0, math.inf, 5.0], [1, 0, 2]) == 4.0


# ---------------------------------------------------------------------- 7. fit's inputs
def _empty(data):
    return data.take(np.arange(0))


def _without_rating(data):
    keep = tuple(t for t in data.task_specs if t.name != "rating")
    labels = {k: v for k, v in data.labels.items() if k != "rating"}
    return Dataset(dict(data.features), labels, data.feature_specs, keep)


@pytest.mark.parametrize(
    "kw, match",
    [
        (lambda d: dict(should_stop=False), r"^should_stop: False is not callable; pass a function"),
        (lambda d: dict(on_epoch="log"), r"^on_epoch: 'log' is not callable; pass a function"),
        (lambda d: dict(early_stopping={"monitor": "rating/rmse"}, eval_data=d),
         r"^early_stopping: \{'monitor': 'rating/rmse'\} is not an EarlyStopping"),
        (lambda d: dict(eval_data={"features": d.features}), r"^eval_data: a dict is not a Dataset"),
        (lambda d: dict(eval_data=_empty(d)), r"^eval_data: 0 rows \(empty split\?\)"),
        (lambda d: dict(eval_data=_without_rating(d)),
         r"^eval_data: its tasks differ from train's \(missing \['rating'\]\)"),
        (lambda d: dict(checkpointer="ck"), r"^checkpointer: 'ck' is not a Checkpointer"),
        (lambda d: dict(train=d.tree()), r"^train: a dict is not a Dataset"),
        (lambda d: dict(data_seed=2**32 + 5), r"^data_seed: 4294967301 must be in \[0, 2\*\*32\)"),
        (lambda d: dict(data_seed=2**63), r"^data_seed: 9223372036854775808 must be in \[0, 2\*\*32"),
        (lambda d: dict(data_seed=-1), r"^data_seed: -1 must be in \[0, 2\*\*32\)"),
    ],
)  # fmt: skip
def test_fit_refuses_bad_inputs_by_name_before_any_step(data, trainer, kw, match):
    tr, model = trainer
    calls = []
    run = tr.run
    tr.run = lambda *a, **k: (calls.append(1), run(*a, **k))[1]
    try:
        args = dict(train=data, batch_size=B, save_every=2) | kw(data)
        with pytest.raises(ValueError, match=match):
            fit(tr, tr.init(model, seed=3), args.pop("train"), (Stage(2),), **args)
    finally:
        del tr.run
    assert calls == []


def test_data_seed_takes_numpy_integers_up_to_two_to_the_32(data, trainer):
    tr, model = trainer
    res = fit(tr, tr.init(model, seed=3), data, (Stage(1),), batch_size=150,
              data_seed=np.uint32(2**32 - 1))  # fmt: skip
    assert int(res.state.step) == 2


# ---------------------------------------------------------------------- 8. arguments
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(patience=True), r"early_stopping.patience: True must be an integer, not a bool"),
        (dict(patience=2.0), r"early_stopping.patience: 2.0 must be an integer, not a float"),
        (dict(min_delta=math.inf), r"early_stopping.min_delta: inf must be a finite number"),
        (dict(min_delta="0.1"), r"early_stopping.min_delta: '0.1' must be a real number, not str"),
        (dict(min_delta=None), r"early_stopping.min_delta: None must be a real number"),
        (dict(monitor=5), r"early_stopping.monitor: 5 must be 'task/metric' or 'mean/metric'"),
        (dict(restore_best="no"), r"early_stopping.restore_best: 'no' must be True or False"),
        (dict(mode=None), r"early_stopping.mode: None must be 'auto', 'max' or 'min'"),
    ],
)
def test_early_stopping_arguments_are_checked_by_type(kw, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**({"monitor": "rating/rmse"} | kw))


def test_early_stopping_takes_numpy_numbers():
    es = EarlyStopping("rating/rmse", patience=np.int64(3), min_delta=np.float32(0.5),
                       restore_best=np.bool_(False))  # fmt: skip
    assert (es.patience, es.min_delta, es.restore_best) == (3, 0.5, False)
    assert type(es.patience) is int and type(es.restore_best) is bool


@pytest.mark.parametrize(
    "value, match",
    [
        (None, r"max_to_keep: None must be an integer, not NoneType"),
        (2.5, r"max_to_keep: 2.5 must be an integer, not a float \(it is not truncated\)"),
        (True, r"max_to_keep: True must be an integer, not a bool"),
        ("3", r"max_to_keep: '3' must be an integer, not str"),
        (0, r"max_to_keep: 0 must be >= 1"),
    ],
)
def test_checkpointer_max_to_keep_is_an_integer_above_zero(trainer, tmp_path, value, match):
    with pytest.raises(ValueError, match=match):
        Checkpointer(tmp_path / "ck", trainer[0].fingerprint(), max_to_keep=value)
    assert Checkpointer(tmp_path / "ok", {}, max_to_keep=np.int64(2)).max_to_keep == 2


# ---------------------------------------------------------------------- 9. non-finite scores
def test_a_non_finite_score_is_never_the_best():
    es = EarlyStopping(lambda ev: ev["s"], patience=2, mode="max")
    status = lambda scores: es.status(
        [{"epoch": i, "eval": {"s": s}} for i, s in enumerate(scores)]
    )
    nan, inf = math.nan, math.inf
    assert status([nan, 0.6, 0.9]) == (2, 0.9, 0)  # the first finite score is the first best
    assert status([0.5, nan, nan]) == (0, 0.5, 2)  # NaN: no improvement
    assert status([0.5, inf, 0.4]) == (0, 0.5, 2)  # neither is inf
    assert status([nan, nan]) == (None, -inf, 2)  # no finite score: no best, patience runs out
    assert "non-finite score" in EarlyStopping.__doc__
