"""Stop requests (SIGINT, SIGTERM): recorded when they arrive, honoured at safe points.

A run that is asked to stop must stop, and stop where nothing is half done. So the signal
handler only *records* the request (:func:`request`), and the long loops of the library call
:func:`check` at points where stopping loses nothing: between training and KD steps, between
batches of a data pass, between search iterations and candidate fine-tunings, between latency
probes and measurement rounds, between grid cells. ``check`` raises :class:`Interrupted`, which
the launcher turns into one ``error:`` line and exit status 130 (SIGINT) or 143 (SIGTERM); the
state saved so far lets the same command resume.

Design choice: never raise from the handler itself. Python runs a handler between two bytecodes
of the main thread, wherever it is -- inside a ``finally``, inside JAX's garbage-collection
callback (whose exceptions Python prints and *drops*: a SIGTERM was lost that way and the run
went on to finish), inside a file write. A recorded flag cannot be lost and lands only where the
code chose to look at it. The price is latency: the run stops at the next safe point, which is at
most one step, batch or compilation away.
"""

from __future__ import annotations

import signal
from typing import Optional

_pending: Optional[int] = None
NAMES = {signal.SIGINT: 'interrupted (SIGINT)', signal.SIGTERM: 'terminated (SIGTERM)'}
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
  """A recorded stop request, raised at a safe point (a BaseException, like KeyboardInterrupt,
  so ``except Exception`` clauses do not swallow it)."""

  def __init__(self, signum: int):
    super().__init__(NAMES.get(signum, f'stopped by signal {signum}'))
    self.signum = signum

  @property
  def status(self) -> int:
    return STATUS.get(self.signum, 128 + self.signum)


def request(signum: int, frame=None) -> None:
  """The signal handler: records the first request (a later one does not replace it)."""
  del frame
  global _pending
  if _pending is None:
    _pending = signum


def pending() -> Optional[int]:
  return _pending


def clear() -> None:
  global _pending
  _pending = None


def check() -> None:
  """A safe point: raises :class:`Interrupted` when a stop was requested."""
  if _pending is not None:
    raise Interrupted(_pending)


def install() -> None:
  """Records SIGINT and SIGTERM from now on (main thread only; a no-op elsewhere).

  SIGINT is installed even when the shell started us with it ignored (background jobs), so
  Ctrl-C or ``kill -INT`` always stops a run cleanly.
  """
  try:
    signal.signal(signal.SIGINT, request)
    signal.signal(signal.SIGTERM, request)
  except ValueError:   # Not the main thread (an embedding application owns the signals).
    pass
