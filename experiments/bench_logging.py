"""Cost of gradient-analysis logging: ms per step of a scanned epoch at log_every = 0, 50 and 1.

Shared bottom on the MMoE paper's synthetic tasks (x ∈ R^dim, two regression tasks), batch 256,
one compiled call per epoch (``Trainer.run``). A logged step adds a vmapped VJP over the tasks
(the per-task Jacobian on the shared parameters) and the statistics of mtl.analysis; the other
steps are a separate scan body without that work (no ``lax.cond``), so log_every=50 should cost
about 1/50 of the log_every=1 overhead. Each setting runs ``--repeats`` epochs after a warm-up
(compile), interleaved with the others; the table gives medians of the wall time and of the
process CPU time per step. On a shared CPU machine the CPU time is the stable measure (wall time
includes waiting for other processes); on an accelerator read the wall time.

    .venv/bin/python experiments/bench_logging.py --steps 200 --repeats 9
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from mtl.data import synthetic
from mtl.data.batching import Dataset, epoch_batches
from mtl.models import build_model
from mtl.train import Stage, TrainConfig, Trainer


class Bench:
    """One compiled trainer at a given ``log_every``, its state and one epoch of batches."""

    def __init__(self, log_every: int, data: Dataset, args: argparse.Namespace):
        feats, tasks = data.feature_specs, data.task_specs
        model = build_model("shared_bottom", feats, tasks, trunk=(args.trunk,), tower=(args.tower,))
        self.log_every, self.steps = log_every, args.steps
        self.trainer = Trainer(model, TrainConfig(learning_rate=1e-3, log_every=log_every))
        self.state = self.trainer.init(model)
        self.batches = epoch_batches(data, args.batch, jax.random.key(0))
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.epoch()  # warm-up: compiles

    def epoch(self) -> tuple[float, float]:
        """(wall, process CPU) seconds of one scanned epoch, blocking on its results."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.state, m = self.trainer.run(self.state, self.batches, Stage(1))
        jax.block_until_ready((self.state, m))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if self.log_every:
            logged, want = int(np.sum(m["logged"])), -(-self.steps // self.log_every)
            assert logged == want, f"log_every={self.log_every}: {logged} logged, want {want}"
        return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="steps per epoch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--trunk", type=int, default=128)
    p.add_argument("--tower", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--intervals", default="0,50,1", help="log_every values (0: off)")
    args = p.parse_args()

    x, y = synthetic.mmoe_tasks(args.steps * args.batch, args.dim, 0.5, seed=0)
    feats, tasks = synthetic.mmoe_specs(args.dim)
    data = Dataset({"x": x}, {"t1": y[:, 0], "t2": y[:, 1]}, feats, tasks).to_device()
    intervals = [int(k) for k in args.intervals.split(",")]
    benches = {k: Bench(k, data, args) for k in intervals}
    for _ in range(args.repeats):  # interleaved, so background load hits every setting alike
        for b in benches.values():
            wall, cpu = b.epoch()
            b.wall.append(wall)
            b.cpu.append(cpu)
    per_step = lambda xs: 1e3 * float(np.median(xs)) / args.steps
    wall = {k: per_step(b.wall) for k, b in benches.items()}
    cpu = {k: per_step(b.cpu) for k, b in benches.items()}
    vs = lambda d, k: "—" if 0 not in d or k == 0 else f"{100 * (d[k] / d[0] - 1):+.1f}%"
    dev = jax.devices()[0]
    print(
        f"{dev.device_kind} ({dev.platform}), shared bottom trunk {args.trunk} tower {args.tower}, "
        f"dim {args.dim}, batch {args.batch}, {args.steps} steps/epoch, "
        f"medians of {args.repeats} interleaved epochs\n"
    )
    print("| log_every | logged steps/epoch | wall ms/step | vs off | CPU ms/step | vs off |")
    print("|---|---|---|---|---|---|")
    for k in intervals:
        logged = -(-args.steps // k) if k else 0
        print(
            f"| {k if k else 'off (0)'} | {logged} | {wall[k]:.3f} | {vs(wall, k)} "
            f"| {cpu[k]:.3f} | {vs(cpu, k)} |"
        )


if __name__ == "__main__":
    main()
