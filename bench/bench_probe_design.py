"""How many probes the latency model needs: accuracy on held-out architectures vs the design size.

One command (about 4 minutes per model on a quiet 2-core CPU)::

  python bench/bench_probe_design.py --models resnet8,vgg_small

Per model, input [256, 28, 28, 1] float32, channels in steps of 8:

1. Builds the predictor's full default design in a fresh cache folder (the structured part --
   the full model, group probes, uniform prunings -- and its random fill, ``MIN_PROBES``).
2. Measures ``--heldout`` further random architectures (none in the design) twice, in the same
   session: the second measurement gives the noise floor.
3. Fits on the structured part plus the first ``n`` random probes of the design, for growing
   ``n``, and predicts the held-out architectures: MAPE and Spearman of the ratio to the
   unpruned model (both sides timed in the same rounds, so no re-anchoring enters).
4. Fits on everything measured (design + held-out): its in-sample MAPE is what the additive
   form can reach on this data at all.

Writes ``bench/results/probe_design_<platform>.json`` and, with ``--plot``, a figure of the
curve. Timing: nothing else may run meanwhile (the load is recorded).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench_latency import loadavg, model_and_variables  # noqa: E402
from ttmpd_jax.fileio import write_json_atomic  # noqa: E402
from ttmpd_jax.latency import (LatencyPredictor, LatencyTable, Validation,  # noqa: E402
                               random_architectures)

HELDOUT_SEED = 50_000


def curve(predictor: LatencyPredictor, base, random, heldout, ratios, fills):
  """Per fill size: held-out MAPE, max error and Spearman of the predicted ratios."""
  rows = []
  for n in fills:
    predictor.refit(only=base + random[:n])
    result = Validation(tuple(predictor.predict_ratio(w) for w in heldout), tuple(ratios))
    rows.append({'random': n, 'probes': len(base) + n, 'mape': result.mape,
                 'max_ape': result.max_ape, 'spearman': result.spearman})
    print(f'  {len(base) + n:4d} probes ({n:3d} random): {result.summary()}', flush=True)
  return rows


def run_model(name: str, index: int, args, cache_dir: str) -> dict:
  model, variables = model_and_variables(name, (28, 28, 1))
  print(f'\n== {name}  (load average {loadavg()})', flush=True)
  table = LatencyTable.open(cache_dir=cache_dir, log=lambda s: None)
  t0 = time.perf_counter()
  predictor = LatencyPredictor.from_model(model, variables, (args.batch, 28, 28, 1), table,
                                          round_to=args.round_to, log=lambda s: None)
  build_s = time.perf_counter() - t0
  base, random = predictor.design_parts()
  print(f'design: {len(base)} structured + {len(random)} random probes, built in {build_s:.1f} s',
        flush=True)
  s = predictor.structure
  heldout = random_architectures(s, args.heldout, args.round_to, seed=HELDOUT_SEED + index,
                                 min_channels=args.round_to)
  design_keys = {s.key_of(w) for w in base + random}
  heldout = [w for w in heldout if s.key_of(w) not in design_keys]
  t0 = time.perf_counter()
  first = predictor.measure(heldout)
  second = predictor.measure(heldout)
  noise = Validation(tuple(m.ratio for m in second), tuple(m.ratio for m in first))
  print(f'held-out: {len(heldout)} architectures measured twice in {time.perf_counter() - t0:.1f} '
        f's; noise floor MAPE {noise.mape:.2f}%  Spearman {noise.spearman:.3f}', flush=True)
  ratios = [m.ratio for m in first]
  fills = sorted({n for n in range(0, len(random) + 1, args.step)} | {len(random)})
  rows = curve(predictor, base, random, heldout, ratios, fills)
  for m in first:    # In the table only now: the curve above never saw them.
    table.put(predictor.entry_key(m.widths), m.entry('heldout'))
  predictor.refit(only=base + random + heldout)
  limit = Validation(tuple(predictor.predict_ratio(w) for w in heldout), tuple(ratios))
  design_fit = Validation(tuple(predictor.predict_ratio(w) for w in base + random),
                          tuple(table.get(predictor.entry_key(w))['ratio']
                                for w in base + random))
  everything = Validation(limit.predicted + design_fit.predicted,
                          limit.measured + design_fit.measured)
  print(f'  fitted on all {len(everything.measured)} measurements (in-sample): '
        f'{everything.summary()}', flush=True)
  loads = [m.foreign_load for m in first + second if m.foreign_load is not None]
  return {'structured': len(base), 'random': len(random), 'build_s': build_s,
          'heldout': len(heldout), 'noise_mape': noise.mape, 'noise_spearman': noise.spearman,
          'curve': rows, 'in_sample_mape': everything.mape,
          'in_sample_spearman': everything.spearman,
          'foreign_load': float(np.mean(loads)) if loads else None,
          'heldout_kept': [s.key_of(w) for w in heldout], 'heldout_ratio': ratios,
          'heldout_ratio_again': [m.ratio for m in second]}


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in report['models'].items():
    probes = [c['probes'] for c in r['curve']]
    line, = ax.plot(probes, [c['mape'] for c in r['curve']], marker='o', label=name)
    ax.axhline(r['noise_mape'], color=line.get_color(), ls=':', lw=1)
    ax.axhline(r['in_sample_mape'], color=line.get_color(), ls='--', lw=1)
  ax.axhline(8, color='k', lw=0.8)
  ax.set_xlabel('probes in the design (structured + random fill)')
  ax.set_ylabel('held-out MAPE, %')
  ax.set_title('latency model vs design size (dotted: noise floor, dashed: in-sample on all)',
               fontsize=8)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='resnet8,vgg_small')
  parser.add_argument('--heldout', type=int, default=60, help='held-out random architectures')
  parser.add_argument('--step', type=int, default=12, help='random probes added per point')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--round_to', type=int, default=8)
  parser.add_argument('--cache_dir', default=None, help='default: a fresh temporary folder')
  parser.add_argument('--out', default=None,
                      help='default: bench/results/probe_design_<platform>.json')
  parser.add_argument('--plot', default=None, help='optional PNG of the curves')
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.default_backend()
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                 f'probe_design_{platform}.json')
  cache_dir = args.cache_dir or tempfile.mkdtemp(prefix='bench_probe_design_')
  start = time.perf_counter()
  report = {'platform': platform, 'command': ' '.join(sys.argv), 'loadavg_start': loadavg(),
            'models': {}}
  for index, name in enumerate(m.strip() for m in args.models.split(',') if m.strip()):
    report['models'][name] = run_model(name, index, args, cache_dir)
    report['loadavg_end'] = loadavg()
    report['total_s'] = time.perf_counter() - start
    write_json_atomic(out, report, indent=1)
  if args.plot:
    plot(report, args.plot)
  print(f'\nwritten to {out}; total {time.perf_counter() - start:.0f} s; load average at end '
        f'{loadavg()}')


if __name__ == '__main__':
  main()
