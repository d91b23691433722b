"""MovieLens 100K / 1M as typed numpy arrays, features as FeatureSpecs and tasks as TaskSpecs.

Sources, tried in this order when ``source="auto"``: a prepared TFDS ``movielens/{100k,1m}-ratings``
(read with ``tfds.data_source``, no TensorFlow needed), the GroupLens files (``u.data``,
``u.item``, ``u.user`` or ``ratings.dat``, ``movies.dat``, ``users.dat``), RecBole atomic files
(``ml-100k.inter``, ``.item``, ``.user``). Without ``path`` the files are looked up in the cache of
``mtl.data.fetch`` (fetched on first use when ``download=True``).

Features (one row per rating): ``user_id``, ``item_id`` (dense ids 0..U-1 / 0..I-1 in order of the
raw ids), ``age`` (7 buckets: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``gender`` (0 F, 1 M),
``occupation`` (0 unknown, else 1 + index in OCCUPATIONS[version]), ``zip`` (first character of the
zip code: 1 + digit, 0 when not a digit, e.g. Canadian codes), ``genres`` (multi-hot, 19 for 100K,
18 for 1M), ``year`` (release year bucketized by decade: 0 unknown, 1 before 1930, 2..8 the 1930s
to the 1990s, 9 from 2000), ``title`` (hashed bag of lower-cased title words, crc32 mod
``title_buckets``, counts; the trailing "(year)" is removed) and ``timestamp`` (standardized with
the mean and std of the rows ``fit_rows`` given to ``movielens_dataset``: pass the training rows so
that val/test times do not shape the feature; by default (None) all loaded ratings, val and test
included). Memory: ``title`` is [N, title_buckets] float32, 4.1 GB for ML-1M at 1024 buckets (a
shuffled epoch on device doubles it); title_buckets=256 quarters it.

Ratings must be finite and in [1, 5] (100K and 1M have whole stars 1-5); each user and item id
appears once in its table. Both are checked on load, with the file and line of the first bad row.

Tasks: ``like`` (rating >= 4, binary), ``rating`` (1-5, regression), ``genre`` (the item's genres,
multilabel) and ``retrieval`` (label = item id). When ``genre`` is a task, the ``genres`` feature is
dropped from the inputs so the label is not fed to the model.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mtl.data import fetch
from mtl.data.batching import Dataset
from mtl.spec import FeatureSpec, TaskSpec, integer, unknown

VERSIONS = ("100k", "1m")
SOURCES = ("auto", "tfds", "grouplens", "recbole")
TASKS = ("like", "rating", "genre", "retrieval")
USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip")
ITEM_FEATURES = ("item_id", "genres", "year", "title")
FEATURES = USER_FEATURES + ITEM_FEATURES + ("timestamp",)

GENRES_1M = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
)  # fmt: skip
GENRES = {"100k": ("unknown",) + GENRES_1M, "1m": GENRES_1M}
OCCUPATIONS = {
    "100k": (
        "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
        "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other",
        "programmer", "retired", "salesman", "scientist", "student", "technician", "writer",
    ),
    "1m": (
        "other/not specified", "academic/educator", "artist", "clerical/admin",
        "college/grad student", "customer service", "doctor/health care", "executive/managerial",
        "farmer", "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
        "scientist", "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed",
        "writer",
    ),
}  # fmt: skip
RATINGS = (1.0, 5.0)  # the range of a rating in 100K and 1M (whole stars)
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # bucket = number of edges <= age (the TFDS buckets)
YEAR_EDGES = (1930, 1940, 1950, 1960, 1970, 1980, 1990, 2000)
TFDS_GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "Unknown", "War", "Western", "(no genres listed)",
)  # fmt: skip
GROUPLENS_FILES = {
    "100k": ("u.data", "u.item", "u.user"),
    "1m": ("ratings.dat", "movies.dat", "users.dat"),
}
RECBOLE_FILES = {v: tuple(f"ml-{v}.{ext}" for ext in ("inter", "item", "user")) for v in VERSIONS}
_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")
_DATE = re.compile(r"^(?:\d{1,2}-[A-Za-z]{3}-)?(\d{4})$")
_WORD = re.compile(r"[a-z0-9]+")


@dataclasses.dataclass(frozen=True)
class MovieLens:
    """Ratings [N] with dense user/item ids, plus per-user [U] and per-item [I] attribute tables."""

    version: str
    source: str
    user_N: np.ndarray  # int32 in [0, U)
    item_N: np.ndarray  # int32 in [0, I)
    rating_N: np.ndarray  # float32
    timestamp_N: np.ndarray  # int64 seconds
    user_ids: np.ndarray  # str [U], raw ids
    age_U: np.ndarray  # int32 age in years (or the bucket's lower bound in 1M / TFDS)
    gender_U: np.ndarray  # int32 0 F, 1 M
    occupation_U: np.ndarray  # str [U]
    zip_U: np.ndarray  # str [U]
    item_ids: np.ndarray  # str [I], raw ids
    title_I: np.ndarray  # str [I]
    year_I: np.ndarray  # int32, 0 unknown
    genres_IxG: np.ndarray  # float32 multi-hot over GENRES[version]

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0])

    def __len__(self) -> int:
        return int(self.rating_N.shape[0])


def _check_version(version: str) -> str:
    if version not in VERSIONS:
        raise unknown("version", version, VERSIONS)
    return version


def _lines(path: Path, skip: int = 0) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-empty lines, decoded as latin-1."""
    with open(path, encoding="latin-1", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if lineno > skip and line.strip():
                yield lineno, line


def _fields(path: Path, lineno: int, line: str, sep: str, n: int, what: str) -> list[str]:
    parts = line.split(sep)
    if len(parts) != n:
        raise ValueError(
            f"{path}:{lineno}: malformed row, expected {n} {sep!r}-separated fields ({what}), "
            f"got {len(parts)}: {line[:120]!r}"
        )
    return parts


def _int(path: Path, lineno: int, field: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"{path}:{lineno}: malformed row, {field} {value!r} is not an integer"
        ) from None


def _float(path: Path, lineno: int, field: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"{path}:{lineno}: malformed row, {field} {value!r} is not a number"
        ) from None


def _year(text: str) -> int:
    """The year of '1995', '01-Jan-1995' or 'Title (1995)'; 0 when there is none."""
    m = _DATE.match(text.strip()) or _YEAR_IN_TITLE.search(text)
    return int(m.group(1)) if m else 0


def _put(
    table: dict[str, tuple],
    first: dict[str, int],
    what: str,
    key: str,
    row: tuple,
    path: Path,
    lineno: int,
) -> None:
    """``table[key] = row``; an id already in the table is an error naming both lines."""
    if key in table:
        raise ValueError(
            f"{path}:{lineno}: duplicate {what} id {key!r}, already on line {first[key]}; each "
            f"{what} must appear once: remove or merge the repeated row"
        )
    table[key], first[key] = row, lineno


def _index(
    raw: Sequence[str], ids: np.ndarray, path: Path, lines: Sequence[int], what: str
) -> np.ndarray:
    """Dense ids of ``raw`` in the table ``ids``; a value missing from the table is an error."""
    lookup = {k: i for i, k in enumerate(ids.tolist())}
    out = np.empty(len(raw), np.int32)
    for j, r in enumerate(raw):
        i = lookup.get(r)
        if i is None:
            raise ValueError(
                f"{path}:{lines[j]}: {what} id {r!r} out of range: not among the {len(ids)} ids "
                f"of the {what} table; the files are from different releases"
            )
        out[j] = i
    return out


def _sort_ids(ids: Sequence[str]) -> np.ndarray:
    """Raw ids sorted numerically when all are integers, else as strings."""
    keys = list(ids)
    if all(k.isdigit() for k in keys):
        keys.sort(key=int)
    else:
        keys.sort()
    return np.asarray(keys, dtype=str)


def _build(
    version: str,
    source: str,
    ratings: tuple[list[str], list[str], list[float], list[int]],
    lines: Sequence[int],
    ratings_path: Path,
    users: dict[str, tuple[int, int, str, str]],
    items: dict[str, tuple[str, int, np.ndarray]],
) -> MovieLens:
    user_ids, item_ids = _sort_ids(users), _sort_ids(items)
    u_raw, i_raw, rating, ts = ratings
    rating_N = np.asarray(rating, np.float64)
    bad = ~((rating_N >= RATINGS[0]) & (rating_N <= RATINGS[1]))  # NaN is bad too
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{ratings_path}:{lines[j]}: rating {rating[j]!r} is not a number in "
            f"[{RATINGS[0]:g}, {RATINGS[1]:g}] (MovieLens {version} has whole stars 1-5); "
            f"{int(bad.sum())} such row(s): fix or drop them"
        )
    ucols = list(zip(*(users[k] for k in user_ids.tolist()))) or [(), (), (), ()]
    icols = list(zip(*(items[k] for k in item_ids.tolist()))) or [(), (), ()]
    g = len(GENRES[version])
    return MovieLens(
        version=version,
        source=source,
        user_N=_index(u_raw, user_ids, ratings_path, lines, "user"),
        item_N=_index(i_raw, item_ids, ratings_path, lines, "item"),
        rating_N=rating_N.astype(np.float32),
        timestamp_N=np.asarray(ts, np.int64),
        user_ids=user_ids,
        age_U=np.asarray(ucols[0], np.int32),
        gender_U=np.asarray(ucols[1], np.int32),
        occupation_U=np.asarray(ucols[2], dtype=str),
        zip_U=np.asarray(ucols[3], dtype=str),
        item_ids=item_ids,
        title_I=np.asarray(icols[0], dtype=str),
        year_I=np.asarray(icols[1], np.int32),
        genres_IxG=np.asarray(icols[2], np.float32).reshape(len(item_ids), g),
    )


