"""The entry points of a run (``fit``, ``train_run``) check every input before the first step.

Integers are integers (a float or a bool is refused, never truncated), eval_every >= 1 and
save_every >= 0, every stage (not only the first) names known tasks and parameters, a misspelt
stage field is a ValueError with the valid fields, and evaluation on a data mesh works for every
device count that training accepts. Table-driven like tests/test_bad_input.py, whose fixtures and
helpers it reuses; in the table, ``ctx['state']`` holds only parameters, so a case that got past
validation into training would fail with another error.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from test_bad_input import ctx, data, pattern  # noqa: F401 - ctx is a fixture

from mtl import parallel
from mtl.experiment import USER_ERRORS, train_run
from mtl.models import build_model
from mtl.runner import evaluate, fit
from mtl.train import Stage, TrainConfig, Trainer


def fit_with(c, stages=None, **kw):
    stages = (Stage(1),) if stages is None else stages
    return fit(c["trainer"], c["state"], data(), stages, **{"batch_size": 4} | kw)


def run_with(**spec):
    base = {"model": "shared_bottom", "model_kwargs": {"trunk": (8,), "tower": (4,)}}
    return train_run(base | {"batch_size": 4} | spec, data(), data(), progress=False)


# (id, call, expected message); every one is a ValueError whose message starts with its field
CASES = [
    # --- fit: eval_every, save_every, integers
    ("fit eval_every 0", lambda c: fit_with(c, eval_data=data(), eval_every=0),
     "eval_every: 0 must be >= 1; pass 1 to evaluate after every epoch, N for every N-th (the "
     "last epoch is always evaluated)"),
    ("fit eval_every -2", lambda c: fit_with(c, eval_data=data(), eval_every=-2),
     "eval_every: -2 must be >= 1; pass 1 …"),
    ("fit eval_every 1.5", lambda c: fit_with(c, eval_data=data(), eval_every=1.5),
     "eval_every: 1.5 must be an integer, not a float (it is not truncated); pass 1 or 2"),
    ("fit save_every -5", lambda c: fit_with(c, save_every=-5),
     "save_every: -5 must be >= 0; pass 0 to save at epoch ends only, or N to also save every N "
     "steps"),
    ("fit save_every True", lambda c: fit_with(c, save_every=True),
     "save_every: True must be an integer, not a bool; pass a whole number >= 0"),
    ("fit batch_size 32.9", lambda c: fit_with(c, batch_size=32.9),
     "batch_size: 32.9 must be an integer, not a float (it is not truncated); pass 32 or 33"),
    ("fit batch_size 8.0", lambda c: fit_with(c, batch_size=8.0),
     "batch_size: 8.0 must be an integer, not a float (it is not truncated); pass 8"),
    ("fit batch_size '8'", lambda c: fit_with(c, batch_size="8"),
     "batch_size: '8' must be an integer, not str; pass a whole number >= 1"),
    # --- fit: every stage, before the first one trains
    ("fit stage epochs True", lambda c: fit_with(c, stages=(Stage(1), Stage(epochs=True))),
     "…epochs: True must be an integer…"),  # refused by Stage itself, or else by fit
    ("fit later stage trainable",
     lambda c: fit_with(c, stages=(Stage(1), Stage(1, trainable=("towrs",)))),
     "stages[1].trainable: 'towrs' matches no parameter; groups are ('embeddings', 'shared', "
     "'towers', 'heads', 'gates'), paths look like …"),
    ("fit later stage tasks", lambda c: fit_with(c, stages=(Stage(1), Stage(1, tasks=("clik",)))),
     "stages[1].tasks: unknown value 'clik'; did you mean 'click'…? valid: click, like, rating"),
    ("stage tasks twice", lambda c: Stage(1, tasks=("click", "like", "like")),
     "stage tasks: ('click', 'like', 'like') names ['like'] more than once; name each task once "
     "(an alternating stage picks its tasks in turn or by TrainConfig.probs)"),
    ("fit no stages", lambda c: fit_with(c, stages=()),
     "stages: () must be a non-empty sequence of Stage; build it with mtl.train.make_schedule"),
    ("fit stage as a dict", lambda c: fit_with(c, stages=({"epochs": 1},)),
     "stages[0]: {'epochs': 1} is not a Stage; build the schedule with mtl.train.make_schedule …"),
    # --- train_run: integers of the spec, stage fields
    ("run batch_size 32.9", lambda c: run_with(batch_size=32.9),
     "batch_size: 32.9 must be an integer, not a float (it is not truncated); pass 32 or 33"),
    ("run epochs 2.7", lambda c: run_with(epochs=2.7),
     "epochs: 2.7 must be an integer, not a float (it is not truncated); pass 2 or 3"),
    ("run eval_every 0", lambda c: run_with(eval_every=0),
     "eval_every: 0 must be >= 1; pass 1 to evaluate after every epoch"),
    ("run save_every -5", lambda c: run_with(save_every=-5),
     "save_every: -5 must be >= 0; pass 0 to save at epoch ends only"),
    ("run seed 1.5", lambda c: run_with(seed=1.5),
     "seed: 1.5 must be an integer, not a float (it is not truncated); pass 1 or 2"),
    ("run log_every 2.5", lambda c: run_with(log_every=2.5),
     "log_every: 2.5 must be an integer, not a float (it is not truncated); pass 2 or 3"),
    ("run stage field typo", lambda c: run_with(schedule="staged", stages=[{"epoch": 2}]),
     "stages[0]: unknown field 'epoch'; did you mean 'epochs'? valid: epochs, trainable, tasks, "
     "alternating"),
    ("run later stage field typo",
     lambda c: run_with(schedule="staged", stages=[{"epochs": 1}, {"epochs": 1, "trainables": "towers"}]),
     "stages[1]: unknown field 'trainables'; did you mean 'trainable'? valid: …"),
    ("run stage without epochs", lambda c: run_with(schedule="staged", stages=[{"tasks": "click"}]),
     "stages[0]: no 'epochs'; give every stage its number of epochs"),
    ("run stage epochs True", lambda c: run_with(schedule="staged", stages=[{"epochs": True}]),
     "stages[0].epochs: True must be an integer, not a bool; pass a whole number"),
    ("run seed 2**32", lambda c: run_with(seed=2**32),
     "seed: 4294967296 must be < 2**32 (it also orders the data); pass a smaller seed"),
    ("run seed -1", lambda c: run_with(seed=-1), "seed: -1 must be >= 0"),
    ("run misspelt spec key", lambda c: run_with(lr=0.1),
     "spec key: unknown value 'lr'; …valid: …learning_rate…"),
    ("run misspelt epochs", lambda c: run_with(epoch=3),
     "spec key: unknown value 'epoch'; did you mean 'epochs'…? valid: …"),
    ("run stages not a list", lambda c: run_with(schedule="staged", stages={"epochs": 1}),
     "stages: {'epochs': 1} must be a list of stages (mappings of Stage fields), e.g. …"),
]  # fmt: skip


@pytest.mark.parametrize("call, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_run_input_raises_a_clear_error(ctx, call, expected):  # noqa: F811 - the fixture
    with pytest.raises(ValueError) as err:
        call(ctx)
    msg = str(err.value)
    assert isinstance(err.value, USER_ERRORS)  # the command line prints one line, exit 2
    assert re.fullmatch(pattern(expected), msg), msg


def test_a_later_sampled_stage_whose_tasks_all_have_probability_0_is_refused_up_front():
    """fit checks every stage before the first step: a sampled alternating stage on tasks of
    probability 0 only failed when it started, after the earlier stages had trained."""
    ds = data()
    model = build_model("shared_bottom", ds.feature_specs, ds.task_specs, trunk=(8,), tower=(4,))
    tr = Trainer(
        model, TrainConfig(order="sampled", probs={"click": 1.0, "like": 1.0, "rating": 0})
    )
    stages = (Stage(2), Stage(1, tasks=("rating",), alternating=True))
    state = SimpleNamespace(params=tr.init(model).params)  # no step may run: it cannot train
    with pytest.raises(ValueError, match=(
        r"^stages\[1\]: probs: every task of the stage \['rating'\] has probability 0; give one "
        r"of its tasks a probability > 0$")):  # fmt: skip
        fit(tr, state, ds, stages, batch_size=4)


@pytest.fixture(scope="module")
def real():
    """A small data set and a factory of (trainer, fresh state) for runs that really train."""
    ds = data()

    def make():
        model = build_model(
            "shared_bottom", ds.feature_specs, ds.task_specs, trunk=(8,), tower=(4,)
        )
        trainer = Trainer(model, TrainConfig())
        return trainer, trainer.init(model, seed=0)

    return ds, make


@pytest.mark.parametrize(
    "kw",
    [
        {"stages": (Stage(1), Stage(1, trainable=("towrs",)))},
        {"stages": (Stage(2), Stage(1, tasks=("clik",)))},
        {"eval_every": 0},
        {"save_every": -1},
    ],
    ids=["trainable", "tasks", "eval_every", "save_every"],
)
def test_nothing_trains_before_a_bad_input_is_reported(real, kw):
    ds, make = real
    trainer, state = make()
    epochs = []
    kw = {"stages": (Stage(2),)} | kw
    with pytest.raises(ValueError):
        fit(trainer, state, ds, kw.pop("stages"), batch_size=10, eval_data=ds,
            on_epoch=epochs.append, **kw)  # fmt: skip
    assert epochs == []


def test_numpy_integers_are_accepted(real):
    ds, make = real
    trainer, state = make()
    r = fit(trainer, state, ds, (Stage(2),), batch_size=np.int64(10), eval_data=ds,
            eval_every=np.int32(2), save_every=np.int64(0))  # fmt: skip
    assert int(r.state.step) == 2 * 2 and [h["epoch"] for h in r.history if "eval" in h] == [1]


def test_mesh_of_three_devices_trains_and_evaluates(real):
    # batch 12 divides by 3 devices; evaluation's own batch size must too (4096 does not)
    ds, make = real
    mesh = parallel.make_mesh(3)
    trainer, state = make()
    r = fit(trainer, state, ds, (Stage(1),), batch_size=12, eval_data=ds, mesh=mesh)
    assert len(r.history) == 1 and int(r.state.step) == 2
    single = evaluate(trainer, jax.device_get(r.state), ds)  # the same state on one device
    for got in (r.history[0]["eval"], evaluate(trainer, r.state, ds, mesh=mesh)):
        assert got.keys() == single.keys()
        for t in single:
            for k, v in single[t].items():
                np.testing.assert_allclose(got[t][k], v, rtol=1e-5, atol=1e-6, err_msg=f"{t}/{k}")
