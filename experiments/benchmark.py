"""Speed benchmark: mtl's compiled training steps side by side with PyTorch and TorchJD.

One run on one machine measures, on an ML-100K-shaped input (943 users, 1,682 items, 32-d id
embeddings, age / gender / occupation / year side features, a timestamp; tasks like + rating +
genre, or 8 tasks for the representation-level study):

* ours: ms/step and examples/s of ``Trainer.run``, as the product runs it: one compiled
  ``lax.scan`` over a device-resident chunk of S steps, state donated, ``block_until_ready``; a
  chunk is one epoch of the main job's ML-100K training split (72,000 ratings; 73,728 rows =
  18 x 4096 = 288 x 256), which is what ``runner.fit`` passes to one ``Trainer.run``; the
  median over repeats after a warm-up, for each model x schedule x aggregator at each batch size;
  compile time (trace + lower + XLA compile); FLOPs per step from XLA's cost analysis of that same
  executable, as a % of the measured float32 matmul FLOP/s (a 2048³ matmul in jax);
* peers, when installed (else skipped with the reason printed): the same shared-bottom and MMoE
  models in plain eager PyTorch (``zero_grad``, ``backward``, Adam ``step``) and TorchJD's
  ``mtl_backward`` + ``jac_to_grad`` with UPGrad, MGDA and PCGrad;
* the aggregator alone on one real Jacobian (ours under jit vs TorchJD's aggregator objects);
* representation-level aggregation (MGDA-UB style, ``aggregate_on="representation"``) vs the plain
  joint step, at T = 8.

Ours and the peers at one setting are timed round-robin (one chunk each, repeated), so a change of
load on a shared machine hits them alike; the table also gives each row's fastest chunk.

Torch threads: ``torch.set_num_threads(<cores>)`` (``--torch-threads`` to change), and the eager
PyTorch peer is also timed with 1 thread; the speedups use the faster of the two. OMP_WAIT_POLICY
defaults to PASSIVE here (export it to override): spinning OpenMP workers made PyTorch 10-50x
slower on a busy 2-core machine.

    .venv/bin/python experiments/benchmark.py            # all settings (under 10 min on 2 cores)
    .venv/bin/python experiments/benchmark.py --quick    # one batch size, fewer settings
    .venv/bin/python experiments/benchmark.py --out runs/bench-gpu --batch-sizes 1024,8192
    .venv/bin/python experiments/benchmark.py --sync-dispatch  # CPU calls on the calling thread

Writes ``results.json`` and ``results.md`` to the run dir (default runs/benchmark).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when torch loads

import argparse
import dataclasses
import importlib.metadata as md
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from flax import nnx

from mtl import aggregation, parallel, partition
from mtl.data.batching import Dataset, epoch_batches
from mtl.losses import task_loss
from mtl.models import MODELS, build_model
from mtl.models.base import NarrowLinear
from mtl.spec import FeatureSpec, TaskSpec
from mtl.train import Stage, TrainConfig, Trainer, default_compiler_options

# Model sizes, given explicitly so that the PyTorch twins match: the library defaults.
SIZES: dict[str, dict[str, Any]] = {
    "shared_bottom": dict(trunk=(128,), tower=(64,)),
    "mmoe": dict(num_experts=8, expert=(16,), tower=(8,)),
}
SCHEDULES: dict[str, Stage] = {
    "joint": Stage(1),
    "alternating": Stage(1, alternating=True),
    "staged": Stage(1, trainable=("towers", "heads")),  # a staged schedule's frozen-trunk stage
}
AGGREGATORS = ("upgrad", "mgda", "pcgrad")
TORCHJD_NAMES = {"upgrad": "UPGrad", "mgda": "MGDA", "pcgrad": "PCGrad"}
# TorchJD's defaults, so that both sides compute the same aggregation (UPGrad: G / tr G + 1e-4 I).
# MGDA differs by design: ours solves the min-norm QP exactly, TorchJD runs Frank-Wolfe (eps 1e-3).
AGG_KWARGS: dict[str, dict[str, Any]] = {"upgrad": {"reg_eps": 1e-4}}
LR = 1e-3
# TrainConfig.compiler_options of every setting of ours (--compiler-options; None: the trainer's
# automatic choice, train.default_compiler_options; {}: XLA's defaults)
COMPILER_OPTIONS: dict[str, Any] | None = None
# TrainConfig.microbatches of every setting of ours (--microbatches; None: the trainer's automatic
# choice, train.default_microbatches)
MICROBATCHES: int | None = None
# rows per timed chunk: one epoch of the main job's ML-100K training split (100,000 ratings less
# 20% test and 10% of the rest for validation = 72,000), rounded up to a multiple of 4096
EPOCH_EXAMPLES = 73728


# ------------------------------------------------------------------------------------------ data


def ml100k_like(n: int, num_tasks: int = 3, seed: int = 0) -> Dataset:
    """n rating-like rows shaped like MovieLens-100K, labels from a latent-factor model.

    Tasks: like (binary), rating (regression), genre (19-way multilabel), then binary aux3, ...
    up to ``num_tasks``.
    """
    rng = np.random.default_rng(seed)
    users, items, k = 943, 1682, 8
    U, V = rng.standard_normal((users, k)), rng.standard_normal((items, k))
    u, i = rng.integers(0, users, n), rng.integers(0, items, n)
    score = (U[u] * V[i]).sum(-1) / np.sqrt(k)
    item_genres = rng.random((items, 19)) < 0.1
    feats = {
        "user_id": u.astype(np.int32),
        "item_id": i.astype(np.int32),
        "age": rng.integers(0, 7, users)[u].astype(np.int32),
        "gender": rng.integers(0, 2, users)[u].astype(np.int32),
        "occupation": rng.integers(0, 21, users)[u].astype(np.int32),
        "year": rng.integers(0, 10, items)[i].astype(np.int32),
        "timestamp": rng.standard_normal((n, 1)).astype(np.float32),
    }
    fspecs = (
        FeatureSpec("user_id", "categorical", users, 32),
        FeatureSpec("item_id", "categorical", items, 32),
        FeatureSpec("age", "categorical", 7, 8),
        FeatureSpec("gender", "categorical", 2, 8),
        FeatureSpec("occupation", "categorical", 21, 8),
        FeatureSpec("year", "categorical", 10, 8),
        FeatureSpec("timestamp", "dense", 1),
    )
    rating = np.clip(np.round(3.5 + score + 0.5 * rng.standard_normal(n)), 1, 5)
    labels = {
        "like": (rating >= 4).astype(np.float32),
        "rating": rating.astype(np.float32),
        "genre": item_genres[i].astype(np.float32),
    }
    tspecs = [
        TaskSpec("like", "binary"),
        TaskSpec("rating", "regression"),
        TaskSpec("genre", "multilabel", 19),
    ]
    for t in range(3, num_tasks):
        w = rng.standard_normal(k)
        labels[f"aux{t}"] = ((U[u] @ w) * (V[i] @ w) + rng.standard_normal(n) > 0).astype(
            np.float32
        )
        tspecs.append(TaskSpec(f"aux{t}", "binary"))
    tspecs = tspecs[:num_tasks]
    labels = {t.name: labels[t.name] for t in tspecs}
    return Dataset(feats, labels, fspecs, tuple(tspecs))


# ------------------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class Bench:
    """One timed configuration: ``chunk()`` runs ``steps`` training steps and waits for them."""

    label: dict[str, Any]
    chunk: Callable[[], None]
    steps: int
    batch: int
    times: list[float] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        med = statistics.median(self.times) / self.steps
        return {
            **self.label,
            "batch": self.batch,
            "steps_per_chunk": self.steps,
            "repeats": len(self.times),
            "ms_per_step": 1e3 * med,
            "ms_per_step_min": 1e3 * min(self.times) / self.steps,
            "examples_per_s": self.batch / med,
            **self.info,
        }


def interleave(benches: Sequence[Bench], repeats: int) -> None:
    """Time one chunk of each bench in turn, ``repeats`` rounds (load drift hits all alike)."""
    for _ in range(repeats):
        for b in benches:
            t = time.perf_counter()
            b.chunk()
            b.times.append(time.perf_counter() - t)


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median, min) seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def matmul_peak(n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Measured float32 matmul FLOP/s of an n³ product in jax (median and best)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    med, best = median_time(lambda: f(a, b).block_until_ready(), repeats)
    return {"n": n, "flops_per_s": 2 * n**3 / med, "flops_per_s_best": 2 * n**3 / best}


def _flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def hlo_copies(hlo_text: str) -> int:
    """Copy instructions in a compiled module's text (buffers XLA duplicates, e.g. loop-carried
    state it cannot update in place)."""
    return sum(1 for line in hlo_text.splitlines() if " copy(" in line and " = " in line)


def while_body_counted_once() -> bool:
    """Whether XLA's cost analysis on this backend counts a loop body once (not × trip count)."""
    w = jnp.ones((64, 64), jnp.float32)

    def loop(length: int) -> float | None:
        f = lambda x: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=length)[0]
        return _flops(jax.jit(f).lower(w).compile())

    one, four = loop(2), loop(8)
    return one is not None and four is not None and abs(four - one) < 0.5 * one


