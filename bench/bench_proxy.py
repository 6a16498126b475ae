"""Does TT-MPD's second variable help rank candidates? Ground truth from a benchmark report.

NetAdapt fine-tunes every candidate of every iteration, so each of its runs in a benchmark
``report.json`` holds, per iteration, whole candidate sets with ``(v1, v2, real short-term
accuracy)``. This script measures, within each iteration, the Spearman correlation with the real
accuracies of

* every mix of the two variables, ``cos θ · z(v1) + sin θ · z(−KL)`` (``z``: standardised within
  the iteration; θ = 0 is v1 alone, θ = 90° the KL alone) — the best any linear Â could do;
* TT-MPD's Â as each TT-MPD run fitted it (``proxy_spearman_ground_truth`` of its row);

and reports the median over iterations with a bootstrap 95% CI (iterations resampled), as JSON
and a plot. Where the runs fine-tuned each candidate more than once (``--ground_truth_repeats``),
it also reports how well two fine-tunings of the same candidates agree: the ceiling of any proxy.
Reads a report, measures nothing: seconds of work.

    python bench/bench_proxy.py --report bench/results/benchmark_grid_report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ttmpd_jax.search.candidates import selection_score  # pylint: disable=wrong-import-position
from ttmpd_jax.search.proxy import spearman  # pylint: disable=wrong-import-position

ANGLES = np.linspace(0.0, 90.0, 19)


def iteration_sets(report: dict[str, Any]) -> list[dict[str, np.ndarray]]:
  """Per NetAdapt iteration with >= 4 fine-tuned candidates: z-scored v1, −KL, and real."""
  out = []
  for row in report['runs']:
    if row['method'] != 'netadapt':
      continue
    by_iteration: dict[int, list[dict[str, Any]]] = {}
    for c in row.get('candidates') or []:
      if c.get('real') is not None:
        by_iteration.setdefault(int(c['iteration']), []).append(c)
    committed = _committed(row, by_iteration)
    for k, rows in by_iteration.items():
      if len(rows) < 4:
        continue
      z = lambda a: (a - a.mean()) / (a.std() or 1.0)
      out.append({'v1': z(np.array([r['v1'] for r in rows])),
                  'negkl': z(-np.array([r['v2'] for r in rows])),
                  'real': np.array([r['real'] for r in rows]), 'cell': row['run_key']})
      if k - 1 in committed:   # What the search's criterion needs (``selection_quality``).
        out[-1]['current'] = committed[k - 1]
        out[-1]['v1_raw'] = np.array([r['v1'] for r in rows])
        out[-1]['ms'] = np.array([r['predicted_ms'] for r in rows])
      if all(r.get('real_repeats') for r in rows):   # --ground_truth_repeats > 1
        out[-1]['repeats'] = np.array([r['real_repeats'] for r in rows])
        # Mean of all fine-tunings of each candidate: a less noisy ground truth.
        out[-1]['real_mean'] = np.column_stack([out[-1]['real'], out[-1]['repeats']]).mean(1)
      if all(r.get('real_at_steps') for r in rows):   # --ground_truth_steps
        out[-1]['at_steps'] = {int(k): np.array([r['real_at_steps'][k] for r in rows])
                               for k in rows[0]['real_at_steps']}
      if all(r.get('statistics') for r in rows):
        out[-1]['statistics'] = {name: np.array([r['statistics'][name] for r in rows])
                                 for name in rows[0]['statistics']}
  return out


def _committed(row: dict[str, Any], by_iteration: dict[int, list[dict[str, Any]]]) -> dict:
  """Per iteration k of a run without measured-target rounds: the network it committed, as
  ``(predicted ms, agreement with the teacher)`` — the *current* network of iteration k + 1.

  NetAdapt commits its chosen candidate as fine-tuned, so that network's agreement is the
  chosen candidate's ``real``. A run that measured (``measurements``) may have stepped back,
  so its iterations do not chain and it is left out.
  """
  if row.get('measurements'):
    return {}
  out = {}
  for t in row.get('trajectory') or []:
    chosen = [c for c in by_iteration.get(int(t['iteration']), []) if c.get('chosen')]
    if chosen:
      out[int(t['iteration'])] = (float(t['predicted_ms']), float(chosen[0]['real']))
  return out


# Diagnostic statistics recorded beside v1 and v2 (``proxy.STATISTICS``), signed so that
# larger means "more accurate".
SIGNS = {'soft_agreement': 1.0, 'margin': 1.0, 'hard_ce': -1.0}


def cheaper_finetuning(sets: list[dict[str, Any]], rng: np.random.Generator) -> dict:
  """Median within-iteration Spearman with the real accuracies of the accuracy after only
  ``k`` of the fine-tuning steps (``--ground_truth_steps``), per ``k``: what a fraction of
  NetAdapt's per-candidate cost buys in ranking."""
  sets = [s for s in sets if 'at_steps' in s]
  out: dict[str, Any] = {'iterations': len(sets)}
  for k in sorted({k for s in sets for k in s['at_steps']}):
    rhos = np.array([spearman(s['at_steps'][k], s['real']) for s in sets if k in s['at_steps']])
    median, ci = median_ci(rhos, rng)
    out[str(k)] = {'median': median, 'ci95': ci}
    # Against a fine-tuning with another batch order: no first steps shared with the proxy.
    other = np.array([spearman(s['at_steps'][k], s['repeats'][:, 0]) for s in sets
                      if k in s['at_steps'] and 'repeats' in s])
    if len(other):
      median, ci = median_ci(other, rng)
      out[str(k)]['vs_other_batch_order'] = {'median': median, 'ci95': ci, 'iterations': len(other)}
  return out


