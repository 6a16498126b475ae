"""Benchmark evidence: means with 95% confidence intervals, paired differences, the grid plot.

``summarize(runs)`` turns the rows of a benchmark grid (one per model, dataset, seed, method) into
one row per (model, method). Design choices: a *cell* is (model, dataset, seed, kd); intervals
are Student-t intervals of the mean over cells (``None`` with fewer than two); paired differences
compare two methods on the cells both finished, so shift and seed effects cancel; the time ratio
to NetAdapt is computed per cell, then averaged.

Paired differences are heavy-tailed (one collapsed run moves a mean by pp), and a t-interval
hides that: each pair also carries a paired bootstrap 95% CI of the mean (``BOOTSTRAP``
resamples of cells, seeded), the Wilcoxon signed-rank p, wins / ties / losses (a tie: within
``TIE_PP``), the worst cell, and the same over the cells where both runs ended inside the
measured latency band (``in_band``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

# What the summary compares (reporting choices, not method behaviour): paired accuracy
# differences, and the method whose prune + fine-tune time is the unit of the time ratio.
PAIRS = (('ttmpd', 'netadapt'), ('ttmpd', 'eagleeye'), ('ttmpd_shortlist', 'netadapt'),
         ('ttmpd_shortlist', 'eagleeye'), ('ttmpd_shortlist', 'ttmpd'))
TIME_BASELINE = 'netadapt'
BOOTSTRAP = 10_000
TIE_PP = 0.1   # Differences within ±0.1 pp (3 of 3,000 test images) count as ties.


def bootstrap_ci95(x: Sequence[float], resamples: int = BOOTSTRAP,
                   seed: int = 0) -> Optional[list[float]]:
  """Percentile bootstrap 95% CI of the mean of ``x`` (cells resampled with replacement)."""
  x = np.asarray(x, float)
  if len(x) < 2:
    return None
  means = np.random.default_rng(seed).choice(x, (resamples, len(x))).mean(1)
  return [float(v) for v in np.percentile(means, [2.5, 97.5])]


def paired_statistics(diffs: Sequence[float]) -> dict[str, Any]:
  """Mean, t and bootstrap 95% CIs, Wilcoxon p, wins/ties/losses and the worst of ``diffs``."""
  x = np.asarray([d for d in diffs if d is not None and np.isfinite(d)], float)
  mean, ci = mean_ci95(x)
  out = {'n': len(x), 'mean': mean, 'ci95': ci, 'bootstrap_ci95': bootstrap_ci95(x),
         'wilcoxon_p': None, 'wins': int((x > TIE_PP).sum()), 'ties': int((abs(x) <= TIE_PP).sum()),
         'losses': int((x < -TIE_PP).sum()), 'worst': float(x.min()) if len(x) else None}
  if len(x) >= 2 and np.any(x != 0):
    from scipy import stats
    out['wilcoxon_p'] = float(stats.wilcoxon(x).pvalue)
  return out


def mean_ci95(values: Iterable[Optional[float]]) -> tuple[Optional[float], Optional[list[float]]]:
  """``(mean, [low, high])`` of the finite values; the interval needs at least two."""
  x = np.array([v for v in values if v is not None and np.isfinite(v)], float)
  if len(x) == 0:
    return None, None
  mean = float(x.mean())
  if len(x) < 2:
    return mean, None
  from scipy import stats
  half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
  return mean, [mean - half, mean + half]


def cell_of(row: Mapping[str, Any]) -> tuple:
  return (row.get('model'), row['dataset'], row.get('seed'), row.get('kd'))


def _by_cell(runs: Sequence[Mapping[str, Any]], method: str) -> dict[tuple, Mapping[str, Any]]:
  return {cell_of(r): r for r in runs if r['method'] == method}


ALL = 'all'   # The pooled row of a grid with several models.


def _of(runs: Sequence[Mapping[str, Any]], model: Any) -> list[Mapping[str, Any]]:
  return list(runs) if model == ALL else [r for r in runs if r.get('model') == model]


def _paired(runs, model, a: str, b: str) -> dict[str, Any]:
  left, right = _by_cell(_of(runs, model), a), _by_cell(_of(runs, model), b)
  cells = [c for c in left if c in right]
  diff = lambda c: 100 * (left[c]['accuracy'] - right[c]['accuracy'])
  out = paired_statistics([diff(c) for c in cells])
  in_band = [c for c in cells if left[c].get('met_target', True) and
             right[c].get('met_target', True)]
  out['in_band'] = paired_statistics([diff(c) for c in in_band])
  return out


def _summary_row(runs, model: str, method: str) -> dict[str, Any]:
  rows = [r for r in _of(runs, model) if r['method'] == method]
  netadapt = _by_cell(_of(runs, model), TIME_BASELINE)
  per_cell = lambda seconds: [seconds(r) / seconds(netadapt[cell_of(r)]) for r in rows
                              if cell_of(r) in netadapt and seconds(netadapt[cell_of(r)]) > 0]
  ratios = per_cell(lambda r: r['prune_finetune_s'])
  # The same ratio without latency measurements: how many a method needs to land in the band
  # is partly luck (a network near an edge is measured again), the search and fine-tuning not.
  search_ratios = per_cell(lambda r: r['prune_finetune_s'] -
                           (r.get('time_s') or {}).get('measure', 0.0))
  out: dict[str, Any] = {'model': model, 'method': method, 'n': len(rows)}
  for key, values in (('accuracy', [r['accuracy'] for r in rows]),
                      ('latency_ratio', [r['latency_ratio'] for r in rows]),
                      ('prune_finetune_s', [r['prune_finetune_s'] for r in rows]),
                      ('time_ratio_to_netadapt', ratios),
                      ('unmeasured_time_ratio_to_netadapt', search_ratios)):
    out[f'{key}_mean'], out[f'{key}_ci95'] = mean_ci95(values)
  out['met_target'] = sum(bool(r.get('met_target', True)) for r in rows)
  out['distinct_architectures'] = len({tuple(sorted(r['widths'].items())) for r in rows})
  spearman = [r.get('proxy_spearman_netadapt') or {} for r in rows]
  for key in ('v1', 'v2', 'ttmpd'):
    values = [s.get(key) for s in spearman if s.get(key) is not None]
    out[f'proxy_spearman_{key}_median'] = float(np.median(values)) if values else None
  return out


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per (model, method), plus the paired differences on the TT-MPD rows; with several
  models, rows of model ``'all'`` pool every cell of the grid."""
  summary = []
  models = sorted({r.get('model') for r in runs}, key=str)
  for model in models + ([ALL] if len(models) > 1 else []):
    methods = list(dict.fromkeys(r['method'] for r in _of(runs, model)))
    for method in methods:
      row = _summary_row(runs, model, method)
      for a, b in PAIRS:
        if method == a:
          row[f'{a}_minus_{b}_pp'] = _paired(runs, model, a, b)
      if method != TIME_BASELINE:   # Every method against the baseline, for the paired plot.
        row[f'minus_{TIME_BASELINE}_pp'] = _paired(runs, model, method, TIME_BASELINE)
      summary.append(row)
  return summary


