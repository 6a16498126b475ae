"""The one training loop: state creation without compilation, the update rule, hooks, and the
search's short KD runs compiling their step once for every candidate mask."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttmpd_jax import pruning, train
from ttmpd_jax.distill import finetune
from ttmpd_jax.errors import UserError
from ttmpd_jax.latency.compilations import CompilationCounter
from ttmpd_jax.search.evaluation import KDRunner, SearchData


class Tiny(nn.Module):
  """Conv-BN-ReLU, Conv, global pool, Dense head: one prunable internal group, compiles fast."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False, name='conv1')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name='conv1_bn')(x))
    x = nn.Conv(6, (3, 3), strides=(2, 2), name='conv2')(x)
    return nn.Dense(4, name='head')(x.mean(axis=(1, 2)))


@pytest.fixture(scope='module')
def tiny():
  model = Tiny()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  return model, jax.device_get({'params': variables['params'],
                                'batch_stats': variables['batch_stats']})


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('optimizer', [
    train.sgd_cosine(0.1, 100, 5e-4, warmup_steps=10),
    finetune.kd_optimizer(0.1, 10, weight_decay=1e-4),
    optax.adam(1e-3),
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),  # Non-zero initial state.
])
def test_create_train_state_equals_optimizer_init(tiny, optimizer):
  _, variables = tiny
  with CompilationCounter() as counter:
    state = train.create_train_state(variables, optimizer)
  expected = optimizer.init(variables['params'])
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(expected)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  assert int(state.step) == 0 and state.variables.keys() == {'params', 'batch_stats'}
  if 'inject' not in repr(optimizer.init):
    assert counter.count == 0  # Zero-initialised optimizers: no XLA work at all.


def test_update_is_plain_sgd_and_transform_holds_entries_fixed(tiny):
  model, variables = tiny
  keep = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float32)

  def zero_conv1(v, mask):
    params = dict(v['params'])
    params['conv1'] = {'kernel': params['conv1']['kernel'] * mask}
    return {'params': params, 'batch_stats': v['batch_stats']}

  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
  labels = np.array([0, 1, 2, 3], np.int32)
  step = train.make_step(train.supervised_loss(model), optax.sgd(0.5), transform=zero_conv1)
  state, metrics = step(train.create_train_state(variables, optax.sgd(0.5)), keep, images, labels)
  # Reference: the gradient of the masked network's loss, one plain SGD step, masked again.
  loss_fn = train.supervised_loss(model)
  masked = zero_conv1(variables, keep)
  (loss, (stats, _)), grads = jax.value_and_grad(
      lambda p: loss_fn(zero_conv1({'params': p, 'batch_stats': variables['batch_stats']},
                                   keep)['params'], variables['batch_stats'],
                        (images, labels), None), has_aux=True)(variables['params'])
  expected = zero_conv1({'params': jax.tree.map(lambda p, g: p - 0.5 * g, variables['params'],
                                                grads), 'batch_stats': stats}, keep)
  assert int(state.step) == 1 and float(metrics['loss']) == pytest.approx(float(loss), rel=1e-6)
  assert _max_diff(state.variables, expected) < 1e-6
  assert _max_diff(state.batch_stats, masked['batch_stats']) > 0  # Train-mode BN statistics.
  kernel = np.asarray(state.params['conv1']['kernel'])
  assert np.all(kernel[..., keep == 0] == 0) and np.all(kernel[..., keep == 1] != 0)


class Recorder:
  def __init__(self):
    self.calls, self.closed = [], False

  def __call__(self, step, state, metrics):
    self.calls.append((step, state, float(metrics['loss'])))

  def close(self):
    self.closed = True


