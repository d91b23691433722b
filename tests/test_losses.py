"""Losses and objectives against independent numpy formulas and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl import losses

rng = np.random.default_rng(0)


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_bce(z, y):
    p = np_sigmoid(z.astype(np.float64))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def masked_mean(l, m):
    return (l * m).sum() / m.sum()


@pytest.mark.parametrize("with_mask", [False, True])
def test_binary_cross_entropy(with_mask):
    z, y = rng.normal(size=64).astype(np.float32) * 3, (rng.random(64) < 0.4).astype(np.float32)
    m = (rng.random(64) < 0.7).astype(np.float32) if with_mask else np.ones(64, np.float32)
    got = losses.binary_cross_entropy(z, y, m if with_mask else None)
    np.testing.assert_allclose(got, masked_mean(np_bce(z, y), m), rtol=1e-5)


def test_sigmoid_cross_entropy_value_and_gradients_at_extreme_logits():
    """Value, d/dz = σ(z) − y and d/dy = −z against float64 numpy, including |z| up to 200."""
    z = np.concatenate([rng.normal(size=40) * 4, [-200.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0]])
    y = rng.random(z.size)  # soft labels too
    z32, y32 = z.astype(np.float32), y.astype(np.float32)
    zz, yy = z32.astype(np.float64), y32.astype(np.float64)
    ref = np.maximum(zz, 0) - zz * yy + np.log1p(np.exp(-np.abs(zz)))
    got = losses.sigmoid_cross_entropy(z32, y32)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    mid = np.abs(zz) < 30
    np.testing.assert_allclose(np.asarray(got)[mid], np_bce(zz[mid], yy[mid]), rtol=1e-5, atol=1e-6)
    gz, gy = jax.grad(lambda a, b: jnp.sum(losses.sigmoid_cross_entropy(a, b)), (0, 1))(z32, y32)
    np.testing.assert_allclose(gz, np_sigmoid(zz) - yy, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gy, -zz, rtol=1e-6)
    assert np.isfinite(np.asarray(gz)).all()
    # forward mode agrees with reverse mode
    t = rng.normal(size=z.size).astype(np.float32)
    _, jvp = jax.jvp(lambda a: losses.sigmoid_cross_entropy(a, y32), (z32,), (t,))
    np.testing.assert_allclose(jvp, (np_sigmoid(zz) - yy) * t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_mean_squared_error(with_mask):
    p, y = rng.normal(size=50).astype(np.float32), rng.normal(size=50).astype(np.float32)
    m = (rng.random(50) < 0.5).astype(np.float32) if with_mask else np.ones(50, np.float32)
    got = losses.mean_squared_error(p, y, m if with_mask else None)
    np.testing.assert_allclose(got, masked_mean((p - y) ** 2, m), rtol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_softmax_cross_entropy(with_mask):
    z, y = rng.normal(size=(40, 5)).astype(np.float32), rng.integers(0, 5, 40)
    m = (rng.random(40) < 0.5).astype(np.float32) if with_mask else np.ones(40, np.float32)
    zz = z.astype(np.float64)
    logp = zz - np.log(np.exp(zz).sum(1, keepdims=True))
    ref = masked_mean(-logp[np.arange(40), y], m)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(z, y, m if with_mask else None), ref, rtol=1e-5
    )


def test_multilabel_cross_entropy_with_mask():
    z, y = (
        rng.normal(size=(30, 7)).astype(np.float32),
        (rng.random((30, 7)) < 0.3).astype(np.float32),
    )
    m = (rng.random(30) < 0.6).astype(np.float32)
    ref = masked_mean(np_bce(z, y).mean(1), m)
    np.testing.assert_allclose(losses.multilabel_cross_entropy(z, y, m), ref, rtol=1e-5)


def test_in_batch_softmax_masks_padding_as_negatives():
    s = rng.normal(size=(6, 6)).astype(np.float32)
    m = np.array([1, 1, 1, 1, 0, 0], np.float32)
    ss = s[:4, :4].astype(np.float64)
    ref = np.mean(-(np.diag(ss) - np.log(np.exp(ss).sum(1))))
    np.testing.assert_allclose(losses.in_batch_softmax(s, None, m), ref, rtol=1e-5)
    # float16 logits: the padding fill must not become -inf (a padded row gave inf x 0 = NaN)
    half = losses.in_batch_softmax(jnp.asarray(s, jnp.float16), None, m)
    np.testing.assert_allclose(half, ref, rtol=2e-3)


def test_all_masked_is_zero_not_nan():
    got = losses.binary_cross_entropy(jnp.ones(4), jnp.ones(4), jnp.zeros(4))
    assert float(got) == 0.0


def test_weighted_sum_mapping_and_arrays():
    L = {"a": jnp.asarray(2.0), "b": jnp.asarray(3.0)}
    assert float(losses.weighted_sum(L, {"a": 0.5, "b": 2.0})) == pytest.approx(0.5 * 2 + 2 * 3)
    l, w = rng.random(4), rng.random(4)
    np.testing.assert_allclose(losses.weighted_sum(l, w), (l * w).sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="weights: keys"):
        losses.weighted_sum(L, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="weights: shape"):
        losses.weighted_sum(jnp.ones(3), jnp.ones(2))


def test_l2_to_mean_value_and_gradient_closed_form():
    tree = {"w": rng.normal(size=(3, 4, 2)), "b": rng.normal(size=(3, 5))}
    ref = sum(((x - x.mean(0, keepdims=True)) ** 2).sum() for x in tree.values())
    np.testing.assert_allclose(losses.l2_to_mean(tree), ref, rtol=1e-5)
    g = jax.grad(losses.l2_to_mean)(jax.tree.map(jnp.asarray, tree))
    for k, x in tree.items():  # ∂/∂θ_i Σ_j ||θ_j − θ̄||² = 2(θ_i − θ̄)
        np.testing.assert_allclose(g[k], 2 * (x - x.mean(0, keepdims=True)), rtol=1e-5, atol=1e-6)


def test_soft_sharing_objective():
    tree = {"w": rng.normal(size=(2, 3))}
    L = {"a": jnp.asarray(1.5), "b": jnp.asarray(0.5)}
    ref = 2.0 + 0.1 * ((tree["w"] - tree["w"].mean(0)) ** 2).sum()
    np.testing.assert_allclose(losses.soft_sharing(L, tree, 0.1), ref, rtol=1e-5)


def test_task_loss_unknown_kind():
    with pytest.raises(ValueError, match="task kind: unknown value 'binry'.*did you mean 'binary'"):
        losses.task_loss("binry", jnp.ones(2), jnp.ones(2))
