"""bench/bench_proxy.py: within-iteration ground truth of the accuracy proxy from a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import bench_proxy  # pylint: disable=wrong-import-position


def _report(real_of):
  rng = np.random.default_rng(0)
  runs = []
  for cell in range(2):
    candidates = []
    for iteration in range(1, 5):
      v1, v2 = rng.uniform(0.6, 0.9, 6), rng.uniform(0.1, 0.5, 6)
      candidates += [{'iteration': iteration, 'v1': a, 'v2': b, 'real': real_of(a, b)}
                     for a, b in zip(v1, v2)]
    runs.append({'method': 'netadapt', 'run_key': f'k{cell}', 'candidates': candidates})
    runs.append({'method': 'ttmpd', 'run_key': f't{cell}',
                 'proxy_spearman_ground_truth': {'ttmpd': 0.5}})
  return {'runs': runs}


def test_ranks_by_the_variable_that_determines_accuracy():
  by_v1 = bench_proxy.analyse(_report(lambda a, b: a))
  assert by_v1['iterations'] == 8 and by_v1['netadapt_runs'] == 2
  assert by_v1['v1']['median'] == 1.0 and by_v1['v2']['median'] < 0.9
  by_kl = bench_proxy.analyse(_report(lambda a, b: -b))
  assert by_kl['v2']['median'] == 1.0 and by_kl['best_mix']['angle_deg'] > 45.0
  both = bench_proxy.analyse(_report(lambda a, b: a - b))   # Both variables matter.
  assert both['best_mix']['median'] > max(both['v1']['median'], both['v2']['median'])
  assert both['ttmpd_fitted'] == {'runs': 2, 'median_of_run_medians': 0.5, 'ci95': [0.5, 0.5]}


def test_cli_writes_json_and_plot_and_refuses_reports_without_netadapt(tmp_path):
  report = tmp_path / 'report.json'
  report.write_text(json.dumps(_report(lambda a, b: a)))
  script = os.path.join(ROOT, 'bench', 'bench_proxy.py')
  done = subprocess.run([sys.executable, script, '--report', str(report)], capture_output=True,
                        text=True, check=True)
  assert 'v1 alone            1.00' in done.stdout
  assert (tmp_path / 'report_proxy.json').exists() and (tmp_path / 'report_proxy.png').exists()
  report.write_text(json.dumps({'runs': []}))
  bad = subprocess.run([sys.executable, script, '--report', str(report)], capture_output=True,
                       text=True)
  assert bad.returncode != 0 and 'Traceback' not in bad.stderr and '--report' in bad.stderr


def test_reproducibility_of_a_noisy_ground_truth_bounds_the_proxy():
  # Real accuracy = v1 + fine-tuning noise as large as v1's spread: two fine-tunings of the same
  # candidates agree only partly, and v1 ranks the mean of both better than one of them.
  rng = np.random.default_rng(1)
  report = _report(lambda a, b: a)
  for row in report['runs']:
    for c in row.get('candidates', []):
      c['real'], c['real_repeats'] = c['v1'] + rng.normal(0, 0.1), [c['v1'] + rng.normal(0, 0.1)]
  rep = bench_proxy.analyse(report)['reproducibility']
  assert rep['iterations'] == 8 and rep['fine_tunings_per_candidate'] == 2
  assert rep['real_vs_repeat']['median'] < 0.9
  assert rep['v1_vs_mean']['median'] >= rep['v1_vs_real']['median']
  assert bench_proxy.analyse(_report(lambda a, b: a))['reproducibility'] == {'iterations': 0}


def test_diagnostic_statistics_are_ranked_with_their_sign():
  report = _report(lambda a, b: a)
  for row in report['runs']:
    for c in row.get('candidates', []):   # hard_ce falls as accuracy rises: ranked negated.
      c['statistics'] = {'soft_agreement': c['v1'] ** 2, 'margin': -c['v2'], 'hard_ce': -c['v1']}
  stats = bench_proxy.analyse(report)['statistics']
  assert stats['iterations'] == 8
  assert stats['soft_agreement']['median'] == 1.0 and stats['hard_ce']['median'] == 1.0
  assert stats['margin']['median'] < 0.9


def test_cheaper_finetunings_are_ranked_per_step_count():
  report = _report(lambda a, b: a)
  for row in report['runs']:
    for c in row.get('candidates', []):   # 5 steps: the real order; 1 step: unrelated.
      c['real_at_steps'] = {'5': c['real'] * 2, '1': (c['v2'] * 1e3) % 1}
  cheaper = bench_proxy.analyse(report)['cheaper_finetuning']
  assert cheaper['iterations'] == 8 and cheaper['5']['median'] == 1.0
  assert cheaper['1']['median'] < 0.9 and 'vs_other_batch_order' not in cheaper['5']
  for row in report['runs']:
    for c in row.get('candidates', []):   # A repeat ranked like the v1 order, reversed.
      c['real_repeats'] = [-c['real']]
  other = bench_proxy.analyse(report)['cheaper_finetuning']['5']['vs_other_batch_order']
  assert other['median'] == -1.0 and other['iterations'] == 8


def test_selection_replays_each_judge_against_the_repeat_fine_tuning():
  # Two iterations of one run without measurements; equal savings, so the criterion is the
  # accuracy. Candidate 3 is the best by the repeat; v1 prefers 0; the fine-tuning prefers 3.
  def candidates(k, chosen):
    v1 = [0.9, 0.5, 0.6, 0.7, 0.4]
    real = [0.80, 0.70, 0.72, 0.85, 0.60]
    repeat = [0.79, 0.70, 0.73, 0.86, 0.61]
    return [{'iteration': k, 'v1': v1[i], 'v2': 0.1, 'real': real[i], 'predicted_ms': 8.0,
             'real_repeats': [repeat[i]], 'chosen': i == chosen} for i in range(5)]
  run = {'method': 'netadapt', 'run_key': 'k', 'measurements': [],
         'candidates': candidates(1, 3) + candidates(2, 3) + candidates(3, 3),
         'trajectory': [{'iteration': k, 'predicted_ms': 10.0} for k in (1, 2, 3)]}
  selection = bench_proxy.analyse({'runs': [run]})['selection']
  assert selection['iterations'] == 2              # Iteration 1 has no known current network.
  assert selection['finetuned']['regret_pp_mean'] == 0.0
  assert selection['finetuned']['best_picked'] == 1.0
  # v1 picks candidate 0, which the repeat scores 0.79 against 0.86 for candidate 3: 7 pp.
  assert abs(selection['v1']['regret_pp_mean'] - 7.0) < 1e-6
  assert abs(selection['v1']['minus_finetuned_pp_mean'] - 7.0) < 1e-6
  # A shortlist of v1's top 3 (0, 3, 2) fine-tuned finds candidate 3; of its top 2 (0, 3) too.
  assert selection['v1_top3_finetuned']['regret_pp_mean'] == 0.0
  assert selection['v1_top2_finetuned']['regret_pp_mean'] == 0.0
  # A run that measured may have stepped back: its iterations do not chain, it is left out.
  run['measurements'] = [{'ratio': 0.6}]
  assert bench_proxy.analyse({'runs': [run]})['selection'] == {'iterations': 0}
