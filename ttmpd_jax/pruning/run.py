"""Running physically pruned variables through the *unpruned* model definition.

A user's Flax model usually hard-codes its layer widths (``nn.Conv(64, ...)``), so after
``remove_channels`` its definition no longer matches the smaller kernels. :func:`run_pruned`
intercepts every supported linen layer (``layers.LINEN_SUPPORTED``: ``Conv``, ``ConvTranspose``,
``Dense``, ``DenseGeneral``, ``Einsum``) and runs a copy whose size fields (``features``,
``shape``, a depthwise conv's ``feature_group_count``) are read from the parameters it is given.
Normalisation layers take their size from their input already. An NNX adapter
(``pruning.nnx.NNXModel``) resizes its layers itself. Code between layers must not hard-code
channel counts (``x.reshape((n, -1))`` is fine; ``x.reshape((n, 512))`` is not).
Zoo models do not need this: rebuild them with ``build_model(spec.with_widths_of(variables))``.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from ttmpd_jax.pruning.layers import LINEN_SUPPORTED, resize_linen


def run_pruned(model: Any, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
  """``model.apply(variables, *args, **kwargs)`` for variables smaller than ``model`` declares.

  Args:
    model: the original (unpruned) Flax linen module, or an NNX adapter (``from_nnx``).
    variables: e.g. the result of ``remove_channels``.
    *args, **kwargs: passed to ``model.apply`` (e.g. ``x, train=False``; ``mutable=...``).
  """
  if not isinstance(model, nn.Module):
    return model.apply(variables, *args, **kwargs)

  def resize(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, LINEN_SUPPORTED):
      copy = resize_linen(module, call_args[0])
      if copy is not None:
        return copy.apply({'params': module.variables['params']}, *call_args, **call_kwargs)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(resize):
    return model.apply(variables, *args, **kwargs)
