"""MobileNetV2 (Sandler et al. 2018): inverted residuals with depthwise 3x3 convolutions.

Width-parameterised like the rest of the zoo. A depthwise conv has as many outputs as inputs
(feature_group_count = channels), so it takes its width from its input, never from ``widths``.
``small_input=True`` uses stride 1 in the stem and the first two downsampling stages (32x32 data).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
from flax.core import FrozenDict

from ttmpd_jax.models.common import conv_bn, global_avg_pool, layer_width

# (expansion t, channels c, repeats n, first stride s) from the paper's Table 2.
MOBILENETV2_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1))


def _round(channels: float, divisor: int = 8) -> int:
  return max(divisor, int(channels + divisor / 2) // divisor * divisor)


class InvertedResidual(nn.Module):
  """1x1 expand (skipped when t=1) -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

  expansion: int
  in_features: int  # The default (unpruned) input width: defaults never depend on pruning.
  features: int
  strides: int
  residual: bool
  widths: FrozenDict

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = x
    if self.expansion != 1:
      y = conv_bn(y, layer_width(self, 'expand', self.in_features * self.expansion), 'expand', train,
                  kernel_size=(1, 1), activation=nn.relu6)
    y = conv_bn(y, y.shape[-1], 'depthwise', train, strides=(self.strides, self.strides),
                groups=y.shape[-1], activation=nn.relu6)
    y = conv_bn(y, layer_width(self, 'project', self.features), 'project', train,
                kernel_size=(1, 1), activation=None)
    return x + y if self.residual else y


class MobileNetV2(nn.Module):
  """Input [N, H, W, C] float32; output logits [N, classes]."""

  num_classes: int = 1000
  width_multiplier: float = 1.0
  small_input: bool = False
  config: Sequence[tuple[int, int, int, int]] = MOBILENETV2_CONFIG
  last_width: int = 1280
  widths: FrozenDict = FrozenDict()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    stem = _round(32 * self.width_multiplier)
    x = conv_bn(x, layer_width(self, 'stem', stem), 'stem', train,
                strides=(1, 1) if self.small_input else (2, 2), activation=nn.relu6)
    in_features = stem
    downsamples = 0
    for stage, (t, c, n, s) in enumerate(self.config):
      features = _round(c * self.width_multiplier)
      for block in range(n):
        strides = s if block == 0 else 1
        if strides == 2 and self.small_input and downsamples < 1:
          strides = 1  # Keep resolution on small images, as CIFAR ports of MobileNetV2 do.
          downsamples += 1
        residual = strides == 1 and in_features == features
        x = InvertedResidual(t, in_features, features, strides, residual, self.widths,
                             name=f'stage{stage + 1}_block{block}')(x, train)
        in_features = features
    last = _round(self.last_width * max(1.0, self.width_multiplier))
    x = conv_bn(x, layer_width(self, 'last', last), 'last', train, kernel_size=(1, 1),
                activation=nn.relu6)
    x = global_avg_pool(x)
    return nn.Dense(self.num_classes, name='head')(x)
