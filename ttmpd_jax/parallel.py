"""Data parallelism over a ``jax.sharding.Mesh`` with one axis, ``data``.

Batches are sharded along their leading axis, variables are replicated; ``jax.jit`` inserts the
gradient all-reduce. Works unchanged on 1..N local devices and across hosts (after
``jax.distributed.initialize()``), where each process feeds its own slice of the global batch.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttmpd_jax.errors import ConfigError

DATA_AXIS = 'data'


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (all when ``None``)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f'num_devices={num_devices} but {len(devices)} devices are available')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh, *, copy: bool = False) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``.

  ``copy=True`` never aliases the input buffers (needed before donating the result to a step:
  donation would otherwise invalidate the caller's arrays); a plain device copy, no compilation.
  """
  return jax.device_put(tree, replicated(mesh), may_alias=False if copy else None)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Shards each leaf's leading (batch) axis over ``mesh``; the batch must divide evenly.

  Multi-host: each process passes its local slice and gets back a global array.
  """
  sharding = data_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = 'batch_size') -> None:
  """Global batches are split evenly over the devices; ``field`` names the setting."""
  if batch_size % mesh.size:
    raise ConfigError(field, f'{batch_size} must be divisible by the number of devices '
                      f'({mesh.size})')
