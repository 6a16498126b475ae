"""Fashion-MNIST read straight from its IDX ``.gz`` files (no TFDS, no network).

The Debian package ``dataset-fashion-mnist`` installs the four files into
``/usr/share/datasets/fashion-mnist``. Debian rewrote their gzip headers, so TFDS's registered
checksums do not match them; the IDX format is trivial, so we read it ourselves.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from ttmpd_jax.errors import DataError, UserError, one_line

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


_FIX = ('re-install it (`apt-get install --reinstall -y dataset-fashion-mnist`) or point '
        '--data_dir at a folder with intact copies of the four IDX .gz files')


def read_idx(path: str) -> np.ndarray:
  """Parses one (optionally gzipped) IDX file into an array of its declared dtype and shape.

  Raises ``DataError`` (a ``ValueError``) naming the file when it cannot be read, is not an IDX
  file (bad magic number) or is truncated/padded.
  """
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'cannot read IDX file {path} ({one_line(e, 120)}); {_FIX}') from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DataError(f'{path} is not an IDX file (bad magic number); {_FIX}')
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise DataError(f'{path}: IDX header truncated ({len(raw)} bytes); {_FIX}')
  shape = struct.unpack(f'>{ndim}I', raw[4:4 + 4 * ndim])
  expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise DataError(f'{path}: expected {expected} bytes for shape {shape}, found {len(raw)} '
                    f'(truncated or corrupted); {_FIX}')
  array = np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape)
  return array.astype(dtype.newbyteorder('='))


def load_split(split: str, data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(images uint8 [N, 28, 28, 1], labels int32 [N])`` for 'train' (60k) or 'test' (10k).

  Design choice: the files are checked here, where they are read: shapes must match, integer
  pixels must lie in 0..255 (returned as uint8), float pixels must be finite and in [0, 1]
  (returned as float32), labels must be integers in 0..9. A file that breaks this raises
  ``DataError`` naming it, instead of quietly collapsing accuracy later.
  """
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
    raise DataError(f'{image_file} and {label_file} do not match: images {images.shape} and '
                    f'labels {labels.shape} (expected [N, 28, 28] and [N]); {_FIX}')
  images = check_pixels(images, image_file, _FIX)
  return images[..., None], check_labels(labels, len(CLASS_NAMES), label_file, _FIX)


def check_pixels(images: np.ndarray, source: str, fix: str) -> np.ndarray:
  """``images`` as uint8 (integers in 0..255) or float32 (finite, in [0, 1]), else ``DataError``."""
  if np.issubdtype(images.dtype, np.floating):
    finite = np.isfinite(images)
    if not finite.all():
      raise DataError(f'{source}: {int((~finite).sum())} pixel values are NaN or infinite '
                      f'(first at flat index {int(np.argmin(finite.ravel()))}); {fix}')
    low, high = float(images.min(initial=0.0)), float(images.max(initial=0.0))
    if low < 0.0 or high > 1.0:
      raise DataError(f'{source}: float pixels must lie in [0, 1], found [{low:g}, {high:g}]; '
                      f'{fix}')
    return images.astype(np.float32, copy=False)
  if not np.issubdtype(images.dtype, np.integer):
    raise DataError(f'{source}: pixels have dtype {images.dtype}, expected integers or floats')
  if images.dtype != np.uint8 and images.size and (images.min() < 0 or images.max() > 255):
    raise DataError(f'{source}: integer pixels must lie in 0..255, found '
                    f'[{images.min()}, {images.max()}]; {fix}')
  return images.astype(np.uint8, copy=False)


def check_labels(labels: np.ndarray, num_classes: int, source: str, fix: str) -> np.ndarray:
  """``labels`` as int32 when they are integers in ``0..num_classes - 1``, else ``DataError``."""
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{source}: labels have dtype {labels.dtype}, expected integers; {fix}')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f'{source}: labels must lie in 0..{num_classes - 1}, found '
                    f'[{labels.min()}, {labels.max()}]; {fix}')
  return labels.astype(np.int32, copy=False)