def test_train_loop_runs_to_steps_calls_hooks_and_closes_them():
  step_fn = lambda state, batch: (state + batch, {'loss': state})
  recorder = Recorder()
  state, metrics = train.train_loop(0, step_fn, iter(lambda: 1, None), steps=5, start_step=2,
                                    hooks=[recorder])
  assert state == 3 and metrics == {'loss': 2}
  assert [(s, x) for s, x, _ in recorder.calls] == [(3, 1), (4, 2), (5, 3)] and recorder.closed

  def kill(step, state, metrics):
    if step == 2:
      raise KeyboardInterrupt
  recorder = Recorder()
  with pytest.raises(KeyboardInterrupt):
    train.train_loop(0, step_fn, iter(lambda: 1, None), steps=5, hooks=[recorder, kill])
  assert len(recorder.calls) == 2 and recorder.closed
  assert train.train_loop(7, step_fn, [], steps=3) == (7, {})


def test_progress_lines():
  lines = []
  hook = train.ProgressHook('pretrain', 10, 4, lines.append,
                            lambda s, m: f'epoch {s / 5:.2f}  {train.loss_field(s, m)}')
  for step in range(1, 11):
    hook(step, None, {'loss': jnp.float32(1.0 / step)})
  assert [line.split('  ')[0] for line in lines] == [
      'pretrain step 4/10', 'pretrain step 8/10', 'pretrain step 10/10']
  assert 'epoch 0.80  loss 0.2500' in lines[0] and 'steps/s' in lines[0]
  assert lines[-1].endswith('ETA 0m00s')
  silent = train.ProgressHook('x', 10, 0, lines.append)
  silent(10, None, {'loss': 0.0})
  assert len(lines) == 3


def test_checkpoint_hook_round_trip_and_refuses_another_run(tiny, tmp_path):
  _, variables = tiny
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = train.create_train_state(variables, optimizer).replace(step=jnp.int32(2))
  directory = str(tmp_path / 'ckpt')
  hook = train.CheckpointHook(directory, {'lr': 0.1}, every=10, keep=1, total_steps=2)
  assert hook.restore(state) is None
  hook(2, state, {})  # The last step is always saved.
  hook.close()
  hook = train.CheckpointHook(directory, {'lr': 0.1}, every=10, keep=1, total_steps=2)
  restored = hook.restore(train.create_train_state(variables, optimizer))
  hook.close()
  assert int(restored.step) == 2 and _max_diff(restored, state) == 0.0
  with pytest.raises(UserError, match='another run.*lr'):
    train.CheckpointHook(directory, {'lr': 0.2}, every=10, keep=1, total_steps=2,
                         name='fine-tuning').restore(state)


@pytest.mark.parametrize('online', [False, True])
def test_kd_runner_compiles_its_step_once_for_every_mask(tiny, online):
  model, teacher = tiny
  groups = pruning.discover_groups(model, teacher, jnp.zeros((1, 8, 8, 1)))
  (group,) = [g for g in groups if g.prunable and any(
      m.path == ('params', 'conv1', 'kernel') for m in g.members)]
  rng = np.random.default_rng(0)
  images = rng.normal(size=(48, 8, 8, 1)).astype(np.float32)
  logits = np.asarray(model.apply(teacher, images))
  data = SearchData(images[:32], logits[:32], images[32:], logits[32:], images[None, :16])
  student = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                         teacher)
  runner = KDRunner(model, groups, data, learning_rate=0.05, steps=3, batch_size=16,
                    temperature=2.0, hard_weight=0.1, seed=0,
                    online_teacher=(model, teacher) if online else None)
  masks_a = {group.name: np.arange(group.size) % 2 == 0}
  masks_b = {group.name: np.arange(group.size) < group.size - 1}
  with CompilationCounter() as first:
    out_a = runner.run(student, masks_a, 3)
  with CompilationCounter() as second:
    out_b = runner.run(student, masks_b, 3)
  assert first.count == 1 and second.count == 0, (first.names, second.names)
  for out, mask in ((out_a, masks_a), (out_b, masks_b)):
    kernel = np.asarray(out['params']['conv1']['kernel'])
    assert np.all(kernel[..., ~mask[group.name]] == 0)
  assert _max_diff(out_a['params'], out_b['params']) > 1e-4
  # The same run again gives the same variables (seeded batches, fresh state per run).
  assert _max_diff(runner.run(student, masks_a, 3), out_a) == 0.0
