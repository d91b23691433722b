"""Synthetic multi-task data: the MMoE paper's controlled-correlation regression tasks and a small
recommendation-shaped generator for tests and demos."""

from __future__ import annotations

import numpy as np

from mtl.spec import FeatureSpec, TaskSpec


def mmoe_tasks(
    n: int,
    dim: int = 100,
    correlation: float = 0.5,
    seed: int = 0,
    *,
    scale: float = 1.0,
    num_sines: int = 10,
    noise: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """(x [n, dim], y [n, 2]) with y_t = w_tᵀx + Σ_i sin(α_i w_tᵀx + β_i) + N(0, noise²).

    Ma et al., KDD 2018, §4: orthonormal u1, u2; w1 = c·u1, w2 = c·(p·u1 + √(1−p²)·u2), so
    cos(w1, w2) = p exactly; α_i, β_i ~ N(0, 1) shared by both tasks; x ~ N(0, I).
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation: {correlation} must lie in [-1, 1]")
    if n < 1 or dim < 2:
        raise ValueError(f"n, dim: need n >= 1 and dim >= 2, got n={n}, dim={dim}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    p = correlation
    w = scale * np.stack([u1, p * u1 + np.sqrt(1.0 - p * p) * u2])  # [2, dim]
    alpha, beta = rng.standard_normal(num_sines), rng.standard_normal(num_sines)
    x = rng.standard_normal((n, dim))
    z = x @ w.T  # [n, 2]
    y = z + np.sin(alpha[None, None, :] * z[..., None] + beta).sum(-1)
    y = y + noise * rng.standard_normal(y.shape)
    return x.astype(np.float32), y.astype(np.float32)


def mmoe_specs(dim: int = 100) -> tuple[tuple[FeatureSpec, ...], tuple[TaskSpec, ...]]:
    """Feature and task specs for ``mmoe_tasks``: one dense input, two regression tasks."""
    return (FeatureSpec("x", "dense", dim),), (
        TaskSpec("t1", "regression"),
        TaskSpec("t2", "regression"),
    )


def recsys(
    n: int = 4096,
    num_users: int = 200,
    num_items: int = 300,
    num_genres: int = 8,
    dim: int = 8,
    seed: int = 0,
) -> tuple[
    dict[str, np.ndarray], dict[str, np.ndarray], tuple[FeatureSpec, ...], tuple[TaskSpec, ...]
]:
    """Users × items with latent factors: tasks ``click`` and ``like`` (related binary) and ``rating``.

    score = uᵀv + user bias + item bias; rating = clip(3 + score, 1, 5) + noise;
    click = [score + ε₁ > 0]; like = [score + ε₂ > 0.5]. Side features: user age bucket, item genres.
    """
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((num_users, dim)) / np.sqrt(dim)
    V = rng.standard_normal((num_items, dim)) / np.sqrt(dim)
    bu, bi = 0.3 * rng.standard_normal(num_users), 0.3 * rng.standard_normal(num_items)
    age = rng.integers(0, 7, num_users)
    genres = (rng.random((num_items, num_genres)) < 0.25).astype(np.float32)
    u = rng.integers(0, num_users, n)
    i = rng.integers(0, num_items, n)
    score = (U[u] * V[i]).sum(-1) * 2.0 + bu[u] + bi[i]
    features = {
        "user_id": u.astype(np.int32),
        "item_id": i.astype(np.int32),
        "age": age[u].astype(np.int32),
        "genres": genres[i],
    }
    labels = {
        "click": (score + 0.5 * rng.standard_normal(n) > 0).astype(np.float32),
        "like": (score + 0.5 * rng.standard_normal(n) > 0.5).astype(np.float32),
        "rating": np.clip(3.0 + score + 0.3 * rng.standard_normal(n), 1.0, 5.0).astype(np.float32),
    }
    fspecs = (
        FeatureSpec("user_id", "categorical", num_users, 16),
        FeatureSpec("item_id", "categorical", num_items, 16),
        FeatureSpec("age", "categorical", 7, 4),
        FeatureSpec("genres", "multihot", num_genres, 4),
    )
    tspecs = (
        TaskSpec("click", "binary"),
        TaskSpec("like", "binary"),
        TaskSpec("rating", "regression"),
    )
    return features, labels, fspecs, tspecs
