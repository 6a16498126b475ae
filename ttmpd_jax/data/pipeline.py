"""Input pipeline: normalisation (in this one place), seeded shuffling, batching, host sharding.

Batches are dicts of numpy arrays: ``image`` float32 [B, H, W, C] (normalised), ``label`` int32
[B], ``index`` int32 [B] (the sample id within its dataset, the key of the pseudo-label cache).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from ttmpd_jax import interrupt
from ttmpd_jax.errors import UserError


class BatchSizeError(UserError, ValueError):
  """A batch size that is not positive or not divisible by the number of processes."""

# Per-channel mean/std of the clean training data, on images scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'mnist': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'identity': ((0.0,), (1.0,)),   # Images the caller already normalised (library use).
}


def normalize(images: np.ndarray, family: str) -> np.ndarray:
  """Maps images in [0, 1] (float) or [0, 255] (uint8), [..., C], to zero-mean unit-std float32."""
  mean, std = NORMALIZATION.get(family, ((0.5,), (0.5,)))
  x = images.astype(np.float32)
  if images.dtype == np.uint8:
    x = x / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, family: str,
            seed: Optional[int] = None, drop_remainder: bool = False,
            indices: Optional[Sequence[int]] = None, process_index: int = 0,
            process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the data in global batches of ``batch_size``.

  Args:
    images: uint8 or float32 [N, H, W, C] in [0, 255] / [0, 1].
    labels: int32 [N].
    batch_size: *global* batch size; each process yields its ``batch_size / process_count`` rows.
    family: normalisation statistics to use (key of ``NORMALIZATION``).
    seed: shuffle with this seed; ``None`` keeps the order (evaluation).
    drop_remainder: drop the last partial batch (training, so shapes stay fixed under jit).
    indices: restrict to these sample ids (e.g. a fine-tuning subset), in this order.
    process_index, process_count: multi-host sharding (``jax.process_index()/process_count()``).
  """
  if batch_size <= 0 or batch_size % process_count:
    raise BatchSizeError(f'batch_size {batch_size} must be positive and divisible by the number of '
                     f'processes {process_count}')
  order = np.arange(len(images)) if indices is None else np.asarray(indices, np.int64)
  if seed is not None:
    order = np.random.default_rng(seed).permutation(order)
  per_process = batch_size // process_count
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
  for start in range(0, stop, batch_size):
    batch_ids = order[start:start + batch_size]
    # Each host takes a contiguous slice of every global batch.
    local = batch_ids[process_index * per_process:(process_index + 1) * per_process] \
        if process_count > 1 else batch_ids
    if len(local) == 0:
      continue
    interrupt.check()   # Between batches: a safe point of every data pass.
    yield {'image': normalize(images[local], family), 'label': labels[local].astype(np.int32),
           'index': local.astype(np.int32)}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> tuple[dict[str, np.ndarray], int]:
  """Pads a final partial batch to ``batch_size`` rows (repeating row 0) so jit sees one shape.

  Returns the padded batch and the number of real rows.
  """
  n = len(batch['label'])
  if n == batch_size:
    return batch, n
  pad = batch_size - n
  return {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}, n
