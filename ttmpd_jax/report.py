"""Report helpers: the accuracy–latency trade-off plot and the benchmark table."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ttmpd_jax.fileio import atomic_path

MARKERS = {'ttmpd': ('*', 'tab:red'), 'ttmpd_shortlist': ('X', 'tab:pink'),
           'netadapt': ('s', 'tab:blue'),
           'eagleeye': ('^', 'tab:green'), 'halp': ('D', 'tab:purple'),
           'uniform': ('v', 'tab:gray'), 'teacher': ('o', 'black'),
           'teacher_bn': ('P', 'tab:orange')}


def plot_tradeoff(runs: Sequence[Mapping[str, Any]], path: str,
                  title: Optional[str] = None) -> str:
  """Accuracy vs measured latency ratio, one marker per method (and KD mode), one panel per dataset.

  The x axis is each model's latency divided by the teacher's, both measured in the same
  interleaved timing run: robust to machine load, unlike raw milliseconds. TT-MPD's iteration
  trajectory (predicted ratio, accuracy after each short-term fine-tuning on a test subset) is
  drawn as a line when the runs carry it. Written atomically (PNG, mode 0666 minus umask).
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  datasets = sorted({r['dataset'] for r in runs})
  fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 4.6), squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    for run in (r for r in runs if r['dataset'] == dataset):
      marker, color = MARKERS.get(run['method'], ('x', 'tab:brown'))
      label = run['method'] if run.get('latency_target', 1.0) >= 1.0 else \
          f'{run["method"]} ({run["kd"]} KD)'
      face = color if run.get('kd', 'cached') == 'cached' else 'none'
      ax.scatter(run['latency_ratio'], 100 * run['accuracy'], marker=marker, s=110,
                 facecolors=face, edgecolors=color, label=label, zorder=3)
      traj = [p for p in run.get('trajectory') or [] if p.get('accuracy_short_term') is not None]
      if len(traj) > 1:   # Iterative methods: accuracy after each short-term fine-tuning.
        ax.plot([p['latency_ratio_predicted'] for p in traj],
                [100 * p['accuracy_short_term'] for p in traj], '--', color=color, alpha=0.6,
                marker='.', label=f'{run["method"]} trajectory ({run["kd"]}; predicted '
                'latency, short-term FT)')
    target = next((r['latency_target'] for r in runs
                   if r['dataset'] == dataset and r['latency_target'] < 1), None)
    if target:
      ax.axvline(target, color='gray', lw=0.8, ls=':', label='latency target')
    ax.set_xlabel('measured latency / teacher latency')
    ax.set_ylabel('accuracy on the shifted test set (%)')
    ax.set_title(dataset)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='best')
  if title:
    fig.suptitle(title)
  return save_png(fig, path)


def save_png(fig, path: str) -> str:
  """Lays out ``fig``, writes it atomically as a PNG at ``path`` and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  try:
    with atomic_path(path, suffix='.png') as tmp:
      fig.savefig(tmp, dpi=120, format='png')
  finally:
    plt.close(fig)
  return path
