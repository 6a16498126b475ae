"""Multi-process JAX jobs on this machine: N processes on a loopback coordinator, each with its
own forced CPU devices (the pinned JAX runs CPU collectives over gloo), through the same
``--distributed`` flags a GPU cluster or a TPU slice uses (BUILD.md).

CI checks: a 2-process x 2-device reduced prune equals the 1-process x 4-device run (identical
widths and trajectory, accuracy within 1e-4, same compilations per iteration), progress is
printed and report / plot written by process 0 only, timings (latency measurements) are process
0's on every process, and a batch of candidates fine-tuned across 8 devices equals the
sequential fine-tuning. ``slow``: a killed 2-process job resumes from its last finished
iteration to the same network; a reduced two-method benchmark equals the 1-process one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.conftest import requires_fashion_mnist
from tests.test_cli import MAIN, ROOT, run_main
from tests.test_prune_cli import _flags

# What Gloo prints while connecting: '[Gloo] Rank 1 is connected to 1 peer ranks. Expected number
# of connected peer ranks is : 1'.
GLOO_WORDS = re.compile(r'\[Gloo\]|Rank|is|connected|to|peer|ranks\.?|Expected|number|of|:|\d+')

# Decisions must not depend on timings between runs: the MACs latency model (test_prune_cli's
# flags) and no measured target correction, so the 1-process and the 2-process runs are
# comparable; process 0 times the teacher and every process scales by its figure. Shorter
# long-term fine-tuning than test_prune_cli's keeps the CI jobs short.
EXTRA = ('--measure_rounds=0', '--trajectory_eval_limit=0', '--long_term_steps=4')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  return dict(os.environ, PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def start_job(argv: list[str], processes: int, devices: int) -> list[subprocess.Popen]:
  """``processes`` copies of ``argv`` (python argv after the interpreter) as one JAX job."""
  if processes == 1:
    return [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(devices))]
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, *argv, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
       f'--num_processes={processes}', f'--process_id={i}'], stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(devices)) for i in range(processes)]


def finish_job(job: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str, str]]:
  """Waits for every process; one failing ends the others (they would wait in collectives)."""
  outputs: dict[int, tuple[str, str]] = {}
  readers = [threading.Thread(target=lambda i=i, p=p: outputs.__setitem__(i, p.communicate()))
             for i, p in enumerate(job)]
  for reader in readers:
    reader.start()
  deadline = time.time() + timeout
  while any(r.is_alive() for r in readers):
    if time.time() > deadline or any(p.poll() not in (None, 0) for p in job):
      for p in job:
        if p.poll() is None:
          p.kill()
    time.sleep(0.5)
  return [(p.returncode, *outputs[i]) for i, p in enumerate(job)]


def run_job(argv: list[str], processes: int, devices: int) -> list[tuple[int, str, str]]:
  results = finish_job(start_job(argv, processes, devices))
  for rc, stdout, stderr in results:
    assert rc == 0, (stdout[-2000:], stderr[-4000:])
  return results


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A source checkpoint pretrained once by a 1-process --mode=pretrain."""
  tmp = tmp_path_factory.mktemp('multihost')
  result = run_main('--mode=pretrain', *_flags(tmp, tmp / 'source'), '--train_limit=640')
  assert result.returncode == 0, result.stderr[-3000:]
  checkpoint = next((tmp / 'source' / 'checkpoints').iterdir())
  return tmp, checkpoint


def prune_argv(tmp, checkpoint, out, *extra) -> list[str]:
  return [MAIN, '--mode=prune', '--method=ttmpd', f'--checkpoint={checkpoint}',
          *_flags(tmp, out), *EXTRA, *extra]


@pytest.fixture(scope='module')
def one_process(source):
  """The reference: one process with 4 devices (as many as the 2 x 2 job)."""
  tmp, checkpoint = source
  run_job(prune_argv(tmp, checkpoint, tmp / 'one'), processes=1, devices=4)
  return json.loads((tmp / 'one' / 'report.json').read_text())['runs'][0]


