"""Candidates over the mesh: a candidate batch evaluated across 8 (forced CPU) devices equals the
sequential evaluation on one device, and compiles once whatever the number of candidates."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import numpy as np
    from tests.candidate_setup import candidates
    from ttmpd_jax import parallel
    from ttmpd_jax.latency.compilations import CompilationCounter
    from ttmpd_jax.search.evaluation import make_candidate_evaluator

    model, variables, data, groups, masks = candidates()
    wide = make_candidate_evaluator(model, groups, data, parallel.make_mesh())
    one = make_candidate_evaluator(model, groups, data, parallel.make_mesh(1))
    sequential = np.concatenate([one.many(variables, [m]) for m in masks])   # Every statistic.
    with CompilationCounter() as c3:
      wide.many(variables, masks[:3])
    with CompilationCounter() as c11:
      batched = wide.many(variables, masks)
    np.testing.assert_allclose(batched, sequential, atol=1e-5)
    print('COMPILES', c3.count, c11.count)
''')


def test_candidate_batch_over_8_devices_equals_sequential():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('COMPILES')][0]
  first, second = map(int, line.split()[1:])
  assert first >= 1 and second == 0, line   # 11 candidates reuse the 3-candidate compilation.
