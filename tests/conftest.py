"""Test setup: 8 virtual CPU devices so the data-parallel code is exercised, and one persistent
JAX compilation cache for the run (its workers and their child processes), removed at the end:
the many tests that build the same small models compile each program once."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the controller (or a run without xdist) makes the folder; xdist's workers inherit the variable
_OWNS_CACHE = "PYTEST_XDIST_WORKER" not in os.environ
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
