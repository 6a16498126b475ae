"""EPSD: SD saliency, PS-KD training with fixed masks, the sweep, its report and the launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import requires_fashion_mnist
from ttmpd_jax import checkpoint
from ttmpd_jax.epsd import experiment, saliency, training
from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec
from ttmpd_jax.pruning import unstructured as U

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiny(nn.Module):
  """Conv-BN-ReLU, global pool, Dense head: compiles in a second."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(6, (3, 3), strides=(2, 2), use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, name='conv_bn')(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(10, name='head')(x)


@pytest.fixture(scope='module')
def tiny():
  model = Tiny()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  return model, {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def _random_batches(n=2, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': jnp.asarray(rng.normal(size=(size, 28, 28, 1)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, size), jnp.int32)} for _ in range(n)]


# ---- saliency ------------------------------------------------------------------------------------


def test_sd_targets_are_distributions():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 10)) * 3, jnp.float32)
  labels = jnp.arange(5)
  q = saliency.sd_targets(logits, labels, 0.7, 4.0)
  np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(saliency.sd_targets(logits, labels, 0.0, 4.0),
                             jax.nn.one_hot(labels, 10))


def test_sd_saliency_at_temperature_one_is_scaled_snip(tiny):
  """The documented identity: with τ = 1 the SD gradient is (1 − α) × the CE gradient."""
  model, variables = tiny
  batches = _random_batches()
  snip = U.gradient_saliency(saliency.ce_objective(model), variables['params'], batches)
  sd = U.gradient_saliency(saliency.sd_objective(model, alpha=0.6, temperature=1.0),
                           variables['params'], batches)
  for a, b in zip(jax.tree.leaves(snip), jax.tree.leaves(sd)):
    np.testing.assert_allclose(0.4 * np.asarray(a), b, rtol=1e-3, atol=1e-7)


def test_sd_saliency_shapes_and_differs_from_snip(tiny):
  model, variables = tiny
  batches = _random_batches(n=3)
  snip = U.gradient_saliency(saliency.ce_objective(model), variables['params'], batches)
  sd = U.gradient_saliency(saliency.sd_objective(model, alpha=0.8, temperature=4.0),
                           variables['params'], batches)
  assert jax.tree.structure(sd) == jax.tree.structure(variables['params'])
  for s, w in zip(jax.tree.leaves(sd), jax.tree.leaves(variables['params'])):
    assert s.shape == w.shape and s.dtype == jnp.float32
  overlap = experiment.kept_overlap(U.global_mask(sd, 0.8), U.global_mask(snip, 0.8))
  assert 0.0 < overlap < 1.0


def test_objectives_are_hashable_and_equal_by_value(tiny):
  model, _ = tiny
  a = saliency.sd_objective(model, alpha=0.5, temperature=2.0)
  b = saliency.sd_objective(model, alpha=0.5, temperature=2.0)
  assert a == b and hash(a) == hash(b)
  with pytest.raises(ValueError, match='alpha'):
    saliency.sd_objective(model, alpha=1.5)


# ---- training ------------------------------------------------------------------------------------


def test_pskd_alpha_schedule():
  assert training.pskd_alpha(0, 4, 0.8) == 0.0
  assert training.pskd_alpha(2, 4, 0.8) == pytest.approx(0.4)
  assert training.pskd_alpha(3, 4, 0.8) == pytest.approx(0.6)


def test_step_uses_previous_predictions_and_records_new_ones(tiny):
  model, variables = tiny
  params = variables['params']
  masks = U.dense_masks(params)
  opt = training.OptimizerConfig(0.1, 10, 0.0, 0)
  opt_state = opt.build().init(params)
  batch = _random_batches(n=1, size=4)[0]
  indices = jnp.asarray([5, 1, 7, 2], jnp.int32)
  prev = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).normal(size=(8, 10)), jnp.float32))
  nxt = jnp.full((8, 10), -1.0)
  _, _, nxt, loss = training.masked_train_step(
      model, opt, variables, opt_state, masks, prev, nxt, batch['image'], batch['label'], indices,
      jnp.float32(1.0))
  logits, _ = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
  # alpha = 1: the target is exactly the stored previous prediction of each sample.
  expected = optax.softmax_cross_entropy(logits, prev[indices]).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(nxt[indices], jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)
  untouched = np.setdiff1d(np.arange(8), np.asarray(indices))
  np.testing.assert_array_equal(nxt[untouched], -1.0)


