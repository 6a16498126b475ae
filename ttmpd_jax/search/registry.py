"""Name → object registries: methods, importance criteria (one mechanism for both).

A registered object is looked up by name at the edge (a launcher flag, ``prune(method=...)``);
inside the library nothing branches on the name. Unknown names raise a :class:`ConfigError`
listing the valid ones.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from ttmpd_jax.search.config import ConfigError

T = TypeVar('T')


class Registry(Generic[T]):
  """Maps names to objects of one kind (``kind`` appears in error messages)."""

  def __init__(self, kind: str, field: str):
    self.kind, self.field = kind, field
    self._items: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: ``@METHODS.register('mine') class Mine: ...`` (instances are built on get)."""
    def add(item: T) -> T:
      if name in self._items:
        raise ValueError(f'{self.kind} {name!r} is registered twice')
      self._items[name] = item
      return item
    return add

  def get(self, name: str, field: str | None = None) -> T:
    if name not in self._items:
      raise ConfigError(field or self.field, f'unknown {self.kind} {name!r}; valid: '
                        f'{", ".join(self.names())}')
    return self._items[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._items)

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)