def assert_same_run(a: dict, b: dict) -> None:
  assert a['widths'] == b['widths']
  assert [(p['group'], p['removed']) for p in a['trajectory']] == [
      (p['group'], p['removed']) for p in b['trajectory']]
  assert abs(a['accuracy'] - b['accuracy']) <= 1e-4, (a['accuracy'], b['accuracy'])


@requires_fashion_mnist
def test_two_processes_equal_one_process_and_only_process_0_reports(source, one_process):
  tmp, checkpoint = source
  out = tmp / 'two'
  (rc0, out0, _), (rc1, out1, _) = run_job(prune_argv(tmp, checkpoint, out), 2, 2)
  report = json.loads((out / 'report.json').read_text())
  (run,) = report['runs']
  assert_same_run(run, one_process)
  assert run['compilations']['per_iteration'] == one_process['compilations']['per_iteration']
  # Progress and outputs: process 0's alone (process 1 prints nothing, writes nothing).
  assert '[ttmpd] iter 1:' in out0 and 'wrote ' in out0 and 'plot: ' in out0, out0[-3000:]
  # Gloo's own connection lines come from several threads and interleave mid-word (a rank
  # number can land on a line of its own), so its words are removed, not its lines.
  assert not GLOO_WORDS.sub(' ', out1).split(), out1
  assert '--process_id=0' in report['flags']['argv']
  assert (out / 'tradeoff.png').stat().st_size > 10_000
  saved = out / run['checkpoint']   # Relative to --output_dir.
  assert os.path.isdir(saved) and not [
      p for p in os.listdir(os.path.dirname(saved)) if 'orbax-checkpoint-tmp' in p]


@requires_fashion_mnist
def test_a_measured_latency_table_is_built_by_process_0_and_shared(source):
  tmp, checkpoint = source
  cache = tmp / 'table_cache'
  (_, out0, _), _ = run_job(prune_argv(
      tmp, checkpoint, tmp / 'table', '--latency_model=table', f'--latency_cache_dir={cache}',
      '--latency_max_grid_points=1', '--latency_random_probes=1', '--nolatency_verify',
      '--max_iterations=1', '--long_term_steps=0'), 2, 2)
  # Process 0 measured and saved the table; process 1 fitted the same predictor from its entries
  # (``shared_predictor`` stops the job when the two predict the teacher differently).
  assert 'latency model ready' in out0, out0[-3000:]
  assert len(list((cache / 'latency').glob('*.json'))) == 1


def _finished_step(work) -> bool:
  return any(p.name.isdigit() and int(p.name) >= 1 for p in work.glob('*/iterations/*'))


@pytest.mark.slow
@requires_fashion_mnist
def test_killed_job_resumes_from_last_finished_iteration(source, one_process):
  tmp, checkpoint = source
  out = tmp / 'killed'
  job = start_job(prune_argv(tmp, checkpoint, out), 2, 2)
  for line in job[0].stdout:
    if '[ttmpd] iter 1:' in line:
      break
  deadline = time.time() + 120   # The iteration's state is saved right after its line.
  while not _finished_step(out / 'work') and time.time() < deadline:
    time.sleep(0.2)
  for p in job:
    p.send_signal(signal.SIGKILL)
  for p in job:
    p.wait(timeout=60)
  assert _finished_step(out / 'work'), 'the job never finished its first iteration'
  (_, out0, _), _ = run_job(prune_argv(tmp, checkpoint, out), 2, 2)
  assert 'resuming after iteration 1' in out0, out0[-3000:]
  run = json.loads((out / 'report.json').read_text())['runs'][0]
  assert run['resumed_from'] == 1
  assert_same_run(run, one_process)