def _gender(path: Path, lineno: int, value: str) -> int:
    if value not in ("F", "M"):
        raise ValueError(f"{path}:{lineno}: malformed row, gender {value!r} is not 'F' or 'M'")
    return int(value == "M")


def _genre_row(names: Sequence[str], version: str, path: Path, lineno: int) -> np.ndarray:
    vocab = {n: i for i, n in enumerate(GENRES[version])}
    row = np.zeros(len(vocab), np.float32)
    for name in names:
        if name not in vocab:
            raise ValueError(
                f"{path}:{lineno}: unknown genre {name!r}; known: {', '.join(GENRES[version])}"
            )
        row[vocab[name]] = 1.0
    return row


def _read_ratings(
    path: Path, sep: str, skip: int = 0, cols: Sequence[int] = (0, 1, 2, 3), n: int = 4
) -> tuple[tuple[list[str], list[str], list[float], list[int]], list[int]]:
    u, i, r, t, lines = [], [], [], [], []
    what = "user id, item id, rating, timestamp"
    for lineno, line in _lines(path, skip):
        f = _fields(path, lineno, line, sep, n, what)
        f = [f[c] for c in cols]
        u.append(str(_int(path, lineno, "user id", f[0])))
        i.append(str(_int(path, lineno, "item id", f[1])))
        r.append(_float(path, lineno, "rating", f[2]))
        t.append(_int(path, lineno, "timestamp", f[3].split(".")[0]))
        lines.append(lineno)
    return (u, i, r, t), lines


