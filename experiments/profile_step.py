"""Where one compiled training step spends its time, op by op, without TensorBoard.

Runs the benchmark's setting (``experiments/benchmark.py``: ML-100K-shaped input, one
``Trainer.run`` over a chunk of scanned steps) under ``jax.profiler.trace`` with XLA:CPU's per-op
trace events on (``"xla_cpu_enable_xprof_traceme": True`` added to the step's compiler options), and
sums the events of each HLO instruction of the compiled step. Each op is listed with its output
shape and the jax operation it came from (its ``op_name`` metadata), and the ops are also summed by
that operation (forward ``jvp()`` vs backward ``transpose(jvp())``, ``dot_general``, ``select_n``
...).

    .venv/bin/python experiments/profile_step.py                      # shared bottom, batch 4096
    .venv/bin/python experiments/profile_step.py --model mmoe --batch 256 --aggregator upgrad
    .venv/bin/python experiments/profile_step.py --tasks 8 --aggregator mgda --aggregate-on representation

Read it as a map, not a stopwatch: tracing adds a few µs per op, and XLA:CPU runs some ops (Eigen
dots) asynchronously, so an event can include time when the cores worked on another op. The sum of
the events is printed beside the step's untraced time. Needs a CPU backend (other backends name
their events differently: use their own profilers).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchmark as B  # experiments/benchmark.py: python puts the script's folder on sys.path
import jax

TRACE = {"xla_cpu_enable_xprof_traceme": True}
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """{instruction name: (output shape, HLO opcode, jax op_name)} of a compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            op = _OP_NAME.search(line)
            out[m.group(1)] = (m.group(2), m.group(3), op.group(1) if op else "")
    return out


def source(op_name: str) -> str:
    """The jax operation behind an op_name, e.g. 'backward dot_general' for
    .../while/body/closed_call/transpose(jvp())/dot_general (the scan and jit scaffolding dropped;
    jvp() is the forward pass, transpose(jvp()) the backward pass)."""
    skip = ("jit(", "while", "body", "closed_call", "cond")
    parts = [p for p in op_name.split("/") if p and not p.startswith(skip)]
    if not parts:
        return "(no jax op)" if not op_name else "(step scaffolding)"
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    phase = (
        "backward"
        if first.startswith("transpose(")
        else "forward"
        if first.startswith("jvp(")
        else first
    )
    return f"{phase} {parts[-1]}"


def event_us(trace_dir: Path, names: set[str]) -> collections.Counter:
    """Total µs of the trace events named after the given HLO instructions."""
    files = sorted(trace_dir.glob("**/*.trace.json.gz"))
    if not files:
        raise RuntimeError(f"no trace written under {trace_dir}")
    doc = json.load(gzip.open(files[-1]))
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            total[e["name"]] += e["dur"]
    return total


def profile(
    model: str,
    batch: int,
    aggregator: str | None,
    chunks: int,
    rows: int,
    tasks: int = 3,
    aggregate_on: str = "params",
) -> dict[str, Any]:
    """Per-op µs/step of ``chunks`` traced chunks of the benchmark's setting, and the untraced step."""
    steps = max(1, rows // batch)
    data = B.ml100k_like(steps * batch, num_tasks=tasks)
    kw = dict(aggregator=aggregator, aggregate_on=aggregate_on)
    untraced = B.ours(model, data, batch, steps, **kw)
    untraced.compile()
    plain = untraced.warm_up()
    given = B.COMPILER_OPTIONS
    B.COMPILER_OPTIONS = {**untraced.bench.info["compiler_options"], **TRACE}  # as compiled
    try:
        o = B.ours(model, data, batch, steps, **kw)
    finally:
        B.COMPILER_OPTIONS = given
    hlo = instructions(o.lowered.compile().as_text())
    o.compile()
    traced = o.warm_up()
    B.interleave([plain, traced], 3)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(chunks):
                traced.chunk()
        us = event_us(Path(d), set(hlo))
    per_step = {n: t / (chunks * steps) for n, t in us.items()}
    return {
        "ops": [
            {"op": n, "us": t, "shape": hlo[n][0], "opcode": hlo[n][1], "source": source(hlo[n][2])}
            for n, t in sorted(per_step.items(), key=lambda kv: -kv[1])
        ],
        "step_ms_untraced": plain.record()["ms_per_step"],
        "step_ms_traced": traced.record()["ms_per_step"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shared_bottom", choices=sorted(B.SIZES))
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--aggregator", default=None, help="e.g. upgrad (default: plain joint step)")
    p.add_argument("--aggregate-on", default="params", choices=("params", "representation"))
    p.add_argument("--tasks", type=int, default=3, help="T (3, or 8 for the many-task input)")
    p.add_argument("--chunks", type=int, default=3, help="traced chunks")
    p.add_argument("--rows", type=int, default=B.EPOCH_EXAMPLES, help="rows per chunk")
    p.add_argument("--top", type=int, default=25, help="ops listed")
    a = p.parse_args(argv)
    if jax.default_backend() != "cpu":
        print(f"backend {jax.default_backend()}: this reads XLA:CPU's op events; use its profiler")
        return 1
    r = profile(a.model, a.batch, a.aggregator, a.chunks, a.rows, a.tasks, a.aggregate_on)
    total = sum(op["us"] for op in r["ops"])
    print(
        f"{a.model}, T = {a.tasks}, batch {a.batch}, aggregator {a.aggregator or '-'}"
        f"{' on the representation' if a.aggregator and a.aggregate_on != 'params' else ''}: step "
        f"{r['step_ms_untraced']:.2f} ms untraced, {r['step_ms_traced']:.2f} ms traced; op events "
        f"sum to {total / 1e3:.2f} ms/step over {len(r['ops'])} ops\n"
    )
    print("| µs/step | % | op | opcode | output | from |")
    print("|---|---|---|---|---|---|")
    for op in r["ops"][: a.top]:
        print(
            f"| {op['us']:.0f} | {100 * op['us'] / total:.1f} | {op['op']} | {op['opcode']} | "
            f"`{op['shape']}` | {op['source']} |"
        )
    by_source: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for op in r["ops"]:
        by_source[op["source"]] += op["us"]
        count[op["source"]] += 1
    print("\n| µs/step | % | ops | from |")
    print("|---|---|---|---|")
    for src, us in by_source.most_common(a.top):
        print(f"| {us:.0f} | {100 * us / total:.1f} | {count[src]} | {src} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
