"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages, basic blocks.

Width-parameterised: every conv looks up its output channels in ``widths`` (see
``models.common``). Design choice: downsampling shortcuts are 1x1 conv + BN projections (option B)
rather than zero-padding (option A), so every residual add is between real, prunable tensors.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from flax.core import FrozenDict

from ttmpd_jax.models.common import conv_bn, global_avg_pool, layer_width


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU -> conv3x3-BN, plus identity or projection shortcut, then ReLU."""

  features: int
  strides: int
  projection: bool  # Structural, never inferred from (possibly pruned) widths.
  widths: FrozenDict

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_features = layer_width(self, 'conv2', self.features)
    y = conv_bn(x, layer_width(self, 'conv1', self.features), 'conv1', train,
                strides=(self.strides, self.strides))
    y = conv_bn(y, out_features, 'conv2', train, activation=None)
    if self.projection:
      x = conv_bn(x, layer_width(self, 'shortcut', self.features), 'shortcut', train,
                  kernel_size=(1, 1), strides=(self.strides, self.strides), activation=None)
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for small images. Input [N, H, W, C] float32; output logits [N, classes]."""

  depth: int = 20
  num_classes: int = 10
  base_width: int = 16
  widths: FrozenDict = FrozenDict()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2 (8, 20, 56, ...), got {self.depth}')
    blocks_per_stage = (self.depth - 2) // 6
    x = conv_bn(x, layer_width(self, 'stem', self.base_width), 'stem', train)
    for stage in range(3):
      features = self.base_width * 2**stage
      for block in range(blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, strides != 1, self.widths, name=f'stage{stage + 1}_block{block}')(
            x, train)
    x = global_avg_pool(x)
    return nn.Dense(self.num_classes, name='head')(x)
