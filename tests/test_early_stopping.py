"""Early stopping in fit: the stop and the best epoch match a brute-force reading of the recorded
evaluations, the returned state is bit-identical to a run cut at the best epoch, a resumed run
ends where the uninterrupted one does, and bad settings are refused by name."""

import jax
import numpy as np
import pytest

from mtl.checkpoint import Checkpointer
from mtl.data import synthetic
from mtl.data.batching import Dataset
from mtl.models import build_model
from mtl.runner import EarlyStopping, fit
from mtl.train import Stage, TrainConfig, Trainer


@pytest.fixture(scope="module")
def splits():
    f, l, fs, ts = synthetic.recsys(n=256, num_users=30, num_items=40, seed=2)
    train = Dataset(f, l, fs, ts)
    f, l, fs, ts = synthetic.recsys(n=128, num_users=30, num_items=40, seed=3)
    return train, Dataset(f, l, fs, ts)


def make(train):
    model = build_model(
        "shared_bottom", train.feature_specs, train.task_specs, trunk=(8,), tower=(4,)
    )
    tr = Trainer(model, TrainConfig(learning_rate=3e-2))
    return tr, tr.init(model, seed=1)


def run(splits, epochs, **kw):
    train, val = splits
    tr, st = make(train)
    return fit(tr, st, train, (Stage(epochs),), batch_size=64, data_seed=5, eval_data=val, **kw)


