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
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning.graph import (_CALLS, ChannelGroup, Path, _Tracer, _default_apply_kwargs,
                                     key_path)


@dataclasses.dataclass(frozen=True)
class Cost:
  """Per-example multiply-accumulates and trainable parameter count."""

  macs: int
  params: int


def _abstract_variables(model: Any, x: jax.ShapeDtypeStruct, kwargs: Mapping[str, Any]) -> Any:
  if isinstance(model, nn.Module):
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)
  return model.abstract_variables()


def _eqn_macs(eqn) -> int:
  """Multiply-accumulates of one conv/matmul equation (dense-equivalent: every output element
  times its reduction length)."""
  out = int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64))
  if eqn.primitive.name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    out_dim = eqn.params['dimension_numbers'][1][0]
    return out * int(np.prod(rhs, dtype=np.int64)) // int(rhs[out_dim])
  (lc, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  return out * int(np.prod([lhs[d] for d in lc], dtype=np.int64))


def _leaf_macs(jaxpr, sources: dict, macs: dict[int, int]) -> list[Optional[int]]:
  """Adds each conv/matmul's MACs to the parameter leaf feeding it; returns the leaf each output
  of ``jaxpr`` comes from (None if none)."""
  src = dict(sources)

  def read(v):
    return None if isinstance(v, jex.Literal) else src.get(v)

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    p = eqn.primitive.name
    sub = _Tracer._sub_jaxpr(eqn, _CALLS[p]) if p in _CALLS else None
    if sub is not None and len(sub[0].invars) == len(ins):
      outs = _leaf_macs(sub[0], {v: l for v, l in zip(sub[0].invars, ins) if l is not None}, macs)
      src.update({v: l for v, l in zip(eqn.outvars, outs) if l is not None})
    elif p in ('conv_general_dilated', 'dot_general'):
      leaf = ins[1] if ins[1] is not None else ins[0]
      if leaf is not None:
        macs[leaf] = macs.get(leaf, 0) + _eqn_macs(eqn)
    else:
      # A kernel cast, masked, reversed or reshaped is still that kernel.
      derived = {(l, int(np.prod(v.aval.shape))) for l, v in zip(ins, eqn.invars) if l is not None}
      if len(derived) == 1 and len(eqn.outvars) == 1:
        leaf, size = derived.pop()
        if int(np.prod(eqn.outvars[0].aval.shape)) == size:
          src[eqn.outvars[0]] = leaf
  return [read(v) for v in jaxpr.outvars]


def kernel_positions(model: Any, image_shape: tuple[int, ...], *,
                     apply_kwargs: Optional[Mapping[str, Any]] = None) -> dict[Path, int]:
  """Output positions per example of every parameter kernel, summed over its calls.

  A layer's MACs are ``positions * kernel.size`` (a depthwise kernel ``[kh, kw, 1, C]``
  included), and positions do not change when channels are pruned, so they are read once from
  an abstract trace of the unpruned model (no FLOPs, no variables needed): every
  ``conv_general_dilated``/``dot_general`` fed by a parameter leaf contributes
  ``output size x reduction length / kernel size``.

  Args:
    model: a linen module or an NNX adapter (``pruning.nnx.from_nnx``).

  Returns:
    ``('params', *module_path, 'kernel')`` -> positions (``H_out * W_out`` for a conv, the
    number of rows per example for a dense layer).
  """
  kwargs = dict(_default_apply_kwargs(model) if apply_kwargs is None else apply_kwargs)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  flat, treedef = jax.tree_util.tree_flatten_with_path(_abstract_variables(model, x, kwargs))
  leaves = [leaf for _, leaf in flat]
  closed = jax.make_jaxpr(
      lambda ls, x: model.apply(jax.tree_util.tree_unflatten(treedef, ls), x, **kwargs))(
          leaves, x)
  macs: dict[int, int] = {}
  _leaf_macs(closed.jaxpr, dict(zip(closed.jaxpr.invars, range(len(leaves)))), macs)
  positions = {}
  for leaf, m in macs.items():
    path = key_path(flat[leaf][0])
    if path[0] == 'params':
      positions[path] = m // int(np.prod(leaves[leaf].shape, dtype=np.int64))
  return positions


def count_cost(model: Any, variables: Mapping[str, Any], image_shape: tuple[int, ...], *,
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


def cost_model(model: Any, variables: Mapping[str, Any],
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
