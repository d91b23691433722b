"""What every study script shares: one training run from a config, the run directory
(config.json, metrics.jsonl, results.json, results.md, curves.png, checkpoints), the results table,
signal handling and the command-line entry that turns user errors into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl import metrics as M
from mtl.checkpoint import Checkpointer, CheckpointMismatch, make_writable_dir
from mtl.data.batching import Dataset
from mtl.models import build_model
from mtl.runner import Divergence, EarlyStopping, evaluate, examples_per_second, fit
from mtl.spec import integer
from mtl.train import TrainConfig, Trainer, make_schedule

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, CheckpointMismatch, Divergence)


class RunDir:
    """A study's output folder: config, per-epoch metrics, results, plots and checkpoints."""

    def __init__(self, path: str | os.PathLike, config: Mapping | None = None):
        self.path = Path(path)
        try:
            make_writable_dir(self.path)
        except OSError as e:
            raise ValueError(
                f"workdir: cannot write to {str(self.path)!r} ({e.strerror}); pass --config.workdir=<a writable folder>"
            ) from e
        if config is not None:
            (self.path / "config.json").write_text(
                json.dumps(_plain(config), indent=2, sort_keys=True)
            )

    def log(self, record: Mapping) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_plain(record)) + "\n")

    def checkpoint_dir(self, run_name: str) -> Path:
        return self.path / "checkpoints" / run_name

    def write_results(
        self, dataset: str, split: str, runs: Sequence[Mapping], title: str = ""
    ) -> str:
        """results.json in the shared schema and results.md with the same table; returns the table."""
        doc = {"dataset": dataset, "split": split, "runs": [_plain(r) for r in runs]}
        (self.path / "results.json").write_text(json.dumps(doc, indent=2))
        table = results_table(runs)
        (self.path / "results.md").write_text(
            f"# {title or dataset}\n\nsplit: {split}\n\n{table}\n"
        )
        return table


def _plain(x: Any) -> Any:
    """JSON-ready copy: ConfigDicts, dataclasses, numpy scalars and arrays become plain values."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def run_name(r: Mapping) -> str:
    parts = [r["model"], r["schedule"]]
    if r.get("aggregator"):
        parts.append(r["aggregator"])
    if r.get("weighting") not in (None, "fixed"):
        parts.append(r["weighting"])
    if r.get("seed") is not None and r.get("seed") != 0:
        parts.append(f"s{r['seed']}")
    return "-".join(parts)


def results_table(runs: Sequence[Mapping]) -> str:
    """A markdown table: one row per run, per-task metrics, averages over tasks and Δm%."""
    cols: list[tuple[str, str]] = []
    for r in runs:
        for task, ms in r["tasks"].items():
            for m in ms:
                if (task, m) not in cols:
                    cols.append((task, m))
    avg_cols = [
        m
        for m in ("accuracy", "recall", "f1", "auc")
        if any(m in r.get("average", {}) for r in runs)
    ]
    head = ["run", *[f"{t} {m}" for t, m in cols], *[f"avg {m}" for m in avg_cols], "Δm%", "ex/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [run_name(r)]
        cells += [f"{r['tasks'].get(t, {}).get(m, float('nan')):.4f}" for t, m in cols]
        cells += [f"{r.get('average', {}).get(m, float('nan')):.4f}" for m in avg_cols]
        dm = r.get("delta_m")
        cells.append("—" if dm is None else f"{dm:+.2f}")
        cells.append(f"{r.get('examples_per_second', 0):,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def classification_average(
    tasks: Mapping[str, Mapping[str, float]], kinds: Mapping[str, str]
) -> dict:
    """Mean accuracy / recall / F1 / AUC over the classification tasks (the reference design's averages)."""
    cls = {t: m for t, m in tasks.items() if kinds.get(t) in ("binary", "multilabel", "multiclass")}
    avg = M.average(cls) if cls else {}
    return {k: v for k, v in avg.items() if k in ("accuracy", "precision", "recall", "f1", "auc")}


class StopFlag:
    """Set by SIGINT/SIGTERM: the run finishes its current chunk, checkpoints and exits non-zero.

    A second signal stops at once (KeyboardInterrupt) without a checkpoint.
    """

    def __init__(self):
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self) -> StopFlag:
        def handler(signum, _frame):
            if self.signal is not None:
                raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
            self.signal = signum

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)
        return self


