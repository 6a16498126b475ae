"""Supervised source pretraining and evaluation (clean labels; test-time code never calls this).

SGD with Nesterov momentum, cosine learning-rate decay with a short warm-up, weight decay;
a jitted step over a data-parallel mesh; progress lines with step, loss, steps/s and ETA.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttmpd_jax import parallel
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset

Variables = dict[str, Any]


def init_variables(model: nn.Module, image_shape: tuple[int, ...], seed: int) -> Variables:
  """``{'params', 'batch_stats'}`` for inputs of shape [N, *image_shape]."""
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape)), train=False))(
      jax.random.key(seed))
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def sgd_cosine(learning_rate: float, total_steps: int, weight_decay: float = 5e-4,
               momentum: float = 0.9, warmup_steps: int = 0) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(warmup_steps, 1), max(total_steps, warmup_steps + 1))
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum, nesterov=True))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation) -> Callable:
  """``(variables, opt_state, images, labels) -> (variables, opt_state, loss)``, jitted."""

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates['batch_stats']

  @jax.jit
  def step(variables, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables['params'], variables['batch_stats'], images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, variables['params'])
    params = optax.apply_updates(variables['params'], updates)
    return {'params': params, 'batch_stats': batch_stats}, opt_state, loss

  return step


def make_predict(model: nn.Module) -> Callable:
  """``(variables, images) -> logits`` in eval mode, jitted once per input shape."""
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def predict_dataset(model: nn.Module, variables: Variables, dataset: Dataset, batch_size: int = 500,
                    predict: Optional[Callable] = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> np.ndarray:
  """Logits float32 [N, classes] for every example of ``dataset`` (eval mode, fixed batch shape)."""
  predict = predict or make_predict(model)
  batch_size = min(batch_size, len(dataset))
  if mesh is not None:
    batch_size -= batch_size % mesh.size
  outputs = []
  for batch in pipeline.batches(dataset.images, dataset.labels, batch_size, family=dataset.family):
    padded, n = pipeline.pad_batch(batch, batch_size)
    images = padded['image'] if mesh is None else parallel.shard_batch(padded['image'], mesh)
    outputs.append(np.asarray(predict(variables, images))[:n])
  return np.concatenate(outputs)


def accuracy(model: nn.Module, variables: Variables, dataset: Dataset, batch_size: int = 500,
             predict: Optional[Callable] = None) -> float:
  """Top-1 accuracy in [0, 1] of ``variables`` on all of ``dataset``."""
  logits = predict_dataset(model, variables, dataset, batch_size, predict)
  return float(np.mean(logits.argmax(-1) == dataset.labels))


def format_seconds(seconds: float) -> str:
  """``125.3`` -> ``'2m05s'`` (progress lines)."""
  seconds = int(max(seconds, 0))
  return f'{seconds // 60}m{seconds % 60:02d}s'


def step_budget(num_examples: int, batch_size: int, epochs: float,
                mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """``(steps per epoch, total steps)`` of a drop-remainder schedule; checks the batch size."""
  parallel.check_batch_divisible(batch_size, mesh)
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'--batch_size={batch_size} is larger than the training set ({num_examples})')
  return steps_per_epoch, max(1, int(round(epochs * steps_per_epoch)))


def pretrain(model: nn.Module, train_set: Dataset, *, epochs: float, batch_size: int,
             learning_rate: float, weight_decay: float, seed: int,
             validation_set: Optional[Dataset] = None, log_every: int = 50,
             mesh: Optional[jax.sharding.Mesh] = None,
             print_fn: Callable[[str], None] = print) -> tuple[Variables, dict[str, Any]]:
  """Trains ``model`` from scratch on ``train_set``; returns variables and a summary dict."""
  mesh = mesh or parallel.make_mesh()
  steps_per_epoch, total_steps = step_budget(len(train_set), batch_size, epochs, mesh)
  optimizer = sgd_cosine(learning_rate, total_steps, weight_decay,
                         warmup_steps=min(100, total_steps // 10))
  variables = parallel.replicate(init_variables(model, train_set.image_shape, seed), mesh)
  opt_state = parallel.replicate(optimizer.init(variables['params']), mesh)
  step_fn = make_train_step(model, optimizer)

  def stream() -> Iterable[dict[str, np.ndarray]]:
    epoch = 0
    while True:
      yield from pipeline.batches(train_set.images, train_set.labels, batch_size,
                                  family=train_set.family, seed=seed * 1000 + epoch,
                                  drop_remainder=True, process_index=jax.process_index(),
                                  process_count=jax.process_count())
      epoch += 1

  start = time.time()
  losses = []
  for step, batch in zip(range(1, total_steps + 1), stream()):
    images, labels = parallel.shard_batch((batch['image'], batch['label']), mesh)
    variables, opt_state, loss = step_fn(variables, opt_state, images, labels)
    if step % log_every == 0 or step == total_steps:
      losses.append(float(loss))
      elapsed = time.time() - start
      rate = step / elapsed
      print_fn(f'pretrain step {step}/{total_steps}  epoch {step / steps_per_epoch:.2f}  '
               f'loss {losses[-1]:.4f}  {rate:.2f} steps/s  elapsed {format_seconds(elapsed)}  '
               f'ETA {format_seconds((total_steps - step) / rate)}')
  summary: dict[str, Any] = {'steps': total_steps, 'train_time_s': time.time() - start,
                             'final_loss': losses[-1] if losses else float('nan')}
  if validation_set is not None and len(validation_set):
    summary['validation_accuracy'] = accuracy(model, variables, validation_set)
    print_fn(f'validation accuracy {summary["validation_accuracy"]:.4f}')
  return jax.device_get(variables), summary