TIMINGS = textwrap.dedent('''
    import json, sys
    from ttmpd_jax.distill import distributed
    distributed.initialize(True, coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
    import jax, numpy as np, flax.linen as nn
    from ttmpd_jax.search import measure

    class Net(nn.Module):
      width: int
      @nn.compact
      def __call__(self, x, train=False):
        return nn.Dense(4)(nn.relu(nn.Conv(self.width, (3, 3))(x)).mean(axis=(1, 2)))

    x = np.zeros((1, 8, 8, 1), np.float32)
    wide, narrow = Net(32), Net(8)
    m = measure.measure_against_teacher(
        (wide, wide.init(jax.random.key(0), x)), (narrow, narrow.init(jax.random.key(0), x)),
        64, (8, 8, 1), max_rounds=3, attempts=1, log=lambda s: None)
    value = {'pi': np.pi / (1 + jax.process_index()), 'nested': [1.5, None, 'x' * 300]}
    print('RESULT', json.dumps({'measurement': m.to_json(),
                                'broadcast': distributed.broadcast_json(value)}))
''')


def test_timings_are_process_0s_on_every_process():
  port = free_port()
  job = [subprocess.Popen([sys.executable, '-c', TIMINGS, f'127.0.0.1:{port}', str(i)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env=_env(1)) for i in range(2)]
  results = finish_job(job, timeout=300)
  lines = []
  for rc, stdout, stderr in results:
    assert rc == 0, stderr[-3000:]
    lines.append(next(l for l in stdout.splitlines() if l.startswith('RESULT')))
  assert lines[0] == lines[1]   # Bit for bit, though each process could have measured.
  result = json.loads(lines[0].split(' ', 1)[1])
  assert result['broadcast']['pi'] == 3.141592653589793
  assert result['measurement']['teacher_ms'] > 0


KD_BATCH = textwrap.dedent('''
    import jax, numpy as np
    from tests.candidate_setup import candidates
    from ttmpd_jax import parallel
    from ttmpd_jax.latency.compilations import CompilationCounter
    from ttmpd_jax.search.evaluation import CandidateKDRunner, KDRunner

    model, variables, data, groups, masks = candidates()
    kw = dict(learning_rate=0.05, steps=3, batch_size=16, temperature=1.0, hard_weight=0.0,
              seed=3)
    sequential = KDRunner(model, groups, data, **kw)
    expected = [sequential.run(variables, m, 3) for m in masks]
    wide = CandidateKDRunner(model, groups, data, mesh=parallel.make_mesh(), **kw)
    with CompilationCounter() as c3:
      wide.run_many(variables, masks[:3], 3)
    with CompilationCounter() as c11:
      got = wide.run_many(variables, masks, 3)
    err = max(float(np.max(np.abs(a - b))) for e, g in zip(expected, got)
              for a, b in zip(jax.tree.leaves(e), jax.tree.leaves(g)))
    print('RESULT', err, c3.count, c11.count)
''')


def test_candidate_finetuning_over_8_devices_equals_sequential():
  result = subprocess.run([sys.executable, '-c', KD_BATCH], capture_output=True, text=True,
                          env=_env(8), cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(l for l in result.stdout.splitlines() if l.startswith('RESULT'))
  err, first, second = line.split()[1:]
  assert float(err) < 1e-5, line
  assert int(first) >= 1 and int(second) == 0, line   # 11 candidates reuse the compilation.


@pytest.mark.slow
@requires_fashion_mnist
def test_two_process_benchmark_equals_one_process(source):
  tmp, checkpoint = source
  runs = {}
  for processes, devices in ((1, 4), (2, 2)):
    out = tmp / f'benchmark_{processes}'
    run_job([MAIN, '--mode=benchmark', '--methods=netadapt,ttmpd', f'--checkpoint={checkpoint}',
             *_flags(tmp, out), *EXTRA], processes, devices)
    runs[processes] = json.loads((out / 'report.json').read_text())['runs']
  assert [r['method'] for r in runs[1]] == [r['method'] for r in runs[2]] == ['netadapt', 'ttmpd']
  for a, b in zip(runs[1], runs[2]):
    assert_same_run(a, b)
