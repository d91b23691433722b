"""Reliability: kills, interrupts, divergence, broken checkpoints and memory, end to end.

The kill tests run ``experiments/train.py`` as a child process, kill it (SIGKILL, SIGTERM, SIGINT)
at random moments after it has written a checkpoint, resume it, and compare the final state and
history bit for bit with an uninterrupted run. Children share a persistent JAX compilation cache,
so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl.checkpoint import Checkpointer
from mtl.data import fetch, splits, synthetic
from mtl.data.batching import Dataset
from mtl.models import build_model
from mtl.runner import Divergence, fit
from mtl.train import Stage, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "train.py"
TINY = [f"--config={SCRIPT}:tiny"]
RUN = "shared_bottom-joint"  # the tiny run's name (its checkpoint folder)
LONGER = ("--config.epochs=6", "--config.save_every=10")  # 180 steps, chunks of 10: 1 compile
TIMEOUT = 240


def train_cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *TINY, f"--config.workdir={workdir}", *extra]


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def steps(ckdir: Path) -> list[int]:
    return (
        sorted(int(p.name) for p in ckdir.glob("*") if p.name.isdigit()) if ckdir.is_dir() else []
    )


def final(workdir: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every leaf of the final train state and the history (without wall-clock seconds)."""
    with np.load(workdir / "final.npz") as z:
        arrays = {k: z[k] for k in z.files}
    history = json.loads(str(arrays.pop("history.json")))
    return arrays, [{k: v for k, v in h.items() if k not in ("seconds",)} for h in history]


def assert_same_run(a: Path, b: Path) -> None:
    (xa, ha), (xb, hb) = final(a), final(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]), k
    assert ha == hb
    ra, rb = (json.loads((d / "results.json").read_text())["tasks"] for d in (a, b))
    assert ra == rb


def interrupt(cmd: list[str], env: dict, ckdir: Path, sig: int, delay: float, log: Path):
    """Start ``cmd``, wait for it to write a new checkpoint, wait ``delay`` s, send ``sig``."""
    before = max(steps(ckdir), default=-1)
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while max(steps(ckdir), default=-1) <= before:
            assert p.poll() is None, f"child exited ({p.returncode}) early:\n{log.read_text()}"
            if time.monotonic() > deadline:
                p.kill()
                pytest.fail("no checkpoint appeared in time")
            time.sleep(0.01)
        time.sleep(delay)
        assert p.poll() is None, f"child finished before the {sig!r}: too little left to kill"
        p.send_signal(sig)
        rc = p.wait(timeout=TIMEOUT)
    return rc, log.read_text()


