"""Multi-host start-up for data-parallel distillation (and anything else on the data mesh).

On one host nothing is needed: ``parallel.make_mesh()`` spans the local devices. On a GPU cluster
or a TPU slice every process calls ``initialize(True)`` *before any other JAX call*; afterwards
``jax.devices()`` lists the devices of all hosts, ``parallel.make_mesh()`` spans them, the input
pipeline gives each process its slice of every global batch
(``pipeline.batches(..., process_index=jax.process_index(), process_count=jax.process_count())``,
``finetune`` and ``cache.build_cache`` do this themselves) and ``parallel.shard_batch`` assembles
the global arrays.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax

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
