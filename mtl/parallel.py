"""Data parallelism with ``jax.sharding``: a 1-D mesh over a ``data`` axis, batches sharded on it,
the train state replicated. XLA inserts the gradient all-reduce; the step code is unchanged.

Multi-host: call ``initialize()`` first on every host (``jax.distributed.initialize``); the mesh
then spans all processes' devices. Every process runs the same program on the same data (same
seeds), so it holds the same epoch batches and state; placement keeps only the rows of its own
devices (see docs/scaling.md).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtl.spec import integer

DATA = "data"


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join a multi-host run (arguments default to the cluster's environment, e.g. SLURM/TPU)."""
    jax.distributed.initialize(coordinator, num_processes, process_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A mesh over the first ``num_devices`` devices (default: all), one axis named 'data'."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else integer("num_devices", num_devices, 1)
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"num_devices: {num_devices} must lie in [1, {len(devices)}] (devices available)"
        )
    return Mesh(np.asarray(devices[:n]), (DATA,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA]
    if batch_size % n:
        lo, hi = batch_size // n * n, -(-batch_size // n) * n
        fix = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(
            f"batch_size: {batch_size} is not divisible by the {n} devices of the data mesh; use {fix}"
        )


def _put(tree, sharding: NamedSharding):
    """``device_put``; across processes, each one fills its own devices' parts from its copy."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: x[idx]), tree
    )


def shard_batches(batches, mesh: Mesh):
    """Place scanned batches (leaves [S, B, ...]) with B split over the 'data' axis."""
    return _put(batches, NamedSharding(mesh, P(None, DATA)))


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` on all devices of ``mesh``."""
    return _put(tree, NamedSharding(mesh, P()))
