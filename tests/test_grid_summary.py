"""bench/grid_summary.py: the README's results section from a (partial) benchmark report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import grid_summary  # pylint: disable=wrong-import-position


def _row(method, dataset, seed, acc, seconds, ratio=0.6, met=True):
  return {'model': 'm', 'method': method, 'dataset': dataset, 'seed': seed, 'kd': 'cached',
          'accuracy': acc, 'latency_ratio': ratio, 'latency_target': 0.6,
          'prune_finetune_s': seconds, 'widths': {'a': 4}, 'met_target': met, 'run_key': 'k'}


def test_summary_counts_complete_cells_and_names_misses():
  runs = [_row(m, d, s, 0.8, 10.0 if m == 'ttmpd' else 20.0) for d in ('d1', 'd2')
          for s in (0, 1) for m in ('ttmpd', 'netadapt')]
  runs[0] = _row('ttmpd', 'd1', 0, 0.8, 10.0, ratio=0.65, met=False)
  runs.append(_row('ttmpd', 'd3', 0, 0.7, 9.0, ratio=0.7, met=False))   # Cell begun only.
  text = grid_summary.summary_markdown({'runs': runs})
  assert text.startswith('4 complete cells of 5 begun (1 models, 3 shifts, 2 seeds, 2 methods)')
  # Methods are compared on the complete cells only.
  assert '| m | ttmpd | 4 |' in text and '| m | netadapt | 4 |' in text
  assert 'ttmpd on m d1 seed 0 (0.650)' in text and 'd3' not in text


def test_bad_report_is_one_line_error(tmp_path):
  bad = tmp_path / 'report.json'
  bad.write_text('{"runs": []}')
  for path in (str(bad), str(tmp_path / 'missing.json')):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'grid_summary.py'),
                           '--report', path], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.startswith('error: --report=') and len(proc.stderr.splitlines()) == 1


def test_plot_of_a_partial_grid(tmp_path):
  runs = [_row(m, d, 0, 0.8, 10.0 if m == 'ttmpd' else 20.0) for d in ('d1', 'd2')
          for m in ('ttmpd', 'netadapt')]
  report = tmp_path / 'report.json'
  report.write_text(json.dumps({'runs': runs, 'flags': {'latency_target': 0.6}}))
  plot = tmp_path / 'grid.png'
  assert grid_summary.main(['--report', str(report), '--plot', str(plot)]) == 0
  assert plot.stat().st_size > 1000
