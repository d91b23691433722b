"""Ablations of the training step's speed choices, each A/B in one process (same data, interleaved).

    python experiments/ablate_step.py            # all of them, batch 256 and 4096
    python experiments/ablate_step.py --only bce --batch-sizes 256

- ``bce``:   mtl.losses.sigmoid_cross_entropy (one exp, custom JVP) vs optax's
             sigmoid_binary_cross_entropy (two log-sigmoids), shared bottom, T = 3.
- ``towers``: the shared bottom's fused first tower layer vs one matmul per tower, T = 3 and 8;
             with UPGrad, the towers kept apart (the trainer's choice) vs fusion forced.
- ``gram``:  the Gram of long Jacobian rows in one pass (``aggregation._gram`` from T = 4: one
             variadic reduce over all row pairs) vs the T(T+1)/2 pairwise row sums of before, vs
             the plain J Jᵀ and vs the blocked Gram of earlier still (J written into
             [1024, T, P/1024] blocks, G a batched matmul over them); representation-level MGDA,
             T = 8 (rows of B x 128); one pass vs pairwise for MGDA on the shared parameters
             (T = 8) and, forced, for UPGrad (T = 3, where pairwise stays). And where the row
             form starts in the step: from 32 x 1024 columns (the default) vs from 128 x 1024
             (as before), UPGrad and PCGrad at T = 3 (96,864 shared parameters) and
             representation-level MGDA at T = 8 below batch 1024.
- ``relu``:  the fused first tower layer's ReLU applied once to [B, Σ widths] before the split
             (the default) vs per tower after it (as before), shared bottom at T = 3 and 8.
- ``narrow``: the kernels of the task heads and MMoE's gates stored [out, in]
             (``base.NarrowLinear``, the default) vs [in, out] (``nnx.Linear``, as before):
             shared bottom at T = 3 (a 19-way head) and T = 8, MMoE at T = 3.
- ``copies``: representation-level MGDA (T = 8): each task decoding its own copy of the
             representation (``MTLModel.decode_each``, one matmul per tower) vs the shared
             bottom's fused first tower layers with a custom VJP (``base.towers_on_copies``).
- ``optimizer``: not a choice but a measure of where the time goes: the default Adam vs plain SGD
             (Adam reads and writes two dense moments per parameter), shared bottom, T = 3; and
             vs Adam on all parameters raveled into one vector (``optax.flatten``: one pass over
             the moments instead of one per leaf; not adopted).
- ``heads``: the task heads as one matmul with a block-diagonal kernel [Σ outputs, Σ tower
             widths] built from the heads' kernels (no split of the fused tower layer's output,
             no join of its gradient; 3x the heads' FLOPs) vs one matmul per head (the default),
             shared bottom at T = 3 and 8; not adopted.
- ``layout``: not a step but its two large layers' matmuls alone (``benchmark._in_loop_us``,
             one microbatch of the batch): activations batch-major [B, features] (the step's
             layout) vs feature-major [features, B] with the kernel stored [out, in] or [in, out],
             the forward, weight-gradient and input-gradient products of each.
- ``xla``:   XLA's default options vs ``train.CPU_JOINT_OPTIONS`` (``NO_YNN``: no YNNPACK
             fusions, so Eigen's dots and XLA's own reductions and elementwise ops, plus
             ``REGION_ANALYSIS``: copy insertion with region analysis; the trainer's automatic
             choice on CPU for steps without per-task gradients,
             ``train.default_compiler_options``), vs each of its two parts alone, vs
             ``YNN_DOTS_ONLY`` (YNNPACK for the dots alone) and vs
             ``xla_cpu_multi_thread_eigen=False`` (Eigen's dots on one thread), each as
             ``TrainConfig.compiler_options``; shared bottom and MMoE joint (T = 3 and 8), shared
             bottom with UPGrad and with representation-level MGDA (T = 8); its own table, with
             the compiled chunk's HLO copy count.
- ``micro``: ``TrainConfig.microbatches``: the batch kept whole (1) vs split in 2 (the automatic
             choice on CPU from batch 512 for steps without per-task gradients) vs 4; shared
             bottom at T = 3 and 8, MMoE at T = 3, and UPGrad at T = 3 (where the automatic
             choice keeps 1).
- ``chunk``: the fixed cost of one ``Trainer.run``: the stage mask rebuilt on the host and sent
             per call (as before) vs cached on the device, and 32,768 rows per call vs one
             epoch of the main job's ML-100K training split (73,728 rows, the benchmark's chunk).

Each row: ms/step, the median of ``--repeats`` chunks of ~32k examples (``chunk``: as named),
variants timed in turn.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import benchmark as B  # experiments/benchmark.py: python puts the script's folder on sys.path
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtl import aggregation, losses, partition, train
from mtl.models import base, mmoe, shared_bottom
from mtl.models.base import MTLModel, head_output, towers_on_shared_input
from mtl.train import TrainConfig, Trainer

EXAMPLES = 32768


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` (or ``owner[name]`` for a dict) for the duration of the block."""
    get, put = (
        (owner.__getitem__, owner.__setitem__)
        if isinstance(owner, dict)
        else (lambda n: getattr(owner, n), lambda n, v: setattr(owner, n, v))
    )
    saved = get(name)
    put(name, value)
    try:
        yield
    finally:
        put(name, saved)


