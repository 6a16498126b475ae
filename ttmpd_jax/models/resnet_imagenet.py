"""ImageNet-style ResNet-18 (basic blocks) and ResNet-50 (bottlenecks), width-parameterised.

``small_input=True`` swaps the 7x7/2 stem and max-pool for a 3x3/1 stem, the usual choice for
32x32 inputs (e.g. ResNet-18 on CIFAR-10).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
from flax.core import FrozenDict

from ttmpd_jax.models.common import conv_bn, global_avg_pool, layer_width


class Bottleneck(nn.Module):
  """1x1 reduce -> 3x3 -> 1x1 expand (x4), plus identity or projection shortcut, then ReLU."""

  features: int
  strides: int
  projection: bool
  widths: FrozenDict
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = self.features * self.expansion
    y = conv_bn(x, layer_width(self, 'conv1', self.features), 'conv1', train, kernel_size=(1, 1))
    y = conv_bn(y, layer_width(self, 'conv2', self.features), 'conv2', train,
                strides=(self.strides, self.strides))
    y = conv_bn(y, layer_width(self, 'conv3', out), 'conv3', train, kernel_size=(1, 1),
                activation=None)
    if self.projection:
      x = conv_bn(x, layer_width(self, 'shortcut', out), 'shortcut', train, kernel_size=(1, 1),
                  strides=(self.strides, self.strides), activation=None)
    return nn.relu(x + y)


class Basic(nn.Module):
  """3x3 -> 3x3, plus identity or projection shortcut, then ReLU."""

  features: int
  strides: int
  projection: bool
  widths: FrozenDict

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = conv_bn(x, layer_width(self, 'conv1', self.features), 'conv1', train,
                strides=(self.strides, self.strides))
    y = conv_bn(y, layer_width(self, 'conv2', self.features), 'conv2', train, activation=None)
    if self.projection:
      x = conv_bn(x, layer_width(self, 'shortcut', self.features), 'shortcut', train,
                  kernel_size=(1, 1), strides=(self.strides, self.strides), activation=None)
    return nn.relu(x + y)


class ImageNetResNet(nn.Module):
  """ResNet with four stages. Input [N, H, W, C] float32; output logits [N, classes]."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  num_classes: int = 1000
  base_width: int = 64
  small_input: bool = False
  widths: FrozenDict = FrozenDict()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.small_input:
      x = conv_bn(x, layer_width(self, 'stem', self.base_width), 'stem', train)
    else:
      x = conv_bn(x, layer_width(self, 'stem', self.base_width), 'stem', train,
                  kernel_size=(7, 7), strides=(2, 2))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    block_cls = Bottleneck if self.bottleneck else Basic
    expansion = 4 if self.bottleneck else 1
    in_features = self.base_width
    for stage, num_blocks in enumerate(self.stage_sizes):
      features = self.base_width * 2**stage
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        projection = block == 0 and (strides != 1 or in_features != features * expansion)
        x = block_cls(features, strides, projection, self.widths,
                      name=f'stage{stage + 1}_block{block}')(x, train)
        in_features = features * expansion
    x = global_avg_pool(x)
    return nn.Dense(self.num_classes, name='head')(x)
