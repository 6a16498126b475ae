"""Masks: validation errors, score -> mask helpers, jit, gradients and masked training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttmpd_jax import pruning
from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec, build_model
from ttmpd_jax.pruning.testing import random_variables

SPEC = ModelSpec('resnet8', 10, {'base_width': 4})


@pytest.fixture(scope='module')
def setup():
  model = build_model(SPEC)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  variables = random_variables(model, x)
  groups = pruning.discover_groups(model, variables, x)
  return model, variables, groups, x


@pytest.mark.parametrize('masks,needle', [
    ({'stem_typo': np.ones(4, bool)}, "unknown channel group 'stem_typo'"),
    ({'head': np.ones(10, bool)}, "channel group 'head' is not prunable"),
    ({'stem': np.ones(5, bool)}, "'stem' has shape (5,), expected (4,)"),
    ({'stem': np.ones(4, np.float32)}, "'stem' has dtype float32, expected bool"),
    ({'stem': np.zeros(4, bool)}, "'stem' keeps no channel"),
])
def test_bad_masks_raise_naming_the_group(setup, masks, needle):
  model, variables, groups, _ = setup
  for fn in (lambda: pruning.apply_masks(variables, masks, groups),
             lambda: pruning.remove_channels(variables, groups, masks)):
    with pytest.raises(pruning.MaskError) as info:
      fn()
    assert needle in str(info.value) and isinstance(info.value, UserError)


def test_remove_channels_rejects_traced_masks(setup):
  _, variables, groups, _ = setup
  with pytest.raises(pruning.MaskError, match='concrete masks'):
    jax.jit(lambda m: pruning.remove_channels(variables, groups, m))(pruning.keep_all(groups))


def test_apply_masks_zeroes_every_params_member(setup):
  _, variables, groups, _ = setup
  masks = {'stem': np.array([True, False, True, False])}
  masked = pruning.apply_masks(variables, masks, groups)
  p, q = variables['params'], masked['params']
  for path in (('stem', 'kernel'), ('stem_bn', 'scale'), ('stem_bn', 'bias'),
               ('stage1_block0', 'conv2', 'kernel')):
    leaf = q
    for k in path:
      leaf = leaf[k]
    assert float(jnp.abs(leaf[..., 1]).max()) == 0 and float(jnp.abs(leaf[..., 3]).max()) == 0
  assert float(jnp.abs(q['stage1_block0']['conv1']['kernel'][:, :, 1]).max()) == 0
  np.testing.assert_array_equal(q['stem']['kernel'][..., 0], p['stem']['kernel'][..., 0])
  # Running statistics are left alone (a zero scale and bias make BN output 0 regardless).
  np.testing.assert_array_equal(masked['batch_stats']['stem_bn']['var'],
                                variables['batch_stats']['stem_bn']['var'])


def test_one_compiled_function_evaluates_any_mask(setup):
  model, variables, groups, x = setup
  traces = []

  @jax.jit
  def f(v, masks, x):
    traces.append(1)
    return model.apply(pruning.apply_masks(v, masks, groups), x)

  outs = [f(variables, pruning.random_masks(s, groups, keep_prob=0.5), x) for s in range(4)]
  assert len(traces) == 1
  for s, out in enumerate(outs):
    masks = pruning.random_masks(s, groups, keep_prob=0.5)
    expected = model.apply(pruning.apply_masks(variables, masks, groups), x)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_masked_training_keeps_pruned_channels_at_zero(setup):
  model, variables, groups, x = setup
  masks = pruning.random_masks(3, groups, keep_prob=0.5)
  labels = jnp.arange(x.shape[0]) % 10
  tx = optax.sgd(0.1, momentum=0.9)

  def loss_fn(params, batch_stats):
    v = pruning.apply_masks({'params': params, 'batch_stats': batch_stats}, masks, groups)
    logits, upd = model.apply(v, x, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

  @jax.jit
  def step(params, stats, opt_state):
    (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd['batch_stats'], opt_state, grads

  params, stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)
  grads0 = None
  for _ in range(3):
    params, stats, opt_state, grads = step(params, stats, opt_state)
    grads0 = grads0 or grads
  # Gradients at pruned positions are exactly zero, so raw pruned weights never move.
  zero = pruning.apply_masks({'params': jax.tree.map(jnp.ones_like, params)}, masks, groups)
  for g, keep, p_new, p_old in zip(jax.tree.leaves(grads0), jax.tree.leaves(zero['params']),
                                   jax.tree.leaves(params), jax.tree.leaves(variables['params'])):
    assert float(jnp.abs(jnp.where(keep == 0, g, 0)).max()) == 0.0
    np.testing.assert_array_equal(jnp.where(keep == 0, p_new, 0), jnp.where(keep == 0, p_old, 0))
  # The trained masked model still equals its physically pruned twin, optimizer state included.
  trained = {'params': params, 'batch_stats': stats}
  small = pruning.remove_channels(trained, groups, masks)
  small_model = build_model(SPEC.with_widths_of(small))
  np.testing.assert_allclose(model.apply(pruning.apply_masks(trained, masks, groups), x),
                             small_model.apply(small, x), atol=1e-5)
  small_state = pruning.remove_channels_from_state(opt_state, params, groups, masks)
  trace = small_state[0].trace
  assert jax.tree.map(jnp.shape, trace) == jax.tree.map(jnp.shape, small['params'])
  full_trace = pruning.remove_channels({'params': opt_state[0].trace}, groups, masks)['params']
  for a, b in zip(jax.tree.leaves(trace), jax.tree.leaves(full_trace)):
    np.testing.assert_array_equal(a, b)


def test_masks_from_scores_and_rounding():
  assert pruning.round_keep(5, 16, 8) == 8
  assert pruning.round_keep(3, 16, 8) == 8  # Never below one multiple.
  assert pruning.round_keep(13, 16, 8) == 16
  assert pruning.round_keep(3, 6, 8) == 6  # Small groups keep everything.
  assert pruning.round_keep(0.2, 5, 1) == 1
  groups = (pruning.ChannelGroup('a', 6, ()), pruning.ChannelGroup('b', 4, ()),
            pruning.ChannelGroup('out', 3, (), prunable=False, reason='feeds the model output'))
  scores = {'a': np.array([5., 1, 4, 2, 6, 3]), 'b': np.array([1., 1, 0, 2])}
  masks = pruning.masks_from_scores(scores, groups, keep=0.5)
  np.testing.assert_array_equal(masks['a'], [True, False, True, False, True, False])
  np.testing.assert_array_equal(masks['b'], [True, False, False, True])  # Ties: lower index.
  masks = pruning.masks_from_scores(scores, groups, keep={'a': 2, 'b': 1.0}, round_to=2)
  assert pruning.kept_counts(masks) == {'a': 2, 'b': 4}
  removed = pruning.masks_remove_lowest(scores, groups, {'a': 2})
  np.testing.assert_array_equal(removed['a'], [True, False, True, False, True, True])
  assert removed['b'].all()
  again = pruning.masks_remove_lowest(scores, groups, {'a': 1}, base=removed)
  np.testing.assert_array_equal(again['a'], [True, False, True, False, True, False])
  with pytest.raises(pruning.MaskError, match="group 'b'"):
    pruning.masks_remove_lowest(scores, groups, {'b': 4})
  with pytest.raises(pruning.MaskError, match="'out'"):
    pruning.masks_from_scores({'out': np.ones(3)}, groups, keep=0.5)
  with pytest.raises(pruning.MaskError, match=r'\(0, 1\]'):
    pruning.masks_from_scores(scores, groups, keep=1.5)
