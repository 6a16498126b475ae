"""A plain VGG-style CNN: conv-BN-ReLU stacks with max-pooling, flatten, a hidden Dense, a head.

The flatten into ``fc1`` is deliberate: it is the case where one conv channel maps to many Dense
input rows (one per spatial position), which pruning must follow.
"""

from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn
import jax
from flax.core import FrozenDict

from ttmpd_jax.models.common import conv_bn, layer_width

# Channel counts, 'M' = 2x2 max-pool.
VGG_SMALL: tuple[Union[int, str], ...] = (32, 32, 'M', 64, 64, 'M', 128, 'M')
# Ten convolutions (eleven prunable channel groups with fc1): a search with a real choice.
VGG_MEDIUM: tuple[Union[int, str], ...] = (16, 16, 'M', 32, 32, 32, 'M', 64, 64, 64, 'M', 128,
                                           128)


class VGG(nn.Module):
  """Input [N, H, W, C] float32; output logits [N, classes]."""

  config: Sequence[Union[int, str]] = VGG_SMALL
  hidden: int = 128
  num_classes: int = 10
  widths: FrozenDict = FrozenDict()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv_index = 0
    for item in self.config:
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
      else:
        name = f'conv{conv_index}'
        x = conv_bn(x, layer_width(self, name, int(item)), name, train)
        conv_index += 1
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(layer_width(self, 'fc1', self.hidden), name='fc1')(x))
    return nn.Dense(self.num_classes, name='head')(x)
