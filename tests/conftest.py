"""Shared fixtures: a tiny source model pretrained once per test session (seconds on 2 cores)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

from ttmpd_jax.data import fashion_mnist

FASHION_MNIST_DIR = os.environ.get('FASHION_MNIST_DIR', fashion_mnist.DEFAULT_DIR)

requires_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_DIR, 't10k-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST IDX files missing (apt-get install -y dataset-fashion-mnist)')


@dataclasses.dataclass
class Teacher:
  spec: Any
  model: Any
  variables: Any
  test_accuracy: float


@pytest.fixture(scope='session')
def fashion_train():
  from ttmpd_jax.data import datasets
  return datasets.load('fashion_mnist', 'train', data_dir=FASHION_MNIST_DIR)


@pytest.fixture(scope='session')
def fashion_test():
  from ttmpd_jax.data import datasets
  return datasets.load('fashion_mnist', 'test', data_dir=FASHION_MNIST_DIR)


@pytest.fixture(scope='session')
def tiny_teacher(fashion_train, fashion_test) -> Teacher:
  """ResNet-8 at base width 8, one pass over 12,800 clean training images (~100 SGD steps).

  Reaches roughly 75-80% clean test accuracy: good enough to distil from and prune, cheap enough
  for CI.
  """
  from ttmpd_jax import train
  from ttmpd_jax.models import ModelSpec, build_model
  spec = ModelSpec('resnet8', 10, {'base_width': 8})
  model = build_model(spec)
  variables, _ = train.pretrain(model, fashion_train.take(12800), epochs=1, batch_size=128,
                                learning_rate=0.1, weight_decay=5e-4, seed=0, log_every=1000,
                                print_fn=lambda s: None)
  acc = train.accuracy(model, variables, fashion_test.take(2000))
  return Teacher(spec, model, variables, acc)
