"""KD fine-tuning: masked and pruned students, online vs cached KD, adaptive BN, resume, accuracy.

The student masks come from a local helper (50% of the output channels of every block's conv1,
lowest L2 norm first): conv1 -> conv1_bn -> conv2 is an internal, non-residual channel group, so
zeroing conv1's kernel columns and conv1_bn's scale/bias removes those channels exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_fashion_mnist

from ttmpd_jax import train
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.distill import bn_adapt, finetune
from ttmpd_jax.distill import cache as cache_lib
from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec, build_model

QUIET = lambda s: None


def conv1_l2_masks(params, keep: float = 0.5) -> dict[str, np.ndarray]:
  """Float 0/1 masks [C] over each block's conv1 output channels, keeping the largest L2 norms."""
  masks = {}
  for name, block in params.items():
    if isinstance(block, dict) and 'conv1' in block:
      kernel = np.asarray(block['conv1']['kernel'])
      norms = np.sqrt(np.square(kernel.reshape(-1, kernel.shape[-1])).sum(0))
      mask = np.zeros(len(norms), np.float32)
      mask[np.argsort(-norms, kind='stable')[:max(1, int(round(keep * len(norms))))]] = 1.0
      masks[name] = mask
  return masks


def apply_conv1_masks(variables, masks):
  """Pure, jit-traceable transform: zero masked conv1 channels and their BN scale/bias."""
  params = dict(variables['params'])
  for name, mask in masks.items():
    block = dict(params[name])
    block['conv1'] = {'kernel': block['conv1']['kernel'] * mask}
    block['conv1_bn'] = {k: v * mask for k, v in block['conv1_bn'].items()}
    params[name] = block
  return {'params': params, 'batch_stats': variables['batch_stats']}


def prune_conv1(spec, variables, masks):
  """Physically removes the masked conv1 channels: (smaller spec, smaller variables)."""
  v = jax.tree.map(np.asarray, variables)
  params, stats = v['params'], v['batch_stats']
  widths = {}
  for name, mask in masks.items():
    keep = np.flatnonzero(mask)
    params[name]['conv1']['kernel'] = params[name]['conv1']['kernel'][..., keep]
    params[name]['conv1_bn'] = {k: x[keep] for k, x in params[name]['conv1_bn'].items()}
    stats[name]['conv1_bn'] = {k: x[keep] for k, x in stats[name]['conv1_bn'].items()}
    params[name]['conv2']['kernel'] = params[name]['conv2']['kernel'][:, :, keep, :]
    widths[f'{name}/conv1'] = len(keep)
  return spec.with_widths({**spec.widths, **widths}), v


@pytest.fixture(scope='module')
def small():
  """A random ResNet-8 (width 8) teacher, a perturbed copy as student, 256 random images."""
  spec = ModelSpec('resnet8', 10, {'base_width': 8})
  model = build_model(spec)
  teacher = train.init_variables(model, (28, 28, 1), seed=0)
  student = jax.tree.map(lambda x: x, teacher)
  student['params'] = jax.tree.map(
      lambda x: x + 0.05 * np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype),
      teacher['params'])
  rng = np.random.default_rng(0)
  data = Dataset('fake_c/noise_1', rng.integers(0, 256, (256, 28, 28, 1), dtype=np.uint8),
                 np.zeros(256, np.int32), 'fashion_mnist')
  cache = cache_lib.build_cache(model, teacher, data, np.arange(256, dtype=np.int32),
                                print_fn=QUIET)
  return spec, model, teacher, student, data, cache


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(
      np.asarray(x) - np.asarray(y)))), a, b)))


def test_masked_student_channels_stay_zero_and_mask_is_an_argument(small):
  spec, model, teacher, student, data, cache = small
  masks = conv1_l2_masks(student['params'])
  optimizer = finetune.kd_optimizer(0.1, 10, weight_decay=5e-4)
  step = finetune.make_kd_step(model, optimizer, transform=apply_conv1_masks, temperature=2.0,
                               hard_weight=0.5)
  state = finetune.init_state(apply_conv1_masks(student, masks), optimizer)
  images = pipeline.normalize(data.images[:32], data.family)
  losses = []
  for _ in range(3):
    state, metrics = step(state, masks, images, cache.logits[:32])
    losses.append(float(metrics['loss']))
  assert int(state.step) == 3 and np.all(np.isfinite(losses))
  for name, mask in masks.items():
    kernel = np.asarray(state.params[name]['conv1']['kernel'])
    assert np.all(kernel[..., mask == 0] == 0) and np.any(kernel[..., mask == 1] != 0)
  # Another mask of the same shapes reuses the compiled step.
  other = {k: 1.0 - m for k, m in masks.items()}
  step(finetune.init_state(student, optimizer), other, images, cache.logits[:32])
  assert step._cache_size() == 1


