"""Latency model benchmark: build time, incremental rebuild, prediction accuracy, saving ranks.

One self-contained command (50-90 minutes on a 2-core CPU, depending on how fast the host runs
that day; MobileNetV2's table takes 14-26 of them)::

  python bench/bench_latency.py

Per model (``resnet8`` -- the quickstart model, ResNet-8 base width 16 --, ``vgg_small``,
``mobilenetv2``, ``resnet20`` from the zoo, and ``branchy``, defined below, outside the zoo:
a concatenation of a conv branch and a depthwise branch, a residual join, max pooling), input
[256, 28, 28, 1] float32:

1. Builds the predictor from scratch in a fresh cache folder and times it (goal for the
   quickstart model: <= 3 min on 2 cores), then builds it again (goal: nothing measured).
2. Measures ``--archs`` random pruned architectures afresh (widths off the probe counts, so the
   fit must interpolate) and compares with the prediction: MAPE (goal <= 8%), Spearman (goal
   >= 0.9). Measures them all once more: the measurement-noise floor, printed beside, with
   the unpruned model's milliseconds in both measurements (a host that changed speed between
   them shows there: ratios cancel a uniform change, not one that hits some kernels only).
3. From one pruned network, the candidate of every prunable group (that group halved, nothing
   else; at most ``--saving_candidates``, evenly spaced groups): predicted saving vs measured
   saving (both relative to the network, timed in the same rounds), Spearman (goal >= 0.9).
   Each candidate is measured in ``--saving_passes`` passes, minutes apart and in shuffled
   company, and compared with their mean; the noise floor printed beside is how well the mean
   of the even passes ranks like the mean of the odd ones (what the protocol agrees with
   itself), and the Spearman against each single pass is printed too.
4. Times ``predict`` (goal < 1 ms, no compilation).
5. Side by side on the same measurements: the same table fitted without fusion regimes (every
   unit one cost per feature, ``fusion_aware=False``): what reading the regimes buys.

Writes ``bench/results/latency_validation_<platform>.json``. The CPU share other processes took
during the measurements is recorded per model (``foreign_load``): CPU figures are only
meaningful when it is low.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ttmpd_jax.fileio import write_json_atomic  # noqa: E402
from ttmpd_jax.latency import (CompilationCounter, LatencyPredictor, LatencyTable,  # noqa: E402
                               Validation, random_architectures, validate)
from ttmpd_jax.latency.structure import round_channels  # noqa: E402
from ttmpd_jax.models import ModelSpec, build_model  # noqa: E402


class Branchy(nn.Module):
  """A model outside the zoo: concatenated conv / depthwise branches, residual join, pooling."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv_bn(y, features, kernel, name, strides=1, groups=1, act=True):
      y = nn.Conv(features, kernel, strides=strides, feature_group_count=groups,
                  use_bias=False, name=name)(y)
      y = nn.BatchNorm(use_running_average=not train, name=name + '_bn')(y)
      return nn.relu(y) if act else y
    x = conv_bn(x, 16, (3, 3), 'stem')
    a = conv_bn(x, 16, (3, 3), 'branch_a')
    b = conv_bn(x, 24, (1, 1), 'branch_b')
    b = conv_bn(b, b.shape[-1], (3, 3), 'branch_b_dw', groups=b.shape[-1])
    y = conv_bn(jnp.concatenate([a, b], axis=-1), 16, (1, 1), 'merge', act=False)
    x = nn.relu(x + y)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = conv_bn(x, 32, (3, 3), 'down', strides=2)
    x = conv_bn(x, 64, (3, 3), 'top')
    return nn.Dense(10, name='head')(x.mean(axis=(1, 2)))


MODELS = {
    'resnet8': ModelSpec('resnet8', 10, {'base_width': 16}),
    'vgg_small': ModelSpec('vgg_small', 10, {}),
    'mobilenetv2': ModelSpec('mobilenetv2', 10, {'width_multiplier': 0.25, 'small_input': True}),
    'resnet20': ModelSpec('resnet20', 10, {'base_width': 16}),
    'branchy': None,
}


def model_and_variables(name: str, image_shape):
  model = Branchy() if MODELS[name] is None else build_model(MODELS[name])
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32), train=False))
  return model, variables


def loadavg() -> str:
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return '?'