def test_killed_and_interrupted_runs_resume_bit_identical(tmp_path, child_env):
    """3 SIGKILLs, a SIGTERM and a SIGINT at random moments, broken checkpoints planted before
    the last resume (run with the printed command): the final state equals an uninterrupted run."""
    ref = tmp_path / "ref"
    done = run(train_cmd(ref, *LONGER), child_env)  # also fills the compile cache
    assert done.returncode == 0, done.stderr

    wd = tmp_path / "killed"
    ck = wd / "checkpoints" / RUN
    cmd = train_cmd(wd, *LONGER)
    rng = random.Random(1234)
    plan = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGINT]
    for i, sig in enumerate(plan):
        rc, out = interrupt(cmd, child_env, ck, sig, rng.uniform(0.0, 0.3), tmp_path / f"{i}.log")
        assert "Traceback" not in out, out
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, out
        else:  # finishes the chunk, checkpoints, says how to resume, exits 128 + signal
            assert rc == 128 + sig, out
            m = re.search(r"interrupted: stopped at step (\d+) \(checkpoint in (.+)\); "
                          r"resume with: (.+)$", out, re.M)  # fmt: skip
            assert m and Path(m[2]) == ck.absolute(), out
            assert int(m[1]) == max(steps(ck)), out
            resume = m[3]

    # what a SIGKILL during a save leaves (an unfinished orbax tmp folder for the next save), and
    # a newest step whose files are damaged (a torn copy, a full disk): both must be survived
    latest = max(steps(ck))
    S, chunk = 30, 10  # 1,800 training rows / batch 60; save_every 10
    e, o = divmod(latest, S)
    torn = ck / f"{e * S + min(S, (o // chunk + 1) * chunk)}.orbax-checkpoint-tmp"
    shutil.copytree(ck / str(latest), torn)
    for f in (torn / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    bad = ck / str(latest + 1)
    shutil.copytree(ck / str(latest), bad)
    for f in (bad / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")

    done = subprocess.run(
        ["bash", "-c", resume], env=child_env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    assert f"checkpoint step {latest + 1} in {ck.absolute()} is corrupted" in done.stderr
    assert (ck / f"{latest + 1}.broken").is_dir() and not torn.exists()
    assert_same_run(ref, wd)

    # a different model in the same run directory is refused, saying what differs
    other = run(train_cmd(wd, *LONGER, "--config.hidden=24"), child_env)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    line = other.stderr.splitlines()[-1]
    assert line.startswith(f"error: checkpoint {ck.absolute()}/") and (
        "was written by a different model/config: " in line
        and "params.trunk/layers/0/bias: checkpoint has [16], this run has [24]" in line
        and line.endswith("(use a new run directory, or restore with the original settings)")
    ), other.stderr


def test_diverging_run_stops_in_one_line_and_resumes_with_skip(tmp_path, child_env):
    """A finite but absurd rating (3e38: its squared error overflows) in batch 12 of epoch 0."""
    f, lab, _, _ = synthetic.recsys(n=2000, num_users=100, num_items=120, seed=0)  # = tiny data
    train_rows = splits.random_split(2000, 0.1, 0.0, 0).train
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(0), 0), 1800))
    lab["rating"][train_rows[order[12 * 60 + 5]]] = 3e38
    path = tmp_path / "data.npz"
    np.savez(path, **{f"feature.{k}": v for k, v in f.items()},
             **{f"label.{k}": v for k, v in lab.items()})  # fmt: skip
    wd, ck = tmp_path / "run", tmp_path / "run" / "checkpoints" / RUN
    cmd = train_cmd(wd, *LONGER, "--config.data.source=npz", f"--config.data.path={path}")
    done = run(cmd, child_env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "error: non-finite loss of task(s) ['rating'] = [inf] at step 12 (epoch 0, batch 12); "
        f"last good checkpoint: step 10 in {ck.absolute()}; lower the learning rate, check the "
        "data, or set nan_policy='skip' to skip such steps"
    )
    assert steps(ck) == [10]  # chunks of 10 steps: the one holding step 12 was not saved
    done = run([*cmd, "--config.nan_policy=skip"], child_env)  # recover: skip such steps
    assert done.returncode == 0, done.stderr
    assert "done: step 180, skipped 6," in done.stdout  # the row comes back in every epoch


# ---------------------------------------------------------------------- divergence (in process)
N, B, SAVE = 400, 50, 2  # 8 steps per epoch, chunks of 2
BAD_STEP = 5  # the batch of epoch 0 that holds the poisoned row


@pytest.fixture(scope="module")
def clean():
    f, lab, fs, ts = synthetic.recsys(n=N, num_users=40, num_items=50, seed=1)
    return Dataset(f, lab, fs, ts)


def poisoned(clean: Dataset, value: float = 3e38) -> tuple[Dataset, int]:
    """``clean`` with one absurd but finite rating (it passes validation; its squared error
    overflows) in a row that the data order of epoch 0 puts into batch BAD_STEP."""
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(0), 0), N))
    row = int(order[BAD_STEP * B + 7])
    labels = {k: v.copy() for k, v in clean.labels.items()}
    labels["rating"][row] = value
    return Dataset(dict(clean.features), labels, clean.feature_specs, clean.task_specs), row


def trainer_and_state(data: Dataset, **config):
    model = build_model(
        "shared_bottom", data.feature_specs, data.task_specs, trunk=(16,), tower=(8,), dropout=0.2
    )
    tr = Trainer(model, TrainConfig(learning_rate=5e-3, **config))
    return tr, tr.init(model, seed=3)