def lower_chunk(trainer: Trainer, state: Any, batches: Any, stage: Stage) -> tuple[Any, float]:
    """(jax ``Lowered``, seconds) of the chunk ``trainer.run(state, batches, stage)`` executes
    (``Trainer.lower``); once compiled, jax caches the executable and ``trainer.run`` reuses it."""
    t = time.perf_counter()
    lowered = trainer.lower(state, batches, stage)
    return lowered, time.perf_counter() - t


# ------------------------------------------------------------------------------------------ ours


@dataclasses.dataclass
class Ours:
    """One of our configurations, lowered; ``compile()`` then ``warm_up()`` make ``bench`` ready."""

    bench: Bench
    lowered: Any
    lower_s: float
    per_step_flops: bool

    def compile(self, concurrent: bool = False) -> None:
        info = self.bench.info
        info["compile_concurrent"] = concurrent
        if self.lowered is None:
            return
        t = time.perf_counter()
        compiled = self.lowered.compile()
        info["compile_s"] = self.lower_s + time.perf_counter() - t
        flops = _flops(compiled)
        if flops is not None and not self.per_step_flops:
            flops /= self.bench.steps
        info["flops_per_step"] = flops
        info["hlo_copies"] = hlo_copies(compiled.as_text())
        self.lowered = None

    def warm_up(self) -> Bench:
        t = time.perf_counter()
        self.bench.chunk()
        self.bench.info["first_call_s"] = time.perf_counter() - t
        self.bench.info.setdefault("compile_s", self.bench.info["first_call_s"])
        return self.bench


def ours(
    model_name: str,
    data: Dataset,
    batch: int,
    steps: int,
    schedule: str = "joint",
    aggregator: str | None = None,
    aggregate_on: str = "params",
    per_step_flops: bool = True,
    mesh: Any = None,
) -> Ours:
    """Our trainer on ``steps`` x ``batch`` device-resident rows, lowered (not yet compiled).

    With ``mesh`` (mtl.parallel.make_mesh) the batches are sharded over its devices and the state
    replicated, as ``fit(..., mesh=mesh)`` does.
    """
    model = build_model(model_name, data.feature_specs, data.task_specs, **SIZES[model_name])
    config = TrainConfig(
        learning_rate=LR,
        aggregator=aggregator,
        aggregator_kwargs=AGG_KWARGS.get(aggregator or "", {}),
        aggregate_on=aggregate_on,
        compiler_options=None if COMPILER_OPTIONS is None else dict(COMPILER_OPTIONS),
        microbatches=MICROBATCHES,
    )
    trainer = Trainer(model, config)
    state = trainer.init(model)
    rows = data.take(np.arange(batch * steps)).to_device()
    batches = epoch_batches(rows, batch, jax.random.key(1))
    if mesh is not None:
        parallel.check_batch_size(batch, mesh)
        batches, state = parallel.shard_batches(batches, mesh), parallel.replicate(state, mesh)
    stage = SCHEDULES[schedule]
    lowered, lower_s = lower_chunk(trainer, state, batches, stage)
    box = [state]

    def chunk() -> None:
        st, m = trainer.run(box[0], batches, stage)
        jax.block_until_ready((st, m))
        box[0] = st

    label = {
        "impl": "mtl (jax)",
        "model": model_name,
        "schedule": schedule,
        "aggregator": aggregator or "-",
        "aggregate_on": aggregate_on if aggregator else "-",
        "tasks": len(data.task_specs),
        "devices": 1 if mesh is None else mesh.size,
    }
    info: dict[str, Any] = {
        "flops_per_step": None,
        "compiler_options": trainer.compiler_options,
        "microbatches": trainer.microbatches(batch),
    }
    return Ours(Bench(label, chunk, steps, batch, info=info), lowered, lower_s, per_step_flops)


def ready(configs: Sequence[Ours], workers: int) -> list[Bench]:
    """Compile the first configuration alone (a clean compile time), the others ``workers`` at a
    time (XLA compiles in parallel threads), then warm each up."""
    if configs:
        configs[0].compile()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda c: c.compile(concurrent=workers > 1), configs[1:]))
    return [c.warm_up() for c in configs]


