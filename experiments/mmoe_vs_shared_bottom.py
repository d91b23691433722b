"""MMoE vs shared bottom (and OMoE) at equal parameter count on the MMoE paper's synthetic tasks.

Ma et al., KDD 2018, §4: two regression tasks with label correlation p (here 0.5), inputs x ∈ R^100;
MMoE with 8 experts of 16 units and towers of 8 units; the shared bottom's single hidden layer is
sized to the same parameter count. Adam, MSE on both tasks (λ = 1 each), joint training; the
reported number is the test MSE averaged over the two tasks after a fixed number of epochs (no
model selection on the test set), then averaged over seeds (a new data set and initialisation per
seed).

    .venv/bin/python experiments/mmoe_vs_shared_bottom.py --seeds 5 --epochs 100
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from mtl.data import synthetic
from mtl.data.batching import Dataset, epoch_batches, eval_batches
from mtl.models import build_model
from mtl.train import Stage, TrainConfig, Trainer


def n_params(model: nnx.Module) -> int:
    """Σ over nnx.Param leaves of their sizes."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def shared_bottom_width(dim: int, target: int, tower: int, tasks: int = 2) -> int:
    """h minimising |(dim·h + h) + T·(h·tower + tower) + T·(tower + 1) − target|."""
    count = lambda h: dim * h + h + tasks * (h * tower + tower) + tasks * (tower + 1)
    return min(range(1, 10 * target), key=lambda h: abs(count(h) - target))


def run_one(name: str, kwargs: dict, data: tuple, args, seed: int) -> dict:
    """Train one model on (train, test) and return its parameter count and test MSEs."""
    train, test = data
    feats, tasks = synthetic.mmoe_specs(args.dim)
    model = build_model(name, feats, tasks, seed=seed, **kwargs)
    trainer = Trainer(model, TrainConfig(learning_rate=args.lr))
    state = trainer.init(model, seed=seed)
    stage = Stage(1)
    key = jax.random.key(seed)
    splits = {n: (eval_batches(d, args.batch), d) for n, d in (("train", train), ("test", test))}

    def mse(split: str = "test") -> dict[str, float]:
        batches, ds = splits[split]
        preds, _ = trainer.predict(state, batches)
        err = lambda t: np.asarray(preds[t])[: len(ds)] - np.asarray(ds.labels[t])
        out = {t: float(np.mean(err(t) ** 2)) for t in ("t1", "t2")}
        return {**out, "mean": (out["t1"] + out["t2"]) / 2}

    curve = []
    for epoch in range(1, args.epochs + 1):
        key, k = jax.random.split(key)
        state, _ = trainer.run(state, epoch_batches(train, args.batch, k), stage)
        if epoch % args.log_every == 0 or epoch == args.epochs:
            curve.append((epoch, mse()["mean"]))
    return {"params": n_params(model), "test": mse(), "train": mse("train"), "curve": curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--correlation", type=float, default=0.5)
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=2_000)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-units", type=int, default=16)
    p.add_argument("--tower", type=int, default=8)
    p.add_argument("--models", default="mmoe,omoe,shared_bottom")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--json", default=None, help="also write the per-seed results here")
    args = p.parse_args()

    moe = dict(num_experts=args.experts, expert=(args.expert_units,), tower=(args.tower,))
    feats, tasks = synthetic.mmoe_specs(args.dim)
    target = n_params(nnx.eval_shape(lambda: build_model("mmoe", feats, tasks, **moe)))
    h = shared_bottom_width(args.dim, target, args.tower)
    configs = {
        "mmoe": moe,
        "omoe": moe,
        "shared_bottom": dict(trunk=(h,), tower=(args.tower,)),
    }
    names = args.models.split(",")
    results: dict[str, list[dict]] = {n: [] for n in names}
    label_var = []
    for seed in range(args.seeds):
        x, y = synthetic.mmoe_tasks(
            args.n_train + args.n_test, args.dim, args.correlation, seed=1000 + seed
        )
        ds = Dataset({"x": x}, {"t1": y[:, 0], "t2": y[:, 1]}, feats, tasks)
        train = ds.take(np.arange(args.n_train))
        test = ds.take(np.arange(args.n_train, len(ds)))
        label_var.append(float(np.var(y[args.n_train :], axis=0).mean()))
        for n in names:
            t0 = time.time()
            r = run_one(n, configs[n], (train.to_device(), test.to_device()), args, seed)
            results[n].append(r)
            print(
                f"seed {seed} {n:14s} params {r['params']:6d}  test MSE {r['test']['mean']:.4f} "
                f"(t1 {r['test']['t1']:.4f}, t2 {r['test']['t2']:.4f}; train {r['train']['mean']:.4f})  "
                f"curve {[(e, round(v, 4)) for e, v in r['curve']]}  {time.time() - t0:.1f}s",
                flush=True,
            )
    print(
        f"\ncorrelation {args.correlation}, dim {args.dim}, {args.n_train} train / {args.n_test} "
        f"test, {args.epochs} epochs, batch {args.batch}, Adam lr {args.lr}, {args.seeds} seeds; "
        f"test label variance (predict-the-mean MSE) {np.mean(label_var):.3f}"
    )
    print(
        f"{'model':14s} {'params':>7s}  {'test MSE mean ± sd':>18s}  {'median':>7s}  "
        f"{'train MSE':>9s}  vs shared bottom: geo-mean ratio, seeds lower"
    )
    base = [r["test"]["mean"] for r in results.get("shared_bottom", [])]
    for n in names:
        v = np.asarray([r["test"]["mean"] for r in results[n]])
        tr = np.mean([r["train"]["mean"] for r in results[n]])
        sd = v.std(ddof=1) if len(v) > 1 else float("nan")
        line = (
            f"{n:14s} {results[n][0]['params']:7d}  {v.mean():.4f} ± {sd:.4f}  {np.median(v):.4f}"
        )
        line += f"  {tr:9.4f}"
        if base and n != "shared_bottom":
            ratio = float(np.exp(np.mean(np.log(v / np.asarray(base)))))
            line += f"  {ratio:.3f}, {int((v < np.asarray(base)).sum())}/{len(v)}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
