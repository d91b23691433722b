"""Bad input, table-driven: every case raises one clear error that names the field and the fix.

In-process cases call the library; command-line cases run ``experiments/train.py`` (and
``python -m mtl.data.fetch``) as children, which must print exactly one line ``error: ...`` and
exit 2, without a traceback. In the expected messages ``…`` stands for any text (long name lists).
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

from mtl import aggregation, weighting
from mtl.checkpoint import Checkpointer
from mtl.data import fetch, movielens, splits, synthetic
from mtl.data.batching import Dataset, eval_batches
from mtl.experiment import RunDir
from mtl.models import build_model
from mtl.runner import fit
from mtl.spec import FeatureSpec, TaskSpec, resolve_weights
from mtl.train import Stage, TrainConfig, Trainer, make_schedule

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "train.py"
N = 20
F, L, FS, TS = synthetic.recsys(n=N, num_users=10, num_items=12, seed=1)


def pattern(expected: str) -> str:
    """A regex for ``expected`` with ``…`` matching any text."""
    return ".*".join(re.escape(p) for p in expected.split("…"))


def data(**replace: np.ndarray) -> Dataset:
    """The small synthetic data set with some features or labels replaced."""
    feats = {k: replace.get(k, v) for k, v in F.items()}
    labels = {k: replace.get(k, v) for k, v in L.items()}
    return Dataset(feats, labels, FS, TS)


def at_row(a: np.ndarray, row: int, value) -> np.ndarray:
    out = a.copy()
    out[row] = value
    return out


def abstract(name: str, **sizes) -> nnx.Module:
    """A model with shapes but no values: validation needs no compiled initialisation."""
    return nnx.eval_shape(lambda: build_model(name, FS, TS, **sizes))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict:
    """A model, trainer and parameters to misconfigure, and a scratch folder with a plain file.

    ``state`` holds only the parameters: every case that takes a state fails before using more.
    """
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "file").write_text("not a folder")
    model = abstract("shared_bottom", trunk=(8,), tower=(4,))
    state = SimpleNamespace(params=nnx.split(model, nnx.Param, ...)[1])
    return {"tmp": tmp, "model": model, "trainer": Trainer(model, TrainConfig()), "state": state}


# (id, field the message must start with, call, exception type, expected message)
CASES = [
    # --- unknown names, with the closest valid names
    ("model", "model", lambda c: build_model("mmeo", FS, TS), ValueError,
     "model: unknown value 'mmeo'; did you mean 'mmoe'…? valid: shared_bottom, …"),
    ("model option", "model 'mmoe'", lambda c: build_model("mmoe", FS, TS, trunk=(8,)), ValueError,
     "model 'mmoe': bad option (MMoE.__init__() got an unexpected keyword argument 'trunk'); "
     "see MMoE.__init__"),
    ("task", "task", lambda c: movielens.movielens_tasks(("likes",)), ValueError,
     "task: unknown value 'likes'; did you mean 'like'? valid: like, rating, genre, retrieval"),
    ("stage task", "stage tasks", lambda c: c["trainer"].task_ids(Stage(1, tasks=("clik",))),
     ValueError, "stage tasks: unknown value 'clik'; did you mean 'click'…? valid: click, like, rating"),
    ("schedule", "schedule", lambda c: make_schedule("joitn"), ValueError,
     "schedule: unknown value 'joitn'; did you mean 'joint'? valid: joint, alternating, staged"),
    ("aggregator", "aggregator", lambda c: aggregation.get_aggregator("pcgard"), ValueError,
     "aggregator: unknown value 'pcgard'; did you mean 'pcgrad'…? valid: …pcgrad…"),
    ("aggregator option", "aggregator 'cagrad'",
     lambda c: aggregation.get_aggregator("cagrad", alpha=0.5), ValueError,
     "aggregator 'cagrad': unknown hyper-parameter 'alpha'; …valid: c…"),
    ("DWA temperature 0", "weighting 'dwa' temperature",
     lambda c: weighting.get_weighting("dwa", 3, temperature=0.0), ValueError,
     "weighting 'dwa' temperature: 0.0 must be > 0; a small value such as 0.1 makes the weights "
     "nearly one-hot"),
    ("weighting", "weighting", lambda c: weighting.get_weighting("uncertainity", 3), ValueError,
     "weighting: unknown value 'uncertainity'; did you mean 'uncertainty'? valid: fixed, …"),
    ("optimizer", "optimizer", lambda c: Trainer(c["model"], TrainConfig(optimizer="adamm")),
     ValueError, "optimizer: unknown value 'adamm'; did you mean 'adam'…? valid: adam, …"),
    ("nan policy", "nan_policy", lambda c: Trainer(c["model"], TrainConfig(nan_policy="ignore")),
     ValueError, "nan_policy: unknown value 'ignore'; valid: stop, skip"),
    ("task kind", "task 'x' kind", lambda c: TaskSpec("x", "binray"), ValueError,
     "task 'x' kind: unknown value 'binray'; did you mean 'binary'? valid: binary, …"),
    ("feature kind", "feature 'x' kind", lambda c: FeatureSpec("x", "dens", 3), ValueError,
     "feature 'x' kind: unknown value 'dens'; did you mean 'dense'? valid: dense, …"),
    ("split kind", "split kind",
     lambda c: splits.make_split("randm", user_N=np.zeros(5), item_N=np.zeros(5)), ValueError,
     "split kind: unknown value 'randm'; did you mean 'random'? valid: random, …"),
    ("data set", "data set", lambda c: fetch.ensure("movielens-2m", c["tmp"]), ValueError,
     "data set: unknown name 'movielens-2m'; did you mean 'movielens-1m'…? valid: …"),
    # --- malformed or contradictory configuration
    ("negative epochs", "stage epochs", lambda c: make_schedule("joint", -1), ValueError,
     "stage epochs: -1 must be an integer >= 1"),
    ("no trainable group", "stage trainable", lambda c: Stage(1, trainable=()), ValueError,
     "stage trainable: empty; name at least one group or regex (or 'all')"),
    ("trainable matches nothing", "trainable",
     lambda c: c["trainer"].stage_mask(c["state"], Stage(1, trainable=("experts",))), ValueError,
     "trainable: 'experts' matches no parameter; groups are ('embeddings', 'shared', 'towers', "
     "'heads', 'gates'), paths look like 'encoder/…'"),
    ("weights for missing tasks", "weights", lambda c: resolve_weights(TS, {"clik": 1.0}),
     ValueError, "weights: keys ['clik'] are not tasks; tasks are ['click', 'like', 'rating'] "
     "(remove or rename them)"),
    ("negative weight", "weights['click']", lambda c: resolve_weights(TS, {"click": -1.0}),
     ValueError, "weights['click']: -1.0 must be >= 0"),
    ("stages without staged", "stages", lambda c: make_schedule("joint", 1, [{"epochs": 1}]),
     ValueError, "stages: only the 'staged' schedule takes stages, not 'joint'"),
    ("staged without stages", "stages", lambda c: make_schedule("staged", 1), ValueError,
     "stages: a staged schedule needs at least one stage"),
    ("batch size 0", "batch_size",
     lambda c: fit(c["trainer"], c["state"], data(), (Stage(1),), batch_size=0), ValueError,
     "batch_size: 0 must be >= 1"),
    ("learning rate 0", "learning_rate",
     lambda c: Trainer(c["model"], TrainConfig(learning_rate=0.0)), ValueError,
     "learning_rate: 0.0 must be > 0"),
    ("aggregator without shared parameters", "aggregator",
     lambda c: Trainer(abstract("single_task", trunk=(4,), tower=(2,)),
                       TrainConfig(aggregator="pcgrad")), ValueError,
     "aggregator: 'pcgrad' needs shared parameters, but SingleTask has none; use a hard-sharing "
     "or mixture model, or aggregator=None"),
    ("gradient logging without shared parameters", "log_every",
     lambda c: Trainer(abstract("soft_sharing", trunk=(4,), tower=(2,)),
                       TrainConfig(log_every=2)), ValueError,
     "log_every: 2 logs statistics of the tasks' gradients on the shared parameters, but "
     "SoftSharing has none; use a hard-sharing or mixture model, or log_every=0"),
    ("multiclass of one class", "task 'g' size", lambda c: TaskSpec("g", "multiclass", size=1),
     ValueError, "task 'g' size: multiclass needs size >= 2, got 1"),
    ("probs without sampled order", "probs",
     lambda c: Trainer(c["model"], TrainConfig(probs={"click": 1.0})), ValueError,
     "probs: {'click': 1.0} apply only to order='sampled' (order is 'round_robin'); set "
     "order='sampled' or drop probs"),
    ("aggregator_kwargs without aggregator", "aggregator_kwargs",
     lambda c: Trainer(c["model"], TrainConfig(aggregator_kwargs={"c": 0.4})), ValueError,
     "aggregator_kwargs: {'c': 0.4} without an aggregator would be ignored; set aggregator= or "
     "drop aggregator_kwargs"),
    ("multilabel of one label", "task 'g' size", lambda c: TaskSpec("g", "multilabel", size=1),
     ValueError, "task 'g' size: multilabel needs size >= 2, got 1; for one label use "
     "kind='binary'"),
    ("duplicate tasks", "tasks", lambda c: Dataset(F, L, FS, (TS[0], TS[0], TS[2])), ValueError,
     "tasks: duplicate task names in ('click', 'click', 'rating'); give each task its own name"),
    # --- wrong dtypes, shapes, values
    ("float ids", "feature 'user_id'", lambda c: data(user_id=F["user_id"].astype(np.float32)),
     ValueError, "feature 'user_id' (categorical, dim 10): dtype float32, expected integer ids; "
     "map values to ids"),
    ("ids as a column", "feature 'user_id'", lambda c: data(user_id=F["user_id"][:, None]),
     ValueError, f"feature 'user_id' (categorical, dim 10): shape ({N}, 1), expected [{N}] ids; "
     "pass one id per row"),
    ("too few columns", "feature 'genres'", lambda c: data(genres=F["genres"][:, :5]),
     ValueError, f"feature 'genres' (multihot, dim 8): shape ({N}, 5), expected [{N}, 8]; "
     "fix dim or array"),
    ("NaN feature", "feature 'genres'", lambda c: data(genres=at_row(F["genres"], 3, np.nan)),
     ValueError, "feature 'genres' (multihot, dim 8): 8 NaN/inf values, first at row 3; "
     "impute or drop them before building the Dataset"),
    ("id out of range", "feature 'user_id'", lambda c: data(user_id=at_row(F["user_id"], 3, 10)),
     ValueError, "feature 'user_id' (categorical, dim 10): id 10 out of range [0, 10) at row 3; "
     "remap the ids or raise FeatureSpec.dim"),
    ("negative id", "feature 'item_id'", lambda c: data(item_id=at_row(F["item_id"], 4, -1)),
     ValueError, "feature 'item_id' (categorical, dim 12): id -1 out of range [0, 12) at row 4; "
     "remap the ids or raise FeatureSpec.dim"),
    ("NaN label", "label 'rating'", lambda c: data(rating=at_row(L["rating"], 3, np.nan)),
     ValueError, "label 'rating' (regression): NaN/inf at row 3; mask missing labels instead"),
    ("binary label 2", "label 'click'", lambda c: data(click=at_row(L["click"], 3, 2.0)),
     ValueError, "label 'click' (binary): value [2.] at row 3 is not 0/1; binarise the labels or "
     "use a regression task"),
    ("label as a column", "label 'rating'", lambda c: data(rating=L["rating"][:, None]),
     ValueError, f"label 'rating' (regression): shape ({N}, 1), expected [{N}]; reshape the "
     "labels or fix the spec"),
    ("missing feature", "features",
     lambda c: Dataset({k: v for k, v in F.items() if k != "age"}, L, FS, TS), ValueError,
     "features: keys ['genres', 'item_id', 'user_id'] do not match the specs ['age', 'genres', "
     "'item_id', 'user_id'] (missing ['age'], extra [])"),
    ("rows disagree", "rows", lambda c: data(rating=L["rating"][:10]), ValueError,
     "rows: arrays disagree on the number of rows: {…'rating': 10}; give each one row per example"),
    ("mask out of range", "masks['click']",
     lambda c: Dataset(F, L, FS, TS, masks={"click": np.full(N, 2.0, np.float32)}), ValueError,
     f"masks['click']: expected shape [{N}] with values in [0, 1]"),
    # --- empty data or split, missing files, unwritable folders
    ("empty data", "dataset", lambda c: eval_batches(data().take([]), 16), ValueError,
     "dataset: 0 rows (empty split?); check the split fractions and the data"),
    ("empty training split", "train",
     lambda c: fit(c["trainer"], c["state"], data().take([]), (Stage(1),), batch_size=4),
     ValueError, "train: the training split is empty; check the split and the data"),
    ("empty test split", "split 'test'", lambda c: splits.random_split(3, 0.1), ValueError,
     "split 'test': empty (random over 3 rows, test_fraction=0.1, val_fraction=0.0); "
     "use more data or other split parameters"),
    ("fraction out of range", "test_fraction", lambda c: splits.random_split(100, 1.5),
     ValueError, "test_fraction: 1.5 must lie in [0, 1)"),
    ("missing data files", "movielens-1m",
     lambda c: fetch.ensure("movielens-1m", c["tmp"], download=False), FileNotFoundError,
     "movielens-1m: no data in …/movielens-1m (expected {ratings.dat, movies.dat, users.dat}); "
     "run `python -m mtl.data.fetch movielens-1m --dir …`"),
    ("missing MovieLens folder", "",
     lambda c: movielens.load_movielens("1m", path=c["tmp"], download=False), FileNotFoundError,
     "…: no MovieLens 1m files (GroupLens ratings.dat, movies.dat, users.dat or RecBole "
     "ml-1m.inter, ml-1m.item, ml-1m.user); run `python -m mtl.data.fetch movielens-1m` or pass "
     "path= to them"),
    ("unwritable run directory", "workdir", lambda c: RunDir(c["tmp"] / "file" / "run"),
     ValueError, "workdir: cannot write to '…/file/run' (Not a directory); "
     "pass --config.workdir=<a writable folder>"),
    ("unwritable checkpoint directory", "checkpoint directory",
     lambda c: Checkpointer(c["tmp"] / "file" / "ck", {}), ValueError,
     "checkpoint directory: cannot write to '…/file/ck' (Not a directory); "
     "choose a writable run directory"),
]  # fmt: skip


@pytest.mark.parametrize(
    "field, call, exc, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_raises_a_clear_error(ctx, field, call, exc, expected):
    with pytest.raises(exc) as err:
        call(ctx)
    msg = str(err.value)
    assert msg.startswith(field) and re.fullmatch(pattern(expected), msg), msg


def test_the_table_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------- command line
def write_npz(path: Path, **replace: np.ndarray) -> Path:
    f, lab, _, _ = synthetic.recsys(n=200, num_users=100, num_items=120)
    arrays = {f"feature.{k}": replace.get(k, v) for k, v in f.items()}
    arrays |= {f"label.{k}": replace.get(k, v) for k, v in lab.items()}
    np.savez(path, **arrays)
    return path


def cli_cases(tmp: Path) -> list[tuple[str, list[str], dict, str]]:
    """(id, arguments after the script, extra environment, expected stderr line)."""
    (tmp / "file").write_text("not a folder")
    genres = synthetic.recsys(n=200, num_users=100, num_items=120)[0]["genres"]
    nan = write_npz(tmp / "nan.npz", genres=at_row(genres, 3, np.nan))
    train = [str(SCRIPT), f"--config={SCRIPT}:tiny", f"--config.workdir={tmp / 'run'}"]
    return [
        ("unknown model", [*train, "--config.model=mmeo"], {},
         "error: model: unknown value 'mmeo'; did you mean 'mmoe'…? valid: shared_bottom, …"),
        ("negative epochs", [*train, "--config.epochs=-1"], {},
         "error: stage epochs: -1 must be an integer >= 1"),
        ("unknown config field", [*train, "--config.data.sourc=npz"], {},
         "error: --config.data.sourc: the config has no field 'sourc'; did you mean 'source'? "
         "valid: …"),
        ("wrong type", [*train, "--config.epochs=abc"], {},
         "error: flag --config.epochs=abc: invalid literal for int() with base 10: 'abc'"),
        ("missing data file", [*train, "--config.data.source=npz",
                               f"--config.data.path={tmp / 'none.npz'}"], {},
         f"error: data.path: no file '{tmp / 'none.npz'}'; pass --config.data.path=<an .npz "
         "file> with keys 'feature.<name>' and 'label.<task>'"),
        ("NaN features", [*train, "--config.data.source=npz", f"--config.data.path={nan}"], {},
         "error: feature 'genres' (multihot, dim 8): 8 NaN/inf values, first at row 3; "
         "impute or drop them before building the Dataset"),
        ("missing MovieLens", [*train, "--config.data.source=movielens",
                               "--config.data.download=False"], {"MTL_DATA_DIR": str(tmp)},
         f"error: movielens-1m: no data in {tmp}/movielens-1m (expected {{ratings.dat, "
         "movies.dat, users.dat}); run `python -m mtl.data.fetch movielens-1m`"),
        ("unwritable workdir", [*train, f"--config.workdir={tmp / 'file' / 'run'}"], {},
         f"error: workdir: cannot write to '{tmp / 'file' / 'run'}' (Not a directory); "
         "pass --config.workdir=<a writable folder>"),
        ("missing config file", [str(SCRIPT), f"--config={tmp / 'none.py'}"], {},
         f"error: --config: cannot load '{tmp / 'none.py'}' (no such file); "
         "pass --config=<path of a config .py file>[:variant]"),
        ("fetch: unknown data set", ["-m", "mtl.data.fetch", "movielens-2m"], {},
         "error: data set: unknown name 'movielens-2m'; did you mean 'movielens-1m'…? valid: …"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, child_env) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Run every command-line case (4 at a time) once."""
    tmp = tmp_path_factory.mktemp("cli")
    env = child_env

    def one(case):
        name, args, extra, expected = case
        done = subprocess.run([sys.executable, *args], env=env | extra, cwd=ROOT,
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        return name, (done, expected)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, cli_cases(tmp)))


CLI_IDS = [
    "unknown model", "negative epochs", "unknown config field", "wrong type",
    "missing data file", "NaN features", "missing MovieLens", "unwritable workdir",
    "missing config file", "fetch: unknown data set",
]  # fmt: skip


def test_the_command_line_table_is_complete(tmp_path):
    assert [c[0] for c in cli_cases(tmp_path)] == CLI_IDS


@pytest.mark.parametrize("name", CLI_IDS)
def test_command_line_prints_one_line_and_exits_2(cli_results, name):
    done, expected = cli_results[name]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(pattern(expected), errors[0]), done.stderr
    assert done.stderr.strip().splitlines()[-1] == errors[0]


def test_runs_starting_together_in_one_folder_pass_the_write_check(tmp_path):
    # The write check of RunDir and Checkpointer probes the folder; runs that start at the same time
    # in the same folder (a sweep's jobs, the command-line cases above) must not fail each other's.
    def start(i):
        RunDir(tmp_path / "run")
        Checkpointer(tmp_path / "run" / "ck", {})
        return i

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(start, range(400))) == list(range(400))
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name != "ck"]  # no probe left