def _optax_bce(z: Any, y: Any) -> Any:
    return optax.sigmoid_binary_cross_entropy(z, y.astype(z.dtype))


def optax_bce() -> contextlib.ExitStack:
    """The losses as before: optax's sigmoid BCE for binary and multilabel tasks."""
    stack = contextlib.ExitStack()
    binary = lambda z, y, m=None: losses._masked_mean(_optax_bce(z, y), m)
    multilabel = lambda z, y, m=None: losses._masked_mean(jnp.mean(_optax_bce(z, y), -1), m)
    stack.enter_context(patched(losses.LOSSES, "binary", binary))
    stack.enter_context(patched(losses.LOSSES, "multilabel", multilabel))
    return stack


def _decode_with(towers: Callable[[Any, list[str], Any, Any], dict]) -> Callable[..., Any]:
    """A SharedBottom.decode whose hidden tower outputs come from ``towers(model, names, rep, rngs)``."""

    def decode(self: Any, rep: Any, rngs: Any = None) -> tuple[dict, dict]:
        hidden = towers(self, [t.name for t in self.tasks], rep, rngs)
        return {t.name: head_output(t, self.heads[t.name](hidden[t.name])) for t in self.tasks}, {}

    return decode


def per_tower_matmuls() -> contextlib.AbstractContextManager:
    """The shared bottom as before: each tower's first layer its own matmul."""
    apart = lambda m, names, rep, rngs: {n: m.towers[n](rep, rngs) for n in names}
    return patched(shared_bottom.SharedBottom, "decode", _decode_with(apart))


def _split_then_relu(towers: Any, names: Any, x: Any, rngs: Any = None) -> dict:
    firsts = [towers[n].layers[0] for n in names]
    kernel = jnp.concatenate([f.kernel[...] for f in firsts], axis=1)
    z = x @ kernel + jnp.concatenate([f.bias[...] for f in firsts])
    pieces = jnp.split(z, np.cumsum([f.out_features for f in firsts])[:-1], axis=-1)
    return {n: towers[n].after_first(zn, rngs) for n, zn in zip(names, pieces, strict=True)}


def relu_per_tower() -> contextlib.AbstractContextManager:
    """The fused first tower layer as before: split first, then each tower's ReLU."""
    return patched(shared_bottom, "towers_on_shared_input", _split_then_relu)


def forced_fusion() -> contextlib.AbstractContextManager:
    """The fused first layer even where the trainer would keep the towers apart (aggregators)."""
    fused = lambda m, names, rep, rngs: towers_on_shared_input(m.towers, names, rep, rngs)
    return patched(shared_bottom.SharedBottom, "decode", _decode_with(fused))


def plain_gram() -> contextlib.ExitStack:
    """The Gram and the combination as one [T, P] x [P, T] and one [T] x [T, P] product for every P
    (the rows stacked into J)."""
    stack = contextlib.ExitStack()
    plain = lambda j: jnp.matmul(j, j.T, precision=aggregation._HI)
    combine = lambda w, j: jnp.matmul(w.astype(j.dtype), j, precision=aggregation._HI)
    stack.enter_context(patched(aggregation, "_gram", plain))
    stack.enter_context(patched(aggregation, "_combine", combine))
    return stack


