"""Training engine: schedule semantics (what changes, what stays bit-identical), objectives, loss falls."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtl import losses, partition
from mtl.data import synthetic
from mtl.data.batching import Dataset, epoch_batches
from mtl.models import build_model
from mtl.train import Stage, TrainConfig, Trainer, make_schedule

SIZES = dict(trunk=(32,), tower=(16,))


@pytest.fixture(scope="module")
def data():
    f, l, fs, ts = synthetic.recsys(n=512, num_users=50, num_items=60, seed=0)
    return Dataset(f, l, fs, ts)


def batches_of(ds, batch_size=64, seed=0):
    return epoch_batches(ds, batch_size, jax.random.key(seed))


def one_step(b, i):
    return jax.tree.map(lambda x: x[i : i + 1], b)


def leaves_with_paths(tree):
    """{path: host copy} (copies, since the train state's buffers are donated to the step)."""
    return dict(
        zip(partition.paths(tree), [np.array(x) for x in jax.tree.leaves(tree)], strict=True)
    )


def adam_moments(state):
    """({path: mu}, {path: nu}) of the per-leaf Adam states (host copies)."""
    paths, per_leaf = partition.paths(state.params), state.opt_state.leaves
    mu = {k: np.array(s[0].mu) for k, s in zip(paths, per_leaf, strict=True)}
    nu = {k: np.array(s[0].nu) for k, s in zip(paths, per_leaf, strict=True)}
    return mu, nu


def weighted_objective(tr, st, batch, lam=None):
    """params -> Σ_i λ_i L_i (λ_i = 1 when ``lam`` is None) through the plain model forward."""

    def objective(params):
        preds, _ = nnx.merge(tr.graphdef, params, st.rest)(batch["features"])
        return sum(
            (1.0 if lam is None else lam[t.name])
            * losses.task_loss(t.kind, preds[t.name], batch["labels"][t.name], batch["valid"])
            for t in tr.tasks
        )

    return objective


@pytest.mark.parametrize("name", ["shared_bottom", "soft_sharing", "single_task"])
def test_joint_loss_falls(data, name):
    model = build_model(name, data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=1e-2))
    st = tr.init(model)
    b = batches_of(data)
    st, m0 = tr.run(st, b, Stage(1))
    for _ in range(6):
        st, m = tr.run(st, b, Stage(1))
    assert float(m["loss"].mean()) < 0.9 * float(m0["loss"].mean())


