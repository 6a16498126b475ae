"""Channel importance for the search: which channels of a group a candidate removes first.

A thin adapter from the search's data (the fine-tuning subset with cached teacher logits) to the
pure criteria of ``ttmpd_jax.pruning.importance``. Each scorer is one ``jax.jit`` per
architecture (eager array ops would compile once per primitive and shape, every iteration).
Gradient-based criteria (first-order Taylor, as in HALP) differentiate the KD loss against the
cached pseudo labels: no true labels.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.distill.losses import kd_loss
from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning import importance
from ttmpd_jax.pruning.graph import ChannelGroup

IMPORTANCE_CRITERIA = ('l2', 'l1', 'bn_gamma', 'taylor', 'random')
_NORM_CRITERIA = {'l2': importance.l2_norm, 'l1': importance.l1_norm,
                  'bn_gamma': importance.bn_scale}

Scorer = Callable[[Mapping[str, Any]], dict[str, np.ndarray]]


def make_scorer(name: str, model: Any, groups: Sequence[ChannelGroup], data: Any, *,
                seed: int = 0, taylor_batches: int = 4, batch_size: int = 128) -> Scorer:
  """``scorer(variables) -> {group name: float64 [size]}`` (higher = keep) for ``groups``.

  Args:
    name: one of ``IMPORTANCE_CRITERIA``.
    model, groups: the current architecture.
    data: ``evaluation.SearchData`` (Taylor uses ``train_images`` / ``train_logits``).
    seed: for 'random'.
    taylor_batches, batch_size: the Taylor gradient is averaged over this many KD batches.
  """
  if name not in IMPORTANCE_CRITERIA:
    raise UserError(f'unknown importance criterion {name!r}; valid: '
                    f'{", ".join(IMPORTANCE_CRITERIA)}')
  groups = tuple(groups)
  prunable = [g for g in groups if g.prunable]
  if name == 'random':
    rng = np.random.default_rng(seed)
    return lambda variables: {g.name: rng.random(g.size) for g in prunable}
  if name in _NORM_CRITERIA:
    criterion = _NORM_CRITERIA[name]
    fn = jax.jit(lambda variables: criterion(variables, groups))
    return lambda variables: {k: np.asarray(v, np.float64) for k, v in fn(variables).items()}

  n = min(len(data.train_images), taylor_batches * batch_size)
  batch = min(batch_size, n)
  n -= n % batch
  images = jax.device_put(data.train_images[:n].reshape(n // batch, batch,
                                                         *data.train_images.shape[1:]))
  logits = jax.device_put(data.train_logits[:n].reshape(n // batch, batch, -1))

  @jax.jit
  def taylor(variables, images, logits):
    def loss(params, x, t):
      out = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                        train=False)
      return kd_loss(out, t)

    grads = jax.tree.map(lambda g: g / images.shape[0], jax.lax.scan(
        lambda acc, xt: (jax.tree.map(jnp.add, acc, jax.grad(loss)(variables['params'], *xt)),
                         None),
        jax.tree.map(jnp.zeros_like, variables['params']), (images, logits))[0])
    return importance.taylor(variables, grads, groups)

  return lambda variables: {k: np.asarray(v, np.float64)
                            for k, v in taylor(variables, images, logits).items()}