def copy(state):
    return jax.tree.map(jnp.copy, state)


def leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_divergence_stops_naming_step_task_batch_and_keeps_last_good_checkpoint(clean, tmp_path):
    tr, st0 = trainer_and_state(clean)
    bad, _ = poisoned(clean)
    ck = Checkpointer(tmp_path / "bad", tr.fingerprint(), max_to_keep=5)
    with pytest.raises(Divergence) as err:
        fit(tr, copy(st0), bad, (Stage(2),), batch_size=B, checkpointer=ck, save_every=SAVE)
    assert str(err.value) == (
        f"non-finite loss of task(s) ['rating'] = [inf] at step {BAD_STEP} (epoch 0, batch "
        f"{BAD_STEP}); last good checkpoint: step 4 in {ck.directory}; lower the learning rate, "
        "check the data, or set nan_policy='skip' to skip such steps"
    )
    assert ck.steps() == [2, 4]  # the chunk holding the bad step was not saved

    # an uninterrupted run on clean data, stopped at the same step, has the same state on disk
    ref = Checkpointer(tmp_path / "ref", tr.fingerprint(), max_to_keep=5)
    polls = iter([False, True])
    with pytest.raises(KeyboardInterrupt):
        fit(tr, copy(st0), clean, (Stage(2),), batch_size=B, checkpointer=ref, save_every=SAVE,
            should_stop=lambda: next(polls))  # fmt: skip
    assert ref.steps() == [2, 4]
    got, want = ck.restore(copy(st0)), ref.restore(copy(st0))
    assert got[2] == want[2] == 4
    for a, b in zip(leaves(got[0]), leaves(want[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert got[1] == want[1]  # the metrics history in the checkpoint, too


def test_skip_policy_skips_and_counts_non_finite_steps(clean):
    tr, st0 = trainer_and_state(clean, nan_policy="skip")
    bad, _ = poisoned(clean)
    res = fit(tr, st0, bad, (Stage(2),), batch_size=B, save_every=SAVE)
    assert int(res.state.step) == 16 and int(res.state.skipped) == 2  # the row is in both epochs
    assert [h["skipped"] for h in res.history] == [1, 2]  # cumulative, per epoch
    assert all(np.isfinite(h["train_loss"]) for h in res.history)  # skipped steps not averaged
    assert all(np.isfinite(x).all() for x in leaves(res.state.params))


@pytest.mark.parametrize("nan_policy", ["stop", "skip"])
def test_an_update_that_poisons_the_state_stops_and_is_never_saved(clean, tmp_path, nan_policy):
    """Finite losses and gradients, but the learning rate of update 6 is NaN: the parameters it
    makes are non-finite. The run stops at that chunk's end, unsaved; every checkpoint is finite
    and equals the state of a clean run at its step."""
    import optax

    model = build_model("shared_bottom", clean.feature_specs, clean.task_specs, trunk=(16,),
                        tower=(8,))  # fmt: skip
    lr = lambda step: jnp.where(step == 6, jnp.nan, 5e-3)
    tr = Trainer(model, TrainConfig(nan_policy=nan_policy), tx=optax.sgd(lr))
    st0 = tr.init(model, seed=3)
    ck = Checkpointer(tmp_path / "ck", tr.fingerprint(), max_to_keep=10)
    with pytest.raises(Divergence, match=re.escape(
        f"non-finite parameters or optimizer state after an update by step 6 (epoch 0, batches "
        f"6–7) whose losses and gradients were finite: the optimizer made them (a NaN or infinite "
        f"learning rate, Adam with eps=0, an overflow); last good checkpoint: step 6 in "
        f"{ck.directory}")):  # fmt: skip
        fit(tr, copy(st0), clean, (Stage(1),), batch_size=B, checkpointer=ck, save_every=2)
    assert ck.steps() == [2, 4, 6]
    good = Trainer(model, TrainConfig(nan_policy=nan_policy), tx=optax.sgd(lambda n: 5e-3 + 0 * n))
    ref = Checkpointer(tmp_path / "ref", good.fingerprint(), max_to_keep=10)
    polls = iter([False, False, True])  # stopped after the chunk that ends at step 6
    with pytest.raises(KeyboardInterrupt):
        fit(good, copy(st0), clean, (Stage(1),), batch_size=B, checkpointer=ref, save_every=2,
            should_stop=lambda: next(polls))  # fmt: skip
    got, want = ck.restore(copy(st0)), ref.restore(copy(st0))
    assert got[2] == want[2] == 6
    got, want = got[0], want[0]
    for a, b in zip(leaves(got.params), leaves(want.params), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)


def test_gradient_divergence_names_the_task(clean):
    """An overflowing loss weight: the losses are finite, rating's weighted gradient is not."""
    tr, st0 = trainer_and_state(clean, weights={"rating": 3e38})
    with pytest.raises(Divergence, match=re.escape(
        "non-finite gradient of task(s) ['rating'] (losses finite) at step 0 (epoch 0, batch 0); "
        "lower the learning rate")):  # fmt: skip
        fit(tr, st0, clean, (Stage(1),), batch_size=B, save_every=SAVE)


# ---------------------------------------------------------------------- memory
def rss_per_epoch(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["rss_mb"] for x in lines]


def check_memory(workdir: Path, epochs: int, bound_mb: float) -> None:
    rss = rss_per_epoch(workdir)
    assert len(rss) == epochs and all(r > 0 for r in rss)
    growth = max(rss[2:]) - rss[1]
    assert growth < bound_mb, f"RSS grew {growth:.1f} MiB after epoch 2: {rss}"


def test_memory_flat_across_epochs(tmp_path, child_env):
    """300k rows (17 MiB of batches per epoch), 5 epochs: after epoch 2 RSS grows < 16 MiB, so
    not even one epoch's batches leak."""
    cmd = train_cmd(tmp_path, "--config.data.n=300000", "--config.batch_size=4096",
                    "--config.epochs=5", "--config.save_every=0")  # fmt: skip
    done = run(cmd, child_env)
    assert done.returncode == 0, done.stderr
    check_memory(tmp_path, 5, bound_mb=16)


def needs_slow(request) -> None:
    """Slow tests run with ``-m slow`` or MTL_RUN_SLOW=1 (the default suite stays fast)."""
    if "slow" not in (request.config.option.markexpr or "") and not os.environ.get("MTL_RUN_SLOW"):
        pytest.skip("slow load test: run with -m slow or MTL_RUN_SLOW=1")


@pytest.mark.slow
def test_memory_flat_1m_rows(tmp_path, child_env, request):
    """1M rows (56 MiB of batches per epoch), 4 epochs: after epoch 2 RSS grows < 32 MiB."""
    needs_slow(request)
    cmd = train_cmd(tmp_path, "--config.data.n=1000000", "--config.data.num_users=20000",
                    "--config.data.num_items=10000", "--config.batch_size=4096",
                    "--config.epochs=4", "--config.save_every=0")  # fmt: skip
    done = run(cmd, child_env)
    assert done.returncode == 0, done.stderr
    check_memory(tmp_path, 4, bound_mb=32)


@pytest.mark.slow
def test_memory_flat_movielens_1m(tmp_path, child_env, request):
    needs_slow(request)
    if fetch.cached("movielens-1m") is None:
        pytest.skip(
            f"MovieLens-1M is not cached under {fetch.data_root()}; "
            "run `python -m mtl.data.fetch movielens-1m` to include it"
        )
    cmd = train_cmd(tmp_path, "--config.data.source=movielens", "--config.data.download=False",
                    "--config.batch_size=4096", "--config.epochs=4", "--config.save_every=0")  # fmt: skip
    done = run(cmd, child_env)
    assert done.returncode == 0, done.stderr
    check_memory(tmp_path, 4, bound_mb=32)