@requires_fashion_mnist
def test_masks_stay_fixed_through_sd_training(tiny, fashion_train):
  model, variables = tiny
  masks = U.global_mask(U.random_scores(variables['params'], jax.random.key(0)), 0.8)
  trained, summary = training.train_masked(
      model, variables, masks, fashion_train.take(512), epochs=2, batch_size=64,
      learning_rate=0.1, weight_decay=5e-4, seed=0, sd_alpha=0.8)
  assert summary['steps'] == 16 and summary['final_alpha'] == pytest.approx(0.4)
  assert experiment.pruned_nonzero(trained['params'], masks) == 0
  for m, w0, w1 in zip(jax.tree.leaves(masks), *(
      [w for w, mm in zip(jax.tree.leaves(v['params']),
                          jax.tree.leaves(masks, is_leaf=lambda x: x is None)) if mm is not None]
      for v in (variables, trained))):
    m, w0, w1 = np.asarray(m), np.asarray(w0), np.asarray(w1)
    assert np.all(w1[~m] == 0.0)  # Pruned: exactly zero after training.
    assert np.all(w1[m] != w0[m])  # Kept: trained.
  # Weight decay and momentum act on every leaf, masks still win: sparsity is unchanged.
  nonzero = sum(int(np.count_nonzero(np.asarray(w)))
                for w, mm in zip(jax.tree.leaves(trained['params']),
                                 jax.tree.leaves(masks, is_leaf=lambda x: x is None))
                if mm is not None)
  zeroed, total = U.mask_counts(masks)
  assert nonzero == total - zeroed


@requires_fashion_mnist
def test_sd_with_alpha_zero_equals_cross_entropy(tiny, fashion_train):
  model, variables = tiny
  masks = U.dense_masks(variables['params'])
  kwargs = dict(epochs=1, batch_size=64, learning_rate=0.1, weight_decay=5e-4, seed=3)
  a, _ = training.train_masked(model, variables, masks, fashion_train.take(256), sd_alpha=None,
                               **kwargs)
  b, _ = training.train_masked(model, variables, masks, fashion_train.take(256), sd_alpha=0.0,
                               **kwargs)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# ---- config and report ---------------------------------------------------------------------------


SPEC = ModelSpec('resnet8', 10, {'base_width': 4})


@pytest.mark.parametrize('bad', [(0.0,), (1.0,), (-0.5,), (1.2,), (0.5, 0.5)])
def test_bad_sparsities_are_user_errors(bad):
  with pytest.raises(UserError, match='sparsit'):
    experiment.EPSDConfig(SPEC, sparsities=bad).validate()


def test_bad_methods_are_user_errors():
  with pytest.raises(UserError, match='valid methods'):
    experiment.EPSDConfig(SPEC, methods=('epsd', 'grasp')).validate()
  with pytest.raises(UserError, match='mask_scope'):
    experiment.EPSDConfig(SPEC, mask_scope='layer').validate()


def test_summary_and_claims():
  runs = [{'method': m, 'sparsity': 0.9, 'seed': s, 'accuracy': a}
          for m, accs in (('epsd', (0.8, 0.82)), ('snip_sd', (0.79, 0.80)), ('snip', (0.7, 0.71)))
          for s, a in enumerate(accs)]
  summary = {r['method']: r for r in experiment.summarise(runs)}
  assert summary['epsd']['mean'] == pytest.approx(0.81)
  assert summary['epsd']['std'] == pytest.approx(np.std([0.8, 0.82], ddof=1))
  (claim,) = experiment.ordering_claims(runs)
  assert claim['epsd_ge_snip_sd_ge_snip'] is True
  assert claim['epsd_minus_snip_sd']['wins'] == 2
  runs[0]['accuracy'] = 0.5
  assert experiment.ordering_claims(runs)[0]['epsd_ge_snip_sd_ge_snip'] is False


