"""experiments/benchmark.py: a missing peer is skipped with its reason printed, and the FLOPs behind
"% of matmul peak" agree with the model's matmul shapes. Timings themselves are not tested here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import benchmark as B  # noqa: E402 - experiments/ is not a package

from mtl.models import build_model  # noqa: E402
from mtl.models.base import NarrowLinear  # noqa: E402


def test_missing_peers_are_skipped_with_their_reasons(tmp_path, child_env):
    """With PyTorch unimportable, the run says why each peer is skipped and still writes its
    tables; the targets that need a peer are reported as not measured, not as met or missed.
    (Run with --sync-dispatch, which the report must record.)"""
    hide = tmp_path / "hide"
    (hide / "torch").mkdir(parents=True)
    (hide / "torch" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(child_env, PYTHONPATH=f"{hide}:{ROOT}")
    out = tmp_path / "run"
    args = ["--quick", "--batch-sizes", "256", "--models", "shared_bottom"]
    args += ["--chunk-examples", "1024", "--repeats", "1", "--out", str(out), "--sync-dispatch"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "benchmark.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "peer PyTorch skipped: PyTorch is not installed (hidden by the test)" in r.stdout
    for name in ("upgrad", "mgda", "pcgrad"):
        assert f"peer TorchJD {name} skipped: PyTorch missing" in r.stdout
    doc = json.loads((out / "results.json").read_text())
    assert "hidden by the test" in doc["environment"]["peers_skipped"]
    assert {row["impl"] for row in doc["training"]} == {"mtl (jax)"}
    goals = {g["target"]: g for g in doc["targets"]}
    vs_torch = goals["joint shared bottom vs PyTorch, batch 256"]
    assert vs_torch["measured"] is None and vs_torch["met"] is None
    rep = goals["representation-level aggregation / joint step, T = 8 (worst case)"]
    assert rep["measured"] > 0 and isinstance(rep["met"], bool)
    assert "peers skipped" in (out / "results.md").read_text()
    # --sync-dispatch reached jax before its CPU client was made, and the report says so
    assert doc["environment"]["cpu_async_dispatch"] is False
    assert "CPU dispatch synchronous" in (out / "results.md").read_text()


@pytest.mark.parametrize("batch", [256, 1024])
def test_step_flops_match_the_models_matmul_shapes(batch):
    """XLA's cost analysis of the compiled chunk, per step, against 3 x 2BKN summed over the
    shared bottom's matmuls (forward, input gradient, weight gradient): at least that, and no more
    than the elementwise work (activations, losses, Adam over 123k parameters) can add."""
    data = B.ml100k_like(4 * batch, num_tasks=3)
    o = B.ours("shared_bottom", data, batch, 4, per_step_flops=B.while_body_counted_once())
    o.compile()
    measured = o.bench.info["flops_per_step"]

    model = build_model(
        "shared_bottom", data.feature_specs, data.task_specs, **B.SIZES["shared_bottom"]
    )
    kn = [(lay.in_features, lay.out_features) for lay in model.trunk.layers]
    for t in data.task_specs:
        kn += [(lay.in_features, lay.out_features) for lay in model.towers[t.name].layers]
        head = model.heads[t.name]
        assert isinstance(head, NarrowLinear)
        kn.append((head.in_features, head.out_features))
    matmuls = 3 * sum(2 * batch * k * n for k, n in kn)
    assert matmuls <= measured <= 1.15 * matmuls, (measured, matmuls)
