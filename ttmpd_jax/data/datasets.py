"""Named datasets, resolved to in-memory arrays.

Names:
  * ``fashion_mnist`` — clean Fashion-MNIST from its IDX files (``train`` / ``validation`` /
    ``test``; validation = the last ``validation_size`` examples of a seeded permutation of the
    training split).
  * ``fashion_mnist_c/<corruption>_<severity>`` — the Fashion-MNIST *test* split under one of our
    own corruptions (``data.corruptions``), deterministic under ``corruption_seed``.
  * ``cifar10`` and ``cifar10_c/<corruption>_<severity>`` — the same through TFDS's prepared
    ``cifar10`` with our corruptions.
  * ``cifar10_corrupted/<corruption>_<severity>``, ``imagenet2012_corrupted/...`` and any other
    prepared TFDS name — through ``tfds.data_source`` (the official corrupted sets).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Optional

import numpy as np

from ttmpd_jax.data import fashion_mnist
from ttmpd_jax.data.fashion_mnist import DataMissingError, check_labels, check_pixels
from ttmpd_jax.errors import DataError

OUR_CORRUPTION_BASES = {'fashion_mnist_c': 'fashion_mnist', 'cifar10_c': 'cifar10'}
NUM_CLASSES = {'fashion_mnist': 10, 'mnist': 10, 'cifar10': 10, 'cifar10_corrupted': 10,
               'imagenet2012': 1000, 'imagenet2012_corrupted': 1000}
CLEAN_NAMES = ('fashion_mnist', 'cifar10', 'mnist', 'imagenet2012')


@dataclasses.dataclass
class Dataset:
  """An in-memory split: ``images`` uint8 [N, H, W, C] (or float32 in [0, 1]), ``labels`` int32
  [N]. Loaded splits are checked: pixels finite and in range, labels within the classes."""

  name: str
  images: np.ndarray
  labels: np.ndarray
  family: str  # Normalisation statistics and number of classes come from the family.

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES.get(self.family, int(self.labels.max()) + 1)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])  # type: ignore[return-value]

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, n: Optional[int]) -> 'Dataset':
    """The first ``n`` examples (all when ``None``)."""
    if n is None or n >= len(self):
      return self
    return dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n])


def parse_corrupted_name(name: str) -> tuple[str, str, int]:
  """``'fashion_mnist_c/gaussian_noise_5'`` -> ``('fashion_mnist_c', 'gaussian_noise', 5)``."""
  base, _, rest = name.partition('/')
  corruption, _, severity = rest.rpartition('_')
  if not rest or not corruption or not severity.isdigit():
    raise DataError(f'corrupted dataset name {name!r} must look like '
                     f'{base or "fashion_mnist_c"}/<corruption>_<severity>, e.g. '
                     f'{base or "fashion_mnist_c"}/gaussian_noise_5')
  return base, corruption, int(severity)


def check_name(name: str) -> str:
  """Validates a dataset name without loading anything; returns it. Raises ``DataError``.

  Our corrupted names (``fashion_mnist_c/<corruption>_<severity>``) are checked completely; a
  name that is neither ours nor a clean name is left to TFDS, except that a near miss of one of
  our names (``fashion_mnst_c/fog_5``) is reported with the likely intended name.
  """
  base = name.partition('/')[0]
  if base in OUR_CORRUPTION_BASES:
    from ttmpd_jax.data import corruptions  # Lazy: it compiles JAX functions.
    _, corruption, severity = parse_corrupted_name(name)
    corruptions.validate(corruption, severity)
    return name
  known = (*OUR_CORRUPTION_BASES, *CLEAN_NAMES)
  close = difflib.get_close_matches(base, known, n=1, cutoff=0.8)
  if base not in known and base not in NUM_CLASSES and close:
    raise DataError(f'unknown dataset {name!r}; did you mean {close[0]!r}? Known names: '
                    f'{", ".join(CLEAN_NAMES)}, fashion_mnist_c/<corruption>_<severity>, '
                    'cifar10_c/<corruption>_<severity>, or a prepared TFDS name')
  return name


def _checked(name: str, images: np.ndarray, labels: np.ndarray, family: str) -> Dataset:
  """A ``Dataset`` whose pixels are finite and in range and whose labels fit the family."""
  fix = f'check or re-create the files behind dataset {name!r}'
  images = check_pixels(images, f'dataset {name!r}', fix)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) != len(labels):
    raise DataError(f'dataset {name!r}: images {images.shape} and labels {labels.shape} must be '
                    '[N, H, W, C] (C = 1 or 3) and [N]')
  if family in NUM_CLASSES:
    labels = check_labels(labels, NUM_CLASSES[family], f'dataset {name!r}', fix)
  return Dataset(name, images, labels.astype(np.int32), family)


def _split_train(images, labels, split, validation_size, seed):
  order = np.random.default_rng(seed).permutation(len(labels))
  train_ids, val_ids = order[:-validation_size], order[-validation_size:]
  ids = np.sort(train_ids if split == 'train' else val_ids)
  return images[ids], labels[ids]


def _clean(family: str, split: str, data_dir: str, tfds_data_dir: Optional[str],
           validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  source_split = 'test' if split == 'test' else 'train'
  if family == 'fashion_mnist':
    images, labels = fashion_mnist.load_split(source_split, data_dir)
  else:
    from ttmpd_jax.data.tfds_source import TfdsSource
    images, labels = TfdsSource(family, source_split, tfds_data_dir).load_all()
  if split in ('train', 'validation'):
    images, labels = _split_train(images, labels, split, validation_size, seed)
  return images, labels


def load(name: str, split: str = 'test', *, data_dir: str = fashion_mnist.DEFAULT_DIR,
         tfds_data_dir: Optional[str] = None, validation_size: int = 5000, split_seed: int = 0,
         corruption_seed: int = 0, limit: Optional[int] = None) -> Dataset:
  """Loads a named dataset split into memory (see the module docstring for names)."""
  if split not in ('train', 'validation', 'test'):
    raise ValueError(f'unknown split {split!r}; expected train, validation or test')
  base = check_name(name).partition('/')[0]
  if base in OUR_CORRUPTION_BASES:
    from ttmpd_jax.data import corruptions  # Imported lazily: it compiles JAX functions.
    _, corruption, severity = parse_corrupted_name(name)
    family = OUR_CORRUPTION_BASES[base]
    images, labels = _clean(family, 'test', data_dir, tfds_data_dir, validation_size, split_seed)
    if limit is not None:
      images, labels = images[:limit], labels[:limit]
    scaled = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    corrupted = corruptions.corrupt_in_chunks(scaled, corruption,
                                              severity, seed=corruption_seed)
    # Back to uint8, as a stored corrupted dataset would be (CIFAR-10-C ships uint8 too).
    images = np.clip(np.round(np.asarray(corrupted) * 255.0), 0, 255).astype(np.uint8)
    return _checked(name, images, labels, family)
  if name in CLEAN_NAMES:
    images, labels = _clean(name, split, data_dir, tfds_data_dir, validation_size, split_seed)
    return _checked(name, images, labels, name).take(limit)
  from ttmpd_jax.data.tfds_source import TfdsSource
  source = TfdsSource(name, split, tfds_data_dir)
  images, labels = source.load_all(limit)
  return _checked(name, images, labels, base.replace('_corrupted', ''))


__all__ = ['Dataset', 'DataMissingError', 'check_name', 'load', 'parse_corrupted_name']
