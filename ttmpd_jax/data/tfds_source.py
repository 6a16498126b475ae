"""Standard datasets through ``tfds.data_source`` (array_record random access; no TensorFlow).

Covers ``cifar10``, ``cifar10_corrupted/<corruption>_<severity>``, ``fashion_mnist``,
``imagenet2012_corrupted/<corruption>_<severity>`` and anything else TFDS has prepared in
``--tfds_data_dir``. The datasets must already be prepared there (``tfds build`` on a machine
with TensorFlow and internet, then copy the folder): this module never downloads.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ttmpd_jax.errors import DataError, UserError, one_line


class TfdsSource:
  """Random-access view of one TFDS split: ``source[indices] -> (images uint8, labels int32)``."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               image_key: str = 'image', label_key: str = 'label'):
    try:
      import tensorflow_datasets as tfds  # Heavy import, only when a TFDS dataset is asked for.
    except ImportError as e:
      raise UserError(f'dataset {name!r} needs TFDS, which is not installed ({e}); '
                      '`pip install tensorflow-datasets`, or use fashion_mnist / '
                      'fashion_mnist_c/<corruption>_<severity>') from e
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several unrelated types for "not prepared".
      raise UserError(
          f'TFDS dataset {name!r} split {split!r} is not prepared in '
          f'{data_dir or "the default TFDS folder (~/tensorflow_datasets)"}: {one_line(e, 200)}. '
          'Prepare it with `tfds build` on a machine with internet and pass --tfds_data_dir.'
      ) from e
    self.name, self.split = name, split
    self._image_key, self._label_key = image_key, label_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    records = [self._source[int(i)] for i in indices]
    images = np.stack([np.asarray(r[self._image_key]) for r in records])
    labels = np.asarray([r[self._label_key] for r in records], np.int32)
    if images.ndim == 3:
      images = images[..., None]
    return images, labels

  def load_all(self, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Materialises the split (or its first ``limit`` examples) as numpy arrays."""
    n = len(self) if limit is None else min(limit, len(self))
    try:
      chunks = [self[range(i, min(i + 1024, n))] for i in range(0, n, 1024)]
    except (OSError, ValueError, KeyError) as e:  # Unreadable or damaged record files.
      raise DataError(f'TFDS dataset {self.name!r} split {self.split!r} cannot be read '
                      f'({type(e).__name__}: {one_line(e, 200)}); re-prepare it with `tfds build`'
                      ) from e
    if not chunks:
      raise DataError(f'TFDS dataset {self.name!r} split {self.split!r} is empty')
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
