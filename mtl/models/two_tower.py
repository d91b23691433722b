"""Two-tower retrieval with a rating head: the TensorFlow Recommenders multi-task model.

Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations",
RecSys 2019, as in the TFRS "multitask" tutorial: u = user_tower(user features), v =
item_tower(item features) (32-d by default); the ``retrieval`` task predicts the in-batch logits
u vᵀ / τ ([B, B], positives on the diagonal; mtl.losses.in_batch_softmax), every other task (the
``rating`` regression) predicts head(MLP(256 → 128)([u; v])).

Parameters: ``user_tower`` and ``item_tower`` (shared: every task reads them; their tables are in
group "embeddings"), ``towers``/``heads`` keyed by the non-retrieval tasks (owned by them).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.models.base import MLP, FeatureEncoder, MTLModel, head_output, towers_and_heads
from mtl.models.mmoe import check_count, check_widths
from mtl.spec import FeatureSpec, TaskSpec, unknown

Array = jax.Array


class Tower(nnx.Module):
    """e = W · MLP(encoder(features)) + b: one side's embedding [B, embed_dim]."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        hidden: Sequence[int],
        embed_dim: int,
        dropout: float,
        *,
        rngs: nnx.Rngs,
    ):
        self.encoder = FeatureEncoder(features, rngs=rngs)
        self.mlp = MLP(self.encoder.out_dim, hidden, dropout, rngs=rngs)
        self.out = nnx.Linear(self.mlp.out_dim, embed_dim, rngs=rngs)

    def __call__(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None) -> Array:
        return self.out(self.mlp(self.encoder(features), rngs))


class TwoTower(MTLModel):
    """User and item towers; retrieval logits u vᵀ / τ and per-task heads on [u; v]."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        user_features: Sequence[str],
        item_features: Sequence[str],
        embed_dim: int = 32,
        tower: Sequence[int] = (),
        rating: Sequence[int] = (256, 128),
        temperature: float = 1.0,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self._set_tasks(tasks)
        retrieval = [t.name for t in self.tasks if t.kind == "retrieval"]
        if len(retrieval) != 1:
            raise ValueError(
                f"tasks: TwoTower needs exactly one task of kind 'retrieval', got {retrieval}; "
                "add e.g. TaskSpec('retrieval', 'retrieval') (labels: the item id)"
            )
        self.retrieval = retrieval[0]
        embed_dim = check_count("embed_dim", embed_dim, 1, "e.g. 32")
        tower = check_widths("tower", tower)
        rating = check_widths("rating", rating)
        if not temperature > 0:
            raise ValueError(f"temperature: {temperature} must be > 0 (1.0: plain dot products)")
        self.temperature = float(temperature)
        by_name = {f.name: f for f in features}
        sides = {}
        for field, names in (("user_features", user_features), ("item_features", item_features)):
            names = (names,) if isinstance(names, str) else tuple(names)
            if not names:
                raise ValueError(f"{field}: empty; name the features this tower reads")
            for n in names:
                if n not in by_name:
                    raise unknown(field, n, by_name)
            sides[field] = [by_name[n] for n in names]
        self.user_tower = Tower(sides["user_features"], tower, embed_dim, dropout, rngs=rngs)
        self.item_tower = Tower(sides["item_features"], tower, embed_dim, dropout, rngs=rngs)
        others = [t for t in self.tasks if t.kind != "retrieval"]
        self.towers, self.heads = towers_and_heads(others, 2 * embed_dim, rating, dropout, rngs)

    def user_embeddings(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None) -> Array:
        """u [B, embed_dim] from the user features."""
        return self.user_tower(features, rngs)

    def item_embeddings(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None) -> Array:
        """v [N, embed_dim] from the item features (e.g. of every item, for evaluation)."""
        return self.item_tower(features, rngs)

    def represent(
        self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> dict[str, Array]:
        """{"user": u [B, D], "item": v [B, D]}."""
        return {"user": self.user_tower(features, rngs), "item": self.item_tower(features, rngs)}

    def decode(
        self, rep: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        """retrieval: u vᵀ / τ [B, B]; other task k: head_k(MLP_k([u; v]))."""
        user_BxD, item_BxD = rep["user"], rep["item"]
        preds = {self.retrieval: user_BxD @ item_BxD.T / self.temperature}
        both_Bx2D = jnp.concatenate([user_BxD, item_BxD], axis=-1)
        for t in self.tasks:
            if t.kind != "retrieval":
                y = self.heads[t.name](self.towers[t.name](both_Bx2D, rngs))
                preds[t.name] = head_output(t, y)
        return preds, {}


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k(user_BxD: Array, item_NxD: Array, k: int) -> tuple[Array, Array]:
    return jax.lax.top_k(user_BxD @ item_NxD.T, k)


def top_k(user_emb_BxD: Array, item_emb_NxD: Array, k: int) -> tuple[Array, Array]:
    """Brute-force (scores [B, k], ids [B, k]) of the k largest u·v, best first (jit-compiled)."""
    n = item_emb_NxD.shape[0]
    if not 1 <= int(k) <= n:
        raise ValueError(f"k: {k} must lie in [1, {n}] (the number of items)")
    if user_emb_BxD.shape[-1] != item_emb_NxD.shape[-1]:
        raise ValueError(
            f"item_emb_NxD: width {item_emb_NxD.shape[-1]} != user width {user_emb_BxD.shape[-1]}; "
            "embed users and items with the same model"
        )
    return _top_k(user_emb_BxD, item_emb_NxD, int(k))
