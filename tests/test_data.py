"""Fashion-MNIST IDX reader, dataset names, input pipeline, TFDS loader (mock data)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from tests.conftest import FASHION_MNIST_DIR, requires_fashion_mnist
from ttmpd_jax.data import datasets, fashion_mnist, pipeline
from ttmpd_jax.errors import UserError


@requires_fashion_mnist
def test_idx_reader_sizes_labels_balance(fashion_test):
  train_images, train_labels = fashion_mnist.load_split('train', FASHION_MNIST_DIR)
  assert train_images.shape == (60000, 28, 28, 1) and train_images.dtype == np.uint8
  assert fashion_test.images.shape == (10000, 28, 28, 1)
  for labels, per_class in ((train_labels, 6000), (fashion_test.labels, 1000)):
    assert labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(10))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), per_class)
  assert 50 < train_images.mean() < 90  # Real images, not zeros: Fashion-MNIST mean is ~73.


def _write_idx(path, array):
  codes = {np.dtype(np.uint8): 0x08}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
      f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def test_idx_roundtrip_and_truncated_file(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / 'a.gz', array)
  np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / 'a.gz')), array)
  with gzip.open(tmp_path / 'bad.gz', 'wb') as f:
    f.write(bytes([0, 0, 8, 3]) + struct.pack('>3I', 2, 3, 4) + b'\0' * 5)
  with pytest.raises(ValueError, match='expected'):
    fashion_mnist.read_idx(str(tmp_path / 'bad.gz'))


def test_missing_folder_names_folder_and_both_fixes(tmp_path):
  with pytest.raises(UserError) as info:
    fashion_mnist.load_split('test', str(tmp_path / 'nowhere'))
  message = str(info.value)
  assert str(tmp_path / 'nowhere') in message
  assert 'apt-get install -y dataset-fashion-mnist' in message and '--data_dir' in message


@requires_fashion_mnist
def test_validation_split_is_deterministic_and_disjoint():
  train = datasets.load('fashion_mnist', 'train', data_dir=FASHION_MNIST_DIR, validation_size=1000)
  val = datasets.load('fashion_mnist', 'validation', data_dir=FASHION_MNIST_DIR,
                      validation_size=1000)
  val2 = datasets.load('fashion_mnist', 'validation', data_dir=FASHION_MNIST_DIR,
                       validation_size=1000)
  assert len(train) == 59000 and len(val) == 1000
  np.testing.assert_array_equal(val.images, val2.images)
  train_rows = {row.tobytes() for row in train.images[:, ::4, ::4].reshape(len(train), -1)}
  overlap = sum(row.tobytes() in train_rows for row in val.images[:, ::4, ::4].reshape(1000, -1))
  assert overlap < 20  # Fashion-MNIST has a handful of exact duplicates; a split bug gives 1000.


@requires_fashion_mnist
def test_corrupted_dataset_name_is_deterministic_and_shifted():
  a = datasets.load('fashion_mnist_c/gaussian_noise_5', data_dir=FASHION_MNIST_DIR, limit=64)
  b = datasets.load('fashion_mnist_c/gaussian_noise_5', data_dir=FASHION_MNIST_DIR, limit=64)
  clean = datasets.load('fashion_mnist', 'test', data_dir=FASHION_MNIST_DIR, limit=64)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, clean.labels)
  assert a.family == 'fashion_mnist' and a.images.dtype == np.uint8
  assert np.abs(a.images.astype(float) - clean.images).mean() > 10


@pytest.mark.parametrize('name', ['fashion_mnist_c/not_a_corruption_5',
                                  'fashion_mnist_c/gaussian_noise_9', 'fashion_mnist_c/fog'])
def test_bad_corrupted_names(name):
  with pytest.raises(ValueError):
    datasets.load(name, data_dir=FASHION_MNIST_DIR, limit=4)


def test_pipeline_shuffle_batches_sharding_normalisation():
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(2, 1)
  labels = np.arange(10, dtype=np.int32)
  eval_batches = list(pipeline.batches(images, labels, 4, family='fashion_mnist'))
  assert [len(b['label']) for b in eval_batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in eval_batches]), labels)
  expected = (images[:4].astype(np.float32) / 255 - 0.2860) / 0.3530
  np.testing.assert_allclose(eval_batches[0]['image'], expected, rtol=1e-6)
  shuffled = [b['index'] for b in pipeline.batches(images, labels, 4, family='x', seed=3,
                                                   drop_remainder=True)]
  again = [b['index'] for b in pipeline.batches(images, labels, 4, family='x', seed=3,
                                                drop_remainder=True)]
  assert len(shuffled) == 2 and all(np.array_equal(a, b) for a, b in zip(shuffled, again))
  assert not np.array_equal(np.concatenate(shuffled), labels[:8])
  # Two hosts see disjoint halves of every global batch, together the whole batch.
  host0 = list(pipeline.batches(images, labels, 4, family='x', seed=3, drop_remainder=True,
                                process_index=0, process_count=2))
  host1 = list(pipeline.batches(images, labels, 4, family='x', seed=3, drop_remainder=True,
                                process_index=1, process_count=2))
  for a, b, full in zip(host0, host1, shuffled):
    np.testing.assert_array_equal(np.concatenate([a['index'], b['index']]), full)
  padded, n = pipeline.pad_batch(eval_batches[-1], 4)
  assert n == 2 and padded['image'].shape == (4, 2, 1, 1)


def test_tfds_data_source_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=24):
    test = datasets.load('cifar10_corrupted/fog_5', 'test')
    assert test.images.shape == (24, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.family == 'cifar10' and test.num_classes == 10
    assert test.labels.min() >= 0 and test.labels.max() < 10
    train = datasets.load('cifar10', 'train', validation_size=4)
    assert len(train) == 20
    batch = next(pipeline.batches(train.images, train.labels, 8, family=train.family))
    assert batch['image'].dtype == np.float32 and abs(float(batch['image'].mean())) < 3


def test_tfds_missing_dataset_is_a_user_error(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(UserError, match='not prepared'):
    datasets.load('cifar10_corrupted/fog_5', 'test', tfds_data_dir=str(tmp_path))
