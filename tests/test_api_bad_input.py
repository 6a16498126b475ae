"""``ttmpd_jax.prune``'s fault policy: every mistake is a ``UserError`` naming the argument and the
fix, raised before any long work; models without BatchNorm (linen and NNX) prune end to end.

The bad-input cases replace the long work (latency table, ``prepare``) by a function that fails
the test, so a check that does not fire cannot hide behind minutes of search.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ttmpd_jax
from ttmpd_jax import api
from ttmpd_jax.errors import ConfigError, UserError

IMAGE = (8, 8, 1)


class BNNet(nn.Module):
  """Conv-BN-ReLU, conv, global pool, dense: the smallest model with something to prune."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class PlainNet(nn.Module):
  """No normalisation at all; returns ``(logits, features)`` when ``features`` is set."""

  features: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    pooled = x.mean(axis=(1, 2))
    logits = nn.Dense(3)(pooled)
    return (logits, pooled) if self.features else logits


class DictNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return {'logits': nn.Dense(3)(x.mean(axis=(1, 2))), 'map': x}


class NormNet(nn.Module):
  norm: str = 'group'

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.GroupNorm(num_groups=2)(x) if self.norm == 'group' else nn.LayerNorm()(x)
    x = nn.relu(nn.Conv(8, (3, 3))(nn.relu(x)))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class NoTrainNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Conv(8, (3, 3))(x)).mean(axis=(1, 2)))


