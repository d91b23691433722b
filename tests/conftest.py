"""Test setup: 8 virtual CPU devices so the data-parallel code is exercised; a quicker XLA:CPU
codegen; and one persistent JAX compilation cache for the run (its workers and their child
processes), removed at the end: the many tests that build the same small models compile each
program once.

Compiling is most of the suite's time on 2 cores. The tests compile with XLA:CPU's LLVM at -O0 and
its loop emitters instead of the MLIR fusion emitters (TEST_XLA_FLAGS, those this jaxlib knows):
on the 2-core VM the suite ran in 5:08 instead of 9:27 with jax 0.10.2, and in 6:51 instead of
8:33 with jax 0.12.0.1, which has only the first flag (2026-11-29). The HLO passes, and so every
program's operations and their order, are XLA's own; the machine code differs, so results can
differ in the last float bits between two compile options. Tests marked ``product_codegen``
(those that assert that an option changes no bit) run in a child pytest with XLA's default
codegen. Child processes of the tests (child_env) run with XLA's defaults, as users do.
``MTL_TEST_XLA_FLAGS= make test`` (set and empty) runs the whole suite with XLA's default codegen.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
PRODUCT_CODEGEN = os.environ.get("MTL_TEST_PRODUCT_CODEGEN") == "1"


def _accepted(flags: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0


def _known_test_flags() -> str:
    """Those of TEST_XLA_FLAGS that this jaxlib accepts (XLA aborts on a flag it does not know:
    jaxlib 0.12 has no --xla_cpu_use_fusion_emitters); probed once by the first process of the
    run, whose workers and children inherit the answer."""
    if "MTL_TEST_XLA_FLAGS" not in os.environ:
        flags = TEST_XLA_FLAGS.split()
        if not _accepted(" ".join(flags)):
            flags = [f for f in flags if _accepted(f)]
        os.environ["MTL_TEST_XLA_FLAGS"] = " ".join(flags)
    return os.environ["MTL_TEST_XLA_FLAGS"]


_test_flags = _known_test_flags()
_flags = os.environ.get("XLA_FLAGS", "").split()
_flags = [f for f in _flags if f not in TEST_XLA_FLAGS.split()]
_flags += ["--xla_force_host_platform_device_count=8"]
_flags += [] if PRODUCT_CODEGEN else _test_flags.split()
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(_flags))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the first process of the run makes the folder; xdist's workers and the product_codegen children
# inherit the variable
_OWNS_CACHE = "MTL_TEST_JAX_CACHE" not in os.environ
if _OWNS_CACHE:
    os.environ["MTL_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="mtl-test-jax-cache-")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", os.environ["MTL_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """Environment of the tests' child processes: CPU, one device, this run's compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=os.environ["MTL_TEST_JAX_CACHE"],
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def pytest_unconfigure(config) -> None:
    if _OWNS_CACHE:
        shutil.rmtree(os.environ["MTL_TEST_JAX_CACHE"], ignore_errors=True)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "product_codegen: run in a child pytest with XLA's default CPU codegen"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem) -> bool | None:
    """A ``product_codegen`` test runs in a child pytest without TEST_XLA_FLAGS; its failure,
    with the child's output, is this test's failure, and its skip this test's skip."""
    if PRODUCT_CODEGEN or pyfuncitem.get_closest_marker("product_codegen") is None:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["MTL_TEST_PRODUCT_CODEGEN"] = "1"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    r = subprocess.run(
        [*cmd, "-p", "no:xdist", pyfuncitem.nodeid],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout[-6000:] + r.stderr[-2000:]
    if r.returncode != 0:
        pytest.fail(f"in a child pytest with XLA's default codegen:\n{out}", pytrace=False)
    if re.search(r"\b1 passed\b", r.stdout) is None:
        skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
        pytest.skip(skipped[0] if skipped else out)
    return True
