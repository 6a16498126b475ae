"""Channel importance for the search: which channels of a group a candidate removes first.

A criterion is a registered object (``CRITERIA``) whose ``make(model, groups, data, seed)``
returns a scorer ``variables -> {group name: float64 [size]}`` (higher = keep) — a thin adapter
from the search's data (the fine-tuning subset with cached teacher logits) to the pure criteria of
``ttmpd_jax.pruning.importance``. Each scorer is one ``jax.jit`` per architecture (eager array
ops would compile once per primitive and shape, every iteration). The gradient criterion
(first-order Taylor, as in HALP) differentiates the KD loss against the cached pseudo labels: no
true labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.distill.losses import kd_loss
from ttmpd_jax.pruning import importance
from ttmpd_jax.pruning.graph import ChannelGroup
from ttmpd_jax.search.registry import Registry

Scorer = Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
CRITERIA: Registry = Registry('importance criterion', 'importance')


def _as_float64(scores: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.float64) for k, v in scores.items()}


@dataclasses.dataclass(frozen=True)
class NormCriterion:
  """A data-free criterion of the weights (``importance.l2_norm``, ``l1_norm``, ``bn_scale``)."""

  fn: Callable

  def make(self, model: Any, groups: Sequence[ChannelGroup], data: Any, seed: int) -> Scorer:
    del model, data, seed
    groups = tuple(groups)
    jitted = jax.jit(lambda variables: self.fn(variables, groups))
    return lambda variables: _as_float64(jitted(variables))


@dataclasses.dataclass(frozen=True)
class RandomCriterion:
  """Uniform random scores (a sanity baseline), seeded."""

  def make(self, model: Any, groups: Sequence[ChannelGroup], data: Any, seed: int) -> Scorer:
    del model, data
    rng = np.random.default_rng(seed)
    prunable = [g for g in groups if g.prunable]
    return lambda variables: {g.name: rng.random(g.size) for g in prunable}


@dataclasses.dataclass(frozen=True)
class TaylorCriterion:
  """First-order Taylor saliency of the KD loss, averaged over ``batches`` KD batches of S."""

  batches: int = 4
  batch_size: int = 128

  def make(self, model: Any, groups: Sequence[ChannelGroup], data: Any, seed: int) -> Scorer:
    del seed
    groups = tuple(groups)
    n = min(len(data.train_images), self.batches * self.batch_size)
    batch = min(self.batch_size, n)
    n -= n % batch
    images = jax.device_put(data.train_images[:n].reshape(n // batch, batch,
                                                           *data.train_images.shape[1:]))
    logits = jax.device_put(data.train_logits[:n].reshape(n // batch, batch, -1))

    @jax.jit
    def taylor(variables, images, logits):
      def loss(params, x, t):
        out = model.apply({**variables, 'params': params}, x, train=False)
        return kd_loss(out, t)

      def body(acc, xt):
        return jax.tree.map(jnp.add, acc, jax.grad(loss)(variables['params'], *xt)), None

      total = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, variables['params']),
                           (images, logits))[0]
      grads = jax.tree.map(lambda g: g / images.shape[0], total)
      return importance.taylor(variables, grads, groups)

    return lambda variables: _as_float64(taylor(variables, images, logits))


CRITERIA.register('l2')(NormCriterion(importance.l2_norm))
CRITERIA.register('l1')(NormCriterion(importance.l1_norm))
CRITERIA.register('bn_gamma')(NormCriterion(importance.bn_scale))
CRITERIA.register('taylor')(TaylorCriterion())
CRITERIA.register('random')(RandomCriterion())


def make_scorer(name: str, model: Any, groups: Sequence[ChannelGroup], data: Any, *,
                seed: int = 0) -> Scorer:
  """``scorer(variables) -> {group name: float64 [size]}`` of the registered criterion ``name``."""
  return CRITERIA.get(name).make(model, groups, data, seed)
