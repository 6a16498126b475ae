"""NNX models through the pruning primitives: the adapter, the law, rebuilt modules, adaptive BN.

The NNX model below mirrors a linen model layer for layer (same names, same variable trees), so
the two can be compared directly: same outputs, same channel groups, same cost, same adapted
BatchNorm statistics.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmpd_jax import pruning
from ttmpd_jax.distill import bn_adapt
from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning.testing import randomize

IMAGE = (8, 8, 3)


class NNXNet(nnx.Module):
  """Stem, a block with a depthwise conv and a residual add, a flatten into a dense head."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 12, (3, 3), rngs=rngs)
    self.stem_bn = nnx.BatchNorm(12, rngs=rngs)
    self.expand = nnx.Conv(12, 16, (1, 1), use_bias=False, rngs=rngs)
    self.expand_bn = nnx.BatchNorm(16, rngs=rngs)
    self.dw = nnx.Conv(16, 16, (3, 3), feature_group_count=16, rngs=rngs)
    self.dw_bn = nnx.BatchNorm(16, rngs=rngs)
    self.project = nnx.Conv(16, 12, (1, 1), use_bias=False, rngs=rngs)
    self.project_bn = nnx.BatchNorm(12, rngs=rngs)
    self.fc = nnx.Linear(4 * 4 * 12, 10, rngs=rngs)
    self.head = nnx.Linear(10, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    y = nnx.relu(self.expand_bn(self.expand(x)))
    y = nnx.gelu(self.dw_bn(self.dw(y)))
    x = x + self.project_bn(self.project(y))
    x = nnx.avg_pool(x, (2, 2), (2, 2))
    return self.head(nnx.silu(self.fc(x.reshape((x.shape[0], -1)))))


class LinenNet(nn.Module):
  """The same network in linen."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda name: nn.BatchNorm(not train, momentum=0.99, epsilon=1e-5, name=name)
    x = nn.relu(bn('stem_bn')(nn.Conv(12, (3, 3), name='stem')(x)))
    y = nn.relu(bn('expand_bn')(nn.Conv(16, (1, 1), use_bias=False, name='expand')(x)))
    y = nn.gelu(bn('dw_bn')(nn.Conv(16, (3, 3), feature_group_count=16, name='dw')(y)))
    x = x + bn('project_bn')(nn.Conv(12, (1, 1), use_bias=False, name='project')(y))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(5, name='head')(nn.silu(nn.Dense(10, name='fc')(x.reshape((x.shape[0], -1)))))


@pytest.fixture(scope='module')
def case():
  adapter, variables = pruning.from_nnx(NNXNet(nnx.Rngs(0)))
  variables = randomize(variables, seed=2)
  x = jax.random.normal(jax.random.key(1), (4, *IMAGE))
  groups = pruning.discover_groups(adapter, variables, x)
  return adapter, variables, groups, x


def test_adapter_speaks_the_linen_convention(case):
  adapter, variables, _, x = case
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['batch_stats']['dw_bn']) == {'mean', 'var'}
  y = jax.jit(adapter.apply)(variables, x)
  y_eager = adapter.apply(variables, x)
  assert y.shape == (4, 5)
  y_train, updates = jax.jit(
      lambda v, x: adapter.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  assert set(updates) == {'batch_stats'}
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(variables['batch_stats'])
  assert not np.allclose(y, y_train)  # Train mode normalises with batch statistics.
  # The adapter keeps no state: a train-mode call changed nothing inside it.
  np.testing.assert_array_equal(adapter.apply(variables, x), y_eager)
  np.testing.assert_allclose(y_eager, y, atol=1e-6)
  with pytest.raises(UserError, match="lacks 'stem/bias'"):
    adapter.apply({'params': {k: v for k, v in variables['params'].items() if k != 'stem'},
                   'batch_stats': variables['batch_stats']}, x)
  with pytest.raises(UserError, match='unknown collection'):
    adapter.apply(variables, x, mutable=['cache'])


def test_groups_match_the_linen_twin(case):
  adapter, variables, groups, x = case
  assert [(g.name, g.size, g.prunable) for g in groups] == [
      ('stem', 12, True), ('expand', 16, True), ('fc', 10, True), ('head', 5, False)]
  twin = pruning.discover_groups(LinenNet(), variables, x)
  assert groups == twin
  assert pruning.count_cost(adapter, variables, IMAGE) == pruning.count_cost(LinenNet(), variables,
                                                                            IMAGE)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_masked_equals_removed_and_rebuilt_module(case, seed):
  adapter, variables, groups, x = case
  masks = pruning.random_masks(seed, groups)
  y_masked = _masked_apply(adapter, groups)(variables, masks, x)
  small = pruning.remove_channels(variables, groups, masks)
  y_small = pruning.run_pruned(adapter, small, x)
  np.testing.assert_allclose(np.asarray(y_small), np.asarray(y_masked), rtol=0, atol=1e-5)
  # A real module of the new sizes, its size attributes updated.
  module = adapter.to_module(small)
  kept = pruning.kept_counts(masks)
  assert module.stem.out_features == module.stem_bn.num_features == kept['stem']
  assert module.dw.in_features == module.dw.out_features == kept['expand']
  assert module.dw.feature_group_count == kept['expand']
  assert module.fc.in_features == 4 * 4 * kept['stem'] and module.fc.out_features == kept['fc']
  module = nnx.view(module, use_running_average=True)
  np.testing.assert_allclose(np.asarray(module(x)), np.asarray(y_masked), rtol=0, atol=1e-5)
  assert pruning.count_cost(adapter, small, IMAGE) == pruning.cost_model(
      adapter, variables, groups, IMAGE)(kept)
  # Train mode: outputs and the kept channels' running statistics agree too.
  masked = pruning.apply_masks(variables, masks, groups)
  yt_masked, upd_masked = adapter.apply(masked, x, train=True, mutable='batch_stats')
  yt_small, upd_small = pruning.run_pruned(adapter, small, x, train=True, mutable='batch_stats')
  np.testing.assert_allclose(np.asarray(yt_small), np.asarray(yt_masked), rtol=0, atol=1e-4)
  keep = np.asarray(masks['expand'])
  np.testing.assert_allclose(np.asarray(upd_small['batch_stats']['dw_bn']['mean']),
                             np.asarray(upd_masked['batch_stats']['dw_bn']['mean'])[keep],
                             atol=1e-5)


_MASKED = {}


def _masked_apply(adapter, groups):
  if groups not in _MASKED:
    _MASKED[groups] = jax.jit(
        lambda v, m, x: adapter.apply(pruning.apply_masks(v, m, groups), x))
  return _MASKED[groups]


def test_adaptive_bn_agrees_with_the_linen_twin(case):
  adapter, variables, groups, _ = case
  batches = jax.random.normal(jax.random.key(5), (2, 8, *IMAGE)) * 1.5 + 0.3
  masks = pruning.random_masks(3, groups)
  transform = lambda v, m: pruning.apply_masks(v, m, groups)
  adapted = {name: bn_adapt.make_bn_adapter(model, transform)(variables, masks, batches)
             for name, model in (('nnx', adapter), ('linen', LinenNet()))}
  # The twins compute the same function.
  np.testing.assert_allclose(adapter.apply(variables, batches[0]),
                             LinenNet().apply(variables, batches[0]), rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(adapted['nnx']), jax.tree.leaves(adapted['linen'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # Exact batch moments: one batch's statistics are the batch's own mean/variance.
  moments = bn_adapt.batch_moments(adapter, variables, batches[0])
  stem = jax.lax.conv_general_dilated(
      batches[0], variables['params']['stem']['kernel'], (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + variables['params']['stem']['bias']
  np.testing.assert_allclose(np.asarray(moments['stem_bn']['mean']),
                             np.asarray(stem.mean((0, 1, 2))), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(moments['stem_bn']['var']),
                             np.asarray(stem.var((0, 1, 2))), rtol=1e-4, atol=1e-6)
  # The statistics moved away from the stored ones.
  assert not np.allclose(adapted['nnx']['batch_stats']['stem_bn']['mean'],
                         variables['batch_stats']['stem_bn']['mean'])
