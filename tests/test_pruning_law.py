"""The law: a masked model and its physically pruned twin give the same outputs.

For every zoo model and a user-style model defined here (residual add, concatenation, depthwise
conv, flatten), for random masks keeping >= 1 channel per group: eval-mode outputs agree to 1e-5
(float32), train-mode outputs and the updated BatchNorm statistics of the kept channels agree
too, and ``shrink_groups`` equals re-discovery on the smaller model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmpd_jax import pruning
from ttmpd_jax.models import ModelSpec, build_model, widths_from_variables
from ttmpd_jax.pruning.testing import random_variables

ATOL = 1e-5


class UserBlock(nn.Module):
  """Concatenation of two branches -> depthwise conv -> projection, plus a residual add."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    a = nn.relu(bn('bn_a')(nn.Conv(12, (3, 3), use_bias=False, name='a')(x)))
    b = nn.relu(bn('bn_b')(nn.Conv(8, (1, 1), name='b')(x)))
    y = jnp.concatenate([a, b], axis=-1)
    y = nn.Conv(y.shape[-1], (3, 3), feature_group_count=y.shape[-1], name='dw')(y)
    y = nn.gelu(bn('bn_dw')(y))
    y = bn('bn_p')(nn.Conv(16, (1, 1), name='proj')(y))
    return nn.relu(x + y)


