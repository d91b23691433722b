"""Multi-task models over one feature/task interface; ``build_model(name, ...)`` picks one by name."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from mtl.models.base import MLP, FeatureEncoder, MTLModel
from mtl.models.cross_stitch import CrossStitch
from mtl.models.esmm import ESMM
from mtl.models.mmoe import MMoE, OMoE
from mtl.models.ple import CGC, PLE
from mtl.models.shared_bottom import SharedBottom
from mtl.models.soft_sharing import SingleTask, SoftSharing
from mtl.models.two_tower import TwoTower
from mtl.spec import FeatureSpec, TaskSpec, unknown

MODELS: dict[str, type[MTLModel]] = {
    "shared_bottom": SharedBottom,
    "soft_sharing": SoftSharing,
    "single_task": SingleTask,
    "mmoe": MMoE,
    "omoe": OMoE,
    "cgc": CGC,
    "ple": PLE,
    "cross_stitch": CrossStitch,
    "esmm": ESMM,
    "two_tower": TwoTower,
}


def build_model(
    name: str, features: Sequence[FeatureSpec], tasks: Sequence[TaskSpec], seed: int = 0, **kwargs
) -> MTLModel:
    """Construct the model registered as ``name`` with its keyword options (sizes, dropout, ...)."""
    if name not in MODELS:
        raise unknown("model", name, MODELS)
    try:
        return MODELS[name](features, tasks, rngs=nnx.Rngs(params=seed, dropout=seed + 1), **kwargs)
    except TypeError as e:
        raise ValueError(
            f"model {name!r}: bad option ({e}); see {MODELS[name].__name__}.__init__"
        ) from e


__all__ = [
    "CGC",
    "ESMM",
    "MLP",
    "MODELS",
    "PLE",
    "CrossStitch",
    "FeatureEncoder",
    "MMoE",
    "MTLModel",
    "OMoE",
    "SharedBottom",
    "SingleTask",
    "SoftSharing",
    "TwoTower",
    "build_model",
]
