"""Time every aggregator (jit, block_until_ready, median of repeats) on random [T, P] Jacobians.

Usage: python experiments/bench_aggregators.py [--params 100000] [--tasks 2 4 8] [--repeats 20]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    jacs = {t: jacobian(t, args.params) for t in args.tasks}
    print(f"device: {jax.devices()[0].device_kind}, P = {args.params:,}, ms per call (median)\n")
    print("| aggregator | " + " | ".join(f"T={t}" for t in args.tasks) + " |")
    print("|---|" + "---:|" * len(args.tasks))
    for name in AGGREGATORS:
        row = [f"{time_ms(name, jacs[t], args.repeats):.2f}" for t in args.tasks]
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
