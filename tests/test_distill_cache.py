"""Pseudo-label cache: subset selection, one teacher pass, keys, disk round trip, bad input."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from ttmpd_jax import train
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.distill import cache as cache_lib
from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec, build_model

SPEC = ModelSpec('resnet8', 10, {'base_width': 4})


@pytest.fixture(scope='module')
def setup():
  """A random-init ResNet-8 teacher and 100 random 28x28 'test' images (no files needed)."""
  model = build_model(SPEC)
  variables = train.init_variables(model, (28, 28, 1), seed=0)
  rng = np.random.default_rng(0)
  data = Dataset('fake_c/noise_1', rng.integers(0, 256, (100, 28, 28, 1), dtype=np.uint8),
                 rng.integers(0, 10, 100).astype(np.int32), 'fashion_mnist')
  return model, variables, data


def test_select_subset_size_fraction_and_seed():
  a = cache_lib.select_subset(1000, 100, seed=3)
  assert a.dtype == np.int32 and len(a) == 100 and len(np.unique(a)) == 100
  assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
  np.testing.assert_array_equal(a, cache_lib.select_subset(1000, 100, seed=3))
  assert not np.array_equal(a, cache_lib.select_subset(1000, 100, seed=4))
  assert len(cache_lib.select_subset(1000, 0.05, seed=0)) == 50
  assert len(cache_lib.select_subset(10, 0.01, seed=0)) == 1  # At least one sample.
  assert len(cache_lib.select_subset(10, 1.0, seed=0)) == 10


@pytest.mark.parametrize('size, match', [(0, 'at least 1'), (-3, 'at least 1'),
                                         (1001, 'larger than the test set'),
                                         (0.0, r'\(0, 1\]'), (1.5, r'\(0, 1\]')])
def test_select_subset_bad_sizes(size, match):
  with pytest.raises(UserError, match=match):
    cache_lib.select_subset(1000, size, seed=0)


def test_select_subset_empty_data():
  with pytest.raises(UserError, match='empty test set'):
    cache_lib.select_subset(0, 10, seed=0)


def test_build_cache_matches_teacher_and_pads_last_batch(setup):
  model, variables, data = setup
  ids = cache_lib.select_subset(len(data), 37, seed=1)
  cache = cache_lib.build_cache(model, variables, data, ids, batch_size=16, print_fn=lambda s: None)
  assert cache.logits.shape == (37, 10) and cache.logits.dtype == np.float32
  np.testing.assert_array_equal(cache.ids, ids)
  direct = train.predict_dataset(model, variables, data)[ids]
  np.testing.assert_allclose(cache.logits, direct, atol=1e-5)
  assert cache.info['labelling_steps'] == 3  # ceil(37 / 16), last batch padded.
  np.testing.assert_array_equal(cache.pseudo_labels(), direct.argmax(-1))


def test_key_depends_on_teacher_ids_and_images(setup):
  model, variables, data = setup
  ids = np.arange(10, dtype=np.int32)
  key = cache_lib.key_for(variables, data, ids)
  assert key == cache_lib.key_for(jax.tree.map(np.array, variables), data, ids)
  other_teacher = jax.tree.map(lambda x: x, variables)
  other_teacher['params']['head']['bias'] = other_teacher['params']['head']['bias'] + 1e-3
  assert cache_lib.key_for(other_teacher, data, ids) != key
  assert cache_lib.key_for(variables, data, ids[:-1]) != key
  images = data.images.copy()
  images[3, 0, 0, 0] ^= 1  # One bit of one image in S.
  assert cache_lib.key_for(variables, Dataset(data.name, images, data.labels, data.family),
                           ids) != key
  renamed = Dataset('fake_c/noise_2', data.images, data.labels, data.family)
  assert cache_lib.key_for(variables, renamed, ids) != key


def test_save_load_round_trip_and_stale_cache_rejected(setup, tmp_path):
  model, variables, data = setup
  ids = cache_lib.select_subset(len(data), 20, seed=0)
  cache = cache_lib.build_cache(model, variables, data, ids, print_fn=lambda s: None)
  path = cache_lib.save(cache, str(tmp_path / 'c.npz'))
  loaded = cache_lib.load(path, expected_key=cache.key)
  np.testing.assert_array_equal(loaded.ids, cache.ids)
  np.testing.assert_array_equal(loaded.logits, cache.logits)
  assert loaded.key == cache.key and loaded.info['dataset'] == data.name
  other = train.init_variables(model, (28, 28, 1), seed=1)  # Another teacher.
  with pytest.raises(UserError, match='another teacher'):
    cache_lib.load(path, expected_key=cache_lib.key_for(other, data, ids))
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_load_or_build_reuses_only_its_own_cache(setup, tmp_path):
  model, variables, data = setup
  ids = cache_lib.select_subset(len(data), 20, seed=0)
  lines = []
  first = cache_lib.load_or_build(str(tmp_path), model, variables, data, ids, print_fn=lines.append)
  second = cache_lib.load_or_build(str(tmp_path), model, variables, data, ids,
                                   print_fn=lines.append)
  assert 'pseudo-labelled' in lines[0] and 'read from' in lines[1]
  np.testing.assert_array_equal(first.logits, second.logits)
  other = train.init_variables(model, (28, 28, 1), seed=1)
  third = cache_lib.load_or_build(str(tmp_path), model, other, data, ids, print_fn=lines.append)
  assert 'pseudo-labelled' in lines[2] and third.key != first.key
  assert not np.allclose(third.logits, first.logits)
  assert len(os.listdir(tmp_path)) == 2


def test_empty_and_malformed_caches(tmp_path):
  with pytest.raises(UserError, match='empty'):
    cache_lib.PseudoLabelCache(np.zeros(0, np.int32), np.zeros((0, 10), np.float32), 'k')
  with pytest.raises(UserError, match='malformed'):
    cache_lib.PseudoLabelCache(np.zeros(3, np.int32), np.zeros((2, 10), np.float32), 'k')
  with pytest.raises(UserError, match='not unique'):
    cache_lib.PseudoLabelCache(np.zeros(2, np.int32), np.zeros((2, 10), np.float32), 'k')
  with pytest.raises(UserError, match='no pseudo-label cache'):
    cache_lib.load(str(tmp_path / 'missing.npz'))
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not a zip file')
  with pytest.raises(UserError, match='unreadable'):
    cache_lib.load(str(bad))
  empty = tmp_path / 'empty.npz'
  np.savez(empty, ids=np.zeros(0, np.int32), logits=np.zeros((0, 10), np.float32),
           key=np.asarray('k'), format=np.asarray(cache_lib.FORMAT), info=np.asarray('{}'))
  with pytest.raises(UserError, match='empty'):
    cache_lib.load(str(empty))


def test_build_cache_bad_ids(setup):
  model, variables, data = setup
  with pytest.raises(UserError, match='non-empty'):
    cache_lib.build_cache(model, variables, data, np.zeros(0, np.int32))
  with pytest.raises(UserError, match=r'\[0, 100\)'):
    cache_lib.build_cache(model, variables, data, np.array([5, 100]))