def host(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def brute_force(scores, patience, higher_better, min_delta):
    """(best index, index of the evaluation that stops the run or None), by a plain scan."""
    best, stop = 0, None
    for i in range(1, len(scores)):
        gain = scores[i] - scores[best] if higher_better else scores[best] - scores[i]
        if gain > min_delta:
            best = i
        if i - best >= patience:
            stop = i
            break
    return best, stop


@pytest.mark.parametrize(
    "monitor, min_delta", [("rating/rmse", 0.0), ("rating/rmse", 0.2), ("mean/auc", 0.0)]
)
def test_stop_and_best_epoch_match_brute_force_and_best_state_is_that_epochs(
    splits, monitor, min_delta
):
    """RMSE falls every epoch here (no stop, best = last); with min_delta 0.2 only every other
    epoch counts (best in the middle); the mean AUC does not improve (an early stop)."""
    epochs, patience = 8, 2
    es = EarlyStopping(monitor, patience=patience, min_delta=min_delta)
    res = run(splits, epochs, early_stopping=es)
    task, metric = monitor.split("/")
    evals = [h["eval"] for h in res.history]
    scores = [
        np.mean([e[t][metric] for t in e if metric in e[t]]) if task == "mean" else e[task][metric]
        for e in evals
    ]
    best, stop = brute_force(scores, patience, metric != "rmse", min_delta)
    assert res.best_epoch == best
    assert res.stopped_early == (stop is not None)
    assert len(res.history) == (epochs if stop is None else stop + 1)
    cut = run(splits, best + 1)  # the same run, stopped right after the best epoch
    for a, b in zip(host(res.state.params), host(cut.state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_constant_score_stops_after_patience_and_keeps_the_first_state(splits):
    res = run(splits, 6, early_stopping=EarlyStopping(lambda ev: 0.0, patience=3))
    assert (res.best_epoch, res.stopped_early, len(res.history)) == (0, True, 4)
    first = run(splits, 1)
    for a, b in zip(host(res.state), host(first.state), strict=True):
        np.testing.assert_array_equal(a, b)
    last = run(splits, 6, early_stopping=EarlyStopping(lambda ev: 0.0, 3, restore_best=False))
    assert int(last.state.step) == 4 * int(first.state.step)  # the last state, 4 epochs in


def test_resumed_run_stops_where_the_uninterrupted_one_does(splits, tmp_path):
    """The best epoch (0) precedes the interruption, so the resumed run reads it back from disk."""
    train, val = splits

    def fit_in(directory, **extra):
        tr, st = make(train)
        es = EarlyStopping(lambda ev: 0.0, patience=3)
        ck = Checkpointer(directory, tr.fingerprint())
        kw = dict(batch_size=64, data_seed=5, eval_data=val, early_stopping=es, checkpointer=ck)
        return fit(tr, st, train, (Stage(6),), **kw, **extra)

    ref = fit_in(tmp_path / "ref")
    calls = {"n": 0}

    def stop_after_two_epochs():
        calls["n"] += 1
        return calls["n"] == 2

    with pytest.raises(KeyboardInterrupt):
        fit_in(tmp_path / "ck", should_stop=stop_after_two_epochs)
    assert (tmp_path / "ck-best").is_dir()
    res = fit_in(tmp_path / "ck")
    assert (res.best_epoch, res.stopped_early) == (ref.best_epoch, ref.stopped_early) == (0, True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(res.history) == strip(ref.history)
    for a, b in zip(host(res.state), host(ref.state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(monitor="rmse"), "early_stopping.monitor: 'rmse' must be 'task/metric'"),
        (dict(monitor="rating/rmse", patience=0), "early_stopping.patience: 0 must be an int"),
        (dict(monitor="rating/rmse", mode="up"), "early_stopping.mode: 'up'"),
        (dict(monitor="rating/rmse", min_delta=-1.0), "early_stopping.min_delta: -1.0"),
    ],
)
def test_bad_settings_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kw)


def test_auto_mode_reads_the_metric_name():
    """Lower is better for the error metrics and losses that mtl.metrics reports, higher else."""
    ev = {"like": {"auc": 0.7, "log_loss": 0.5}, "rating": {"rmse": 1.0, "mae": 0.8}}
    hist = [
        {"epoch": 0, "eval": ev},
        {"epoch": 1, "eval": {t: {k: v + 0.1 for k, v in m.items()} for t, m in ev.items()}},
    ]
    for monitor, best in [
        ("like/auc", 1),
        ("like/log_loss", 0),
        ("rating/rmse", 0),
        ("rating/mae", 0),
        ("mean/auc", 1),
    ]:
        assert EarlyStopping(monitor).status(hist)[0] == best, monitor
    assert EarlyStopping("like/log_loss", mode="max").status(hist)[0] == 1


def test_monitor_not_in_the_evaluation_and_missing_eval_data(splits):
    train, _ = splits
    with pytest.raises(ValueError, match=r"'rating/auc' is not in the evaluation; choose one of"):
        run(splits, 2, early_stopping=EarlyStopping("rating/auc"))
    with pytest.raises(ValueError, match="no task reports 'ndcg'"):
        run(splits, 2, early_stopping=EarlyStopping("mean/ndcg"))
    tr, st = make(train)
    with pytest.raises(ValueError, match="early_stopping: needs eval_data"):
        fit(tr, st, train, (Stage(2),), batch_size=64, early_stopping=EarlyStopping("mean/auc"))


def one_class(val, task, value, masked_rows=0):
    """val with every labelled row of ``task`` set to ``value``; the first ``masked_rows`` rows get
    the other class but mask 0 (unlabelled)."""
    y = np.full(len(val), float(value), np.float32)
    mask = np.ones(len(val), np.float32)
    y[:masked_rows], mask[:masked_rows] = 1.0 - value, 0.0
    labels = {**val.labels, task: y}
    return Dataset(val.features, labels, val.feature_specs, val.task_specs, {task: mask})


@pytest.mark.parametrize("monitor", ["like/auc", "mean/auc"])
def test_a_monitored_auc_undefined_on_a_one_class_validation_split_is_refused(splits, monitor):
    """A one-class split scores AUC 0.5 at every evaluation (metrics.auc), which never improves:
    the run would stop after `patience` evaluations for no reason."""
    train, val = splits
    bad = one_class(val, "like", 1, masked_rows=5)  # masked rows of the other class don't count
    assert np.unique(bad.labels["like"][bad.masks["like"] > 0]).tolist() == [1.0]
    tr, st = make(train)
    with pytest.raises(ValueError, match=(
        rf"^early_stopping.monitor: '{monitor}': every labelled row of task 'like' in eval_data "
        r"is 1, so its AUC is undefined .* or monitor another metric \(e.g. 'like/log_loss'\)")):  # fmt: skip
        fit(tr, st, train, (Stage(2),), batch_size=64, eval_data=bad,
            early_stopping=EarlyStopping(monitor))  # fmt: skip
    # another task's AUC, or another metric of 'like', stays defined and allowed
    for ok in ("click/auc", "like/log_loss"):
        fresh = jax.tree.map(lambda x: x.copy(), st)  # fit may donate the state it is given
        res = fit(tr, fresh, train, (Stage(1),), batch_size=64, eval_data=bad,
                  early_stopping=EarlyStopping(ok))  # fmt: skip
        assert len(res.history) == 1


def test_evaluate_warns_of_an_undefined_auc(splits, caplog):
    from mtl.runner import evaluate, one_class_tasks

    train, val = splits
    tr, st = make(train)
    # the reference: numpy's classes of the labelled rows of each binary task
    for bad, want in ((one_class(val, "click", 0), {"click": 0.0}), (val, {})):
        got = {
            t.name: float(np.unique(bad.labels[t.name])[0])
            for t in bad.task_specs
            if t.kind == "binary" and len(np.unique(bad.labels[t.name])) == 1
        }
        assert one_class_tasks(bad) == got == want
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtl.runner"):
        out = evaluate(tr, st, one_class(val, "click", 0))
    assert out["click"]["auc"] == 0.5
    assert [r.getMessage() for r in caplog.records] == [
        "evaluate: every labelled row of task 'click' is 0 on this split: its AUC is undefined "
        "(reported as 0.5)"
    ]


def test_train_run_takes_early_stopping_from_the_spec(splits, tmp_path):
    from mtl.experiment import RunDir, train_run

    train, val = splits
    spec = dict(model="shared_bottom", model_kwargs=dict(trunk=(8,), tower=(4,)), epochs=6)
    spec |= dict(batch_size=64, learning_rate=3e-2, seed=1, name="es")
    es = {"monitor": "mean/auc", "patience": 2}
    rec = train_run(spec | {"early_stopping": es}, train, val, val=val, progress=False)
    scores = [np.mean([m["auc"] for m in h["eval"].values() if "auc" in m]) for h in rec["history"]]
    best, stop = brute_force(scores, 2, True, 0.0)
    assert (rec["best_epoch"], rec["stopped_early"]) == (best, stop is not None)
    assert len(rec["history"]) == (6 if stop is None else stop + 1)
    with pytest.raises(ValueError, match=r"early_stopping: unknown fields \['patiense'\]"):
        train_run(spec | {"early_stopping": {"monitor": "mean/auc", "patiense": 2}}, train, val)
    with pytest.raises(ValueError, match=r"early_stopping: needs a validation split \(val\)"):
        train_run(spec | {"early_stopping": es}, train, val, rundir=RunDir(tmp_path))
