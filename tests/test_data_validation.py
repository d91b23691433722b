"""Bad input to the data API gets a clear error naming the field, the value and the fix; nothing is
silently coerced or dropped (Dataset leaves, take, MovieLens files and options, specs, splits,
batch sizes, seeds and fractions, Census task names)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data_census import write as write_census
from test_data_movielens import ML1M, ML100K, RECBOLE, write

from mtl.data import census as C
from mtl.data import movielens as M
from mtl.data import splits as S
from mtl.data.batching import Dataset, epoch_batches, eval_batches, num_batches
from mtl.spec import FeatureSpec, TaskSpec, resolve_weights

F = (FeatureSpec("item", "categorical", 10), FeatureSpec("x", "dense", 2))
T = (TaskSpec("click", "binary"),)


def dataset(item, click, x=None) -> Dataset:
    x = np.zeros((len(item), 2), np.float32) if x is None else x
    return Dataset({"item": item, "x": x}, {"click": click}, F, T)


# -- 3: every Dataset leaf is converted to numpy and checked -------------------------------------


@pytest.mark.parametrize("make", [jnp.asarray, list], ids=["jax", "list"])
def test_dataset_checks_jax_and_list_leaves(make):
    with pytest.raises(ValueError, match=r"feature 'item' \(categorical, dim 10\): id 99 out of"):
        dataset(make([3, 99, 4]), make([0.0, 1.0, 0.0]))
    with pytest.raises(
        ValueError, match=r"label 'click' \(binary\): value \[2\.\] at row 1 is not"
    ):
        dataset(make([3, 9, 4]), make([0.0, 2.0, 0.0]))
    ds = dataset(make([3, 9, 4]), make([0.0, 1.0, 0.0]))
    assert all(type(v) is np.ndarray for v in [*ds.features.values(), *ds.labels.values()])
    assert ds.features["item"].dtype == np.int32
    b = eval_batches(ds, 2)  # lists used to fail here with AttributeError
    np.testing.assert_array_equal(np.asarray(b["features"]["item"]).reshape(-1)[:3], [3, 9, 4])


def test_dataset_checks_numpy_leaves_next_to_a_jax_leaf():
    with pytest.raises(ValueError, match=r"feature 'item' .*id -4 out of range \[0, 10\) at row 2"):
        dataset(np.array([3, 9, -4]), jnp.asarray([0.0, 1.0, 0.0]))


def test_dataset_refuses_ragged_and_text_leaves():
    with pytest.raises(ValueError, match=r"features\['x'\]: cannot be made an array"):
        dataset(np.array([1, 2]), np.zeros(2, np.float32), x=[[0.0, 1.0], [2.0]])
    with pytest.raises(ValueError, match=r"feature 'x' \(dense, dim 2\): dtype <U1, expected numb"):
        dataset(np.array([1, 2]), np.zeros(2, np.float32), x=np.full((2, 2), "a"))
    with pytest.raises(ValueError, match=r"label 'click' \(binary\): dtype <U1, expected numbers"):
        dataset(np.array([1, 2]), np.array(["0", "1"]))


def test_device_copies_still_skip_the_checks():
    ds = dataset(np.array([3, 9, 4]), np.array([0.0, 1.0, 0.0], np.float32))
    dev = ds.to_device()
    assert isinstance(dev.features["item"], jax.Array)  # not pulled back to the host
    sub = dev.take(np.array([2, 0]))
    np.testing.assert_array_equal(np.asarray(sub.features["item"]), [4, 3])


# -- 4: take with a boolean mask or non-integer indices ------------------------------------------


def test_take_boolean_mask_selects_rows():
    ds = dataset(np.arange(6), np.zeros(6, np.float32))
    sub = ds.take(np.array([False, False, False, False, True, True]))
    assert len(sub) == 2  # was 6 rows: rows 0 and 1 repeated
    np.testing.assert_array_equal(sub.features["item"], [4, 5])
    assert len(ds.take([])) == 0


@pytest.mark.parametrize(
    "idx, pattern",
    [
        (
            np.array([True, False]),
            r"idx_N: a boolean mask of shape \(2,\); a mask needs shape \[6\]",
        ),
        (np.array([4.9, 5.2]), r"idx_N: dtype float64 \(e\.g\. 4\.9\): row indices must be int"),
        (np.array([[1, 2]]), r"idx_N: shape \(1, 2\); pass a 1-D array of row indices"),
        (np.array([1, 6]), r"idx_N: index 6 out of range; indices must lie in \[0, 6\)"),
    ],
    ids=["short mask", "floats", "2-D", "out of range"],
)
def test_take_refuses_bad_indices(idx, pattern):
    ds = dataset(np.arange(6), np.zeros(6, np.float32))
    with pytest.raises(ValueError, match=pattern):
        ds.take(idx)


# -- 6: MovieLens ratings, duplicate ids, title_buckets, features as one name ---------------------


@pytest.mark.parametrize("rating", ["7", "nan", "-3", "0.5", "inf"])
def test_movielens_refuses_ratings_outside_1_to_5(tmp_path, rating):
    data = [*ML100K["u.data"][:2], f"2\t1\t{rating}\t878542960"]
    value = str(float(rating))
    with pytest.raises(ValueError, match=rf"u\.data:3: rating {value} is not a number in \[1, 5\]"):
        M.load_movielens("100k", path=write(tmp_path, ML100K, {"u.data": data}))


def test_movielens_ratings_checked_for_every_source(tmp_path, monkeypatch):
    inter = [*RECBOLE["ml-100k.inter"][:2], "2\t1\t6\t878542960"]
    with pytest.raises(ValueError, match=r"ml-100k\.inter:3: rating 6\.0 is not a number in"):
        M.load_movielens("100k", path=write(tmp_path / "rb", RECBOLE, {"ml-100k.inter": inter}))
    ratings = [*ML1M["ratings.dat"][:1], "1::5::0::978302109"]
    with pytest.raises(ValueError, match=r"ratings\.dat:2: rating 0\.0 is not a number in"):
        M.load_movielens("1m", path=write(tmp_path / "1m", ML1M, {"ratings.dat": ratings}))
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):  # the mock draws ratings in [0, 1)
        with pytest.raises(ValueError, match=r"tfds:movielens/100k-ratings\[train\]:0: rating 0\."):
            M.load_movielens("100k", source="tfds")


def test_movielens_accepts_ratings_in_range(tmp_path):
    data = [*ML100K["u.data"][:2], "2\t1\t4.5\t878542960"]
    ml = M.load_movielens("100k", path=write(tmp_path, ML100K, {"u.data": data}))
    np.testing.assert_array_equal(ml.rating_N, [5.0, 3.0, 4.5])


@pytest.mark.parametrize(
    "version, files, name, extra, pattern",
    [
        ("100k", ML100K, "u.user", "1|70|F|doctor|12345", r"u\.user:4: duplicate user id '1'"),
        ("100k", ML100K, "u.item", ML100K["u.item"][0], r"u\.item:5: duplicate item id '1'"),
        ("1m", ML1M, "users.dat", "2::F::1::10::48067", r"users\.dat:4: duplicate user id '2'"),
        ("1m", ML1M, "movies.dat", "5::X (1990)::Comedy", r"movies\.dat:4: duplicate item id '5'"),
        (
            "100k",
            RECBOLE,
            "ml-100k.user",
            "3\t23\tM\twriter\t1",
            r"ml-100k\.user:5: .* user id '3'",
        ),
        ("100k", RECBOLE, "ml-100k.item", "4\tX\t1990\tDrama", r"ml-100k\.item:6: .* item id '4'"),
    ],
    ids=["u.user", "u.item", "users.dat", "movies.dat", "recbole.user", "recbole.item"],
)
def test_movielens_refuses_duplicate_ids(tmp_path, version, files, name, extra, pattern):
    edit = {name: [*files[name], extra]}
    with pytest.raises(ValueError, match=pattern + r", already on line \d+; each .* must appear o"):
        M.load_movielens(version, path=write(tmp_path, files, edit))


@pytest.fixture
def ml100k(tmp_path) -> M.MovieLens:
    return M.load_movielens("100k", path=write(tmp_path, ML100K))


@pytest.mark.parametrize(
    "value, pattern",
    [
        (0, r"title_buckets: 0 must be >= 1"),
        (2.5, r"title_buckets: 2\.5 must be an integer, not a float .*pass 2 or 3"),
        ("8", r"title_buckets: '8' must be an integer, not str"),
    ],
    ids=["zero", "float", "str"],
)
def test_movielens_title_buckets(ml100k, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        M.movielens_dataset(ml100k, ("like",), title_buckets=value)
    with pytest.raises(ValueError, match=pattern):
        M.item_features(ml100k, title_buckets=value)
    with pytest.raises(ValueError, match=pattern.replace("title_buckets", "buckets")):
        M.hashed_bag(["a title"], value)


def test_movielens_features_as_one_name(ml100k):
    ds = M.movielens_dataset(ml100k, ("like",), features="user_id")
    assert list(ds.features) == ["user_id"]
    with pytest.raises(ValueError, match=r"feature: unknown value 'users'; did you mean 'user_id'"):
        M.movielens_dataset(ml100k, ("like",), features="users")


# -- 7: the timestamp feature is standardised on fit_rows -----------------------------------------


def test_timestamp_standardised_on_fit_rows_only(ml100k):
    sp = S.make_split("temporal", user_N=ml100k.user_N, item_N=ml100k.item_N,
                      timestamp_N=ml100k.timestamp_N)  # fmt: skip
    feats = ("user_id", "timestamp")

    def train_times(ml, **kw):
        ds = M.movielens_dataset(ml, ("like",), features=feats, **kw)
        return ds.take(sp.train).features["timestamp"][:, 0]

    ts = ml100k.timestamp_N.copy()
    ts[sp.test] += 10**8  # only the test rows' times change
    shifted = dataclasses.replace(ml100k, timestamp_N=ts)
    a = train_times(ml100k, fit_rows=sp.train)
    np.testing.assert_allclose(a, train_times(shifted, fit_rows=sp.train), rtol=1e-6)
    assert abs(a.mean()) < 1e-5 and abs(a.std() - 1.0) < 1e-4
    assert not np.allclose(train_times(ml100k), train_times(shifted))  # None: all rows, as before
    np.testing.assert_allclose(
        train_times(ml100k), train_times(ml100k, fit_rows=np.arange(len(ml100k))), rtol=1e-6
    )


@pytest.mark.parametrize(
    "rows, pattern",
    [
        (np.ones(8, bool), r"fit_rows: got bool array of shape \(8,\); pass a non-empty 1-D array"),
        (np.array([0.0, 1.0]), r"fit_rows: got float64 array .*integer row indices"),
        (np.array([], np.int64), r"fit_rows: got int64 array of shape \(0,\)"),
        (np.array([0, 8]), r"fit_rows: row 8 out of range; indices must lie in \[0, 8\)"),
    ],
    ids=["bool mask", "floats", "empty", "out of range"],
)
def test_fit_rows_refuses_bad_rows(ml100k, rows, pattern):
    with pytest.raises(ValueError, match=pattern):
        M.movielens_dataset(ml100k, ("like",), features=("timestamp",), fit_rows=rows)


# -- 8: spec sizes are integers, weights real numbers --------------------------------------------


@pytest.mark.parametrize(
    "make, pattern",
    [
        (
            lambda: FeatureSpec("item", "categorical", 10.5),
            r"feature 'item' dim: 10\.5 must be an ",
        ),
        (lambda: FeatureSpec("item", "categorical", 10, 4.9), r"feature 'item' embed_dim: 4\.9 mu"),
        (
            lambda: FeatureSpec("x", "dense", "2"),
            r"feature 'x' dim: '2' must be an integer, not st",
        ),
        (lambda: TaskSpec("g", "multilabel", size=3.7), r"task 'g' size: 3\.7 must be an integer"),
        (lambda: TaskSpec("g", "multilabel", size="2"), r"task 'g' size: '2' must be an integer"),
        (lambda: TaskSpec("g", "multilabel", size=True), r"task 'g' size: True must be an integer"),
        (lambda: TaskSpec("c", "binary", weight="heavy"), r"task 'c' weight: 'heavy' must be a re"),
        (lambda: TaskSpec("c", "binary", weight=True), r"task 'c' weight: True must be a real num"),
        (lambda: TaskSpec("c", "binary", weight=np.inf), r"task 'c' weight: inf must be a finite"),
        (lambda: TaskSpec("c", "binary", weight=np.nan), r"task 'c' weight: nan must be a finite"),
        (lambda: resolve_weights(T, {"click": "2"}), r"weights\['click'\]: '2' must be a real num"),
    ],
    ids=[
        "dim float",
        "embed_dim float",
        "dim str",
        "size float",
        "size str",
        "size bool",
        "weight str",
        "weight bool",
        "weight inf",
        "weight nan",
        "resolve_weights str",
    ],
)
def test_spec_sizes_and_weights(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_spec_normalises_numpy_numbers():
    f = FeatureSpec("item", "categorical", np.int64(10), np.int32(4))
    t = TaskSpec("g", "multilabel", size=np.int64(3), weight=np.float32(0.5))
    assert (type(f.dim), type(f.embed_dim), type(t.size), type(t.weight)) == (int, int, int, float)
    assert TaskSpec("c", "binary", weight=2).weight == 2.0


# -- 9: temporal make_split takes no test_fraction or seed; batch sizes are integers --------------

U, I, TS = np.repeat(np.arange(4), 5), np.arange(20), np.tile(np.arange(5), 4)


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"test_fraction": 0.2}, r"test_fraction: 0\.2 given, but the temporal split takes no t"),
        ({"seed": 42}, r"seed: 42 given, but the temporal split takes no seed \(the split is det"),
        ({"val_fraction": "0.1"}, r"val_fraction: '0\.1' must be a real number, not str"),
    ],
    ids=["test_fraction", "seed", "val_fraction str"],
)
def test_temporal_make_split_refuses_ignored_arguments(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        S.make_split("temporal", user_N=U, item_N=I, timestamp_N=TS, **kw)


def test_make_split_defaults_unchanged():
    sp = S.make_split("temporal", user_N=U, item_N=I, timestamp_N=TS, val_fraction=0.1)
    assert (sp.train.size, sp.val.size, sp.test.size) == (12, 4, 4)
    for kind, split in (("random", S.random_split(20)), ("cold_user", S.cold_start_split(U))):
        via = S.make_split(kind, user_N=U, item_N=I)
        assert all(np.array_equal(a, b) for a, b in zip(via, split))
    seeded = S.make_split("random", user_N=U, item_N=I, test_fraction=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(seeded, S.random_split(20, 0.5, seed=3)))


@pytest.mark.parametrize(
    "batch_size, pattern",
    [
        (
            3.9,
            r"batch_size: 3\.9 must be an integer, not a float \(it is not truncated\); pass 3 o",
        ),
        (0.5, r"batch_size: 0\.5 must be an integer, not a float .*pass 1$"),
        ("4", r"batch_size: '4' must be an integer, not str"),
    ],
    ids=["3.9", "0.5", "str"],
)
def test_batch_size_must_be_an_integer(batch_size, pattern):
    ds = dataset(np.arange(10), np.zeros(10, np.float32))
    for call in (
        lambda: epoch_batches(ds, batch_size, jax.random.key(0)),
        lambda: eval_batches(ds, batch_size),
        lambda: num_batches(10, batch_size),
    ):
        with pytest.raises(ValueError, match=pattern):
            call()


# -- 10: seeds are integers, fractions real numbers ----------------------------------------------


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: S.random_split(10, seed=1.5), r"seed: 1\.5 must be an integer, not a float"),
        (lambda: S.random_split(10, seed=True), r"seed: True must be an integer, not a bool"),
        (lambda: S.random_split(10.0), r"n: 10\.0 must be an integer"),
        (lambda: S.cold_start_split(U, seed=2.0), r"seed: 2\.0 must be an integer, not a float"),
        (lambda: S.random_split(10, "0.2"), r"test_fraction: '0\.2' must be a real number, not st"),
        (lambda: S.random_split(10, 0.2, True), r"val_fraction: True must be a real number, not a"),
        (lambda: S.cold_start_split(U, np.nan), r"test_fraction: nan must be a finite number"),
    ],
    ids=[
        "seed float",
        "seed bool",
        "n float",
        "cold seed float",
        "fraction str",
        "fraction bool",
        "fraction nan",
    ],
)
def test_split_seeds_and_fractions(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"seed": 1.5}, r"seed: 1\.5 must be an integer, not a float"),
        ({"seed": False}, r"seed: False must be an integer, not a bool"),
        ({"val_fraction": "0.3"}, r"val_fraction: '0\.3' must be a real number, not str; pass a"),
        ({"val_fraction": True}, r"val_fraction: True must be a real number, not a bool"),
        ({"val_fraction": 1.0}, r"val_fraction: 1\.0 must lie in \(0, 1\)"),
    ],
    ids=["seed float", "seed bool", "val_fraction str", "val_fraction bool", "val_fraction 1.0"],
)
def test_census_seed_and_val_fraction(tmp_path, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        C.load_census(path=write_census(tmp_path), **kw)


# -- 11: census group names inside a sequence ----------------------------------------------------


def test_census_group_name_inside_a_sequence():
    msg = r"task: 'group1' is a group name inside a sequence; group names are passed alone, e\.g\. "
    with pytest.raises(ValueError, match=msg + r"tasks='group1'"):
        C.census_tasks(["group1"])
    with pytest.raises(ValueError, match=r"task: 'group2' is a group name"):
        C.census_tasks(("group2", "income"))
    with pytest.raises(ValueError, match=r"task: unknown value 'incme'") as err:
        C.census_tasks(["incme", "marital"])
    assert "group" not in str(err.value)  # elements are task names only
    with pytest.raises(ValueError, match=r"task: unknown value 'group3'; did you mean 'group"):
        C.census_tasks("group3")
    assert [t.name for t in C.census_tasks("group2")] == ["education", "marital"]
