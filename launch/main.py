"""ttmpd_jax launcher: ``python launch/main.py --flagfile=launch/flags/quickstart.cfg``.

Each mode lives in ``launch/mode_<name>.py``: it defines its own flags at import time and a
``run(ctx, mode)`` function, and lists the mode names it serves in ``MODES``.

Error policy (one for every mode):
  * A user mistake -- a bad flag value, a ``UserError`` from the library or a mode, an output
    path that cannot be written (``EACCES``, ``ENOSPC``, ``EROFS``...), running out of memory --
    prints exactly one line ``error: <what and how to fix it>`` on stderr and exits with
    status 2, without a traceback. SIGINT exits with 130 and SIGTERM with 143, also with one
    line; the run resumes when the same command is started again. The handlers only record the
    signal; the library's loops stop at their next safe point (``ttmpd_jax.interrupt``), and a
    run that ends with a stop request pending exits 130/143 as well, never 0.
  * Anything else is a bug and keeps its traceback.
  * After a user error the process ends with ``os._exit`` once stdout and stderr are flushed.
    Design choice: orbax, tensorstore and asyncio run background threads and atexit hooks that,
    after a failed restore, may print "Event loop is closed" tracebacks while the interpreter
    shuts down; skipping interpreter shutdown is the only reliable way to keep the one-line
    promise. Nothing is lost: every output is written atomically before this point.
  * The output folder is locked for the whole run (``ttmpd_jax.runlock``): a second run on the
    same ``--output_dir`` is refused, naming the running process.
"""

from __future__ import annotations

import signal

# Stop requests are recorded from the first moment (imports take seconds); ``main`` hands any
# that arrived to ``ttmpd_jax.interrupt``, whose safe points honour them.
_EARLY_SIGNALS: list[int] = []
for _signum in (signal.SIGINT, signal.SIGTERM):
  signal.signal(_signum, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import errno
import glob
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from launch import common  # noqa: E402
from ttmpd_jax import interrupt  # noqa: E402
from ttmpd_jax.errors import UserError, one_line  # noqa: E402

# OSErrors that the environment, not the code, causes: reported as one line.
USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR,
               errno.EISDIR, errno.ENAMETOOLONG, errno.EMFILE}
STATUS_USER_ERROR, STATUS_SIGINT = 2, 130
_RESUME = 'outputs written so far are kept: rerun the same command to continue'


def _discover_modes() -> dict[str, object]:
  modes = {}
  here = os.path.dirname(os.path.abspath(__file__))
  for path in sorted(glob.glob(os.path.join(here, 'mode_*.py'))):
    module = importlib.import_module(f'launch.{os.path.basename(path)[:-3]}')
    for name in getattr(module, 'MODES', ()):
      modes[name] = module
  return modes


MODES = _discover_modes()
flags.DEFINE_enum('mode', 'evaluate', sorted(MODES), 'What to run.')
FLAGS = flags.FLAGS


def _is_shutdown_noise(exc_type, exc) -> bool:
  """Orbax/tensorstore callbacks that hit asyncio's already closed loop after a failed restore."""
  return (exc_type is not None and issubclass(exc_type, RuntimeError)
          and 'Event loop is closed' in str(exc))


def silence_third_party_noise() -> None:
  """Drops "Event loop is closed" tracebacks that orbax's I/O threads print.

  When one read of a corrupted checkpoint fails, orbax's ``asyncio.run`` closes its loop while
  tensorstore still completes the other reads; their callbacks then raise in C++ threads, which
  print through ``sys.excepthook`` / ``sys.unraisablehook``. Any other exception still prints.
  """
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(exc_type, exc, tb):
    if not _is_shutdown_noise(exc_type, exc):
      excepthook(exc_type, exc, tb)

  def quiet_unraisablehook(info):
    if not _is_shutdown_noise(info.exc_type, info.exc_value):
      unraisablehook(info)

  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def fail(message: str, status: int = STATUS_USER_ERROR) -> None:
  """Prints ``error: <message>`` as one line, flushes, and ends the process (see the docstring)."""
  common.release_output_lock()
  try:
    sys.stdout.flush()
  except (OSError, ValueError):
    pass
  sys.stderr.write(f'error: {one_line(message, 2000)}\n')
  sys.stderr.flush()
  os._exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag reported by the one-line error policy."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f'{str(e).removeprefix("ERROR:: ")} (see --helpfull for every flag)')
    raise  # Not reached.


def _user_message(e: BaseException) -> str | None:
  """The one-line message for an exception the user caused, or None for a bug."""
  if isinstance(e, UserError):
    return str(e)
  if isinstance(e, BrokenPipeError):
    return 'standard output was closed (broken pipe); the run stopped'
  if isinstance(e, OSError) and e.errno in USER_ERRNOS:
    target = f' {e.filename}' if e.filename else ''
    return (f'cannot write or read{target} ({e.strerror or e}); free disk space or fix the '
            'permissions, or choose another --output_dir')
  oom = isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e)[:2000]
  if oom:
    return (f'out of memory ({type(e).__name__}: {one_line(e, 200)}); reduce --batch_size, '
            '--eval_batch_size, --kd_batch_size or --latency_batch')
  return None


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected positional arguments: {" ".join(argv[1:])} (flags look like --name=value)')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  interrupt.install()
  for signum in _EARLY_SIGNALS[:1]:
    interrupt.request(signum)
  silence_third_party_noise()
  start = time.time()
  try:
    ctx = common.Context()
    ctx.lock_output_dir()
    MODES[FLAGS.mode].run(ctx, FLAGS.mode)
    interrupt.check()   # A request after the last safe point still ends the run as one.
  except interrupt.Interrupted as e:
    fail(f'{e}; {_RESUME}', e.status)
  except KeyboardInterrupt:   # Raised by code outside the library (a plugin, a debugger).
    fail(f'interrupted (SIGINT); {_RESUME}', STATUS_SIGINT)
  except Exception as e:  # noqa: BLE001 - bugs are re-raised below with their traceback.
    message = _user_message(e)
    if message is None:
      common.release_output_lock()
      raise
    fail(message)
  common.release_output_lock()
  common.log(f'{FLAGS.mode} finished in {time.time() - start:.1f} s')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
