"""Evaluation metrics: pure, jit-able functions of arrays (jax or numpy).

Every metric is called ``f(y_true, y_prob)`` (probabilities, not logits; ``f(y_true, y_pred)``
for regression) and takes an optional ``mask=`` of per-example 0/1 weights, shape [B] or the
shape of ``y_true``; masked-out rows are ignored entirely. Binary metrics also accept
multilabel arrays [B, C]: they are flattened, i.e. micro-averaged over labels.

Binary labels are binarised as ``y_true > 0.5``; a prediction is positive when
``y_prob >= threshold``.

0/0 conventions (a metric whose denominator is zero returns a defined value, never NaN):
  accuracy, precision, recall, f1, top_k_accuracy, rmse, mae, log_loss -> 0.0
  (like sklearn's ``zero_division=0``; e.g. precision with no positive predictions = 0.0,
  recall with no positive labels = 0.0, any metric with every row masked out = 0.0);
  auc with no positive or no negative (unmasked) examples -> 0.5 (chance).

Input checks raise ValueError naming the argument; value checks (probabilities in [0, 1],
class ids in range) only run on concrete inputs, not under ``jax.jit`` tracing.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtl.spec import TASK_KINDS, unknown

EPS = 1e-7

HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "auc": True,
    "top5_accuracy": True,
    "log_loss": False,
    "rmse": False,
    "mae": False,
}

Array = jax.Array


# ----------------------------------------------------------------------------- helpers


def _is_concrete(x) -> bool:
    """True unless ``x`` is a jax tracer (inside jit/grad/vmap), so its values can be read."""
    return not isinstance(x, jax.core.Tracer)


def _div(num: Array, den: Array) -> Array:
    """num / den, or 0.0 where den == 0."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _weights(mask, shape: tuple[int, ...]) -> Array:
    """Mask as float32 weights broadcast to ``shape`` (mask may be [B] for [B, C] targets)."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    w = jnp.asarray(mask, jnp.float32)
    if w.shape == shape:
        return w
    if len(shape) == 2 and w.shape == shape[:1]:
        return jnp.broadcast_to(w[:, None], shape)
    raise ValueError(
        f"mask: shape {w.shape} does not match y_true shape {shape}; "
        f"pass per-example 0/1 weights of shape {shape[:1]} (or {shape})"
    )


def _prep(y_true, y_prob, mask, *, pred_name: str = "y_prob", probs: bool = True):
    """Validate and cast (y_true, y_prob, mask) to float32 arrays of one shape."""
    t = jnp.asarray(y_true, jnp.float32)
    p = jnp.asarray(y_prob, jnp.float32)
    if t.shape != p.shape:
        raise ValueError(
            f"{pred_name}: shape {p.shape} does not match y_true shape {t.shape}; "
            f"pass arrays of the same shape ([B] for binary, [B, C] for multilabel)"
        )
    if probs and _is_concrete(y_prob) and p.size:
        v = np.asarray(p)
        if not np.all((v >= 0.0) & (v <= 1.0)):
            raise ValueError(
                f"{pred_name}: values must be probabilities in [0, 1], got min={np.nanmin(v)}, "
                f"max={np.nanmax(v)} (NaN: {bool(np.isnan(v).any())}); "
                f"pass probabilities, e.g. jax.nn.sigmoid(logits), not logits"
            )
    return t, p, _weights(mask, t.shape)


def _wsum(w: Array, x: Array) -> Array:
    """Σ w·x over the rows with w > 0: a masked-out row adds nothing, even a NaN (0·NaN = NaN)."""
    return jnp.sum(jnp.where(w > 0, w * x, 0.0))


def _counts(t: Array, p: Array, w: Array, threshold, axis=None):
    """Weighted (tp, fp, fn, tn) of labels t > 0.5 against predictions p >= threshold."""
    pos = t > 0.5
    hit = p >= threshold
    tp = jnp.sum(w * (pos & hit), axis=axis)
    fp = jnp.sum(w * (~pos & hit), axis=axis)
    fn = jnp.sum(w * (pos & ~hit), axis=axis)
    tn = jnp.sum(w * (~pos & ~hit), axis=axis)
    return tp, fp, fn, tn


def _f1(tp: Array, fp: Array, fn: Array) -> Array:
    return _div(2.0 * tp, 2.0 * tp + fp + fn)


def _auc(t: Array, p: Array, w: Array) -> Array:
    """Weighted Mann–Whitney AUC, ties 1/2, via one sort and two binary searches: O(n log n)."""
    t, p, w = t.reshape(-1), p.reshape(-1), w.reshape(-1)
    pos = (t > 0.5).astype(jnp.float32)
    w_pos, w_neg = w * pos, w * (1.0 - pos)
    order = jnp.argsort(p)
    p_sorted = p[order]
    cum_neg = jnp.concatenate([jnp.zeros(1, jnp.float32), jnp.cumsum(w_neg[order])])
    lo = jnp.searchsorted(p_sorted, p, side="left")
    hi = jnp.searchsorted(p_sorted, p, side="right")
    neg_below = cum_neg[lo]
    neg_tied = cum_neg[hi] - cum_neg[lo]
    num = jnp.sum(w_pos * (neg_below + 0.5 * neg_tied))
    den = jnp.sum(w_pos) * jnp.sum(w_neg)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.5)


def _log_loss(t: Array, p: Array, w: Array, eps: float = EPS) -> Array:
    # clip p and 1 − p separately: in float32, 1 − (1 − eps) is not eps.
    log_p = jnp.log(jnp.clip(p, eps, 1.0 - eps))
    log_q = jnp.log(jnp.clip(1.0 - p, eps, 1.0 - eps))
    ll = t * log_p + (1.0 - t) * log_q
    return _div(-_wsum(w, ll), jnp.sum(w))


def _top_k(y_true, scores, k: int, mask, *, scores_name: str = "scores") -> Array:
    if _is_concrete(k) and k < 1:
        raise ValueError(f"k: {k} must be >= 1; pass k=1 for top-1 accuracy")
    y = jnp.asarray(y_true)
    s_BxC = jnp.asarray(scores, jnp.float32)
    if s_BxC.ndim < 1 or y.shape != s_BxC.shape[:-1]:
        raise ValueError(
            f"{scores_name}: shape {s_BxC.shape} does not match y_true shape {y.shape}; "
            f"pass integer labels [B] and scores [B, num_classes]"
        )
    n_classes = s_BxC.shape[-1]
    if _is_concrete(y_true) and y.size:
        v = np.asarray(y)
        if not (np.all(v == np.round(v)) and v.min() >= 0 and v.max() < n_classes):
            raise ValueError(
                f"y_true: class ids must be integers in [0, {n_classes}), got min={v.min()}, "
                f"max={v.max()}; pass integer labels, not one-hot or probabilities"
            )
    w = _weights(mask, y.shape)
    y_int = y.astype(jnp.int32)[..., None]
    true_score = jnp.take_along_axis(s_BxC, y_int, axis=-1)
    # The true class's rank with ties broken by class index (a lower index ranks first), as
    # argmax does: equal scores for every class are no longer a hit for every row.
    earlier = jnp.arange(n_classes) < y_int
    ahead = (s_BxC > true_score) | ((s_BxC == true_score) & earlier)
    return _div(jnp.sum(w * (jnp.sum(ahead, axis=-1) < k)), jnp.sum(w))


# ----------------------------------------------------------------------------- binary


def accuracy(y_true, y_prob, *, threshold: float = 0.5, mask=None) -> Array:
    """(tp + tn) / n over unmasked entries; 0.0 if none."""
    tp, fp, fn, tn = _counts(*_prep(y_true, y_prob, mask), threshold)
    return _div(tp + tn, tp + fp + fn + tn)


def precision(y_true, y_prob, *, threshold: float = 0.5, mask=None) -> Array:
    """tp / (tp + fp); 0.0 when nothing is predicted positive."""
    tp, fp, _, _ = _counts(*_prep(y_true, y_prob, mask), threshold)
    return _div(tp, tp + fp)


def recall(y_true, y_prob, *, threshold: float = 0.5, mask=None) -> Array:
    """tp / (tp + fn); 0.0 when there are no positive labels."""
    tp, _, fn, _ = _counts(*_prep(y_true, y_prob, mask), threshold)
    return _div(tp, tp + fn)


def f1(y_true, y_prob, *, threshold: float = 0.5, mask=None) -> Array:
    """2·tp / (2·tp + fp + fn) (= harmonic mean of precision and recall); 0.0 when tp+fp+fn = 0."""
    tp, fp, fn, _ = _counts(*_prep(y_true, y_prob, mask), threshold)
    return _f1(tp, fp, fn)


def auc(y_true, y_prob, *, mask=None) -> Array:
    """ROC-AUC = P(s_pos > s_neg) + ½·P(s_pos = s_neg) (Mann–Whitney); 0.5 if a class is absent."""
    return _auc(*_prep(y_true, y_prob, mask))


def log_loss(y_true, y_prob, *, mask=None, eps: float = EPS) -> Array:
    """−mean(y·log p + (1−y)·log(1−p)), p clipped to [eps, 1−eps]; 0.0 if every row is masked."""
    return _log_loss(*_prep(y_true, y_prob, mask), eps)


# ----------------------------------------------------------------------------- regression


def rmse(y_true, y_pred, *, mask=None) -> Array:
    """sqrt(mean((y − ŷ)²)); 0.0 if every row is masked."""
    t, p, w = _prep(y_true, y_pred, mask, pred_name="y_pred", probs=False)
    return jnp.sqrt(_div(_wsum(w, (t - p) ** 2), jnp.sum(w)))


def mae(y_true, y_pred, *, mask=None) -> Array:
    """mean(|y − ŷ|); 0.0 if every row is masked."""
    t, p, w = _prep(y_true, y_pred, mask, pred_name="y_pred", probs=False)
    return _div(_wsum(w, jnp.abs(t - p)), jnp.sum(w))


# ----------------------------------------------------------------------------- multiclass / label


def top_k_accuracy(y_true, scores, k: int = 1, *, mask=None) -> Array:
    """Share of rows whose true class is among the k highest scores; 0.0 if all masked.

    Ties are broken by class index, a lower index first (as ``argmax`` does for k = 1): the rank
    of the true class y is #{c : s_c > s_y} + #{c < y : s_c = s_y}.
    """
    return _top_k(y_true, scores, k, mask)


def multilabel_f1(
    y_true, y_prob, average: str = "micro", *, threshold: float = 0.5, mask=None
) -> Array:
    """micro: F1 of counts pooled over labels; macro: mean over labels of per-label F1 (0/0 → 0)."""
    if average not in ("micro", "macro"):
        raise unknown("average", average, ("micro", "macro"))
    t, p, w = _prep(y_true, y_prob, mask)
    if t.ndim != 2:
        raise ValueError(
            f"y_true: multilabel_f1 needs [B, C] arrays, got shape {t.shape}; "
            f"use f1() for binary [B] arrays"
        )
    axis = None if average == "micro" else 0
    tp, fp, fn, _ = _counts(t, p, w, threshold, axis=axis)
    return jnp.mean(_f1(tp, fp, fn))


# ----------------------------------------------------------------------------- per task kind


def task_metrics(kind: str, y_true, pred, mask=None) -> dict[str, Array]:
    """Standard metrics for ``kind`` from RAW outputs (logits; values for regression)."""
    if kind == "retrieval":
        raise ValueError(
            "kind: 'retrieval' metrics are not computed by mtl.metrics.task_metrics "
            "(they need the in-batch [B, B] scores); compute them with the retrieval evaluator"
        )
    if kind not in TASK_KINDS:
        raise unknown("kind", kind, [k for k in TASK_KINDS if k != "retrieval"])
    if kind == "regression":
        t, p, w = _prep(y_true, pred, mask, pred_name="pred", probs=False)
        return {
            "rmse": jnp.sqrt(_div(_wsum(w, (t - p) ** 2), jnp.sum(w))),
            "mae": _div(_wsum(w, jnp.abs(t - p)), jnp.sum(w)),
        }
    if kind == "multiclass":
        # Ranking by logits equals ranking by softmax probabilities (softmax is monotone) and
        # avoids float ties from underflow, so top-k is computed on the logits directly.
        out = {"accuracy": _top_k(y_true, pred, 1, mask, scores_name="pred")}
        if jnp.shape(pred)[-1] >= 5:
            out["top5_accuracy"] = _top_k(y_true, pred, 5, mask, scores_name="pred")
        return out
    # binary / multilabel: sigmoid, then metrics micro-averaged over labels. AUC ranks the logits
    # (the same order as the sigmoid's): in float32 the sigmoid is exactly 1.0 for logits above
    # ~17, which would tie confident predictions that the logits still tell apart.
    t, logit, w = _prep(y_true, pred, mask, pred_name="pred", probs=False)
    p = jax.nn.sigmoid(logit)
    tp, fp, fn, tn = _counts(t, p, w, 0.5)
    out = {
        "accuracy": _div(tp + tn, tp + fp + fn + tn),
        "precision": _div(tp, tp + fp),
        "recall": _div(tp, tp + fn),
        "f1": _f1(tp, fp, fn),
        "auc": _auc(t, logit, w),
    }
    if kind == "binary":
        out["log_loss"] = _log_loss(t, p, w)
    return out


# ----------------------------------------------------------------------------- across tasks


def average(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{metric: mean over the tasks that report it} (e.g. average accuracy / recall / F1)."""
    sums: dict[str, list[float]] = {}
    for metrics in per_task.values():
        for name, value in metrics.items():
            sums.setdefault(name, []).append(float(value))
    return {name: sum(vals) / len(vals) for name, vals in sums.items()}


