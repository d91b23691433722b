"""Census-Income (KDD): the MMoE paper's real-data study (Ma et al., KDD 2018, §5.2), group 1.

Tasks income (> 50K) and marital (never married) on UCI Census-Income (KDD) (data set 117,
CC BY 4.0). Trains a per-task logistic regression (``linear``), single-task MLPs, shared bottom,
soft sharing, OMoE, MMoE and PLE, each over several seeds, and reports test AUC per task as
mean ± std over the seeds, with Δm% (over test AUC) against the same seed's single-task MLPs.

Split as in the paper: the train file trains, the test file is halved into validation and test
(``load_census(val_from="test")``, split seed 42). Model selection is early stopping on the
validation split: after every epoch the validation AUC is computed; the test metrics reported are
those of the epoch with the best mean validation AUC over the tasks (per task for the models without
shared parameters, ``linear`` and ``single_task``, which are independent per-task models), and
training stops after ``patience`` epochs without improvement. The 7 numeric columns enter
standardized and, with ``numeric_buckets`` > 0, also as quantile-bucket ids (edges from the train
rows) for every model but ``linear``, which keeps the reference's features (one-hot categoricals
and standardized numerics).

Finished (model, seed) runs are stored in ``workdir/runs/*.json`` and read back when the same
command is run again with the same settings, so an interrupted study resumes at run granularity.

Launch (full):  python experiments/census.py --config=experiments/census.py
Quick variant:  python experiments/census.py --config=experiments/census.py:quick
Overrides:      --config.seeds=3 --config.models=mmoe,shared_bottom --config.workdir=runs/c
                --config.model_kwargs.mmoe.num_experts=4 --config.learning_rate=1e-3
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict, config_flags

from mtl import experiment
from mtl import metrics as M
from mtl.data import census
from mtl.data.batching import Dataset, epoch_batches
from mtl.experiment import RunDir, classification_average, cli, public
from mtl.models import build_model
from mtl.models.base import FeatureEncoder, MTLModel, head_output
from mtl.runner import Divergence, evaluate
from mtl.spec import FeatureSpec, TaskSpec
from mtl.train import Stage, TrainConfig, Trainer

CITATION = (
    "Lane, T. & Kohavi, R. Census-Income (KDD). UCI Machine Learning Repository, data set 117, "
    "CC BY 4.0, https://archive.ics.uci.edu/dataset/117/census+income+kdd"
)
OVERRIDABLE = ("epochs", "patience", "batch_size", "learning_rate", "l2")
PER_TASK = ("linear", "single_task")  # models without shared parameters: selected per task
REFERENCES = (
    ("PaddleRec MMoE (reported)", {"income": 0.9447, "marital": 0.9932}),
    ("PaddleRec shared bottom (reported)", {"income": 0.9312, "marital": 0.9926}),
    (
        "logistic regression, one-hot + standardized (issue author)",
        {"income": 0.946, "marital": 0.994},
    ),
)


class Linear(MTLModel):
    """Per-task logistic regression: one-hot categoricals (size-1 embeddings) and dense weights."""

    def __init__(
        self, features: Sequence[FeatureSpec], tasks: Sequence[TaskSpec], *, rngs: nnx.Rngs
    ):
        self._set_tasks(tasks)
        ones = tuple(
            f if f.kind == "dense" else dataclasses.replace(f, embed_dim=1) for f in features
        )
        self.towers = nnx.Dict({t.name: FeatureEncoder(ones, rngs=rngs) for t in self.tasks})
        width = self.towers[self.tasks[0].name].out_dim
        self.heads = nnx.Dict({t.name: nnx.Linear(width, t.size, rngs=rngs) for t in self.tasks})

    def represent(
        self, features: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None
    ) -> dict[str, jax.Array]:
        """Each task's own encoding of the features: {task: [B, D]}."""
        return {t.name: self.towers[t.name](features) for t in self.tasks}

    def decode(
        self, rep: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, jax.Array], dict]:
        """One logit per task: the task's linear head on its encoding."""
        return {t.name: head_output(t, self.heads[t.name](rep[t.name])) for t in self.tasks}, {}


