"""Building blocks shared by every model: the feature encoder, MLPs, heads, and the model contract.

Model contract (every model in mtl.models follows it):
  ``rep = model.represent(features, rngs=rngs)``   the shared representation (a pytree of arrays)
  ``preds, aux = model.decode(rep, rngs=rngs)``     per-task raw outputs keyed by task name, plus extras
  ``model(features, rngs=rngs) == model.decode(model.represent(features, rngs), rngs)``
  ``preds, aux = model.decode_each(reps, rngs=rngs)`` task i decoded from its own copy reps[i]
                                                    (representation-level aggregation)
Dropout randomness is passed in (``rngs=nnx.Rngs(dropout=key)``), never stored in the model, so the
model's state is parameters only and a train step is a pure function of (params, batch, key).
``rngs=None`` is fine in eval mode (``model.eval()``) or when dropout is 0.
``aux`` may hold ``"gates"`` ({task: [B, E]}) for mixture models.

Parameter naming convention (mtl.partition reads it):
  top-level ``embed``   embedding tables                  group "embeddings"
  top-level ``towers``  nnx.Dict keyed by task name        group "towers", owned by that task
  top-level ``heads``   nnx.Dict keyed by task name        group "heads",  owned by that task
  top-level ``gates``   nnx.Dict keyed by task name        group "gates",  owned by that task
  top-level ``columns`` modules stacked on a leading task axis (one slice per task)
  anything else                                          group "shared"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.spec import FeatureSpec, TaskSpec, task_names

Array = jax.Array


class FeatureEncoder(nnx.Module):
    """Concatenates dense features, embedded ids and normalised embedded bags into [B, D]."""

    def __init__(self, features: Sequence[FeatureSpec], *, rngs: nnx.Rngs):
        self.specs = tuple(features)
        if not self.specs:
            raise ValueError("features: no input features given; pass at least one FeatureSpec")
        init = nnx.initializers.normal(0.05)
        self.embed = nnx.Dict(
            {
                f.name: nnx.Embed(f.dim, f.embed_dim, embedding_init=init, rngs=rngs)
                if f.kind == "categorical"
                else nnx.Linear(f.dim, f.embed_dim, use_bias=False, kernel_init=init, rngs=rngs)
                for f in self.specs
                if f.kind != "dense"
            }
        )
        self.out_dim = sum(f.dim if f.kind == "dense" else f.embed_dim for f in self.specs)

    def __call__(self, features: Mapping[str, Array]) -> Array:
        parts = []
        for f in self.specs:
            x = features[f.name]
            if f.kind == "dense":
                parts.append(x.astype(jnp.float32).reshape(x.shape[0], -1))
            elif f.kind == "categorical":
                parts.append(self.embed[f.name](x.astype(jnp.int32)))
            else:
                x = x.astype(jnp.float32)
                bag = self.embed[f.name](x)
                parts.append(bag / jnp.maximum(jnp.sum(x, axis=-1, keepdims=True), 1.0))
        return jnp.concatenate(parts, axis=-1)


class MLP(nnx.Module):
    """Dense → ReLU → Dropout, repeated for each width."""

    def __init__(self, in_dim: int, widths: Sequence[int], dropout: float, *, rngs: nnx.Rngs):
        dims = [in_dim, *widths]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: {dropout} must lie in [0, 1)")
        self.drop = nnx.Dropout(dropout)
        self.out_dim = dims[-1]

    def __call__(self, x: Array, rngs: nnx.Rngs | None = None) -> Array:
        return self.after_first(self.layers[0](x), rngs) if len(self.layers) else x

    def after_first(self, z: Array, rngs: nnx.Rngs | None = None) -> Array:
        """The MLP given its first layer's pre-activation ``z`` (see ``towers_on_shared_input``)."""
        return self.after_first_relu(jax.nn.relu(z), rngs)

    def after_first_relu(self, a: Array, rngs: nnx.Rngs | None = None) -> Array:
        """The MLP given its first layer's activation ``a`` = relu(z)."""
        x = self.drop(a, rngs=rngs)
        for layer in self.layers[1:]:
            x = self.drop(jax.nn.relu(layer(x)), rngs=rngs)
        return x


def towers_on_shared_input(
    towers: Mapping[str, MLP], names: Sequence[str], x: Array, rngs: nnx.Rngs | None = None
) -> dict[str, Array]:
    """``{n: towers[n](x, rngs) for n in names}``, with the first layers fused.

    The first layers of all towers run as one matmul ``x @ [W_1 | ... | W_T]``: in the backward
    pass their weight gradients become one ``xᵀ [δ_1 | ... | δ_T]`` instead of T thin products that
    contract over the batch (each ~2x slower per FLOP on CPU). The parameters stay one Linear per
    tower, so ownership, freezing and checkpoints are unchanged; values equal the per-tower calls up
    to float summation order, and dropout draws its keys in the same order (tower by tower).
    """
    firsts = [towers[n].layers[0] for n in names]
    kernel = jnp.concatenate([f.kernel[...] for f in firsts], axis=1)
    # ReLU before the split (the same values, bit for bit): the backward pass then masks the
    # joined gradients of the towers once, over [B, Σ widths], instead of once per tower
    a = jax.nn.relu(x @ kernel + jnp.concatenate([f.bias[...] for f in firsts]))
    pieces = jnp.split(a, np.cumsum([f.out_features for f in firsts])[:-1], axis=-1)
    return {n: towers[n].after_first_relu(an, rngs) for n, an in zip(names, pieces, strict=True)}


