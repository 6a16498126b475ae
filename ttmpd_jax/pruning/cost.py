"""Cost counting for pruned architectures: MACs and parameters, measured or predicted.

- :func:`count_cost` measures any (pruned) model: MACs per example and trainable parameters, the
  convention of ``models.inspect.count_flops_and_params`` (conv and dense multiply-accumulates),
  for any model (no ``train`` argument needed) and for pruned variables of a user model.
- :func:`cost_model` returns a :class:`CostModel` that predicts both as a function of the kept
  channel count of every group, without building or tracing anything: every parameter axis is
  ``fixed + sum_g multiplicity_g * keep_g`` (a flatten gives each channel ``h*w`` Dense rows),
  so MACs and parameter counts are polynomials in the keep counts. An iterative search calls it
  for every candidate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning.graph import ChannelGroup, Path, _default_apply_kwargs, key_path


@dataclasses.dataclass(frozen=True)
class Cost:
  """Per-example multiply-accumulates and trainable parameter count."""

  macs: int
  params: int


def kernel_positions(model: nn.Module, image_shape: tuple[int, ...], *,
                     apply_kwargs: Optional[Mapping[str, Any]] = None) -> dict[Path, int]:
  """Output positions per example of every ``nn.Conv``/``nn.Dense`` kernel, summed over calls.

  A layer's MACs are ``positions * kernel.size`` (a depthwise kernel ``[kh, kw, 1, C]`` included),
  and positions do not change when channels are pruned, so they are read once from an abstract
  run of the unpruned model (no FLOPs, no variables needed).

  Returns:
    ``('params', *module_path, 'kernel')`` -> positions (``H_out * W_out`` for a conv, the
    number of rows per example for a dense layer).
  """
  kwargs = dict(_default_apply_kwargs(model) if apply_kwargs is None else apply_kwargs)
  positions: dict[Path, int] = {}

  def record(next_fun, args, call_kwargs, context):
    out = next_fun(*args, **call_kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
      path = ('params', *module.path, 'kernel')
      positions[path] = positions.get(path, 0) + int(np.prod(out.shape[1:-1], dtype=np.int64))
    return out

  def run():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32), **kwargs)

  jax.eval_shape(run)
  return positions


def count_cost(model: nn.Module, variables: Mapping[str, Any], image_shape: tuple[int, ...], *,
               apply_kwargs: Optional[Mapping[str, Any]] = None) -> Cost:
  """Measured cost of ``variables`` run by ``model`` at ``image_shape`` ([H, W, C], no batch).

  ``model`` may be the original (unpruned) module of a user model whose variables were pruned
  (see :func:`run_pruned`): positions come from its abstract run, kernel sizes from
  ``variables``. For zoo models this equals ``models.inspect.count_flops_and_params``.
  """
  positions = kernel_positions(model, image_shape, apply_kwargs=apply_kwargs)
  macs = params = 0
  for kp, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]:
    size = int(np.size(leaf))
    params += size
    macs += positions.get(('params',) + key_path(kp), 0) * size
  return Cost(int(macs), int(params))


# An axis size as (fixed part, ((group name, positions per kept channel), ...)).
_AxisSize = tuple[int, tuple[tuple[str, int], ...]]


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Predicts MACs/params from kept channel counts; ``model_cost(keeps)`` with keeps a mapping
  group name -> kept channels (missing groups keep all).

  Attributes:
    sizes: params leaf path -> per-axis affine size.
    positions: kernel leaf path -> output positions per example summed over its calls (0 for
      leaves that are not conv/dense kernels).
    full: group name -> full channel count.
  """

  sizes: Mapping[Path, tuple[_AxisSize, ...]]
  positions: Mapping[Path, int]
  full: Mapping[str, int]

  def __call__(self, keeps: Mapping[str, int] | None = None) -> Cost:
    keeps = dict(keeps or {})
    for name in keeps:
      if name not in self.full:
        raise UserError(f'keep count for unknown channel group {name!r}')
    k = {**self.full, **keeps}
    macs = params = 0
    for path, axes in self.sizes.items():
      n = 1
      for fixed, terms in axes:
        n *= fixed + sum(mult * k[name] for name, mult in terms)
      params += n
      macs += self.positions.get(path, 0) * n
    return Cost(int(macs), int(params))

  def from_masks(self, masks: Mapping[str, Any]) -> Cost:
    return self({name: int(np.sum(np.asarray(m))) for name, m in masks.items()})


def cost_model(model: nn.Module, variables: Mapping[str, Any],
               groups: Sequence[ChannelGroup], image_shape: tuple[int, ...], *,
               apply_kwargs: Optional[Mapping[str, Any]] = None) -> CostModel:
  """Builds a :class:`CostModel` for ``model`` at ``image_shape`` ([H, W, C]).

  ``cost_model(...)( {} )`` equals :func:`count_cost` of the unpruned model, and
  ``cost_model(...)(kept_counts(masks))`` equals :func:`count_cost` of the model returned by
  ``remove_channels(variables, groups, masks)``.
  """
  params = variables['params']
  leaf_shapes = {('params',) + key_path(kp): tuple(np.shape(x))
                 for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  terms: dict[tuple[Path, int], list[tuple[str, int]]] = {}
  in_groups: dict[tuple[Path, int], int] = {}
  full = {}
  for g in groups:
    if not g.prunable:
      continue
    full[g.name] = g.size
    for m in g.members:
      if m.path not in leaf_shapes:
        continue
      counts = np.bincount(m.channel_index(g.size)[m.channel_index(g.size) >= 0],
                           minlength=g.size)
      if counts.min() != counts.max():
        raise UserError(f'channel group {g.name!r}: member {m.name} axis {m.axis} maps its '
                        'channels to unequal numbers of positions; cost cannot be predicted')
      terms.setdefault((m.path, m.axis), []).append((g.name, int(counts[0])))
      in_groups[(m.path, m.axis)] = in_groups.get((m.path, m.axis), 0) + int(counts.sum())
  sizes = {}
  for path, shape in leaf_shapes.items():
    sizes[path] = tuple((n - in_groups.get((path, d), 0), tuple(terms.get((path, d), ())))
                        for d, n in enumerate(shape))
  positions = kernel_positions(model, image_shape, apply_kwargs=apply_kwargs)
  return CostModel(sizes, positions, full)
