"""Layer inventory of any Flax linen model: what each Conv / Dense / BatchNorm sees at run time.

Built by running the model abstractly (``jax.eval_shape``) under ``nn.intercept_methods``, so it
costs no FLOPs and works on users' own models built from standard layers. The latency table and
FLOP counting both read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One layer call. Shapes are per-example-batch NHWC (conv) or [N, D] (dense)."""

  path: str                    # '/'-joined module path, e.g. 'stage1_block0/conv1'.
  kind: str                    # 'conv', 'dense' or 'batchnorm'.
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  kernel_size: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  groups: int = 1
  use_bias: bool = False

  @property
  def c_in(self) -> int:
    return int(self.input_shape[-1])

  @property
  def c_out(self) -> int:
    return int(self.output_shape[-1])

  @property
  def macs(self) -> int:
    """Multiply-accumulates of this call (whole batch)."""
    if self.kind == 'conv':
      out_positions = 1
      for d in self.output_shape[:-1]:
        out_positions *= int(d)
      k = 1
      for d in self.kernel_size:
        k *= int(d)
      return out_positions * self.c_out * k * self.c_in // self.groups
    if self.kind == 'dense':
      rows = 1
      for d in self.output_shape[:-1]:
        rows *= int(d)
      return rows * self.c_in * self.c_out
    return 0


def _tuple(value: Any, n: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(int(v) for v in value)


def layer_inventory(model: nn.Module, variables: Mapping[str, Any],
                    input_shape: tuple[int, ...]) -> list[LayerInfo]:
  """Every Conv/Dense/BatchNorm call of ``model.apply(variables, x, train=False)`` in call order.

  Args:
    model: a Flax linen module whose ``__call__`` takes ``(x, train=...)``.
    variables: its variables (shapes are what matter; abstract arrays are fine).
    input_shape: full input shape including batch, e.g. ``(256, 28, 28, 1)``.
  """
  calls: list[LayerInfo] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, (nn.Conv, nn.Dense,
                                                                    nn.BatchNorm)):
      return out
    path = '/'.join(module.path)
    x = args[0]
    if isinstance(module, nn.Conv):
      n = len(module.kernel_size)
      calls.append(LayerInfo(path, 'conv', tuple(x.shape), tuple(out.shape),
                             _tuple(module.kernel_size, n), _tuple(module.strides, n),
                             int(module.feature_group_count), bool(module.use_bias)))
    elif isinstance(module, nn.Dense):
      calls.append(LayerInfo(path, 'dense', tuple(x.shape), tuple(out.shape),
                             use_bias=bool(module.use_bias)))
    else:
      calls.append(LayerInfo(path, 'batchnorm', tuple(x.shape), tuple(out.shape)))
    return out

  def run(variables):
    with nn.intercept_methods(record):
      return model.apply(variables, jnp.zeros(input_shape, jnp.float32), train=False)

  jax.eval_shape(run, variables)
  return calls


def count_flops_and_params(model: nn.Module, variables: Mapping[str, Any],
                           image_shape: tuple[int, ...]) -> tuple[int, int]:
  """``(MACs per example, trainable parameter count)`` of ``model`` at ``image_shape`` [H, W, C].

  FLOPs here follow the common convention of counting multiply-accumulates of conv and dense
  layers (BatchNorm, activations and pooling are negligible and omitted).
  """
  macs = sum(layer.macs for layer in layer_inventory(model, variables, (1, *image_shape)))
  params = sum(int(x.size) for x in jax.tree.leaves(variables['params']))
  return macs, params
