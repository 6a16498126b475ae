"""Multi-host start-up for data-parallel distillation (and anything else on the data mesh).

On one host nothing is needed: ``parallel.make_mesh()`` spans the local devices. On a GPU cluster
or a TPU slice every process calls ``initialize(True)`` *before any other JAX call*; afterwards
``jax.devices()`` lists the devices of all hosts, ``parallel.make_mesh()`` spans them, the input
pipeline gives each process its slice of every global batch
(``pipeline.batches(..., process_index=jax.process_index(), process_count=jax.process_count())``,
``finetune`` and ``cache.build_cache`` do this themselves) and ``parallel.shard_batch`` assembles
the global arrays.

Every process runs the same program and must take the same decisions. Whatever depends on the
host — timings (latency tables, measurements against the teacher), files a host may not see —
is decided by process 0 and handed to the others with :func:`broadcast_json`; printed progress
and reports come from process 0 only (:func:`is_primary`).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from ttmpd_jax.errors import UserError


def initialize(enabled: bool, *, coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None) -> dict[str, int]:
  """Calls ``jax.distributed.initialize`` when ``enabled`` (a launcher flag); idempotent.

  With no explicit arguments JAX auto-detects the cluster (TPU pods, SLURM, Open MPI, Kubernetes
  with the usual environment variables); on other clusters pass ``coordinator_address``
  ('host:port' of process 0), ``num_processes`` and ``process_id``.

  Returns: ``{'process_index', 'process_count', 'local_devices', 'global_devices'}``.
  Raises:
    UserError: initialisation failed (unreachable coordinator, missing arguments).
  """
  if enabled and not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id,
                                 local_device_ids=local_device_ids)
    except (RuntimeError, ValueError) as e:
      raise UserError(
          f'multi-host initialisation failed ({e}); on clusters JAX cannot auto-detect, pass the '
          f'coordinator address (host:port of process 0), the number of processes and this '
          f'process id') from e
  return {'process_index': jax.process_index(), 'process_count': jax.process_count(),
          'local_devices': jax.local_device_count(), 'global_devices': jax.device_count()}


def is_primary() -> bool:
  """Whether this process prints and writes reports (process 0; always true on one process).

  Safe before ``initialize``: it does not start a JAX backend unless the job is distributed.
  """
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def broadcast_json(value: Any) -> Any:
  """Process 0's ``value`` (JSON-able; ignored elsewhere) on every process; every process calls.

  Design choice: the value travels as UTF-8 JSON bytes (``json`` round-trips floats exactly, so
  float64 numbers arrive bit for bit, which a float32 ``psum`` would not guarantee), padded to a
  power of two so that a run compiles the broadcast for a handful of sizes only. One process:
  ``value`` itself, no JAX work.
  """
  if jax.process_count() == 1:
    return value
  payload = json.dumps(value).encode() if jax.process_index() == 0 else b''
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
  buffer = np.zeros(1 << max(n - 1, 0).bit_length(), np.uint8)
  buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return json.loads(received[:n].tobytes().decode())


def check_same(value: Any, what: str) -> None:
  """Raises ``UserError`` unless ``value`` (JSON-able) is the same on every process."""
  reference = broadcast_json(value)
  if json.dumps(reference) != json.dumps(value):
    raise UserError(f'process {jax.process_index()} disagrees with process 0 on {what} '
                    f'({value!r} vs {reference!r}); every process must run the same code, flags '
                    'and data')