def test_joint_step_equals_sgd_on_weighted_sum(data):
    """One SGD step = θ − lr ∇(Σ_i λ_i L_i), the gradient taken independently with jax.grad."""
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    lam = {"click": 0.3, "like": 2.0, "rating": 0.5}
    tr = Trainer(model, TrainConfig(optimizer="sgd", learning_rate=0.1, weights=lam))
    st = tr.init(model)
    b = one_step(batches_of(data), 0)
    batch = jax.tree.map(lambda x: x[0], b)

    g = jax.grad(weighted_objective(tr, st, batch, lam))(st.params)
    ref = jax.tree.map(lambda p, gi: np.asarray(p - 0.1 * gi), st.params, g)
    st2, _ = tr.run(st, b, Stage(1))
    for x, y in zip(jax.tree.leaves(st2.params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_representation_level_mean_step_equals_reference(data):
    """Aggregating on the representation with the mean: one SGD step moves the encoder and trunk by
    lr ∇(1/T Σ λ_i L_i) and the towers and heads by lr ∇(Σ λ_i L_i), both from jax.grad."""
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    lam = {"click": 0.3, "like": 2.0, "rating": 0.5}
    config = TrainConfig(
        optimizer="sgd",
        learning_rate=0.1,
        weights=lam,
        aggregator="mean",
        aggregate_on="representation",
    )
    tr = Trainer(model, config)
    st = tr.init(model)
    b = one_step(batches_of(data), 0)
    batch = jax.tree.map(lambda x: x[0], b)

    g = jax.grad(weighted_objective(tr, st, batch, lam))(st.params)
    T = len(data.task_specs)
    want = {
        path: np.asarray(p)
        - 0.1 * np.asarray(gi) / (1 if path.startswith(("towers", "heads")) else T)
        for path, p, gi in zip(
            partition.paths(st.params), jax.tree.leaves(st.params), jax.tree.leaves(g), strict=True
        )
    }
    st2, _ = tr.run(st, b, Stage(1))
    got = leaves_with_paths(st2.params)
    assert got.keys() == want.keys()
    for path, x in got.items():
        np.testing.assert_allclose(x, want[path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_soft_sharing_step_includes_l2_to_mean_gradient(data):
    """SGD step on soft sharing = θ − lr(∇Σ L_i + λ·2(θ_i − θ̄)) on the stacked columns."""
    model = build_model("soft_sharing", data.feature_specs, data.task_specs, penalty=0.5, **SIZES)
    tr = Trainer(model, TrainConfig(optimizer="sgd", learning_rate=0.05))
    st = tr.init(model)
    b = one_step(batches_of(data), 0)
    batch = jax.tree.map(lambda x: x[0], b)

    g = jax.grad(weighted_objective(tr, st, batch))(st.params)
    cols_before = leaves_with_paths(st.params["columns"])
    st2, _ = tr.run(st, b, Stage(1))
    cols_after = leaves_with_paths(st2.params["columns"])
    g_cols = leaves_with_paths(g["columns"])
    for k, x in cols_before.items():
        x = np.asarray(x)
        closed = 2 * (x - x.mean(0, keepdims=True))
        np.testing.assert_allclose(
            cols_after[k], x - 0.05 * (g_cols[k] + 0.5 * closed), rtol=1e-4, atol=1e-6
        )


def test_alternating_round_robin_touches_only_active_task(data):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=1e-2))
    st = tr.init(model)
    b = batches_of(data)
    names = tr.names
    for step in range(2 * len(names)):
        # warm the moments first so "unchanged" is a real claim about non-zero state
        before_p, (before_mu, before_nu) = leaves_with_paths(st.params), adam_moments(st)
        st, m = tr.run(st, one_step(b, step % 8), Stage(1, alternating=True))
        active = names[step % len(names)]
        assert int(m["task"][0]) == step % len(names)
        after_p, (after_mu, after_nu) = leaves_with_paths(st.params), adam_moments(st)
        for path in before_p:
            owner = partition.owner_of(path, names)
            same = [
                np.array_equal(before_p[path], after_p[path]),
                np.array_equal(before_mu[path], after_mu[path]),
                np.array_equal(before_nu[path], after_nu[path]),
            ]
            if owner in ("shared", active):
                assert not same[0] and not same[1], f"{path} should change on a {active} step"
            else:
                assert all(same), f"{path} (owned by {owner}) changed on a {active} step"


def test_a_group_frozen_for_a_stage_starts_adam_afresh(data):
    """Stage 1 trains the towers and heads for 8 steps, the trunk frozen; stage 2's first step is
    the trunk's first Adam step: bias-corrected moments g and g², so every trunk entry moves by
    lr·|g|/(|g| + eps), i.e. lr (or 0 where its gradient is 0), not a multiple of it."""
    lr = 1e-2
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=lr))
    st = tr.init(model)
    b = batches_of(data)
    st, _ = tr.run(st, b, Stage(1, trainable=("towers", "heads")))
    before = leaves_with_paths(st.params)
    st, _ = tr.run(st, one_step(b, 0), Stage(1))
    after = leaves_with_paths(st.params)
    trunk = [k for k in before if partition.owner_of(k, tr.names) == "shared"]
    assert trunk
    for k in trunk:
        moved = np.abs(after[k] - before[k]) / lr
        assert moved.max() <= 1.0 + 1e-3, k  # never more than lr (|g| / (|g| + eps) <= 1)
        assert np.median(moved[moved > 0]) > 0.999, k  # lr where |g| >> eps


def test_a_task_slice_of_stacked_columns_starts_adam_afresh(data):
    """Soft sharing (and PLE, cross-stitch) stack the tasks' columns in one leaf. After a stage on
    'click' alone, the first joint step is the first Adam step of the other tasks' slices: each
    entry moves by lr·|g|/(|g| + eps) <= lr (the closed form of a first step), not by a multiple
    of it. With one step count per leaf, those slices moved by 2.5·lr."""
    lr = 1e-2
    model = build_model("soft_sharing", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=lr))
    st = tr.init(model)
    b = batches_of(data)
    st, _ = tr.run(st, b, Stage(1, tasks=("click",)))
    before = leaves_with_paths(st.params)
    st, _ = tr.run(st, one_step(b, 0), Stage(1))
    after = leaves_with_paths(st.params)
    cols = [k for k in before if k.startswith("columns")]
    assert cols
    for k in cols:
        for i in (1, 2):  # like and rating: idle in the first stage
            moved = np.abs(after[k][i] - before[k][i]) / lr
            assert moved.max() <= 1.0 + 1e-3, (k, i)
            if (moved > 0).any():
                assert np.median(moved[moved > 0]) > 0.99, (k, i)