_STOP: StopFlag | None = None  # installed by ``cli``; the default ``stop`` of ``train_run``


def steady_memory(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold so freed epoch-sized buffers return to the OS (flat RSS).

    glibc raises the threshold each time a large block is freed, after which epoch-sized
    allocations come from the heap and resident memory creeps up for several epochs; a fixed
    threshold turns that off. Returns False where mallopt is unavailable (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def memory_mb() -> float:
    """Resident set size of this process in MiB (0.0 without psutil)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return 0.0
    return psutil.Process().memory_info().rss / 2**20


# the keys train_run reads; any other key is a typo (refused, never ignored)
SPEC_KEYS = (
    "name",
    "model",
    "model_kwargs",
    "schedule",
    "epochs",
    "stages",
    "batch_size",
    "learning_rate",
    "optimizer",
    "weights",
    "aggregator",
    "aggregator_kwargs",
    "aggregate_on",
    "weighting",
    "weighting_kwargs",
    "order",
    "probs",
    "l1",
    "l2",
    "seed",
    "nan_policy",
    "log_every",
    "eval_every",
    "save_every",
    "keep",
    "early_stopping",
    "compiler_options",
    "microbatches",
)


def _array_digest(x: np.ndarray) -> str:
    x = np.ascontiguousarray(x)
    return f"{x.dtype}{list(x.shape)} sha1 {hashlib.sha1(x.tobytes()).hexdigest()}"


def train_run(
    spec: Mapping[str, Any],
    train: Dataset,
    test: Dataset,
    *,
    val: Dataset | None = None,
    rundir: RunDir | None = None,
    stop: Callable[[], bool] | None = None,
    progress: bool = True,
    mesh=None,
) -> dict:
    """Train one model as described by ``spec`` and return its results record.

    ``spec`` keys: model, model_kwargs, schedule (joint | alternating | staged), epochs, stages,
    batch_size, learning_rate, optimizer, weights, aggregator, aggregator_kwargs, aggregate_on,
    weighting, weighting_kwargs, order, probs, l1, l2, seed, nan_policy, log_every, save_every,
    early_stopping (a mapping of ``mtl.runner.EarlyStopping``'s fields; needs ``val``),
    compiler_options (XLA options for the compiled step, ``TrainConfig.compiler_options``),
    microbatches (``TrainConfig.microbatches``; default: the automatic choice).
    """
    from mtl import aggregation, weighting
    from mtl.spec import unknown

    spec = dict(spec)
    extra = sorted(set(spec) - set(SPEC_KEYS))
    if extra:
        raise unknown("spec key", extra[0], SPEC_KEYS)
    stop = stop if stop is not None else _STOP
    # fail fast, before the model is built: integers, schedule, stages and method names (the
    # stages' tasks and trainable parameters are checked by fit, before the first step)
    seed = integer("seed", spec.get("seed", 0), 0)  # also the data seed: [0, 2**32)
    if seed >= 2**32:
        raise ValueError(
            f"seed: {seed} must be < 2**32 (it also orders the data); pass a smaller seed"
        )
    batch_size = integer("batch_size", spec.get("batch_size"), 1)
    epochs = integer("epochs", spec.get("epochs", 1))  # its range: 'stage epochs' (Stage)
    eval_every = integer(
        "eval_every", spec.get("eval_every", 1), 1, "; pass 1 to evaluate after every epoch"
    )
    save_every = integer(
        "save_every", spec.get("save_every", 0), 0, "; pass 0 to save at epoch ends only"
    )
    log_every = integer("log_every", spec.get("log_every", 0), 0, " (0 turns logging off)")
    keep = integer("keep", spec.get("keep", 2), 1, "; it is the number of checkpoints to keep")
    stages = make_schedule(spec.get("schedule", "joint"), epochs, spec.get("stages"))
    if spec.get("aggregator") not in (None, *aggregation.AGGREGATORS):
        raise unknown("aggregator", spec["aggregator"], aggregation.AGGREGATORS)
    if spec.get("weighting", "fixed") not in weighting.WEIGHTINGS:
        raise unknown("weighting", spec["weighting"], weighting.WEIGHTINGS)
    early = spec.get("early_stopping")
    if early is not None:
        fields = {f.name for f in dataclasses.fields(EarlyStopping)}
        extra = sorted(set(early) - fields)
        if extra:
            raise ValueError(f"early_stopping: unknown fields {extra}; known: {sorted(fields)}")
        early = EarlyStopping(**dict(early))
        if val is None:
            raise ValueError("early_stopping: needs a validation split (val) to monitor")
    model = build_model(
        spec["model"],
        train.feature_specs,
        train.task_specs,
        seed=seed,
        **dict(spec.get("model_kwargs", {})),
    )
    cfg = TrainConfig(
        learning_rate=float(spec.get("learning_rate", 1e-3)),
        optimizer=spec.get("optimizer", "adam"),
        weights=spec.get("weights"),
        l1=float(spec.get("l1", 0.0)),
        l2=float(spec.get("l2", 0.0)),
        order=spec.get("order", "round_robin"),
        probs=spec.get("probs"),
        aggregator=spec.get("aggregator"),
        aggregator_kwargs=dict(spec.get("aggregator_kwargs", {})),
        aggregate_on=spec.get("aggregate_on", "params"),
        weighting=spec.get("weighting", "fixed"),
        weighting_kwargs=dict(spec.get("weighting_kwargs", {})),
        nan_policy=spec.get("nan_policy", "stop"),
        log_every=log_every,
        compiler_options=None
        if spec.get("compiler_options") is None
        else dict(spec["compiler_options"]),
        microbatches=spec.get("microbatches"),
    )
    trainer = Trainer(model, cfg)
    trainer.microbatches(batch_size)  # a count that does not divide the batch fails here
    record = {
        "model": spec["model"],
        "schedule": spec.get("schedule", "joint"),
        "aggregator": spec.get("aggregator"),
        "weighting": spec.get("weighting", "fixed"),
        "seed": seed,
    }
    name = spec.get("name") or run_name(record)
    ckpt = None
    if rundir is not None:
        fp = trainer.fingerprint() | {
            "model_kwargs": {
                k: _array_digest(v) if isinstance(v, np.ndarray) else _plain(v)
                for k, v in dict(spec.get("model_kwargs", {})).items()
            },
            "schedule": spec.get("schedule", "joint"),
            "data_seed": seed,
            "batch_size": batch_size,
            "train_rows": len(train),
        }  # fit adds the run record: batch size, data seed and a digest of the training rows
        ckpt = Checkpointer(rundir.checkpoint_dir(name), fp, max_to_keep=keep)

    def on_epoch(rec: dict) -> None:
        if rundir is not None:
            rundir.log({"run": name, **rec, "rss_mb": memory_mb()})

    t0 = time.perf_counter()
    try:
        res = fit(
            trainer,
            trainer.init(model, seed=seed),
            train,
            stages,
            batch_size=batch_size,
            data_seed=seed,
            eval_data=val,
            eval_every=eval_every,
            checkpointer=ckpt,
            save_every=save_every,
            on_epoch=on_epoch,
            should_stop=stop,
            progress=progress,
            mesh=mesh,
            early_stopping=early,
        )
    finally:
        if ckpt is not None:
            ckpt.close()
    seconds = time.perf_counter() - t0
    tasks = evaluate(trainer, res.state, test, mesh=mesh)
    kinds = {t.name: t.kind for t in train.task_specs}
    record.update(
        name=name,
        tasks=tasks,
        average=classification_average(tasks, kinds),
        delta_m=None,
        train_seconds=seconds,
        examples_per_second=examples_per_second(res.history, len(train)),
        history=res.history,
        skipped_steps=int(res.state.skipped),
    )
    if early is not None:
        record.update(best_epoch=res.best_epoch, stopped_early=res.stopped_early)
    record["_trainer"], record["_state"] = trainer, res.state
    return record


def add_delta_m(runs: list[dict], baseline: str = "single_task", by_task: bool = False) -> None:
    """Fill each run's Δm% (``metrics.delta_m``) against the first run whose model is
    ``baseline``. A Δm% that cannot be computed (a baseline metric of 0) is left None with the
    reason in ``delta_m_error`` and printed, so that the trained runs' results are still written."""
    base = next((r for r in runs if r["model"] == baseline), None)
    if base is None:
        return
    for r in runs:
        try:
            r["delta_m"] = M.delta_m(r["tasks"], base["tasks"], by_task=by_task)
        except ValueError as e:
            r["delta_m"], r["delta_m_error"] = None, str(e)
            print(f"Δm% of {r.get('name', r['model'])}: not computed: {e}", file=sys.stderr)


def public(record: Mapping) -> dict:
    """The record without live objects (trainer, state) and without the long history."""
    return {k: v for k, v in record.items() if not k.startswith("_") and k != "history"}


def plot_curves(rundir: RunDir, runs: Sequence[Mapping], filename: str = "curves.png") -> Path:
    """Training loss per epoch of every run (log scale), one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        h = r.get("history", [])
        ax.plot(
            [x["epoch"] + 1 for x in h],
            [x["train_loss"] for x in h],
            marker="o",
            ms=3,
            label=run_name(r),
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (weighted sum)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = rundir.path / filename
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _config_file_error(error: BaseException, argv: Sequence[str]) -> FileNotFoundError:
    """The error for a ``--config`` file that cannot be loaded, naming the flag and the fix."""
    if isinstance(error, FileNotFoundError) and str(error).startswith("--config: "):
        return error
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    path = paths[-1] if paths else "<default>"
    why = "no such file" if "No such file" in str(error) else str(error).strip().splitlines()[-1]
    return FileNotFoundError(
        f"--config: cannot load {path.split(':')[0]!r} ({why}); "
        "pass --config=<path of a config .py file>[:variant]"
    )


def _flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """One line for a command-line error: the innermost message, naming the flag and the fix."""
    text = str(e).strip()
    if "Traceback (most recent call last)" in text:  # the config file raised: keep its message
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = re.sub(r"^[\w.]+: ", "", last, count=1)
    elif isinstance(e, AttributeError | KeyError):  # an override of a field the config lacks
        m = re.search(r"'(\w+)", text)
        key = m[1] if m else text.strip("'\"")
        names = [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]
        parts = next((n.split(".") for n in names if key in n.split(".")[1:]), ["config", key])
        name = ".".join(parts[: parts.index(key, 1) + 1])
        text = f"--{name}: the config has no field {key!r}; {_fields_hint(name, argv)}"
    return (text.splitlines() or [type(e).__name__])[0]


def _fields_hint(name: str, argv: Sequence[str]) -> str:
    """'did you mean ...? valid: ...' for the dotted override ``name`` (config.a.b)."""
    import runpy

    from mtl.spec import closest

    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    try:
        file, *variant = paths[-1].split(":", 1)
        parent = runpy.run_path(file, run_name="_config")["get_config"](*variant)
        for part in name.split(".")[1:-1]:
            parent = parent[part]
        return closest(name.split(".")[-1], list(parent.keys()))
    except Exception:  # noqa: BLE001 - only a hint
        return "check the spelling against the config file"


def cli(main: Callable[[Any], int | None], argv: Sequence[str] | None = None) -> None:
    """Parse ml_collections ``--config`` flags and run ``main(config)``.

    User errors (bad flags, bad config values, missing data, foreign checkpoints, divergence)
    print one line ``error: ...`` and exit 2, without a traceback. SIGINT/SIGTERM set a StopFlag
    (the default ``stop`` of ``train_run``): the run checkpoints after its current chunk, prints
    the command that resumes it and exits 128 + the signal number (130 for SIGINT).
    """
    import shlex

    from absl import flags

    global _STOP
    resume = shlex.join(sys.orig_argv if argv is None else ["python", *argv])
    argv = list(sys.argv if argv is None else argv)
    try:
        flags.FLAGS(argv)
        config = flags.FLAGS.config
        if type(config).__name__ == "_ErrorConfig":  # ml_collections defers file errors
            raise _config_file_error(object.__getattribute__(config, "_error"), argv)
    except OSError as e:  # includes FileNotFoundError
        print(f"error: {_flag_error(_config_file_error(e, argv), argv)}", file=sys.stderr)
        sys.exit(2)
    except (flags.Error, ValueError, AttributeError, KeyError) as e:
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        sys.exit(2)
    _STOP = StopFlag().install()
    steady_memory()
    try:
        code = main(config)
    except USER_ERRORS as e:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # no repr quotes
        msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(
            f"interrupted: {e}; resume with: cd {shlex.quote(os.getcwd())} && {resume}",
            file=sys.stderr,
        )
        sys.exit(128 + (_STOP.signal or signal.SIGINT))
    sys.exit(code or 0)
