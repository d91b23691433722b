"""One process of the two-process run in tests/test_parallel.py (not a test module itself).

``python tests/multihost_worker.py <coordinator> <process_id> <out.json>``: joins a 2-process
CPU cluster through ``mtl.parallel.initialize`` (gloo collectives), trains the small shared
bottom on a data mesh over both processes' devices, evaluates on that mesh, and writes its
per-epoch training losses and the evaluation metrics to ``out.json``.
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from mtl import parallel  # noqa: E402 - after the collectives setting

parallel.initialize(sys.argv[1], 2, int(sys.argv[2]))

from multihost_case import run  # noqa: E402 - the same case as the single-process reference

out = run(mesh=parallel.make_mesh())
out["devices"], out["local_devices"] = jax.device_count(), jax.local_device_count()
with open(sys.argv[3], "w") as f:
    json.dump(out, f)