def statistics_ranking(sets: list[dict[str, Any]], rng: np.random.Generator) -> dict:
  """Median within-iteration Spearman with the real accuracies of each diagnostic statistic
  (and, where candidates were fine-tuned more than once, with the mean of the fine-tunings)."""
  sets = [s for s in sets if 'statistics' in s]
  out: dict[str, Any] = {'iterations': len(sets)}
  for name, sign in SIGNS.items():
    if not sets or name not in sets[0]['statistics']:
      continue
    rhos = np.array([spearman(sign * s['statistics'][name], s['real']) for s in sets], float)
    median, ci = median_ci(rhos, rng)
    out[name] = {'median': median, 'ci95': ci}
    with_repeats = [s for s in sets if 'repeats' in s]
    if with_repeats:
      rhos = np.array([spearman(sign * s['statistics'][name], s['real_mean'])
                       for s in with_repeats], float)
      median, ci = median_ci(rhos, rng)
      out[name]['vs_mean'] = {'median': median, 'ci95': ci}
  return out


def reproducibility(sets: list[dict[str, np.ndarray]], rng: np.random.Generator) -> dict:
  """How reproducible the ground truth is, where candidates were fine-tuned more than once.

  ``real_vs_repeat``: within-iteration Spearman between two fine-tunings of the same candidates
  (other batch orders) — what "real accuracy" agrees with itself, hence about the most a proxy
  can reach against one fine-tuning. The variables are also ranked against the mean of all
  fine-tunings of a candidate (a less noisy ground truth).
  """
  sets = [s for s in sets if 'repeats' in s]
  if not sets:
    return {'iterations': 0}
  out: dict[str, Any] = {'iterations': len(sets),
                         'fine_tunings_per_candidate': int(1 + sets[0]['repeats'].shape[1])}
  rows = {'real_vs_repeat': [spearman(s['real'], s['repeats'][:, 0]) for s in sets]}
  for name, get in (('v1_vs_mean', lambda s: s['v1']), ('v2_vs_mean', lambda s: s['negkl'])):
    rows[name] = [spearman(get(s), s['real_mean']) for s in sets]
  rows['v1_vs_real'] = [spearman(s['v1'], s['real']) for s in sets]
  for name, values in rows.items():
    median, ci = median_ci(np.array(values, float), rng)
    out[name] = {'median': median, 'ci95': ci}
  spread = [np.abs(s['real'] - s['repeats'][:, 0]).mean() / max(np.ptp(s['real']), 1e-9)
            for s in sets]
  out['repeat_gap_over_range_median'] = float(np.median(spread))
  return out


