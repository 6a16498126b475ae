"""Adaptive BatchNorm: recompute BN running statistics on a few batches of test samples.

Used twice in TT-MPD:

* by the search (EagleEye-style adaptive BN, docs/method.md step 4): a masked or pruned candidate's
  statistics are stale after channels are removed, so they are re-estimated on k test batches
  before the candidate is scored;
* for the teacher (step 0, test-time BN adaptation): the source model's statistics are re-estimated
  on the shifted test data (``teacher_bn_adapt``).

The forward passes run in train mode (every BN normalises with its batch statistics, as in
EagleEye), and a method interceptor records each train-mode ``nn.BatchNorm``'s exact batch mean and
variance of its input. No parameter changes.

Design choice: the new running statistics are the **exact cumulative average** of the k per-batch
statistics (mean of batch means, mean of biased batch variances; PyTorch's ``momentum=None``),
not a momentum-weighted average: the result does not depend on the old statistics or on the
order of the batches, and k batches count equally. The per-batch variance is computed like Flax's
``BatchNorm`` (``E[x^2] - E[x]^2`` clipped at 0 with ``use_fast_variance``, else ``E[(x-E[x])^2]``),
over the global batch when the batch is sharded over a mesh.

Models without BatchNorm (no ``batch_stats`` collection, or an empty one) are valid inputs: every
function here then leaves the statistics alone and returns the (transformed) variables unchanged,
without running the model (:func:`has_batch_stats` tells the caller, e.g. to log that adaptation
was skipped).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax import parallel
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.errors import UserError

Variables = dict[str, Any]
Transform = Callable[[Variables, Any], Variables]


def _record_batch_moments(next_fun, args, kwargs, context):
  """Interceptor: after a train-mode BatchNorm call, store its exact batch moments as its
  ``batch_stats`` (replacing the momentum update Flax just made)."""
  module = context.module
  if not isinstance(module, nn.BatchNorm) or context.method_name != '__call__':
    return next_fun(*args, **kwargs)
  out = next_fun(*args, **kwargs)
  use_running_average = kwargs.get('use_running_average', args[1] if len(args) > 1 else None)
  if use_running_average is None:
    use_running_average = module.use_running_average
  if use_running_average or module.is_initializing():
    return out
  if kwargs.get('mask') is not None:
    raise NotImplementedError('adaptive BN does not support masked BatchNorm calls')
  x = args[0]
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  feature_axes = tuple(a % x.ndim for a in axes)
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x, reduction_axes)
  if module.use_fast_variance:
    var = jnp.maximum(jnp.mean(jnp.square(x), reduction_axes) - jnp.square(mean), 0.0)
  else:
    var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, reduction_axes)), reduction_axes)
  module.put_variable('batch_stats', 'mean', mean.astype(module.get_variable('batch_stats',
                                                                             'mean').dtype))
  module.put_variable('batch_stats', 'var', var.astype(module.get_variable('batch_stats',
                                                                           'var').dtype))
  return out


def has_batch_stats(variables: Mapping[str, Any]) -> bool:
  """Whether ``variables`` hold any BatchNorm running statistics (something to adapt)."""
  return bool(jax.tree.leaves(dict(variables).get('batch_stats', {})))


def _apply_transform(transform: Optional[Transform], variables: Variables, aux: Any) -> Variables:
  return variables if transform is None else transform(variables, aux)


def batch_moments(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> Any:
  """Per-BN exact batch mean/variance of one batch, as a ``batch_stats`` tree (not jitted).

  BatchNorms that do not run in train mode keep their stored statistics. ``model`` is a linen
  module, or an NNX adapter (``pruning.from_nnx``), whose own ``batch_moments`` runs train mode
  with momentum 0 (its running statistics become the batch's exact moments).
  """
  if not isinstance(model, nn.Module) and hasattr(model, 'batch_moments'):
    return model.batch_moments(dict(variables), images)
  with nn.intercept_methods(_record_batch_moments):
    _, updates = model.apply(dict(variables), images, train=True, mutable=['batch_stats'])
  return updates.get('batch_stats', {})   # A model without BatchNorm updates nothing.


def make_bn_adapter(model: nn.Module, transform: Optional[Transform] = None) -> Callable:
  """Jitted ``adapt(variables, aux, images [k, B, H, W, C]) -> variables``.

  Transforms ``variables`` (e.g. applies masks given as ``aux``), averages the batch statistics
  of the k batches (``lax.scan``, one dispatch) and returns the transformed variables with the
  new ``batch_stats``. ``aux`` is a jit argument: new masks of the same shapes do not recompile.
  Variables without ``batch_stats`` (no BatchNorm) are only transformed.
  """

  @jax.jit
  def adapt(variables, aux, images):
    variables = _apply_transform(transform, dict(variables), aux)
    if not has_batch_stats(variables):
      return variables

    def body(total, batch):
      stats = batch_moments(model, variables, batch)
      return jax.tree.map(jnp.add, total, stats), None

    zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
    total, _ = jax.lax.scan(body, zeros, images)
    stats = jax.tree.map(lambda t: t / images.shape[0], total)
    return _apply_transform(transform, {'params': variables['params'], 'batch_stats': stats}, aux)

  return adapt


def adapt_batch_stats(model: nn.Module, variables: Mapping[str, Any],
                      batches: Iterable[Union[np.ndarray, Mapping[str, np.ndarray]]], *,
                      transform: Optional[Transform] = None, aux: Any = None,
                      mesh: Optional[jax.sharding.Mesh] = None) -> Variables:
  """Recomputes BN running statistics as the exact average over ``batches`` (streamed).

  Args:
    model, variables: a (masked or pruned) model and its ``{'params', 'batch_stats'}``.
    batches: k >= 1 batches of normalised images float32 [B, H, W, C] (or pipeline dicts with
      ``'image'``), all of one shape; B divisible by the mesh size.
    transform, aux: optional ``transform(variables, aux)`` applied before the forward passes
      and to the result (e.g. masks).
    mesh: batches are sharded over its ``data`` axis (all local devices when ``None``).
  Returns:
    Host variables: transformed params and the adapted ``batch_stats`` (no forward pass and the
    transformed variables as they are when ``variables`` hold no ``batch_stats``).
  Raises:
    UserError: no batches.
  """
  mesh = mesh or parallel.make_mesh()
  variables = _apply_transform(transform, parallel.replicate(dict(variables), mesh),
                               parallel.replicate(aux, mesh) if aux is not None else None)
  if not has_batch_stats(variables):
    return jax.device_get(variables)
  moments = jax.jit(lambda v, images: batch_moments(model, v, images))
  total, count = None, 0
  for batch in batches:
    images = batch['image'] if isinstance(batch, Mapping) else batch
    stats = moments(variables, parallel.shard_batch(images, mesh))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if count == 0:
    raise UserError('adaptive BN needs at least one batch of test samples (got none)')
  stats = jax.tree.map(lambda t: t / count, total)
  out = _apply_transform(transform, {'params': variables['params'], 'batch_stats': stats},
                         parallel.replicate(aux, mesh) if aux is not None else None)
  return jax.device_get(out)


def teacher_bn_adapt(model: nn.Module, variables: Mapping[str, Any], dataset: Dataset, *,
                     batch_size: int = 256, num_batches: Optional[int] = None, seed: int = 0,
                     mesh: Optional[jax.sharding.Mesh] = None) -> Variables:
  """Test-time BN adaptation of the teacher on the (unlabeled) shifted test set.

  Design choice: statistics are the exact average over ``num_batches`` seeded-shuffled full
  batches of ``dataset`` (all full batches when ``None``); parameters are unchanged. Labels are
  never read. A model without BatchNorm (no ``batch_stats``) is returned unchanged.
  """
  if not has_batch_stats(variables):
    return dict(variables)
  mesh = mesh or parallel.make_mesh()
  batch_size = min(batch_size, len(dataset))
  batch_size -= batch_size % mesh.size
  if batch_size <= 0:
    raise UserError(f'teacher BN adaptation: test set {dataset.name} has {len(dataset)} samples, '
                    f'fewer than the {mesh.size} devices')
  if num_batches is not None and num_batches <= 0:
    raise UserError(f'teacher BN adaptation needs at least one batch, got '
                    f'num_batches={num_batches}')
  stream = pipeline.batches(dataset.images, np.zeros(len(dataset), np.int32), batch_size,
                            family=dataset.family, seed=seed, drop_remainder=True,
                            process_index=jax.process_index(), process_count=jax.process_count())
  return adapt_batch_stats(model, variables, itertools.islice(stream, num_batches), mesh=mesh)
