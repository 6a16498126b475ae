"""Flax NNX models through the same pruning primitives as linen: an adapter with ``apply``.

``adapter, variables = from_nnx(module)`` splits an ``nnx.Module`` into a static graph and pure
nested dicts ``{'params': ..., 'batch_stats': ...}`` (``nnx.Param`` and ``nnx.BatchStat``
leaves); every other state (RNG keys and counts, ...) stays fixed inside the adapter. The adapter
speaks the linen calling convention the whole library uses::

  y = adapter.apply(variables, x)                                    # eval mode
  y, upd = adapter.apply(variables, x, train=True, mutable=['batch_stats'])
  groups = discover_groups(adapter, variables, x)
  small = remove_channels(variables, groups, masks)
  y = run_pruned(adapter, small, x)              # == adapter.apply(masked, x)
  module = adapter.to_module(small)              # a real nnx.Module of the new sizes

``apply`` is a pure function of ``variables`` (jit- and trace-friendly): each call merges a fresh
module, derives every supported layer's size attributes from the parameter shapes it is given
(``in_features``, ``out_features``, ``num_features``, ``kernel_shape``, a depthwise conv's
``feature_group_count``), sets train/eval mode with ``nnx.view`` (``deterministic``,
``use_running_average``) and calls it. The supported layer kinds are listed in
:mod:`ttmpd_jax.pruning.layers`.

Design choice: train mode is a view (``use_running_average=not train``,
``deterministic=not train``), so NNX models need no ``train`` argument; a module whose
``__call__`` takes ``train`` also receives it. Dropout draws from the module's own RNG state,
which the adapter keeps fixed (the same dropout pattern every call) unless ``rngs=`` reseeds it.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning.layers import abstract, resize_nnx

Variables = dict[str, Any]
COLLECTIONS = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


def _to_state(template: nnx.State, pure: Mapping[Any, Any], collection: str) -> nnx.State:
  """A new State with the template's variable types and metadata and ``pure``'s values."""
  values = {tuple(str(k) for k in path): v
            for path, v in traversals.flatten_mapping(dict(pure)).items()}
  flat = []
  for path, var in nnx.to_flat_state(template):
    key = tuple(str(k) for k in path)
    if key not in values:
      raise UserError(f"variables['{collection}'] lacks '{'/'.join(key)}' of the NNX model; pass "
                      'the variables from_nnx returned (or pruned from them)')
    flat.append((path, var.replace(values.pop(key))))
  if values:
    extra = '/'.join(next(iter(values)))
    raise UserError(f"variables['{collection}'] has '{extra}', which the NNX model does not "
                    'hold')
  return nnx.from_flat_state(flat)


class NNXModel:
  """An ``nnx.Module`` behind the linen ``apply(variables, x, train=..., mutable=...)`` API.

  Attributes:
    graphdef: the module's static structure (``nnx.split``).
    variables: ``{'params': ..., 'batch_stats': ...}`` of the module it was built from, as pure
      nested dicts (``batch_stats`` only when the module has any).
  """

  def __init__(self, module: nnx.Module):
    if not isinstance(module, nnx.Module):
      raise UserError(f'NNXModel needs an nnx.Module, got {type(module).__name__}')
    self.graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    self._templates = {'params': params, 'batch_stats': stats}
    self._rest = rest
    self._takes_train = 'train' in _call_parameters(module)
    self._layer_types = {tuple(str(p) for p in path): type(m)
                         for path, m in nnx.iter_modules(module)}
    self.variables: Variables = {'params': nnx.to_pure_dict(params)}
    if len(stats):
      self.variables['batch_stats'] = nnx.to_pure_dict(stats)

  def __call__(self, variables: Mapping[str, Any], *args: Any, train: bool = False,
               **kwargs: Any) -> Any:
    """Same as :meth:`apply`."""
    return self.apply(variables, *args, train=train, **kwargs)

  def layer_types(self) -> dict[tuple[str, ...], type]:
    """Layer path -> type of every module in the graph (the root is ``()``)."""
    return dict(self._layer_types)

  def abstract_variables(self) -> Variables:
    return abstract(self.variables)

  def to_module(self, variables: Mapping[str, Any], *, copy: bool = True) -> nnx.Module:
    """A real ``nnx.Module`` holding ``variables`` (e.g. physically pruned), with every
    supported layer's size attributes matching its parameters."""
    states = [_to_state(self._templates[c], variables.get(c, {}), c) for c in COLLECTIONS]
    module = nnx.merge(self.graphdef, *states, self._rest, copy=copy)
    return resize_nnx(module)

  def apply(self, variables: Mapping[str, Any], *args: Any, train: bool = False,
            mutable: Union[bool, str, Sequence[str]] = False,
            rngs: Optional[Mapping[str, jax.Array]] = None, **kwargs: Any) -> Any:
    """Runs the module on ``variables``; linen semantics.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` (pure nested dicts).
      *args, **kwargs: passed to the module's ``__call__``.
      train: train mode (batch statistics in BatchNorm, dropout on).
      mutable: ``False`` returns the output; ``'batch_stats'``/``['batch_stats']``/``True``
        returns ``(output, {'batch_stats': updated})``.
      rngs: optional ``{stream name: key}`` to reseed the module's RNG streams (dropout).
    """
    module = self._view(self.to_module(variables), train)
    if rngs:
      nnx.reseed(module, **dict(rngs))
    if self._takes_train:
      kwargs['train'] = train
    y = module(*args, **kwargs)
    wanted = _mutable_collections(mutable)
    if not wanted:
      return y
    return y, {c: nnx.to_pure_dict(nnx.state(module, COLLECTIONS[c])) for c in wanted}

  def batch_moments(self, variables: Mapping[str, Any], x: Any) -> Any:
    """Exact per-batch mean/variance of every train-mode ``nnx.BatchNorm``, as a
    ``batch_stats`` tree: a train-mode pass with momentum 0 (the running statistics become the
    batch's own)."""
    module = self._view(self.to_module(variables), True)
    for _, m in nnx.iter_modules(module):
      if isinstance(m, nnx.BatchNorm):
        m.momentum = 0.0
    kwargs = {'train': True} if self._takes_train else {}
    module(x, **kwargs)
    return nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

  @staticmethod
  def _view(module: nnx.Module, train: bool) -> nnx.Module:
    return nnx.view(module, deterministic=not train, use_running_average=not train,
                    raise_if_not_found=False)


def _call_parameters(module: nnx.Module) -> Mapping[str, inspect.Parameter]:
  try:
    return inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return {}


def _mutable_collections(mutable: Union[bool, str, Sequence[str]]) -> list[str]:
  if mutable is False or mutable is None:
    return []
  if mutable is True:
    return ['batch_stats']
  names = [mutable] if isinstance(mutable, str) else list(mutable)
  for name in names:
    if name not in COLLECTIONS:
      raise UserError(f'NNXModel.apply(mutable=...): unknown collection {name!r}; NNX models '
                      f'expose {sorted(COLLECTIONS)}')
  return names


def from_nnx(module: nnx.Module) -> tuple[NNXModel, Variables]:
  """``(adapter, variables)`` for an ``nnx.Module``; see :class:`NNXModel`."""
  adapter = NNXModel(module)
  return adapter, jax.tree.map(jnp.asarray, adapter.variables)
