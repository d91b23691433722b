"""mtl.metrics against independent numpy references (brute force, confusion counts, formulas)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl import metrics as M

# ----------------------------------------------------------------------------- numpy references


def ref_counts(y, p, thr=0.5):
    pos, hit = y > 0.5, p >= thr
    return (
        int(np.sum(pos & hit)),
        int(np.sum(~pos & hit)),
        int(np.sum(pos & ~hit)),
        int(np.sum(~pos & ~hit)),
    )


def ref_binary(y, p, thr=0.5):
    tp, fp, fn, tn = ref_counts(y, p, thr)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"accuracy": (tp + tn) / len(y), "precision": prec, "recall": rec, "f1": f1}


def ref_auc(y, p):
    """Brute force over every (positive, negative) pair, ties count 1/2."""
    pos, neg = p[y > 0.5], p[y <= 0.5]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


def ref_log_loss(y, p, eps=1e-7):
    p = np.clip(p.astype(np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, 2, n).astype(np.float32)
    # probabilities on a coarse grid: many ties, both within and across classes, and exact 0.5s
    p = (rng.integers(0, 11, n) / 10).astype(np.float32)
    p[y == 1] = np.minimum(1.0, p[y == 1] + 0.2)  # informative, so AUC is away from 0.5
    mask = (rng.random(n) < 0.7).astype(np.float32)
    return y, p, mask


BINARY = {"accuracy": M.accuracy, "precision": M.precision, "recall": M.recall, "f1": M.f1}


# ----------------------------------------------------------------------------- binary


@pytest.mark.parametrize("masked", [False, True])
def test_binary_metrics_match_confusion_counts(data, masked):
    y, p, mask = data
    keep = mask > 0 if masked else np.ones_like(y, bool)
    expect = ref_binary(y[keep], p[keep])
    assert len(np.unique(p)) < len(p) and np.any(p == 0.5)  # ties and threshold hits present
    for name, fn in BINARY.items():
        got = fn(y, p, mask=mask if masked else None)
        np.testing.assert_allclose(float(got), expect[name], rtol=1e-6, err_msg=name)


def test_threshold_keyword(data):
    y, p, _ = data
    expect = ref_binary(y, p, thr=0.75)
    for name, fn in BINARY.items():
        np.testing.assert_allclose(float(fn(y, p, threshold=0.75)), expect[name], rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_auc_matches_pairwise_brute_force_with_ties(data, masked):
    y, p, mask = data
    keep = mask > 0 if masked else np.ones_like(y, bool)
    expect = ref_auc(y[keep], p[keep])
    got = M.auc(y, p, mask=mask if masked else None)
    np.testing.assert_allclose(float(got), expect, rtol=1e-6)
    assert 0.6 < expect < 0.95


def test_auc_under_jit_with_mask(data):
    y, p, mask = data
    got = jax.jit(lambda a, b, m: M.auc(a, b, mask=m))(jnp.asarray(y), jnp.asarray(p), mask)
    np.testing.assert_allclose(float(got), ref_auc(y[mask > 0], p[mask > 0]), rtol=1e-6)


def test_auc_continuous_scores_and_all_tied():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200).astype(np.float32)
    p = rng.random(200).astype(np.float32)
    np.testing.assert_allclose(float(M.auc(y, p)), ref_auc(y, p), rtol=1e-6)
    assert float(M.auc(y, np.full(200, 0.3, np.float32))) == 0.5  # every pair tied


@pytest.mark.parametrize("masked", [False, True])
def test_log_loss_matches_numpy(data, masked):
    y, p, mask = data  # p contains exact 0 and 1: the eps clip matters
    keep = mask > 0 if masked else np.ones_like(y, bool)
    got = M.log_loss(y, p, mask=mask if masked else None)
    np.testing.assert_allclose(float(got), ref_log_loss(y[keep], p[keep]), rtol=1e-4)


def test_zero_division_conventions():
    y = np.array([0.0, 0.0, 1.0, 1.0])
    none_predicted = np.array([0.1, 0.2, 0.3, 0.4])
    assert float(M.precision(y, none_predicted)) == 0.0
    assert float(M.f1(y, none_predicted)) == 0.0
    no_pos = np.zeros(4)
    assert float(M.recall(no_pos, np.array([0.9, 0.1, 0.2, 0.3]))) == 0.0
    assert float(M.auc(no_pos, np.array([0.9, 0.1, 0.2, 0.3]))) == 0.5
    all_out = np.zeros(4)
    for fn in [*BINARY.values(), M.log_loss, M.rmse, M.mae]:
        assert float(fn(y, none_predicted, mask=all_out)) == 0.0
    assert float(M.auc(y, none_predicted, mask=all_out)) == 0.5
    assert float(M.top_k_accuracy(np.array([0, 1]), np.eye(2), mask=np.zeros(2))) == 0.0


# ----------------------------------------------------------------------------- regression


@pytest.mark.parametrize("masked", [False, True])
def test_rmse_mae_match_numpy(masked):
    rng = np.random.default_rng(2)
    y, yhat = rng.normal(size=50), rng.normal(size=50) * 3
    mask = (rng.random(50) < 0.5).astype(np.float32)
    keep = mask > 0 if masked else np.ones(50, bool)
    m = mask if masked else None
    d = y[keep] - yhat[keep]
    np.testing.assert_allclose(float(M.rmse(y, yhat, mask=m)), np.sqrt(np.mean(d**2)), rtol=1e-5)
    np.testing.assert_allclose(float(M.mae(y, yhat, mask=m)), np.mean(np.abs(d)), rtol=1e-5)


def test_a_nan_in_a_masked_out_row_is_ignored():
    """NaN marks a missing label in many data sets: under mask 0 it must not reach the metric
    (0·NaN = NaN made RMSE, MAE and log loss NaN). Reference: numpy on the kept rows."""
    rng = np.random.default_rng(4)
    y, yhat = rng.normal(size=40), rng.normal(size=40)
    yb, p = (rng.random(40) < 0.5).astype(np.float64), rng.uniform(0.05, 0.95, 40)
    mask = np.ones(40, np.float32)
    mask[[3, 17]] = 0.0
    y[3], yhat[17], yb[3] = np.nan, np.inf, np.nan
    keep = mask > 0
    d = y[keep] - yhat[keep]
    np.testing.assert_allclose(float(M.rmse(y, yhat, mask=mask)), np.sqrt(np.mean(d**2)), rtol=1e-5)
    np.testing.assert_allclose(float(M.mae(y, yhat, mask=mask)), np.mean(np.abs(d)), rtol=1e-5)
    ll = -np.mean(yb[keep] * np.log(p[keep]) + (1 - yb[keep]) * np.log(1 - p[keep]))
    np.testing.assert_allclose(float(M.log_loss(yb, p, mask=mask)), ll, rtol=1e-5)
    out = M.task_metrics("regression", y, yhat, mask=mask)
    np.testing.assert_allclose(float(out["rmse"]), np.sqrt(np.mean(d**2)), rtol=1e-5)
    logit = np.log(p / (1 - p))
    out = M.task_metrics("binary", yb, logit, mask=mask)
    np.testing.assert_allclose(float(out["log_loss"]), ll, rtol=1e-4)


# ----------------------------------------------------------------------------- multiclass


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_accuracy_matches_argsort(k):
    rng = np.random.default_rng(3)
    s = rng.normal(size=(64, 7)).astype(np.float32)
    y = rng.integers(0, 7, 64)
    mask = (rng.random(64) < 0.6).astype(np.float32)
    top = np.argsort(-s, axis=1)[:, :k]
    hit = np.array([y[i] in top[i] for i in range(64)])
    np.testing.assert_allclose(float(M.top_k_accuracy(y, s, k=k)), hit.mean(), rtol=1e-6)
    got = M.top_k_accuracy(y, s, k=k, mask=mask)
    np.testing.assert_allclose(float(got), hit[mask > 0].mean(), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_ties_broken_by_class_index(k):
    # integer scores from {0, 1, 2} over 7 classes: nearly every row has ties at the true class
    rng = np.random.default_rng(4)
    s = rng.integers(0, 3, size=(200, 7)).astype(np.float32)
    s[:10] = 0.0  # rows where every class ties: a hit only when y < k
    y = rng.integers(0, 7, 200)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # stable: a lower index first on ties
    hit = np.array([y[i] in top[i] for i in range(200)])
    assert 0.0 < hit.mean() < 1.0
    np.testing.assert_allclose(float(M.top_k_accuracy(y, s, k=k)), hit.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(M.top_k_accuracy(y[:10], s[:10], k=k)), np.mean(y[:10] < k))
    if k == 1:  # the same as argmax, which returns the first of tied maxima
        np.testing.assert_allclose(float(M.top_k_accuracy(y, s)), np.mean(s.argmax(1) == y))


# ----------------------------------------------------------------------------- multilabel


@pytest.fixture(scope="module")
def multilabel():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (40, 4)).astype(np.float32)
    p = (rng.integers(0, 11, (40, 4)) / 10).astype(np.float32)
    y[:, 3] = 0.0  # a label with no positives and ...
    p[:, 3] = 0.1  # ... no positive predictions: per-label F1 is 0/0 -> 0
    mask = (rng.random(40) < 0.7).astype(np.float32)
    return y, p, mask


@pytest.mark.parametrize("masked", [False, True])
def test_multilabel_flattening_is_micro(multilabel, masked):
    y, p, mask = multilabel
    keep = mask > 0 if masked else np.ones(len(y), bool)
    yf, pf = y[keep].ravel(), p[keep].ravel()
    expect = ref_binary(yf, pf)
    m = mask if masked else None
    for name, fn in BINARY.items():
        np.testing.assert_allclose(float(fn(y, p, mask=m)), expect[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(M.auc(y, p, mask=m)), ref_auc(yf, pf), rtol=1e-6)
    np.testing.assert_allclose(float(M.multilabel_f1(y, p, "micro", mask=m)), expect["f1"])


@pytest.mark.parametrize("masked", [False, True])
def test_multilabel_f1_macro(multilabel, masked):
    y, p, mask = multilabel
    keep = mask > 0 if masked else np.ones(len(y), bool)
    per_label = [ref_binary(y[keep][:, c], p[keep][:, c])["f1"] for c in range(4)]
    assert per_label[3] == 0.0
    got = M.multilabel_f1(y, p, average="macro", mask=mask if masked else None)
    np.testing.assert_allclose(float(got), np.mean(per_label), rtol=1e-6)
    with pytest.raises(ValueError, match="average"):
        M.multilabel_f1(y, p, average="weighted")


# ----------------------------------------------------------------------------- task_metrics


def test_task_metrics_binary_from_logits(data):
    y, p, mask = data
    rng = np.random.default_rng(5)
    logits = rng.normal(size=len(y)).astype(np.float32) * 2 + 1.5 * (y - 0.5)
    keep = mask > 0
    probs = sigmoid(logits.astype(np.float64))[keep]
    expect = ref_binary(y[keep], probs)
    expect["auc"] = ref_auc(y[keep], probs)
    expect["log_loss"] = ref_log_loss(y[keep], probs)
    got = M.task_metrics("binary", y, logits, mask=mask)
    assert set(got) == {"accuracy", "precision", "recall", "f1", "auc", "log_loss"}
    for name, value in expect.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-5, err_msg=name)


def test_task_metrics_auc_ranks_confident_logits():
    # logits above ~17 all give sigmoid == 1.0 in float32; their order still decides the AUC
    rng = np.random.default_rng(7)
    y = (rng.random(300) < 0.4).astype(np.float32)
    logits = (rng.uniform(18.0, 40.0, 300) + 3.0 * y).astype(np.float32)
    assert np.all(sigmoid(logits.astype(np.float32)) == 1.0)
    expect = ref_auc(y, logits.astype(np.float64))
    assert expect > 0.6
    for kind, labels, z in (
        ("binary", y, logits),
        ("multilabel", y[:, None].repeat(2, 1), logits[:, None].repeat(2, 1)),
    ):
        got = M.task_metrics(kind, labels, z)
        np.testing.assert_allclose(float(got["auc"]), expect, rtol=1e-6, err_msg=kind)


def test_task_metrics_other_kinds(multilabel):
    rng = np.random.default_rng(6)
    y, yhat = rng.normal(size=30), rng.normal(size=30)
    got = M.task_metrics("regression", y, yhat)
    np.testing.assert_allclose(float(got["rmse"]), np.sqrt(np.mean((y - yhat) ** 2)), rtol=1e-5)
    np.testing.assert_allclose(float(got["mae"]), np.mean(np.abs(y - yhat)), rtol=1e-5)

    labels = rng.integers(0, 6, 30)
    logits = rng.normal(size=(30, 6)).astype(np.float32)
    got = M.task_metrics("multiclass", labels, logits)
    order = np.argsort(-logits, axis=1)
    np.testing.assert_allclose(float(got["accuracy"]), np.mean(order[:, 0] == labels))
    top5 = np.mean([labels[i] in order[i, :5] for i in range(30)])
    np.testing.assert_allclose(float(got["top5_accuracy"]), top5)
    assert set(M.task_metrics("multiclass", labels % 3, logits[:, :3])) == {"accuracy"}

    ym, pm, mask = multilabel
    logit_m = np.log(np.clip(pm, 1e-3, 1 - 1e-3) / (1 - np.clip(pm, 1e-3, 1 - 1e-3)))
    got = M.task_metrics("multilabel", ym, logit_m, mask=mask)
    keep = mask > 0
    probs = sigmoid(logit_m[keep].astype(np.float64)).ravel()
    expect = ref_binary(ym[keep].ravel(), probs)
    expect["auc"] = ref_auc(ym[keep].ravel(), probs)
    assert set(got) == set(expect)
    for name, value in expect.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-5, err_msg=name)


def test_task_metrics_jit_and_kind_errors():
    y = jnp.array([0.0, 1.0, 1.0, 0.0])
    z = jnp.array([-1.0, 2.0, -0.5, 0.3])
    got = jax.jit(lambda a, b: M.task_metrics("binary", a, b))(y, z)
    np.testing.assert_allclose(float(got["auc"]), 0.75)
    with pytest.raises(ValueError, match="retrieval"):
        M.task_metrics("retrieval", y, z)
    with pytest.raises(ValueError, match="binary"):
        M.task_metrics("binray", y, z)


def test_higher_is_better_covers_every_produced_metric():
    rng = np.random.default_rng(7)
    names = set()
    names |= set(M.task_metrics("binary", np.array([0.0, 1.0]), np.array([0.1, 0.2])))
    names |= set(M.task_metrics("regression", np.zeros(2), np.ones(2)))
    names |= set(M.task_metrics("multiclass", np.array([0, 1]), rng.normal(size=(2, 6))))
    names |= set(M.task_metrics("multilabel", np.zeros((2, 3)), np.zeros((2, 3))))
    assert names == set(M.HIGHER_IS_BETTER)
    assert [n for n, hib in M.HIGHER_IS_BETTER.items() if not hib] == ["log_loss", "rmse", "mae"]


# ----------------------------------------------------------------------------- across tasks


def test_average():
    per_task = {
        "ctr": {"accuracy": 0.8, "f1": 0.5, "auc": 0.7},
        "cvr": {"accuracy": 0.6, "f1": 0.3},
        "watch": {"rmse": 2.0},
    }
    got = M.average(per_task)
    assert got.keys() == {"accuracy", "f1", "auc", "rmse"}
    assert got["accuracy"] == pytest.approx((0.8 + 0.6) / 2)
    assert got["f1"] == pytest.approx((0.5 + 0.3) / 2)
    assert got["auc"] == pytest.approx(0.7)
    assert got["rmse"] == pytest.approx(2.0)


def test_delta_m_hand_computed():
    mtl = {"ctr": {"auc": 0.77, "f1": 0.40}, "watch": {"rmse": 1.7}}
    stl = {"ctr": {"auc": 0.70, "f1": 0.50, "unused": 3.0}, "watch": {"rmse": 2.0}}
    # +10% auc, -20% f1, and rmse went down by 15%, which counts as a +15% improvement
    terms = [(0.77 - 0.70) / 0.70, (0.40 - 0.50) / 0.50, -(1.7 - 2.0) / 2.0]
    expected = 100 * sum(terms) / 3
    assert expected == pytest.approx(5.0 / 3)
    assert M.delta_m(mtl, stl) == pytest.approx(expected, abs=1e-9)
    mtl2 = {"ctr": {"auc": 0.84}, "watch": {"rmse": 2.5}}
    assert M.delta_m(mtl2, stl) == pytest.approx((20.0 - 25.0) / 2)
    assert M.delta_m(mtl2, stl, {"auc": True, "rmse": True}) == pytest.approx((20.0 + 25.0) / 2)
    assert math.isfinite(M.delta_m({"ctr": {"auc": jnp.float32(0.7)}}, stl))


def test_delta_m_by_task_averages_within_each_task_first():
    """LibMTL's Δp: (1/T) Σ_t (1/M_t) Σ_m s·(M − B)/B·100; a task with more metrics does not
    weigh more (the flat mean over all pairs is the default)."""
    mtl = {"like": {"auc": 0.707, "f1": 0.505, "accuracy": 0.606}, "rating": {"rmse": 1.1}}
    stl = {"like": {"auc": 0.70, "f1": 0.50, "accuracy": 0.60}, "rating": {"rmse": 1.0}}
    like = np.array([0.707, 0.505, 0.606]) / np.array([0.70, 0.50, 0.60]) - 1  # +1% each
    rating = -(1.1 - 1.0) / 1.0  # 10% worse
    assert M.delta_m(mtl, stl, by_task=True) == pytest.approx(100 * (like.mean() + rating) / 2)
    assert M.delta_m(mtl, stl) == pytest.approx(100 * (like.sum() + rating) / 4)
    assert M.delta_m(mtl, stl, by_task=True) == pytest.approx(-4.5)


def test_add_delta_m_keeps_the_runs_when_a_baseline_metric_is_zero(capsys):
    from mtl.experiment import add_delta_m

    base = {"model": "single_task", "tasks": {"like": {"auc": 0.7, "precision": 0.0}}}
    other = {
        "model": "mmoe",
        "name": "mmoe-joint",
        "tasks": {"like": {"auc": 0.77, "precision": 0.2}},
    }
    fine = {"model": "mmoe", "tasks": {"like": {"auc": 0.77}}}
    runs = [base, other, fine]
    add_delta_m(runs)
    assert other["delta_m"] is None and "['precision']: baseline is 0" in other["delta_m_error"]
    assert fine["delta_m"] == pytest.approx(10.0)
    assert "Δm% of mmoe-joint: not computed" in capsys.readouterr().err


def test_delta_m_errors():
    stl = {"ctr": {"auc": 0.7, "mrr": 0.2, "mae": 0.0}}
    with pytest.raises(ValueError, match="'cvr'"):
        M.delta_m({"cvr": {"auc": 0.7}}, stl)
    with pytest.raises(ValueError, match="'f1'"):
        M.delta_m({"ctr": {"f1": 0.7}}, stl)
    with pytest.raises(ValueError, match=r"higher_is_better.*'mrr'.*HIGHER_IS_BETTER"):
        M.delta_m({"ctr": {"mrr": 0.3}}, stl)
    with pytest.raises(ValueError, match=r"'ctr'.*'mae'.*0"):
        M.delta_m({"ctr": {"mae": 0.3}}, stl)


# ----------------------------------------------------------------------------- validation


def test_input_errors_name_the_argument():
    y = np.array([0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"y_prob: shape \(2,\).*y_true shape \(3,\)"):
        M.auc(y, np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"y_prob:.*\[0, 1\].*max=2"):
        M.precision(y, np.array([0.1, 2.0, 0.3]))
    with pytest.raises(ValueError, match=r"y_prob:.*\[0, 1\]"):
        M.log_loss(y, jnp.array([-0.5, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"y_pred: shape"):
        M.rmse(y, np.zeros(4))
    with pytest.raises(ValueError, match="mask: shape"):
        M.accuracy(y, y, mask=np.ones(5))
    with pytest.raises(ValueError, match="k: 0"):
        M.top_k_accuracy(np.array([0, 1]), np.eye(2), k=0)
    with pytest.raises(ValueError, match="scores: shape"):
        M.top_k_accuracy(np.array([0, 1, 1]), np.eye(2))
    with pytest.raises(ValueError, match="y_true: class ids"):
        M.top_k_accuracy(np.array([0, 2]), np.eye(2))
    with pytest.raises(ValueError, match="y_true: multilabel_f1 needs"):
        M.multilabel_f1(y, y)


def test_range_check_skipped_under_jit():
    y = jnp.array([0.0, 1.0])
    got = jax.jit(M.recall)(y, jnp.array([-3.0, 3.0]))  # traced: not checked, still computes
    assert float(got) == 1.0
