"""Soft parameter sharing and single-task baselines: one full network per task, stacked on a task axis.

``SoftSharing`` is trained with ``mtl.losses.soft_sharing`` (Σ_i L_i + λ Σ_i ||θ_i − θ̄||² over the
stacked ``columns``; Duong et al. 2015). ``SingleTask`` is the same network with λ = 0: T independent
models trained side by side in one compiled program, the baseline for Δm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from mtl.models.base import MLP, FeatureEncoder, MTLModel, NarrowLinear, head_output
from mtl.spec import FeatureSpec, TaskSpec

Array = jax.Array


class Column(nnx.Module):
    """encoder → trunk → tower: one task's network without its head."""

    def __init__(self, features, trunk, tower, dropout, *, rngs: nnx.Rngs):
        self.encoder = FeatureEncoder(features, rngs=rngs)
        self.trunk = MLP(self.encoder.out_dim, trunk, dropout, rngs=rngs)
        self.tower = MLP(self.trunk.out_dim, tower, dropout, rngs=rngs)

    def __call__(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None) -> Array:
        return self.tower(self.trunk(self.encoder(features), rngs), rngs)


class SoftSharing(MTLModel):
    """T stacked columns (``nnx.vmap``) with per-task heads; coupled only through the L2 penalty."""

    penalty: float

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        trunk: Sequence[int] = (128,),
        tower: Sequence[int] = (64,),
        dropout: float = 0.0,
        penalty: float = 1e-3,
        rngs: nnx.Rngs,
    ):
        self._set_tasks(tasks)
        if not penalty >= 0.0:
            raise ValueError(f"penalty: {penalty} must be >= 0 (the λ of the L2-to-mean term)")
        self.penalty = float(penalty)
        features, trunk, tower = tuple(features), tuple(trunk), tuple(tower)

        @nnx.split_rngs(splits=len(self.tasks))
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> Column:
            return Column(features, trunk, tower, dropout, rngs=rngs)

        self.columns = make(rngs)
        width = (tower or trunk)[-1] if (tower or trunk) else None
        if width is None:
            raise ValueError("trunk/tower: give at least one hidden width")
        self.heads = nnx.Dict({t.name: NarrowLinear(width, t.size, rngs=rngs) for t in self.tasks})

    def represent(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None) -> Array:
        """[T, B, H]: every column applied to the same batch (independent dropout per column)."""
        T = len(self.tasks)
        keys_T = jax.random.split(rngs.dropout() if rngs is not None else jax.random.key(0), T)

        def apply(col: Column, x, key):
            return col(x, nnx.Rngs(dropout=key) if rngs is not None else None)

        return nnx.vmap(apply, in_axes=(0, None, 0))(self.columns, features, keys_T)

    def decode(
        self, rep_TxBxH: Array, rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        preds = {
            t.name: head_output(t, self.heads[t.name](rep_TxBxH[i]))
            for i, t in enumerate(self.tasks)
        }
        return preds, {}


class SingleTask(SoftSharing):
    """Independent per-task models (SoftSharing with penalty 0)."""

    def __init__(self, features, tasks, *, trunk=(128,), tower=(64,), dropout=0.0, rngs: nnx.Rngs):
        super().__init__(
            features, tasks, trunk=trunk, tower=tower, dropout=dropout, penalty=0.0, rngs=rngs
        )
