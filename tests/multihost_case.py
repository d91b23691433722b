"""The training case shared by tests/test_parallel.py and tests/multihost_worker.py."""

from __future__ import annotations

from typing import Any

from mtl.data import synthetic
from mtl.data.batching import Dataset
from mtl.models import build_model
from mtl.runner import fit
from mtl.train import Stage, TrainConfig, Trainer


def run(mesh: Any = None) -> dict:
    """Two epochs of the shared bottom (dropout on) with evaluation; losses and metrics."""
    f, l, fs, ts = synthetic.recsys(n=256, num_users=20, num_items=30, seed=2)
    data = Dataset(f, l, fs, ts)
    model = build_model("shared_bottom", fs, ts, trunk=(16,), tower=(8,), dropout=0.1, seed=4)
    trainer = Trainer(model, TrainConfig(learning_rate=1e-2))
    res = fit(
        trainer,
        trainer.init(model, seed=5),
        data,
        [Stage(2)],
        batch_size=64,
        data_seed=6,
        eval_data=data,
        mesh=mesh,
        progress=False,
    )
    return {
        "losses": [h["train_loss"] for h in res.history],
        "eval": res.history[-1]["eval"],
    }
