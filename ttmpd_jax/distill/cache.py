"""The one-time pseudo-label cache (docs/method.md, step 1).

The teacher labels a small fine-tuning subset S of the unlabeled test set **once**; every later
fine-tuning step (short-term during the search, long-term at the end) reads the cached logits
instead of running the teacher again.

A cache is keyed by a SHA-256 over

* the teacher's variables (every leaf's path, dtype, shape and bytes),
* the sample ids of S (int32, in cache order),
* a preprocessing descriptor (dataset name and family, normalisation statistics, image shape)
  and the bytes of the images of S themselves.

Design choice: hashing the images of S (not only the dataset's name) makes a stale cache
impossible by construction: another corruption seed, another ``--test_limit`` or a different
file on disk all change the key. S is small (1-20% of the test set), so hashing costs far less
than labelling it. The key is checked on every load and by ``finetune``; a mismatch raises
``CacheError``.

Design choice: on disk a cache is one ``.npz`` file (``ids`` int32 [S], ``logits`` float32
[S, K], ``key``, ``info`` JSON; a few MB at most, read whole, so orbax's directory tree buys
nothing), written to a temporary file and renamed, so an interrupted write never leaves a
truncated cache. ``cache_path(directory, key)`` names the file after its key, so a different
teacher or data set can only ever find its own cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Optional, Union

import chex
import flax.linen as nn
import jax
import numpy as np

from ttmpd_jax import parallel
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.errors import UserError

FORMAT = 'ttmpd_jax.pseudo_label_cache/1'


class CacheError(UserError, ValueError):
  """A pseudo-label cache is empty, malformed, missing, or belongs to another teacher/data set."""


@dataclasses.dataclass(frozen=True)
class PseudoLabelCache:
  """Teacher logits for a fine-tuning subset S of a test set.

  Attributes:
    ids: int32 [S], sample ids (row indices into the test ``Dataset``), unique.
    logits: float32 [S, K], the teacher's eval-mode logits for those samples (same order).
    key: hex SHA-256 identifying teacher + ids + preprocessing + images (see module docstring).
    info: free-form JSON-able facts (dataset name, labelling time, batch size, ...).
  """

  ids: np.ndarray
  logits: np.ndarray
  key: str
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    ids, logits = np.asarray(self.ids), np.asarray(self.logits)
    if ids.ndim != 1 or logits.ndim != 2 or len(ids) != len(logits):
      raise CacheError(f'malformed pseudo-label cache: ids {ids.shape} and logits {logits.shape} '
                       f'must be [S] and [S, K]')
    if len(ids) == 0:
      raise CacheError('the pseudo-label cache is empty (0 samples); choose a fine-tuning subset '
                       'of at least one sample (e.g. --finetune_subset=0.1)')
    if len(np.unique(ids)) != len(ids):
      raise CacheError('malformed pseudo-label cache: sample ids are not unique')
    object.__setattr__(self, 'ids', ids.astype(np.int32))
    object.__setattr__(self, 'logits', logits.astype(np.float32))

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def num_classes(self) -> int:
    return int(self.logits.shape[1])

  def pseudo_labels(self) -> np.ndarray:
    """Hard pseudo labels, int32 [S] (argmax of the teacher's logits)."""
    return self.logits.argmax(-1).astype(np.int32)

  def check_key(self, expected_key: str, what: str = 'pseudo-label cache') -> None:
    if self.key != expected_key:
      raise CacheError(
          f'{what} was built for another teacher or data set (cache key {self.key[:16]}..., '
          f'expected {expected_key[:16]}...); rebuild it or point to the matching cache')


# ----------------------------------------------------------------------------------------------
# Subset selection and keys.


def select_subset(n_total: int, size_or_fraction: Union[int, float], seed: int) -> np.ndarray:
  """Seeded choice of the fine-tuning subset S, sorted int32 sample ids.

  Args:
    n_total: number of test samples available.
    size_or_fraction: an ``int`` >= 1 is a number of samples; a ``float`` in (0, 1] a fraction
      of ``n_total`` (rounded, at least one sample).
    seed: the same seed always gives the same subset.
  Raises:
    CacheError: for an empty data set, a zero/negative size, a fraction outside (0, 1], or a
      size larger than the data.
  """
  if n_total <= 0:
    raise CacheError('cannot select a fine-tuning subset from an empty test set')
  if isinstance(size_or_fraction, (bool, np.bool_)):
    raise CacheError(f'fine-tuning subset size must be an int or a float, got {size_or_fraction!r}')
  if isinstance(size_or_fraction, (float, np.floating)):
    if not 0.0 < size_or_fraction <= 1.0:
      raise CacheError(f'fine-tuning subset fraction must be in (0, 1], got {size_or_fraction}')
    size = max(1, int(round(size_or_fraction * n_total)))
  else:
    size = int(size_or_fraction)
    if size <= 0:
      raise CacheError(f'fine-tuning subset size must be at least 1, got {size}')
    if size > n_total:
      raise CacheError(f'fine-tuning subset size {size} is larger than the test set '
                       f'({n_total} samples); use a smaller size or a fraction in (0, 1]')
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(n_total, size=size, replace=False)).astype(np.int32)


