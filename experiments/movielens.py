"""The main job: multi-task learning on MovieLens-100K (like + rating + genre).

Trains single-task baselines, hard sharing (joint, alternating, staged, PCGrad, MGDA), soft sharing,
MMoE and PLE on the same split, then prints per-task metrics, the averages over the classification
tasks and Δm% against single-task.

Launch (full):  python experiments/movielens.py --config=experiments/movielens.py
Quick variant:  python experiments/movielens.py --config=experiments/movielens.py:quick
Overrides:      --config.epochs=20 --config.batch_size=256 --config.workdir=runs/ml
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_flags

from mtl.data import movielens, splits
from mtl.experiment import RunDir, add_delta_m, cli, plot_curves, public, train_run


def get_config(arg: str | None = None) -> ConfigDict:
    """Full settings; ``arg='quick'`` trains fewer epochs for a demo on 2 CPU cores."""
    c = ConfigDict()
    c.version = "100k"
    c.source = "auto"
    c.tasks = ("like", "rating", "genre")
    c.split = "random"  # random | temporal | cold_user | cold_item
    c.split_seed = 42
    c.test_fraction = 0.2
    c.val_fraction = 0.1
    c.title_buckets = 256
    c.batch_size = 512
    c.epochs = 10
    c.learning_rate = 2e-3
    c.dropout = 0.1
    c.seed = 0
    # early stopping on the validation split (mtl.runner.EarlyStopping): 0 = off, train all epochs
    c.patience = 0
    c.monitor = "mean/auc"
    c.workdir = "runs/movielens"
    c.progress = True
    c.models = (
        ("single_task", "joint", None),
        ("shared_bottom", "joint", None),
        ("shared_bottom", "alternating", None),
        ("shared_bottom", "staged", None),
        ("shared_bottom", "joint", "pcgrad"),
        ("shared_bottom", "joint", "mgda"),
        ("soft_sharing", "joint", None),
        ("mmoe", "joint", None),
        ("ple", "joint", None),
    )
    if arg == "quick":
        c.epochs = 4
        c.batch_size = 1024
        c.learning_rate = 3e-3
        c.workdir = "runs/movielens-quick"
    elif arg not in (None, ""):
        raise ValueError(f"config: unknown variant {arg!r}; use 'quick' or nothing")
    return c


def stages_for(epochs: int) -> list[dict]:
    """Staged schedule: all parameters, then the towers and heads alone for the last third."""
    last = max(1, epochs // 3)
    if epochs < 2:
        raise ValueError(f"epochs: the staged schedule needs at least 2 epochs, got {epochs}")
    return [{"epochs": epochs - last}, {"epochs": last, "trainable": ("towers", "heads")}]


def main(c: ConfigDict) -> int:
    ml = movielens.load_movielens(c.version, source=c.source)
    temporal = c.split == "temporal"  # the last ratings of each user: no fraction, no seed
    sp = splits.make_split(
        c.split,
        user_N=ml.user_N,
        item_N=ml.item_N,
        timestamp_N=ml.timestamp_N,
        test_fraction=None if temporal else c.test_fraction,
        val_fraction=c.val_fraction,
        seed=None if temporal else c.split_seed,
    )
    # the timestamp feature is standardised with the training rows' mean and std
    data = movielens.movielens_dataset(
        ml, tuple(c.tasks), title_buckets=c.title_buckets, fit_rows=sp.train
    )
    train, val, test = data.take(sp.train), data.take(sp.val), data.take(sp.test)
    if c.patience > 0 and not len(val):
        raise ValueError(
            f"patience: {c.patience} stops early on the validation split, but val_fraction="
            f"{c.val_fraction} leaves it empty; pass a val_fraction > 0 or patience=0"
        )
    print(
        f"MovieLens-{c.version}: {len(train):,} train / {len(val):,} val / {len(test):,} test rows, tasks {list(c.tasks)}"
    )
    rundir = RunDir(c.workdir, c)
    runs = []
    for model, schedule, aggregator in c.models:
        spec = {
            "model": model,
            "model_kwargs": {"dropout": c.dropout},
            "schedule": schedule,
            "epochs": c.epochs,
            "stages": stages_for(c.epochs) if schedule == "staged" else None,
            "aggregator": aggregator,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "seed": c.seed,
        }
        if c.patience > 0:
            spec["early_stopping"] = {"monitor": c.monitor, "patience": c.patience}
        print(f"-- {model} / {schedule}" + (f" / {aggregator}" if aggregator else ""))
        val_or_none = val if len(val) else None  # val_fraction=0: no validation curve
        runs.append(
            train_run(spec, train, test, val=val_or_none, rundir=rundir, progress=c.progress)
        )
    add_delta_m(runs)
    plot_curves(rundir, runs)
    table = rundir.write_results(
        f"movielens-{c.version}",
        "temporal" if temporal else f"{c.split} (seed {c.split_seed}, test {c.test_fraction})",
        [public(r) for r in runs],
        title="MovieLens multi-task study",
    )
    print(table)
    print(f"\nrun directory: {rundir.path} (results.json, results.md, metrics.jsonl, curves.png)")
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", default=__file__)
    cli(main)