@jax.custom_vjp
def _first_layers_on_copies(
    xs: tuple[Array, ...], kernels: tuple[Array, ...], biases: tuple[Array, ...]
) -> tuple[Array, ...]:
    """z_i = xs[i] @ kernels[i] + biases[i], for copies xs[i] of one array: one fused matmul."""
    z = xs[0] @ jnp.concatenate(kernels, axis=1) + jnp.concatenate(biases)
    return tuple(jnp.split(z, np.cumsum([k.shape[1] for k in kernels])[:-1], axis=-1))


def _first_layers_fwd(xs, kernels, biases):
    return _first_layers_on_copies(xs, kernels, biases), (xs[0], kernels)


def _first_layers_bwd(res, dz):
    x, kernels = res
    lead = tuple(range(x.ndim - 1))
    dz_cat = jnp.concatenate(dz, axis=-1)
    dk = jnp.tensordot(x, dz_cat, axes=(lead, lead))  # one xᵀ[δ_1 | ... | δ_T]
    cuts = np.cumsum([k.shape[1] for k in kernels])[:-1]
    dxs = tuple(d @ k.T for d, k in zip(dz, kernels, strict=True))  # copy i: δ_i W_iᵀ only
    dbs = tuple(jnp.split(jnp.sum(dz_cat, axis=lead), cuts))
    return dxs, tuple(jnp.split(dk, cuts, axis=1)), dbs


_first_layers_on_copies.defvjp(_first_layers_fwd, _first_layers_bwd)


def towers_on_copies(
    towers: Mapping[str, MLP],
    names: Sequence[str],
    xs: Sequence[Array],
    rngs: nnx.Rngs | None = None,
) -> dict[str, Array]:
    """``{n: towers[n](x, rngs) for n, x in zip(names, xs)}`` for copies ``xs`` of one array.

    Tower i reads only its copy ``xs[i]``, so the gradient w.r.t. ``xs[i]`` is task i's alone (the
    rows of a representation-level Jacobian). The forward pass and the weight gradients of the
    first layers run fused, as in ``towers_on_shared_input``; only the input gradients, one per
    copy, stay apart. The copies must be equal (the fused forward reads ``xs[0]``).
    """
    firsts = [towers[n].layers[0] for n in names]
    zs = _first_layers_on_copies(
        tuple(xs), tuple(f.kernel[...] for f in firsts), tuple(f.bias[...] for f in firsts)
    )
    return {n: towers[n].after_first(z, rngs) for n, z in zip(names, zs, strict=True)}


class NarrowLinear(nnx.Linear):
    """A linear layer with few outputs (task heads, mixture gates), ``y = x Wᵀ + b``:
    ``nnx.Linear`` (same initial values) with its kernel stored [out, in], PyTorch's layout,
    instead of [in, out].

    XLA:CPU contracts the batch into a narrow [in, out] weight gradient slowly (the 19-way genre
    head at batch 4096: 26 GFLOP/s). Stored [out, in], the gradient δᵀx comes out in the kernel's
    own layout and runs as a matmul of the fast form (step time, shared bottom with the genre head,
    batch 4096: -6%; MMoE, batch 256: -4%; docs/results/ablations.md).
    """

    def __init__(self, in_dim: int, out_dim: int, *, use_bias: bool = True, rngs: nnx.Rngs):
        super().__init__(in_dim, out_dim, use_bias=use_bias, rngs=rngs)
        self.kernel = nnx.Param(self.kernel[...].T)

    def __call__(self, x: Array) -> Array:
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        contract = (((x.ndim - 1,), (1,)), ((), ()))
        y = jax.lax.dot_general(x, kernel, contract, precision=self.precision)
        return y if bias is None else y + bias


def towers_and_heads(
    tasks: Sequence[TaskSpec], in_dim: int, widths: Sequence[int], dropout: float, rngs: nnx.Rngs
) -> tuple[nnx.Dict, nnx.Dict]:
    """One MLP tower and one linear head per task, keyed by task name."""
    towers = {t.name: MLP(in_dim, widths, dropout, rngs=rngs) for t in tasks}
    heads = {t.name: NarrowLinear(towers[t.name].out_dim, t.size, rngs=rngs) for t in tasks}
    return nnx.Dict(towers), nnx.Dict(heads)


def head_output(task: TaskSpec, y_BxC: Array) -> Array:
    """Squeeze scalar outputs to [B]; keep [B, C] for multiclass/multilabel."""
    return y_BxC[..., 0] if task.size == 1 and task.kind != "multiclass" else y_BxC


class MTLModel(nnx.Module):
    """Base class: ``__call__`` = ``decode(represent(x))``."""

    tasks: tuple[TaskSpec, ...]

    def _set_tasks(self, tasks: Sequence[TaskSpec]) -> None:
        task_names(tasks)
        self.tasks = tuple(tasks)

    def represent(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None):
        raise NotImplementedError

    def decode(self, rep, rngs: nnx.Rngs | None = None) -> tuple[dict[str, Array], dict]:
        raise NotImplementedError

    def decode_each(self, reps: Sequence[Any], rngs: nnx.Rngs | None = None) -> tuple[dict, dict]:
        """Task i's prediction from its own copy ``reps[i]`` of one representation (tasks in
        ``self.tasks`` order), so that the gradient w.r.t. ``reps[i]`` is task i's alone; aux from
        ``reps[0]``. Every copy draws the dropout keys a single ``decode`` would. Models may
        override it with a faster equivalent."""
        outs = [self.decode(r, None if rngs is None else nnx.clone(rngs)) for r in reps]
        return {t.name: outs[i][0][t.name] for i, t in enumerate(self.tasks)}, outs[0][1]

    def __call__(
        self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        return self.decode(self.represent(features, rngs), rngs)