def test_pruned_student_trains_like_masked_student(small):
  """Masked channels contribute exactly nothing, so masked and physically pruned students follow
  the same trajectory on the kept weights."""
  spec, model, teacher, student, data, cache = small
  masks = conv1_l2_masks(student['params'])
  pruned_spec, pruned = prune_conv1(spec, student, masks)
  pruned_model = build_model(pruned_spec)
  kw = dict(dataset=data, cache=cache, steps=6, batch_size=32, learning_rate=0.05, seed=0,
            print_fn=QUIET, temperature=2.0)
  masked_out, _ = finetune.finetune(model, student, transform=apply_conv1_masks, aux=masks, **kw)
  pruned_out, _ = finetune.finetune(pruned_model, pruned, **kw)
  _, restripped = prune_conv1(spec, masked_out, masks)
  assert _max_diff(restripped['params'], pruned_out['params']) < 1e-4
  x = pipeline.normalize(data.images[:64], data.family)
  np.testing.assert_allclose(model.apply(masked_out, x), pruned_model.apply(pruned_out, x),
                             atol=1e-4)


def test_online_kd_matches_cached_kd(small):
  spec, model, teacher, student, data, cache = small
  kw = dict(dataset=data, steps=5, batch_size=32, learning_rate=0.05, seed=0, print_fn=QUIET)
  cached, s1 = finetune.finetune(model, student, cache=cache, **kw)
  online, s2 = finetune.finetune(model, student, cache=cache, teacher=(model, teacher), **kw)
  assert s2['online'] and not s1['online']
  assert _max_diff(cached, online) < 1e-5
  assert _max_diff(cached['params'], student['params']) > 1e-3


def test_resume_after_kill_equals_uninterrupted(small, tmp_path):
  spec, model, teacher, student, data, cache = small
  kw = dict(dataset=data, cache=cache, steps=30, batch_size=32, learning_rate=0.05, seed=7,
            momentum=0.9, weight_decay=1e-4, print_fn=QUIET)
  reference, _ = finetune.finetune(model, student, **kw)

  def kill_at_25(step, metrics):
    if step == 25:
      raise KeyboardInterrupt('simulated kill')

  ckpt = str(tmp_path / 'kd_ckpt')
  with pytest.raises(KeyboardInterrupt):
    finetune.finetune(model, student, checkpoint_dir=ckpt, checkpoint_every=10, on_step=kill_at_25,
                      **kw)
  lines = []
  resumed, summary = finetune.finetune(model, student, checkpoint_dir=ckpt, checkpoint_every=10,
                                       **{**kw, 'print_fn': lines.append})
  assert summary['resumed_from'] == 20 and any('resuming' in line for line in lines)
  assert _max_diff(resumed, reference) < 1e-6
  # The same directory with other hyper-parameters is another run: refused, not silently mixed.
  with pytest.raises(UserError, match='learning_rate'):
    finetune.finetune(model, student, checkpoint_dir=ckpt, **{**kw, 'learning_rate': 0.1})


def test_finetune_bad_input(small):
  spec, model, teacher, student, data, cache = small
  kw = dict(steps=5, batch_size=32, learning_rate=0.05, print_fn=QUIET)
  with pytest.raises(UserError, match='teacher source'):
    finetune.finetune(model, student, data, **kw)
  small_cache = cache_lib.build_cache(model, teacher, data, np.arange(16, dtype=np.int32),
                                      print_fn=QUIET)
  with pytest.raises(UserError, match='larger than the fine-tuning subset'):
    finetune.finetune(model, student, data, cache=small_cache, **kw)
  other_images = Dataset(data.name, data.images[::-1].copy(), data.labels, data.family)
  with pytest.raises(UserError, match='other images'):
    finetune.finetune(model, student, other_images, cache=cache, **kw)
  with pytest.raises(UserError, match='positive'):
    finetune.finetune(model, student, data, cache=cache, **{**kw, 'steps': 0})


def test_adaptive_bn_exact_average_masked(small):
  spec, model, teacher, student, data, cache = small
  masks = conv1_l2_masks(student['params'])
  batches = [pipeline.normalize(data.images[i:i + 32], data.family) for i in range(0, 96, 32)]
  adapted = bn_adapt.adapt_batch_stats(model, student, batches, transform=apply_conv1_masks,
                                       aux=masks)
  # Reference: per batch, Flax's own momentum update from zero statistics gives (1 - m) * stats.
  masked = apply_conv1_masks(student, masks)
  zero = {'params': masked['params'],
          'batch_stats': jax.tree.map(jnp.zeros_like, masked['batch_stats'])}
  per_batch = [model.apply(zero, x, train=True, mutable=['batch_stats'])[1]['batch_stats']
               for x in batches]
  expected = jax.tree.map(lambda *s: sum(s) / (0.1 * len(s)), *per_batch)
  assert _max_diff(adapted['batch_stats'], expected) < 1e-4
  assert _max_diff(adapted['params'], masked['params']) == 0.0
  # The jitted, scanned adapter (used by the search) agrees, and only once compiled.
  adapter = bn_adapt.make_bn_adapter(model, apply_conv1_masks)
  scanned = adapter(student, masks, jnp.stack(batches))
  assert _max_diff(scanned, adapted) < 1e-5
  adapter(student, {k: 1.0 - m for k, m in masks.items()}, jnp.stack(batches))
  assert adapter._cache_size() == 1
  with pytest.raises(UserError, match='at least one batch'):
    bn_adapt.adapt_batch_stats(model, student, [])


