"""A small user model, search data and 11 candidate masks, shared by the multi-device candidate
tests (imported by their subprocess scripts)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from ttmpd_jax import pruning
from ttmpd_jax.search.evaluation import SearchData


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda: nn.BatchNorm(use_running_average=not train)
    x = nn.relu(bn()(nn.Conv(16, (3, 3))(x)))
    x = nn.relu(x + bn()(nn.Conv(16, (3, 3))(x)))
    x = nn.relu(bn()(nn.Conv(24, (3, 3), strides=2)(x)))
    return nn.Dense(4)(x.mean(axis=(1, 2)))


def candidates(count: int = 11):
  """``(model, variables, data, groups, masks)``; needs 8 devices (forced on CPU)."""
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  img = lambda *s: rng.standard_normal(s).astype(np.float32)
  model = Net()
  variables = jax.device_get(model.init(jax.random.key(0), img(1, 8, 8, 1)))
  data = SearchData(img(32, 8, 8, 1), img(32, 4), img(24, 8, 8, 1), img(24, 4),
                    img(2, 16, 8, 8, 1))
  groups = pruning.discover_groups(model, variables, img(1, 8, 8, 1))
  masks = [jax.tree.map(np.asarray, pruning.random_masks(i, groups)) for i in range(count)]
  return model, variables, data, groups, masks