def row_form_from_128k() -> contextlib.AbstractContextManager:
    """The row-by-row Gram and combination from 128 x 1024 columns in the step too (as before),
    not from 32 x 1024 where the trainer's rows are made apart (``aggregation._long``)."""
    return patched(aggregation, "_LONG_ROWS_APART", aggregation._LONG_ROWS)


_BLOCKS = 1024


def _blocks(j_TxP: Any) -> Any:
    return j_TxP.reshape(j_TxP.shape[0], _BLOCKS, -1).transpose(1, 0, 2)


def _blocked_gram(j_TxP: Any) -> Any:
    b = _blocks(j_TxP)
    return jnp.einsum("btk,bsk->bts", b, b, precision=aggregation._HI).sum(0)


def _blocked_combine(w_T: Any, j_TxP: Any) -> Any:
    b, w_T = _blocks(j_TxP), w_T.astype(j_TxP.dtype)
    v = w_T[0] * b[:, 0]
    for i in range(1, w_T.shape[0]):
        v = v + w_T[i] * b[:, i]
    return v.reshape(-1)


class _JnpStackingInBlocks:
    """``jax.numpy`` for mtl.train, except that ``stack`` of long 1-D rows writes them straight
    into the [1024, T, P/1024] blocks (the stacked J then is a free reshape of them)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(jnp, name)

    def stack(self, arrays: Any, axis: int = 0) -> Any:
        if axis != 0 or arrays[0].ndim != 1 or not aggregation._long(arrays[0].shape[0]):
            return jnp.stack(arrays, axis)
        blocks = jnp.stack([r.reshape(_BLOCKS, -1) for r in arrays], axis=1)
        return blocks.transpose(1, 0, 2).reshape(len(arrays), -1)


def blocked_gram() -> contextlib.ExitStack:
    """Long rows as before: written into [1024, T, P/1024] blocks, G as the sum of 1024 small
    Grams (one batched matmul), wᵀJ as a sum of scaled blocks."""
    stack = contextlib.ExitStack()
    stack.enter_context(patched(train, "jnp", _JnpStackingInBlocks()))
    stack.enter_context(patched(aggregation, "_gram", _blocked_gram))
    stack.enter_context(patched(aggregation, "_combine", _blocked_combine))
    return stack


def pairwise_gram() -> contextlib.AbstractContextManager:
    """The long-row Gram as separate multiply-reduces over two whole rows for every T (before,
    for every T; now for T <= 3)."""
    return patched(aggregation, "_ONE_PASS_ROWS", 1 << 30)


def one_pass_gram() -> contextlib.AbstractContextManager:
    """The long-row Gram in one variadic reduce over all row pairs for every T (now from T = 4)."""
    return patched(aggregation, "_ONE_PASS_ROWS", 1)


def in_out_kernels() -> contextlib.ExitStack:
    """Heads and gates as before: ``nnx.Linear``, kernels stored [in, out]."""
    stack = contextlib.ExitStack()
    stack.enter_context(patched(base, "NarrowLinear", nnx.Linear))
    stack.enter_context(patched(mmoe, "NarrowLinear", nnx.Linear))
    return stack


def per_copy_decode() -> contextlib.AbstractContextManager:
    """Representation-level aggregation as before: every copy decoded apart (one matmul per tower
    forward, weight gradient and input gradient)."""
    return patched(shared_bottom.SharedBottom, "decode_each", MTLModel.decode_each)


def sgd() -> contextlib.AbstractContextManager:
    """The benchmark's trainer with plain SGD instead of Adam."""
    return patched(B, "TrainConfig", functools.partial(TrainConfig, optimizer="sgd"))


def flat_adam() -> contextlib.AbstractContextManager:
    """Adam on all parameters raveled into one vector (``optax.flatten``). Only a speed measure:
    the trainer's per-leaf masks of the moments see one flat leaf, so frozen parameters' moments
    would move."""
    return patched(train.OPTIMIZERS, "adam", lambda lr: optax.flatten(optax.adam(lr)))