def read_grouplens(path: str | os.PathLike, version: str = "100k") -> MovieLens:
    """Parse the GroupLens files of ``version`` in directory ``path`` (latin-1)."""
    version = _check_version(version)
    d = Path(path)
    _require(d, GROUPLENS_FILES[version], version)
    users: dict[str, tuple[int, int, str, str]] = {}
    items: dict[str, tuple[str, int, np.ndarray]] = {}
    ulines: dict[str, int] = {}
    ilines: dict[str, int] = {}
    if version == "100k":
        p = d / "u.user"
        for lineno, line in _lines(p):
            uid, age, gender, occ, zc = _fields(
                p, lineno, line, "|", 5, "id|age|gender|occupation|zip"
            )
            row = (_int(p, lineno, "age", age), _gender(p, lineno, gender), occ, zc)
            _put(users, ulines, "user", str(_int(p, lineno, "user id", uid)), row, p, lineno)
        p = d / "u.item"
        for lineno, line in _lines(p):
            f = _fields(p, lineno, line, "|", 24, "id|title|date|video date|url|19 genre flags")
            flags = f[5:]
            if any(x not in ("0", "1") for x in flags):
                raise ValueError(f"{p}:{lineno}: malformed row, genre flags {flags} are not 0/1")
            title = f[1]
            row = (title, _year(f[2]) or _year(title), np.asarray(flags, np.float32))
            _put(items, ilines, "item", str(_int(p, lineno, "item id", f[0])), row, p, lineno)
        ratings, lines = _read_ratings(d / "u.data", "\t")
        return _build(version, "grouplens", ratings, lines, d / "u.data", users, items)
    p = d / "users.dat"
    occupations = OCCUPATIONS["1m"]
    for lineno, line in _lines(p):
        uid, gender, age, occ, zc = _fields(
            p, lineno, line, "::", 5, "id::gender::age::occupation::zip"
        )
        k = _int(p, lineno, "occupation", occ)
        if not 0 <= k < len(occupations):
            raise ValueError(f"{p}:{lineno}: occupation {k} out of range [0, {len(occupations)})")
        row = (_int(p, lineno, "age", age), _gender(p, lineno, gender), occupations[k], zc)
        _put(users, ulines, "user", str(_int(p, lineno, "user id", uid)), row, p, lineno)
    p = d / "movies.dat"
    for lineno, line in _lines(p):
        mid, title, genres = _fields(p, lineno, line, "::", 3, "id::title::genres")
        row = (title, _year(title), _genre_row(genres.split("|"), version, p, lineno))
        _put(items, ilines, "item", str(_int(p, lineno, "item id", mid)), row, p, lineno)
    ratings, lines = _read_ratings(d / "ratings.dat", "::")
    return _build(version, "grouplens", ratings, lines, d / "ratings.dat", users, items)


