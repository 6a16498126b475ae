"""Training a network with fixed unstructured masks, with or without self-distillation.

Self-distillation formulation (design choice): progressive self-knowledge distillation (PS-KD,
Kim et al., ICCV 2021). In epoch t (0-based) of T the soft target of sample i is

    q_i = (1 − α_t)·onehot(y_i) + α_t·p_{t−1}(x_i),   α_t = α_T · t / T,

where p_{t−1}(x_i) is the softmax the network itself produced for sample i when it last saw it in
the previous epoch (the train-mode forward pass of that step: no extra forward passes). The
predictions live in an on-device table [N, classes] keyed by the sample id of the pipeline
(``batch['index']``); it starts as the one-hot labels, so samples not yet seen (epoch 0, or dropped
by ``drop_remainder``) fall back to their label. The loss is CE(q, softmax(z)). Plain training is
the same step with α = 0 (q = one-hot), so every method shares one compiled step.

Masks are held fixed: the forward pass uses ``apply_weight_masks(params)`` (so pruned weights get
zero gradient) and the parameters are masked again after every optimizer update (so weight decay
and momentum can never revive them). Pruned weights are therefore exactly zero throughout.

Design choice: this is the project's one update rule and loop (``train.apply_update`` with the
``sd_loss_fn`` loss and the ``mask_weights`` transform, driven by ``train.train_loop``); the
only addition is the step writing the batch's predictions into the table.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttmpd_jax import parallel
from ttmpd_jax import train as train_lib
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.distill import losses
from ttmpd_jax.pruning import unstructured
from ttmpd_jax.train import TrainState

Variables = dict[str, Any]


def pskd_alpha(epoch: int, num_epochs: float, alpha_T: float) -> float:
  """α_t = α_T · t / T (PS-KD's linear schedule); 0 in the first epoch."""
  return float(alpha_T) * epoch / max(float(num_epochs), 1e-9)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Hashable settings of ``train.sgd_cosine`` (so equal settings share one compiled step)."""

  learning_rate: float
  total_steps: int
  weight_decay: float = 5e-4
  warmup_steps: int = 0

  def build(self) -> optax.GradientTransformation:
    return train_lib.sgd_cosine(self.learning_rate, self.total_steps, self.weight_decay,
                                warmup_steps=self.warmup_steps)


def mask_weights(variables: Variables, aux: Mapping[str, Any]) -> Variables:
  """The transform holding ``aux['masks']`` fixed: pruned weights are zero, BN untouched."""
  return {'params': unstructured.apply_weight_masks(variables['params'], aux['masks']),
          'batch_stats': variables['batch_stats']}


def sd_loss_fn(model: nn.Module) -> train_lib.LossFn:
  """PS-KD loss: CE against ``(1 - α)·onehot(y) + α·prev_table[index]``.

  ``inputs = (images, labels, indices)``; ``aux = {'masks', 'prev_table', 'alpha'}``. Reports
  ``probs``, the batch's softmax (this epoch's predictions, recorded by the step).
  """

  def loss_fn(params, batch_stats, inputs, aux):
    images, labels, indices = inputs
    prev_table, alpha = aux['prev_table'], aux['alpha']
    onehot = jax.nn.one_hot(labels, prev_table.shape[-1], dtype=jnp.float32)
    targets = (1.0 - alpha) * onehot + alpha * prev_table[indices]
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    loss = losses.soft_target_cross_entropy(logits, targets)
    return loss, (updates['batch_stats'], {'probs': jax.nn.softmax(logits, axis=-1)})

  return loss_fn


@functools.partial(jax.jit, static_argnums=(0, 1))
def sd_train_step(model: nn.Module, opt_config: OptimizerConfig, state: TrainState, masks: Any,
                  prev_table: jax.Array, next_table: jax.Array, images: jax.Array,
                  labels: jax.Array, indices: jax.Array,
                  alpha: jax.Array) -> tuple[TrainState, jax.Array, dict[str, jax.Array]]:
  """One SGD step with fixed masks; plain (alpha = 0) or PS-KD self-distilled (alpha > 0).

  The project's one update rule (``train.apply_update`` with ``sd_loss_fn`` and the
  ``mask_weights`` transform) plus writing the batch's predictions into ``next_table``.
  Compiled once per (model, opt_config, shapes) and shared by every method of a sweep.

  Args:
    model, opt_config: static.
    state: the train state; masks: mask tree (``unstructured``): bool at prunable leaves,
      ``None`` elsewhere.
    prev_table: float32 [N, K] previous-epoch predictions of every training sample (read).
    next_table: float32 [N, K] this epoch's predictions (the batch's rows are written).
    images: float32 [B, H, W, C]; labels, indices: int32 [B] (indices = sample ids).
    alpha: float32 scalar, weight of the self-distillation target.
  Returns:
    ``(state, next_table, {'loss'})``.
  """
  aux = {'masks': masks, 'prev_table': prev_table, 'alpha': alpha}
  state, metrics = train_lib.apply_update(sd_loss_fn(model), opt_config.build(), mask_weights,
                                          state, aux, (images, labels, indices))
  next_table = next_table.at[indices].set(jax.lax.stop_gradient(metrics.pop('probs')))
  return state, next_table, metrics


def masked_train_step(model: nn.Module, opt_config: OptimizerConfig, variables: Variables,
                      opt_state: Any, masks: Any, prev_table: jax.Array, next_table: jax.Array,
                      images: jax.Array, labels: jax.Array, indices: jax.Array,
                      alpha: jax.Array) -> tuple[Variables, Any, jax.Array, jax.Array]:
  """``sd_train_step`` on loose variables: ``(variables, opt_state, next_table, loss)``."""
  state = TrainState(step=np.zeros((), np.int32), params=variables['params'],
                     batch_stats=variables['batch_stats'], opt_state=opt_state)
  state, next_table, metrics = sd_train_step(model, opt_config, state, masks, prev_table,
                                             next_table, images, labels, indices, alpha)
  return state.variables, state.opt_state, next_table, metrics['loss']


def train_masked(model: nn.Module, variables: Variables, masks: Any, train_set: Dataset, *,
                 epochs: float, batch_size: int, learning_rate: float, weight_decay: float,
                 seed: int, sd_alpha: Optional[float] = None, warmup_steps: Optional[int] = None,
                 mesh: Optional[jax.sharding.Mesh] = None, log_every: int = 0,
                 print_fn: Callable[[str], None] = print) -> tuple[Variables, dict[str, Any]]:
  """Trains ``variables`` (masked by ``masks``, held fixed) from their current values.

  Args:
    model: the Flax module; variables: ``{'params', 'batch_stats'}`` (e.g. at initialisation).
    masks: mask tree from ``unstructured.global_mask`` etc.; ``unstructured.dense_masks`` (or any
      all-True tree) for dense training.
    train_set: training examples (all are used; shuffled per epoch with ``seed``).
    epochs: passes over ``train_set`` (fractional allowed; the PS-KD epoch index is
      ``step // steps_per_epoch``).
    batch_size, learning_rate, weight_decay: SGD + Nesterov, cosine decay (``train.sgd_cosine``),
      warm-up of ``warmup_steps`` (default: 10% of the steps, at most 100).
    sd_alpha: ``None`` for cross-entropy; α_T of PS-KD self-distillation otherwise.
    mesh: data-parallel mesh (default: all local devices).
    log_every: progress line every this many steps (0: none).
  Returns:
    Trained variables (host arrays; pruned weights exactly zero) and a summary dict.
  """
  mesh = mesh or parallel.make_mesh()
  steps_per_epoch, total_steps = train_lib.step_budget(len(train_set), batch_size, epochs, mesh)
  if warmup_steps is None:
    warmup_steps = min(100, total_steps // 10)
  opt_config = OptimizerConfig(float(learning_rate), total_steps, float(weight_decay),
                               int(warmup_steps))
  state = parallel.replicate(train_lib.create_train_state(
      mask_weights(variables, {'masks': masks}), opt_config.build()), mesh)
  masks = parallel.replicate(masks, mesh)
  onehot = np.eye(train_set.num_classes, dtype=np.float32)[train_set.labels]
  tables = (parallel.replicate(jnp.asarray(onehot), mesh),
            parallel.replicate(jnp.asarray(onehot), mesh))

  def step_fn(carry, item):
    state, prev_table, next_table, current_epoch = carry
    epoch, inputs = item
    if epoch != current_epoch:
      # This epoch's predictions become the next epoch's teacher; the written table keeps the
      # older predictions of samples not visited this epoch (never-visited ones stay one-hot).
      prev_table, next_table = next_table, jnp.copy(next_table)
    alpha = 0.0 if sd_alpha is None else pskd_alpha(epoch, epochs, sd_alpha)
    state, next_table, metrics = sd_train_step(model, opt_config, state, masks, prev_table,
                                               next_table, *inputs, jnp.float32(alpha))
    return (state, prev_table, next_table, epoch), {**metrics, 'alpha': alpha}

  batches = ((epoch, parallel.shard_batch((b['image'], b['label'], b['index']), mesh))
             for epoch, b in train_lib.epoch_batches(train_set, batch_size, seed))
  fields = lambda s, m: (f'epoch {s / steps_per_epoch:.2f}  alpha {m["alpha"]:.2f}  '
                        f'{train_lib.loss_field(s, m)}')
  progress = train_lib.ProgressHook('masked training', total_steps, log_every, print_fn, fields)
  start = time.time()
  (state, *_), metrics = train_lib.train_loop((state, *tables, 0), step_fn, batches,
                                              steps=total_steps, hooks=[progress])
  summary = {'steps': total_steps, 'train_time_s': time.time() - start,
             'final_loss': float(metrics['loss']), 'final_alpha': metrics['alpha']}
  return jax.device_get(state.variables), summary
