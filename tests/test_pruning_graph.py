"""Channel-group discovery: structure found on the zoo and on user models, and clear errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttmpd_jax import pruning
from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec, build_model
from ttmpd_jax.pruning.testing import random_variables


def _discover(name, kwargs, image_shape):
  model = build_model(ModelSpec(name, 10, kwargs))
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return pruning.discover_groups(model, variables, x)


def _members(group):
  return {(m.name, m.axis): m for m in group.members}


def test_resnet8_groups_residuals_and_bn():
  groups = _discover('resnet8', {'base_width': 8}, (16, 16, 1))
  assert [(g.name, g.size, g.prunable) for g in groups] == [
      ('stem', 8, True), ('stage1_block0/conv1', 8, True), ('stage2_block0/conv1', 16, True),
      ('stage2_block0/conv2', 16, True), ('stage3_block0/conv1', 32, True),
      ('stage3_block0/conv2', 32, True), ('head', 10, False)]
  by_name = pruning.group_by_name(groups)
  # The identity residual of stage 1 ties the stem to the block's conv2 and to every consumer.
  stem = _members(by_name['stem'])
  expected = {
      ('params/stem/kernel', 3): 'out', ('params/stem_bn/scale', 0): 'other',
      ('params/stem_bn/bias', 0): 'other', ('batch_stats/stem_bn/mean', 0): 'other',
      ('batch_stats/stem_bn/var', 0): 'other',
      ('params/stage1_block0/conv2/kernel', 3): 'out',
      ('params/stage1_block0/conv2_bn/scale', 0): 'other',
      ('params/stage1_block0/conv1/kernel', 2): 'in',
      ('params/stage2_block0/conv1/kernel', 2): 'in',
      ('params/stage2_block0/shortcut/kernel', 2): 'in',
  }
  for key, role in expected.items():
    assert stem[key].role == role and stem[key].index is None, key
  # A projection shortcut and the block's conv2 are summed: one group, named by its first
  # producer in call order (conv2 runs before the shortcut).
  s2 = _members(by_name['stage2_block0/conv2'])
  assert ('params/stage2_block0/shortcut/kernel', 3) in s2
  assert ('params/stage2_block0/shortcut_bn/bias', 0) in s2
  assert ('params/stage3_block0/conv1/kernel', 2) in s2
  # Global average pooling into the head: the head's input rows follow the last group.
  assert ('params/head/kernel', 0) in _members(by_name['stage3_block0/conv2'])
  assert by_name['head'].reason == 'feeds the model output'


def test_vgg_flatten_maps_dense_rows_to_channels():
  groups = _discover('vgg_small', {}, (16, 16, 1))
  conv4 = pruning.group_by_name(groups)['conv4']
  fc1 = _members(conv4)[('params/fc1/kernel', 0)]
  assert fc1.role == 'in'
  # [N, 2, 2, 128] flattened row-major: row s * 128 + c belongs to channel c.
  np.testing.assert_array_equal(fc1.channel_index(conv4.size), np.arange(2 * 2 * 128) % 128)


def test_mobilenetv2_depthwise_joins_the_expand_group():
  groups = _discover('mobilenetv2', {'width_multiplier': 0.25, 'small_input': True},
                     (16, 16, 3))
  g = pruning.group_by_name(groups)['stage2_block0/expand']
  members = _members(g)
  assert members[('params/stage2_block0/depthwise/kernel', 3)].role == 'out'
  assert ('params/stage2_block0/depthwise_bn/scale', 0) in members
  assert ('params/stage2_block0/project/kernel', 2) in members
  # No group ever contains a depthwise conv's size-1 input axis.
  assert all(not (m.path[-2] == 'depthwise' and m.axis == 2) for g in groups for m in g.members)
  assert [g.name for g in groups if not g.prunable] == ['head']


def test_resnet50_discovery_is_complete():
  groups = _discover('resnet50', {'base_width': 8}, (32, 32, 3))
  # 16 bottlenecks x 2 inner groups + 4 stage (residual) groups + stem + head.
  assert len(groups) == 16 * 2 + 4 + 1 + 1
  covered = {(m.path, m.axis) for g in groups for m in g.members}
  model = build_model(ModelSpec('resnet50', 10, {'base_width': 8}))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  for kp, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    path = pruning.graph.key_path(kp)
    # Every kernel's output axis and every BN vector belongs to a group.
    assert (path, leaf.ndim - 1) in covered, path


class _Concat(nn.Module):

  @nn.compact
  def __call__(self, x):
    a = nn.Conv(3, (1, 1), name='a')(x)
    b = nn.Conv(5, (1, 1), name='b')(x)
    y = nn.Conv(4, (1, 1), name='c')(jnp.concatenate([a, b], axis=-1))
    return nn.Dense(2, name='head')(y.mean((1, 2)))


def test_concatenation_offsets():
  x = jnp.zeros((1, 4, 4, 2))
  model = _Concat()
  variables = random_variables(model, x)
  groups = pruning.group_by_name(pruning.discover_groups(model, variables, x))
  a = _members(groups['a'])[('params/c/kernel', 2)]
  b = _members(groups['b'])[('params/c/kernel', 2)]
  assert a.index == (0, 1, 2, -1, -1, -1, -1, -1)
  assert b.index == (-1, -1, -1, 0, 1, 2, 3, 4)
  masks = {'a': np.array([True, False, True]), 'b': np.array([False, True, True, False, True])}
  small = pruning.remove_channels(variables, tuple(groups.values()), masks)
  np.testing.assert_array_equal(small['params']['c']['kernel'][0, 0],
                                np.asarray(variables['params']['c']['kernel'][0, 0])[[0, 2, 4, 5, 7]])


def test_plain_function_and_abstract_inputs():
  """Discovery accepts any f(variables, x) and abstract shapes."""

  def f(v, x):
    h = jax.nn.relu(x @ v['w1'] + v['b1'])
    return h @ v['w2']

  v = {'w1': jnp.ones((6, 7)), 'b1': jnp.ones((7,)), 'w2': jnp.ones((7, 3))}
  groups = pruning.discover_groups(f, v, jax.ShapeDtypeStruct((2, 6), jnp.float32))
  assert [(g.name, g.size, g.prunable) for g in groups] == [('w1', 7, True), ('w2', 3, False)]
  assert {m.name for m in groups[0].members} == {'w1', 'b1', 'w2'}


class _LayerNormNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name='ln')(nn.Conv(8, (3, 3), name='conv')(x))
    return nn.Dense(3, name='head')(x.mean((1, 2)))


class _Grouped(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), name='conv')(x)
    x = nn.Conv(8, (3, 3), feature_group_count=2, name='grouped')(x)
    return nn.Dense(3, name='head')(x.mean((1, 2)))


class _Custom(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jax.lax.bessel_i1e(nn.Conv(8, (3, 3), name='conv')(x))
    return nn.Dense(3, name='head')(x.mean((1, 2)))


@pytest.mark.parametrize('model,needle', [
    (_LayerNormNet(), "layer 'ln' (LayerNorm), not a supported layer kind"),
    (_Grouped(), "grouped convolution (feature_group_count=2"),
    (_Custom(), "unsupported primitive 'bessel_i1e'"),
])
def test_untraceable_layers_raise_naming_group_and_layer(model, needle):
  x = jnp.zeros((1, 6, 6, 2))
  variables = random_variables(model, x)
  with pytest.raises(pruning.UnsupportedLayerError) as info:
    pruning.discover_groups(model, variables, x)
  assert isinstance(info.value, UserError)
  assert "channel group 'conv'" in str(info.value) and needle in str(info.value)
  frozen = pruning.group_by_name(pruning.discover_groups(model, variables, x,
                                                         on_unsupported='freeze'))
  assert not frozen['conv'].prunable and needle.split(' (')[0] in frozen['conv'].reason


def test_declared_elementwise_primitive_is_followed():
  model, x = _Custom(), jax.random.normal(jax.random.key(1), (2, 6, 6, 2))
  variables = random_variables(model, x)
  groups = pruning.discover_groups(model, variables, x, elementwise_primitives=('bessel_i1e',))
  assert pruning.group_by_name(groups)['conv'].prunable
  masks = {'conv': np.array([True, False] * 4)}
  y_masked = model.apply(pruning.apply_masks(variables, masks, groups), x)
  y_small = pruning.run_pruned(model, pruning.remove_channels(variables, groups, masks), x)
  np.testing.assert_allclose(y_masked, y_small, atol=1e-6)


def test_channels_tied_to_input_or_constants_are_not_prunable():

  class InputResidual(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = x + nn.Conv(3, (3, 3), name='conv')(x)  # Residual from the image itself.
      y = nn.Conv(4, (1, 1), name='conv2')(x) * jnp.arange(4.0)  # Baked-in constant.
      return nn.Dense(2, name='head')(y.mean((1, 2)))

  x = jnp.zeros((1, 6, 6, 3))
  model = InputResidual()
  groups = pruning.group_by_name(
      pruning.discover_groups(model, random_variables(model, x), x))
  assert groups['conv'].reason == 'tied to the model input'
  assert not groups['conv2'].prunable
