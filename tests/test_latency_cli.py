"""launch/main.py --mode=latency_table: builds, reuses, refuses foreign tables, survives corruption."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import FASHION_MNIST_DIR, requires_fashion_mnist
from tests.test_cli import assert_user_error, run_main

pytestmark = pytest.mark.timing   # Measures latency: run alone, after the parallel tests (.ci/run).

# Tiny and fast: ResNet-8 at base width 4, batch 8, 2 validation architectures.
SMALL = ['--mode=latency_table', '--model=resnet8', '--base_width=4', '--latency_batch=8',
         '--latency_round_to=4', '--latency_repeats=3', '--latency_model_repeats=3',
         '--latency_max_grid_points=1', '--latency_random_probes=2', '--latency_validate=2',
         f'--data_dir={FASHION_MNIST_DIR}']


@requires_fashion_mnist
def test_latency_table_mode_builds_then_reuses(tmp_path):
  args = SMALL + [f'--output_dir={tmp_path / "out"}', f'--latency_cache_dir={tmp_path / "cache"}']
  first = run_main(*args)
  assert first.returncode == 0, first.stdout + first.stderr
  report = json.loads((tmp_path / 'out' / 'latency_table_report.json').read_text())
  assert report['measured_entries'] > 0 and report['entries'] == report['measured_entries']
  assert os.path.exists(report['table'])
  assert report['table'].startswith(str(tmp_path / 'cache' / 'latency'))
  assert 'MAPE' in first.stdout and 'Spearman' in first.stdout
  assert len(report['validation']['measured_ms']) == 2

  entries = json.loads(open(report['table']).read())['entries'].values()
  loaded = sum(bool(e.get('loaded')) for e in entries if e.get('source') == 'probe')
  second = run_main(*args)
  assert second.returncode == 0, second.stdout + second.stderr
  # Nothing is measured again, except (by design) probes the first build flagged as measured on
  # a busy machine, re-measured when the second finds the machine quiet.
  assert any(f'table: {n} new entries measured' in second.stdout for n in {0, loaded}), (
      second.stdout)
  assert 'verification against a fresh measurement' in second.stdout

  # The same file under another device key is refused with one clear line.
  data = json.loads(open(report['table']).read())
  data['key']['jax_version'] = '0.0.1'
  foreign = tmp_path / 'foreign.json'
  foreign.write_text(json.dumps(data))
  result = run_main(*SMALL, f'--output_dir={tmp_path / "out2"}', f'--latency_table={foreign}',
                    '--latency_validate=0')
  assert_user_error(result, str(foreign), 'different device, JAX version or XLA flags',
                    'jax_version=0.0.1')


@requires_fashion_mnist
def test_latency_table_mode_rebuilds_corrupted_file(tmp_path):
  table = tmp_path / 'table.json'
  table.write_text('{"format": "ttmpd_jax.latency_table", "entr')  # Truncated write.
  result = run_main(*SMALL, f'--output_dir={tmp_path / "out"}', f'--latency_table={table}',
                    '--latency_validate=0')
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'corrupted' in result.stdout and 'rebuilding' in result.stdout
  assert json.loads(table.read_text())['entries']
  assert os.path.exists(str(table) + '.corrupt')
  refused = run_main(*SMALL, f'--output_dir={tmp_path / "out"}',
                     f'--latency_table={table}.corrupt', '--latency_on_corrupt=error',
                     '--latency_validate=0')
  assert_user_error(refused, 'corrupted', 'delete it to rebuild')
