"""Fashion-MNIST read straight from its IDX ``.gz`` files (no TFDS, no network).

The Debian package ``dataset-fashion-mnist`` installs the four files into
``/usr/share/datasets/fashion-mnist``. Debian rewrote their gzip headers, so TFDS's registered
checksums do not match them; the IDX format is trivial, so we read it ourselves.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from ttmpd_jax.errors import UserError

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')
_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


class DataMissingError(UserError, FileNotFoundError):
  """The dataset files are not where we were told to look."""


def read_idx(path: str) -> np.ndarray:
  """Parses one (optionally gzipped) IDX file into an array of its declared dtype and shape."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f'cannot read IDX file {path}: {e}') from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an IDX file (bad magic number)')
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  shape = struct.unpack(f'>{ndim}I', raw[4:4 + 4 * ndim])
  expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(f'{path}: expected {expected} bytes for shape {shape}, found {len(raw)}')
  return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder('='))


def load_split(split: str, data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(images uint8 [N, 28, 28, 1], labels int32 [N])`` for 'train' (60k) or 'test' (10k)."""
  if split not in _FILES:
    raise ValueError(f'unknown Fashion-MNIST split {split!r}; expected one of {sorted(_FILES)}')
  image_file, label_file = (os.path.join(data_dir, name) for name in _FILES[split])
  for path in (image_file, label_file):
    if not os.path.exists(path):
      raise DataMissingError(
          f'Fashion-MNIST not found: {path} is missing. Fix: `apt-get install -y '
          f'dataset-fashion-mnist` (installs into {DEFAULT_DIR}), or pass --data_dir=<folder '
          'holding the four IDX .gz files>.')
  images, labels = read_idx(image_file), read_idx(label_file)
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f'{data_dir}: images {images.shape} and labels {labels.shape} do not match')
  return images[..., None], labels.astype(np.int32)
