"""Helpers for testing pruning code quickly: random variables without running ``model.init``.

``model.init`` compiles the random-number generators of every layer, which costs seconds on CPU;
property tests that build many (pruned) models fill abstract shapes with NumPy instead.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model: nn.Module, example_input: Any, seed: int = 0, **apply_kwargs) -> Any:
  """Variables for ``model`` with He-scaled kernels and non-trivial BatchNorm statistics.

  Scale ~ U(0.5, 1.2), bias/mean ~ N(0, 0.2), var ~ U(0.5, 1.5): unlike a fresh init, a pruned
  channel that leaked through BatchNorm (``beta - mean * gamma / sqrt(var + eps)``) would change
  the outputs, so equality tests are meaningful.
  """
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **apply_kwargs),
                            example_input)
  return randomize(abstract, seed)


def randomize(variables: Any, seed: int = 0) -> Any:
  """Random values of the shapes and dtypes of ``variables`` (arrays or abstract leaves), drawn
  by leaf name as in :func:`random_variables` (e.g. for ``from_nnx`` variables)."""
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for kp, leaf in flat:
    name = str(getattr(kp[-1], 'key', kp[-1]))
    shape = tuple(np.shape(leaf))
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1])) or 1
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif name == 'var':
      value = rng.uniform(0.5, 1.5, shape)
    elif name == 'scale':
      value = rng.uniform(0.5, 1.2, shape)
    elif name in ('mean', 'bias'):
      value = rng.normal(0.0, 0.2, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    out.append(jnp.asarray(value, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)