def fingerprint_variables(variables: Any) -> str:
  """Hex SHA-256 over every leaf of a pytree (path, dtype, shape, bytes); order-independent of
  device placement. Multi-host: leaves must be fully addressable (replicated)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f'{arr.dtype.str}{arr.shape}'.encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def preprocessing_descriptor(dataset: Dataset) -> dict[str, Any]:
  """What turns the stored images into model inputs (part of the cache key)."""
  mean, std = pipeline.NORMALIZATION.get(dataset.family, ((0.5,), (0.5,)))
  return {'dataset': dataset.name, 'family': dataset.family,
          'image_shape': list(dataset.image_shape),
          'dtype': str(dataset.images.dtype), 'mean': list(mean), 'std': list(std)}


def images_fingerprint(dataset: Dataset, ids: np.ndarray) -> str:
  """Hex SHA-256 of the raw images of ``ids`` (in that order)."""
  return hashlib.sha256(np.ascontiguousarray(dataset.images[np.asarray(ids)]).tobytes()).hexdigest()


def cache_key(teacher_fingerprint: str, ids: np.ndarray, preprocessing: Mapping[str, Any],
              images_sha256: str) -> str:
  """The cache key: SHA-256 over teacher fingerprint, ids, preprocessing and image bytes."""
  h = hashlib.sha256(FORMAT.encode())
  h.update(teacher_fingerprint.encode())
  h.update(np.ascontiguousarray(np.asarray(ids, np.int32)).tobytes())
  h.update(json.dumps(dict(preprocessing), sort_keys=True).encode())
  h.update(images_sha256.encode())
  return h.hexdigest()


def key_for(teacher_variables: Any, dataset: Dataset, ids: np.ndarray) -> str:
  """The key a cache of ``teacher_variables`` on ``dataset[ids]`` must carry."""
  _check_ids(ids, len(dataset))
  return cache_key(fingerprint_variables(teacher_variables), ids, preprocessing_descriptor(dataset),
                   images_fingerprint(dataset, ids))


def _check_ids(ids: np.ndarray, n_total: int) -> None:
  ids = np.asarray(ids)
  if ids.ndim != 1 or len(ids) == 0:
    raise CacheError(f'the fine-tuning subset must be a non-empty 1-D array of sample ids, got '
                     f'shape {ids.shape}')
  if ids.min() < 0 or ids.max() >= n_total:
    raise CacheError(f'fine-tuning subset ids must lie in [0, {n_total}), got range '
                     f'[{ids.min()}, {ids.max()}]')


# ----------------------------------------------------------------------------------------------
# Building (one teacher pass).


def make_label_fn(model: nn.Module, mesh: jax.sharding.Mesh) -> Callable:
  """``(variables, images [B, H, W, C] sharded) -> logits [B, K]`` replicated on every device.

  Replicated outputs mean every process of a multi-host job can read the whole batch's logits
  without a separate all-gather.
  """
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False),
                 out_shardings=parallel.replicated(mesh))


def build_cache(model: nn.Module, variables: Any, dataset: Dataset, ids: np.ndarray, *,
                batch_size: int = 500, mesh: Optional[jax.sharding.Mesh] = None,
                label_fn: Optional[Callable] = None,
                print_fn: Callable[[str], None] = print) -> PseudoLabelCache:
  """Runs the teacher once over ``dataset[ids]`` (eval mode, jitted, batched, data-parallel).

  Args:
    model, variables: the teacher (``{'params', 'batch_stats'}``).
    dataset: the unlabeled test set (its labels are never read).
    ids: int [S] sample ids of the fine-tuning subset (e.g. from ``select_subset``).
    batch_size: global batch size; rounded down to a multiple of the mesh size (and to at most
      S rounded up). The last partial batch is padded, so one compiled function serves all.
    mesh: 1-D data mesh (all local devices when ``None``).
    label_fn: ``make_label_fn(model, mesh)`` to reuse an already compiled teacher pass.
  Returns:
    The cache, with ``info['labelling_time_s']`` (wall seconds including compilation) and
    ``info['labelling_steps']``.
  """
  ids = np.asarray(ids, np.int32)
  _check_ids(ids, len(dataset))
  mesh = mesh or parallel.make_mesh()
  start = time.time()
  images_sha256 = images_fingerprint(dataset, ids)
  key = cache_key(fingerprint_variables(variables), ids, preprocessing_descriptor(dataset),
                  images_sha256)
  batch_size = min(batch_size, -(-len(ids) // mesh.size) * mesh.size)
  batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
  # Pad the id list (repeating the first id) to whole batches; padded rows are dropped below.
  n_pad = -len(ids) % batch_size
  padded_ids = np.concatenate([ids, np.repeat(ids[:1], n_pad)])
  label = label_fn or make_label_fn(model, mesh)
  variables = parallel.replicate(variables, mesh)
  outputs = []
  for batch in pipeline.batches(dataset.images, np.zeros(len(dataset), np.int32), batch_size,
                                family=dataset.family, indices=padded_ids,
                                process_index=jax.process_index(),
                                process_count=jax.process_count()):
    images = parallel.shard_batch(batch['image'], mesh)
    outputs.append(label(variables, images))
  logits = np.concatenate([np.asarray(o) for o in outputs])[:len(ids)].astype(np.float32)
  elapsed = time.time() - start
  chex.assert_shape(logits, (len(ids), None))
  print_fn(f'pseudo-labelled {len(ids)} samples of {dataset.name} once in {elapsed:.2f}s '
           f'({len(outputs)} teacher batches of {batch_size})')
  info = {'dataset': dataset.name, 'labelling_time_s': elapsed, 'labelling_steps': len(outputs),
          'batch_size': batch_size, 'num_devices': mesh.size, 'images_sha256': images_sha256}
  return PseudoLabelCache(ids, logits, key, info)


# ----------------------------------------------------------------------------------------------
# Disk.


def cache_path(directory: str, key: str) -> str:
  """``<directory>/pseudo_labels_<key prefix>.npz``: another key can never find this file."""
  return os.path.join(directory, f'pseudo_labels_{key[:24]}.npz')


def save(cache: PseudoLabelCache, path: str) -> str:
  """Writes ``cache`` to ``path`` (.npz) atomically; returns the absolute path.

  Multi-host: call on every process; only process 0 writes.
  """
  path = os.path.abspath(path)
  if jax.process_index() != 0:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.npz.tmp', dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, ids=cache.ids, logits=cache.logits, key=np.asarray(cache.key),
               format=np.asarray(FORMAT), info=np.asarray(json.dumps(dict(cache.info))))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load(path: str, expected_key: Optional[str] = None) -> PseudoLabelCache:
  """Reads a cache written by ``save``; with ``expected_key``, refuses another teacher's cache.

  Raises:
    CacheError: missing or unreadable file, wrong format, empty cache, or a key mismatch.
  """
  if not os.path.isfile(path):
    raise CacheError(f'no pseudo-label cache at {path}')
  try:
    with np.load(path, allow_pickle=False) as data:
      if str(data['format']) != FORMAT:
        raise CacheError(f'{path} is not a pseudo-label cache (format {str(data["format"])!r}, '
                         f'expected {FORMAT})')
      cache = PseudoLabelCache(data['ids'], data['logits'], str(data['key']),
                               json.loads(str(data['info'])))
  except CacheError:
    raise
  except Exception as e:  # zipfile/np.load raise many types for a damaged file.
    raise CacheError(f'pseudo-label cache {path} is unreadable ({type(e).__name__}: {e})') from e
  if expected_key is not None:
    cache.check_key(expected_key, f'pseudo-label cache {path}')
  return cache


def load_or_build(directory: Optional[str], model: nn.Module, variables: Any, dataset: Dataset,
                  ids: np.ndarray, *, batch_size: int = 500,
                  mesh: Optional[jax.sharding.Mesh] = None,
                  print_fn: Callable[[str], None] = print) -> PseudoLabelCache:
  """The cache for this teacher/data/subset: read from ``directory`` if there, else built (and
  saved when ``directory`` is given). The file name carries the key, so a stale cache is never
  picked up."""
  if directory is not None:
    key = key_for(variables, dataset, ids)
    path = cache_path(directory, key)
    if os.path.isfile(path):
      cache = load(path, expected_key=key)
      print_fn(f'pseudo labels for {len(cache)} samples read from {path}')
      return cache
  cache = build_cache(model, variables, dataset, ids, batch_size=batch_size, mesh=mesh,
                      print_fn=print_fn)
  if directory is not None:
    save(cache, cache_path(directory, cache.key))
  return cache