class DenseOnly(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class NNXPlain(nnx.Module):
  """An NNX conv net without any normalisation."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.head(x.mean(axis=(1, 2)))


def _images(n=64, shape=IMAGE, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _init(model, shape=IMAGE):
  return model.init(jax.random.key(0), jnp.zeros((1, *shape)))


class _Latency:
  def __init__(self, ms=1.0):
    self.ms = ms

  def predict(self, widths=None):
    return self.ms


@pytest.fixture(autouse=True)
def _no_long_work(request, monkeypatch):
  """Bad-input cases must fail before the latency table or ``prepare`` start."""
  if 'end_to_end' in request.node.name:
    return

  def long_work(*args, **kwargs):
    raise AssertionError('long work started: the bad input was not caught by the checks')
  monkeypatch.setattr(api, 'build_latency_model', long_work)
  monkeypatch.setattr(api, 'prepare', long_work)


BN = BNNet()
BN_VARS = _init(BN)


def _refused(*, model=BN, variables=BN_VARS, images=None, names=(), **kwargs):
  """Runs ``prune`` and returns the UserError's message after checking it names ``names``."""
  images = _images() if images is None else images
  with pytest.raises(UserError) as info:
    ttmpd_jax.prune(model, variables, images, log=lambda line: None, **kwargs)
  message = str(info.value)
  for name in names:
    assert name in message, message
  assert '\n' not in message
  return info.value


# ---- arguments of the wrong type or value -----------------------------------------------------

def test_config_as_a_dict():
  e = _refused(config={'round_to': 8}, names=('config', 'SearchConfig(**'))
  assert isinstance(e, ConfigError) and e.field == 'config'


def test_config_of_another_type():
  _refused(config=api.LatencyConfig(), names=('config', 'SearchConfig'))


@pytest.mark.parametrize('latency', [42, 'macs', object()])
def test_latency_without_predict(latency):
  e = _refused(latency=latency, names=('latency', 'predict(widths)'))
  assert e.field == 'latency'


def test_latency_that_predicts_nonsense():
  _refused(latency=_Latency(float('nan')), names=('latency', 'positive'))


@pytest.mark.parametrize('target', [1.5, 0.0, '0.5', None])
def test_latency_target_outside_0_1(target):
  e = _refused(latency_target=target, names=('latency_target',))
  assert e.field == 'latency_target'


@pytest.mark.parametrize('method', ['no_such_method', 3])
def test_unknown_method(method):
  _refused(method=method, names=('method', 'ttmpd'))


def test_latency_config_as_a_dict():
  _refused(latency_config={'batch': 8}, names=('latency_config', 'LatencyConfig(**'))


def test_work_dir_that_is_a_file(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  _refused(work_dir=str(path), names=('work_dir', 'not a folder'))


def test_log_not_callable():
  with pytest.raises(UserError, match='log: must be a callable'):
    ttmpd_jax.prune(BN, BN_VARS, _images(), log='stdout')


def test_finetune_fraction_larger_than_the_images():
  _refused(images=_images(n=8), config=ttmpd_jax.SearchConfig(finetune_fraction=64),
           names=('finetune_fraction', '8 samples'))


# ---- images --------------------------------------------------------------------------------------

def test_images_channels_first():
  model = PlainNet()
  variables = _init(model, (16, 16, 3))
  e = _refused(model=model, variables=variables, images=_images(shape=(3, 16, 16)),
               names=('unlabeled_images', 'NCHW', '[N, 16, 16, 3]', '(0, 2, 3, 1)'))
  assert e.field == 'unlabeled_images'


def test_images_channels_first_nnx():
  _refused(model=NNXPlain(nnx.Rngs(0)), variables=None, images=_images(shape=(1, 10, 10)),
           names=('unlabeled_images', 'channels-last', '[N, 10, 10, 1]'))


def test_images_with_the_wrong_channel_count():
  model = PlainNet()
  variables = _init(model, (8, 8, 3))
  _refused(model=model, variables=variables, images=_images(shape=(8, 8, 1)),
           names=('unlabeled_images', '[N, 8, 8, 3]'))


def test_images_without_a_channel_axis():
  _refused(images=_images()[..., 0], names=('unlabeled_images', '[..., None]'))


def test_images_with_nan():
  images = _images()
  images[3, 2, 2, 0] = np.nan
  _refused(images=images, names=('unlabeled_images', 'NaN'))


def test_images_empty():
  _refused(images=np.zeros((0, *IMAGE), np.float32), names=('unlabeled_images', 'empty'))


def test_images_of_strings():
  _refused(images=np.full((4, *IMAGE), 'a'), names=('unlabeled_images', 'dtype'))


# ---- variables -----------------------------------------------------------------------------------

def test_linen_model_without_variables():
  _refused(variables=None, names=('variables', 'model.init'))


def test_variables_params_only_tree():
  _refused(variables=BN_VARS['params'], names=('variables', '"params"'))


def test_variables_not_a_dict():
  _refused(variables=[1, 2], names=('variables', 'dict'))


def test_variables_of_another_model():
  other = _init(PlainNet())
  e = _refused(variables=other, names=('variables', 'expects', 'model.init'))
  assert e.field == 'variables'


def test_variables_with_an_extra_layer():
  extra = {'params': {**BN_VARS['params'], 'Dense_9': {'kernel': jnp.zeros((3, 3))}},
           'batch_stats': BN_VARS['batch_stats']}
  _refused(variables=extra, names=('variables', 'params/Dense_9/kernel'))


def test_batchnorm_model_without_batch_stats():
  _refused(variables={'params': BN_VARS['params']},
           names=('variables', 'BatchNorm', 'batch_stats'))


# ---- model and its output ------------------------------------------------------------------------

def test_model_class_instead_of_instance():
  _refused(model=BNNet, names=('model', 'BNNet('))


def test_model_not_a_module():
  _refused(model=lambda v, x: x, names=('model', 'nnx.Module'))


def test_model_without_train_argument():
  model = NoTrainNet()
  _refused(model=model, variables=_init(model), names=('model', 'train'))


@pytest.mark.parametrize('norm', ['group', 'layer'])
def test_channel_normalisation_refused_by_name(norm):
  model = NormNet(norm)
  name = 'GroupNorm' if norm == 'group' else 'LayerNorm'
  e = _refused(model=model, variables=_init(model), names=('model', name, 'BatchNorm'))
  assert e.field == 'model'


def test_nothing_to_prune():
  model = DenseOnly()
  _refused(model=model, variables=_init(model), names=('model', 'no prunable'))


def test_tuple_output_needs_logits():
  model = PlainNet(features=True)
  e = _refused(model=model, variables=_init(model), names=('logits=', 'tuple', '(2, 3)'))
  assert e.field == 'logits'


def test_dict_output_needs_logits():
  model = DictNet()
  _refused(model=model, variables=_init(model), names=('logits=', "'logits'"))


@pytest.mark.parametrize('logits', [5, 'nope', 1.5, 'map', lambda out: out[0][:, 0]])
def test_logits_that_pick_nothing_useful(logits):
  model = DictNet() if isinstance(logits, str) else PlainNet(features=True)
  _refused(model=model, variables=_init(model), logits=logits, names=('logits',))


def test_logits_for_a_single_output():
  _refused(logits=0, names=('logits', 'logits=None'))


# ---- what works ----------------------------------------------------------------------------------

def test_logits_wrapper_keeps_the_variables_and_the_groups():
  from ttmpd_jax import pruning
  model = PlainNet(features=True)
  variables = _init(model)
  x = _images(n=2)
  wrapped = api.with_logits(model, 0)
  assert jax.tree.structure(_init(wrapped)) == jax.tree.structure(variables)
  np.testing.assert_allclose(wrapped.apply(variables, x), model.apply(variables, x)[0])
  groups = pruning.discover_groups(wrapped, variables, x[:1])
  assert [g.name for g in groups if g.prunable] == ['Conv_0', 'Conv_1']
  picked = api.with_logits(DictNet(), lambda out: out['logits'])
  assert picked.apply(_init(DictNet()), x).shape == (2, 3)


_FAST = ttmpd_jax.SearchConfig(round_to=2, r0=0.2, max_iterations=3, finetune_fraction=48,
                               bn_batches=1, bn_batch_size=16, short_term_steps=2,
                               long_term_steps=2, batch_size=16, measure_rounds=0,
                               calibration_iterations=1)


def _run(model, variables, latency, **kwargs):
  lines = []
  result = ttmpd_jax.prune(model, variables, _images(), latency_target=0.6, config=_FAST,
                           latency=latency, latency_config=api.LatencyConfig(batch=8),
                           log=lines.append, **kwargs)
  return result, lines


def _assert_bn_skipped(lines):
  skipped = [l for l in lines if 'BN adaptation' in l and 'skipped' in l]
  assert len(skipped) == 1, lines
  assert not any('BatchNorm statistics adapted' in l for l in lines), lines


def test_end_to_end_bn_free_linen_with_tuple_output():
  from ttmpd_jax.latency import MacsLatency
  model = PlainNet(features=True)
  variables = _init(model)
  latency = MacsLatency.from_model(api.with_logits(model, 0), variables, (8, *IMAGE),
                                   teacher_ms=1.0)
  result, lines = _run(model, variables, latency, logits=0)
  _assert_bn_skipped(lines)
  assert not jax.tree.leaves(result.variables.get('batch_stats', {}))
  assert result.apply(_images(n=5)).shape == (5, 3)
  assert result.widths['Conv_0'] < 8 or result.widths['Conv_1'] < 8
  assert result.widths['Dense_0'] == 3
  assert result.report.latency_ms_predicted < 1.0


def test_end_to_end_bn_free_nnx():
  from ttmpd_jax.latency import MacsLatency
  from ttmpd_jax.pruning import from_nnx
  module = NNXPlain(nnx.Rngs(0))
  adapter, variables = from_nnx(module)
  latency = MacsLatency.from_model(adapter, variables, (8, *IMAGE), teacher_ms=1.0)
  result, lines = _run(module, None, latency)
  _assert_bn_skipped(lines)
  assert result.apply(_images(n=5)).shape == (5, 3)
  assert result.widths['conv1'] < 8 or result.widths['conv2'] < 8
  small = result.to_nnx()
  assert small.conv1.out_features == result.widths['conv1']
  np.testing.assert_allclose(small(_images(n=4)), result.apply(_images(n=4)), atol=1e-5)