def _block_diagonal_heads(self: Any, rep: Any, rngs: Any = None) -> tuple[dict, dict]:
    """SharedBottom.decode (one-layer towers, no dropout) with the heads as one matmul."""
    names = [t.name for t in self.tasks]
    assert all(len(self.towers[n].layers) == 1 for n in names), "one-layer towers only"
    firsts = [self.towers[n].layers[0] for n in names]
    # the fused first layer's activation [B, Σ widths], never split
    kernel = jnp.concatenate([f.kernel[...] for f in firsts], axis=1)
    a = jax.nn.relu(rep @ kernel + jnp.concatenate([f.bias[...] for f in firsts]))
    widths = [f.out_features for f in firsts]
    rows = []
    for i, n in enumerate(names):
        k = self.heads[n].kernel[...]  # [out, in]
        zeros = lambda w, k=k: jnp.zeros((k.shape[0], w), k.dtype)
        rows.append(jnp.concatenate([k if j == i else zeros(w) for j, w in enumerate(widths)], 1))
    y = jax.lax.dot_general(a, jnp.concatenate(rows), (((1,), (1,)), ((), ())))
    y = y + jnp.concatenate([self.heads[n].bias[...] for n in names])
    outs = jnp.split(y, np.cumsum([t.size for t in self.tasks])[:-1], axis=-1)
    return {t.name: head_output(t, o) for t, o in zip(self.tasks, outs, strict=True)}, {}


def block_diagonal_heads() -> contextlib.AbstractContextManager:
    """The shared bottom's heads as one block-diagonal matmul."""
    return patched(shared_bottom.SharedBottom, "decode", _block_diagonal_heads)


def layout_table(batch: int) -> None:
    """µs of the forward, weight-gradient and input-gradient matmuls of the trunk and the fused
    tower layer, activations batch-major (as the step has them) or feature-major."""
    data = B.ml100k_like(8)
    model = B.build_model(
        "shared_bottom", data.feature_specs, data.task_specs, **B.SIZES["shared_bottom"]
    )
    k = Trainer(model, TrainConfig(microbatches=B.MICROBATCHES)).microbatches(batch)
    rows, options = batch // k, train.default_compiler_options(False)
    D, H = model.encoder.out_dim, model.trunk.out_dim
    tower_in = sum(model.towers[n].layers[0].out_features for n in model.towers)
    dot = lambda dims: lambda a, b: jax.lax.dot_general(a, b, (dims, ((), ())))
    key = jax.random.key(0)
    r = lambda *shape: jax.random.normal(key, shape)
    print("\n| layer | rows | layout | forward µs | weight grad µs | input grad µs | sum µs |")
    print("|---|---|---|---|---|---|---|")
    for name, kk, n in (("trunk", D, H), ("towers (fused first layer)", H, tower_in)):
        x, xt, d, dt = r(rows, kk), r(kk, rows), r(rows, n), r(n, rows)
        w_io, w_oi = r(kk, n), r(n, kk)
        cases = {  # (forward, weight gradient, input gradient) as (contracting dims, a, b)
            "batch-major x [B, in], W [in, out]": (
                (((1,), (0,)), x, w_io),  # x W
                (((0,), (0,)), x, d),  # xᵀ δ
                (((1,), (1,)), d, w_io),  # δ Wᵀ
            ),
            "feature-major xᵀ [in, B], W [out, in]": (
                (((1,), (0,)), w_oi, xt),  # W xᵀ
                (((1,), (1,)), dt, xt),  # δᵀ x, stored [out, in]
                (((0,), (0,)), w_oi, dt),  # Wᵀ δᵀ
            ),
            "feature-major xᵀ [in, B], W [in, out]": (
                (((0,), (0,)), w_io, xt),  # Wᵀ xᵀ
                (((1,), (1,)), xt, dt),  # xᵀ δ, stored [in, out]
                (((1,), (0,)), w_io, dt),  # W δᵀ
            ),
        }
        for label, parts in cases.items():
            us = [B._in_loop_us(dot(dims), a, b, compiler_options=options) for dims, a, b in parts]
            cells = " | ".join(f"{u:.0f}" for u in us)
            print(f"| {name} | {rows} | {label} | {cells} | {sum(us):.0f} |")


