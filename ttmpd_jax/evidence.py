"""Benchmark evidence: means with 95% confidence intervals, paired differences, the grid plot.

``summarize(runs)`` turns the rows of a benchmark grid (one per model, dataset, seed, method) into
one row per (model, method). Design choices: a *cell* is (model, dataset, seed, kd); intervals
are Student-t intervals of the mean over cells (``None`` with fewer than two); paired differences
compare two methods on the cells both finished, so shift and seed effects cancel; the time ratio
to NetAdapt is computed per cell, then averaged.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

# What the summary compares (reporting choices, not method behaviour): paired accuracy
# differences, and the method whose prune + fine-tune time is the unit of the time ratio.
PAIRS = (('ttmpd', 'netadapt'), ('ttmpd', 'eagleeye'))
TIME_BASELINE = 'netadapt'


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
  diffs = [100 * (left[c]['accuracy'] - right[c]['accuracy']) for c in left if c in right]
  mean, ci = mean_ci95(diffs)
  return {'n': len(diffs), 'mean': mean, 'ci95': ci}


def _summary_row(runs, model: str, method: str) -> dict[str, Any]:
  rows = [r for r in _of(runs, model) if r['method'] == method]
  netadapt = _by_cell(_of(runs, model), TIME_BASELINE)
  ratios = [r['prune_finetune_s'] / netadapt[cell_of(r)]['prune_finetune_s'] for r in rows
            if cell_of(r) in netadapt and netadapt[cell_of(r)]['prune_finetune_s'] > 0]
  out: dict[str, Any] = {'model': model, 'method': method, 'n': len(rows)}
  for key, values in (('accuracy', [r['accuracy'] for r in rows]),
                      ('latency_ratio', [r['latency_ratio'] for r in rows]),
                      ('prune_finetune_s', [r['prune_finetune_s'] for r in rows]),
                      ('time_ratio_to_netadapt', ratios)):
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
      summary.append(row)
  return summary


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
            'time / NetAdapt', 'archs', 'paired vs NetAdapt pp', 'paired vs EagleEye pp']
  rows = []
  for s in summary:
    pair = lambda key: _fmt_ci(s[key]['mean'], s[key]['ci95']) if key in s else ''
    rows.append([str(s['model']), s['method'], str(s['n']),
                 _fmt_ci(s['accuracy_mean'], s['accuracy_ci95'], 100),
                 _fmt_ci(s['latency_ratio_mean'], s['latency_ratio_ci95'], 1, 3),
                 f'{s["met_target"]}/{s["n"]}',
                 _fmt_ci(s['prune_finetune_s_mean'], s['prune_finetune_s_ci95'], 1, 0),
                 _fmt_ci(s['time_ratio_to_netadapt_mean'], s['time_ratio_to_netadapt_ci95']),
                 str(s['distinct_architectures']), pair('ttmpd_minus_netadapt_pp'),
                 pair('ttmpd_minus_eagleeye_pp')])
  return header, rows


def plot_grid(summary: Sequence[Mapping[str, Any]], path: str, title: str = '') -> str:
  """Accuracy vs prune+fine-tune time, error bars = 95% CIs, one point per (model, method)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from ttmpd_jax.report import MARKERS, save_png
  models = sorted({s['model'] for s in summary}, key=str)
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
  for ax, model in zip(axes[0], models):
    for s in (s for s in summary if s['model'] == model and s['prune_finetune_s_mean']):
      marker, color = MARKERS.get(s['method'], ('o', 'black'))
      err = lambda mean, ci, k=1.0: None if ci is None else [[k * (mean - ci[0])],
                                                             [k * (ci[1] - mean)]]
      ax.errorbar(s['prune_finetune_s_mean'], 100 * s['accuracy_mean'],
                  xerr=err(s['prune_finetune_s_mean'], s['prune_finetune_s_ci95']),
                  yerr=err(s['accuracy_mean'], s['accuracy_ci95'], 100), fmt=marker,
                  color=color, capsize=3, label=f'{s["method"]} (n={s["n"]})')
    ax.set_xlabel('prune + fine-tune time (s)')
    ax.set_ylabel('accuracy on the shifted test set (%)')
    ax.set_title(str(model))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return save_png(fig, path)