class UserNet(nn.Module):
  """A user-style model with every structure discovery must follow; hard-coded widths."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    x = nn.relu(bn('stem_bn')(nn.Conv(16, (3, 3), name='stem')(x)))
    x = UserBlock(name='block1')(x, train)
    x = nn.max_pool(x, (2, 2), (2, 2))
    # A concatenation feeding a dense conv: two groups, offset-mapped into 'mix'.
    c = jnp.concatenate([nn.relu(nn.Conv(6, (1, 1), name='left')(x)), x], axis=-1)
    x = nn.relu(bn('mix_bn')(nn.Conv(16, (3, 3), name='mix')(c)))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.silu(nn.Dense(24, name='fc1')(x))
    return nn.Dense(5, name='head')(x)


def _check_law(apply_fn, apply_removed, variables, groups, masks, x):
  """Masked (one jitted function for any mask) vs physically pruned outputs."""
  y_masked = _masked_forward(apply_fn, groups)(variables, masks, x)
  small = pruning.remove_channels(variables, groups, masks)
  y_small = apply_removed(small, x)
  assert y_masked.shape == y_small.shape
  np.testing.assert_allclose(np.asarray(y_masked), np.asarray(y_small), rtol=0, atol=ATOL)
  assert float(jnp.abs(y_masked).max()) > 1e-3  # Non-trivial outputs.
  return small


_MASKED = {}


def _masked_forward(apply_fn, groups):
  key = (apply_fn, groups)
  if key not in _MASKED:
    _MASKED[key] = jax.jit(lambda v, m, x: apply_fn(pruning.apply_masks(v, m, groups), x))
  return _MASKED[key]


def _zoo_removed(spec):
  return lambda v, x: jax.jit(build_model(spec.with_widths_of(v)).apply)(v, x)


def _zoo_case(name, kwargs, image_shape, batch, seed):
  """A zoo model with random variables, an input of ``batch`` images and its channel groups."""
  spec = ModelSpec(name, 10, kwargs)
  model = build_model(spec)
  x = jax.random.normal(jax.random.key(seed), (batch, *image_shape))
  variables = random_variables(model, x, seed=seed + 1)
  return spec, model, x, variables, pruning.discover_groups(model, variables, x)


ZOO = [
    # name, kwargs, image shape, number of random masks
    ('resnet8', {'base_width': 8}, (16, 16, 1), 4),
    ('resnet20', {'base_width': 4}, (16, 16, 3), 2),
    ('resnet56', {'base_width': 4}, (8, 8, 3), 1),
    ('resnet18', {'base_width': 8, 'small_input': True}, (16, 16, 3), 2),
    ('resnet50', {'base_width': 8}, (32, 32, 3), 2),
    ('vgg_small', {}, (16, 16, 1), 4),
    ('mobilenetv2', {'width_multiplier': 0.25, 'small_input': True}, (16, 16, 3), 2),
]


@pytest.mark.parametrize('name,kwargs,image_shape,trials', ZOO, ids=[z[0] for z in ZOO])
def test_zoo_masked_equals_removed(name, kwargs, image_shape, trials):
  spec, model, x, variables, groups = _zoo_case(name, kwargs, image_shape, batch=2, seed=1)
  assert [g.name for g in groups if not g.prunable] == ['head']
  for trial in range(trials):
    masks = pruning.random_masks(trial, groups)
    small = _check_law(model.apply, _zoo_removed(spec), variables, groups, masks, x)
    if trial == 0:
      small_model = build_model(spec.with_widths_of(small))
      assert pruning.shrink_groups(groups, masks) == pruning.discover_groups(small_model, small, x)


def test_user_model_masked_equals_removed_and_run_pruned():
  model = UserNet()
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = random_variables(model, x, seed=3)
  groups = pruning.discover_groups(model, variables, x)
  assert [g.name for g in groups] == ['stem', 'block1/a', 'block1/b', 'left', 'mix', 'fc1', 'head']
  run_small = jax.jit(lambda v, x: pruning.run_pruned(model, v, x))
  for trial in range(6):
    masks = pruning.random_masks(100 + trial, groups)
    small = _check_law(model.apply, run_small, variables, groups, masks, x)
  assert pruning.shrink_groups(groups, masks) == pruning.discover_groups(
      lambda v, x: pruning.run_pruned(model, v, x), small, x)


@settings(max_examples=8, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=9, max_size=9), seed=st.integers(0, 2**16))
def test_law_over_random_widths_and_masks(widths, seed):
  """Property: any resnet8 widths (residual groups included), any masks."""
  x = jax.random.normal(jax.random.key(seed), (2, 8, 8, 2))
  names = sorted(k for k in widths_from_variables(jax.eval_shape(
      build_model(ModelSpec('resnet8', 3)).init, jax.random.key(0), x)) if k != 'head')
  w = dict(zip(names, widths))
  # Residual adds need equal widths on both sides.
  w['stage1_block0/conv2'] = w['stem']
  for stage in (2, 3):
    w[f'stage{stage}_block0/conv2'] = w[f'stage{stage}_block0/shortcut']
  spec = ModelSpec('resnet8', 3, {}, w)
  model = build_model(spec)
  variables = random_variables(model, x, seed=seed)
  groups = pruning.discover_groups(model, variables, x)
  masks = pruning.random_masks(seed, groups)
  _check_law(model.apply, _zoo_removed(spec), variables, groups, masks, x)


def test_train_mode_outputs_and_batch_stats_match():
  """Adaptive BN sees the same statistics: masked channels are exactly zero before BN."""
  spec = ModelSpec('resnet8', 10, {'base_width': 8})
  model = build_model(spec)
  x = jax.random.normal(jax.random.key(4), (4, 12, 12, 1))
  variables = random_variables(model, x, seed=5)
  groups = pruning.discover_groups(model, variables, x)
  masks = pruning.random_masks(7, groups)
  train_apply = lambda m, v: m.apply(v, x, train=True, mutable=['batch_stats'])
  y1, upd1 = jax.jit(lambda v: train_apply(model, pruning.apply_masks(v, masks, groups)))(
      variables)
  small = pruning.remove_channels(variables, groups, masks)
  y2, upd2 = jax.jit(lambda v: train_apply(build_model(spec.with_widths_of(small)), v))(small)
  np.testing.assert_allclose(y1, y2, rtol=0, atol=ATOL)
  # The kept channels' new running statistics match those of the pruned model.
  upd1_small = pruning.remove_channels({**variables, **upd1}, groups, masks)
  for a, b in zip(jax.tree.leaves(upd1_small['batch_stats']), jax.tree.leaves(upd2['batch_stats'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_masks_all_true_is_identity():
  model = UserNet()
  x = jnp.zeros((2, 16, 16, 3))
  variables = random_variables(model, x, seed=3)
  groups = pruning.discover_groups(model, variables, x)
  masked = pruning.apply_masks(variables, pruning.keep_all(groups), groups)
  same = pruning.remove_channels(variables, groups, pruning.keep_all(groups))
  for a, b, c in zip(jax.tree.leaves(variables), jax.tree.leaves(masked), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.slow
@pytest.mark.parametrize('name,kwargs,image_shape,trials', ZOO, ids=[z[0] for z in ZOO])
def test_zoo_law_heavy_sweep(name, kwargs, image_shape, trials):
  spec, model, x, variables, groups = _zoo_case(name, kwargs, image_shape, batch=4, seed=11)
  for trial in range(10 * trials):
    masks = pruning.random_masks(1000 + trial, groups)
    _check_law(model.apply, _zoo_removed(spec), variables, groups, masks, x)
