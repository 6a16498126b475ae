"""Saliency objectives for pruning at initialisation: SNIP's cross-entropy and EPSD's SD objective.

Each ``*_objective`` returns a ``loss_fn(params, batch) -> scalar`` for
``pruning.unstructured.gradient_saliency``, so the criterion is |w ⊙ ∂L/∂w| with a pluggable L.
Batches are pipeline dicts (``image`` float32 [B, H, W, C] normalised, ``label`` int32 [B]).

Design choice (BatchNorm during scoring): the forward pass runs in *train* mode (batch statistics),
as PyTorch SNIP implementations do in ``model.train()``: at initialisation the running statistics
are the identity (mean 0, var 1) and do not normalise anything. The updated statistics are
discarded; scoring changes no variable.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ttmpd_jax.distill import losses

LossFn = Callable[[Any, dict[str, jax.Array]], jax.Array]


def _train_logits(model: nn.Module, params, batch_stats, images: jax.Array) -> jax.Array:
  logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                          mutable=['batch_stats'])
  return logits


def ce_objective(model: nn.Module, batch_stats: Any) -> LossFn:
  """SNIP (Lee et al. 2019): mean cross-entropy of the labels, L_CE = CE(onehot(y), p_w(x))."""

  def loss_fn(params, batch):
    logits = _train_logits(model, params, batch_stats, batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  return loss_fn


def sd_targets(logits: jax.Array, labels: jax.Array, alpha: float,
               temperature: float) -> jax.Array:
  """(1 − α)·onehot(y) + α·stop_gradient(softmax(z / τ)): labels mixed with own soft predictions."""
  own = jax.lax.stop_gradient(jax.nn.softmax(logits / temperature, axis=-1))
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return (1.0 - alpha) * onehot + alpha * own


def sd_objective(model: nn.Module, batch_stats: Any, *, alpha: float = 0.8,
                 temperature: float = 4.0) -> LossFn:
  """EPSD's self-distillation objective at initialisation (our formulation).

  Design choice (the paper's exact objective is not available to us): the SD objective is the one
  the network is trained with (progressive self-knowledge distillation, see ``epsd.training``),
  L_SD = CE(q, softmax(z)) with soft targets q = (1 − α)·onehot(y) + α·p̃, evaluated at
  initialisation. PS-KD's p̃ is the network's own prediction from the previous epoch; at
  initialisation there is none, so p̃ is the network's own *current* prediction, softened by the
  temperature τ and held constant (stop-gradient): p̃ = sg(softmax(z / τ)).

  Why τ ≠ 1 matters: ∂L_SD/∂z = p − q = (1 − α)(p − y) + α(p − p̃). With τ = 1 the second term
  vanishes and L_SD's saliency is SNIP's scaled by (1 − α), the *same* ranking; with τ > 1 the SD
  term α(p − softmax(z / τ)) adds the weights that shape the network's soft predictions (its dark
  knowledge, what self-distillation transfers) to those that fit the labels.

  Args:
    model, batch_stats: the network at initialisation.
    alpha: weight of the self-distillation target in [0, 1]; default PS-KD's final α_T, i.e. the
      objective as it stands at the end of SD training.
    temperature: τ > 0 softening the self-teacher.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must lie in [0, 1], got {alpha}')
  if temperature <= 0:
    raise ValueError(f'temperature must be positive, got {temperature}')

  def loss_fn(params, batch):
    logits = _train_logits(model, params, batch_stats, batch['image'])
    return losses.soft_target_cross_entropy(
        logits, sd_targets(logits, batch['label'], alpha, temperature))

  return loss_fn
