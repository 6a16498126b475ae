"""ttmpd_jax launcher: ``python launch/main.py --flagfile=launch/flags/quickstart.cfg``.

Each mode lives in ``launch/mode_<name>.py``: it defines its own flags at import time and a
``run(ctx, mode)`` function, and lists the mode names it serves in ``MODES``. User mistakes
(``UserError``) print one line and exit with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from launch import common  # noqa: E402
from ttmpd_jax.errors import UserError  # noqa: E402


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected positional arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  start = time.time()
  try:
    ctx = common.Context()
    MODES[FLAGS.mode].run(ctx, FLAGS.mode)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
  common.log(f'{FLAGS.mode} finished in {time.time() - start:.1f} s')


if __name__ == '__main__':
  app.run(main)
