"""The one set of layer kinds that channel pruning supports, for linen and NNX alike.

Discovery (:func:`~ttmpd_jax.pruning.discover_groups`), removal, the pruned-model runner
(:func:`~ttmpd_jax.pruning.run_pruned`, :meth:`NNXModel.to_module`) and the cost count
(:func:`~ttmpd_jax.pruning.count_cost`) all read this table:

- convolution: linen ``Conv`` (dense or depthwise), ``nnx.Conv``;
- transposed convolution: ``ConvTranspose``, ``nnx.ConvTranspose``;
- dense / matmul: ``Dense``, ``DenseGeneral``, ``Einsum``; ``nnx.Linear``, ``nnx.LinearGeneral``,
  ``nnx.Einsum``;
- per-channel normalisation: ``BatchNorm``, ``InstanceNorm`` (linen and NNX);
- no channel parameters: ``Dropout``, ``PReLU`` (linen and NNX).

Parameter-free code between layers (activations, pooling, residual adds, concatenations,
flattens) is followed by the tracer in ``graph.py``. Any other layer whose parameters hold a
slice of a channel group is *refused* at discovery, naming the layer: normalisations over the
channel axis (``LayerNorm``, ``RMSNorm``, ``GroupNorm``), ``ConvLocal``, ``Embed``, attention
(its projections are dense layers, but ``1/sqrt(head_dim)`` is baked in), a user module's own
``self.param``/``nnx.Param`` (its declared shape would no longer match) and every layer nested
inside such a layer.

Design choice: the table is keyed by layer *type*, not by primitive. The tracer proves which
axes must shrink together; the table guarantees that the shrunken layer can be rebuilt (every
size attribute of a supported kind is derived from its parameter shapes here) and that its
multiply-accumulates are ``positions * kernel.size`` with positions independent of the widths.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

Path = tuple[str, ...]

LINEN_SUPPORTED = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral, nn.Einsum, nn.BatchNorm,
                   nn.InstanceNorm, nn.Dropout, nn.PReLU)
NNX_SUPPORTED = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral, nnx.Einsum,
                 nnx.BatchNorm, nnx.InstanceNorm, nnx.Dropout, nnx.PReLU)
# Library modules that only hold other layers.
CONTAINERS = (nn.Sequential, nnx.Sequential, nnx.List, nnx.Dict)


def is_model(model: Any) -> bool:
  """A linen module or an adapter (``NNXModel``) with the linen calling convention."""
  return isinstance(model, nn.Module) or callable(getattr(model, 'to_module', None))


# ----------------------------------------------------------------------------------------------
# Rebuilding supported layers at their new sizes.


def resize_linen(module: nn.Module, x: Any) -> Optional[nn.Module]:
  """An unbound copy of a supported linen layer whose size fields match the parameters it is
  given (and, for a depthwise conv, its input width), or None if nothing changed."""
  if not module.has_variable('params', 'kernel'):
    return None
  shape = tuple(module.get_variable('params', 'kernel').shape)
  updates: dict[str, Any] = {}
  if isinstance(module, (nn.Conv, nn.Dense)):
    updates['features'] = shape[-1]
  if isinstance(module, nn.ConvTranspose):
    updates['features'] = shape[-2] if module.transpose_kernel else shape[-1]
  if isinstance(module, nn.DenseGeneral):
    n = 1 if isinstance(module.features, int) else len(module.features)
    updates['features'] = shape[-1] if isinstance(module.features, int) else shape[-n:]
  if isinstance(module, nn.Einsum):
    updates['shape'] = shape
  if isinstance(module, nn.Conv) and module.feature_group_count > 1:
    # Depthwise: one kernel input per group, so the group count follows the input width.
    updates['feature_group_count'] = int(x.shape[-1]) // shape[-2]
  updates = {k: v for k, v in updates.items() if getattr(module, k) != v}
  return module.clone(parent=None, **updates) if updates else None


def _conv_sizes(m: Any, shape: tuple[int, ...]) -> dict[str, Any]:
  if shape == tuple(m.kernel_shape):
    return {}
  if isinstance(m, nnx.ConvTranspose):
    out, inp = (shape[-2], shape[-1]) if m.transpose_kernel else (shape[-1], shape[-2])
    return {'kernel_shape': shape, 'in_features': inp, 'out_features': out}
  sizes = {'kernel_shape': shape, 'out_features': shape[-1], 'in_features': shape[-2]}
  if m.feature_group_count > 1:
    # Discovery only lets depthwise convs shrink (groups == inputs == outputs).
    sizes.update(feature_group_count=shape[-1], in_features=shape[-1])
  return sizes


def _nnx_sizes(m: Any) -> dict[str, Any]:
  """Size attributes of a supported NNX layer derived from its current parameter shapes."""
  kernel = getattr(m, 'kernel', None)
  shape = tuple(kernel.shape) if kernel is not None else None
  if isinstance(m, (nnx.Conv, nnx.ConvTranspose)):
    return _conv_sizes(m, shape)
  if isinstance(m, nnx.Linear):
    return {'in_features': shape[0], 'out_features': shape[1]}
  if isinstance(m, nnx.LinearGeneral):
    nb, na = len(m.batch_axis), len(m.axis)
    return {'in_features': shape[nb:nb + na], 'out_features': shape[nb + na:]}
  if isinstance(m, nnx.Einsum):
    bias = getattr(m, 'bias', None)
    return {'kernel_shape': shape, 'bias_shape': None if bias is None else tuple(bias.shape)}
  if isinstance(m, (nnx.BatchNorm, nnx.InstanceNorm, nnx.LayerNorm, nnx.RMSNorm,
                    nnx.GroupNorm)):
    stats = [v for v in (getattr(m, 'mean', None), getattr(m, 'scale', None),
                         getattr(m, 'bias', None)) if v is not None]
    return {'num_features': int(stats[0].shape[-1])} if stats else {}
  return {}


def resize_nnx(module: nnx.Module) -> nnx.Module:
  """Sets every supported layer's size attributes (``in_features``, ``out_features``,
  ``num_features``, ``kernel_shape``, ``feature_group_count``) from its parameter shapes, in
  place; returns ``module``."""
  for _, m in nnx.iter_modules(module):
    for name, value in _nnx_sizes(m).items():
      if getattr(m, name, None) != value:
        setattr(m, name, value)
  return module


# ----------------------------------------------------------------------------------------------
# Which layer owns each variable leaf, and is it supported?


def _linen_layers(model: nn.Module, variables: Any, example_input: Any,
                  apply_kwargs: Mapping[str, Any]) -> dict[Path, type]:
  layers: dict[Path, type] = {}

  def record(next_fun, args, kwargs, context):
    layers[tuple(context.module.path)] = type(context.module)
    return next_fun(*args, **kwargs)

  def run(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, **apply_kwargs)

  jax.eval_shape(run, variables, example_input)
  return layers


def _refusal(path: Path, layers: Mapping[Path, type], supported: tuple[type, ...]
             ) -> Optional[str]:
  """Why the layer at ``path`` (and its ancestors) cannot be rebuilt smaller, or None."""
  for k in range(1, len(path)):
    kind = layers.get(path[:k])
    if (kind is not None and kind.__module__.startswith('flax.') and
        not issubclass(kind, CONTAINERS)):
      return f"layer '{'/'.join(path[:k])}' ({kind.__name__}), not a supported layer kind"
  kind = layers.get(path)
  if kind is None or not issubclass(kind, supported):
    what = 'parameters declared outside a layer' if kind is None else kind.__name__
    name = '/'.join(path) or '<top level>'
    return f"layer '{name}' ({what}), not a supported layer kind"
  return None


def unsupported_leaves(model: Any, variables: Any, example_input: Any,
                       apply_kwargs: Mapping[str, Any]) -> dict[Path, str]:
  """Leaf path (``('params', *layer path, name)``) -> reason, for every variable leaf owned by a
  layer outside the supported kinds. Empty for plain functions (nothing is known about them)."""
  if isinstance(model, nn.Module):
    layers = _linen_layers(model, variables, example_input, apply_kwargs)
    supported = LINEN_SUPPORTED
  elif is_model(model) and hasattr(model, 'layer_types'):
    layers, supported = model.layer_types(), NNX_SUPPORTED
  else:
    return {}
  from ttmpd_jax.pruning.graph import key_path  # pylint: disable=g-import-not-at-top
  out = {}
  for kp, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
    path = key_path(kp)
    reason = _refusal(path[1:-1], layers, supported)
    if reason:
      out[path] = reason
  return out


def abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves of ``tree``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)

