"""The MMoE paper's synthetic study: test loss vs task correlation (Ma et al., KDD 2018, §4).

Two regression tasks y_t = w_tᵀx + Σ_i sin(α_i w_tᵀx + β_i) + ε with cos(w1, w2) = p
(``mtl.data.synthetic.mmoe_tasks``: x ∈ R^100, 10 sines, noise 0.01, scale 1), p in
{1.0, 0.9, 0.5, 0.0}. Models as in the paper: MMoE and OMoE with 8 experts of 16 ReLU units and
per-task towers of 8 units; the shared bottom's single hidden layer and the soft-sharing columns'
hidden layer are sized to the MMoE parameter count (counts printed and stored). Adam, MSE on both
tasks (λ = 1 each), joint training for a fixed number of epochs, no model selection on the test set;
each seed draws a new data set (shared by every model and every p, so comparisons are paired: only
the correlation changes) and a new initialisation. Reported: the test MSE averaged over the two
tasks, every ``eval_every`` epochs (curves.png) and at the end (summary.png: final test MSE vs p),
mean ± std over seeds.

Finished (model, p, seed) runs are stored in ``workdir/runs/*.json`` and read back when the same
command is run again with the same settings. Supersedes the former mmoe_vs_shared_bottom.py (the
p = 0.5 column with the same settings).

Launch (full):  python experiments/synthetic_sweep.py --config=experiments/synthetic_sweep.py
Quick variant:  python experiments/synthetic_sweep.py --config=experiments/synthetic_sweep.py:quick
Overrides:      --config.seeds=5 --config.epochs=50 --config.correlations="(1.0, 0.0)"
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict, config_flags

from mtl import experiment
from mtl.data import synthetic
from mtl.data.batching import Dataset, epoch_batches
from mtl.experiment import RunDir, cli, public
from mtl.models import build_model
from mtl.runner import Divergence, evaluate
from mtl.train import Stage, TrainConfig, Trainer

MODELS = ("shared_bottom", "omoe", "mmoe", "soft_sharing")


def get_config(arg: str | None = None) -> ConfigDict:
    """Full settings (paper sizes, 5 seeds, 100 epochs); ``arg='quick'``: 1 seed, 10 epochs."""
    c = ConfigDict()
    c.correlations = (1.0, 0.9, 0.5, 0.0)
    c.seeds = 5
    c.models = ",".join(MODELS)
    c.dim = 100
    c.n_train = 10_000
    c.n_test = 2_000
    c.num_experts = 8
    c.expert_units = 16
    c.tower = 8
    c.soft_penalty = 1e-3  # λ of the L2-to-mean coupling of the soft-sharing columns
    c.epochs = 100
    c.batch_size = 128
    c.learning_rate = 1e-3
    c.eval_every = 5
    c.workdir = "runs/synthetic"
    c.progress = True
    if arg == "quick":
        c.seeds = 1
        c.epochs = 10
        c.eval_every = 2
        c.workdir = "runs/synthetic-quick"
    elif arg not in (None, ""):
        raise ValueError(f"config: unknown variant {arg!r}; use 'quick' or nothing")
    return c


def n_params(model: nnx.Module) -> int:
    """Σ over nnx.Param leaves of their sizes."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count(name: str, dim: int, kwargs: Mapping[str, Any]) -> int:
    """Parameter count of ``name`` built with ``kwargs`` (shapes only, nothing allocated)."""
    feats, tasks = synthetic.mmoe_specs(dim)
    return n_params(nnx.eval_shape(lambda: build_model(name, feats, tasks, **kwargs)))


