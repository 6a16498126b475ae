"""Running physically pruned variables through the *unpruned* module definition.

A user's Flax model usually hard-codes its layer widths (``nn.Conv(64, ...)``), so after
``remove_channels`` its definition no longer matches the smaller kernels. :func:`run_pruned`
intercepts every ``nn.Conv``/``nn.Dense`` call and runs a copy of the layer whose ``features``
(and, for depthwise convs, ``feature_group_count``) are read from the kernel it is given.
Normalisation layers take their size from their input already. Code between layers must not
hard-code channel counts (``x.reshape((n, -1))`` is fine; ``x.reshape((n, 512))`` is not).
Zoo models do not need this: rebuild them with ``build_model(spec.with_widths_of(variables))``.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn


def _resized(module: nn.Module, x: Any) -> nn.Module | None:
  """An unbound copy of ``module`` matching its (possibly pruned) kernel, or None if it fits."""
  if not module.has_variable('params', 'kernel'):
    return None
  kernel = module.get_variable('params', 'kernel')
  updates = {}
  if kernel.shape[-1] != module.features:
    updates['features'] = int(kernel.shape[-1])
  if isinstance(module, nn.Conv) and module.feature_group_count > 1:
    # Depthwise: one kernel input per group, so the group count follows the input width.
    groups = int(x.shape[-1]) // int(kernel.shape[-2])
    if groups != module.feature_group_count:
      updates['feature_group_count'] = groups
  return module.clone(parent=None, **updates) if updates else None


def run_pruned(model: nn.Module, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
  """``model.apply(variables, *args, **kwargs)`` for variables smaller than ``model`` declares.

  Args:
    model: the original (unpruned) Flax module.
    variables: e.g. the result of ``remove_channels``.
    *args, **kwargs: passed to ``model.apply`` (e.g. ``x, train=False``; ``mutable=...``).
  """

  def resize(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
      copy = _resized(module, call_args[0])
      if copy is not None:
        return copy.apply({'params': module.variables['params']}, *call_args, **call_kwargs)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(resize):
    return model.apply(variables, *args, **kwargs)
