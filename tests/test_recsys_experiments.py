"""The TFRS and cold-start study scripts: configs, baselines, top-K evaluation and model options."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.spec import FeatureSpec, TaskSpec

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    """Import experiments/<name>.py as a module (the scripts are not a package)."""
    key = f"_experiments_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "experiments" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


tfrs = _load("tfrs")
cold = _load("cold_start")


def _model(**kw) -> nnx.Module:
    """A tiny RatingRetrieval over 6 users and 9 items (4-d embeddings)."""
    feats = [
        FeatureSpec("user_id", "categorical", 6, 4),
        FeatureSpec("item_id", "categorical", 9, 4),
    ]
    tasks = [TaskSpec("rating", "regression"), TaskSpec("retrieval", "retrieval")]
    kw = {"user_features": ("user_id",), "item_features": ("item_id",)} | kw
    return tfrs.RatingRetrieval(
        feats,
        tasks,
        embed_dim=4,
        rating=(8,),
        rngs=nnx.Rngs(0),
        **kw,
    )


@pytest.mark.parametrize("mod", [tfrs, cold])
def test_configs(mod):
    full, quick = mod.get_config(), mod.get_config("quick")
    assert quick.workdir != full.workdir
    with pytest.raises(ValueError, match="unknown variant"):
        mod.get_config("nope")


def test_retrieval_accuracy_matches_numpy_brute_force():
    m = _model(project=False)
    m.eval()
    users, items = np.arange(6, dtype=np.int32), np.arange(9, dtype=np.int32)
    user_N = np.array([0, 1, 2, 5, 5, 3], np.int32)
    item_N = np.array([3, 8, 0, 1, 7, 4], np.int32)
    got = tfrs.retrieval_accuracy(
        m, {"user_id": users}, {"item_id": items}, user_N, item_N, ks=(1, 3), user_batch=4
    )
    s = (
        np.asarray(m.user_embeddings({"user_id": jnp.asarray(users)}))
        @ np.asarray(m.item_embeddings({"item_id": jnp.asarray(items)})).T
    )
    rank = (s[user_N] > s[user_N, item_N][:, None]).sum(1)
    for k in (1, 3):
        assert got[f"top{k}_accuracy"] == pytest.approx(float((rank < k).mean()))


def test_baselines():
    assert tfrs.popularity_accuracy(
        np.array([2, 2, 2, 1, 1, 0]), np.array([2, 1, 0, 0]), 3, (1, 2)
    ) == {
        "top1_accuracy": 0.25,
        "top2_accuracy": 0.5,
    }
    u, i = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    r = np.array([5.0, 3.0, 4.0, 2.0])  # additive: μ = 3.5, item +1 / −1, user +0.5 / −0.5
    assert tfrs.bias_baseline_rmse((u, i, r), (u, i, r), 2, 2, 0.0) == pytest.approx(0.0)
    assert tfrs.bias_baseline_rmse((u, i, r), (u, i, r), 2, 2, 10.0) > 0.5


def test_model_options_correct_in_batch_logits_and_add_biases():
    log_q = np.log(np.arange(1, 10) / 45.0)
    m = _model(
        project=False, biases=True, rating_mean=3.5, log_q=log_q, remove_accidental_hits=True
    )
    m.eval()
    feats = {"user_id": jnp.array([0, 1, 2]), "item_id": jnp.array([4, 4, 7])}
    preds, _ = m(feats)
    u, v = m.user_embeddings(feats), m.item_embeddings(feats)
    want = np.asarray(u @ v.T) - log_q[[4, 4, 7]][None, :]
    want[0, 1] = want[1, 0] = -1e9  # the same item elsewhere in the batch is no negative
    np.testing.assert_allclose(np.asarray(preds["retrieval"]), want, rtol=1e-5, atol=1e-5)
    head = m.heads["rating"]
    h = m.towers["rating"](jnp.concatenate([u, v], -1))
    np.testing.assert_allclose(preds["rating"], head.linear(h)[:, 0] + 3.5, rtol=1e-5)
    with pytest.raises(ValueError, match="project"):
        _model(project=False, user_features=("user_id", "item_id"))


def test_cold_start_summary():
    runs = [
        {"split": "cold_user", "model": m, "seed": s, "train_seconds": 1.0, "delta_m": dm,
         "tasks": {"like": {"auc": a, "accuracy": 0.6, "f1": 0.5}, "rating": {"rmse": 1.0}}}
        for m, s, a, dm in [("single_task", 0, 0.7, 0.0), ("mmoe", 0, 0.8, 3.0), ("mmoe", 1, 0.6, 1.0)]
    ]  # fmt: skip
    rows = cold.summarize(runs)
    mmoe = next(r for r in rows if r["model"] == "mmoe")
    assert mmoe["like auc"] == pytest.approx({"mean": 0.7, "std": 0.1})
    assert mmoe["delta_m"]["mean"] == pytest.approx(2.0)
    assert "+2.00 ± 1.00" in cold.summary_table(rows, "cold_user")
