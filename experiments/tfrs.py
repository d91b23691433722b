"""The TFRS multi-task table on MovieLens-100K: a two-tower model trained on rating + retrieval.

Protocol of the TensorFlow Recommenders "multitask" tutorial: an 80/20 random split of the 100,000
ratings (seed 42; numpy's permutation, so not TensorFlow's exact rows), 32-d user and item
embeddings, a rating head 256-128-1 on [u; v], in-batch softmax retrieval, and two test metrics:
RMSE of the rating head and top-100 accuracy over all 1,682 items (for each test (user, item)
pair: is the item among the user's 100 highest-scoring items). Like TFRS's FactorizedTopK
``top_100_categorical_accuracy``, items the user rated in training are NOT excluded from the
ranking. Top-K is a jit-compiled brute force (``mtl.models.two_tower.top_k``) over batches of test
users.

Rows: the TFRS settings (Adagrad lr 0.1, batch 8192, 3 epochs, ids only) at (rating, retrieval)
weights (1, 0), (0, 1), (1, 1); our settings (Adam lr 1e-3, batch 1024, 24 epochs, dropout 0.3,
side features in both towers, user/item biases and the training mean in the rating head, log-count
correction of the in-batch logits, accidental hits masked) over a sweep of the retrieval weight;
and two baselines computed here: the 100 most-rated training movies (top-100) and global mean +
user bias + item bias with shrinkage 10 (RMSE). Our settings were chosen on a validation split
(``--config.val_fraction=0.1``), never on the test rows.

TFRS details reproduced in the ``tfrs`` rows: its Retrieval task SUMS the softmax cross-entropy
over the batch while the rating MSE is a mean, so retrieval weight λ is applied here as λ·B on our
mean loss (``retrieval_loss="sum"``); the 32-d id lookup is the embedding (no projection layer);
Keras initialisers (embeddings U(−0.05, 0.05), Dense Glorot-uniform). Remaining differences: the
split permutation, items as candidates by id (TFRS uses the 1,664 distinct titles), the padded last
batch (a masked mean times B instead of a sum over its 6,272 rows) and batches reshuffled per epoch.

Launch (full):  python experiments/tfrs.py --config=experiments/tfrs.py
Quick variant:  python experiments/tfrs.py --config=experiments/tfrs.py:quick
Tuning:         --config.val_fraction=0.1 scores on 10% of the training rows instead of the test set
Overrides:      --config.ours.epochs=20 --config.ours.user_features='("user_id",)' --config.workdir=..
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict, config_flags

from mtl.data import movielens, splits
from mtl.data.batching import Dataset
from mtl.experiment import RunDir, cli, plot_curves, public, train_run
from mtl.models import MODELS
from mtl.models.base import head_output
from mtl.models.two_tower import TwoTower, top_k
from mtl.spec import FeatureSpec, TaskSpec

Array = jax.Array
TFRS_REPORTED = {  # the tutorial's test numbers for (rating, retrieval) weights
    (1.0, 0.0): {"top100_accuracy": 0.060, "rmse": 1.113},
    (0.0, 1.0): {"top100_accuracy": 0.233, "rmse": 3.688},
    (1.0, 1.0): {"top100_accuracy": 0.235, "rmse": 1.110},
}
TARGET = {"rmse": 0.91, "top100_accuracy": 0.32}


def _settings(**kw) -> ConfigDict:
    """One family of runs: optimizer, batch, epochs, tower inputs and model options."""
    base = dict(
        weights=((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)),
        optimizer="adagrad",
        learning_rate=0.1,
        batch_size=8192,
        epochs=3,
        user_features=("user_id",),
        item_features=("item_id",),
        tower=(),
        project=False,
        biases=False,
        log_q=False,
        remove_accidental_hits=False,
        temperature=1.0,
        dropout=0.0,
        l2=0.0,
        retrieval_loss="sum",  # TFRS's Retrieval task sums the softmax CE over the batch
        keras_init=True,
    )
    return ConfigDict(base | kw)


def get_config(arg: str | None = None) -> ConfigDict:
    """Full settings; ``arg='quick'`` trains one TFRS and one of our joint models (8 epochs)."""
    c = ConfigDict()
    c.version = "100k"
    c.source = "auto"
    c.split_seed = 42
    c.test_fraction = 0.2
    c.val_fraction = 0.0
    c.title_buckets = 256
    c.embed_dim = 32
    c.rating = (256, 128)
    c.ks = (100, 10)
    c.user_batch = 1024
    c.bias_shrinkage = 10.0
    c.seed = 0
    c.workdir = "runs/tfrs"
    c.progress = True
    c.tfrs = _settings()
    c.ours = _settings(
        weights=(
            (1.0, 0.0),
            (0.0, 1.0),
            (1.0, 0.01),
            (1.0, 0.03),
            (1.0, 0.1),
            (1.0, 0.3),
            (1.0, 1.0),
            (1.0, 3.0),
        ),
        optimizer="adam",
        learning_rate=1e-3,
        batch_size=1024,
        epochs=24,
        user_features=movielens.USER_FEATURES,
        item_features=movielens.ITEM_FEATURES,
        project=True,
        biases=True,
        log_q=True,
        remove_accidental_hits=True,
        dropout=0.3,
        retrieval_loss="mean",
        keras_init=False,
    )
    if arg == "quick":
        c.tfrs.weights = ((1.0, 1.0),)
        c.ours.weights = ((1.0, 1.0),)
        c.ours.epochs = 8
        c.workdir = "runs/tfrs-quick"
    elif arg not in (None, ""):
        raise ValueError(f"config: unknown variant {arg!r}; use 'quick' or nothing")
    return c


class _Identity(nnx.Module):
    """x -> x (the tower output when the id embedding already has the embedding width)."""

    def __call__(self, x: Array) -> Array:
        return x


class BiasedHead(nnx.Module):
    """y = w·h + b + μ + b_user[u] + b_item[i]: a rating head with per-user and per-item biases."""

    def __init__(self, in_dim: int, num_users: int, num_items: int, mean: float, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_dim, 1, rngs=rngs)
        zeros = nnx.initializers.zeros
        self.user_bias = nnx.Embed(num_users, 1, embedding_init=zeros, rngs=rngs)
        self.item_bias = nnx.Embed(num_items, 1, embedding_init=zeros, rngs=rngs)
        self.mean = float(mean)

    def __call__(self, h_BxH: Array, user_B: Array, item_B: Array) -> Array:
        return self.linear(h_BxH) + self.mean + self.user_bias(user_B) + self.item_bias(item_B)


class RatingRetrieval(TwoTower):
    """TwoTower + optional id-only towers, rating biases, log-q correction and hit masking."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tasks: Sequence[TaskSpec],
        *,
        project: bool = True,
        biases: bool = False,
        rating_mean: float = 0.0,
        log_q: Sequence[float] | None = None,
        remove_accidental_hits: bool = False,
        keras_init: bool = False,
        rngs: nnx.Rngs,
        **kwargs,
    ):
        super().__init__(features, tasks, rngs=rngs, **kwargs)
        if keras_init:
            self._keras_init(rngs)
        dims = {f.name: f.dim for f in features}
        for side in (self.user_tower, self.item_tower):
            if not project:
                if side.mlp.out_dim != side.out.out_features:
                    raise ValueError(
                        f"project: False needs tower inputs of width {side.out.out_features} "
                        f"(got {side.mlp.out_dim}); set the id embed_dim or project=True"
                    )
                side.out = _Identity()
        self.biases = bool(biases)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        if (biases or remove_accidental_hits or log_q is not None) and not {
            "user_id",
            "item_id",
        } <= set(dims):
            raise ValueError("features: biases, log_q and hit masking need user_id and item_id")
        self.log_q = None if log_q is None else nnx.Variable(jnp.asarray(log_q, jnp.float32))
        if biases:
            for t in self.tasks:
                if t.kind == "regression":
                    self.heads[t.name] = BiasedHead(
                        self.towers[t.name].out_dim,
                        dims["user_id"],
                        dims["item_id"],
                        rating_mean,
                        rngs=rngs,
                    )

    def _keras_init(self, rngs: nnx.Rngs) -> None:
        """Keras defaults as in TFRS: embeddings U(-0.05, 0.05), Dense kernels Glorot-uniform."""
        uniform = jax.nn.initializers.uniform(0.1)
        glorot = jax.nn.initializers.glorot_uniform()
        for path, var in nnx.iter_graph(self):
            if not isinstance(var, nnx.Param) or not path:
                continue
            if path[-1] == "embedding":
                var[...] = uniform(rngs.params(), var.shape) - 0.05
            elif path[-1] == "kernel":
                var[...] = glorot(rngs.params(), var.shape)

    def represent(
        self, features: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> dict[str, Array]:
        """{"user": u, "item": v} plus the raw ids (for the biases and the in-batch corrections)."""
        rep = super().represent(features, rngs)
        for k in ("user_id", "item_id"):
            if k in features:
                rep[k] = features[k]
        return rep

    def decode(
        self, rep: Mapping[str, Array], rngs: nnx.Rngs | None = None
    ) -> tuple[dict[str, Array], dict]:
        """retrieval: u vᵀ / τ − log q(item) with accidental hits masked; rating with biases."""
        user_BxD, item_BxD = rep["user"], rep["item"]
        s_BxB = user_BxD @ item_BxD.T / self.temperature
        if self.log_q is not None:
            s_BxB = s_BxB - self.log_q[...][rep["item_id"]][None, :]
        if self.remove_accidental_hits:
            ids = rep["item_id"]
            hit = (ids[:, None] == ids[None, :]) & ~jnp.eye(ids.shape[0], dtype=bool)
            s_BxB = jnp.where(hit, -1e9, s_BxB)
        preds = {self.retrieval: s_BxB}
        both_Bx2D = jnp.concatenate([user_BxD, item_BxD], axis=-1)
        for t in self.tasks:
            if t.kind == "retrieval":
                continue
            h = self.towers[t.name](both_Bx2D, rngs)
            head = self.heads[t.name]
            y = head(h, rep["user_id"], rep["item_id"]) if isinstance(head, BiasedHead) else head(h)
            preds[t.name] = head_output(t, y)
        return preds, {}


MODELS.setdefault("rating_retrieval", RatingRetrieval)


# ----------------------------------------------------------------------------- evaluation


def retrieval_accuracy(
    model: RatingRetrieval,
    user_table: Mapping[str, np.ndarray],
    item_table: Mapping[str, np.ndarray],
    user_N: np.ndarray,
    item_N: np.ndarray,
    ks: Sequence[int],
    user_batch: int = 1024,
) -> dict[str, float]:
    """top-k accuracy of (user, item) pairs over all items: brute force per batch of users."""
    item_NxD = model.item_embeddings({k: jnp.asarray(v) for k, v in item_table.items()})
    users = np.unique(user_N)
    kmax = max(ks)
    top_UxK = np.zeros((int(users.max()) + 1, kmax), np.int32)
    for start in range(0, users.size, user_batch):
        ub = users[start : start + user_batch]
        pad = np.concatenate([ub, np.full(user_batch - ub.size, ub[0], ub.dtype)])  # one shape
        u = model.user_embeddings({k: jnp.asarray(v[pad]) for k, v in user_table.items()})
        top_UxK[ub] = np.asarray(top_k(u, item_NxD, kmax)[1])[: ub.size]
    hit_NxK = top_UxK[user_N] == item_N[:, None]
    return {f"top{k}_accuracy": float(hit_NxK[:, :k].any(axis=1).mean()) for k in ks}


def popularity_accuracy(
    train_items: np.ndarray, test_items: np.ndarray, num_items: int, ks: Sequence[int]
) -> dict[str, float]:
    """top-k accuracy of recommending the k most-rated training items to everybody."""
    order = np.argsort(-np.bincount(train_items, minlength=num_items), kind="stable")
    return {f"top{k}_accuracy": float(np.isin(test_items, order[:k]).mean()) for k in ks}


def bias_baseline_rmse(
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    num_users: int,
    num_items: int,
    shrinkage: float,
) -> float:
    """RMSE of μ + b_u + b_i, b_i = Σ(r − μ)/(n_i + λ), then b_u = Σ(r − μ − b_i)/(n_u + λ)."""
    u, i, r = train
    mu = float(r.mean())
    b_i = np.bincount(i, r - mu, num_items) / (np.bincount(i, minlength=num_items) + shrinkage)
    b_u = np.bincount(u, r - mu - b_i[i], num_users) / (
        np.bincount(u, minlength=num_users) + shrinkage
    )
    tu, ti, tr = test
    return float(np.sqrt(np.mean((mu + b_u[tu] + b_i[ti] - tr) ** 2)))


# ----------------------------------------------------------------------------- study


def _with_embed_dim(specs: Sequence[FeatureSpec], dim: int) -> dict[str, FeatureSpec]:
    """The id features embedded at the tower width (TFRS: a 32-d lookup table is the embedding)."""
    return {
        s.name: dataclasses.replace(s, embed_dim=dim) if s.name in ("user_id", "item_id") else s
        for s in specs
    }


def _dataset(
    ml: movielens.MovieLens, names: Sequence[str], c: ConfigDict, train_rows: np.ndarray
) -> Dataset:
    """Ratings with the tasks rating + retrieval and the features ``names`` (ids at embed_dim;
    a timestamp is standardised on ``train_rows``)."""
    data = movielens.movielens_dataset(
        ml,
        ("rating", "retrieval"),
        features=list(names),
        title_buckets=c.title_buckets,
        fit_rows=train_rows,
    )
    specs = _with_embed_dim(data.feature_specs, c.embed_dim)
    return dataclasses.replace(data, feature_specs=tuple(specs[n] for n in names))


def _tables(
    ml: movielens.MovieLens, c: ConfigDict
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-user and per-item feature tables (the query side and the candidate set)."""
    return movielens.user_features(ml)[0], movielens.item_features(ml, c.title_buckets)[0]


def run_family(
    family: str,
    s: ConfigDict,
    c: ConfigDict,
    ml: movielens.MovieLens,
    idx: tuple[np.ndarray, np.ndarray],
    rundir: RunDir,
) -> list[dict]:
    """Train one model per (rating, retrieval) weight pair of ``s`` and score it."""
    users, items = tuple(s.user_features), tuple(s.item_features)
    names = list(dict.fromkeys(("user_id", "item_id", *users, *items)))
    data = _dataset(ml, names, c, idx[0])
    train, test = data.take(idx[0]), data.take(idx[1])
    item_train = ml.item_N[idx[0]]
    counts = np.bincount(item_train, minlength=ml.num_items) + 1.0
    user_table, item_table = _tables(ml, c)
    if s.retrieval_loss not in ("mean", "sum"):
        raise ValueError(f"retrieval_loss: {s.retrieval_loss!r} is not 'mean' or 'sum'")
    # our in-batch softmax is a mean over the batch; TFRS sums it: λ·B on the mean is the same
    scale = float(s.batch_size) if s.retrieval_loss == "sum" else 1.0
    runs = []
    for w_rating, w_retrieval in s.weights:
        name = f"{family}-rating{w_rating:g}-retrieval{w_retrieval:g}"
        print(f"-- {name}")
        spec = {
            "name": name,
            "model": "rating_retrieval",
            "model_kwargs": {
                "user_features": users,
                "item_features": items,
                "embed_dim": c.embed_dim,
                "tower": tuple(s.tower),
                "rating": tuple(c.rating),
                "temperature": s.temperature,
                "dropout": s.dropout,
                "project": s.project,
                "biases": s.biases,
                "rating_mean": float(ml.rating_N[idx[0]].mean()),
                "log_q": np.log(counts / counts.sum()) if s.log_q else None,
                "remove_accidental_hits": s.remove_accidental_hits,
                "keras_init": s.keras_init,
            },
            "schedule": "joint",
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "optimizer": s.optimizer,
            "learning_rate": s.learning_rate,
            "l2": s.l2,
            "weights": {"rating": float(w_rating), "retrieval": float(w_retrieval) * scale},
            "seed": c.seed,
        }
        r = train_run(spec, train, test, rundir=rundir, progress=c.progress)
        model = r["_trainer"].model(r["_state"])
        t0 = time.perf_counter()
        retrieval = retrieval_accuracy(
            model,
            {k: user_table[k] for k in users},
            {k: item_table[k] for k in items},
            ml.user_N[idx[1]],
            ml.item_N[idx[1]],
            tuple(c.ks),
            c.user_batch,
        )
        r["tasks"] = {
            "rating": {"rmse": r["tasks"]["rating"]["rmse"]},
            "retrieval": retrieval,
        }
        r.update(
            family=family,
            weights={"rating": float(w_rating), "retrieval": float(w_retrieval)},
            topk_seconds=time.perf_counter() - t0,
            average={},
            delta_m=None,
        )
        print(
            f"   rmse {r['tasks']['rating']['rmse']:.4f}  "
            + "  ".join(f"{k} {v:.4f}" for k, v in retrieval.items())
            + f"  ({r['train_seconds']:.1f}s)"
        )
        rundir.log({"run": name, "final": r["tasks"], "train_seconds": r["train_seconds"]})
        runs.append(r)
    return runs


def baselines(
    c: ConfigDict, ml: movielens.MovieLens, idx: tuple[np.ndarray, np.ndarray]
) -> list[dict]:
    """The popularity (top-k) and the shrunk-bias (RMSE) baselines as result records."""
    tr, te = idx
    t0 = time.perf_counter()
    pop = popularity_accuracy(ml.item_N[tr], ml.item_N[te], ml.num_items, tuple(c.ks))
    t1 = time.perf_counter()
    cols = lambda ix: (ml.user_N[ix], ml.item_N[ix], ml.rating_N[ix].astype(np.float64))
    rmse = bias_baseline_rmse(cols(tr), cols(te), ml.num_users, ml.num_items, c.bias_shrinkage)
    t2 = time.perf_counter()
    common = dict(
        schedule="none",
        aggregator=None,
        weighting="fixed",
        seed=None,
        average={},
        delta_m=None,
        family="baseline",
    )
    return [
        dict(
            common,
            model="popularity",
            name="popularity (the k most-rated training items)",
            tasks={"retrieval": pop},
            train_seconds=t1 - t0,
            examples_per_second=len(tr) / max(t1 - t0, 1e-9),
        ),
        dict(
            common,
            model="bias",
            name=f"mean+user+item bias (shrinkage {c.bias_shrinkage:g})",
            tasks={"rating": {"rmse": rmse}},
            train_seconds=t2 - t1,
            examples_per_second=len(tr) / max(t2 - t1, 1e-9),
        ),
    ]


def table(runs: Sequence[Mapping], ks: Sequence[int]) -> str:
    """Markdown: one row per run with weights, RMSE, top-k accuracies, time and throughput."""
    head = ["run", "λ rating", "λ retrieval", "RMSE", *[f"top-{k}" for k in ks], "train s", "ex/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        w = r.get("weights") or {}
        rmse = r["tasks"].get("rating", {}).get("rmse")
        ret = r["tasks"].get("retrieval", {})
        cells = [
            r["name"],
            f"{w['rating']:g}" if w else "—",
            f"{w['retrieval']:g}" if w else "—",
            "—" if rmse is None else f"{rmse:.4f}",
            *[
                "—" if f"top{k}_accuracy" not in ret else f"{ret[f'top{k}_accuracy']:.4f}"
                for k in ks
            ],
            f"{r['train_seconds']:.1f}",
            f"{r['examples_per_second']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tradeoff(rundir: RunDir, runs: Sequence[Mapping], filename: str = "tradeoff.png") -> None:
    """Top-100 accuracy against RMSE: our weight sweep, the TFRS rows, baselines and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for family, marker in (("tfrs", "s"), ("ours", "o")):
        pts = [
            (r["tasks"]["rating"]["rmse"], r["tasks"]["retrieval"]["top100_accuracy"], r)
            for r in runs
            if r.get("family") == family and min(r["weights"].values()) > 0
        ]
        pts.sort(key=lambda p: p[2]["weights"]["retrieval"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=family)
            for x, y, r in pts:
                ax.annotate(f"{r['weights']['retrieval']:g}", (x, y), fontsize=7)
    for r in runs:
        if r.get("model") == "popularity":
            y = r["tasks"]["retrieval"]["top100_accuracy"]
            ax.axhline(y, ls="--", c="gray", lw=1, label="popularity top-100")
        if r.get("model") == "bias":
            ax.axvline(r["tasks"]["rating"]["rmse"], ls=":", c="gray", lw=1, label="bias baseline")
    ax.axvline(TARGET["rmse"], c="red", lw=0.8)
    ax.axhline(TARGET["top100_accuracy"], c="red", lw=0.8, label="target (upper left)")
    ax.set_xlabel("test RMSE (lower is better)")
    ax.set_ylabel("top-100 accuracy (higher is better)")
    ax.set_title("joint models; labels: retrieval weight (rating weight 1)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(rundir.path / filename, dpi=120)
    plt.close(fig)


def main(c: ConfigDict) -> int:
    """Baselines, the TFRS rows and our sweep; writes the run directory."""
    t_study = time.perf_counter()
    ml = movielens.load_movielens(c.version, source=c.source)
    sp = splits.random_split(len(ml), c.test_fraction, c.val_fraction, seed=c.split_seed)
    idx = (sp.train, sp.val) if c.val_fraction > 0 else (sp.train, sp.test)
    where = "validation (10% of the training rows)" if c.val_fraction > 0 else "test"
    print(
        f"MovieLens-{c.version}: {len(idx[0]):,} train / {len(idx[1]):,} {where} rows, "
        f"{ml.num_items:,} candidate items"
    )
    rundir = RunDir(c.workdir, c)
    runs = baselines(c, ml, idx)
    for family in ("tfrs", "ours"):
        runs += run_family(family, c[family], c, ml, idx, rundir)
    plot_curves(rundir, [r for r in runs if "history" in r])
    plot_tradeoff(rundir, runs)
    split = f"random (seed {c.split_seed}, test {c.test_fraction}); scored on {where}"
    rundir.write_results(
        f"movielens-{c.version}", split, [public(r) for r in runs], title="TFRS multi-task table"
    )
    md = table(runs, tuple(c.ks))
    ref = "\n".join(
        f"| TFRS tutorial | {a:g} | {b:g} | {v['rmse']:.3f} | {v['top100_accuracy']:.3f} |"
        for (a, b), v in TFRS_REPORTED.items()
    )
    joint = [
        r
        for r in runs
        if r.get("family") == "ours"
        and r["weights"]["rating"] > 0
        and r["weights"]["retrieval"] > 0
    ]
    hits = [
        r["name"]
        for r in joint
        if r["tasks"]["rating"]["rmse"] <= TARGET["rmse"]
        and r["tasks"]["retrieval"]["top100_accuracy"] >= TARGET["top100_accuracy"]
    ]
    verdict = f"target (RMSE <= {TARGET['rmse']}, top-100 >= {TARGET['top100_accuracy']}) " + (
        f"reached by: {', '.join(hits)}" if hits else "not reached by any joint model"
    )
    seconds = time.perf_counter() - t_study
    (rundir.path / "results.md").write_text(
        f"# TFRS multi-task table (MovieLens-{c.version})\n\nsplit: {split}\n\n{md}\n\n"
        "| reference | λ rating | λ retrieval | RMSE | top-100 |\n|---|---|---|---|---|\n"
        f"{ref}\n\n{verdict}\n\nstudy wall time: {seconds:.0f} s\n"
    )
    print(md)
    print(f"\n{verdict}\nstudy wall time: {seconds:.0f} s")
    print(f"run directory: {rundir.path} (results.json, results.md, metrics.jsonl, *.png)")
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", default=__file__)
    cli(main)