# XLA's copy insertion with region analysis: fewer copies of loop-carried buffers (by default the
# scanned step copies every Adam moment before updating it; the count is printed per variant).
REGION_ANALYSIS = {"xla_cpu_copy_insertion_use_region_analysis": True}
# no YNNPACK fusions at all (Eigen's dots, XLA's own reductions and elementwise ops)
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
# YNNPACK for the dots alone (reductions and elementwise ops in XLA's own emitters)
YNN_DOTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def xla_options(options: dict | None) -> Callable[[], contextlib.AbstractContextManager]:
    """The benchmark's trainer compiled with exactly ``compiler_options=options`` (None: the
    trainer's automatic choice)."""
    return lambda: patched(B, "COMPILER_OPTIONS", options)


def microbatches(k: int) -> Callable[[], contextlib.AbstractContextManager]:
    """The benchmark's trainer with ``TrainConfig.microbatches=k``."""
    return lambda: patched(B, "TrainConfig", functools.partial(TrainConfig, microbatches=k))


def host_mask() -> contextlib.AbstractContextManager:
    """The stage mask as before: numpy booleans rebuilt from the parameter paths on every run."""
    rebuild = lambda self, state, stage: partition.selector_mask(state.params, stage.trainable)
    return patched(Trainer, "stage_mask", rebuild)


