"""Candidate evaluation with masks (one compilation per architecture) and short KD runs.

Everything here works on a fixed split of the fine-tuning subset S:

* ``SearchData.train_*``: the part of S the student is distilled on (images + cached logits);
* ``SearchData.heldout_*``: the held-out slice used for v1/v2 and short-term accuracies;
* ``SearchData.bn_images``: ``[k, B, H, W, C]`` batches of S for adaptive BN.

Labels are never read here: "accuracy" during the search means top-1 agreement with the
teacher's pseudo labels on the held-out slice (true labels are used only in the final report).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from ttmpd_jax.distill import bn_adapt, finetune as finetune_lib
from ttmpd_jax.pruning.graph import ChannelGroup
from ttmpd_jax.pruning.masks import apply_masks
from ttmpd_jax.search.proxy import agreement_and_kl


@dataclasses.dataclass
class SearchData:
  """Fixed arrays of the fine-tuning subset S (normalised images, cached teacher logits)."""

  train_images: np.ndarray     # float32 [n_train, H, W, C]
  train_logits: np.ndarray     # float32 [n_train, K]
  heldout_images: np.ndarray   # float32 [n_heldout, H, W, C]
  heldout_logits: np.ndarray   # float32 [n_heldout, K]
  bn_images: np.ndarray        # float32 [k, B, H, W, C]


def mask_transform(groups: Sequence[ChannelGroup]) -> Callable:
  """``(variables, masks) -> masked variables`` for ``groups`` (masks are a jit argument)."""
  groups = tuple(groups)
  return lambda variables, masks: apply_masks(variables, masks, groups, validate=False)


def make_candidate_evaluator(model: nn.Module, groups: Sequence[ChannelGroup],
                             data: SearchData) -> Callable:
  """``evaluate(variables, masks) -> (v1, v2)`` as floats; compiled once per architecture.

  Adaptive BN (exact average over ``data.bn_images``) of the masked candidate, then its
  eval-mode logits on the held-out slice against the cached teacher logits.
  """
  adapt = bn_adapt.make_bn_adapter(model, mask_transform(groups))

  @jax.jit
  def evaluate(variables, masks, bn_images, images, teacher_logits):
    adapted = adapt(variables, masks, bn_images)
    logits = model.apply(adapted, images, train=False)
    return agreement_and_kl(logits, teacher_logits)

  # device_put, not jnp.asarray: no eager XLA computation, so nothing compiles here.
  bn_images, images, logits = jax.device_put(
      (data.bn_images, data.heldout_images, data.heldout_logits))

  def run(variables, masks) -> tuple[float, float]:
    v1, v2 = evaluate(variables, masks, bn_images, images, logits)
    return float(v1), float(v2)

  return run


class KDRunner:
  """Short KD runs from cached logits (or an online teacher) with one compiled step.

  Build one per architecture; ``run(variables, masks, steps)`` fine-tunes a (masked) student and
  returns its variables. Masks are a jit argument, so every candidate reuses the same step.
  """

  def __init__(self, model: nn.Module, groups: Optional[Sequence[ChannelGroup]], data: SearchData,
               *, learning_rate: float, steps: int, batch_size: int, temperature: float,
               hard_weight: float, seed: int, schedule: str = 'constant',
               online_teacher: Optional[tuple[nn.Module, Any]] = None):
    self.optimizer = finetune_lib.kd_optimizer(learning_rate, steps, schedule=schedule)
    transform = mask_transform(groups) if groups is not None else None
    if online_teacher is None:
      self.step = finetune_lib.make_kd_step(model, self.optimizer,
                                            transform=transform, temperature=temperature,
                                            hard_weight=hard_weight)
    else:
      self.step = finetune_lib.make_online_kd_step(
          model, self.optimizer, online_teacher[0], online_teacher[1], transform=transform,
          temperature=temperature, hard_weight=hard_weight)
    self.online = online_teacher is not None
    self.data, self.batch_size, self.seed = data, min(batch_size, len(data.train_images)), seed

  def run(self, variables: Mapping[str, Any], masks: Any, steps: int) -> dict[str, Any]:
    state = host_init_state(variables, self.optimizer)
    n = len(self.data.train_images)
    for step in range(steps):
      # Batches are gathered on the host: eager device gathers would compile per shape.
      rows = finetune_lib.batch_positions(step, n, self.batch_size, self.seed)
      images = jax.device_put(self.data.train_images[rows])
      if self.online:
        state, _ = self.step(state, masks, images)
      else:
        state, _ = self.step(state, masks, images, jax.device_put(self.data.train_logits[rows]))
    return jax.device_get(state.variables)


def host_init_state(variables: Mapping[str, Any], optimizer: Any) -> finetune_lib.KDState:
  """``finetune.init_state`` without eager XLA work: the optimizer state is built from its
  abstract shapes as host zeros (every optax state we use starts at zero), so a new
  architecture costs no compilation here."""
  params = variables['params']
  abstract = jax.eval_shape(optimizer.init, params)
  opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  return finetune_lib.KDState(step=np.zeros((), np.int32), params=params,
                              batch_stats=variables.get('batch_stats', {}), opt_state=opt_state)
