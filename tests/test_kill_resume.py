"""kill -9 at random points of a two-method ``--mode=benchmark`` run, then rerun: nothing is lost.

For each of several random kill times (seeded, spread over an uninterrupted run's duration) a
fresh run is started, killed with SIGKILL, and rerun with the same flags. Every rerun must
complete, take over the dead run's stale output lock, keep the rows of methods that had finished
before the kill exactly as they were written (not recomputed), and end with the same pruned
architectures as the uninterrupted run. Tested through the CLI only.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import requires_fashion_mnist
from tests.test_cli import MAIN, ROOT, run_main
from tests.test_prune_cli import _flags as prune_flags

pytestmark = [requires_fashion_mnist, pytest.mark.slow]

KILLS = 5
METHODS = 'uniform,eagleeye'


def _flags(tmp, output_dir):
  # measure_rounds=0 and the MACs latency model (prune_flags): decisions do not depend on
  # timings, so an interrupted run can be compared with an uninterrupted one architecture for
  # architecture.
  return prune_flags(tmp, output_dir, '--latency_target=0.6', '--max_iterations=3',
                     '--mode=benchmark', f'--methods={METHODS}', '--kd_modes=cached',
                     '--measure_rounds=0', '--nolatency_verify')


def _runs(output_dir) -> list[dict]:
  try:
    with open(os.path.join(output_dir, 'report.json')) as f:
      return json.load(f).get('runs', [])
  except (OSError, ValueError):
    return []


def _widths(output_dir) -> dict[str, dict]:
  return {r['method']: r['widths'] for r in _runs(output_dir)}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The source checkpoint and one uninterrupted run (and its duration)."""
  tmp = tmp_path_factory.mktemp('kill_resume')
  pretrained = run_main('--mode=pretrain', *_flags(tmp, tmp / 'source'))
  assert pretrained.returncode == 0, pretrained.stderr[-3000:]
  (checkpoint,) = (tmp / 'source' / 'checkpoints').iterdir()
  start = time.time()
  result = run_main(f'--checkpoint={checkpoint}', *_flags(tmp, tmp / 'reference'))
  assert result.returncode == 0, result.stderr[-3000:]
  widths = _widths(tmp / 'reference')
  assert set(widths) == set(METHODS.split(',')), widths
  eagleeye = next(r for r in _runs(tmp / 'reference') if r['method'] == 'eagleeye')
  assert len(eagleeye['trajectory']) > 1, 'eagleeye pruned nothing: the resume check would be void'
  return tmp, checkpoint, time.time() - start, widths


def test_kill_9_at_random_points_then_rerun(reference):
  tmp, checkpoint, duration, expected = reference
  rng = random.Random(0)
  points = sorted(rng.uniform(0.1, 0.95) * duration for _ in range(KILLS))
  for i, delay in enumerate(points):
    out = tmp / f'killed_{i}'
    args = [sys.executable, MAIN, f'--checkpoint={checkpoint}', *_flags(tmp, out)]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {r['method']: r for r in _runs(out)}
    rerun = run_main(f'--checkpoint={checkpoint}', *_flags(tmp, out))
    context = f'kill {i} at {delay:.1f}s of {duration:.1f}s; finished before: {sorted(finished)}'
    assert rerun.returncode == 0, f'{context}\n{rerun.stderr[-3000:]}'
    final = {r['method']: r for r in _runs(out)}
    for method, row in finished.items():  # Finished methods are read back, not recomputed.
      assert final[method] == row, f'{context}: {method} was recomputed'
    assert _widths(out) == expected, context