def width_for(name: str, dim: int, target: int, kwargs: Callable[[int], dict]) -> int:
    """The hidden width h whose parameter count is closest to ``target`` (count grows with h)."""
    lo, hi = 1, 4096
    while lo < hi:  # smallest h with count >= target
        mid = (lo + hi) // 2
        if count(name, dim, kwargs(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    cands = [h for h in (lo - 1, lo) if h >= 1]
    return min(cands, key=lambda h: abs(count(name, dim, kwargs(h)) - target))


def model_kwargs(c: ConfigDict) -> dict[str, dict]:
    """Per-model size options: the paper's MoE sizes, the others matched to the MMoE count."""
    moe = {"num_experts": c.num_experts, "expert": (c.expert_units,), "tower": (c.tower,)}
    target = count("mmoe", c.dim, moe)
    sb = lambda h: {"trunk": (h,), "tower": (c.tower,)}
    ss = lambda h: {"trunk": (h,), "tower": (c.tower,), "penalty": c.soft_penalty}
    return {
        "mmoe": moe,
        "omoe": moe,
        "shared_bottom": sb(width_for("shared_bottom", c.dim, target, sb)),
        "soft_sharing": ss(width_for("soft_sharing", c.dim, target, ss)),
    }


def test_mse(trainer: Trainer, state: Any, data: Dataset) -> dict[str, dict[str, float]]:
    """Per-task {mse, rmse, mae} on ``data``."""
    return {t: {"mse": m["rmse"] ** 2, **m} for t, m in evaluate(trainer, state, data).items()}


def train_curve(
    trainer: Trainer, model: nnx.Module, spec: Mapping[str, Any], train: Dataset, test: Dataset
) -> dict:
    """Train for ``spec['epochs']`` epochs; the test MSE every ``eval_every`` epochs and at the end."""
    seed = int(spec["seed"])
    state = trainer.init(model, seed=seed)
    key = jax.random.key(seed)
    curve, seconds = [], []
    for e in range(int(spec["epochs"])):
        t0 = time.perf_counter()
        state, m = trainer.run(
            state,
            epoch_batches(train, int(spec["batch_size"]), jax.random.fold_in(key, e)),
            Stage(1),
        )
        m = jax.device_get(m)
        seconds.append(time.perf_counter() - t0)
        if not np.all(m["finite"]):
            raise Divergence(f"non-finite loss in epoch {e}; lower the learning rate")
        if (e + 1) % int(spec["eval_every"]) == 0 or e + 1 == int(spec["epochs"]):
            tm = test_mse(trainer, state, test)
            curve.append([e + 1, float(np.mean([v["mse"] for v in tm.values()]))])
    tasks = test_mse(trainer, state, test)
    train_m = test_mse(trainer, state, train)
    eps = len(train) * max(len(seconds) - 1, 1) / max(sum(seconds[1:] or seconds), 1e-9)
    return {
        "tasks": tasks,
        "average": {"mse": float(np.mean([v["mse"] for v in tasks.values()]))},
        "train_mse": float(np.mean([v["mse"] for v in train_m.values()])),
        "curve": curve,
        "train_seconds": float(sum(seconds)),
        "examples_per_second": float(eps),
    }


def ms(xs: Sequence[float], digits: int = 4) -> str:
    """'mean ± std' (sample std; 0 for one value)."""
    sd = np.std(xs, ddof=1) if len(xs) > 1 else 0.0
    return f"{np.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def summary_table(runs: Sequence[Mapping], models: Sequence[str], ps: Sequence[float]) -> str:
    """Final test MSE (mean over both tasks), mean ± std over seeds: one row per model, one column per p."""
    head = ["model", "params", *[f"p = {p}" for p in ps], "train MSE (all p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        rs = [r for r in runs if r["model"] == model]
        cells = [model, f"{rs[0]['params']:,}"]
        cells += [ms([r["average"]["mse"] for r in rs if r["correlation"] == p]) for p in ps]
        cells.append(ms([r["train_mse"] for r in rs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_ratios(
    runs: Sequence[Mapping], model: str, p: float, baseline: str = "shared_bottom"
) -> np.ndarray:
    """Per seed: the model's final test MSE over the baseline's on the same data and seed."""
    base = {
        r["seed"]: r["average"]["mse"]
        for r in runs
        if r["model"] == baseline and r["correlation"] == p
    }
    rs = [r for r in runs if r["model"] == model and r["correlation"] == p and r["seed"] in base]
    return np.asarray([r["average"]["mse"] / base[r["seed"]] for r in rs])


def wins_table(runs: Sequence[Mapping], models: Sequence[str], ps: Sequence[float]) -> str:
    """Per p, paired with the shared bottom: geometric-mean MSE ratio and seeds with a lower MSE."""
    if not any(r["model"] == "shared_bottom" for r in runs):
        return ""
    head = ["model", *[f"p = {p}" for p in ps]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        if model == "shared_bottom":
            continue
        cells = [model]
        for p in ps:
            ratio = paired_ratios(runs, model, p)
            gm = float(np.exp(np.mean(np.log(ratio))))
            cells.append(f"{gm:.3f} ({int((ratio < 1).sum())}/{ratio.size})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, runs: Sequence[Mapping], models: Sequence[str], ps: Sequence[float]) -> None:
    """curves.png (test MSE vs epoch, one panel per p) and summary.png (final test MSE vs p)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ps), figsize=(4 * len(ps), 3.6), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], ps):
        for model in models:
            rs = [r for r in runs if r["model"] == model and r["correlation"] == p]
            x = [e for e, _ in rs[0]["curve"]]
            y = np.asarray([[v for _, v in r["curve"]] for r in rs])
            ax.plot(x, y.mean(0), label=model)
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
        ax.set_title(f"p = {p}")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("test MSE (mean of 2 tasks; band: min-max over seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path / "curves.png", dpi=120)
    plt.close(fig)

    paired = any(r["model"] == "shared_bottom" for r in runs)
    fig, axes = plt.subplots(
        1, 2 if paired else 1, figsize=(11 if paired else 5.5, 4), squeeze=False
    )
    ax = axes[0][0]
    for model in models:
        means, sds = [], []
        for p in ps:
            v = [r["average"]["mse"] for r in runs if r["model"] == model and r["correlation"] == p]
            means.append(np.mean(v))
            sds.append(np.std(v, ddof=1) if len(v) > 1 else 0.0)
        ax.errorbar(ps, means, yerr=sds, marker="o", capsize=3, label=model)
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("final test MSE (mean of 2 tasks), mean ± std")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    if paired:
        ax = axes[0][1]
        for model in models:
            gm = [float(np.exp(np.mean(np.log(paired_ratios(runs, model, p))))) for p in ps]
            ax.plot(ps, gm, marker="o", label=model)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("task correlation p")
        ax.set_ylabel("test MSE / shared bottom's (geo-mean)")
        ax.invert_xaxis()
    fig.tight_layout()
    fig.savefig(path / "summary.png", dpi=120)
    plt.close(fig)


def main(c: ConfigDict) -> int:
    """Train every (model, p, seed), write results and plots, print the summary."""
    t_start = time.perf_counter()
    models = [m.strip() for m in c.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"models: {bad} not in {list(MODELS)}")
    ps = tuple(float(p) for p in c.correlations)
    sizes = model_kwargs(c)
    feats, tasks = synthetic.mmoe_specs(c.dim)
    params = {m: count(m, c.dim, sizes[m]) for m in models}
    for m in models:
        print(f"{m:14s} {params[m]:6,d} parameters  {sizes[m]}")
    rundir = RunDir(c.workdir, c)
    (rundir.path / "runs").mkdir(exist_ok=True)
    data: dict[tuple[float, int], tuple[Dataset, Dataset]] = {}
    label_var = []
    for p in ps:
        for seed in range(int(c.seeds)):
            x, y = synthetic.mmoe_tasks(c.n_train + c.n_test, c.dim, p, seed=1000 + seed)
            ds = Dataset({"x": x}, {"t1": y[:, 0], "t2": y[:, 1]}, feats, tasks)
            idx = np.arange(len(ds))
            data[p, seed] = (
                ds.take(idx[: c.n_train]).to_device(),
                ds.take(idx[c.n_train :]).to_device(),
            )
            label_var.append(float(np.var(y[c.n_train :], axis=0).mean()))
    runs: list[dict] = []
    for model in models:
        trainer = None  # one Trainer (one compilation) per model, shared by every p and seed
        for p in ps:
            for seed in range(int(c.seeds)):
                spec = {
                    "model": model,
                    "model_kwargs": sizes[model],
                    "correlation": p,
                    "seed": seed,
                    "data_seed": 1000 + seed,
                    **{k: c[k] for k in ("dim", "n_train", "n_test", "epochs", "batch_size")},
                    **{k: c[k] for k in ("learning_rate", "eval_every")},
                }
                spec = json.loads(json.dumps(experiment._plain(spec)))
                run = f"{model}-p{p}-s{seed}"
                path = rundir.path / "runs" / f"{run}.json"
                if path.is_file():
                    saved = json.loads(path.read_text())
                    if saved.get("spec") == spec:
                        runs.append(saved["record"])
                        continue
                if experiment._STOP is not None and experiment._STOP():
                    raise KeyboardInterrupt(f"stopped before {run}; finished runs kept")
                net = build_model(model, feats, tasks, seed=seed, **sizes[model])
                if trainer is None:
                    trainer = Trainer(net, TrainConfig(learning_rate=float(c.learning_rate)))
                res = train_curve(trainer, net, spec, *data[p, seed])
                record = {
                    "model": model,
                    "schedule": "joint",
                    "aggregator": None,
                    "weighting": "fixed",
                    "correlation": p,
                    "seed": seed,
                    "name": run,
                    "params": params[model],
                    **res,
                    "delta_m": None,
                }
                rundir.log({"run": run, "curve": res["curve"], "train_mse": res["train_mse"]})
                path.write_text(json.dumps({"spec": spec, "record": experiment._plain(record)}))
                runs.append(record)
                if c.progress:
                    print(
                        f"-- {run:24s} test MSE {record['average']['mse']:.4f} "
                        f"(train {res['train_mse']:.4f}) {res['train_seconds']:.1f}s",
                        flush=True,
                    )
    setting = (
        f"synthetic (Ma et al. 2018): dim {c.dim}, {c.n_train} train / {c.n_test} test rows per "
        f"(p, seed), data seeds 1000..{1000 + int(c.seeds) - 1}"
    )
    rundir.write_results("mmoe-synthetic", setting, [public(r) for r in runs], title="synthetic")
    plot(rundir.path, runs, models, ps)
    table, wins = summary_table(runs, models, ps), wins_table(runs, models, ps)
    minutes = (time.perf_counter() - t_start) / 60
    train_min = sum(r["train_seconds"] for r in runs) / 60
    (rundir.path / "results.md").write_text(
        f"# MMoE synthetic sweep\n\n{setting}; {c.epochs} epochs, batch {c.batch_size}, Adam "
        f"lr {c.learning_rate}; final test MSE averaged over the two tasks, mean ± std over "
        f"{c.seeds} seeds; test label variance (MSE of predicting the mean) "
        f"{np.mean(label_var):.3f}.\n\n{table}\n\nPaired with the shared bottom (same data and "
        f"seed): geometric mean over seeds of the final test MSE ratio (seeds with a lower "
        f"MSE):\n\n{wins}\n\nModel sizes: "
        + "; ".join(f"{m} {params[m]:,} ({sizes[m]})" for m in models)
        + f".\n\nTraining time summed over the runs: {train_min:.1f} min; wall time of this "
        f"invocation: {minutes:.1f} min (runs read back from runs/*.json are not retrained). "
        "Plots: curves.png, summary.png.\n"
    )
    print(table)
    print(f"\n{wins}")
    print(
        f"\nrun directory: {rundir.path} (results.json, results.md, curves.png, summary.png); {minutes:.1f} min"
    )
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", default=__file__)
    cli(main)
