"""--mode=prune (one method) and --mode=benchmark (methods side by side) on shifted test sets."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
from absl import flags

from launch import common, mode_evaluate
from launch.mode_latency_table import predictor_from_flags
from ttmpd_jax import checkpoint
from ttmpd_jax.errors import UserError
from ttmpd_jax.report import plot_tradeoff
from ttmpd_jax.search import harness
from ttmpd_jax.search.config import METHODS, SearchConfig, check_method
from ttmpd_jax.search.proxy import LinearAccuracyModel, spearman
from ttmpd_jax.search.scoring import IMPORTANCE_CRITERIA

FLAGS = flags.FLAGS
MODES = ('prune', 'benchmark')

flags.DEFINE_string('method', 'ttmpd', f'Pruning method for --mode=prune: {", ".join(METHODS)}.')
flags.DEFINE_list('methods', ['ttmpd', 'netadapt', 'eagleeye', 'halp', 'uniform', 'teacher',
                              'teacher_bn'], 'Methods compared by --mode=benchmark.')
flags.DEFINE_string('kd', 'cached', 'KD mode for --mode=prune: cached (pseudo labels computed '
                    'once) or online (teacher on every batch).')
flags.DEFINE_list('kd_modes', ['cached'], 'KD modes compared by --mode=benchmark.')
flags.DEFINE_float('latency_target', 0.5, 'Target latency as a fraction of the teacher\'s.')
flags.DEFINE_float('r0', 0.1, 'First iteration asks for a saving of r0 * L0.')
flags.DEFINE_float('decay', 0.96, 'Per-iteration decay of the requested saving.')
flags.DEFINE_integer('round_to', 4, 'Kept channel counts are multiples of this (the latency '
                     'table grid follows it unless --latency_round_to is given).')
flags.DEFINE_integer('max_iterations', 40, 'Safety stop of the iterative search.')
flags.DEFINE_float('finetune_fraction', 0.1, 'Fine-tuning subset S: a fraction of the shifted '
                   'test set, or a sample count when > 1.')
flags.DEFINE_float('heldout_fraction', 0.25, 'Part of S held out to judge candidates.')
flags.DEFINE_integer('bn_batches', 4, 'Adaptive-BN batches per candidate evaluation.')
flags.DEFINE_integer('bn_batch_size', 128, 'Adaptive-BN batch size.')
flags.DEFINE_integer('calibration_iterations', 1, 'TT-MPD fine-tunes the candidates of this many '
                     'first iterations to fit the accuracy model.')
flags.DEFINE_integer('calibration_candidates', 0, 'Candidates fine-tuned per calibration '
                     'iteration (0: all).')
flags.DEFINE_integer('short_term_steps', 30, 'KD steps of each short-term fine-tuning.')
flags.DEFINE_integer('long_term_steps', 300, 'KD steps of the final long-term fine-tuning.')
flags.DEFINE_float('short_term_lr', 0.01, 'Short-term KD learning rate (constant).')
flags.DEFINE_float('long_term_lr', 0.01, 'Long-term KD learning rate (cosine decay).')
flags.DEFINE_integer('kd_batch_size', 128, 'KD fine-tuning batch size.')
flags.DEFINE_float('temperature', 1.0, 'KD temperature.')
flags.DEFINE_float('hard_weight', 0.0, 'Weight of the hard pseudo-label cross-entropy term.')
flags.DEFINE_enum('importance', 'l2', IMPORTANCE_CRITERIA, 'Channel importance within a group.')
flags.DEFINE_bool('teacher_bn_adapt', True, 'Adapt the teacher\'s BatchNorm statistics to the '
                  'shifted test set before labelling and pruning (test-time BN adaptation).')
flags.DEFINE_bool('resume', True, 'Continue a killed run from its last finished iteration.')
flags.DEFINE_list('source_eval_corruptions', [], 'Before pruning, print the source model\'s '
                  'accuracy on the clean test split and on these corruptions (at --severities).')
flags.DEFINE_integer('trajectory_eval_limit', 2000, 'Test samples used to report accuracy along '
                     'the search trajectory (0: skip; reporting only, not timed).')


flags.register_validator('source_eval_corruptions', common.check_corruptions)


def search_config(kd: str) -> SearchConfig:
  return SearchConfig(
      latency_target=FLAGS.latency_target, r0=FLAGS.r0, decay=FLAGS.decay,
      round_to=FLAGS.round_to, max_iterations=FLAGS.max_iterations,
      finetune_fraction=FLAGS.finetune_fraction, heldout_fraction=FLAGS.heldout_fraction,
      bn_batches=FLAGS.bn_batches, bn_batch_size=FLAGS.bn_batch_size,
      calibration_iterations=FLAGS.calibration_iterations,
      calibration_candidates=FLAGS.calibration_candidates,
      short_term_steps=FLAGS.short_term_steps, long_term_steps=FLAGS.long_term_steps,
      short_term_lr=FLAGS.short_term_lr, long_term_lr=FLAGS.long_term_lr,
      batch_size=FLAGS.kd_batch_size, temperature=FLAGS.temperature,
      hard_weight=FLAGS.hard_weight, kd=kd, importance=FLAGS.importance, seed=FLAGS.seed)


def _run_key(method: str, config: SearchConfig, dataset: str, source_path: str) -> str:
  data = json.dumps({'method': method, 'config': config.to_json(), 'dataset': dataset,
                     'source': source_path, 'teacher_bn_adapt': FLAGS.teacher_bn_adapt},
                    sort_keys=True)
  return hashlib.sha256(data.encode()).hexdigest()[:10]


def _spearman_cell(row: dict[str, Any]) -> str:
  if row['method'] != 'ttmpd':
    return ''
  cell = f'{row.get("spearman", float("nan")):.2f}'
  if 'spearman_netadapt_candidates' in row:
    cell += f' / {row["spearman_netadapt_candidates"]:.2f}'
  return cell


def _table(rows: list[dict[str, Any]]) -> str:
  netadapt = {(r['dataset'], r['kd']): r['prune_finetune_s'] for r in rows
              if r['method'] == 'netadapt'}
  out = []
  for r in rows:
    base = netadapt.get((r['dataset'], r['kd']))
    pruned = not r['method'].startswith('teacher')
    out.append([r['dataset'], r['method'], r['kd'] if pruned else '-', f'{100 * r["accuracy"]:.2f}',
                f'{r["latency_ratio"]:.3f}', f'{r["latency_ms_measured"]:.2f}',
                f'{r["latency_ms_predicted"]:.2f}', f'{r["flops"] / 1e6:.2f}M',
                f'{r["params"] / 1e3:.1f}k',
                f'{r["prune_finetune_s"]:.1f}' if pruned else '-',
                f'{r["prune_finetune_s"] / base:.2f}' if pruned and base else '-',
                _spearman_cell(r)])
  return common.format_table(
      ['dataset', 'method', 'kd', 'acc %', 'lat ratio', 'lat ms', 'pred ms', 'MACs', 'params',
       'prune+FT s', 'vs NetAdapt', 'spearman (calib / NetAdapt cands)'], out)


def cross_check_proxy(rows: list[dict[str, Any]]) -> None:
  """Out-of-sample check of TT-MPD's Â: applied to every candidate NetAdapt fine-tuned.

  NetAdapt short-term fine-tunes every candidate of every iteration and records its v1/v2, so
  its candidates are free ground truth for the accuracy model TT-MPD fitted on its own few
  calibration candidates. Adds ``spearman_netadapt_candidates`` to the TT-MPD row.
  """
  for ttmpd in (r for r in rows if r['method'] == 'ttmpd' and r.get('proxy')):
    netadapt = next((r for r in rows if r['method'] == 'netadapt' and
                     r['dataset'] == ttmpd['dataset'] and r['kd'] == ttmpd['kd']), None)
    if netadapt is None:
      continue
    points = [c for c in netadapt.get('candidates', []) if c.get('real') is not None]
    model = LinearAccuracyModel(np.asarray(ttmpd['proxy']['coef']), True)
    predicted = model.predict([c['v1'] for c in points], [c['v2'] for c in points])
    ttmpd['spearman_netadapt_candidates'] = spearman(predicted, [c['real'] for c in points])
    ttmpd['spearman_netadapt_candidates_n'] = len(points)
    common.log(f'TT-MPD accuracy model on NetAdapt\'s {len(points)} fine-tuned candidates '
               f'({ttmpd["dataset"]}, {ttmpd["kd"]} KD): Spearman '
               f'{ttmpd["spearman_netadapt_candidates"]:.3f}')


def run(ctx: common.Context, mode: str) -> None:
  methods = [FLAGS.method] if mode == 'prune' else list(FLAGS.methods)
  kd_modes = [FLAGS.kd] if mode == 'prune' else list(FLAGS.kd_modes)
  for method in methods:
    check_method(method)
  configs = {kd: search_config(kd) for kd in kd_modes}  # Validates budgets before any work.
  if not FLAGS['latency_round_to'].present and FLAGS.latency_round_to > FLAGS.round_to:
    # The table is flat below its smallest grid point: with a coarser grid than the pruning step,
    # the last channels of a group would look free to keep and the search would over-prune.
    FLAGS.latency_round_to = FLAGS.round_to
  source = ctx.source_model()
  image_shape = tuple(source.meta.image_shape)
  source_rows = None
  if FLAGS.source_eval_corruptions:
    base = ctx.shifted_dataset_names()[0].partition('/')[0]
    names = [f'{base}/{c}_{s}' for c in FLAGS.source_eval_corruptions for s in FLAGS.severities]
    common.log('source model under covariate shift:')
    source_rows = mode_evaluate.evaluation_rows(source.model, source.variables, ctx, names)
    mode_evaluate.print_rows(source_rows)
  start = time.time()
  predictor = predictor_from_flags(source.spec, image_shape)
  latency_table_s = time.time() - start
  common.log(f'latency table ready in {latency_table_s:.1f}s: teacher predicted '
             f'{predictor.predict():.2f} ms at batch {FLAGS.latency_batch}')
  names = ctx.shifted_dataset_names()
  if not names:
    raise UserError('no shifted test set: pass --corruptions/--severities or --test_datasets')
  rows: list[dict[str, Any]] = []
  report: dict[str, Any] = {'mode': mode, 'source_checkpoint': source.path,
                            'teacher_spec': source.spec.to_json(), 'runs': rows,
                            'latency_batch': FLAGS.latency_batch,
                            'source_evaluation': source_rows,
                            'flags': common.flag_values_for_report()}
  for name in names:
    dataset = ctx.dataset(name, 'test', FLAGS.test_limit)
    prepared = harness.prepare(source.spec, source.variables, dataset, configs[kd_modes[0]],
                               latency_batch=FLAGS.latency_batch,
                               teacher_bn_adapt=FLAGS.teacher_bn_adapt, log=common.log)
    for kd in kd_modes:
      for method in methods:
        if method.startswith('teacher') and kd != kd_modes[0]:
          continue
        config = configs[kd]
        key = _run_key(method, config, name, source.path)
        work_dir = ctx.path('work', f'{method}_{kd}_{key}') if FLAGS.resume else None
        common.log(f'=== {method} ({kd} KD) on {name} ===')
        row, spec, variables = harness.run_method(
            method, prepared, config, predict_ms=predictor.predict,
            latency_table_s=latency_table_s, work_dir=work_dir,
            eval_batch_size=FLAGS.eval_batch_size,
            trajectory_eval_limit=FLAGS.trajectory_eval_limit or 0, log=common.log)
        if not method.startswith('teacher'):
          path = ctx.path('models', f'{method}_{kd}_{name.replace("/", "_")}')
          checkpoint.save(path, variables, checkpoint.CheckpointMeta(
              spec, image_shape, source.meta.family,
              {'method': method, 'kd': kd, 'dataset': name, 'accuracy': row['accuracy'],
               'latency_ratio': row['latency_ratio']}), overwrite=True)
          row['checkpoint'] = path
          if not row.get('reached_target', True):
            common.log(f'note: {row["message"]}')
        rows.append(row)
        cross_check_proxy(rows)
        ctx.write_report(report)  # Partial results survive a later failure.
  print()
  print(_table(rows))
  print()
  plot = plot_tradeoff(rows, ctx.path('tradeoff.png'),
                       title=f'{source.spec.name}: accuracy vs measured latency '
                             f'(target {FLAGS.latency_target:g})')
  report['plot'] = plot
  ctx.write_report(report)
  common.log(f'plot: {plot}')