def get_config(arg: str | None = None) -> ConfigDict:
    """Full settings (5 seeds, early stopping); ``arg='quick'``: 1 seed, 2 epochs, 3 models."""
    c = ConfigDict()
    c.tasks = "group1"
    c.val_from = "test"
    c.split_seed = 42
    c.embed_dim = 8
    c.numeric_buckets = 16
    c.models = "linear,single_task,shared_bottom,soft_sharing,omoe,mmoe,ple"
    c.model_kwargs = ConfigDict(
        {
            "linear": {},
            "single_task": {"trunk": (64,), "tower": (8,)},
            "shared_bottom": {"trunk": (128,), "tower": (8,)},
            "soft_sharing": {"trunk": (64,), "tower": (8,), "penalty": 1e-3},
            "omoe": {"num_experts": 8, "expert": (16,), "tower": (8,)},
            "mmoe": {"num_experts": 8, "expert": (16,), "tower": (8,)},
            "ple": {
                "num_levels": 2,
                "num_task_experts": 3,
                "num_shared_experts": 1,
                "expert": (16,),
                "tower": (8,),
            },
        }
    )
    c.seeds = 5
    c.epochs = 15  # at most; early stopping on the validation AUC
    c.patience = 3
    c.batch_size = 4096
    c.learning_rate = 3e-3
    c.l2 = 0.0
    # per model: epochs, patience, batch_size, learning_rate, l2
    c.overrides = ConfigDict({"linear": {"learning_rate": 3e-2}})
    c.workdir = "runs/census"
    c.progress = True
    if arg == "quick":
        c.models = "linear,shared_bottom,mmoe"
        c.seeds = 1
        c.epochs = 2
        c.patience = 2
        c.workdir = "runs/census-quick"
    elif arg not in (None, ""):
        raise ValueError(f"config: unknown variant {arg!r}; use 'quick' or nothing")
    return c


def add_numeric_buckets(
    data: Sequence[Dataset], buckets: int, embed_dim: int
) -> tuple[Dataset, ...]:
    """Each numeric column also as a quantile-bucket id (edges from the first, training, split)."""
    train = data[0]
    dense = [f.name for f in train.feature_specs if f.kind == "dense"]
    edges = {}
    specs = list(train.feature_specs)
    for name in dense:
        qs = np.linspace(0.0, 1.0, buckets + 1)[1:-1]
        edges[name] = np.unique(np.quantile(train.features[name][:, 0], qs))
        specs.append(FeatureSpec(f"{name}_bucket", "categorical", edges[name].size + 1, embed_dim))
    out = []
    for d in data:
        feats = dict(d.features)
        for name in dense:
            ids = np.searchsorted(edges[name], np.asarray(d.features[name])[:, 0], side="right")
            feats[f"{name}_bucket"] = ids.astype(np.int32)
        out.append(Dataset(feats, d.labels, tuple(specs), d.task_specs))
    return tuple(out)


def make_model(name: str, data: Dataset, seed: int, kwargs: Mapping[str, Any]) -> MTLModel:
    """``linear`` (this script) or a model from the mtl.models registry."""
    if name == "linear":
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        return Linear(data.feature_specs, data.task_specs, rngs=rngs, **kwargs)
    return build_model(name, data.feature_specs, data.task_specs, seed=seed, **kwargs)