def test_teacher_bn_adapt_changes_only_statistics(small):
  spec, model, teacher, student, data, cache = small
  adapted = bn_adapt.teacher_bn_adapt(model, teacher, data, batch_size=64, num_batches=2)
  assert _max_diff(adapted['params'], teacher['params']) == 0.0
  assert _max_diff(adapted['batch_stats'], teacher['batch_stats']) > 1e-3
  mean = np.asarray(adapted['batch_stats']['stem_bn']['mean'])
  ids = np.random.default_rng(0).permutation(len(data))[:128]  # The first two shuffled batches.
  x = pipeline.normalize(data.images[ids], data.family)
  # The stem conv sees the raw images: its mean is the average of the two batch means.
  y = jax.lax.conv_general_dilated(x, teacher['params']['stem']['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(mean, np.asarray(y).mean((0, 1, 2)), atol=1e-5)


@pytest.fixture(scope='module')
def shifted(tiny_teacher):
  """Fashion-MNIST-C gaussian_noise_5 (first 3000) and a 1000-sample pseudo-label cache."""
  from ttmpd_jax.data import datasets
  test = datasets.load('fashion_mnist_c/gaussian_noise_5', limit=3000)
  ids = cache_lib.select_subset(len(test), 1000, seed=0)
  cache = cache_lib.build_cache(tiny_teacher.model, tiny_teacher.variables, test, ids,
                                print_fn=QUIET)
  teacher_acc = train.accuracy(tiny_teacher.model, tiny_teacher.variables, test)
  return test, cache, teacher_acc


@requires_fashion_mnist
def test_kd_from_cache_recovers_masked_student_on_shifted_data(tiny_teacher, shifted):
  """KD from cached pseudo labels lifts a 50%-conv1-masked student on Fashion-MNIST-C."""
  test, cache, teacher_acc = shifted
  model, teacher = tiny_teacher.model, tiny_teacher.variables
  masks = conv1_l2_masks(teacher['params'])
  student = apply_conv1_masks(teacher, masks)
  before = train.accuracy(model, student, test)
  tuned, summary = finetune.finetune(model, student, test, cache=cache, steps=150, batch_size=64,
                                     learning_rate=0.05, seed=0, transform=apply_conv1_masks,
                                     aux=masks, print_fn=QUIET)
  after = train.accuracy(model, tuned, test)
  print(f'teacher {teacher_acc:.3f}  masked before {before:.3f}  after KD {after:.3f}')
  assert after > before + 0.2
  assert after > teacher_acc - 0.1
  assert summary['final_agreement'] > 0.6


@pytest.mark.slow
@requires_fashion_mnist
def test_kd_with_pruning_package_masks(tiny_teacher, shifted):
  """Same with the pruning package: 50% of every prunable group by L2 norm (residual groups too),
  masks passed as the jit argument; the physically pruned result matches the masked one."""
  pruning = pytest.importorskip('ttmpd_jax.pruning')
  if not all(hasattr(pruning, n) for n in ('discover_groups', 'apply_masks', 'l2_norm',
                                           'masks_from_scores', 'remove_channels')):
    pytest.skip('pruning package API not available')
  test, cache, teacher_acc = shifted
  model, teacher = tiny_teacher.model, tiny_teacher.variables
  groups = pruning.discover_groups(model, teacher, jnp.zeros((1, *test.image_shape)))
  masks = pruning.masks_from_scores(pruning.l2_norm(teacher, pruning.prunable_groups(groups)),
                                    groups, keep=0.5)
  # validate=False: the masks are tracers here (see the report on validate_masks).
  transform = lambda v, m: pruning.apply_masks(v, m, groups, validate=False)
  student = transform(teacher, masks)
  before = train.accuracy(model, student, test)
  tuned, _ = finetune.finetune(model, student, test, cache=cache, steps=150, batch_size=64,
                               learning_rate=0.05, seed=0, transform=transform, aux=masks,
                               print_fn=QUIET)
  after = train.accuracy(model, tuned, test)
  small = pruning.remove_channels(tuned, groups, masks)
  small_model = build_model(tiny_teacher.spec.with_widths_of(small))
  pruned_after = train.accuracy(small_model, small, test)
  print(f'teacher {teacher_acc:.3f}  masked before {before:.3f}  after KD {after:.3f}  '
        f'pruned {pruned_after:.3f}')
  assert after > before + 0.25
  assert abs(pruned_after - after) < 2e-3