# ------------------------------------------------------------------------------------------ peers


def load_torch() -> tuple[Any, str | None]:
    """(torch module or None, why it is missing)."""
    try:
        import torch
    except ImportError as e:
        return None, f"PyTorch is not installed ({e}); `make bench` installs torch==2.13.0"
    return torch, None


def load_torchjd(names: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """TorchJD's aggregator factories for ``names`` and the reason for each one that is missing."""
    try:
        from torchjd import aggregation as A
        from torchjd.autojac import jac_to_grad, mtl_backward  # noqa: F401 - the API used below
    except ImportError as e:
        return {}, {
            n: f"TorchJD is not installed ({e}); pip install 'torchjd[quadprog_projector]'"
            for n in names
        }
    found, missing = {}, {}
    for n in names:
        cls = getattr(A, TORCHJD_NAMES[n], None)
        try:
            cls()
            found[n] = cls
        except Exception as e:  # noqa: BLE001 - e.g. UPGrad without its optional QP solver
            missing[n] = f"torchjd.aggregation.{TORCHJD_NAMES[n]}: {type(e).__name__}: {e}"
    return found, missing


def torch_models(torch: Any) -> tuple[type, type]:
    """The PyTorch twins of SharedBottom and MMoE (same layers, sizes and losses)."""
    nn, F = torch.nn, torch.nn.functional

    class Encoder(nn.Module):
        def __init__(self, specs: Sequence[FeatureSpec]):
            super().__init__()
            self.specs = [s for s in specs if s.kind != "multihot"]
            assert len(self.specs) == len(specs), "multihot features are not mirrored here"
            self.embed = nn.ModuleDict(
                {s.name: nn.Embedding(s.dim, s.embed_dim) for s in specs if s.kind == "categorical"}
            )
            self.out_dim = sum(s.dim if s.kind == "dense" else s.embed_dim for s in specs)

        def forward(self, x: dict) -> Any:
            return torch.cat(
                [
                    self.embed[s.name](x[s.name]) if s.kind == "categorical" else x[s.name]
                    for s in self.specs
                ],
                dim=-1,
            )

    def mlp(dims: Sequence[int]) -> Any:
        layers: list[Any] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers)

    class Base(nn.Module):
        def decode_towers(self, z_per_task: dict) -> dict:
            return {
                t.name: self.heads[t.name](self.towers[t.name](z_per_task[t.name]))
                for t in self.tasks
            }

        def forward(self, x: dict) -> dict:
            return self.decode(self.represent(x))

        def losses(self, preds: dict, y: dict) -> list:
            out = []
            for t in self.tasks:
                p = preds[t.name].squeeze(-1) if t.size == 1 else preds[t.name]
                if t.kind == "regression":
                    out.append(F.mse_loss(p, y[t.name]))
                else:  # binary, multilabel: mean over labels and rows
                    out.append(F.binary_cross_entropy_with_logits(p, y[t.name]))
            return out

    class SharedBottom(Base):
        def __init__(self, fspecs, tspecs, trunk, tower):
            super().__init__()
            self.tasks = tuple(tspecs)
            self.encoder = Encoder(fspecs)
            self.trunk = mlp([self.encoder.out_dim, *trunk])
            h = [self.encoder.out_dim, *trunk][-1]
            self.towers = nn.ModuleDict({t.name: mlp([h, *tower]) for t in tspecs})
            self.heads = nn.ModuleDict({t.name: nn.Linear([h, *tower][-1], t.size) for t in tspecs})

        def shared(self) -> list:
            return [*self.encoder.parameters(), *self.trunk.parameters()]

        def represent(self, x: dict) -> Any:
            return self.trunk(self.encoder(x))

        def decode(self, z: Any) -> dict:
            return self.decode_towers({t.name: z for t in self.tasks})

    class MMoE(Base):
        def __init__(self, fspecs, tspecs, num_experts, expert, tower):
            super().__init__()
            assert len(expert) == 1, "one expert layer is mirrored here"
            self.tasks = tuple(tspecs)
            self.encoder = Encoder(fspecs)
            d, h = self.encoder.out_dim, expert[0]
            bound = 1.0 / np.sqrt(d)
            self.w = nn.Parameter(torch.empty(num_experts, d, h).uniform_(-bound, bound))
            self.b = nn.Parameter(torch.zeros(num_experts, h))
            self.gates = nn.ModuleDict(
                {t.name: nn.Linear(d, num_experts, bias=False) for t in tspecs}
            )
            self.towers = nn.ModuleDict({t.name: mlp([h, *tower]) for t in tspecs})
            self.heads = nn.ModuleDict({t.name: nn.Linear([h, *tower][-1], t.size) for t in tspecs})

        def shared(self) -> list:
            return [*self.encoder.parameters(), self.w, self.b]

        def represent(self, x: dict) -> list:
            inputs = self.encoder(x)
            experts = F.relu(torch.einsum("bd,edh->beh", inputs, self.w) + self.b)
            # the gates read their own node, so that TorchJD's per-task gradient w.r.t. the
            # features does not run back through the experts (shared) into ``inputs``
            return [inputs.clone(), experts]

        def decode(self, rep: list) -> dict:
            inputs, experts = rep
            mixed = {
                t.name: torch.einsum(
                    "be,beh->bh", F.softmax(self.gates[t.name](inputs), dim=-1), experts
                )
                for t in self.tasks
            }
            return self.decode_towers(mixed)

    return SharedBottom, MMoE


