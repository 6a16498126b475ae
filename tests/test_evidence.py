"""Benchmark statistics: confidence intervals, paired differences, the summary and its plot."""

from __future__ import annotations

import os

import pytest

from ttmpd_jax import evidence


def test_mean_ci95_matches_a_hand_computed_case():
  # mean 2.5, sd 1.2909944, t(0.975, 3) = 3.1824463 -> half width 2.0542603.
  mean, ci = evidence.mean_ci95([1.0, 2.0, 3.0, 4.0])
  assert mean == pytest.approx(2.5)
  assert ci == pytest.approx([0.4457397, 4.5542603], abs=1e-6)
  assert evidence.mean_ci95([3.0]) == (3.0, None)
  assert evidence.mean_ci95([None, float('nan')]) == (None, None)


def _row(method, dataset, seed, acc, seconds, widths=None, **extra):
  return {'model': 'm', 'method': method, 'dataset': dataset, 'seed': seed, 'kd': 'cached',
          'accuracy': acc, 'latency_ratio': 0.5, 'prune_finetune_s': seconds,
          'widths': widths or {'a': 4}, 'met_target': True, **extra}


def test_summary_pairs_matched_cells_only():
  runs = [_row('netadapt', 'd1', 0, 0.80, 100.0), _row('ttmpd', 'd1', 0, 0.81, 40.0),
          _row('netadapt', 'd2', 0, 0.70, 200.0), _row('ttmpd', 'd2', 0, 0.68, 60.0),
          _row('ttmpd', 'd3', 0, 0.99, 10.0, widths={'a': 2})]   # No NetAdapt partner.
  summary = {s['method']: s for s in evidence.summarize(runs)}
  t = summary['ttmpd']
  assert t['n'] == 3 and t['distinct_architectures'] == 2
  paired = t['ttmpd_minus_netadapt_pp']
  assert paired['n'] == 2 and paired['mean'] == pytest.approx(-0.5)   # (+1 - 2) / 2 pp.
  # Per-cell time ratios 0.4 and 0.3.
  assert t['time_ratio_to_netadapt_mean'] == pytest.approx(0.35)
  assert t['ttmpd_minus_eagleeye_pp']['n'] == 0
  assert summary['netadapt']['time_ratio_to_netadapt_mean'] == pytest.approx(1.0)


def test_summary_pools_every_model_in_an_all_row():
  runs = [_row('netadapt', 'd1', 0, 0.80, 100.0), _row('ttmpd', 'd1', 0, 0.81, 40.0)]
  runs += [{**_row('netadapt', 'd1', 0, 0.70, 200.0), 'model': 'n'},
           {**_row('ttmpd', 'd1', 0, 0.73, 50.0), 'model': 'n'}]
  summary = {(s['model'], s['method']): s for s in evidence.summarize(runs)}
  assert summary['m', 'ttmpd']['n'] == 1 and summary['n', 'ttmpd']['n'] == 1
  pooled = summary['all', 'ttmpd']
  assert pooled['n'] == 2 and pooled['time_ratio_to_netadapt_mean'] == pytest.approx(0.325)
  assert pooled['ttmpd_minus_netadapt_pp']['mean'] == pytest.approx(2.0)   # (+1 + 3) / 2 pp.
  assert ('all', 'ttmpd') not in {(s['model'], s['method'])
                                  for s in evidence.summarize(runs[:2])}


def test_summary_table_and_plot(tmp_path):
  runs = [_row(m, d, s, 0.8 + 0.01 * s, 10.0 + s) for m in ('ttmpd', 'netadapt')
          for d in ('d1', 'd2') for s in (0, 1)]
  summary = evidence.summarize(runs)
  header, rows = evidence.summary_table(summary)
  assert len(rows) == 2 and len(rows[0]) == len(header)
  assert '[' in rows[0][3]   # Accuracy with its interval.
  path = evidence.plot_grid(summary, str(tmp_path / 'grid.png'))
  assert os.path.getsize(path) > 1000


def test_markdown_and_measurement_reproducibility():
  text = evidence.markdown(['a', 'b'], [['1', 'x|y']])
  assert text.splitlines() == ['| a | b |', '|---|---|', '| 1 | x/y |']
  runs = [_row('ttmpd', 'd1', 0, 0.8, 10.0, latency_target=0.5, latency_ratio=0.51,
               measurements=[{'ratio': 0.60, 'met_target': False},
                             {'ratio': 0.50, 'met_target': True}]),
          _row('netadapt', 'd1', 0, 0.8, 20.0, latency_target=0.5, latency_ratio=0.48,
               measurements=[{'ratio': 0.49, 'met_target': True}]),
          _row('teacher_bn', 'd1', 0, 0.9, 0.0, latency_target=1.0, latency_ratio=1.0)]
  rep = evidence.reproducibility(runs)
  assert rep['n'] == 2 and rep['max'] == pytest.approx(0.02) and rep['median'] == pytest.approx(
      0.02)   # |0.51 - 0.50| / 0.5 and |0.48 - 0.49| / 0.5.
  assert evidence.reproducibility(runs[2:]) == {'n': 0, 'median': None, 'max': None}


def test_time_ratio_without_measuring():
  runs = [_row('netadapt', 'd1', 0, 0.8, 100.0, time_s={'measure': 20.0}),
          _row('ttmpd', 'd1', 0, 0.8, 60.0, time_s={'measure': 40.0})]
  t = {s['method']: s for s in evidence.summarize(runs)}['ttmpd']
  assert t['time_ratio_to_netadapt_mean'] == pytest.approx(0.6)
  assert t['unmeasured_time_ratio_to_netadapt_mean'] == pytest.approx(0.25)   # 20 / 80.


def test_every_method_is_paired_with_netadapt():
  runs = [_row('netadapt', 'd1', 0, 0.80, 100.0), _row('eagleeye', 'd1', 0, 0.79, 30.0),
          _row('netadapt', 'd2', 0, 0.70, 100.0), _row('eagleeye', 'd2', 0, 0.72, 30.0)]
  e = {s['method']: s for s in evidence.summarize(runs)}['eagleeye']
  assert e['minus_netadapt_pp']['n'] == 2 and e['minus_netadapt_pp']['mean'] == pytest.approx(0.5)
