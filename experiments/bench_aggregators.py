"""Time every aggregator (jit, block_until_ready, median of repeats) on random [T, P] Jacobians,
or (``--step``) the whole train step with each aggregator relative to the joint step.

Usage: python experiments/bench_aggregators.py [--params 100000] [--tasks 2 4 8] [--repeats 20]
       python experiments/bench_aggregators.py --step [--batch 256] [--tasks 2 4 8]
Prints a markdown table of milliseconds per call (compilation excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtl.aggregation import AGGREGATORS, get_aggregator


def jacobian(t: int, p: int, seed: int = 0) -> jax.Array:
    """Random rows with shared + task-specific parts and one conflicting pair (like real MTL)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(1, p))
    j = 0.5 * shared + rng.normal(size=(t, p))
    j[-1] = -j[0] + 0.3 * rng.normal(size=p)
    j *= rng.uniform(0.3, 3.0, size=(t, 1))
    return jnp.asarray(j, jnp.float32)


def time_ms(name: str, jac: jax.Array, repeats: int) -> float:
    agg = get_aggregator(name)
    apply = jax.jit(agg.apply)
    state = agg.init(*jac.shape)
    key = jax.random.key(0)
    jax.block_until_ready(apply(jac, state, key))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(apply(jac, state, key))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def step_ms(aggregator: str | None, tasks: int, batch: int, repeats: int, steps: int = 20) -> float:
    """Median ms per step of a scanned epoch: shared bottom on ML-100K-shaped ids, T binary tasks."""
    from mtl.data import synthetic
    from mtl.data.batching import Dataset, epoch_batches
    from mtl.models import build_model
    from mtl.spec import TaskSpec
    from mtl.train import Stage, TrainConfig, Trainer

    f, l, fs, _ = synthetic.recsys(n=batch * steps, num_users=943, num_items=1682, seed=0)
    rng = np.random.default_rng(0)
    labels = {
        f"t{i}": (l["click"] + (rng.random(len(l["click"])) < 0.1 * i)) % 2 for i in range(tasks)
    }
    ds = Dataset(f, labels, fs, tuple(TaskSpec(k, "binary") for k in labels))
    model = build_model("shared_bottom", fs, ds.task_specs)
    tr = Trainer(model, TrainConfig(aggregator=aggregator))
    st = tr.init(model)
    b = epoch_batches(ds, batch, jax.random.key(0))
    st, _ = tr.run(st, b, Stage(1))
    jax.block_until_ready(st)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        st, m = tr.run(st, b, Stage(1))
        jax.block_until_ready(st)
        times.append((time.perf_counter() - t0) / steps)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step", action="store_true", help="time whole train steps instead")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if args.step:
        print(
            f"device: {jax.devices()[0].device_kind}, batch {args.batch}, step ms (ratio to joint)\n"
        )
        print("| aggregator | " + " | ".join(f"T={t}" for t in args.tasks) + " |")
        print("|---|" + "---:|" * len(args.tasks))
        base = {t: step_ms(None, t, args.batch, args.repeats) for t in args.tasks}
        print("| joint (none) | " + " | ".join(f"{base[t]:.2f} (1.00)" for t in args.tasks) + " |")
        for name in AGGREGATORS:
            ms = {t: step_ms(name, t, args.batch, args.repeats) for t in args.tasks}
            cells = [f"{ms[t]:.2f} ({ms[t] / base[t]:.2f})" for t in args.tasks]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        return
    jacs = {t: jacobian(t, args.params) for t in args.tasks}
    print(f"device: {jax.devices()[0].device_kind}, P = {args.params:,}, ms per call (median)\n")
    print("| aggregator | " + " | ".join(f"T={t}" for t in args.tasks) + " |")
    print("|---|" + "---:|" * len(args.tasks))
    for name in AGGREGATORS:
        row = [f"{time_ms(name, jacs[t], args.repeats):.2f}" for t in args.tasks]
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