def torch_bench(
    torch: Any,
    model_name: str,
    data: Dataset,
    batch: int,
    steps: int,
    threads: int,
    aggregator: str | None = None,
    torchjd_cls: Any = None,
    target_chunk_s: float = 0.15,
) -> Bench:
    """Eager PyTorch (Adam) or TorchJD (mtl_backward + jac_to_grad) on the same rows as ours."""
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    SharedBottom, MMoE = torch_models(torch)
    cls = {"shared_bottom": SharedBottom, "mmoe": MMoE}[model_name]
    model = cls(data.feature_specs, data.task_specs, **SIZES[model_name]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    rows = batch * steps

    def put(x: np.ndarray) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(x[:rows]))
        t = t.long() if t.dtype == torch.int32 else t
        return t.reshape(steps, batch, *t.shape[1:]).to(device)

    X = {k: put(v) for k, v in data.features.items()}
    Y = {k: put(v) for k, v in data.labels.items()}
    agg = torchjd_cls() if torchjd_cls is not None else None
    if agg is not None:
        from torchjd.autojac import jac_to_grad, mtl_backward
    pos = [0]

    def step() -> None:
        i = pos[0] = (pos[0] + 1) % steps
        x, y = {k: v[i] for k, v in X.items()}, {k: v[i] for k, v in Y.items()}
        opt.zero_grad()
        if agg is None:
            sum(model.losses(model(x), y)).backward()
        else:
            rep = model.represent(x)
            mtl_backward(model.losses(model.decode(rep), y), features=rep)
            jac_to_grad(model.shared(), agg)
        opt.step()

    def run(n: int) -> None:
        torch.set_num_threads(threads)
        for _ in range(n):
            step()
        if device == "cuda":
            torch.cuda.synchronize()

    run(3)  # warm-up
    t = time.perf_counter()
    run(3)
    per_step = (time.perf_counter() - t) / 3
    n = int(min(steps, max(3, round(target_chunk_s / max(per_step, 1e-6)))))
    impl = "pytorch eager" if agg is None else "torchjd"
    label = {
        "impl": f"{impl} ({threads} thr)",
        "model": model_name,
        "schedule": "joint",
        "aggregator": aggregator or "-",
        "aggregate_on": "params" if aggregator else "-",
        "tasks": len(data.task_specs),
    }
    return Bench(label, lambda: run(n), n, batch, info={"torch_threads": threads})


# ------------------------------------------------------------------------------------------ studies


def real_jacobian(data: Dataset, batch: int) -> np.ndarray:
    """[T, P] per-task gradients of the shared parameters of a fresh shared bottom on one batch."""
    model = build_model(
        "shared_bottom", data.feature_specs, data.task_specs, **SIZES["shared_bottom"]
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    names = [t.name for t in data.task_specs]
    rows = data.take(np.arange(batch)).to_device()

    def losses(p: Any) -> jax.Array:
        preds, _ = nnx.merge(graphdef, p, rest)(rows.features)
        return jnp.stack(
            [task_loss(t.kind, preds[t.name], rows.labels[t.name]) for t in data.task_specs]
        )

    jac = jax.jit(jax.jacrev(losses))(params)  # one compile (eager: an op-by-op compile each)
    shared = jax.tree.leaves(partition.shared_mask(params, names))
    leaves = [x.reshape(len(names), -1) for x, m in zip(jax.tree.leaves(jac), shared) if m]
    return np.array(jnp.concatenate(leaves, axis=1))  # writable: torch.from_numpy warns otherwise


def repeat(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    """A chunk of ``calls`` calls of ``fn``, waiting for jax results."""

    def chunk() -> None:
        for _ in range(calls):
            jax.block_until_ready(fn())

    return chunk


def aggregator_alone(
    torch: Any, torchjd: dict[str, Any], J: np.ndarray, repeats: int, calls: int
) -> list[dict[str, Any]]:
    """ms per call of each aggregator on the same [T, P] Jacobian: ours (jit) vs TorchJD."""
    out = []
    Jx, key = jnp.asarray(J), jax.random.key(0)
    Jt = torch.from_numpy(J) if torch is not None else None
    for name in AGGREGATORS:
        agg = aggregation.get_aggregator(name, **AGG_KWARGS.get(name, {}))
        f = jax.jit(lambda j, k, agg=agg: agg.apply(j, agg.init(*j.shape), k)[0])
        mine = np.asarray(f(Jx, key))
        label = {"impl": "mtl (jax, jit)", "aggregator": name}
        benches = [Bench(label, repeat(lambda f=f: f(Jx, key), calls), calls, 1)]
        theirs = None
        if name in torchjd:
            A = torchjd[name]()
            theirs = A(Jt).numpy()
            label = {"impl": "torchjd", "aggregator": name}
            benches.append(Bench(label, repeat(lambda A=A: A(Jt), calls), calls, 1))
        interleave(benches, repeats)
        for b in benches:
            r = b.record()
            r.pop("examples_per_s")
            r["shape"] = list(J.shape)
            if theirs is not None and b.label["impl"] == "torchjd" and name != "pcgrad":
                diff = np.linalg.norm(theirs - mine) / max(np.linalg.norm(theirs), 1e-30)
                r["rel_diff_vs_ours"] = float(diff)
            out.append(r)
    return out


# ------------------------------------------------------------------------------------------ limits


def _alone_us(fn: Callable[..., Any], *args: Any, repeats: int = 20) -> float:
    """Median µs of one jitted call of ``fn(*args)`` (dispatch included), after a warm-up."""
    f = jax.jit(fn)
    med, _ = median_time(lambda: jax.block_until_ready(f(*args)), repeats)
    return 1e6 * med


def _in_loop_us(
    fn: Callable[..., Any],
    *args: Any,
    length: int = 20,
    repeats: int = 10,
    compiler_options: dict | None = None,
) -> float:
    """Median µs of ``fn(*args)`` inside a compiled loop of ``length`` iterations (no dispatch).

    An optimization barrier ties the inputs to the loop carry, so XLA cannot hoist the call out
    of the loop; the carry reads one element of the result. Use it for a single dot: XLA computes
    a dot whole for that one element (the measured FLOP rates say so), but it would narrow an
    elementwise op or a stack of results to the element read.
    """

    def run(*xs: Any) -> Any:
        def body(c: Any, _: Any) -> tuple[Any, None]:
            ys = jax.lax.optimization_barrier((xs, c))[0]
            return c + 1e-30 * fn(*ys).reshape(-1)[0], None

        return jax.lax.scan(body, jnp.zeros((), jnp.float32), None, length=length)[0]

    f = jax.jit(run, compiler_options=compiler_options or None)
    med, _ = median_time(lambda: jax.block_until_ready(f(*args)), repeats)
    return 1e6 * med / length


def step_gemms(data: Dataset, batch: int) -> list[dict[str, Any]]:
    """Each matmul of the default shared-bottom training step, timed alone inside a compiled loop.

    Forward: encoder output x [B, D] @ trunk [D, 128]; trunk output h @ the fused first tower
    layers [128, 64T]; tower outputs @ heads. Backward: for each, dW = inputᵀ δ (contracting the
    batch) and dx = δ Wᵀ, with the layouts the step uses: the heads' kernels are stored [out, in]
    (``base.NarrowLinear``), so theirs are x Wᵀ, dW = δᵀ x and dx = δ W. Compiled with the joint
    step's XLA options, on the rows of one of its k microbatches (``Trainer.microbatches``); the
    µs of a matmul are k times one.
    """
    model = build_model(
        "shared_bottom", data.feature_specs, data.task_specs, **SIZES["shared_bottom"]
    )
    # the joint step runs each matmul once per microbatch, on its rows
    k = Trainer(model, TrainConfig(microbatches=MICROBATCHES)).microbatches(batch)
    rows = batch // k
    D, H = model.encoder.out_dim, model.trunk.out_dim
    widths = [model.towers[t.name].out_dim for t in data.task_specs]
    tower_in = sum(model.towers[t.name].layers[0].out_features for t in data.task_specs)
    contract = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((), ())))
    shapes = [("trunk", D, H, False), ("towers (fused first layer)", H, tower_in, False)]
    shapes += [
        (f"head {t.name}", w, t.size, isinstance(model.heads[t.name], NarrowLinear))
        for t, w in zip(data.task_specs, widths)
    ]
    key, out = jax.random.key(0), []
    # compiled as the joint step is (the trainer's automatic choice, unless --compiler-options)
    options = default_compiler_options(False) if COMPILER_OPTIONS is None else COMPILER_OPTIONS
    for name, kk, n, out_in in shapes:
        x = jax.random.normal(key, (rows, kk))
        dy = jax.random.normal(key, (rows, n))
        if out_in:  # kernel [n, kk]
            w = jax.random.normal(key, (n, kk))
            parts = (
                ("forward x Wᵀ", lambda a, b: contract(a, b, ((1,), (1,))), (x, w)),
                ("backward dW = δᵀ x", lambda a, b: contract(a, b, ((0,), (0,))), (dy, x)),
                ("backward dx = δ W", lambda a, b: contract(a, b, ((1,), (0,))), (dy, w)),
            )
        else:  # kernel [kk, n]
            w = jax.random.normal(key, (kk, n))
            parts = (
                ("forward x W", lambda a, b: contract(a, b, ((1,), (0,))), (x, w)),
                ("backward dW = xᵀ δ", lambda a, b: contract(a, b, ((0,), (0,))), (x, dy)),
                ("backward dx = δ Wᵀ", lambda a, b: contract(a, b, ((1,), (1,))), (dy, w)),
            )
        for part, fn, args in parts:
            us = k * _in_loop_us(fn, *args, compiler_options=options)
            flops = 2 * batch * kk * n
            out.append(
                {
                    "batch": batch,
                    "microbatches": k,
                    "layer": name,
                    "gemm": part,
                    "shape": f"{k} x {rows}x{kk}x{n}" if k > 1 else f"{batch}x{kk}x{n}",
                    "us": us,
                    "gflops_per_s": flops / us / 1e3,
                    "flops": flops,
                }
            )
    return out


