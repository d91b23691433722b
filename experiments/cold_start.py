"""Cold start on MovieLens-100K: held-out users and held-out items, single-task vs multi-task.

Two splits (``mtl.data.splits``, seed 42): ``cold_user`` holds out 20% of the users with all their
ratings, ``cold_item`` 20% of the items. Every model reads the same inputs: the user side features
(age, gender, occupation, zip), the item side features (year, hashed title words), the timestamp and
the user and item ids. ``genres`` is not an input: it is the label of the auxiliary ``genre`` task.

Models: ``single_task`` (one independent network per task, on like and rating), ``shared_bottom``
and ``mmoe`` trained on like + rating + the auxiliary genre task (multi-label, the item's genres).
Reported on the held-out users (items): like AUC / accuracy / F1 and rating RMSE, mean ± std over
seeds (the seed sets initialisation and batch order; the split is fixed), and Δm% against
single-task over those four numbers (per seed, then mean ± std). A reference row without training:
the additive bias model μ + b_user + b_item (shrinkage 10) fitted on the training ratings (like
labels, clipped to [0, 1], and ratings); a held-out id has no bias, so it predicts from the other
side alone (item biases for cold users, user biases for cold items).

Cold ids: ids are global (``user_features`` / ``item_features`` size the tables by all users and
items), so a held-out user's (item's) id is a valid row of the embedding table; but that row is
never looked up in training, gets zero gradients and Adam leaves it at its random initialisation
(no weight decay is applied). At test time the id embedding is noise and the model must rely on the
side features. ``--config.drop_cold_id=True`` removes the held-out side's id from the inputs
(user_id on cold_user, item_id on cold_item) to measure what the untrained rows cost.

Launch (full):  python experiments/cold_start.py --config=experiments/cold_start.py
Quick variant:  python experiments/cold_start.py --config=experiments/cold_start.py:quick
Overrides:      --config.seeds='(0,1,2,3,4)' --config.epochs=20 --config.workdir=runs/cold
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import numpy as np
from ml_collections import ConfigDict, config_flags

from mtl import metrics as M
from mtl.data import movielens, splits
from mtl.experiment import RunDir, add_delta_m, cli, plot_curves, public, train_run

REPORTED = {"like": ("auc", "accuracy", "f1"), "rating": ("rmse",)}


def get_config(arg: str | None = None) -> ConfigDict:
    """Full settings; ``arg='quick'`` runs one seed for 3 epochs as a demo on 2 CPU cores."""
    c = ConfigDict()
    c.version = "100k"
    c.source = "auto"
    c.splits = ("cold_user", "cold_item")
    c.split_seed = 42
    c.test_fraction = 0.2
    c.title_buckets = 256
    c.features = (
        "user_id", "age", "gender", "occupation", "zip", "item_id", "year", "title", "timestamp",
    )  # fmt: skip
    c.stl_tasks = ("like", "rating")
    c.mtl_tasks = ("like", "rating", "genre")
    c.models = ("single_task", "shared_bottom", "mmoe")
    c.drop_cold_id = False  # True: no user_id input on cold_user, no item_id on cold_item
    c.bias_shrinkage = 10.0  # the reference row: mean + user bias + item bias (untrained ids: 0)
    c.model_kwargs = ConfigDict(
        {
            "single_task": {"trunk": (128,), "tower": (64,)},
            "shared_bottom": {"trunk": (128,), "tower": (64,)},
            "mmoe": {"num_experts": 4, "expert": (64,), "tower": (32,)},
        }
    )
    c.seeds = (0, 1, 2)
    c.epochs = 10
    c.batch_size = 512
    c.learning_rate = 2e-3
    c.dropout = 0.1
    c.workdir = "runs/cold_start"
    c.progress = True
    if arg == "quick":
        c.seeds = (0,)
        c.epochs = 3
        c.batch_size = 1024
        c.learning_rate = 3e-3
        c.workdir = "runs/cold_start-quick"
    elif arg not in (None, ""):
        raise ValueError(f"config: unknown variant {arg!r}; use 'quick' or nothing")
    return c


def additive_bias(
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    sizes: tuple[int, int],
    shrinkage: float,
) -> np.ndarray:
    """μ + b_u + b_i fitted on ``train`` (b_i, then b_u, each shrunk by λ); unseen ids get 0."""
    u, i, y = train
    mu = float(y.mean())
    b_i = np.bincount(i, y - mu, sizes[1]) / (np.bincount(i, minlength=sizes[1]) + shrinkage)
    b_u = np.bincount(u, y - mu - b_i[i], sizes[0]) / (
        np.bincount(u, minlength=sizes[0]) + shrinkage
    )
    return mu + b_u[test[0]] + b_i[test[1]]


def bias_baseline(
    ml: movielens.MovieLens, sp: splits.Split, shrinkage: float
) -> dict[str, dict[str, float]]:
    """Reported metrics of the additive bias model on like (clipped to [0, 1]) and rating."""
    sizes = (ml.num_users, ml.num_items)
    u, i = ml.user_N.astype(np.int64), ml.item_N.astype(np.int64)
    rating = ml.rating_N.astype(np.float64)
    like = (rating >= 4.0).astype(np.float64)
    tr, te = sp.train, sp.test
    p_like = np.clip(
        additive_bias((u[tr], i[tr], like[tr]), (u[te], i[te]), sizes, shrinkage), 0, 1
    )
    r_hat = additive_bias((u[tr], i[tr], rating[tr]), (u[te], i[te]), sizes, shrinkage)
    return {
        "like": {
            "auc": float(M.auc(like[te], p_like)),
            "accuracy": float(M.accuracy(like[te], p_like)),
            "f1": float(M.f1(like[te], p_like)),
        },
        "rating": {"rmse": float(np.sqrt(np.mean((r_hat - rating[te]) ** 2)))},
    }


def reported(tasks: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """The reported (task, metric) pairs of a run's test metrics."""
    return {t: {m: float(tasks[t][m]) for m in ms} for t, ms in REPORTED.items()}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std"} (population std; 0 for one value)."""
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std())}


