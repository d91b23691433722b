"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE).

Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
Personalized Recommendations", RecSys 2020. At level l, task k mixes its own experts and the shared
experts, ``x_k^{l+1} = Σ_i g_k^l(x_k^l)_i [E_k^l; E_s^l]_i``; below the last level a shared gate
mixes all experts, ``x_s^{l+1} = Σ_i g_s^l(x_s^l)_i [E_1^l; …; E_T^l; E_s^l]_i``; level 0 reads the
encoded input everywhere; tower_k and head_k read x_k^L. CGC is PLE with one level.

Parameters: ``experts`` (per level, the shared experts: shared), ``columns`` (per level, the
task-specific experts stacked [T, M, ...] on a leading task axis: each slice owned by its task),
``gates`` (nnx.Dict keyed by task, one gate per level: owned by the task), ``shared_gates`` (the
shared gate of every level but the last: shared), ``towers`` and ``heads`` as in shared_bottom.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl.models.base import (
    FeatureEncoder,
    MTLModel,
    NarrowLinear,
    head_output,
    towers_and_heads,
)
from mtl.models.mmoe import ExpertBank, check_count, check_widths, mix
from mtl.spec import FeatureSpec, TaskSpec

Array = jax.Array


class PLE(MTLModel):
    """L extraction levels of task-specific + shared experts with per-task (and shared) gates."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        num_levels: int = 2,
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert: Sequence[int] = (16,),
        tower: Sequence[int] = (8,),
        gate_bias: bool = False,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self._set_tasks(tasks)
        L = check_count("num_levels", num_levels, 1, "use 1 (CGC) or more extraction levels")
        M = check_count("num_task_experts", num_task_experts, 0, "use 0 or more per task")
        S = check_count("num_shared_experts", num_shared_experts, 0, "use 0 or more")
        if M + S < 1:
            raise ValueError(
                f"num_task_experts, num_shared_experts: {M} and {S} leave the gates nothing "
                "to mix; give at least one expert of either kind"
            )
        expert = check_widths("expert", expert, allow_empty=False)
        tower = check_widths("tower", tower)
        T = len(self.tasks)
        self.num_levels, self.num_task_experts, self.num_shared_experts = L, M, S
        self.encoder = FeatureEncoder(features, rngs=rngs)
        H = expert[-1]
        dims_L = [self.encoder.out_dim] + [H] * (L - 1)
        bank = lambda d, lead: ExpertBank(d, expert, lead, dropout, rngs=rngs)
        gate = lambda d, n: NarrowLinear(d, n, use_bias=bool(gate_bias), rngs=rngs)
        self.experts = nnx.List([bank(d, (S,)) for d in dims_L]) if S else None
        self.columns = nnx.List([bank(d, (T, M)) for d in dims_L]) if M else None
        self.gates = nnx.Dict(
            {t.name: nnx.List([gate(d, M + S) for d in dims_L]) for t in self.tasks}
        )
        self.shared_gates = nnx.List([gate(d, T * M + S) for d in dims_L[:-1]])
        self.towers, self.heads = towers_and_heads(self.tasks, H, tower, dropout, rngs)

    def represent(
        self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> dict[str, Array]:
        """{"inputs": encoded x [B, D], "experts": level-0 shared experts [B, S, H] (if S > 0)}."""
        inputs_BxD = self.encoder(features)
        rep = {"inputs": inputs_BxD}
        if self.experts is not None:
            rep["experts"] = self.experts[0](inputs_BxD, rngs)
        return rep

    def decode(
        self, rep: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        """Task experts, gates and levels 1.. on top of ``rep``; aux["gates"]: the last level's."""
        T, M = len(self.tasks), self.num_task_experts
        inputs_BxD = rep["inputs"]
        B = inputs_BxD.shape[0]
        task_in = [inputs_BxD] * T  # x_k^l, each [B, D_l]
        shared_in_BxD = inputs_BxD  # x_s^l
        gates = {}
        for l in range(self.num_levels):
            parts = []  # pieces of the all-expert list [E_1; …; E_T; E_s], each [B, n, H]
            own_BxTxMxH = None
            if self.columns is not None:
                x = inputs_BxD if l == 0 else jnp.stack(task_in, axis=1)
                own_BxTxMxH = self.columns[l](x, rngs)
                parts.append(own_BxTxMxH.reshape(B, T * M, -1))
            shared_BxSxH = None
            if self.experts is not None:
                shared_BxSxH = rep["experts"] if l == 0 else self.experts[l](shared_in_BxD, rngs)
                parts.append(shared_BxSxH)
            new_in = []
            for k, t in enumerate(self.tasks):
                cands = [own_BxTxMxH[:, k]] if own_BxTxMxH is not None else []
                cands += [shared_BxSxH] if shared_BxSxH is not None else []
                gate_BxE = jax.nn.softmax(self.gates[t.name][l](task_in[k]), axis=-1)
                new_in.append(mix(gate_BxE, jnp.concatenate(cands, axis=1)))
                gates[t.name] = gate_BxE
            if l < self.num_levels - 1:
                gate_BxE = jax.nn.softmax(self.shared_gates[l](shared_in_BxD), axis=-1)
                shared_in_BxD = mix(gate_BxE, jnp.concatenate(parts, axis=1))
            task_in = new_in
        preds = {
            t.name: head_output(t, self.heads[t.name](self.towers[t.name](task_in[k], rngs)))
            for k, t in enumerate(self.tasks)
        }
        return preds, {"gates": gates}


class CGC(PLE):
    """One PLE level: y_k = h_k(Σ_i g_k(x)_i [E_k(x); E_s(x)]_i)."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert: Sequence[int] = (16,),
        tower: Sequence[int] = (8,),
        gate_bias: bool = False,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            features,
            tasks,
            num_levels=1,
            num_task_experts=num_task_experts,
            num_shared_experts=num_shared_experts,
            expert=expert,
            tower=tower,
            gate_bias=gate_bias,
            dropout=dropout,
            rngs=rngs,
        )