def gram_parts(torch: Any, J: np.ndarray) -> dict[str, Any]:
    """µs of the pieces of a Gramian aggregator on one [T, P] Jacobian: ours vs PyTorch's."""
    Jx = jnp.asarray(J)
    hi = jax.lax.Precision.HIGHEST
    w = jnp.full((J.shape[0],), 1.0 / J.shape[0], Jx.dtype)
    row = {
        "shape": list(J.shape),
        "noop_dispatch_us": _alone_us(lambda j: j[0, 0], Jx, repeats=50),
        "gram_us": _alone_us(lambda j: jnp.matmul(j, j.T, precision=hi), Jx, repeats=50),
        "combine_us": _alone_us(lambda v, j: jnp.matmul(v, j, precision=hi), w, Jx, repeats=50),
    }
    if torch is not None:
        Jt, wt = torch.from_numpy(J), torch.from_numpy(np.asarray(w))
        row["torch_gram_us"] = 1e6 * median_time(lambda: Jt @ Jt.T, 50)[0]
        row["torch_combine_us"] = 1e6 * median_time(lambda: wt @ Jt, 50)[0]
    return row


# ------------------------------------------------------------------------------------------ report


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def table(rows: Sequence[dict], cols: Sequence[tuple[str, str, int]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), d) for k, _, d in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


MAIN_COLS = [
    ("model", "model", 0),
    ("schedule", "schedule", 0),
    ("aggregator", "aggregator", 0),
    ("batch", "batch", 0),
    ("impl", "impl", 0),
    ("ms_per_step", "ms/step (median)", 2),
    ("ms_per_step_min", "ms/step (min)", 2),
    ("examples_per_s", "examples/s", 0),
    ("compile", "compile s", 0),
    ("gflops_per_step", "GFLOP/step", 3),
    ("pct_matmul_peak", "% matmul peak", 1),
    ("pct_matmul_peak_best", "% peak (best/best)", 1),
    ("speedup_vs_torch", "x vs PyTorch", 2),
    ("speedup_vs_torchjd", "x vs TorchJD", 2),
]


def annotate(rows: list[dict], peak: float, peak_best: float) -> None:
    """FLOP utilisation of our rows and their speedups vs the matching peer rows."""
    key = lambda r: (r["model"], r["schedule"], r["aggregator"], r["batch"], r["tasks"])
    eager: dict[tuple, float] = {}
    jd: dict[tuple, float] = {}
    for r in rows:
        if r["impl"].startswith("pytorch eager"):
            k = key(r)[:1] + ("joint", "-") + key(r)[3:]
            eager[k] = min(eager.get(k, np.inf), r["ms_per_step"])
        elif r["impl"].startswith("torchjd"):
            jd[key(r)] = min(jd.get(key(r), np.inf), r["ms_per_step"])
    for r in rows:
        if not r["impl"].startswith("mtl"):
            continue
        if r.get("compile_s") is not None:
            r["compile"] = f"{r['compile_s']:.2f}" + ("*" if r.get("compile_concurrent") else "")
        f = r.get("flops_per_step")
        if f:
            r["gflops_per_step"] = f / 1e9
            r["pct_matmul_peak"] = 100 * f / (r["ms_per_step"] / 1e3) / peak
            r["pct_matmul_peak_best"] = 100 * f / (r["ms_per_step_min"] / 1e3) / peak_best
        if r["aggregate_on"] in ("-", "params"):
            if r["aggregator"] == "-" and key(r) in eager:
                r["speedup_vs_torch"] = eager[key(r)] / r["ms_per_step"]
            if key(r) in jd:
                r["speedup_vs_torchjd"] = jd[key(r)] / r["ms_per_step"]


