"""A reduced benchmark grid through the launcher: 1 shift x 2 seeds on a tiny model, resumed
from a partly finished grid, with its summary (95% CIs, paired differences), table and plot.
(Several shifts are the same loop as several seeds: ``test_evidence.py`` covers the summary over
shifts and models.)"""

from __future__ import annotations

import json


from tests.conftest import requires_fashion_mnist
from tests.test_cli import run_main
from tests.test_prune_cli import _flags, shared  # noqa: F401  (module fixture)

pytestmark = requires_fashion_mnist

GRID = ('--mode=benchmark', '--methods=ttmpd,eagleeye', '--corruptions=gaussian_noise',
        '--grid_models=resnet8:base_width=8', '--max_iterations=2', '--long_term_steps=2',
        '--trajectory_eval_limit=0', '--latency_target=0.7', '--measure_rounds=0',
        '--test_limit=300', '--short_term_steps=2')


def test_reduced_grid_resumes_and_summarises(shared):  # noqa: F811
  tmp, checkpoint = shared
  out = tmp / 'grid'
  first = run_main(*_flags(tmp, out), *GRID, '--seeds=0')          # Part of the grid ...
  assert first.returncode == 0, first.stderr[-3000:]
  done = json.loads((out / 'report.json').read_text())['runs']
  assert len(done) == 2
  other = run_main(*_flags(tmp, out), *GRID, '--seeds=1')          # ... another part ...
  assert other.returncode == 0, other.stderr[-3000:]
  kept = json.loads((out / 'report.json').read_text())   # The first part is not lost.
  assert [r['seed'] for r in kept['runs']] == [1, 1]
  assert [r['run_key'] for r in kept['earlier_runs']] == [r['run_key'] for r in done]
  full = run_main(*_flags(tmp, out), *GRID, '--seeds=0,1')          # ... then all of it.
  assert full.returncode == 0, full.stderr[-3000:]
  assert full.stdout.count('finished earlier, reusing its row') == 4
  assert 'grid: 2/2 cells done' in full.stdout
  report = json.loads((out / 'report.json').read_text())
  runs = report['runs']
  assert len(runs) == 4 and {r['seed'] for r in runs} == {0, 1} and 'earlier_runs' not in report
  for r in runs:
    assert {'model', 'dataset', 'seed', 'method', 'accuracy', 'latency_ratio', 'latency_target',
            'prune_finetune_s', 'widths', 'met_target'} <= set(r)
  ttmpd = [r for r in runs if r['method'] == 'ttmpd']
  assert all({'v1', 'v2', 'ttmpd', 'n_iterations'} <= set(r['proxy_spearman']) for r in ttmpd)
  summary = {s['method']: s for s in report['summary']}
  assert summary['ttmpd']['n'] == 2
  assert summary['ttmpd']['ttmpd_minus_eagleeye_pp']['n'] == 2
  low, high = summary['ttmpd']['accuracy_ci95']
  assert low <= summary['ttmpd']['accuracy_mean'] <= high
  assert 'paired vs EagleEye pp' in full.stdout
  assert (out / 'benchmark_grid.png').stat().st_size > 10_000
