"""Hard parameter sharing: a shared trunk and one tower + head per task (Caruana 1997)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from mtl.models.base import (
    MLP,
    FeatureEncoder,
    MTLModel,
    head_output,
    towers_and_heads,
    towers_on_copies,
    towers_on_shared_input,
)
from mtl.spec import FeatureSpec, TaskSpec

Array = jax.Array


class SharedBottom(MTLModel):
    """encoder → shared MLP (default 128) → per-task tower (default 64) → per-task head."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        trunk: Sequence[int] = (128,),
        tower: Sequence[int] = (64,),
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self._set_tasks(tasks)
        self.encoder = FeatureEncoder(features, rngs=rngs)
        self.trunk = MLP(self.encoder.out_dim, trunk, dropout, rngs=rngs)
        self.towers, self.heads = towers_and_heads(tasks, self.trunk.out_dim, tower, dropout, rngs)
        # the towers' first layers run as one matmul (base.towers_on_shared_input); the Trainer
        # turns this off where each task has its own backward pass (aggregators, weightings that
        # read the Jacobian)
        self.fuse_towers = True

    def represent(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None) -> Array:
        return self.trunk(self.encoder(features), rngs)

    def decode(self, rep_BxH: Array, rngs: nnx.Rngs | None = None) -> tuple[dict[str, Array], dict]:
        names = [t.name for t in self.tasks]
        if self.fuse_towers and all(len(self.towers[n].layers) for n in names):
            hidden = towers_on_shared_input(self.towers, names, rep_BxH, rngs)
        else:
            hidden = {n: self.towers[n](rep_BxH, rngs) for n in names}
        preds = {t.name: head_output(t, self.heads[t.name](hidden[t.name])) for t in self.tasks}
        return preds, {}

    def decode_each(
        self, reps: Sequence[Array], rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        """``MTLModel.decode_each`` with the towers' first layers fused (``towers_on_copies``)."""
        names = [t.name for t in self.tasks]
        if not all(len(self.towers[n].layers) for n in names):
            return super().decode_each(reps, rngs)
        hidden = towers_on_copies(self.towers, names, reps, rngs)
        preds = {t.name: head_output(t, self.heads[t.name](hidden[t.name])) for t in self.tasks}
        return preds, {}