def selection_quality(sets: list[dict[str, Any]], rng: np.random.Generator) -> dict:
  """What each way of judging candidates would *pick*, scored against an independent truth.

  A rank correlation weighs every pair of candidates alike; the search only needs the best one.
  Per iteration (where the current network is known, and each candidate was fine-tuned twice),
  every judge picks with the search's own criterion — accuracy lost per predicted ms saved,
  ``candidates.selection_score``, the current accuracy being the committed network's agreement
  — from its own accuracy estimate: ``v1`` (EagleEye; what TT-MPD's Â reduces to when it keeps
  v1 alone), the first ``k`` fine-tuning steps, or the whole fine-tuning (NetAdapt). The pick is
  scored by the *repeat* fine-tuning (another batch order, shared with no judge): its
  criterion's excess over the best candidate's, converted to accuracy at the pick's saving
  (``regret_pp``, 0 = the truth's best; mean over iterations with a bootstrap 95% CI, and paired
  with the whole fine-tuning's over the same iterations), and how often it picks the truth's best.
  """
  sets = [s for s in sets if 'current' in s and 'repeats' in s]
  out: dict[str, Any] = {'iterations': len(sets)}
  if not sets:
    return out
  steps = sorted({k for s in sets for k in s.get('at_steps', {})})
  judges = {'finetuned': lambda s: s['real'], 'v1': lambda s: s['v1_raw']}
  for k in steps:
    judges[f'{k}_steps'] = lambda s, k=k: s.get('at_steps', {}).get(k)
  for m in SHORTLISTS:   # v1 shortlists m candidates; only they are fine-tuned.
    judges[f'v1_top{m}_finetuned'] = lambda s, m=m: _shortlisted(s, s['real'], m)
    for k in steps:
      judges[f'v1_top{m}_{k}_steps'] = lambda s, m=m, k=k: (
          None if k not in s.get('at_steps', {}) else _shortlisted(s, s['at_steps'][k], m))
  regrets: dict[str, dict[int, float]] = {}
  for name, estimate in judges.items():
    regrets[name], hits = {}, []
    for i, s in enumerate(sets):
      accuracy = estimate(s)
      if accuracy is None:
        continue
      current_ms, current = s['current']
      saving = np.maximum(current_ms - s['ms'], 1e-9)
      pick = int(np.argmin(selection_score(current, accuracy, current_ms, s['ms'])))
      truth = selection_score(current, s['repeats'][:, 0], current_ms, s['ms'])
      regrets[name][i] = 100.0 * (truth[pick] - truth.min()) * saving[pick]
      hits.append(float(truth[pick] == truth.min()))
    values = np.array(list(regrets[name].values()))
    out[name] = {'iterations': len(values), 'regret_pp_mean': float(values.mean()),
                 'regret_pp_mean_ci95': mean_ci(values, rng), 'best_picked': float(np.mean(hits))}
    if name != 'finetuned':   # Paired over the same iterations: what the cheaper judge costs.
      diff = np.array([r - regrets['finetuned'][i] for i, r in regrets[name].items()])
      out[name]['minus_finetuned_pp_mean'] = float(diff.mean())
      out[name]['minus_finetuned_pp_ci95'] = mean_ci(diff, rng)
  return out


SHORTLISTS = (2, 3)


def _shortlisted(s: dict[str, Any], accuracy: np.ndarray, m: int) -> np.ndarray:
  """``accuracy`` for the ``m`` candidates v1's criterion ranks best, −inf-like elsewhere."""
  current_ms, current = s['current']
  order = np.argsort(selection_score(current, s['v1_raw'], current_ms, s['ms']))
  out = np.full(len(accuracy), -1e9)
  out[order[:m]] = accuracy[order[:m]]
  return out