def candidates(predictor: LatencyPredictor, base, round_to: int):
  """Every prunable group of ``base`` halved alone (what one search step compares)."""
  s = predictor.structure
  kept = s.kept(base)
  out = []
  for g in s.prunable:
    k = kept[g]
    smaller = max(1, k // 2) if k <= round_to else round_channels(k * 0.5, k, round_to)
    if smaller < k:
      out.append((g, s.group_widths(g, smaller, base)))
  return out


def spread_out(items: list, n: int) -> list:
  """At most ``n`` of ``items``, evenly spaced (all of them when there are few)."""
  if n <= 0 or len(items) <= n:
    return list(items)
  return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def saving_check(predictor: LatencyPredictor, seed: int, round_to: int, repeats: int,
                 passes: int, most: int):
  """Predicted vs measured relative saving of single-group candidates of one network.

  Every candidate is measured ``passes`` times against the network, in passes minutes apart,
  each in a different order (so different company within a round robin): a host whose speed
  changes for minutes at a time moves one pass's savings together, and the mean over passes is
  the estimate of what a candidate saves. The noise floor is the agreement of two halves of the
  passes (the means of the even and the odd passes): what the same protocol agrees with itself.
  """
  s = predictor.structure
  base = s.random_widths(np.random.default_rng(seed), round_to, min_keep=0.6)
  cands = spread_out(candidates(predictor, base, round_to), most)
  widths = [w for _, w in cands]
  base_ms = predictor.predict(base)
  predicted = [1.0 - predictor.predict(w) / base_ms for w in widths]
  rng = np.random.default_rng(seed)
  runs, measured_all = [], []
  for _ in range(passes):
    order = rng.permutation(len(widths))
    results = predictor.measure([widths[i] for i in order], repeats=repeats, reference=base)
    saving = np.empty(len(widths))
    saving[order] = [1.0 - m.ratio for m in results]
    runs.append(saving)
    measured_all += results
  runs = np.stack(runs)
  halves = (runs[0::2].mean(axis=0), runs[1::2].mean(axis=0)) if passes > 1 else (runs[0],) * 2
  single = [Validation(tuple(predicted), tuple(r)).spearman for r in runs]
  return {'validation': Validation(tuple(predicted), tuple(runs.mean(axis=0))),
          'noise': Validation(tuple(halves[0]), tuple(halves[1])),
          'single_spearman': single, 'passes': runs, 'groups': [g for g, _ in cands],
          'measured': measured_all, 'base': base, 'widths': widths}


def one_regime_figures(predictor: LatencyPredictor, archs, measured_ms, saving_base, saving_widths,
                       saving_measured) -> dict:
  """MAPE, Spearman and saving Spearman of the same table fitted without fusion regimes."""
  plain = LatencyPredictor(predictor.structure, predictor.table, predictor.model,
                           predictor.variables, predictor.round_to, log=lambda s: None,
                           fusion_aware=False)
  plain.refit()
  result = Validation(tuple(plain.predict(w) for w in archs), tuple(measured_ms))
  base = plain.predict(saving_base)
  saving = Validation(tuple(1.0 - plain.predict(w) / base for w in saving_widths),
                      tuple(saving_measured))
  return {'mape': result.mape, 'spearman': result.spearman, 'saving_spearman': saving.spearman,
          'predicted_ms': list(result.predicted), 'saving_predicted': list(saving.predicted)}


def mean_load(measured) -> float:
  loads = [m.foreign_load for m in measured if m.foreign_load is not None]
  return float(np.mean(loads)) if loads else float('nan')


def run_model(name: str, index: int, args, cache_dir: str, quiet) -> dict:
  image_shape = (28, 28, 1)
  model, variables = model_and_variables(name, image_shape)
  options = dict(round_to=args.round_to, repeats=args.repeats, log=quiet)
  print(f'\n== {name}  input [{args.batch}, 28, 28, 1] float32  (load average {loadavg()})')
  table = LatencyTable.open(cache_dir=cache_dir, log=quiet)
  t0 = time.perf_counter()
  predictor = LatencyPredictor.from_model(model, variables, (args.batch, *image_shape), table,
                                          **options)
  build_s = time.perf_counter() - t0
  build_load = [b.get('loaded', 0) for b in table.builds[-1:]]
  print(f'build: {table.measured} probes ({len(predictor.structure.units)} units, '
        f'{len(predictor.structure.prunable)} prunable groups) in {build_s:.1f} s'
        + ('  (goal for the quickstart model: <= 180 s on 2 cores)' if index == 0 else '')
        + f'; fit on {predictor.fit.n}, largest in-sample error '
        f'{100 * predictor.fit.max_error:.1f}%')
  again = LatencyTable.open(cache_dir=cache_dir, log=quiet)
  t0 = time.perf_counter()
  LatencyPredictor.from_model(model, variables, (args.batch, *image_shape), again, **options)
  second_s = time.perf_counter() - t0
  print(f'second build from the saved file: {again.measured} probes measured ({second_s:.2f} s)'
        '  (goal: 0)')

  archs = random_architectures(predictor.structure, args.archs, args.arch_round_to,
                               seed=args.seed + 1000 * index, min_channels=args.round_to)
  t0 = time.perf_counter()
  result, first = validate(predictor, archs, repeats=args.repeats)
  second = predictor.measure(archs, repeats=args.repeats)
  keys = [predictor.structure.key_of(w) for w in archs]
  noise = Validation(tuple(m.ratio for m in second), tuple(m.ratio for m in first))
  print(f'validation ({time.perf_counter() - t0:.1f} s, {len(archs)} architectures measured '
        f'twice):')
  print('  arch  predicted_ms  measured_ms   error')
  for i, (p, m) in enumerate(zip(result.predicted, result.measured)):
    print(f'  {i:4d}  {p:12.2f}  {m:11.2f}  {100 * (p - m) / m:+6.1f}%')
  print(f'  {name}: {result.summary()}')
  print(f'  measurement noise (the same architectures measured again): MAPE {noise.mape:.2f}%  '
        f'Spearman {noise.spearman:.3f}')
  ref_first, ref_again = [m.teacher_ms for m in first], [m.teacher_ms for m in second]
  print(f'  the unpruned model in those rounds: {min(ref_first):.2f}-{max(ref_first):.2f} ms, '
        f'then {min(ref_again):.2f}-{max(ref_again):.2f} ms (a shift that the ratios do not '
        'cancel shows as noise above)')
  check = saving_check(predictor, args.seed + 7 + index, args.round_to, args.repeats,
                       args.saving_passes, args.saving_candidates)
  saving, saving_noise, groups = check['validation'], check['noise'], check['groups']
  saving_measured, saving_base, saving_widths = check['measured'], check['base'], check['widths']
  print(f'  single-group candidates ({len(groups)} of {len(predictor.structure.prunable)} groups '
        f'halved from one network, each measured in {args.saving_passes} passes): saving '
        f'Spearman {saving.spearman:.3f} against the mean of the passes  (noise floor: the two '
        f'halves of the passes agree at {saving_noise.spearman:.3f}); against single passes '
        + ' '.join(f'{x:.2f}' for x in check['single_spearman']) + '; predicted vs measured '
        'saving: ' + ', '.join(f'{100 * p:.1f}/{100 * m:.1f}%' for p, m in
                                zip(saving.predicted, saving.measured)))
  plain = one_regime_figures(predictor, archs, result.measured, saving_base, saving_widths,
                             saving.measured)
  print(f'  fusion regimes: {predictor.regimes()}')
  print(f'  the same table without fusion regimes: MAPE {plain["mape"]:.2f}%  Spearman '
        f'{plain["spearman"]:.3f}  saving Spearman {plain["saving_spearman"]:.3f}')
  with CompilationCounter() as counter:
    t0 = time.perf_counter()
    for w in archs:
      predictor.predict(dict(w))
    predictor._memo.clear()  # pylint: disable=protected-access
    for w in archs:
      predictor.predict(dict(w))
    predict_us = 1e6 * (time.perf_counter() - t0) / (2 * len(archs))
  all_measured = first + second + saving_measured
  row = {'n': len(archs), 'mape': result.mape, 'max_ape': result.max_ape,
         'spearman': result.spearman, 'saving_spearman': saving.spearman,
         'saving_n': len(groups), 'noise_mape': noise.mape, 'noise_spearman': noise.spearman,
         'saving_noise_spearman': saving_noise.spearman, 'build_s': build_s,
         'probes': predictor.fit.n, 'second_build_measured': again.measured,
         'second_build_s': second_s, 'predict_us': predict_us,
         'predict_compilations': counter.count,
         'foreign_load': mean_load(all_measured), 'loaded_measurements': sum(
             m.loaded for m in all_measured), 'measurements': len(all_measured),
         'build_loaded_probes': build_load[0] if build_load else 0,
         'build_reference_ms': table.builds[-1].get('reference_ms') if table.builds else None,
         'predicted_ms': list(result.predicted), 'measured_ms': list(result.measured),
         'saving_predicted': list(saving.predicted), 'saving_measured': list(saving.measured),
         'groups': list(predictor.structure.prunable), 'archs_kept': keys,
         'measured_ratio': [m.ratio for m in first], 'measured_ratio_again': [
             m.ratio for m in second], 'teacher_ms': ref_first, 'teacher_ms_again': ref_again,
         'saving_groups': groups,
         'saving_base_kept': predictor.structure.key_of(saving_base),
         'saving_kept': [predictor.structure.key_of(w)
                         for w in saving_widths],
         'saving_passes': check['passes'].tolist(),
         'saving_single_pass_spearman': check['single_spearman'],
         'regimes': predictor.regimes(), 'one_regime': plain}
  print(f'  predict: {predict_us:.0f} us per call, {counter.count} compilations; CPU share '
        f'other processes took: {row["foreign_load"]:.2f}; {row["loaded_measurements"]}/'
        f'{len(all_measured)} measurements flagged loaded')
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(MODELS),
                      help=f'comma-separated, from {",".join(MODELS)}; the first one is timed '
                      'as the quickstart build')
  parser.add_argument('--archs', type=int, default=20, help='random architectures per model')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--round_to', type=int, default=4,
                      help='channel step of the probes (the pruning round_to, default 4)')
  parser.add_argument('--arch_round_to', type=int, default=4,
                      help='channel multiple of the random architectures')
  parser.add_argument('--repeats', type=int, default=10, help='timed rounds per measurement')
  parser.add_argument('--saving_passes', type=int, default=4,
                      help='times each single-group candidate is measured (minutes apart)')
  parser.add_argument('--saving_candidates', type=int, default=12,
                      help='most single-group candidates per model (evenly spaced groups)')
  parser.add_argument('--cache_dir', default=None, help='default: a fresh temporary folder')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='default: bench/results/'
                      'latency_validation_<platform>.json')
  parser.add_argument('--budget_s', type=float, default=None,
                      help='start no further model after this many seconds')
  args = parser.parse_args()

  start = time.perf_counter()
  cache_dir = args.cache_dir or tempfile.mkdtemp(prefix='bench_latency_')
  quiet = lambda s: None  # noqa: E731
  platform = jax.default_backend()
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                 f'latency_validation_{platform}.json')
  table = LatencyTable.open(cache_dir=cache_dir, log=quiet)
  print(f'load average (1/5/15 min) at start: {loadavg()}  cores: {os.cpu_count()}')
  print(f'device key: {table.key}')
  report = {'platform': platform, 'key': table.key, 'batch': args.batch,
            'image_shape': [28, 28, 1], 'round_to': args.round_to, 'repeats': args.repeats,
            'loadavg_start': loadavg(), 'command': ' '.join(sys.argv), 'models': {}}
  for index, name in enumerate(m.strip() for m in args.models.split(',') if m.strip()):
    if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
      print(f'\n(budget of {args.budget_s:.0f} s spent: {name} and later models skipped)')
      break
    report['models'][name] = run_model(name, index, args, cache_dir, quiet)
    report['loadavg_end'] = loadavg()
    report['total_s'] = time.perf_counter() - start
    write_json_atomic(out, report, indent=1)
  print('\nmodel          n   MAPE  Spearman  saving-Spearman | noise: MAPE  Spearman  saving | '
        'one regime: MAPE  Spearman  saving | build_s  load')
  for name, r in report['models'].items():
    o = r['one_regime']
    print(f'{name:12s} {r["n"]:3d} {r["mape"]:5.2f}%  {r["spearman"]:7.3f}  '
          f'{r["saving_spearman"]:14.3f}'
          f'  | {r["noise_mape"]:10.2f}%  {r["noise_spearman"]:8.3f}  '
          f'{r["saving_noise_spearman"]:6.3f} | {o["mape"]:15.2f}%  {o["spearman"]:8.3f}  '
          f'{o["saving_spearman"]:6.3f} | {r["build_s"]:7.1f}  {r["foreign_load"]:.2f}')
  print(f'load average at end: {loadavg()}; total {time.perf_counter() - start:.0f} s; '
        f'written to {out}')


if __name__ == '__main__':
  main()