def test_alternating_on_stacked_columns_changes_only_that_slice(data):
    """Soft sharing stacks the tasks' columns in one leaf: an alternating step changes task t's
    slice of the parameters and of their Adam moments (warmed by a joint step first) only."""
    model = build_model("soft_sharing", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=1e-2))
    st = tr.init(model)
    b = batches_of(data)
    st, _ = tr.run(st, one_step(b, 1), Stage(1))
    cols = lambda d: {k: v for k, v in d.items() if k.startswith("columns")}
    before = [cols(leaves_with_paths(st.params)), *map(cols, adam_moments(st))]
    st, m = tr.run(st, one_step(b, 0), Stage(1, alternating=True))
    t = int(m["task"][0])
    after = [cols(leaves_with_paths(st.params)), *map(cols, adam_moments(st))]
    assert before[0]
    for old, new in zip(before, after, strict=True):
        for k in old:
            for i in range(len(tr.names)):
                same = np.array_equal(old[k][i], new[k][i])
                assert same == (i != t), (k, i, t)


def test_alternating_sampled_follows_probabilities(data):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    probs = {"click": 0.75, "like": 0.25, "rating": 0.0}
    tr = Trainer(model, TrainConfig(order="sampled", probs=probs))
    st = tr.init(model)
    b = batches_of(data, batch_size=8)  # 64 steps per epoch
    counts = np.zeros(3)
    for _ in range(4):
        st, m = tr.run(st, b, Stage(1, alternating=True))
        counts += np.bincount(np.asarray(m["task"]), minlength=3)
    assert counts[2] == 0
    assert abs(counts[0] / counts.sum() - 0.75) < 0.08  # 256 draws: 4.4 standard deviations


def test_staged_frozen_params_bit_identical(data):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, dropout=0.2, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=1e-2))
    st = tr.init(model)
    b = batches_of(data)
    st, _ = tr.run(st, b, Stage(1))  # all trainable: moments become non-zero
    before_p, (before_mu, _) = leaves_with_paths(st.params), adam_moments(st)
    st, _ = tr.run(st, b, Stage(1, trainable=("towers", "heads")))
    after_p, (after_mu, _) = leaves_with_paths(st.params), adam_moments(st)
    for path in before_p:
        frozen = partition.group_of(path) not in ("towers", "heads")
        assert np.array_equal(before_p[path], after_p[path]) == frozen, path
        assert np.array_equal(before_mu[path], after_mu[path]) == frozen, path


def test_stage_on_some_tasks_leaves_other_towers_alone(data):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=1e-2))
    st = tr.init(model)
    b = batches_of(data)
    st, _ = tr.run(st, b, Stage(1))
    before = leaves_with_paths(st.params)
    st, m = tr.run(st, b, Stage(1, tasks=("rating",)))
    after = leaves_with_paths(st.params)
    assert np.all(np.asarray(m["weights"])[:, :2] == 0)
    for path in before:
        owner = partition.owner_of(path, tr.names)
        assert np.array_equal(before[path], after[path]) == (owner in ("click", "like")), path


def test_regex_trainable_and_errors(data):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig())
    st = tr.init(model)
    mask = leaves_with_paths(partition.selector_mask(st.params, ["towers/like/.*"]))
    assert {p for p, m in mask.items() if m} == {p for p in mask if p.startswith("towers/like/")}
    with pytest.raises(ValueError, match="trainable: 'tower_x' matches no parameter"):
        tr.run(st, batches_of(data), Stage(1, trainable=("tower_x",)))
    # run() reuses one device mask per stage; it holds the same values as the selector's
    towers = tr.stage_mask(st, Stage(1, trainable=("towers/like/.*",)))
    assert tr.stage_mask(st, Stage(2, trainable=("towers/like/.*",))) is towers
    assert leaves_with_paths(towers) == mask
    everything = leaves_with_paths(tr.stage_mask(st, Stage(1)))
    assert all(everything.values()) and everything.keys() == mask.keys()
    with pytest.raises(ValueError, match="stage tasks: unknown value 'clik'.*'click'"):
        tr.run(st, batches_of(data), Stage(1, tasks=("clik",)))


