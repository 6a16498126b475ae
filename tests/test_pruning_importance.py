"""Importance criteria: exact values on hand-checkable models, aggregation, Taylor, random."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttmpd_jax import pruning
from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec, build_model
from ttmpd_jax.pruning.testing import random_variables


@pytest.fixture(scope='module')
def resnet8():
  model = build_model(ModelSpec('resnet8', 10, {'base_width': 4}))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  variables = random_variables(model, x, seed=1)
  return model, variables, pruning.discover_groups(model, variables, x), x


def test_filter_norms_sum_over_the_residual_group(resnet8):
  _, v, groups, _ = resnet8
  p = v['params']
  l2 = pruning.l2_norm(v, groups)
  l1 = pruning.l1_norm(v, groups)
  assert set(l2) == {g.name for g in groups if g.prunable}
  # The stem group's producers: the stem conv and stage 1's conv2 (identity residual).
  k1, k2 = p['stem']['kernel'], p['stage1_block0']['conv2']['kernel']
  expected_l2 = (jnp.sqrt((k1**2).sum((0, 1, 2))) + jnp.sqrt((k2**2).sum((0, 1, 2))))
  np.testing.assert_allclose(l2['stem'], expected_l2, rtol=1e-6)
  np.testing.assert_allclose(l1['stem'], jnp.abs(k1).sum((0, 1, 2)) + jnp.abs(k2).sum((0, 1, 2)),
                             rtol=1e-6)
  mean = pruning.l2_norm(v, groups, aggregate='mean', normalize='mean')
  np.testing.assert_allclose(mean['stem'], expected_l2 / expected_l2.mean(), rtol=1e-6)
  # Consumers' input slices: stage 1 conv1, stage 2 conv1 and shortcut.
  cons = pruning.l2_norm(v, groups, members='in')['stem']
  expected = sum(jnp.sqrt((p[a][b]['kernel']**2).sum((0, 1, 3))) for a, b in
                 (('stage1_block0', 'conv1'), ('stage2_block0', 'conv1'),
                  ('stage2_block0', 'shortcut')))
  np.testing.assert_allclose(cons, expected, rtol=1e-6)


def test_flattened_rows_count_once_per_channel():
  """VGG's fc1 rows of one conv channel (one per spatial position) form one slice."""
  model = build_model(ModelSpec('vgg_small', 10))
  x = jnp.zeros((1, 16, 16, 1))
  v = random_variables(model, x)
  groups = pruning.discover_groups(model, v, x)
  scores = pruning.l2_norm(v, groups, members='in')['conv4']
  rows = np.asarray(v['params']['fc1']['kernel']).reshape(2, 2, 128, -1)  # [h, w, C, hidden]
  np.testing.assert_allclose(scores, np.sqrt((rows**2).sum((0, 1, 3))), rtol=1e-5)


def test_bn_scale_and_taylor(resnet8):
  model, v, groups, x = resnet8
  labels = jnp.arange(4) % 10

  def loss(params):
    logits = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.jit(jax.grad(loss))(v['params'])
  p = v['params']
  gamma = pruning.bn_scale(v, groups)
  np.testing.assert_allclose(gamma['stage2_block0/conv1'],
                             jnp.abs(p['stage2_block0']['conv1_bn']['scale']))
  # A residual group sums its BNs: conv2's and the projection shortcut's.
  np.testing.assert_allclose(
      gamma['stage2_block0/conv2'], jnp.abs(p['stage2_block0']['conv2_bn']['scale']) +
      jnp.abs(p['stage2_block0']['shortcut_bn']['scale']), rtol=1e-6)
  t = pruning.taylor(v, grads, groups)
  bn, gbn = p['stage2_block0']['conv1_bn'], grads['stage2_block0']['conv1_bn']
  np.testing.assert_allclose(t['stage2_block0/conv1'],
                             jnp.abs(bn['scale'] * gbn['scale'] + bn['bias'] * gbn['bias']),
                             rtol=1e-5)
  tw = pruning.taylor(v, grads, groups, on='weight')
  k, gk = p['stage2_block0']['conv1']['kernel'], grads['stage2_block0']['conv1']['kernel']
  np.testing.assert_allclose(tw['stage2_block0/conv1'], jnp.abs((k * gk).sum((0, 1, 2))),
                             rtol=1e-5)
  assert all(float(s.max()) > 0 for s in t.values())
  with pytest.raises(UserError, match='bn'):
    pruning.taylor(v, grads, groups, on='nope')


def test_random_scores_and_errors(resnet8):
  _, v, groups, _ = resnet8
  a = pruning.random_scores(jax.random.key(0), groups)
  b = pruning.random_scores(jax.random.key(0), groups)
  c = pruning.random_scores(jax.random.key(1), groups)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not all(np.array_equal(a[k], c[k]) for k in a)
  with pytest.raises(UserError, match='aggregate'):
    pruning.l2_norm(v, groups, aggregate='median')
  with pytest.raises(UserError, match='members'):
    pruning.l1_norm(v, groups, members='both')


def test_scores_to_masks_prune_the_weakest_filters():
  """End to end on a Dense model: zeroed filters score lowest and are removed first."""

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='out')(nn.relu(nn.Dense(8, name='hidden')(x)))

  model, x = MLP(), jnp.ones((2, 5))
  v = random_variables(model, x)
  kernel = v['params']['hidden']['kernel'].at[:, jnp.array([1, 6])].multiply(1e-3)
  v = {'params': {**v['params'], 'hidden': {**v['params']['hidden'], 'kernel': kernel}}}
  groups = pruning.discover_groups(model, v, x)
  masks = pruning.masks_from_scores(pruning.l2_norm(v, groups), groups, keep=6)
  np.testing.assert_array_equal(np.flatnonzero(~masks['hidden']), [1, 6])


def test_taylor_bn_falls_back_to_weights_without_a_norm_layer():
  model = build_model(ModelSpec('vgg_small', 10))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  v = random_variables(model, x)
  groups = pruning.discover_groups(model, v, x)
  grads = jax.jit(jax.grad(lambda p: model.apply({**v, 'params': p}, x).sum()))(v['params'])
  bn, weight = pruning.taylor(v, grads, groups), pruning.taylor(v, grads, groups, on='weight')
  np.testing.assert_array_equal(bn['fc1'], weight['fc1'])  # fc1 has no BatchNorm.
  assert not np.array_equal(bn['conv4'], weight['conv4'])


def test_norms_of_one_dimensional_weights_are_magnitudes():
  # A [C] weight (e.g. a per-channel scale acting as a producer): the norm of each channel's
  # one-element slice is its magnitude, never signed or NaN.
  w = jnp.array([-3.0, 4.0, -0.5])
  group = pruning.ChannelGroup('g', 3, (pruning.Member(('params', 'w'), 0, 'out'),))
  variables = {'params': {'w': w}}
  for members in ('out', 'all'):
    np.testing.assert_allclose(pruning.l1_norm(variables, [group], members=members)['g'],
                               [3.0, 4.0, 0.5])
    np.testing.assert_allclose(pruning.l2_norm(variables, [group], members=members)['g'],
                               [3.0, 4.0, 0.5])
  np.testing.assert_allclose(
      pruning.per_channel(w, group.members[0], 3, lambda x, a: jnp.abs(x).sum(a)), [3, 4, 0.5])
