"""Entire Space Multi-task Model (ESMM): pCTCVR = pCTR × pCVR over the entire impression space.

Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click
Conversion Rate", SIGIR 2018. Tasks ``ctr`` (label: click) and ``ctcvr`` (label: click ∧
conversion), both binary; with the standard sigmoid BCE on the logits the loss is
BCE(click, pCTR) + BCE(click ∧ conversion, pCTCVR), and pCVR is learned only through pCTCVR.

Parameters: ``encoder`` (the shared embeddings), ``towers``/``heads`` keyed by task: ``ctr`` holds
the CTR tower and ``ctcvr`` the CVR tower (ctcvr's loss is the only one that reaches it). The CTR
tower is owned by ``ctr``: in alternating schedules a ctcvr step changes the CVR tower and the
embeddings only; joint steps use the paper's full gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.models.base import FeatureEncoder, MTLModel, towers_and_heads
from mtl.models.mmoe import check_widths
from mtl.spec import FeatureSpec, TaskSpec

Array = jax.Array
ESMM_TASKS = ("ctr", "ctcvr")


def product_logit(a: Array, b: Array) -> Array:
    """logit(σ(a)σ(b)) = log p − log(1 − p), log(1 − p) = logaddexp(log σ(−a), log σ(a)σ(−b)).

    The identity 1 − σ(a)σ(b) = σ(−a) + σ(a)σ(−b) keeps both terms free of cancellation (no
    log1mexp of a log p near 0), so the logit stays finite and accurate for any finite a, b.
    """
    log_p = jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(b)
    log_1mp = jnp.logaddexp(jax.nn.log_sigmoid(-a), jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(-b))
    return log_p - log_1mp


class ESMM(MTLModel):
    """Shared embeddings → CTR tower (logit a) and CVR tower (logit b); ctcvr = logit(σ(a)σ(b))."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        tower: Sequence[int] = (64, 32),
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self._set_tasks(tasks)
        got = {t.name: t.kind for t in self.tasks}
        if got != {n: "binary" for n in ESMM_TASKS}:
            raise ValueError(
                f"tasks: ESMM needs exactly the binary tasks {list(ESMM_TASKS)}, got {got}; "
                "use TaskSpec('ctr', 'binary') (label: click) and TaskSpec('ctcvr', 'binary') "
                "(label: click AND conversion)"
            )
        tower = check_widths("tower", tower)
        self.encoder = FeatureEncoder(features, rngs=rngs)
        self.towers, self.heads = towers_and_heads(
            self.tasks, self.encoder.out_dim, tower, dropout, rngs
        )

    def represent(self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None) -> Array:
        """The shared embedded input [B, D]."""
        return self.encoder(features)

    def decode(
        self, inputs_BxD: Array, rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        """preds: ctr = a, ctcvr = logit(σ(a)σ(b)); aux: pctr = σ(a), pcvr = σ(b), cvr_logit = b."""
        logit = lambda n: self.heads[n](self.towers[n](inputs_BxD, rngs))[..., 0]
        ctr_B, cvr_B = logit("ctr"), logit("ctcvr")
        preds = {"ctr": ctr_B, "ctcvr": product_logit(ctr_B, cvr_B)}
        aux = {"pctr": jax.nn.sigmoid(ctr_B), "pcvr": jax.nn.sigmoid(cvr_B), "cvr_logit": cvr_B}
        return preds, aux
