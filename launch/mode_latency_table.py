"""--mode=latency_table: build/update the per-device latency table for a model and validate it.

Measures only the probe architectures not cached yet (in context: the model itself, pruned),
saves the table (``--latency_cache_dir``/latency/<device>_<platform>_jax<version>_<hash>.json, or
``--latency_table``), fits the unit costs, checks them against a fresh measurement
(``--latency_verify``), then measures ``--latency_validate`` random pruned architectures afresh
and prints predicted vs measured latency (MAPE, Spearman).

Other modes get a ready predictor from the same flags with :func:`predictor_from_flags`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

from absl import flags

from launch import common
from ttmpd_jax import checkpoint
from ttmpd_jax.errors import UserError
from ttmpd_jax.latency import LatencyPredictor, LatencyTable, random_architectures, validate
from ttmpd_jax.latency.table import warn_if_busy
from ttmpd_jax.models import ModelSpec

FLAGS = flags.FLAGS
MODES = ('latency_table',)

flags.DEFINE_integer('latency_batch', 256, 'Batch size at which latency is measured/predicted.')
flags.DEFINE_enum('latency_dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                  'Compute dtype for latency measurements.')
flags.DEFINE_integer('latency_round_to', 8, 'Channel step of the latency table grid (use the '
                     'pruning round-to multiple).')
flags.DEFINE_integer('latency_max_grid_points', 3, 'Group probes per prunable group: the full '
                     'model with that group narrowed to 1/(n+1), ..., n/(n+1) of its channels.')
flags.DEFINE_integer('latency_random_probes', None, 'Randomly pruned probe architectures in '
                     'the table (default: enough for 96 probes in all, at least max(8, '
                     'prunable groups / 2)).')
flags.DEFINE_integer('latency_repeats', 10, 'Timed calls per probe measurement (median of the '
                     'per-round ratios to the unpruned model).')
flags.DEFINE_bool('latency_fusion', True, 'Cost every layer separately inside and outside library '
                  'fusion regions (regimes read from each probe\'s compiled HLO); false: one cost '
                  'per layer feature, blind to fusion.')
flags.DEFINE_integer('latency_warmup', 2, 'Untimed calls per probe after compiling.')
flags.DEFINE_integer('latency_model_repeats', 15, 'Timed calls per validation measurement.')
flags.DEFINE_bool('latency_verify', True, 'After building, measure the unpruned model and two '
                  'probes afresh and refit when they disagree with the table (stale tables).')
flags.DEFINE_string('latency_cache_dir', os.environ.get('TTMPD_CACHE_DIR', '~/.cache/ttmpd_jax'),
                    'Cache folder; the table lives in <dir>/latency/ (one file per device kind, '
                    'platform, JAX version and XLA_FLAGS).')
flags.DEFINE_string('latency_table', None, 'Explicit latency table file (overrides '
                    '--latency_cache_dir). Refused if measured on another device, JAX version '
                    'or XLA_FLAGS.')
flags.DEFINE_enum('latency_on_corrupt', 'rebuild', ['rebuild', 'error'],
                  'What to do with a corrupted table file: move it aside and rebuild, or stop.')
flags.DEFINE_string('latency_fit', None, 'Deprecated and ignored: the latency model is now '
                    'fitted on in-context probes of the model (kept so old flag files run).')
flags.DEFINE_integer('latency_validate', 10, 'Random pruned architectures to validate the '
                     'predictor on (measured afresh; 0 to skip).')

for _name in ('latency_batch', 'latency_round_to', 'latency_repeats', 'latency_model_repeats',
              'latency_random_probes', 'latency_max_grid_points'):
  flags.register_validator(_name, lambda v: v is None or v > 0, f'--{_name} must be positive')
flags.register_validator('latency_warmup', lambda v: v >= 0, '--latency_warmup must be >= 0')
flags.register_validator('latency_validate', lambda v: v >= 0, '--latency_validate must be >= 0')


def model_for_latency(ctx: common.Context) -> tuple[ModelSpec, tuple[int, ...]]:
  """The (possibly pruned) model spec and image shape the flags describe; needs no weights."""
  if FLAGS.checkpoint:
    meta = checkpoint.load_meta(ctx.checkpoint_flag_path())
    return meta.spec, tuple(meta.image_shape)
  test_set = ctx.clean_test_set()
  return ctx.requested_spec(test_set.num_classes), tuple(test_set.image_shape)


def open_table(log=common.log) -> LatencyTable:
  return LatencyTable.open(path=FLAGS.latency_table, cache_dir=FLAGS.latency_cache_dir,
                           on_corrupt=FLAGS.latency_on_corrupt, log=log)


def predictor_from_flags(model: Any, variables_or_image_shape: Any,
                         image_shape: Optional[Sequence[int]] = None,
                         table: Optional[LatencyTable] = None, calibrate: bool = True,
                         log=common.log) -> LatencyPredictor:
  """A fitted predictor for ``(spec, image_shape)`` or ``(model, variables, image_shape)``.

  Builds missing table entries and saves the table; with ``calibrate`` (and --latency_verify)
  checks it against a fresh measurement of the unpruned model.
  """
  table = table if table is not None else open_table(log)
  options = dict(round_to=FLAGS.latency_round_to, dtype=FLAGS.latency_dtype,
                 random_probes=FLAGS.latency_random_probes,
                 probes_per_group=FLAGS.latency_max_grid_points, repeats=FLAGS.latency_repeats,
                 warmup=FLAGS.latency_warmup, log=log, fusion_aware=FLAGS.latency_fusion)
  if isinstance(model, ModelSpec):
    predictor = LatencyPredictor.from_spec(model, tuple(variables_or_image_shape),
                                           FLAGS.latency_batch, table, **options)
  else:
    if image_shape is None:
      raise UserError('predictor_from_flags(model, variables, image_shape): image_shape missing')
    predictor = LatencyPredictor.from_model(model, variables_or_image_shape,
                                            (FLAGS.latency_batch, *image_shape), table, **options)
  if calibrate and FLAGS.latency_verify:
    predictor.verify()
  table.save()
  return predictor


def run(ctx: common.Context, mode: str) -> None:
  del mode
  ctx.preflight(report='latency_table_report.json', source=False, data=not FLAGS.checkpoint,
                shifted=False, latency=True)
  spec, image_shape = model_for_latency(ctx)
  table = open_table()
  common.log(f'latency table {table.path}: {len(table)} entries cached '
             f'({", ".join(f"{k}={v}" for k, v in table.key.items())})')
  common.log(f'model {spec.name} {dict(spec.kwargs)} on [{FLAGS.latency_batch}, '
             f'{", ".join(map(str, image_shape))}] {FLAGS.latency_dtype}, '
             f'round_to={FLAGS.latency_round_to}')
  warn_if_busy(common.log)
  start = time.perf_counter()
  predictor = predictor_from_flags(spec, image_shape, table=table, calibrate=False)
  table_s = time.perf_counter() - start
  common.log(f'table: {table.measured} new entries measured in {table_s:.1f} s '
             f'({len(table)} in the file); fit on {predictor.fit.n} probes, largest error '
             f'{100 * predictor.fit.max_error:.1f}%')
  verified = False
  if FLAGS.latency_verify:
    verified = predictor.verify()
    table.save()
    common.log('verification against a fresh measurement: '
               + ('refitted' if verified else 'agrees with the table'))
  full_ms = predictor.predict()
  common.log(f'predicted latency of the full model: {full_ms:.2f} ms')

  report: dict[str, Any] = {
      'mode': 'latency_table', 'table': table.path, 'key': table.key, 'spec': spec.to_json(),
      'image_shape': list(image_shape), 'batch': FLAGS.latency_batch,
      'dtype': FLAGS.latency_dtype, 'round_to': FLAGS.latency_round_to,
      'entries': len(table), 'measured_entries': table.measured, 'table_seconds': table_s,
      'fit': {'probes': predictor.fit.n, 'max_error': predictor.fit.max_error,
              'constant': predictor.fit.constant, 'anchor_ms': predictor.anchor_ms,
              'scale': predictor.scale, 'refitted_by_verification': verified},
      'full_model_predicted_ms': full_ms, 'flags': common.flag_values_for_report()}
  if FLAGS.latency_validate:
    archs = random_architectures(predictor.structure, FLAGS.latency_validate,
                                 FLAGS.latency_round_to, seed=ctx.seed + 1)
    common.log(f'validating on {len(archs)} random pruned architectures (measured afresh)...')
    result, measured = validate(predictor, archs, repeats=FLAGS.latency_model_repeats)
    rows = [[i, f'{p:.2f}', f'{m:.2f}', f'{100 * (p - m) / m:+.1f}%']
            for i, (p, m) in enumerate(zip(result.predicted, result.measured))]
    print()
    print(common.format_table(['arch', 'predicted ms', 'measured ms', 'error'], rows))
    print()
    common.log(f'validation: {result.summary()}')
    report['validation'] = {'mape_percent': result.mape, 'spearman': result.spearman,
                            'predicted_ms': list(result.predicted),
                            'measured_ms': list(result.measured), 'widths': archs,
                            'loaded': [m.loaded for m in measured]}
  ctx.write_report(report, 'latency_table_report.json')
