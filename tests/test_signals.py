"""SIGTERM and SIGINT at seeded moments of a whole run: every one stops it cleanly, the same
command resumes it, and the result equals an uninterrupted run's.

The run pretrains its source model and then prunes it with two methods (``--mode=benchmark``),
so the deliveries land in imports, compilations, training and KD steps, data passes, the
search and between grid cells. Each must end with exit status 130 (SIGINT) or 143 (SIGTERM), one
``error:`` line and no traceback -- never exit 0 (a signal that a handler raised into JAX's
garbage-collection callback was once swallowed and the run finished as if nothing happened).
Decisions do not depend on timings here (``--measure_rounds=0``, the MACs latency model), so the
resumed result can be compared architecture for architecture.

``test_signals_at_seeded_moments`` delivers 20 signals, ``test_two_signals`` one of each; both
are slow (minutes: a run and its resume per delivery). CI's reduced check is
``tests/test_bad_input.py::test_signal_during_pretraining`` (each signal once, mid-training).
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
from tests.test_bad_input import assert_clean_failure
from tests.test_cli import MAIN, ROOT, run_main
from tests.test_prune_cli import _flags as prune_flags

pytestmark = [requires_fashion_mnist]

METHODS = 'uniform,eagleeye'
NEEDLES = {signal.SIGINT: ('interrupted (SIGINT)', 130),
           signal.SIGTERM: ('terminated (SIGTERM)', 143)}


def _flags(tmp, output_dir):
  return prune_flags(tmp, output_dir, '--latency_target=0.6', '--max_iterations=2',
                     '--mode=benchmark', f'--methods={METHODS}', '--kd_modes=cached',
                     '--measure_rounds=0', '--nolatency_verify', '--long_term_steps=10')


def _result(output_dir) -> dict[str, dict]:
  with open(os.path.join(output_dir, 'report.json')) as f:
    return {r['method']: {'widths': r['widths'], 'accuracy': r['accuracy']}
            for r in json.load(f)['runs']}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One uninterrupted run (pretraining included) and its duration."""
  tmp = tmp_path_factory.mktemp('signals')
  start = time.time()
  result = run_main(*_flags(tmp, tmp / 'reference'))
  assert result.returncode == 0, result.stderr[-3000:]
  expected = _result(tmp / 'reference')
  assert set(expected) == set(METHODS.split(',')), expected
  return tmp, time.time() - start, expected


def _deliver(tmp, index: int, sig: int, delay: float) -> subprocess.CompletedProcess:
  """Starts a fresh run, sends ``sig`` ``delay`` seconds after its first output line."""
  out = tmp / f'signalled_{index}'
  process = subprocess.Popen([sys.executable, MAIN, *_flags(tmp, out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED='1'))
  first = process.stdout.readline()   # The launcher is up: the delay counts from here.
  time.sleep(delay)
  process.send_signal(sig)
  stdout, stderr = process.communicate(timeout=600)
  return subprocess.CompletedProcess(process.args, process.returncode, first + stdout, stderr)


def _check(reference, deliveries: list[tuple[int, float]]) -> None:
  tmp, duration, expected = reference
  for i, (sig, share) in enumerate(deliveries):
    delay = share * duration
    result = _deliver(tmp, i, sig, delay)
    needle, status = NEEDLES[sig]
    context = f'delivery {i}: {signal.Signals(sig).name} at {delay:.1f}s of {duration:.1f}s'
    assert result.returncode != 0, f'{context}: the run ignored the signal\n{result.stdout[-2000:]}'
    try:
      assert_clean_failure(result, needle, 'rerun the same command', status=status)
    except AssertionError as e:
      raise AssertionError(f'{context}: {e}') from None
    resumed = run_main(*_flags(tmp, tmp / f'signalled_{i}'))
    assert resumed.returncode == 0, f'{context}\n{resumed.stderr[-3000:]}'
    assert _result(tmp / f'signalled_{i}') == expected, context


@pytest.mark.slow
def test_two_signals(reference):
  rng = random.Random(1)
  _check(reference, [(signal.SIGTERM, rng.uniform(0.05, 0.8)),
                     (signal.SIGINT, rng.uniform(0.05, 0.8))])


@pytest.mark.slow
def test_signals_at_seeded_moments(reference):
  rng = random.Random(0)
  # Early moments (imports, the first compilations) are over-represented: they are short and
  # where a handler's exception used to land in third-party callbacks.
  shares = [rng.uniform(0.0, 0.15) for _ in range(6)] + [rng.uniform(0.15, 0.9) for _ in range(14)]
  _check(reference, [(signal.SIGTERM if i % 2 else signal.SIGINT, s)
                     for i, s in enumerate(sorted(shares))])