def n_params(model: nnx.Module) -> int:
    """Σ over nnx.Param leaves of their sizes."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train_select(
    trainer: Trainer,
    model: MTLModel,
    spec: Mapping[str, Any],
    data: tuple[Dataset, Dataset, Dataset],
    per_task: bool,
    log: Callable[[dict], None],
) -> dict:
    """Train up to ``spec['epochs']`` epochs; test metrics at the best validation-AUC epoch(s)."""
    train, val, test = data
    names = trainer.names
    seed = int(spec["seed"])
    state = trainer.init(model, seed=seed)
    data_key = jax.random.key(seed)
    best_val = dict.fromkeys(names, -np.inf) if per_task else {"mean": -np.inf}
    best_epoch = dict.fromkeys(best_val, -1)
    tasks: dict[str, dict] = {}
    history, seconds, since = [], [], 0
    for e in range(int(spec["epochs"])):
        t0 = time.perf_counter()
        batches = epoch_batches(train, int(spec["batch_size"]), jax.random.fold_in(data_key, e))
        state, m = trainer.run(state, batches, Stage(1))
        m = jax.device_get(m)
        seconds.append(time.perf_counter() - t0)
        if not np.all(m["finite"]):
            raise Divergence(f"non-finite loss in epoch {e}; lower the learning rate")
        v = evaluate(trainer, state, val)
        aucs = {t: v[t]["auc"] for t in names}
        scores = aucs if per_task else {"mean": float(np.mean(list(aucs.values())))}
        better = [k for k, s in scores.items() if s > best_val[k]]
        if better:
            te = evaluate(trainer, state, test)
            for k in better:
                best_val[k], best_epoch[k] = scores[k], e
                for t in names if k == "mean" else (k,):
                    tasks[t] = te[t]
        since = 0 if better else since + 1
        rec = {"epoch": e, "train_loss": float(np.mean(m["loss"])), "val_auc": aucs}
        rec["seconds"] = seconds[-1]
        history.append(rec)
        log(rec)
        if since >= int(spec["patience"]):
            break
    eps = len(train) * max(len(seconds) - 1, 1) / max(sum(seconds[1:] or seconds), 1e-9)
    return {
        "tasks": {t: tasks[t] for t in names},
        "best_epoch": best_epoch,
        "best_val_auc": best_val,
        "epochs_run": len(history),
        "train_seconds": float(sum(seconds)),
        "examples_per_second": float(eps),
        "history": history,
    }


def summary_table(runs: Sequence[Mapping], names: Sequence[str]) -> str:
    """Mean ± std over seeds per model: test AUC per task, their mean, Δm%, epochs, seconds."""
    head = ["model", "params", *[f"{t} AUC" for t in names], "mean AUC", "Δm% (AUC)"]
    head += ["epochs", "s / run", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ms = lambda xs: f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0.0:.4f}"
    for model in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == model]
        cells = [model, f"{rs[0]['params']:,}"]
        cells += [ms([r["tasks"][t]["auc"] for r in rs]) for t in names]
        cells.append(ms([r["average"]["auc"] for r in rs]))
        dm = [r["delta_m"] for r in rs if r.get("delta_m") is not None]
        cells.append(
            f"{np.mean(dm):+.2f} ± {np.std(dm, ddof=1) if len(dm) > 1 else 0.0:.2f}" if dm else "—"
        )
        cells.append(f"{np.mean([r['epochs_run'] for r in rs]):.1f}")
        cells.append(f"{np.mean([r['train_seconds'] for r in rs]):.0f}")
        cells.append(str(len(rs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_table(names: Sequence[str]) -> str:
    """The published / measured reference numbers (test AUC)."""
    lines = ["| reference | " + " | ".join(f"{t} AUC" for t in names) + " |"]
    lines.append("|" + "---|" * (len(names) + 1))
    for label, aucs in REFERENCES:
        lines.append(
            f"| {label} | " + " | ".join(f"{aucs.get(t, float('nan'))}" for t in names) + " |"
        )
    return "\n".join(lines)


def main(c: ConfigDict) -> int:
    """Train every (model, seed), write results.json and results.md, print the summary."""
    t_start = time.perf_counter()
    data = census.load_census(
        c.tasks, val_from=c.val_from, seed=c.split_seed, embed_dim=c.embed_dim
    )
    plain = tuple(d.to_device() for d in data)
    bucketed = plain
    if c.numeric_buckets > 0:
        bucketed = tuple(
            d.to_device() for d in add_numeric_buckets(data, c.numeric_buckets, c.embed_dim)
        )
    train, val, test = data
    names = tuple(t.name for t in train.task_specs)
    split = f"train file / test file halved into val and test (val_from={c.val_from}, seed {c.split_seed})"
    print(
        f"Census-Income {c.tasks} {names}: {len(train):,} train / {len(val):,} val / {len(test):,} test rows"
    )
    rundir = RunDir(c.workdir, c)
    (rundir.path / "runs").mkdir(exist_ok=True)
    models = [m.strip() for m in c.models.split(",") if m.strip()]
    unknown = [m for m in models if m != "linear" and m not in c.model_kwargs]
    if unknown:
        raise ValueError(f"models: no model_kwargs entry for {unknown}; add --config.model_kwargs")
    runs: list[dict] = []
    for name in models:
        kwargs = c.model_kwargs[name].to_dict() if name in c.model_kwargs else {}
        ds = plain if name == "linear" else bucketed
        trainer = None  # one Trainer (one compilation) per model, shared by its seeds
        for seed in range(int(c.seeds)):
            spec = {
                "model": name,
                "model_kwargs": kwargs,
                "seed": seed,
                "tasks": c.tasks,
                "val_from": c.val_from,
                "split_seed": c.split_seed,
                "embed_dim": c.embed_dim,
                "numeric_buckets": 0 if name == "linear" else c.numeric_buckets,
                "epochs": c.epochs,
                "patience": c.patience,
                "batch_size": c.batch_size,
                "learning_rate": c.learning_rate,
                "l2": c.l2,
            }
            extra = c.overrides[name].to_dict() if name in c.overrides else {}
            bad = sorted(set(extra) - set(OVERRIDABLE))
            if bad:
                raise ValueError(f"overrides.{name}: unknown fields {bad}; use {list(OVERRIDABLE)}")
            spec.update(extra)
            spec = json.loads(json.dumps(experiment._plain(spec)))
            path = rundir.path / "runs" / f"{name}-s{seed}.json"
            if path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("spec") == spec:
                    runs.append(saved["record"])
                    print(f"-- {name} seed {seed}: read back from {path}")
                    continue
            if experiment._STOP is not None and experiment._STOP():
                raise KeyboardInterrupt(f"stopped before {name} seed {seed}; finished runs kept")
            model = make_model(name, ds[0], seed, kwargs)
            if trainer is None:
                cfg = TrainConfig(learning_rate=float(spec["learning_rate"]), l2=float(spec["l2"]))
                trainer = Trainer(model, cfg)
            run = f"{name}-s{seed}"
            res = train_select(
                trainer,
                model,
                spec,
                ds,
                name in PER_TASK,
                lambda r, run=run: rundir.log({"run": run, **r}),
            )
            record = {
                "model": name,
                "schedule": "joint",
                "aggregator": None,
                "weighting": "fixed",
                "seed": seed,
                "name": run,
                "params": n_params(model),
                **res,
            }
            record["average"] = classification_average(
                record["tasks"], {t.name: t.kind for t in train.task_specs}
            )
            record["delta_m"] = None
            path.write_text(json.dumps({"spec": spec, "record": experiment._plain(record)}))
            runs.append(record)
            aucs = ", ".join(f"{t} {record['tasks'][t]['auc']:.4f}" for t in names)
            if c.progress:
                print(
                    f"-- {name} seed {seed}: test AUC {aucs} (best epoch {res['best_epoch']}, "
                    f"{res['epochs_run']} epochs, {res['train_seconds']:.0f}s)",
                    flush=True,
                )
    for r in runs:  # Δm% over test AUC against the same seed's single-task MLPs
        base = next(
            (b for b in runs if b["model"] == "single_task" and b["seed"] == r["seed"]), None
        )
        if base is not None:
            auc = lambda x: {t: {"auc": x["tasks"][t]["auc"]} for t in names}
            r["delta_m"] = M.delta_m(auc(r), auc(base))
    rundir.write_results(
        "census-income-kdd",
        split,
        [public(r) for r in runs],
        title="Census-Income multi-task study",
    )
    table = summary_table(runs, names)
    minutes = (time.perf_counter() - t_start) / 60
    train_min = sum(r["train_seconds"] for r in runs) / 60
    per_run = experiment.results_table([public(r) for r in runs])
    (rundir.path / "results.md").write_text(
        f"# Census-Income ({c.tasks}: {', '.join(names)})\n\n"
        f"Data: {CITATION}\n\nsplit: {split}; test AUC at the best validation "
        f"epoch, mean ± std over {c.seeds} seeds; Δm% over test AUC vs the same seed's "
        f"single_task.\n\n{table}\n\nReferences (test AUC):\n\n{reference_table(names)}\n\n"
        f"Training time summed over the runs: {train_min:.1f} min; wall time of this invocation: "
        f"{minutes:.1f} min (runs read back from runs/*.json are not retrained).\n\n"
        f"## Runs\n\n{per_run}\n"
    )
    print(table)
    print(f"\n{reference_table(names)}")
    print(
        f"\nrun directory: {rundir.path} (results.json, results.md, metrics.jsonl); {minutes:.1f} min"
    )
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", default=__file__)
    cli(main)