def test_schedule_and_config_errors(data):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    with pytest.raises(ValueError, match="schedule: unknown value 'joint2'"):
        make_schedule("joint2", 1)
    with pytest.raises(ValueError, match="stage epochs: -1"):
        Stage(-1)
    with pytest.raises(ValueError, match="stage trainable: empty"):
        Stage(1, trainable=())
    with pytest.raises(ValueError, match=r"weights: keys \['ctr'\] are not tasks"):
        Trainer(model, TrainConfig(weights={"ctr": 1.0}))
    with pytest.raises(ValueError, match="learning_rate"):
        Trainer(model, TrainConfig(learning_rate=0.0))
    assert make_schedule("staged", stages=[{"epochs": 2}, {"epochs": 1, "trainable": ["towers"]}])[
        1
    ].trainable == ("towers",)


def test_custom_optax_transform_is_used(data):
    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(), tx=optax.sgd(0.0))
    st = tr.init(model)
    before = leaves_with_paths(st.params)
    st2, _ = tr.run(st, batches_of(data), Stage(1))
    for k, v in leaves_with_paths(st2.params).items():
        np.testing.assert_array_equal(before[k], v)
    assert int(st2.step) == 8 and isinstance(st2.step, jnp.ndarray)


@pytest.mark.product_codegen
def test_compiler_options_reach_the_step_and_bad_ones_are_refused(data, tmp_path):
    """``compiler_options`` go to XLA with the step: xla_dump_to makes XLA write the step's HLO
    into the folder, and the trajectory equals the run without options, bit for bit; so does the
    one with copy insertion's region analysis (docs/results/ablations.md: it changes buffers, not
    arithmetic)."""
    b = batches_of(data)
    runs = []
    region = {"xla_cpu_copy_insertion_use_region_analysis": True}
    for opts in ({}, {"xla_dump_to": str(tmp_path)}, region):
        model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
        tr = Trainer(model, TrainConfig(learning_rate=1e-2, compiler_options=opts))
        st, m = tr.run(tr.init(model), b, Stage(1))
        runs.append((np.asarray(m["loss"]), leaves_with_paths((st.params, st.opt_state))))
    dumped = [p.name for p in tmp_path.iterdir()]
    assert any("_epoch_fn" in n for n in dumped), dumped
    for loss, state in runs[1:]:
        np.testing.assert_array_equal(loss, runs[0][0])
        for k, v in runs[0][1].items():
            np.testing.assert_array_equal(state[k], v)

    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    with pytest.raises(ValueError, match="compiler_options.*xla_no_such_option"):
        Trainer(model, TrainConfig(compiler_options={"xla_no_such_option": True}))
    with pytest.raises(TypeError, match="compiler_options.*must be a dict"):
        Trainer(model, TrainConfig(compiler_options=[("xla_dump_to", "/tmp")]))
    with pytest.raises(TypeError, match="compiler_options.*xla_dump_to"):
        Trainer(model, TrainConfig(compiler_options={"xla_dump_to": None}))


def test_train_run_passes_compiler_options_from_the_spec(data, monkeypatch):
    """The spec key compiler_options reaches the Trainer as given; absent, the automatic choice:
    on CPU, CPU_JOINT_OPTIONS for a joint step, XLA's defaults with an aggregator."""
    from mtl import experiment
    from mtl.train import CPU_JOINT_OPTIONS, check_compiler_options

    try:
        check_compiler_options(CPU_JOINT_OPTIONS)
    except ValueError as e:
        pytest.skip(f"this jaxlib refuses CPU_JOINT_OPTIONS: {e}")

    seen = []

    class Recording(Trainer):
        def __init__(self, model, config, tx=None):
            super().__init__(model, config, tx)
            seen.append((config.compiler_options, self.compiler_options))

    monkeypatch.setattr(experiment, "Trainer", Recording)
    spec = dict(model="shared_bottom", model_kwargs=SIZES, epochs=1, batch_size=128)
    experiment.train_run(spec, data, data, progress=False)
    experiment.train_run(spec | {"compiler_options": {}}, data, data, progress=False)
    experiment.train_run(spec | {"aggregator": "upgrad"}, data, data, progress=False)
    assert seen == [(None, CPU_JOINT_OPTIONS), ({}, {}), (None, {})]


