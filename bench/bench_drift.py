"""Does one architecture's latency ratio stay put when it is measured again a little later?

One command (about 4 minutes on a quiet 2-core CPU, idle but for 5 s per call)::

  python bench/bench_drift.py

The latency model compares ratios to the unpruned model timed in the same rounds, which cancels a
uniform slowdown of the machine; it does not cancel a change that slows some layers and not
others (a clock change slows compute-bound convolutions and barely touches memory-bound ones).
This benchmark waits ``--idle_s`` seconds with nothing running, then measures the same
architectures ``--calls`` times, ``--pause_s`` apart, each call compiling and timing them afresh
against the unpruned model exactly as a table build or a validation does
(``LatencyPredictor.measure``), and reports per call the unpruned model's milliseconds and
every ratio, then per architecture the range of its ratios across calls. Writes
``bench/results/drift_<platform>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench_latency import MODELS, loadavg, model_and_variables  # noqa: E402
from ttmpd_jax.fileio import write_json_atomic  # noqa: E402
from ttmpd_jax.latency import LatencyPredictor, LatencyTable, random_architectures  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='resnet8', choices=sorted(MODELS))
  parser.add_argument('--archs', type=int, default=6, help='random architectures measured')
  parser.add_argument('--calls', type=int, default=6, help='measurements of them, --pause_s apart')
  parser.add_argument('--pause_s', type=float, default=20.0,
                      help='seconds idle between calls (spreads the calls over minutes)')
  parser.add_argument('--idle_s', type=float, default=60.0,
                      help='seconds to wait idle before the first call')
  parser.add_argument('--round_to', type=int, default=8)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--out', default=None, help='default: bench/results/drift_<platform>.json')
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.default_backend()
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                 f'drift_{platform}.json')
  model, variables = model_and_variables(args.model, (28, 28, 1))
  table = LatencyTable(log=lambda s: None)
  predictor = LatencyPredictor.from_model(model, variables, (args.batch, 28, 28, 1), table,
                                          round_to=args.round_to, build=False,
                                          log=lambda s: None)
  s = predictor.structure
  archs = random_architectures(s, args.archs, args.round_to, seed=7, min_channels=args.round_to)
  keys = [s.key_of(w) for w in archs]
  print(f'{args.model}: {len(archs)} architectures ({", ".join(keys)}); idle {args.idle_s:.0f} s '
        f'first (load average {loadavg()})', flush=True)
  time.sleep(args.idle_s)
  start = time.perf_counter()
  calls = []
  for c in range(args.calls):
    if c:
      time.sleep(args.pause_s)
    measured = predictor.measure(archs)
    calls.append({'t_s': time.perf_counter() - start, 'teacher_ms': measured[0].teacher_ms,
                  'ratios': [m.ratio for m in measured], 'ms': [m.ms for m in measured],
                  'foreign_load': measured[0].foreign_load})
    print(f'call {c} at {calls[-1]["t_s"]:5.1f} s: unpruned {measured[0].teacher_ms:6.2f} ms; '
          'ratios ' + ' '.join(f'{m.ratio:.3f}' for m in measured), flush=True)
  ratios = np.array([c['ratios'] for c in calls])
  teacher = np.array([c['teacher_ms'] for c in calls])
  print('\narchitecture        ratio min   max   range (% of mean)')
  for k, col in zip(keys, ratios.T):
    print(f'{k:20s} {col.min():6.3f} {col.max():6.3f}  {100 * np.ptp(col) / col.mean():5.1f}')
  print(f'unpruned model: {teacher.min():.2f} .. {teacher.max():.2f} ms '
        f'({100 * np.ptp(teacher) / teacher.mean():.1f}%)')
  write_json_atomic(out, {'platform': platform, 'key': table.key, 'model': args.model,
                          'command': ' '.join(sys.argv), 'archs_kept': keys,
                          'idle_s': args.idle_s, 'pause_s': args.pause_s, 'calls': calls,
                          'ratio_range_pct': [float(100 * np.ptp(c) / c.mean())
                                              for c in ratios.T],
                          'teacher_range_pct': float(100 * np.ptp(teacher) / teacher.mean()),
                          'loadavg_end': loadavg()}, indent=1)
  print(f'written to {out}')


if __name__ == '__main__':
  main()
