"""Width-parameterised building blocks shared by the model zoo.

Every zoo model takes a ``widths`` mapping from a layer's *module path* (``'/'``-joined names,
e.g. ``'stage1_block0/conv1'``) to its number of output channels. A pruned architecture is
therefore nothing more than another ``widths`` mapping: :func:`widths_from_variables` reads it
back from any (pruned) parameter tree, so physically smaller variables always come with the
means to run them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

Widths = Mapping[str, int]

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def freeze_widths(widths: Optional[Widths]) -> FrozenDict:
  """Returns ``widths`` as a hashable FrozenDict (empty when ``None``)."""
  return FrozenDict({str(k): int(v) for k, v in (widths or {}).items()})


def layer_width(module: nn.Module, name: str, default: int) -> int:
  """Width of the child layer ``name`` of ``module``, looked up by its full path.

  ``module`` must carry a ``widths`` attribute (the model-wide mapping). Paths are
  relative to the model root, so the same mapping is passed unchanged to every block.
  """
  key = '/'.join((*module.path, name)) if module.path else name
  return int(module.widths.get(key, default))


def widths_from_variables(variables: Mapping[str, Any]) -> dict[str, int]:
  """Reads the width spec (module path -> output channels) back from a parameter tree.

  Every ``kernel`` leaf contributes ``kernel.shape[-1]`` under the path of its module.
  Works for any Flax model built from ``nn.Conv``/``nn.Dense`` layers.
  """
  params = variables.get('params', variables)
  widths: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(p, 'key', getattr(p, 'name', str(p))) for p in path]
    if names and names[-1] == 'kernel':
      widths['/'.join(str(n) for n in names[:-1])] = int(leaf.shape[-1])
  return widths


def conv_bn(x: jax.Array, features: int, name: str, train: bool, *,
            kernel_size: tuple[int, int] = (3, 3), strides: tuple[int, int] = (1, 1),
            groups: int = 1,
            activation: Optional[Callable[[jax.Array], jax.Array]] = nn.relu) -> jax.Array:
  """Conv ``name`` -> BatchNorm ``name + '_bn'`` -> optional activation.

  Must be called inside a compact method: the layers become children of that module, so the
  conv's path (the key of its width) is ``parent_path/name``. This is the unit that pruning and
  the latency table reason about.
  """
  x = nn.Conv(features, kernel_size, strides, padding='SAME', feature_group_count=groups,
              use_bias=False, name=name)(x)
  x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                   name=name + '_bn')(x)
  return activation(x) if activation is not None else x


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, C]."""
  return jnp.mean(x, axis=(1, 2))