# ---- end to end ----------------------------------------------------------------------------------


@requires_fashion_mnist
def test_reduced_sweep_end_to_end(tmp_path, fashion_train, fashion_test):
  config = experiment.EPSDConfig(
      ModelSpec('resnet8', 10, {'base_width': 8}), methods=('dense', 'random', 'snip', 'epsd'),
      sparsities=(0.5,), seeds=(0,), epochs=1, batch_size=64, saliency_batches=2)
  report = experiment.run_sweep(config, fashion_train.take(2048), fashion_test.take(1000),
                                str(tmp_path), print_fn=lambda s: None)
  assert os.path.isfile(tmp_path / 'accuracy_vs_sparsity.png')
  with open(tmp_path / 'report.json') as f:
    on_disk = json.load(f)
  assert on_disk['complete'] and on_disk['config'] == config.to_json()
  assert [(r['method'], r['sparsity']) for r in on_disk['runs']] == [
      ('dense', 0.0), ('random', 0.5), ('snip', 0.5), ('epsd', 0.5)]
  for run in on_disk['runs']:
    assert {'method', 'sparsity', 'accuracy', 'seed', 'time_s'} <= set(run)
    assert run['accuracy'] > 0.3, run  # Chance is 0.1.
    assert run['time_s'] > 0
    assert run['pruned_weights_nonzero_after_training'] == 0
    if run['method'] != 'dense':
      assert run['zeroed_weights'] == round(0.5 * run['prunable_weights'])
  # The saved checkpoint holds the sparse weights.
  epsd_run = on_disk['runs'][-1]
  variables, meta = checkpoint.load(epsd_run['checkpoint'])
  assert meta.info['epsd_run']['method'] == 'epsd'
  kernels = [np.asarray(w) for path, w in jax.tree_util.tree_flatten_with_path(
      variables['params'])[0] if U.default_prunable(U._path_str(path), w)]
  assert sum(int((k == 0).sum()) for k in kernels) >= epsd_run['zeroed_weights']
  assert {c['sparsity'] for c in report['claims']} == {0.5}
  # Resuming with the same config reruns nothing.
  again = experiment.run_sweep(config, fashion_train.take(2048), fashion_test.take(1000),
                               str(tmp_path), print_fn=lambda s: None)
  assert [r['time_s'] for r in again['runs']] == [r['time_s'] for r in on_disk['runs']]


def _launch(*args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(REPO, 'launch', 'main.py'), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)


@requires_fashion_mnist
@pytest.mark.parametrize('value', ['1', 'abc'])
def test_launcher_rejects_bad_sparsity(tmp_path, value):
  result = _launch('--mode=epsd', f'--output_dir={tmp_path}', f'--epsd_sparsities=0.5,{value}',
                   '--train_limit=256', '--test_limit=100')
  assert result.returncode == 2, result.stderr[-2000:]
  assert '--epsd_sparsities' in result.stderr and 'error:' in result.stderr


@pytest.mark.slow
@requires_fashion_mnist
def test_launcher_ci_flagfile(tmp_path):
  result = _launch(f'--flagfile={os.path.join(REPO, "launch/flags/epsd_ci.cfg")}',
                   f'--output_dir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'report.json') as f:
    report = json.load(f)
  assert {r['method'] for r in report['runs']} == {'dense', 'snip', 'snip_sd', 'epsd'}
  assert all(r['accuracy'] > 0.3 for r in report['runs'])
  assert os.path.isfile(tmp_path / 'accuracy_vs_sparsity.png')
  assert 'test accuracy' in result.stdout