def compare(
    title: str,
    variants: list[tuple[str, Callable[[], Any]]],
    batch: int,
    tasks: int,
    repeats: int,
    examples: list[int] | None = None,
    model: str = "shared_bottom",
    copies: bool = False,
    **ours_kw: Any,
) -> None:
    """``examples``: rows per timed chunk for each variant (default ``EXAMPLES`` for all);
    ``copies``: add the compiled chunk's count of HLO copy instructions to each row."""
    examples = examples or [EXAMPLES] * len(variants)
    data = B.ml100k_like(max(EXAMPLES, *examples), num_tasks=tasks)
    benches = []
    for (name, ctx), rows in zip(variants, examples, strict=True):
        with ctx():
            o = B.ours(model, data, batch, max(4, rows // batch), **ours_kw)
            o.compile()
            bench = o.warm_up()
        bench.label["variant"] = name
        benches.append(bench)
    B.interleave(benches, repeats)
    base = benches[0].record()["ms_per_step"]
    for b in benches:
        r = b.record()
        row = (
            f"| {title} | {batch} | {tasks} | {r['variant']} | {r['ms_per_step']:.3f} | "
            f"{r['ms_per_step'] / base:.3f} |"
        )
        print(row + (f" {b.info.get('hlo_copies', '-')} |" if copies else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only",
        choices=(
            "bce",
            "towers",
            "relu",
            "narrow",
            "gram",
            "copies",
            "optimizer",
            "heads",
            "layout",
            "xla",
            "micro",
            "chunk",
        ),
        default=None,
    )
    p.add_argument("--batch-sizes", default="256,4096")
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    now = contextlib.nullcontext
    if a.only not in ("xla", "layout"):  # these two print tables of their own, other columns
        print("| ablation | batch | T | variant | ms/step | x first |")
        print("|---|---|---|---|---|---|")
    for b in batches:
        if a.only in (None, "bce"):
            compare("loss", [("optax BCE", optax_bce), ("one-exp BCE", now)], b, 3, a.repeats)
        if a.only in (None, "towers"):
            for t in (3, 8):
                towers = [("per-tower matmuls", per_tower_matmuls), ("fused first layer", now)]
                compare("towers", towers, b, t, a.repeats)
            upgrad = [("apart (the trainer's choice)", now), ("fused, forced", forced_fusion)]
            compare("towers, UPGrad", upgrad, b, 3, a.repeats, aggregator="upgrad")
        if a.only in (None, "relu"):
            relu = [
                ("split, then ReLU per tower (before)", relu_per_tower),
                ("ReLU, then split", now),
            ]
            for t in (3, 8):
                compare("first tower layer's ReLU", relu, b, t, a.repeats)
        if a.only in (None, "narrow"):
            kernels = [("[in, out] (nnx.Linear)", in_out_kernels), ("[out, in]", now)]
            for t in (3, 8):
                compare("head kernels, shared bottom", kernels, b, t, a.repeats)
            compare("head and gate kernels, MMoE", kernels, b, 3, a.repeats, model="mmoe")
        if a.only in (None, "gram"):
            start = [("row form from 128k (as before)", row_form_from_128k), ("from 32k", now)]
            for agg in ("upgrad", "pcgrad"):
                compare(f"row-form start, {agg}", start, b, 3, a.repeats, aggregator=agg)
            rep = dict(aggregator="mgda", aggregate_on="representation")
            if b * 128 < 128 * 1024:
                compare("row-form start, rep-level MGDA", start, b, 8, a.repeats, **rep)
            grams = [
                ("plain J Jᵀ", plain_gram),
                ("blocked Gram, J written in blocks", blocked_gram),
                ("pairwise row sums (as before)", pairwise_gram),
                ("one pass (now)", now),
            ]
            compare("rep-level MGDA", grams, b, 8, a.repeats, **rep)
            one_pass = [("pairwise row sums (as before)", pairwise_gram), ("one pass (now)", now)]
            compare("long-row Gram, MGDA on params", one_pass, b, 8, a.repeats, aggregator="mgda")
            pairwise = [("pairwise row sums (now)", now), ("one pass, forced", one_pass_gram)]
            compare("long-row Gram, UPGrad", pairwise, b, 3, a.repeats, aggregator="upgrad")
        if a.only in (None, "copies"):
            copies = [("decoded apart", per_copy_decode), ("fused first layers", now)]
            rep = dict(aggregator="mgda", aggregate_on="representation")
            compare("rep-level MGDA, copies", copies, b, 8, a.repeats, **rep)
        if a.only in (None, "optimizer"):
            opt = [("Adam (default)", now), ("SGD", sgd), ("Adam, optax.flatten", flat_adam)]
            compare("optimizer", opt, b, 3, a.repeats)
        if a.only in (None, "heads"):
            heads = [("one matmul per head", now), ("block-diagonal heads", block_diagonal_heads)]
            for t in (3, 8):
                compare("heads, shared bottom", heads, b, t, a.repeats)
        if a.only in (None, "xla"):
            assert train.CPU_JOINT_OPTIONS == {**NO_YNN, **REGION_ANALYSIS}, "update the labels"
            cpu_joint = xla_options(train.CPU_JOINT_OPTIONS)
            xla = [
                ("XLA defaults", xla_options({})),
                ("CPU_JOINT_OPTIONS (no YNNPACK + region analysis)", cpu_joint),
                ("no YNNPACK alone", xla_options(NO_YNN)),
                ("region analysis alone", xla_options(REGION_ANALYSIS)),
                ("YNNPACK for dots only", xla_options(YNN_DOTS_ONLY)),
                ("Eigen on one thread", xla_options({"xla_cpu_multi_thread_eigen": False})),
            ]
            print("\n| ablation | batch | T | variant | ms/step | x first | HLO copies |")
            print("|---|---|---|---|---|---|---|")
            for t in (3, 8):
                compare("XLA options, shared bottom", xla, b, t, a.repeats, copies=True)
            compare("XLA options, MMoE", xla, b, 3, a.repeats, model="mmoe", copies=True)
            compare("XLA options, UPGrad", xla, b, 3, a.repeats, aggregator="upgrad", copies=True)
            rep = dict(aggregator="mgda", aggregate_on="representation", copies=True)
            compare("XLA options, rep-level MGDA", xla, b, 8, a.repeats, **rep)
            print()
        if a.only in (None, "micro"):
            split = [(f"{k}", microbatches(k)) for k in (1, 2, 4)]
            for t in (3, 8):
                compare("microbatches, shared bottom", split, b, t, a.repeats)
            compare("microbatches, MMoE", split, b, 3, a.repeats, model="mmoe")
            compare("microbatches, UPGrad", split, b, 3, a.repeats, aggregator="upgrad")
        if a.only in (None, "chunk"):
            runs = [
                ("host mask, 32,768 rows per run", host_mask),
                ("device mask, 32,768 rows per run", now),
                ("device mask, 73,728 rows per run", now),
            ]
            compare("chunk", runs, b, 3, a.repeats, [EXAMPLES, EXAMPLES, B.EPOCH_EXAMPLES])
    if a.only in (None, "layout"):  # matmuls alone, not steps
        for b in batches:
            layout_table(b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
