"""ttmpd_jax: test-time structured pruning and distillation (TT-MPD) in JAX/Flax.

Library entry point: :func:`prune` (see ``ttmpd_jax/api.py`` and ``docs/method.md``); the
functional primitives live in :mod:`ttmpd_jax.pruning`, :mod:`ttmpd_jax.latency` and
:mod:`ttmpd_jax.distill`. Top-level names load lazily, so importing a submodule stays light.
"""

import importlib

__version__ = '0.2.0'

_LAZY = {'prune': 'ttmpd_jax.api', 'PruneResult': 'ttmpd_jax.api',
         'LatencyConfig': 'ttmpd_jax.api', 'SearchConfig': 'ttmpd_jax.search.config',
         'METHODS': 'ttmpd_jax.search.methods', 'UserError': 'ttmpd_jax.errors'}
__all__ = list(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
