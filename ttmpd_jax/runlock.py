"""An exclusive lock on an output folder for the duration of a run.

Two runs writing the same folder would share (and overwrite) each other's work files, models and
reports, and disturb each other's latency measurements. ``RunLock`` prevents that::

    with RunLock.acquire('/runs/exp1', label='output folder /runs/exp1', log=print):
      ...  # the run

Design choices:
  * ``fcntl.flock`` on ``<folder>/.ttmpd.lock``: the kernel drops the lock when the holder dies,
    however it dies (``kill -9`` included), so a lock can never be left "held" by a dead
    process. The file holds the holder's pid, host, start time and command line, read back to
    name the running process when a second run is refused.
  * A lock file whose content names a process but which nobody holds is *stale* (its run was
    killed): it is taken over, with a message naming the dead run.
  * On release the file is unlinked while still locked; an acquirer checks after locking that the
    file it locked is still the one at the path (same inode), so unlink + re-create races cannot
    let two runs hold "the" lock at once.
  * ``flock`` works on local file systems and on NFSv4; on file systems without lock support the
    acquire fails with an ``OutputError`` that says so.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable, Optional

from ttmpd_jax.errors import OutputError, OutputLockedError, one_line
from ttmpd_jax.fileio import file_mode

LOCK_NAME = '.ttmpd.lock'


@dataclasses.dataclass
class RunLock:
  """A held lock; ``release()`` (or leaving the ``with`` block) frees it."""

  path: str
  fd: Optional[int]
  previous: Optional[dict] = None  # The stale holder taken over, if any.

  @classmethod
  def acquire(cls, folder: str, label: Optional[str] = None,
              log: Callable[[str], None] = lambda s: None) -> 'RunLock':
    """Locks ``folder`` (which must exist) or raises ``OutputLockedError`` naming the holder.

    ``label`` names the folder in messages (e.g. the flag that set it).
    """
    path = os.path.join(os.path.abspath(folder), LOCK_NAME)
    label = label or f'output folder {os.path.abspath(folder)}'
    for _ in range(20):  # Retries only when a holder unlinks the file between open and lock.
      fd = _open(path, label)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise OutputLockedError(f'{label} is in use by another run ({_describe(holder)}); wait '
                                'for it to finish or choose another output folder') from None
      except OSError as e:
        os.close(fd)
        raise OutputError(f'cannot lock {path} ({e.strerror or e}); the file system of '
                          f'{label} may not support locks: choose a local folder') from e
      if _same_file(fd, path):
        break
      os.close(fd)
    else:
      raise OutputError(f'cannot lock {path}: it keeps being replaced by another process')
    previous = _read(fd)
    if previous:
      log(f'taking over the stale lock of {label} from a run that no longer runs '
          f'({_describe(previous)})')
    _write(fd, {'pid': os.getpid(), 'host': socket.gethostname(),
                'started': time.strftime('%Y-%m-%d %H:%M:%S'),
                'command': ' '.join(sys.argv)})
    return cls(path, fd, previous or None)

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      os.unlink(self.path)  # While still holding it: see the module docstring.
    except OSError:
      pass
    os.close(self.fd)
    self.fd = None

  def __enter__(self) -> 'RunLock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _open(path: str, label: str) -> int:
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode())
  except OSError as e:
    raise OutputError(f'cannot create the lock file {path} ({e.strerror or e}); make {label} '
                      'writable or choose another output folder') from e
  return fd


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


def _read(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536).decode(errors='replace').strip()
  except OSError:
    return {}
  if not raw:
    return {}
  try:
    data = json.loads(raw)
    return data if isinstance(data, dict) else {'raw': raw}
  except ValueError:
    return {'raw': raw}


def _write(fd: int, data: dict) -> None:
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, (json.dumps(data) + '\n').encode())


def _describe(holder: dict) -> str:
  if not holder:
    return 'pid unknown'
  if 'pid' not in holder:
    return one_line(holder.get('raw', holder), 120)
  return (f'pid {holder["pid"]} on host {holder.get("host", "?")}, started '
          f'{holder.get("started", "?")}: {one_line(holder.get("command", "?"), 160)}')
