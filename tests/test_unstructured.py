"""Unstructured masks: exact sparsity, ties, prunable leaves, saliency, masking under jit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec, build_model
from ttmpd_jax.pruning import unstructured as U


def _toy_params(seed=0):
  """Conv/Dense kernels plus a bias and BatchNorm leaves (which must never be pruned)."""
  rng = np.random.default_rng(seed)
  return {
      'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
      'conv_bn': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
      'fc': {'kernel': jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
             'bias': jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
      'head': {'kernel': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
               'bias': jnp.zeros(3)},
  }


N_PRUNABLE = 3 * 3 * 2 * 4 + 7 * 5 + 5 * 3  # 122


@pytest.fixture(scope='module')
def resnet_params():
  model = build_model(ModelSpec('resnet8', 10, {'base_width': 4}))
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)), train=False))(
      jax.random.key(0))
  return model, variables


def test_prunable_leaves_are_conv_and_dense_kernels_including_head(resnet_params):
  _, variables = resnet_params
  paths = U.prunable_paths(variables['params'])
  assert 'head/kernel' in paths and 'stem/kernel' in paths
  assert all(p.endswith('/kernel') for p in paths)
  masks = U.dense_masks(variables['params'])
  assert masks['head']['bias'] is None and masks['stem_bn']['scale'] is None
  without_head = U.prunable_paths(variables['params'], U.kernels_except('head'))
  assert set(paths) - set(without_head) == {'head/kernel'}


@pytest.mark.parametrize('sparsity', [0.01, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999])
@pytest.mark.parametrize('scope', ['global', 'per_leaf'])
def test_exact_sparsity(sparsity, scope):
  params = _toy_params()
  fn = U.global_mask if scope == 'global' else U.per_leaf_mask
  masks = fn(U.magnitude_scores(params), sparsity)
  zeroed, total = U.mask_counts(masks)
  assert total == N_PRUNABLE
  assert zeroed == round(sparsity * N_PRUNABLE)
  assert U.sparsity_of(masks) == zeroed / N_PRUNABLE
  # Non-prunable leaves carry no mask and are untouched.
  assert masks['fc']['bias'] is None and masks['conv_bn']['scale'] is None
  masked = U.apply_weight_masks(params, masks)
  np.testing.assert_array_equal(masked['fc']['bias'], params['fc']['bias'])
  nonzero = sum(int(np.count_nonzero(masked[k]['kernel'])) for k in ('conv', 'fc', 'head'))
  assert nonzero == N_PRUNABLE - zeroed


def test_exact_sparsity_on_a_real_model(resnet_params):
  _, variables = resnet_params
  params = variables['params']
  n = sum(np.size(params_leaf) for path, params_leaf in
          jax.tree_util.tree_flatten_with_path(params)[0]
          if U.default_prunable(U._path_str(path), params_leaf))
  for scope_fn in (U.global_mask, U.per_leaf_mask):
    for s in (0.5, 0.9, 0.95):
      masks = scope_fn(U.random_scores(params, jax.random.key(1)), s)
      zeroed, total = U.mask_counts(masks)
      assert total == n and zeroed == round(s * n)


@settings(max_examples=40, deadline=None)
@given(sparsity=st.floats(0.001, 0.999), seed=st.integers(0, 10_000),
       tie_levels=st.integers(1, 4))
def test_exact_sparsity_property_with_ties(sparsity, seed, tie_levels):
  """Heavily tied scores (only a few distinct values) still give exactly round(s * n) zeros."""
  rng = np.random.default_rng(seed)
  params = _toy_params(seed)
  scores = jax.tree.map(lambda p: jnp.asarray(rng.integers(0, tie_levels, np.shape(p)),
                                              jnp.float32), params)
  for fn in (U.global_mask, U.per_leaf_mask):
    zeroed, total = U.mask_counts(fn(scores, sparsity))
    assert zeroed == round(sparsity * total)


def test_ties_are_broken_deterministically_in_tree_order():
  params = _toy_params()
  scores = jax.tree.map(jnp.ones_like, params)  # All tied.
  k = round(0.3 * N_PRUNABLE)
  masks = U.global_mask(scores, 0.3)
  flat = np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(masks)])
  # The first k weights in tree order are pruned, the rest kept.
  np.testing.assert_array_equal(flat, np.arange(N_PRUNABLE) >= k)
  again = U.global_mask(scores, 0.3)
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_global_mask_keeps_the_highest_scores():
  params = _toy_params()
  scores = U.magnitude_scores(params)
  masks = U.global_mask(scores, 0.75)
  kept = np.concatenate([np.abs(np.asarray(params[k]['kernel']))[np.asarray(masks[k]['kernel'])]
                         for k in ('conv', 'fc', 'head')])
  dropped = np.concatenate([np.abs(np.asarray(params[k]['kernel']))[~np.asarray(masks[k]['kernel'])]
                            for k in ('conv', 'fc', 'head')])
  assert kept.min() >= dropped.max()


def test_per_leaf_mask_prunes_every_leaf_by_its_share():
  params = _toy_params()
  s = 0.7
  masks = U.per_leaf_mask(U.magnitude_scores(params), s)
  for path, frac in U.layer_sparsities(masks).items():
    size = {'conv/kernel': 72, 'fc/kernel': 35, 'head/kernel': 15}[path]
    assert abs(frac * size - s * size) <= 1.0 + 1e-9
    # Within a leaf the lowest magnitudes go.
    leaf = path.split('/')[0]
    w = np.abs(np.asarray(params[leaf]['kernel']))
    m = np.asarray(masks[leaf]['kernel'])
    if (~m).any():
      assert w[m].min() >= w[~m].max()


def test_head_can_be_excluded():
  params = _toy_params()
  masks = U.global_mask(U.magnitude_scores(params), 0.5, prunable=U.kernels_except('head'))
  assert masks['head']['kernel'] is None
  zeroed, total = U.mask_counts(masks)
  assert total == N_PRUNABLE - 15 and zeroed == round(0.5 * total)


@pytest.mark.parametrize('bad', [0, 0.0, 1, 1.0, -0.1, 1.5, float('nan'), 'abc', None])
def test_bad_sparsity_is_a_user_error(bad):
  params = _toy_params()
  for fn in (U.global_mask, U.per_leaf_mask):
    with pytest.raises(UserError, match='sparsity'):
      fn(U.magnitude_scores(params), bad)


def test_nonfinite_scores_are_rejected():
  params = _toy_params()
  scores = U.magnitude_scores(params)
  scores['fc']['kernel'] = scores['fc']['kernel'].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match='fc/kernel'):
    U.global_mask(scores, 0.5)


def test_apply_weight_masks_under_jit_matches_eager():
  params = _toy_params()
  masks = U.global_mask(U.random_scores(params, jax.random.key(3)), 0.6)
  eager = U.apply_weight_masks(params, masks)
  jitted = jax.jit(U.apply_weight_masks)(params, masks)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)
  for k in ('conv', 'fc', 'head'):
    np.testing.assert_array_equal(np.asarray(eager[k]['kernel']) == 0,
                                  ~np.asarray(masks[k]['kernel']))


def test_scores_have_parameter_shapes():
  params = _toy_params()
  for scores in (U.magnitude_scores(params), U.random_scores(params, jax.random.key(0))):
    assert jax.tree.structure(scores) == jax.tree.structure(params)
    for s, p in zip(jax.tree.leaves(scores), jax.tree.leaves(params)):
      assert s.shape == p.shape
      assert np.all(np.asarray(s) >= 0)


def test_gradient_saliency_is_abs_w_times_mean_gradient():
  params = _toy_params()
  batches = [{'x': jnp.full((7,), float(i + 1))} for i in range(3)]

  def loss_fn(p, batch):
    return jnp.sum(batch['x'] @ p['fc']['kernel']) + jnp.sum(p['head']['kernel'] ** 2)

  scores = U.gradient_saliency(loss_fn, params, batches)
  assert jax.tree.structure(scores) == jax.tree.structure(params)
  # d/dW sum(x @ W) = x outer 1; the mean of x over the batches is 2.
  expected_fc = np.abs(np.asarray(params['fc']['kernel']) * 2.0)
  np.testing.assert_allclose(scores['fc']['kernel'], expected_fc, rtol=1e-6)
  expected_head = np.abs(2 * np.asarray(params['head']['kernel']) ** 2)
  np.testing.assert_allclose(scores['head']['kernel'], expected_head, rtol=1e-6)
  np.testing.assert_array_equal(scores['conv']['kernel'], 0.0)  # No gradient, no saliency.


def test_gradient_saliency_needs_a_batch():
  with pytest.raises(UserError, match='at least one batch'):
    U.gradient_saliency(lambda p, b: 0.0, _toy_params(), [])


def test_gradient_saliency_on_a_model_matches_snip_by_hand(resnet_params):
  model, variables = resnet_params
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}

  def ce(p, b):
    logits, _ = model.apply({'params': p}, b['image'], train=True, mutable=['batch_stats'])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b['label'][:, None], 1))

  scores = U.gradient_saliency(ce, variables['params'], [batch])
  grads = jax.grad(ce)(variables['params'], batch)
  for s, w, g in zip(jax.tree.leaves(scores), jax.tree.leaves(variables['params']),
                     jax.tree.leaves(grads)):
    assert s.shape == w.shape
    np.testing.assert_allclose(s, np.abs(np.asarray(w) * np.asarray(g)), rtol=1e-3, atol=1e-7)
  assert math.isclose(U.sparsity_of(U.global_mask(scores, 0.9)), 0.9, abs_tol=1e-4)