def _header(
    path: Path, want: Sequence[str], alias: dict[str, str] | None = None
) -> tuple[list[int], int]:
    """Column positions of ``want`` in a RecBole header such as ``user_id:token``, and its width."""
    with open(path, encoding="latin-1") as f:
        names = [h.split(":")[0] for h in f.readline().rstrip("\r\n").split("\t")]
    alias = alias or {}
    cols = []
    for w in want:
        found = [i for i, h in enumerate(names) if h == w or alias.get(h) == w]
        if not found:
            raise ValueError(
                f"{path}:1: header {names} lacks column {w!r}; is this a RecBole file?"
            )
        cols.append(found[0])
    return cols, len(names)


def read_recbole(path: str | os.PathLike, version: str = "100k") -> MovieLens:
    """Parse RecBole atomic files ``ml-{version}.{inter,item,user}`` (tab-separated, typed)."""
    version = _check_version(version)
    d = Path(path)
    inter, item, user = RECBOLE_FILES[version]
    _require(d, RECBOLE_FILES[version], version)
    users: dict[str, tuple[int, int, str, str]] = {}
    items: dict[str, tuple[str, int, np.ndarray]] = {}
    ulines: dict[str, int] = {}
    ilines: dict[str, int] = {}
    p = d / user
    cols, width = _header(p, ("user_id", "age", "gender", "occupation", "zip_code"))
    for lineno, line in _lines(p, skip=1):
        f = _fields(p, lineno, line, "\t", width, "see header")
        uid, age, gender, occ, zc = (f[c] for c in cols)
        if version == "1m" and occ.isdigit():
            occ = OCCUPATIONS["1m"][int(occ)] if int(occ) < len(OCCUPATIONS["1m"]) else occ
        row = (_int(p, lineno, "age", age), _gender(p, lineno, gender), occ, zc)
        _put(users, ulines, "user", str(_int(p, lineno, "user id", uid)), row, p, lineno)
    p = d / item
    cols, width = _header(
        p, ("item_id", "movie_title", "release_year", "class"), {"genre": "class"}
    )
    for lineno, line in _lines(p, skip=1):
        f = _fields(p, lineno, line, "\t", width, "see header")
        iid, title, year, genres = (f[c] for c in cols)
        row = (title, _year(year) or _year(title), _genre_row(genres.split(), version, p, lineno))
        _put(items, ilines, "item", str(_int(p, lineno, "item id", iid)), row, p, lineno)
    p = d / inter
    cols, width = _header(p, ("user_id", "item_id", "rating", "timestamp"))
    ratings, lines = _read_ratings(p, "\t", skip=1, cols=cols, n=width)
    return _build(version, "recbole", ratings, lines, p, users, items)


