"""Counting XLA compilations, so loops can prove they do not recompile per candidate.

Listens to JAX's own monitoring event ``/jax/core/compile/backend_compile_duration``, which JAX
records once per backend compilation (``jit`` cache misses, ``.lower().compile()``), with the
compiled function's name.

Usage::

  with CompilationCounter() as counter:
    for candidate in candidates:
      evaluate(candidate)
  print(counter.count, counter.names)
"""

from __future__ import annotations

import collections
import threading

from jax import monitoring

BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


class CompilationCounter:
  """Context manager counting backend compilations (and their seconds) while it is active.

  Attributes:
    count: compilations seen so far.
    seconds: total backend compile time in seconds.
    names: function name -> number of compilations.
  """

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.names: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()
    self._active = False

  def _listener(self, event: str, duration_secs: float, **kwargs) -> None:
    if event != BACKEND_COMPILE_EVENT:
      return
    with self._lock:
      self.count += 1
      self.seconds += float(duration_secs)
      self.names[str(kwargs.get('fun_name', '?'))] += 1

  def __enter__(self) -> 'CompilationCounter':
    if self._active:
      raise RuntimeError('CompilationCounter is not re-entrant')
    monitoring.register_event_duration_secs_listener(self._listener)
    self._active = True
    return self

  def __exit__(self, *exc) -> None:
    monitoring.unregister_event_duration_listener(self._listener)
    self._active = False

  def __repr__(self) -> str:
    return f'CompilationCounter(count={self.count}, seconds={self.seconds:.2f})'


def count_compilations(fn, *args, **kwargs) -> tuple[object, int]:
  """Runs ``fn(*args, **kwargs)`` and returns ``(result, compilations it triggered)``."""
  with CompilationCounter() as counter:
    result = fn(*args, **kwargs)
  return result, counter.count


__all__ = ['BACKEND_COMPILE_EVENT', 'CompilationCounter', 'count_compilations']
