"""Atomic file writes: a temporary file in the target folder, then a rename.

Readers never see half a file, and a crash mid-write leaves the previous version intact.

Design choices:
  * Strict JSON only: NaN and +-Inf become ``null`` (strict parsers reject bare ``NaN``), numpy
    and JAX scalars/arrays become numbers/lists, tuples become lists; ``json.dump`` then runs
    with ``allow_nan=False`` so nothing non-standard can slip through.
  * Files get the mode an ordinary ``open(path, 'w')`` would give them (0666 minus the umask,
    usually 0644), not the 0600 of ``tempfile.mkstemp``: results are meant to be shared with the
    user's group. Folders are created with ``os.makedirs``' default (0777 minus the umask).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Iterator


def current_umask() -> int:
  """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)  # Portable fallback: set and restore.
  os.umask(mask)
  return mask


def file_mode() -> int:
  """Mode of new output files: 0666 minus the umask (0644 under the usual umask 022)."""
  return 0o666 & ~current_umask()


def to_strict_json(obj: Any) -> Any:
  """``obj`` with non-finite floats as ``None`` and numpy/JAX values as plain Python values."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, (str, int, bool)) or obj is None:
    return obj
  if isinstance(obj, dict):
    return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k):
            to_strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_strict_json(v) for v in obj]
  if hasattr(obj, 'tolist'):     # numpy / JAX scalars and arrays
    return to_strict_json(obj.tolist())
  if hasattr(obj, 'item'):
    return to_strict_json(obj.item())
  raise TypeError(f'not JSON serialisable: {type(obj)}')


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = '') -> Iterator[str]:
  """Yields a temporary path next to ``path``; renames it onto ``path`` when the block succeeds.

  The temporary file already exists (empty, mode ``file_mode()``); the block writes it by name.
  On any exception it is removed and ``path`` is untouched. Raises ``OSError`` when the folder
  cannot be created or written (callers turn it into a user-facing error naming their setting).
  """
  path = os.path.abspath(path)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp_', suffix=suffix)
  try:
    os.fchmod(fd, file_mode())
    os.close(fd)
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path: str, data: Any, indent: int = 2) -> str:
  """Writes ``data`` as strict JSON to ``path`` atomically; returns the absolute path.

  Raises ``OSError`` when the folder cannot be created or written (callers turn it into a
  user-facing error naming their flag or file).
  """
  text = json.dumps(to_strict_json(data), indent=indent, allow_nan=False) + '\n'
  with atomic_path(path, suffix='.json') as tmp:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  return os.path.abspath(path)