def _text(x: object) -> str:
    if isinstance(x, bytes | np.bytes_):
        return x.decode("utf-8", errors="replace")
    return str(x)


def read_tfds(
    version: str = "100k", data_dir: str | os.PathLike | None = None, split: str = "train"
) -> MovieLens:
    """Read the prepared TFDS ``movielens/{version}-ratings`` with ``tfds.data_source``."""
    version = _check_version(version)
    import tensorflow_datasets as tfds
    import tensorflow_datasets.structured.movielens  # noqa: F401  (registers the builder)

    src = tfds.data_source(f"movielens/{version}-ratings", split=split, data_dir=data_dir)
    name = {"Children": "Children's", "Unknown": "unknown"}
    vocab = {n: i for i, n in enumerate(GENRES[version])}
    genre_col = [vocab.get(name.get(g, g), -1) for g in TFDS_GENRES]
    users: dict[str, tuple[int, int, str, str]] = {}
    items: dict[str, tuple[str, int, np.ndarray]] = {}
    u, i, r, t = [], [], [], []
    for k in range(len(src)):
        ex = src[k]
        uid, iid = _text(ex["user_id"]), _text(ex["movie_id"])
        u.append(uid)
        i.append(iid)
        r.append(float(ex["user_rating"]))
        t.append(int(ex["timestamp"]))
        if uid not in users:
            users[uid] = (
                int(float(ex["bucketized_user_age"])),
                int(bool(ex["user_gender"])),
                _text(ex["user_occupation_text"]),
                _text(ex["user_zip_code"]),
            )
        if iid not in items:
            row = np.zeros(len(vocab), np.float32)
            for g in np.asarray(ex["movie_genres"]).reshape(-1).tolist():
                if 0 <= g < len(genre_col) and genre_col[g] >= 0:
                    row[genre_col[g]] = 1.0
            title = _text(ex["movie_title"])
            items[iid] = (title, _year(title), row)
    where = Path(f"tfds:movielens/{version}-ratings[{split}]")
    return _build(version, "tfds", (u, i, r, t), list(range(len(u))), where, users, items)


def _require(d: Path, files: Sequence[str], version: str) -> None:
    for f in files:
        if not (d / f).is_file():
            raise fetch.MissingDataError(
                f"{d / f}: file not found (MovieLens {version}); run "
                f"`{fetch.fetch_command('movielens-' + version)}` or pass path= to the directory "
                f"holding {', '.join(files)}"
            )


def _tfds_prepared(version: str, data_dir: str | os.PathLike | None) -> bool:
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    if not (Path(root).expanduser() / "movielens" / f"{version}-ratings").is_dir():
        return False
    try:
        import tensorflow_datasets as tfds
        import tensorflow_datasets.structured.movielens  # noqa: F401

        return bool(tfds.builder(f"movielens/{version}-ratings", data_dir=data_dir).is_prepared())
    except Exception:  # no TFDS or no builder: the source is simply absent
        return False


def _detect(d: Path, version: str) -> str | None:
    for source, files in (("grouplens", GROUPLENS_FILES), ("recbole", RECBOLE_FILES)):
        if all((d / f).is_file() for f in files[version]):
            return source
    return None