def paired_table(summary: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """Every paired difference of the summary, with its robust statistics (the README's table)."""
  header = ['model', 'pair', 'cells', 'mean pp', 't 95% CI', 'bootstrap 95% CI', 'Wilcoxon p',
            'W / T / L', 'worst pp', 'in band: cells', 'in band: mean [bootstrap CI]']
  rows = []
  for s in summary:
    for key, pair in s.items():
      if not key.endswith('_pp') or not isinstance(pair, dict) or not pair.get('n'):
        continue
      name = key[:-3].replace('_minus_', ' − ')
      if name.startswith('minus_'):
        name = f'{s["method"]} − {name[6:]}'
      band = pair.get('in_band') or {}
      fmt = lambda ci: '-' if ci is None else f'[{ci[0]:.2f}, {ci[1]:.2f}]'
      p = pair.get('wilcoxon_p')
      rows.append([str(s['model']), name, str(pair['n']), f'{pair["mean"]:.2f}', fmt(pair['ci95']),
                   fmt(pair.get('bootstrap_ci95')), '-' if p is None else f'{p:.3f}',
                   f'{pair.get("wins", "-")} / {pair.get("ties", "-")} / {pair.get("losses", "-")}',
                   '-' if pair.get('worst') is None else f'{pair["worst"]:.2f}',
                   str(band.get('n', '-')),
                   '-' if not band.get('n') else
                   f'{band["mean"]:.2f} {fmt(band.get("bootstrap_ci95"))}'])
  # One row per pair: the 'minus_netadapt' duplicate of a named pair is dropped.
  seen, unique = set(), []
  for r in rows:
    if (r[0], r[1]) not in seen:
      seen.add((r[0], r[1]))
      unique.append(r)
  return header, unique


def _fmt_ci(mean: Optional[float], ci: Optional[list[float]], scale: float = 1.0,
            digits: int = 2) -> str:
  if mean is None:
    return '-'
  if ci is None:
    return f'{scale * mean:.{digits}f}'
  return f'{scale * mean:.{digits}f} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]'


def summary_table(summary: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """Header and rows of the printed summary (accuracy in %, 95% CIs in brackets)."""
  header = ['model', 'method', 'n', 'accuracy %', 'latency ratio', 'met', 'prune+FT s',
            'time / NetAdapt', 'without measuring', 'archs', 'paired vs NetAdapt pp',
            'paired vs EagleEye pp']
  rows = []
  for s in summary:
    pair = lambda key: _fmt_ci(s[key]['mean'], s[key]['ci95']) if key in s else ''
    pruned = bool(s['prune_finetune_s_mean'])   # References (teacher_bn) take no pruning time.
    rows.append([str(s['model']), s['method'], str(s['n']),
                 _fmt_ci(s['accuracy_mean'], s['accuracy_ci95'], 100),
                 _fmt_ci(s['latency_ratio_mean'], s['latency_ratio_ci95'], 1, 3),
                 f'{s["met_target"]}/{s["n"]}',
                 _fmt_ci(s['prune_finetune_s_mean'], s['prune_finetune_s_ci95'], 1, 0)
                 if pruned else '-',
                 _fmt_ci(s['time_ratio_to_netadapt_mean'], s['time_ratio_to_netadapt_ci95'])
                 if pruned else '-',
                 _fmt_ci(s['unmeasured_time_ratio_to_netadapt_mean'],
                         s['unmeasured_time_ratio_to_netadapt_ci95']) if pruned else '-',
                 str(s['distinct_architectures']), pair(f'{s["method"]}_minus_netadapt_pp'),
                 pair(f'{s["method"]}_minus_eagleeye_pp')])
  return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub-flavoured markdown table (the README's results section is generated with it)."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c).replace('|', '/') for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def reproducibility(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """How far the final measurement of a network lies from the search's last in-band measurement
  of it, as a fraction of the target (pruning methods only): the latency noise a reader should
  allow for when comparing measured ratios."""
  gaps = []
  for r in runs:
    inside = [m for m in r.get('measurements') or [] if m.get('met_target')]
    if inside and r.get('latency_target', 1.0) < 1.0:
      gaps.append(abs(r['latency_ratio'] - inside[-1]['ratio']) / r['latency_target'])
  if not gaps:
    return {'n': 0, 'median': None, 'max': None}
  return {'n': len(gaps), 'median': float(np.median(gaps)), 'max': float(np.max(gaps))}


def plot_grid(summary: Sequence[Mapping[str, Any]], path: str, title: str = '') -> str:
  """One column per model. Top: accuracy vs prune + fine-tune time, error bars = 95% CIs, one
  point per method. Bottom: the same *paired* with NetAdapt on matched cells — accuracy minus
  NetAdapt's (pp) vs time / NetAdapt's — where shift-to-shift spread cancels."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from ttmpd_jax.report import MARKERS, save_png
  models = sorted({s['model'] for s in summary}, key=str)
  fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 9), squeeze=False)
  err = lambda mean, ci, k=1.0: None if ci is None else [[k * (mean - ci[0])],
                                                         [k * (ci[1] - mean)]]
  for column, model in enumerate(models):
    top, bottom = axes[0][column], axes[1][column]
    for s in (s for s in summary if s['model'] == model and s['prune_finetune_s_mean']):
      marker, color = MARKERS.get(s['method'], ('o', 'black'))
      top.errorbar(s['prune_finetune_s_mean'], 100 * s['accuracy_mean'],
                   xerr=err(s['prune_finetune_s_mean'], s['prune_finetune_s_ci95']),
                   yerr=err(s['accuracy_mean'], s['accuracy_ci95'], 100), fmt=marker,
                   color=color, capsize=3, label=f'{s["method"]} (n={s["n"]})')
      paired = s.get(f'minus_{TIME_BASELINE}_pp') or {'mean': 0.0, 'ci95': None}
      if paired['mean'] is not None and s['time_ratio_to_netadapt_mean'] is not None:
        bottom.errorbar(s['time_ratio_to_netadapt_mean'], paired['mean'],
                        xerr=err(s['time_ratio_to_netadapt_mean'],
                                 s['time_ratio_to_netadapt_ci95']),
                        yerr=err(paired['mean'], paired['ci95']), fmt=marker, color=color,
                        capsize=3, label=s['method'])
    top.set_xlabel('prune + fine-tune time (s)')
    top.set_ylabel('accuracy on the shifted test set (%)')
    top.set_title(str(model))
    bottom.axhline(0.0, color='gray', lw=0.8)
    bottom.set_xlabel(f'prune + fine-tune time / {TIME_BASELINE} (same cell)')
    bottom.set_ylabel(f'accuracy − {TIME_BASELINE} (pp, same cell)')
    for ax in (top, bottom):
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return save_png(fig, path)
