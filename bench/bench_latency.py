"""Latency model benchmark: table build time, incremental rebuild, prediction accuracy and speed.

One self-contained command (a few minutes on 2 CPU cores)::

  python bench/bench_latency.py

1. Builds the latency table of the quickstart model (ResNet-8, base width 16, Fashion-MNIST
   28x28x1, batch 256) from scratch in a fresh cache folder and times it (goal: <= 2 min on
   2 cores), then builds it again (goal: nothing new measured).
2. Builds the table of a second, structurally different model (default: VGG-small: no
   residuals, flatten into a Dense layer) in the same table.
3. Calibrates each predictor (full model, 3 uniformly and 6 randomly pruned architectures).
4. Measures random pruned architectures of both models afresh (default 20 + 20, including
   channel counts off the table grid, so interpolation is exercised) and prints predicted vs
   measured latency, MAPE (goal <= 10%) and Spearman rank correlation (goal >= 0.9), per model
   and pooled; then measures them all once more, so the run-to-run measurement noise (the
   floor no predictor can beat) is printed beside the errors.
5. Times ``predict`` (goal: far below a millisecond, no compilation).

The machine load (``/proc/loadavg``) is printed before and after: CPU timings on a shared
machine are only meaningful when it is low.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from ttmpd_jax.latency import (FITS, CompilationCounter, LatencyPredictor,  # noqa: E402
                               LatencyTable, Validation, fit_calibration, random_architectures,
                               validate)
from ttmpd_jax.models import ModelSpec  # noqa: E402

MODELS = {
    'resnet8': ModelSpec('resnet8', 10, {'base_width': 16}),
    'resnet20': ModelSpec('resnet20', 10, {'base_width': 16}),
    'vgg_small': ModelSpec('vgg_small', 10, {}),
    'mobilenetv2': ModelSpec('mobilenetv2', 10, {'width_multiplier': 0.25, 'small_input': True}),
}


def loadavg() -> str:
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return '?'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='resnet8,vgg_small',
                      help=f'comma-separated, from {",".join(MODELS)}; the first one is timed '
                      'as the quickstart table build')
  parser.add_argument('--archs', type=int, default=20, help='random architectures per model')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--round_to', type=int, default=8, help='table grid step')
  parser.add_argument('--arch_round_to', type=int, default=4,
                      help='channel multiple of the random architectures (< round_to puts '
                      'some widths between grid points; never fewer than round_to channels, '
                      'as pruning rounds to round_to)')
  parser.add_argument('--repeats', type=int, default=20,
                      help='timed calls per end-to-end model measurement')
  parser.add_argument('--cache_dir', default=None, help='default: a fresh temporary folder')
  parser.add_argument('--fit', default='affine', choices=FITS)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--recalibrate', action=argparse.BooleanOptionalAction, default=True,
                      help='re-measure the calibration architectures interleaved with the '
                      'validation ones (same background load) and re-fit before predicting')
  args = parser.parse_args()

  start_all = time.perf_counter()
  cache_dir = args.cache_dir or tempfile.mkdtemp(prefix='bench_latency_')
  quiet = lambda s: None  # noqa: E731
  print(f'load average (1/5/15 min) at start: {loadavg()}  cores: {os.cpu_count()}')
  table = LatencyTable.open(cache_dir=cache_dir, log=quiet)
  print(f'device key: {table.key}')
  print(f'table file: {table.path}')

  names = [m.strip() for m in args.models.split(',') if m.strip()]
  results: dict[str, Validation] = {}
  noise: dict[str, Validation] = {}
  for index, name in enumerate(names):
    spec = MODELS[name]
    print(f'\n== {name} {dict(spec.kwargs)}  input [{args.batch}, 28, 28, 1] float32')
    before = table.measured
    t0 = time.perf_counter()
    predictor = LatencyPredictor.build(spec, (28, 28, 1), args.batch, table,
                                       round_to=args.round_to)
    build_s = time.perf_counter() - t0
    print(f'table build: {table.measured - before} entries measured in {build_s:.1f} s'
          + ('  (goal for the quickstart model: <= 120 s on 2 cores)' if index == 0 else ''))
    t0 = time.perf_counter()
    calibration = predictor.calibrate(fit=args.fit, repeats=args.repeats)
    print(f'calibration ({calibration.fit}, {len(calibration.points)} architectures, '
          f'{time.perf_counter() - t0:.1f} s): measured ~ {calibration.describe()}')
    if index == 0:
      again = LatencyTable.open(cache_dir=cache_dir, log=quiet)
      t0 = time.perf_counter()
      predictor_again = LatencyPredictor.build(spec, (28, 28, 1), args.batch, again,
                                               round_to=args.round_to)
      predictor_again.calibrate(fit=args.fit, repeats=args.repeats)
      print(f'second build from the saved file: {again.measured} entries and '
            f'{again.measured_end_to_end} end-to-end latencies measured '
            f'({time.perf_counter() - t0:.2f} s)  (goal: 0 and 0)')

    archs = random_architectures(predictor.structure, args.archs, args.arch_round_to,
                                 seed=args.seed + 1000 * index, min_channels=args.round_to)
    t0 = time.perf_counter()
    result = validate(predictor, archs, repeats=args.repeats, recalibrate=args.recalibrate,
                      fit=args.fit)
    results[name] = result
    c = predictor.calibration
    print(f'validation ({time.perf_counter() - t0:.1f} s'
          + (f'; calibration re-measured alongside: {c.describe()}' if args.recalibrate else '')
          + '):')
    print('  arch  predicted_ms  measured_ms   error')
    for i, (p, m) in enumerate(zip(result.predicted_ms, result.measured_ms)):
      print(f'  {i:4d}  {p:12.2f}  {m:11.2f}  {100 * (p - m) / m:+6.1f}%')
    print(f'  {name}: {result.summary()}')
    again = predictor.measure_end_to_end(archs, args.repeats, use_cache=False, group=16)
    noise[name] = Validation(tuple(again), result.measured_ms)
    print(f'  measurement noise (the same architectures measured again vs the first time): '
          f'MAPE {noise[name].mape:.2f}%  Spearman {noise[name].spearman:.3f}')
    if args.recalibrate:  # The other calibration fits, on exactly the same measurements.
      points = c.points
      for fit in FITS:
        if fit == args.fit:
          continue
        other = fit_calibration([p[:2] for p in points], [p[2] for p in points], fit, quiet)
        alt = Validation(tuple(other.apply(*predictor.path_sums_ms(w)) for w in archs),
                         result.measured_ms)
        print(f'  (fit={fit}: {alt.summary()}; {other.describe()})')

    with CompilationCounter() as counter:
      t0 = time.perf_counter()
      n = 0
      for _ in range(20):
        for widths in archs:
          predictor.predict(widths)
          n += 1
      predict_us = (time.perf_counter() - t0) / n * 1e6
    fresh = random_architectures(predictor.structure, 50, args.arch_round_to, seed=99,
                                 min_channels=args.round_to)
    t0 = time.perf_counter()
    for widths in fresh:
      predictor.predict(widths)
    fresh_us = (time.perf_counter() - t0) / max(len(fresh), 1) * 1e6
    print(f'  predict: {predict_us:.1f} us per call (memoised), {fresh_us:.1f} us on unseen '
          f'architectures; {counter.count} compilations')

  pooled_p = [p for r in results.values() for p in r.predicted_ms]
  pooled_m = [m for r in results.values() for m in r.measured_ms]
  pooled = Validation(tuple(pooled_p), tuple(pooled_m))
  print('\n== summary')
  for name, r in results.items():
    print(f'  {name:12s} MAPE {r.mape:6.2f}%  Spearman {r.spearman:.3f}  (n={len(r.measured_ms)})'
          f'   measurement noise: MAPE {noise[name].mape:.2f}%  Spearman '
          f'{noise[name].spearman:.3f}')
  print(f'  {"pooled":12s} MAPE {pooled.mape:6.2f}%  Spearman {pooled.spearman:.3f}  '
        f'(n={len(pooled_m)})   goals: MAPE <= 10%, Spearman >= 0.9')
  print(f'load average at end: {loadavg()}; total {time.perf_counter() - start_all:.0f} s')
  print('GPU/TPU: not measured here (no accelerator available to this run).')


if __name__ == '__main__':
  main()