def targets(
    rows: list[dict], agg_rows: list[dict], rep_rows: list[dict], seconds: float
) -> list[dict]:
    """Each target of the issue, the value measured and whether it is met."""
    out = []

    def add(name: str, value: float | None, ok: Callable[[float], bool], goal: str) -> None:
        out.append(
            {
                "target": name,
                "goal": goal,
                "measured": value,
                "met": None if value is None else bool(ok(value)),
            }
        )

    sb = [
        r
        for r in rows
        if r["impl"].startswith("mtl")
        and r["model"] == "shared_bottom"
        and r["schedule"] == "joint"
        and r["aggregator"] == "-"
    ]
    by_b = {r["batch"]: r for r in sb}
    for b, goal in ((256, 3.0), (4096, 1.5)):
        v = by_b.get(b, {}).get("speedup_vs_torch")
        add(
            f"joint shared bottom vs PyTorch, batch {b}", v, lambda x, g=goal: x >= g, f">= {goal}x"
        )
    v = by_b.get(4096, {}).get("pct_matmul_peak")
    add("joint shared bottom at batch 4096, % of matmul FLOP/s", v, lambda x: x >= 60, ">= 60%")
    full = [
        r["speedup_vs_torchjd"]
        for r in rows
        if r.get("speedup_vs_torchjd") and r["aggregator"] in ("upgrad", "mgda")
    ]
    add(
        "full step with UPGrad / MGDA vs TorchJD (worst case)",
        min(full) if full else None,
        lambda x: x >= 2,
        ">= 2x",
    )
    alone = {}
    for r in agg_rows:
        alone.setdefault((r["aggregator"], tuple(r["shape"])), {})[r["impl"]] = r["ms_per_step"]
    ratios = [
        v["torchjd"] / v["mtl (jax, jit)"]
        for (a, _), v in alone.items()
        if "torchjd" in v and a in ("upgrad", "mgda")
    ]
    add(
        "aggregator alone (UPGrad / MGDA) vs TorchJD (worst case)",
        min(ratios) if ratios else None,
        lambda x: x >= 5,
        ">= 5x",
    )
    rep = [r["rep_over_joint"] for r in rep_rows if r.get("rep_over_joint") is not None]
    add(
        "representation-level aggregation / joint step, T = 8 (worst case)",
        max(rep) if rep else None,
        lambda x: x <= 1.3,
        "<= 1.3x",
    )
    comp = [r["compile_s"] for r in sb if r.get("compile_s") is not None]
    add(
        "compile time of the default step (worst batch)",
        max(comp) if comp else None,
        lambda x: x <= 10,
        "<= 10 s",
    )
    add("benchmark wall time", seconds, lambda x: x < 600, "< 600 s")
    return out


