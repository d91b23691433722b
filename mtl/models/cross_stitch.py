"""Cross-stitch networks: one column per task, mixed after every layer by learned T×T units.

Misra et al., "Cross-stitch Networks for Multi-task Learning", CVPR 2016. After layer l,
``x̃_k^l = Σ_j α^l_kj x_j^l``, with α initialised near the identity (α_kk = ``stitch_self``,
α_kj = (1 − ``stitch_self``)/(T − 1) off the diagonal, the paper's 0.9/0.1 for two tasks).

Parameters: ``encoder`` (shared embeddings), ``columns`` (per layer, every task's weights stacked
on a leading task axis: each slice owned by its task), ``stitch`` (the units α, [L, T, T]: shared,
every task's loss reaches them), optional ``towers`` and the per-task ``heads``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.models.base import FeatureEncoder, MTLModel, head_output, towers_and_heads
from mtl.models.mmoe import StackedLinear, check_widths
from mtl.spec import FeatureSpec, TaskSpec

Array = jax.Array


def stitch_init(num_tasks: int, num_layers: int, stitch_self: float) -> np.ndarray:
    """α [L, T, T] with α_kk = s and α_kj = (1 − s)/(T − 1) (the identity when T = 1)."""
    T = num_tasks
    off = (1.0 - stitch_self) / (T - 1) if T > 1 else 0.0
    alpha_TxT = np.full((T, T), off) + np.eye(T) * ((stitch_self if T > 1 else 1.0) - off)
    return np.broadcast_to(alpha_TxT, (num_layers, T, T)).astype(np.float32)


class CrossStitch(MTLModel):
    """encoder → T stacked columns, α-mixed after each layer → optional tower_k → head_k."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        hidden: Sequence[int] = (64, 32),
        tower: Sequence[int] = (),
        stitch_self: float = 0.9,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self._set_tasks(tasks)
        hidden = check_widths("hidden", hidden, allow_empty=False)
        tower = check_widths("tower", tower)
        if not 0.0 <= stitch_self <= 1.0:
            raise ValueError(
                f"stitch_self: {stitch_self} must lie in [0, 1] (the initial weight a column gives "
                "itself; 0.9 as in the paper, 1.0 for independent columns at init)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: {dropout} must lie in [0, 1)")
        T = len(self.tasks)
        self.encoder = FeatureEncoder(features, rngs=rngs)
        dims = [self.encoder.out_dim, *hidden]
        self.columns = nnx.List(
            [StackedLinear(a, b, (T,), rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.stitch = nnx.Param(jnp.asarray(stitch_init(T, len(hidden), stitch_self)))
        self.drop = nnx.Dropout(dropout)
        self.towers, self.heads = towers_and_heads(self.tasks, hidden[-1], tower, dropout, rngs)

    def represent(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None) -> Array:
        """The encoded input [B, D] (the columns are task-owned, so they belong to decode)."""
        return self.encoder(features)

    def decode(
        self, inputs_BxD: Array, rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        """h^l = α^l · dropout(relu(columns^l(h^{l−1}))) per layer; y_k = head_k(tower_k(h_k^L))."""
        h = inputs_BxD  # [B, D], then [B, T, H_l]
        alpha_LxTxT = self.stitch[...]
        for l, layer in enumerate(self.columns):
            h_BxTxH = self.drop(jax.nn.relu(layer(h)), rngs=rngs)
            h = jnp.einsum("kj,bjh->bkh", alpha_LxTxT[l], h_BxTxH)
        preds = {
            t.name: head_output(t, self.heads[t.name](self.towers[t.name](h[:, k], rngs)))
            for k, t in enumerate(self.tasks)
        }
        return preds, {}