def summarize(runs: Sequence[Mapping]) -> list[dict]:
    """Mean ± std over seeds of the reported metrics, Δm% and train time, per (split, model)."""
    out = []
    keys = list(dict.fromkeys((r["split"], r["model"]) for r in runs))
    for split, model in keys:
        rs = [r for r in runs if (r["split"], r["model"]) == (split, model)]
        row = {"split": split, "model": model, "seeds": [r["seed"] for r in rs]}
        for t, ms in REPORTED.items():
            for m in ms:
                row[f"{t} {m}"] = mean_std([r["tasks"][t][m] for r in rs])
        dms = [r["delta_m"] for r in rs if r.get("delta_m") is not None]
        row["delta_m"] = mean_std(dms) if dms else None
        row["train_seconds"] = mean_std([r["train_seconds"] for r in rs])
        out.append(row)
    return out


def summary_table(rows: Sequence[Mapping], split: str) -> str:
    """Markdown: one row per model of ``split``, mean ± std over seeds."""
    cols = [f"{t} {m}" for t, ms in REPORTED.items() for m in ms]
    head = ["model", *[c.replace("rmse", "RMSE").replace("auc", "AUC") for c in cols]]
    head += ["Δm% vs single-task", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["split"] != split:
            continue
        cells = [r["model"]] + [f"{r[c]['mean']:.4f} ± {r[c]['std']:.4f}" for c in cols]
        dm = r["delta_m"]
        cells.append("—" if dm is None else f"{dm['mean']:+.2f} ± {dm['std']:.2f}")
        cells.append(f"{r['train_seconds']['mean']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(c: ConfigDict) -> int:
    """Every split × seed × model, the summary tables and the run directory."""
    t_study = time.perf_counter()
    ml = movielens.load_movielens(c.version, source=c.source)
    feats = list(c.features)
    if "genres" in feats:
        raise ValueError("features: 'genres' is the label of the genre task; drop it")
    rundir = RunDir(c.workdir, c)
    runs: list[dict] = []
    for split in c.splits:
        temporal = split == "temporal"  # the last ratings of each user: no fraction, no seed
        sp = splits.make_split(
            split,
            user_N=ml.user_N,
            item_N=ml.item_N,
            timestamp_N=ml.timestamp_N,
            test_fraction=None if temporal else c.test_fraction,
            seed=None if temporal else c.split_seed,
        )
        side = ml.user_N if split == "cold_user" else ml.item_N
        table = ml.num_users if split == "cold_user" else ml.num_items
        cold = np.setdiff1d(side[sp.test], side[sp.train])
        assert cold.size == np.unique(side[sp.test]).size, "held-out ids leak into train"
        assert cold.max() < table, "cold ids must be rows of the embedding table"
        print(
            f"== {split}: {len(sp.train):,} train / {len(sp.test):,} test rows; "
            f"{cold.size} held-out {'users' if split == 'cold_user' else 'items'} "
            f"(ids < {table}: rows of the table, never updated)"
        )
        cold_id = "user_id" if split == "cold_user" else "item_id"
        kw = dict(
            features=[f for f in feats if not (c.drop_cold_id and f == cold_id)],
            title_buckets=c.title_buckets,
            fit_rows=sp.train,  # the timestamp is standardised on the training rows
        )
        stl_data = movielens.movielens_dataset(ml, tuple(c.stl_tasks), **kw)
        mtl_data = movielens.movielens_dataset(ml, tuple(c.mtl_tasks), **kw)
        t0 = time.perf_counter()
        base_tasks = bias_baseline(ml, sp, c.bias_shrinkage)
        split_runs = [
            {
                "name": f"{split}-bias",
                "model": "bias",
                "schedule": "none",
                "aggregator": None,
                "weighting": "fixed",
                "seed": None,
                "split": split,
                "tasks": base_tasks,
                "average": {},
                "delta_m": None,
                "train_seconds": time.perf_counter() - t0,
                "examples_per_second": 0.0,
            }
        ]
        for seed in c.seeds:
            for model in c.models:
                data = stl_data if model == "single_task" else mtl_data
                spec = {
                    "name": f"{split}-{model}-s{seed}",
                    "model": model,
                    "model_kwargs": {"dropout": c.dropout, **dict(c.model_kwargs[model])},
                    "schedule": "joint",
                    "epochs": c.epochs,
                    "batch_size": c.batch_size,
                    "learning_rate": c.learning_rate,
                    "seed": seed,
                }
                print(f"-- {split} / {model} / seed {seed}")
                r = train_run(
                    spec,
                    data.take(sp.train),
                    data.take(sp.test),
                    rundir=rundir,
                    progress=c.progress,
                )
                aux = {t: m for t, m in r["tasks"].items() if t not in REPORTED}
                r.update(split=split, tasks=reported(r["tasks"]), aux_tasks=aux)
                split_runs.append(r)
        for seed in c.seeds:
            same = [r for r in split_runs if r["seed"] == seed]
            add_delta_m(same)
            for r in same:
                rundir.log({"run": r["name"], "final": r["tasks"], "delta_m": r["delta_m"]})
        plot_curves(
            rundir,
            [r for r in split_runs if r["seed"] == c.seeds[0] and "history" in r],
            filename=f"curves_{split}.png",
        )
        runs += split_runs
    rows = summarize(runs)
    seconds = time.perf_counter() - t_study
    desc = f"{', '.join(c.splits)} (seed {c.split_seed}, {c.test_fraction:.0%} of ids held out)"
    rundir.write_results(
        f"movielens-{c.version}", desc, [public(r) for r in runs], title="Cold start"
    )
    doc = json.loads((rundir.path / "results.json").read_text())
    doc["summary"] = rows
    (rundir.path / "results.json").write_text(json.dumps(doc, indent=2))
    parts = [
        f"# Cold start (MovieLens-{c.version})\n",
        f"splits: {desc}; seeds {list(c.seeds)}; mean ± std over seeds\n",
    ]
    for split in c.splits:
        parts.append(f"## {split}\n\n{summary_table(rows, split)}\n")
    parts.append(f"study wall time: {seconds:.0f} s\n")
    (rundir.path / "results.md").write_text("\n".join(parts))
    for split in c.splits:
        print(f"\n{split}\n{summary_table(rows, split)}")
    print(f"\nstudy wall time: {seconds:.0f} s")
    print(f"run directory: {rundir.path} (results.json, results.md, metrics.jsonl, curves_*.png)")
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", default=__file__)
    cli(main)