def environment(torch: Any, threads: int) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "versions": {p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "torchjd")},
        "torch_threads": threads if torch is not None else None,
        "torch_device": (
            ("cuda" if torch.cuda.is_available() else "cpu") if torch is not None else None
        ),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "cpu_async_dispatch": bool(jax.config.values.get("jax_cpu_enable_async_dispatch", True)),
        "compiler_options": None if COMPILER_OPTIONS is None else dict(COMPILER_OPTIONS),
        "microbatches": MICROBATCHES,
        "loadavg_start": list(os.getloadavg()),
    }


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ------------------------------------------------------------------------------------------ main


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/benchmark", help="run dir for results.json/.md")
    p.add_argument("--quick", action="store_true", help="one batch size, joint + UPGrad only")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 256,1024,4096)")
    p.add_argument("--models", default=None, help="comma list (default shared_bottom,mmoe)")
    p.add_argument("--repeats", type=int, default=None, help="timed chunks per setting")
    p.add_argument("--chunk-examples", type=int, default=None, help="rows per scanned chunk")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-peers", action="store_true", help="skip PyTorch and TorchJD")
    p.add_argument(
        "--compile-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="XLA compiles at a time (the first setting of each group compiles alone)",
    )
    p.add_argument(
        "--compiler-options",
        type=json.loads,
        default=None,
        help="XLA options for our steps as JSON (TrainConfig.compiler_options), e.g. '{}' for "
        "XLA's defaults; default: the trainer's automatic choice (on CPU, "
        "mtl.train.CPU_JOINT_OPTIONS for steps without per-task gradients)",
    )
    p.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help="TrainConfig.microbatches of our steps; default: the trainer's automatic choice (on "
        "CPU, 2 for steps without per-task gradients from batch 512)",
    )
    p.add_argument(
        "--sync-dispatch",
        action="store_true",
        help="jax_cpu_enable_async_dispatch=False: CPU computations run on the calling thread "
        "(no hand-off to a worker thread per call; cuts the cost of small single calls such as "
        "'aggregator alone'); default: jax's asynchronous dispatch",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.sync_dispatch:  # before the first computation: the CPU client reads it when made
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    global COMPILER_OPTIONS, MICROBATCHES
    COMPILER_OPTIONS, MICROBATCHES = args.compiler_options, args.microbatches
    t_start = time.perf_counter()
    q = args.quick
    batch_sizes = [
        int(b) for b in (args.batch_sizes or ("1024" if q else "256,1024,4096")).split(",")
    ]
    models = [m for m in (args.models or "shared_bottom,mmoe").split(",")]
    for m in models:
        if m not in MODELS or m not in SIZES:
            print(
                f"model {m!r}: not available here (have {sorted(set(MODELS) & set(SIZES))}); skipped"
            )
    models = [m for m in models if m in MODELS and m in SIZES]
    repeats = args.repeats or (3 if q else 7)
    chunk_examples = args.chunk_examples or (16384 if q else EPOCH_EXAMPLES)
    schedules = ["joint"] if q else list(SCHEDULES)
    aggs = ["upgrad"] if q else list(AGGREGATORS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch, why = (None, "--no-peers") if args.no_peers else load_torch()
    if torch is None:
        print(f"peer PyTorch skipped: {why}")
        torchjd, jd_missing = {}, {n: "PyTorch missing" for n in AGGREGATORS}
    else:
        torchjd, jd_missing = load_torchjd(AGGREGATORS)
    for n, reason in jd_missing.items():
        print(f"peer TorchJD {n} skipped: {reason}")
    threads = max(1, args.torch_threads)
    env = environment(torch, threads)
    env["peers_skipped"] = why if torch is None else None
    print(
        f"backend {env['backend']} ({', '.join(env['devices'])}), {env['cores']} cores, "
        f"load {env['loadavg_start'][0]:.1f}; "
        + (
            f"torch.set_num_threads({threads}) (eager PyTorch also with 1 thread), "
            f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}"
            if torch is not None
            else "peers skipped"
        )
    )
    steps_of = lambda b: max(4, chunk_examples // b)
    data = ml100k_like(max(steps_of(b) * b for b in batch_sizes), num_tasks=3)
    peak = matmul_peak()
    print(f"float32 matmul 2048³: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s (median)")
    once = while_body_counted_once()
    thread_set = sorted({threads, 1}, reverse=True)
    workers = args.compile_workers

    rows: list[dict] = []
    for b in batch_sizes:
        S = steps_of(b)
        for m in models:
            t0 = time.perf_counter()
            configs = [ours(m, data, b, S, s, per_step_flops=once) for s in schedules]
            configs += [ours(m, data, b, S, "joint", a, per_step_flops=once) for a in aggs]
            benches = ready(configs, workers)
            if torch is not None:
                benches += [torch_bench(torch, m, data, b, S, n) for n in thread_set]
                benches += [
                    torch_bench(torch, m, data, b, S, threads, a, torchjd[a])
                    for a in aggs
                    if a in torchjd
                ]
            interleave(benches, repeats)
            for x in benches:
                rows.append({**x.record(), "rss_mib": rss_mib()})
            print(f"  {m} batch {b}: {len(benches)} settings in {time.perf_counter() - t0:.0f} s")

    # the aggregator alone on one Jacobian, T = 3 and T = 8
    data8 = ml100k_like(max(steps_of(b) * b for b in batch_sizes), num_tasks=8)
    agg_rows: list[dict] = []
    gram_rows: list[dict] = []
    for d in (data, data8):
        J = real_jacobian(d, 1024)
        agg_rows += aggregator_alone(torch, torchjd, J, repeats, 3 if q else 10)
        gram_rows.append(gram_parts(torch, J))

    # the floor under the step: its matmuls alone, at the largest batch
    gemm_rows = step_gemms(data, max(batch_sizes))

    # representation-level vs joint at T = 8 (MGDA-UB vs plain joint and parameter-level MGDA)
    rep_rows: list[dict] = []
    for b in batch_sizes:
        S = steps_of(b)
        configs = [
            ours("shared_bottom", data8, b, S, per_step_flops=once),
            ours("shared_bottom", data8, b, S, "joint", "mgda", "representation", once),
        ]
        if b == batch_sizes[len(batch_sizes) // 2]:  # parameter-level MGDA at one batch size
            configs.append(ours("shared_bottom", data8, b, S, "joint", "mgda", "params", once))
        benches = ready(configs, workers)
        interleave(benches, repeats)
        recs = [x.record() for x in benches]
        joint = recs[0]["ms_per_step"]
        for r in recs:
            r["rep_over_joint"] = (
                r["ms_per_step"] / joint if r["aggregate_on"] == "representation" else None
            )
            r["over_joint"] = r["ms_per_step"] / joint
        rep_rows += recs

    # data-parallel over all local devices (when there are several)
    dp_rows: list[dict] = []
    n_dev = jax.device_count()
    if n_dev == 1:
        print("data parallel skipped: one device (tests/test_parallel.py covers 8 virtual ones)")
    for b in batch_sizes if n_dev > 1 else []:
        if b % n_dev:
            print(f"data parallel, batch {b}: skipped, not divisible by {n_dev} devices")
            continue
        S = steps_of(b)
        mesh = parallel.make_mesh()
        configs = [
            ours("shared_bottom", data, b, S, per_step_flops=once, mesh=m) for m in (None, mesh)
        ]
        benches = ready(configs, workers)
        interleave(benches, repeats)
        dp_rows += [x.record() for x in benches]

    peak_end = matmul_peak()
    # the faster of the two matmul measurements: the conservative denominator on a shared machine
    top = max(peak["flops_per_s"], peak_end["flops_per_s"])
    top_best = max(peak["flops_per_s_best"], peak_end["flops_per_s_best"])
    annotate(rows, top, top_best)
    annotate(rep_rows, top, top_best)
    seconds = time.perf_counter() - t_start
    env.update(
        loadavg_end=list(os.getloadavg()),
        peak_rss_mib=peak_rss_mib(),
        matmul_start=peak,
        matmul_end=peak_end,
        cost_analysis_counts_loop_body_once=once,
    )
    goals = targets(rows, agg_rows, rep_rows, seconds)
    doc = {
        "environment": env,
        "settings": {
            "batch_sizes": batch_sizes,
            "models": models,
            "sizes": SIZES,
            "schedules": schedules,
            "aggregators": aggs,
            "repeats": repeats,
            "chunk_examples": chunk_examples,
            "quick": q,
        },
        "training": rows,
        "aggregator_alone": agg_rows,
        "representation_vs_joint": rep_rows,
        "data_parallel": dp_rows,
        "step_gemms": gemm_rows,
        "gram_parts": gram_rows,
        "targets": goals,
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=float))
    md_text = report(doc)
    (out / "results.md").write_text(md_text)
    print(md_text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({seconds:.0f} s)")
    return 0


def limits(doc: dict) -> list[str]:
    """The report's 'where the time goes' section: the step's matmuls alone, the Gram's pieces."""
    gemms, grams = doc.get("step_gemms") or [], doc.get("gram_parts") or []
    if not gemms:
        return []
    env, b = doc["environment"], gemms[0]["batch"]
    peak = max(env["matmul_start"]["flops_per_s"], env["matmul_end"]["flops_per_s"])
    total_us = sum(g["us"] for g in gemms)
    step = [
        r
        for r in doc["training"]
        if r["impl"].startswith("mtl")
        and r["model"] == "shared_bottom"
        and r["batch"] == b
        and r["schedule"] == "joint"
        and r["aggregator"] == "-"
    ]
    lines = [
        f"## Where the time goes (shared bottom, joint, batch {b})",
        "",
        "Each matmul of the training step timed alone inside a compiled loop (median of 10 loops "
        "of 20), compiled with the joint step's XLA options; with k microbatches (k x B x K x N) "
        "the step runs it k times on B rows, and µs is k times one. Their sum is a floor under the step on this backend: the rest of the step "
        "(embedding gather/scatter, activations, losses, Adam, the finite check) comes on top.",
        "",
        table(
            gemms,
            [
                ("layer", "layer", 0),
                ("gemm", "matmul", 0),
                ("shape", "B x K x N", 0),
                ("us", "µs", 0),
                ("gflops_per_s", "GFLOP/s", 0),
            ],
        ),
        "",
    ]
    if step and step[0].get("flops_per_step"):
        f, ms = step[0]["flops_per_step"], step[0]["ms_per_step"]
        lines += [
            f"The matmuls alone take {total_us / 1e3:.2f} ms of the step's {ms:.2f} ms "
            f"({100 * total_us / 1e3 / ms:.0f}%). A step that did nothing but these matmuls would "
            f"run at {100 * f / (total_us / 1e6) / peak:.0f}% of the 2048³ matmul FLOP/s "
            f"(the whole step: {100 * f / (ms / 1e3) / peak:.0f}%).",
            "",
        ]
    if grams:
        lines += [
            "Pieces of a Gramian aggregator on the real Jacobians above (one call each, median "
            "µs): XLA:CPU's J Jᵀ for a few long rows is the cost that TorchJD (MKL) does not pay.",
            "",
            table(
                grams,
                [
                    ("shape", "J shape", 0),
                    ("noop_dispatch_us", "jit no-op µs", 0),
                    ("gram_us", "ours J Jᵀ µs", 0),
                    ("combine_us", "ours wᵀJ µs", 0),
                    ("torch_gram_us", "torch J Jᵀ µs", 0),
                    ("torch_combine_us", "torch wᵀJ µs", 0),
                ],
            ),
            "",
        ]
    return lines


def xla_options_line(given: dict | None, doc: dict) -> str:
    """The report's account of the XLA options our steps were compiled with."""
    if given is not None:
        return f"{given or 'none (XLA defaults)'}, as given (--compiler-options)"
    kinds: dict[str, set[str]] = {}
    for r in doc["training"] + doc["representation_vs_joint"]:
        if "compiler_options" in r:
            key = json.dumps(r["compiler_options"] or {}, sort_keys=True)
            agg = r["aggregator"]
            kind = "none" if agg == "-" else f"{agg} ({r['aggregate_on']})"
            kinds.setdefault(key, set()).add(kind)
    parts = [
        f"{json.loads(k) or 'XLA defaults'} with aggregator {', '.join(sorted(v))}"
        for k, v in sorted(kinds.items())
    ]
    return "the trainer's automatic choice (train.default_compiler_options): " + "; ".join(parts)


def microbatches_line(given: int | None, doc: dict) -> str:
    """The report's account of the microbatches our steps split their batch into."""
    if given is not None:
        return f"{given}, as given (--microbatches)"
    kinds: dict[int, dict[str, set[int]]] = {}
    for r in doc["training"] + doc["representation_vs_joint"]:
        if "microbatches" in r:
            agg = r["aggregator"]
            kind = "none" if agg == "-" else f"{agg} ({r['aggregate_on']})"
            kinds.setdefault(r["microbatches"], {}).setdefault(kind, set()).add(r["batch"])
    parts = [
        f"{k} with aggregator "
        + ", ".join(f"{a} at batch {'/'.join(map(str, sorted(b)))}" for a, b in sorted(v.items()))
        for k, v in sorted(kinds.items())
    ]
    return "the trainer's automatic choice (train.default_microbatches): " + "; ".join(parts)


def report(doc: dict) -> str:
    env = doc["environment"]
    v = env["versions"]
    lines = [
        "# mtl training-step benchmark",
        "",
        f"- backend **{env['backend']}**, devices {', '.join(env['devices'])}; CPU {env['cpu']}, "
        f"{env['cores']} cores, {env['memory_gib']} GiB",
        f"- load average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end",
        f"- jax {v['jax']}, flax {v['flax']}, optax {v['optax']}, torch {v['torch']}, "
        f"torchjd {v['torchjd']}; "
        + (
            f"torch threads {env['torch_threads']} (eager also with 1), device "
            f"{env['torch_device']}, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}"
            if env["torch_threads"]
            else f"peers skipped: {env.get('peers_skipped')}"
        ),
        f"- float32 matmul 2048³: {env['matmul_start']['flops_per_s'] / 1e9:.1f} GFLOP/s at start, "
        f"{env['matmul_end']['flops_per_s'] / 1e9:.1f} at end (median); % matmul peak = step "
        "FLOP/s (XLA cost analysis / median step) over the faster of the two medians; best/best = "
        "fastest step over fastest matmul",
        f"- peak host memory (RSS) {env['peak_rss_mib']:.0f} MiB; run time {doc['seconds']:.0f} s",
        f"- XLA options of our steps: {xla_options_line(env['compiler_options'], doc)}; "
        f"XLA_FLAGS={env['XLA_FLAGS'] or '(unset)'}; CPU dispatch "
        f"{'asynchronous' if env.get('cpu_async_dispatch', True) else 'synchronous'}",
        f"- microbatches of our steps: {microbatches_line(env.get('microbatches'), doc)}",
        "",
        "## Training steps (ML-100K-shaped input, T = 3)",
        "",
        "ms/step: median (and fastest) chunk / steps; ours: one `Trainer.run` over S scanned steps "
        f"of device-resident batches, {doc['settings']['chunk_examples']:,} rows per chunk"
        + (
            " (one epoch of the main job's ML-100K training split, as `runner.fit` runs it)"
            if doc["settings"]["chunk_examples"] == EPOCH_EXAMPLES
            else ""
        )
        + ", compile = trace + lower + XLA compile; PyTorch speedups use "
        "the faster of the eager rows. Compile s: the first setting of each model and batch "
        "(joint, no aggregator) compiles alone; * marks the others, compiled concurrently.",
        "",
        table(doc["training"], MAIN_COLS),
        "",
        "## Aggregator alone on one Jacobian (shared-bottom shared parameters, batch 1024)",
        "",
        table(
            doc["aggregator_alone"],
            [
                ("aggregator", "aggregator", 0),
                ("shape", "J shape", 0),
                ("impl", "impl", 0),
                ("ms_per_step", "ms/call (median)", 3),
                ("ms_per_step_min", "ms/call (min)", 3),
                ("rel_diff_vs_ours", "rel. diff vs ours", 6),
            ],
        ),
        "",
        "## Representation-level aggregation vs joint step (shared bottom, T = 8)",
        "",
        table(
            doc["representation_vs_joint"],
            [
                ("batch", "batch", 0),
                ("aggregator", "aggregator", 0),
                ("aggregate_on", "aggregate on", 0),
                ("ms_per_step", "ms/step (median)", 2),
                ("ms_per_step_min", "ms/step (min)", 2),
                ("compile", "compile s", 0),
                ("over_joint", "x joint step", 2),
            ],
        ),
        "",
        *limits(doc),
        "## Targets",
        "",
        table(
            doc["targets"],
            [
                ("target", "target", 0),
                ("goal", "goal", 0),
                ("measured", "measured", 3),  # 3 decimals: 1.301 reads as above a 1.3x goal
                ("met", "met", 0),
            ],
        ),
        "",
    ]
    dp_cols = [
        ("batch", "batch", 0),
        ("devices", "devices", 0),
        ("ms_per_step", "ms/step (median)", 2),
        ("examples_per_s", "examples/s", 0),
    ]
    lines += ["## Data parallel (shared bottom, joint)", ""]
    lines += [
        table(doc["data_parallel"], dp_cols) if doc["data_parallel"] else "one device: skipped"
    ]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    raise SystemExit(main())