def delta_m(
    mtl: Mapping[str, Mapping[str, float]],
    stl: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, bool] = HIGHER_IS_BETTER,
    by_task: bool = False,
) -> float:
    """Δm% = mean over (task, metric) of s·(M_mtl − M_stl)/M_stl·100, s = +1 if higher is better
    else −1 (Maninis et al. 2019; over all metrics, as Nash-MTL, CAGrad and FAMO report it).
    ``by_task=True``: the mean within each task first, then over tasks (LibMTL's Δp), so a task
    with more metrics does not weigh more. Every pair in ``mtl`` must be in ``stl``; extra stl
    pairs are ignored."""
    terms: list[float] = []  # one per (task, metric)
    task_means: list[float] = []  # one per task with metrics
    for task, metrics in mtl.items():
        if task not in stl:
            raise ValueError(
                f"stl: task {task!r} is missing; stl has tasks {list(stl)} "
                f"(give the single-task baseline for every task in mtl)"
            )
        own = []
        for name, value in metrics.items():
            if name not in stl[task]:
                raise ValueError(
                    f"stl[{task!r}]: metric {name!r} is missing; it has {list(stl[task])} "
                    f"(give the single-task baseline for every metric in mtl[{task!r}])"
                )
            if name not in higher_is_better:
                raise ValueError(
                    f"higher_is_better: no entry for metric {name!r}; pass "
                    f"higher_is_better={{**HIGHER_IS_BETTER, {name!r}: True}} (or False if "
                    f"lower is better)"
                )
            base = float(stl[task][name])
            if base == 0.0:
                raise ValueError(
                    f"stl[{task!r}][{name!r}]: baseline is 0, so the relative change is "
                    f"undefined; drop this metric from mtl or use a nonzero baseline"
                )
            sign = 1.0 if higher_is_better[name] else -1.0
            own.append(sign * (float(value) - base) / base * 100.0)
        terms += own
        if own:
            task_means.append(sum(own) / len(own))
    if not terms:
        raise ValueError("mtl: no (task, metric) pairs given; pass at least one metric")
    return sum(task_means) / len(task_means) if by_task else sum(terms) / len(terms)
