"""One resumable multi-task training run: one model, one schedule, checkpoints in the workdir.

Synthetic recommendation data by default (``mtl.data.synthetic.recsys``); ``data.source=npz`` reads
your own arrays in the same schema and ``data.source=movielens`` a cached MovieLens copy. Killed or
interrupted runs continue from the newest good checkpoint in ``workdir`` when the same command is
run again; the final state is written to ``workdir/final.npz``.

Launch:     python experiments/train.py --config=experiments/train.py
Tiny demo:  python experiments/train.py --config=experiments/train.py:tiny
1M rows:    python experiments/train.py --config=experiments/train.py --config.data.n=1000000
Overrides:  --config.model=mmoe --config.epochs=5 --config.save_every=50 --config.workdir=runs/t
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict, config_flags

from mtl.data import splits, synthetic
from mtl.data.batching import Dataset
from mtl.experiment import RunDir, cli, public, train_run

SOURCES = ("synthetic", "npz", "movielens")
SIZES = {  # model -> how ``hidden`` and ``tower`` map onto its size options
    "shared_bottom": ("trunk", "tower"),
    "soft_sharing": ("trunk", "tower"),
    "single_task": ("trunk", "tower"),
    "mmoe": ("expert", "tower"),
    "omoe": ("expert", "tower"),
    "ple": ("expert", "tower"),
    "cgc": ("expert", "tower"),
    "cross_stitch": ("hidden", "tower"),
}


def get_config(arg: str | None = None) -> ConfigDict:
    """Default settings; ``arg='tiny'`` is a seconds-long run (tests, demos)."""
    c = ConfigDict()
    c.model = "shared_bottom"
    c.hidden = 64
    c.tower = 32
    c.dropout = 0.1
    c.schedule = "joint"  # joint | alternating (staged schedules: see experiments/movielens.py)
    c.epochs = 5
    c.batch_size = 1024
    c.learning_rate = 2e-3
    c.optimizer = "adam"
    c.aggregator = ""  # '' for none, else a name from mtl.aggregation
    c.weighting = "fixed"
    c.nan_policy = "stop"  # stop | skip
    c.seed = 0
    c.save_every = 100  # steps between mid-epoch checkpoints (0: epoch ends only)
    c.keep = 2  # checkpoints kept
    c.workdir = "runs/train"
    c.progress = False
    c.data = ConfigDict()
    c.data.source = "synthetic"  # synthetic | npz | movielens
    c.data.n = 100_000  # synthetic rows
    c.data.num_users = 2_000  # synthetic and npz: id ranges of user_id and item_id
    c.data.num_items = 1_000
    c.data.seed = 0
    c.data.test_fraction = 0.1
    c.data.path = ""  # npz file (keys 'feature.<name>', 'label.<task>') or MovieLens folder
    c.data.version = "1m"  # movielens
    c.data.download = True  # movielens: fetch when not cached
    if arg == "tiny":
        c.hidden, c.tower, c.dropout = 16, 8, 0.2
        c.epochs, c.batch_size, c.learning_rate, c.save_every = 3, 60, 5e-3, 5  # 30 steps/epoch
        c.data.n, c.data.num_users, c.data.num_items = 2_000, 100, 120
        c.workdir = "runs/train-tiny"
    elif arg not in (None, ""):
        raise ValueError(f"config: unknown variant {arg!r}; use 'tiny' or nothing")
    return c


def load_npz(path: str, num_users: int, num_items: int) -> Dataset:
    """A Dataset in the schema of ``synthetic.recsys`` from arrays saved with ``np.savez``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"data.path: no file {str(p)!r}; pass --config.data.path=<an .npz file> "
            "with keys 'feature.<name>' and 'label.<task>'"
        )
    _, _, fspecs, tspecs = synthetic.recsys(n=1, num_users=num_users, num_items=num_items)
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    want = [f"feature.{f.name}" for f in fspecs] + [f"label.{t.name}" for t in tspecs]
    missing = [k for k in want if k not in arrays]
    if missing:
        raise ValueError(f"data.path: {str(p)!r} lacks arrays {missing}; save them with np.savez")
    return Dataset(
        {f.name: arrays[f"feature.{f.name}"] for f in fspecs},
        {t.name: arrays[f"label.{t.name}"] for t in tspecs},
        fspecs,
        tspecs,
        {t.name: arrays[f"mask.{t.name}"] for t in tspecs if f"mask.{t.name}" in arrays},
    )


def load_data(d: ConfigDict) -> tuple[Dataset, Dataset]:
    """(train, test) as the ``data`` config describes."""
    if d.source == "synthetic":
        if int(d.n) < 2:
            raise ValueError(f"data.n: {d.n} rows; pass --config.data.n=<at least 2>")
        f, lab, fs, ts = synthetic.recsys(
            n=int(d.n), num_users=int(d.num_users), num_items=int(d.num_items), seed=int(d.seed)
        )
        data = Dataset(f, lab, fs, ts)
    elif d.source == "npz":
        data = load_npz(d.path, int(d.num_users), int(d.num_items))
    elif d.source == "movielens":
        from mtl.data import movielens

        ml = movielens.load_movielens(d.version, path=d.path or None, download=bool(d.download))
        sp = splits.random_split(len(ml), float(d.test_fraction), 0.0, int(d.seed))
        # the timestamp feature is standardised on the training rows
        data = movielens.movielens_dataset(ml, ("like", "rating"), fit_rows=sp.train)
        return data.take(sp.train), data.take(sp.test)
    else:
        from mtl.spec import unknown

        raise unknown("data.source", d.source, SOURCES)
    sp = splits.random_split(len(data), float(d.test_fraction), 0.0, int(d.seed))
    return data.take(sp.train), data.take(sp.test)


def save_final(path: Path, record: dict) -> None:
    """Every leaf of the final train state (and the history, as JSON) in one .npz, atomically."""
    leaves = jax.tree_util.tree_flatten_with_path(record["_state"])[0]
    arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
    arrays["history.json"] = np.asarray(json.dumps(record["history"]))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def main(c: ConfigDict) -> int:
    if c.model not in SIZES:
        sizes = {"dropout": float(c.dropout)}
    else:
        first, second = SIZES[c.model]
        sizes = {first: (int(c.hidden),), second: (int(c.tower),), "dropout": float(c.dropout)}
    train, test = load_data(c.data)
    rundir = RunDir(c.workdir, c)
    spec = {
        "model": c.model,
        "model_kwargs": sizes,
        "schedule": c.schedule,
        "epochs": int(c.epochs),
        "batch_size": int(c.batch_size),
        "learning_rate": float(c.learning_rate),
        "optimizer": c.optimizer,
        "aggregator": c.aggregator or None,
        "weighting": c.weighting,
        "nan_policy": c.nan_policy,
        "seed": int(c.seed),
        "save_every": int(c.save_every),
        "keep": int(c.keep),
    }
    print(
        f"{len(train):,} train / {len(test):,} test rows; run directory {rundir.path}", flush=True
    )
    record = train_run(spec, train, test, rundir=rundir, progress=bool(c.progress))
    save_final(rundir.path / "final.npz", record)
    (rundir.path / "results.json").write_text(json.dumps(public(record), indent=2, default=str))
    losses = {
        t: round(m.get("rmse", m.get("auc", float("nan"))), 4) for t, m in record["tasks"].items()
    }
    print(
        f"done: step {int(record['_state'].step)}, skipped {record['skipped_steps']}, "
        f"test {losses}; final state in {rundir.path / 'final.npz'}"
    )
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", default=__file__)
    cli(main)
