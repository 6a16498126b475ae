"""Cost counting: predicted MACs/params from keep counts equal measurements of pruned models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttmpd_jax import pruning
from ttmpd_jax.models import ModelSpec, build_model
from ttmpd_jax.models.inspect import count_flops_and_params
from ttmpd_jax.pruning.testing import random_variables

CASES = [
    ('resnet8', {'base_width': 8}, (16, 16, 1)),
    ('resnet50', {'base_width': 8}, (32, 32, 3)),
    ('vgg_small', {}, (16, 16, 1)),
    ('mobilenetv2', {'width_multiplier': 0.25, 'small_input': True}, (16, 16, 3)),
]


@pytest.mark.parametrize('name,kwargs,image_shape', CASES, ids=[c[0] for c in CASES])
def test_cost_model_matches_measured_pruned_models(name, kwargs, image_shape):
  spec = ModelSpec(name, 10, kwargs)
  model = build_model(spec)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = random_variables(model, x)
  groups = pruning.discover_groups(model, variables, x)
  predict = pruning.cost_model(model, variables, groups, image_shape)
  full = pruning.count_cost(model, variables, image_shape)
  assert predict({}) == full
  assert (full.macs, full.params) == count_flops_and_params(model, variables, image_shape)
  for seed in range(3):
    masks = pruning.random_masks(seed, groups)
    small = pruning.remove_channels(variables, groups, masks)
    small_model = build_model(spec.with_widths_of(small))
    measured = pruning.count_cost(small_model, small, image_shape)
    assert (measured.macs, measured.params) == count_flops_and_params(small_model, small,
                                                                      image_shape)
    assert predict(pruning.kept_counts(masks)) == measured == predict.from_masks(masks)
  # Keeping half of every group's channels cuts MACs and parameters roughly four-fold.
  half = pruning.masks_from_scores(pruning.l2_norm(variables, groups), groups, keep=0.5)
  small = pruning.remove_channels(variables, groups, half)
  cost = pruning.count_cost(build_model(spec.with_widths_of(small)), small, image_shape)
  assert cost.macs < 0.35 * full.macs and cost.params < 0.4 * full.params


def test_cost_model_on_user_model_with_concat_and_flatten():

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      a = nn.Conv(6, (3, 3), name='a')(x)
      b = nn.Conv(4, (1, 1), name='b')(x)
      y = nn.relu(jnp.concatenate([a, b], -1))
      y = nn.Conv(y.shape[-1], (3, 3), feature_group_count=y.shape[-1], name='dw')(y)
      y = y.reshape((y.shape[0], -1))
      return nn.Dense(3, name='head')(nn.Dense(7, name='fc')(y))

  model, image_shape = Net(), (4, 4, 2)
  x = jnp.zeros((1, *image_shape))
  variables = random_variables(model, x)
  groups = pruning.discover_groups(model, variables, x)
  predict = pruning.cost_model(model, variables, groups, image_shape)
  masks = {'a': np.array([1, 0, 1, 1, 0, 0], bool), 'b': np.array([0, 1, 1, 0], bool),
           'fc': np.array([1, 1, 0, 0, 0, 0, 1], bool)}
  small = pruning.remove_channels(variables, groups, masks)
  params = sum(int(np.size(p)) for p in jax.tree.leaves(small['params']))
  # 16 positions. a: 9*2*3, b: 1*2*2, depthwise: 9*1*(3+2), fc: (16*5)*3, head: 3*3.
  macs = 16 * 9 * 2 * 3 + 16 * 2 * 2 + 16 * 9 * 5 + 80 * 3 + 3 * 3
  assert predict(pruning.kept_counts(masks)) == pruning.Cost(macs, params)
  assert pruning.count_cost(model, small, image_shape) == pruning.Cost(macs, params)
  assert predict({}) == pruning.count_cost(model, variables, image_shape)
