"""Model zoo: init, output shapes, width specs shrink parameters, spec round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttmpd_jax.models import ModelSpec, build_model, widths_from_variables
from ttmpd_jax.models.inspect import count_flops_and_params

ZOO = [
    ('resnet8', {'base_width': 8}, (16, 16, 1)),
    ('resnet20', {'base_width': 4}, (16, 16, 3)),
    ('resnet56', {'base_width': 4}, (8, 8, 3)),
    ('resnet18', {'base_width': 8, 'small_input': True}, (16, 16, 3)),
    ('resnet50', {'base_width': 8}, (32, 32, 3)),
    ('vgg_small', {}, (16, 16, 1)),
    ('mobilenetv2', {'width_multiplier': 0.25, 'small_input': True}, (16, 16, 3)),
]


def _params(variables):
  return sum(int(x.size) for x in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('name,kwargs,image_shape', ZOO, ids=[z[0] for z in ZOO])
def test_zoo_model_init_shapes_and_narrower_widths(name, kwargs, image_shape):
  spec = ModelSpec(name, 7, kwargs)
  model = build_model(spec)
  x = jnp.ones((2, *image_shape))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert set(variables) == {'params', 'batch_stats'}
  assert jax.eval_shape(lambda v: model.apply(v, x), variables).shape == (2, 7)
  widths = widths_from_variables(variables)
  assert widths['head'] == 7
  narrower = {k: max(1, w // 2) for k, w in widths.items()
              if k != 'head' and 'depthwise' not in k}
  small_spec = spec.with_widths(narrower)
  small_model = build_model(small_spec)
  small = jax.eval_shape(lambda: small_model.init(jax.random.key(0), x))
  assert jax.eval_shape(lambda v: small_model.apply(v, x), small).shape == (2, 7)
  assert _params(small) < 0.5 * _params(variables)
  # The narrower model really has the requested widths, and reading them back round-trips.
  read_back = widths_from_variables(small)
  assert all(read_back[k] == w for k, w in narrower.items())
  assert ModelSpec.from_json(small_spec.to_json()) == small_spec
  macs, _ = count_flops_and_params(model, variables, image_shape)
  small_macs, _ = count_flops_and_params(small_model, small, image_shape)
  assert small_macs < 0.5 * macs


def test_real_forward_and_train_mode_updates_batch_stats():
  model = build_model(ModelSpec('resnet8', 10, {'base_width': 4}))
  x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
  variables = model.init(jax.random.key(0), x)
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
  before = variables['batch_stats']['stem_bn']['mean']
  assert not np.allclose(updates['batch_stats']['stem_bn']['mean'], before)


def test_unknown_model_and_bad_depth():
  with pytest.raises(ValueError, match='valid models'):
    build_model(ModelSpec('resnet7', 10))
  from ttmpd_jax.models import CifarResNet
  with pytest.raises(ValueError, match='6n\\+2'):
    CifarResNet(depth=21).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
