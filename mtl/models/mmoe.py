"""Multi-gate and one-gate mixtures of experts: MMoE and OMoE.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018. ``y_k = h_k(Σ_i g_k(x)_i f_i(x))`` with ``g_k(x) = softmax(W_gk x)``.

Parameters: ``experts`` (one ``ExpertBank``: every expert's weights stacked on a leading expert
axis, shared), ``gates`` (MMoE: nnx.Dict of per-task linear gates, owned by their task) or ``gate``
(OMoE: one gate every task reads, shared), ``towers`` and ``heads`` as in shared_bottom.
"""

from __future__ import annotations

import string
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
from mtl.spec import FeatureSpec, TaskSpec

Array = jax.Array


def check_count(field: str, value: int, minimum: int, fix: str) -> int:
    """``int(value)`` if it is an integer >= ``minimum``, else a ValueError naming the field."""
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{field}: {value!r} must be an integer >= {minimum}; {fix}")
    return int(value)


def check_widths(field: str, widths: Sequence[int], allow_empty: bool = True) -> tuple[int, ...]:
    """The hidden widths as a tuple of positive ints, else a ValueError naming the field."""
    widths = (widths,) if isinstance(widths, int) else tuple(widths)
    if not widths and not allow_empty:
        raise ValueError(f"{field}: {widths!r} is empty; give at least one width, e.g. (16,)")
    for w in widths:
        check_count(field, w, 1, "every hidden width must be a positive integer")
    return widths


class StackedLinear(nnx.Module):
    """y[b, *lead] = x[b, *lead] @ W[*lead] + b[*lead]: independent linear maps, stacked."""

    def __init__(self, in_dim: int, out_dim: int, lead: tuple[int, ...], *, rngs: nnx.Rngs):
        self.lead = tuple(int(n) for n in lead)
        init = nnx.initializers.lecun_normal(
            in_axis=-2, out_axis=-1, batch_axis=tuple(range(len(self.lead)))
        )
        self.kernel = nnx.Param(init(rngs.params(), (*self.lead, in_dim, out_dim), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((*self.lead, out_dim), jnp.float32))

    def __call__(self, x: Array) -> Array:
        """x is [B, *lead[:k], D] for any k <= len(lead): missing lead axes are broadcast."""
        letters = string.ascii_lowercase[2 : 2 + len(self.lead)]
        k = x.ndim - 2
        spec = f"b{letters[:k]}i,{letters}io->b{letters}o"
        return jnp.einsum(spec, x, self.kernel[...]) + self.bias[...]


class ExpertBank(nnx.Module):
    """Stacked ReLU MLP experts: h ← dropout(relu(h W_e + b_e)) per width, all in one einsum."""

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int],
        lead: tuple[int, ...],
        dropout: float,
        *,
        rngs: nnx.Rngs,
    ):
        dims = [in_dim, *widths]
        self.layers = nnx.List(
            [StackedLinear(a, b, lead, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: {dropout} must lie in [0, 1)")
        self.drop = nnx.Dropout(dropout)
        self.out_dim = dims[-1]

    def __call__(self, x: Array, rngs: nnx.Rngs | None = None) -> Array:
        """[B, *lead[:k], D] -> [B, *lead, H] (the input is shared along the missing lead axes)."""
        for layer in self.layers:
            x = self.drop(jax.nn.relu(layer(x)), rngs=rngs)
        return x


def mix(gate_BxE: Array, experts_BxExH: Array) -> Array:
    """Σ_e g_e f_e: the gate-weighted sum of expert outputs, [B, H]."""
    return jnp.einsum("be,beh->bh", gate_BxE, experts_BxExH)


class MMoE(MTLModel):
    """encoder → E experts; per task k: softmax gate g_k(x) mixes them → tower_k → head_k."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        num_experts: int = 8,
        expert: Sequence[int] = (16,),
        tower: Sequence[int] = (8,),
        gate_bias: bool = False,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self._set_tasks(tasks)
        E = check_count("num_experts", num_experts, 1, "use at least one expert (e.g. 8)")
        expert = check_widths("expert", expert, allow_empty=False)
        tower = check_widths("tower", tower)
        self.encoder = FeatureEncoder(features, rngs=rngs)
        D = self.encoder.out_dim
        self.experts = ExpertBank(D, expert, (E,), dropout, rngs=rngs)
        self._make_gates(D, E, bool(gate_bias), rngs)
        self.towers, self.heads = towers_and_heads(
            self.tasks, self.experts.out_dim, tower, dropout, rngs
        )

    def _make_gates(self, in_dim: int, num_experts: int, bias: bool, rngs: nnx.Rngs) -> None:
        self.gates = nnx.Dict(
            {
                t.name: NarrowLinear(in_dim, num_experts, use_bias=bias, rngs=rngs)
                for t in self.tasks
            }
        )

    def _gate(self, task: str, inputs_BxD: Array) -> Array:
        return jax.nn.softmax(self.gates[task](inputs_BxD), axis=-1)

    def represent(
        self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> dict[str, Array]:
        """{"inputs": encoded x [B, D], "experts": f_i(x) stacked [B, E, H]}."""
        inputs_BxD = self.encoder(features)
        return {"inputs": inputs_BxD, "experts": self.experts(inputs_BxD, rngs)}

    def decode(
        self, rep: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        """preds_k = head_k(tower_k(Σ_i g_k(x)_i f_i(x))); aux["gates"][k] = g_k(x) [B, E]."""
        preds, gates = {}, {}
        for t in self.tasks:
            gate_BxE = self._gate(t.name, rep["inputs"])
            mixed_BxH = mix(gate_BxE, rep["experts"])
            preds[t.name] = head_output(t, self.heads[t.name](self.towers[t.name](mixed_BxH, rngs)))
            gates[t.name] = gate_BxE
        return preds, {"gates": gates}


class OMoE(MMoE):
    """MMoE with one softmax gate g(x) shared by every task: y_k = h_k(Σ_i g(x)_i f_i(x))."""

    def _make_gates(self, in_dim: int, num_experts: int, bias: bool, rngs: nnx.Rngs) -> None:
        self.gate = NarrowLinear(in_dim, num_experts, use_bias=bias, rngs=rngs)

    def _gate(self, task: str, inputs_BxD: Array) -> Array:
        return jax.nn.softmax(self.gate(inputs_BxD), axis=-1)