def load_movielens(
    version: str = "100k",
    *,
    source: str = "auto",
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> MovieLens:
    """Load MovieLens ``version`` from ``source`` (auto: TFDS, GroupLens, then RecBole files)."""
    version = _check_version(version)
    if source not in SOURCES:
        raise unknown("source", source, SOURCES)
    if source == "tfds" or (
        source == "auto" and path is None and _tfds_prepared(version, tfds_data_dir)
    ):
        return read_tfds(version, tfds_data_dir)
    if path is None:
        path = fetch.ensure(f"movielens-{version}", data_dir, download=download)
    d = Path(path)
    if source == "auto":
        source = _detect(d, version)
        if source is None:
            raise fetch.MissingDataError(
                f"{d}: no MovieLens {version} files (GroupLens "
                f"{', '.join(GROUPLENS_FILES[version])} or RecBole "
                f"{', '.join(RECBOLE_FILES[version])}); run "
                f"`{fetch.fetch_command('movielens-' + version)}` or pass path= to them"
            )
    reader = read_grouplens if source == "grouplens" else read_recbole
    return reader(d, version)


def hashed_bag(texts: Sequence[str], buckets: int = 1024) -> np.ndarray:
    """[len(texts), buckets] counts of lower-cased [a-z0-9]+ words at crc32(word) % buckets."""
    buckets = integer("buckets", buckets, 1)
    out = np.zeros((len(texts), buckets), np.float32)
    for row, text in enumerate(texts):
        for w in _WORD.findall(_YEAR_IN_TITLE.sub("", text).lower()):
            out[row, zlib.crc32(w.encode()) % buckets] += 1.0
    return out


def _bucket(values: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    return np.searchsorted(np.asarray(edges), values, side="right").astype(np.int32)


def _vocab_ids(values: np.ndarray, vocab: Sequence[str]) -> np.ndarray:
    lookup = {v: i + 1 for i, v in enumerate(vocab)}
    return np.asarray([lookup.get(v, 0) for v in values.tolist()], np.int32)


def user_features(ml: MovieLens) -> tuple[dict[str, np.ndarray], tuple[FeatureSpec, ...]]:
    """Per-user features [U, ...] and their specs."""
    zip_first = np.asarray([z[:1] for z in ml.zip_U.tolist()], dtype=str)
    zip_ids = np.asarray([1 + int(c) if c.isdigit() else 0 for c in zip_first.tolist()], np.int32)
    occupations = OCCUPATIONS[ml.version]
    feats = {
        "user_id": np.arange(ml.num_users, dtype=np.int32),
        "age": _bucket(ml.age_U, AGE_EDGES),
        "gender": ml.gender_U.astype(np.int32),
        "occupation": _vocab_ids(ml.occupation_U, occupations),
        "zip": zip_ids,
    }
    specs = (
        FeatureSpec("user_id", "categorical", max(ml.num_users, 1)),
        FeatureSpec("age", "categorical", len(AGE_EDGES) + 1),
        FeatureSpec("gender", "categorical", 2),
        FeatureSpec("occupation", "categorical", len(occupations) + 1),
        FeatureSpec("zip", "categorical", 11),
    )
    return feats, specs


def item_features(
    ml: MovieLens, title_buckets: int = 1024
) -> tuple[dict[str, np.ndarray], tuple[FeatureSpec, ...]]:
    """Per-item features [I, ...] and their specs (also the candidate table for retrieval)."""
    title_buckets = integer("title_buckets", title_buckets, 1)
    year = np.where(ml.year_I > 0, 1 + _bucket(ml.year_I, YEAR_EDGES), 0).astype(np.int32)
    feats = {
        "item_id": np.arange(ml.num_items, dtype=np.int32),
        "genres": ml.genres_IxG.astype(np.float32),
        "year": year,
        "title": hashed_bag(ml.title_I.tolist(), title_buckets),
    }
    specs = (
        FeatureSpec("item_id", "categorical", max(ml.num_items, 1)),
        FeatureSpec("genres", "multihot", ml.genres_IxG.shape[1]),
        FeatureSpec("year", "categorical", len(YEAR_EDGES) + 2),
        FeatureSpec("title", "multihot", title_buckets),
    )
    return feats, specs


def movielens_tasks(
    names: Sequence[str] = ("like", "rating"), version: str = "100k"
) -> tuple[TaskSpec, ...]:
    """TaskSpecs for the named MovieLens tasks (any subset of TASKS, in the given order)."""
    version = _check_version(version)
    if isinstance(names, str):
        names = (names,)
    specs = {
        "like": TaskSpec("like", "binary"),
        "rating": TaskSpec("rating", "regression"),
        "genre": TaskSpec("genre", "multilabel", size=len(GENRES[version])),
        "retrieval": TaskSpec("retrieval", "retrieval"),
    }
    for n in names:
        if n not in specs:
            raise unknown("task", n, TASKS)
    return tuple(specs[n] for n in names)


def _rows(field: str, rows: np.ndarray, n: int) -> np.ndarray:
    """``rows`` as a non-empty 1-D array of integer row indices in [0, n)."""
    idx = np.asarray(rows)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(
            f"{field}: got {idx.dtype} array of shape {idx.shape}; pass a non-empty 1-D array of "
            f"integer row indices, e.g. the training rows split.train (a boolean mask m: "
            f"np.flatnonzero(m))"
        )
    if idx.min() < 0 or idx.max() >= n:
        bad = idx[(idx < 0) | (idx >= n)][0]
        raise ValueError(f"{field}: row {bad} out of range; indices must lie in [0, {n})")
    return idx


def movielens_dataset(
    ml: MovieLens,
    tasks: Sequence[str] = ("like", "rating"),
    *,
    features: Sequence[str] | None = None,
    title_buckets: int = 1024,
    fit_rows: np.ndarray | None = None,
) -> Dataset:
    """One row per rating: ``features`` (one name or a sequence; default all but ``genres`` when
    ``genre`` is a task) and labels for ``tasks``.

    ``fit_rows``: the rows (integer indices into the ratings) whose mean and std standardise the
    ``timestamp`` feature; pass the training rows (``split.train``) so that val/test times do not
    shape it. None uses all rows, val and test included."""
    task_specs = movielens_tasks(tasks, ml.version)
    names = [t.name for t in task_specs]
    title_buckets = integer("title_buckets", title_buckets, 1)
    if features is None:
        features = [f for f in FEATURES if not (f == "genres" and "genre" in names)]
    elif isinstance(features, str):
        features = (features,)
    for f in features:
        if f not in FEATURES:
            raise unknown("feature", f, FEATURES)
    if "genre" in names and "genres" in features:
        raise ValueError("features: 'genres' is the label of task 'genre'; drop it from features")
    ts = ml.timestamp_N.astype(np.float64)
    fit = ts if fit_rows is None else ts[_rows("fit_rows", fit_rows, len(ml))]
    mean, std = (fit.mean(), fit.std()) if fit.size else (0.0, 1.0)
    ufeats, uspecs = user_features(ml)
    ifeats, ispecs = (
        item_features(ml, title_buckets) if set(features) & set(ITEM_FEATURES) else ({}, ())
    )
    rows = {k: v[ml.user_N] for k, v in ufeats.items() if k in features}
    rows |= {k: v[ml.item_N] for k, v in ifeats.items() if k in features}
    rows["timestamp"] = ((ts - mean) / (std if std > 0 else 1.0)).astype(np.float32)[:, None]
    specs = {s.name: s for s in uspecs + ispecs + (FeatureSpec("timestamp", "dense", 1),)}
    labels = {
        "like": lambda: (ml.rating_N >= 4.0).astype(np.float32),
        "rating": lambda: ml.rating_N.astype(np.float32),
        "genre": lambda: ml.genres_IxG[ml.item_N].astype(np.float32),
        "retrieval": lambda: ml.item_N.astype(np.int32),
    }
    return Dataset(
        features={f: rows[f] for f in features},
        labels={n: labels[n]() for n in names},
        feature_specs=tuple(specs[f] for f in features),
        task_specs=task_specs,
    )