def compiled_chunk_text(tr, st, batches, stage):
    """The optimized HLO of the chunk ``tr.run(st, batches, stage)`` runs (its jitted epoch)."""
    return tr.lower(st, batches, stage).compile().as_text()


@pytest.mark.product_codegen
def test_automatic_compiler_options_by_step_kind(data):
    """compiler_options=None: on CPU, a step without per-task gradients compiles without YNNPACK
    fusions and with copy insertion's region analysis (CPU_JOINT_OPTIONS), one with an aggregator,
    a Jacobian-reading weighting or gradient logging with XLA's defaults; elsewhere XLA's defaults.
    Only speed changes: the joint losses match the XLA-defaults run to float32 rounding, and
    region analysis drops copies without changing a bit of the trajectory."""
    from mtl.train import CPU_JOINT_OPTIONS, _xla_refusal, default_compiler_options

    cpu_auto = (
        jax.default_backend() == "cpu" and _xla_refusal(tuple(CPU_JOINT_OPTIONS.items())) is None
    )
    assert default_compiler_options(False) == (CPU_JOINT_OPTIONS if cpu_auto else {})
    assert default_compiler_options(True) == {}
    b = batches_of(data)
    made = {}
    for name, kw in {
        "auto joint": {},
        "xla defaults": dict(compiler_options={}),
        "upgrad": dict(aggregator="upgrad"),
        "gradnorm": dict(weighting="gradnorm"),
        "logging": dict(log_every=4),
        "no ynn alone": dict(compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""}),
    }.items():
        if name == "no ynn alone" and not cpu_auto:
            continue
        model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
        tr = Trainer(model, TrainConfig(learning_rate=1e-2, **kw))
        made[name] = (tr, tr.init(model))
    assert made["auto joint"][0].compiler_options == (CPU_JOINT_OPTIONS if cpu_auto else {})
    for name in ("xla defaults", "upgrad", "gradnorm", "logging"):
        assert made[name][0].compiler_options == {}, name

    copies = lambda hlo: sum(" copy(" in line for line in hlo.splitlines())
    auto_hlo = compiled_chunk_text(*made["auto joint"], b, Stage(1))
    default_hlo = compiled_chunk_text(*made["xla defaults"], b, Stage(1))
    if cpu_auto:
        no_ynn_hlo = compiled_chunk_text(*made["no ynn alone"], b, Stage(1))
    runs = {}
    for name in made:
        tr, st = made[name]
        st, m = tr.run(st, b, Stage(1))
        runs[name] = (np.asarray(m["loss"]), leaves_with_paths(st.params))
    np.testing.assert_allclose(runs["auto joint"][0], runs["xla defaults"][0], rtol=2e-5)
    if not cpu_auto:
        return
    assert "__ynn_fusion" not in auto_hlo
    assert copies(auto_hlo) < copies(no_ynn_hlo)
    np.testing.assert_array_equal(runs["auto joint"][0], runs["no ynn alone"][0])
    for k, v in runs["no ynn alone"][1].items():
        np.testing.assert_array_equal(runs["auto joint"][1][k], v)
    if "__ynn_fusion" not in default_hlo:
        pytest.skip("this jaxlib's XLA:CPU makes no YNNPACK fusions by default")


def test_step_traces_its_aggregator_with_rows_made_apart(data):
    """The trainer's step hands its aggregator the stacked per-task rows inside
    aggregation._rows_made_apart (the row-by-row Gram from 32k columns on CPU), in the full and in
    the restricted (staged) call; the hint does not outlive the trace."""
    from mtl import aggregation

    model = build_model("shared_bottom", data.feature_specs, data.task_specs, **SIZES)
    tr = Trainer(model, TrainConfig(learning_rate=1e-2, aggregator="upgrad"))
    seen = []
    apply = tr.aggregator.apply

    def spy(jac, state, key):
        seen.append(aggregation._ROWS_APART.get())
        return apply(jac, state, key)

    tr.aggregator = tr.aggregator._replace(apply=spy)
    st = tr.init(model)
    b = batches_of(data)
    st, _ = tr.run(st, b, Stage(1))
    st, _ = tr.run(st, b, Stage(1, tasks=(data.task_specs[0].name, data.task_specs[1].name)))
    assert len(seen) >= 2 and all(seen)
    assert aggregation._ROWS_APART.get() is False
    assert aggregation._long(40_000) is False
