"""Atomic file writes: a temporary file in the target folder, then a rename.

Readers never see half a file, and a crash mid-write leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def _json_default(obj: Any) -> Any:
  if hasattr(obj, 'item'):      # numpy / JAX scalars
    return obj.item()
  if hasattr(obj, 'tolist'):    # arrays
    return obj.tolist()
  raise TypeError(f'not JSON serialisable: {type(obj)}')


def write_json_atomic(path: str, data: Any, indent: int = 2) -> str:
  """Writes ``data`` as JSON to ``path`` atomically; returns the absolute path.

  Raises ``OSError`` when the folder cannot be created or written (callers turn it into a
  user-facing error naming their flag or file).
  """
  path = os.path.abspath(path)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp_', suffix='.json')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(data, f, indent=indent, default=_json_default)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path
