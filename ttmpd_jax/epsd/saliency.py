"""Saliency objectives for pruning at initialisation: SNIP's cross-entropy and EPSD's SD objective.

Each objective is a hashable ``loss_fn(params, batch) -> scalar`` for
``pruning.unstructured.gradient_saliency``, so the criterion is |w ⊙ ∂L/∂w| with a pluggable L,
and equal objectives share one compiled gradient across runs. Batches are dicts with ``image``
float32 [B, H, W, C] (normalised) and ``label`` int32 [B].

Design choice (BatchNorm during scoring): the forward pass runs in *train* mode (batch statistics),
as PyTorch SNIP implementations do under ``model.train()``: at initialisation the running
statistics are the identity (mean 0, var 1) and would normalise nothing. In train mode the
running statistics are never read, so the objectives create fresh ones and discard the update;
scoring depends on ``params`` only and changes no variable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import optax

from ttmpd_jax.distill import losses


def _train_logits(model: nn.Module, params: Any, images: jax.Array) -> jax.Array:
  logits, _ = model.apply({'params': params}, images, train=True, mutable=['batch_stats'])
  return logits


@dataclasses.dataclass(frozen=True)
class CrossEntropyObjective:
  """SNIP (Lee et al. 2019): mean cross-entropy of the labels, L_CE = CE(onehot(y), p_w(x))."""

  model: nn.Module

  def __call__(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = _train_logits(self.model, params, batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()


def sd_targets(logits: jax.Array, labels: jax.Array, alpha: float,
               temperature: float) -> jax.Array:
  """(1 − α)·onehot(y) + α·stop_gradient(softmax(z / τ)): labels mixed with own soft predictions.

  Args: logits float [B, K]; labels int [B]. Returns float [B, K], rows summing to 1.
  """
  own = jax.lax.stop_gradient(jax.nn.softmax(logits / temperature, axis=-1))
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return (1.0 - alpha) * onehot + alpha * own


@dataclasses.dataclass(frozen=True)
class SelfDistillationObjective:
  """EPSD's self-distillation objective at initialisation (our formulation).

  Design choice (the paper's exact objective is not available to us): the SD objective is the one
  the network is then trained with (progressive self-knowledge distillation, ``epsd.training``),
  L_SD = CE(q, softmax(z)) with soft targets q = (1 − α)·onehot(y) + α·p̃, evaluated at
  initialisation. PS-KD's p̃ is the network's own prediction from the previous epoch; at
  initialisation there is none, so p̃ is the network's own *current* prediction, softened by the
  temperature τ and held constant (stop-gradient): p̃ = sg(softmax(z / τ)).

  Why τ ≠ 1 matters: ∂L_SD/∂z = p − q = (1 − α)(p − y) + α(p − p̃). With τ = 1 the second term
  vanishes and the saliency is SNIP's scaled by (1 − α), i.e. the *same* ranking; with τ > 1 the
  SD term α(p − softmax(z / τ)) adds the weights that shape the network's soft predictions (its
  dark knowledge, what self-distillation transfers) to those that fit the labels.

  Attributes:
    model: the network.
    alpha: weight of the self-distillation target in [0, 1]; the sweep uses PS-KD's final α_T,
      i.e. the objective as it stands at the end of SD training.
    temperature: τ > 0 softening the self-teacher.
  """

  model: nn.Module
  alpha: float = 0.8
  temperature: float = 4.0

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f'alpha must lie in [0, 1], got {self.alpha}')
    if self.temperature <= 0:
      raise ValueError(f'temperature must be positive, got {self.temperature}')

  def __call__(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = _train_logits(self.model, params, batch['image'])
    return losses.soft_target_cross_entropy(
        logits, sd_targets(logits, batch['label'], self.alpha, self.temperature))


def ce_objective(model: nn.Module) -> CrossEntropyObjective:
  return CrossEntropyObjective(model)


def sd_objective(model: nn.Module, *, alpha: float = 0.8,
                 temperature: float = 4.0) -> SelfDistillationObjective:
  return SelfDistillationObjective(model, float(alpha), float(temperature))