def mean_ci(values: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> list[float]:
  """Bootstrap 95% CI of the mean."""
  boot = rng.choice(values, (draws, len(values))).mean(1)
  return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def median_ci(values: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> tuple:
  values = values[~np.isnan(values)]
  if len(values) == 0:
    return float('nan'), [float('nan'), float('nan')]
  boot = np.median(rng.choice(values, (draws, len(values))), axis=1)
  return float(np.median(values)), [float(np.percentile(boot, 2.5)),
                                    float(np.percentile(boot, 97.5))]


def analyse(report: dict[str, Any], seed: int = 0) -> dict[str, Any]:
  sets = iteration_sets(report)
  rng = np.random.default_rng(seed)
  curve = []
  for angle in ANGLES:
    t = np.deg2rad(angle)
    rhos = np.array([spearman(np.cos(t) * s['v1'] + np.sin(t) * s['negkl'], s['real'])
                     for s in sets])
    median, ci = median_ci(rhos, rng)
    curve.append({'angle_deg': float(angle), 'median': median, 'ci95': ci,
                  'mean': float(np.nanmean(rhos)) if len(rhos) else float('nan')})
  fitted = np.array([r['proxy_spearman_ground_truth']['ttmpd'] for r in report['runs']
                     if r['method'] == 'ttmpd' and (r.get('proxy_spearman_ground_truth') or {})
                     .get('ttmpd') is not None], float)
  best = max(curve, key=lambda c: c['median'])
  median, ci = median_ci(fitted, rng)
  return {'iterations': len(sets), 'netadapt_runs': len({s['cell'] for s in sets}),
          'candidates_per_iteration_median': float(np.median([len(s['real']) for s in sets]))
          if sets else 0.0,
          'curve': curve, 'v1': curve[0], 'v2': curve[-1], 'best_mix': best,
          'ttmpd_fitted': {'runs': len(fitted), 'median_of_run_medians': median, 'ci95': ci},
          'reproducibility': reproducibility(sets, rng),
          'statistics': statistics_ranking(sets, rng),
          'cheaper_finetuning': cheaper_finetuning(sets, rng),
          'selection': selection_quality(sets, rng)}


def plot(result: dict[str, Any], path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  curve = result['curve']
  x = [c['angle_deg'] for c in curve]
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  ax.plot(x, [c['median'] for c in curve], 'o-', label='median over iterations')
  ax.fill_between(x, [c['ci95'][0] for c in curve], [c['ci95'][1] for c in curve], alpha=0.2,
                  label='bootstrap 95% CI')
  fitted = result['ttmpd_fitted']
  if fitted['runs']:
    ax.axhline(fitted['median_of_run_medians'], color='C3', ls='--',
               label=f'TT-MPD fitted Â ({fitted["runs"]} runs, median)')
  rep = result.get('reproducibility') or {}
  if rep.get('iterations'):
    ceiling = rep['real_vs_repeat']
    ax.axhline(ceiling['median'], color='k', ls=':',
               label=f'ceiling: a fine-tuning vs its repeat ({ceiling["median"]:.2f})')
  ax.set_xlabel('weight angle θ: 0° = v1 (agreement) alone, 90° = KL alone')
  ax.set_ylabel('within-iteration Spearman with real accuracy')
  ax.set_title(f'{result["iterations"]} NetAdapt iterations, '
               f'{result["candidates_per_iteration_median"]:.0f} candidates each (median)')
  ax.legend(fontsize=8, loc='lower left')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--report', nargs='+', default=[os.path.join(
      ROOT, 'bench', 'results', 'benchmark_grid_report.json')], help='one or more report.json '
      'files; their runs are analysed together')
  parser.add_argument('--out', default=None, help='default: <first report>_proxy.json and .png')
  args = parser.parse_args()
  report: dict[str, Any] = {'runs': []}
  for path in args.report:
    try:
      with open(path) as f:
        report['runs'] += json.load(f)['runs']
    except (OSError, ValueError, KeyError, TypeError) as error:
      sys.exit(f'error: --report {path}: {error!r}; pass a benchmark report.json')
  result = analyse(report)
  if not result['iterations']:
    sys.exit(f'error: --report {" ".join(args.report)} has no NetAdapt iteration with >= 4 '
             'fine-tuned candidates; run --mode=benchmark with netadapt among --methods')
  out = args.out or os.path.splitext(args.report[0])[0] + '_proxy.json'
  result['plot'] = plot(result, os.path.splitext(out)[0] + '.png')
  with open(out + '.tmp', 'w') as f:
    json.dump(result, f, indent=1)
  os.replace(out + '.tmp', out)
  fmt = lambda c: f'{c["median"]:.2f} [{c["ci95"][0]:.2f}, {c["ci95"][1]:.2f}]'
  print(f'{result["iterations"]} iterations of {result["netadapt_runs"]} NetAdapt runs; median '
        'within-iteration Spearman with real accuracy (bootstrap 95% CI):')
  print(f'  v1 alone            {fmt(result["v1"])}')
  print(f'  KL alone            {fmt(result["v2"])}')
  print(f'  best mix (θ={result["best_mix"]["angle_deg"]:.0f}°)    {fmt(result["best_mix"])}')
  f = result['ttmpd_fitted']
  if f['runs']:
    print(f'  TT-MPD fitted Â     {f["median_of_run_medians"]:.2f} [{f["ci95"][0]:.2f}, '
          f'{f["ci95"][1]:.2f}] ({f["runs"]} runs)')
  rep = result['reproducibility']
  if rep['iterations']:
    print(f'ground truth fine-tuned {rep["fine_tunings_per_candidate"]}x in {rep["iterations"]} '
          'iterations (other batch orders):')
    print(f'  fine-tuning vs its repeat  {fmt(rep["real_vs_repeat"])}   (the ceiling of any proxy)')
    print(f'  v1 vs the same runs        {fmt(rep["v1_vs_real"])}')
    print(f'  v1 vs mean of fine-tunings {fmt(rep["v1_vs_mean"])}')
    print(f'  KL vs mean of fine-tunings {fmt(rep["v2_vs_mean"])}')
    print(f'  |run - repeat| / range of the iteration: median '
          f'{rep["repeat_gap_over_range_median"]:.2f}')
  stats = result['statistics']
  if stats['iterations']:
    print(f'diagnostic statistics ({stats["iterations"]} iterations):')
    for name in SIGNS:
      if name in stats:
        print(f'  {name:<19} {fmt(stats[name])}')
  cheaper = result['cheaper_finetuning']
  if cheaper['iterations']:
    print(f'accuracy after k of the fine-tuning steps ({cheaper["iterations"]} iterations):')
    for k, value in cheaper.items():
      if k != 'iterations':
        other = value.get('vs_other_batch_order')
        print(f'  k = {k:<15} {fmt(value)}' + (
            f'   vs a fine-tuning with other batches: {fmt(other)} ({other["iterations"]} '
            'iterations)' if other else ''))
  selection = result['selection']
  if selection['iterations']:
    print(f'what each judge picks, scored by a repeat fine-tuning ({selection["iterations"]} '
          'iterations; regret: accuracy (pp) the pick loses to the best at its saving, mean):')
    for name, value in selection.items():
      if name != 'iterations':
        paired = ('' if 'minus_finetuned_pp_mean' not in value else
                  f'; minus fine-tuned {value["minus_finetuned_pp_mean"]:+.2f} '
                  f'[{value["minus_finetuned_pp_ci95"][0]:+.2f}, '
                  f'{value["minus_finetuned_pp_ci95"][1]:+.2f}]')
        print(f'  {name:<19} regret {value["regret_pp_mean"]:.2f} pp '
              f'[{value["regret_pp_mean_ci95"][0]:.2f}, {value["regret_pp_mean_ci95"][1]:.2f}]'
              f'{paired}; best picked in {100 * value["best_picked"]:.0f}% '
              f'({value["iterations"]} iterations)')
  print(f'wrote {out} and {result["plot"]}')


if __name__ == '__main__':
  main()
