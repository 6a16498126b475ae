"""--mode=prune (one method) and --mode=benchmark (methods side by side) on shifted test sets.

The launcher is a user of the library: flags become one typed ``SearchConfig`` here
(``search_config``), the zoo model and its source checkpoint come from ``common.Context``, and
each method runs through ``ttmpd_jax.search.harness.run_method``. Finished methods are read back
from ``report.json`` (keyed by a hash of everything that determines them), so a rerun with the
same flags skips them; an unfinished one resumes from its last search step.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import flags

from launch import common, mode_evaluate
from launch.mode_latency_table import predictor_from_flags
from ttmpd_jax import checkpoint, evidence, interrupt, train
from ttmpd_jax.distill import distributed
from ttmpd_jax.errors import UserError
from ttmpd_jax.latency import LatencyPredictor, LatencyTable, MacsLatency
from ttmpd_jax.models import MODEL_NAMES, ModelSpec
from ttmpd_jax.report import plot_tradeoff
from ttmpd_jax.search import harness, judges
from ttmpd_jax.search.config import ConfigError, SearchConfig
from ttmpd_jax.search.methods import METHODS
from ttmpd_jax.search.problem import Resizable, prepare
from ttmpd_jax.search.proxy import AccuracyModel, spearman
from ttmpd_jax.search.scoring import CRITERIA

FLAGS = flags.FLAGS
MODES = ('prune', 'benchmark')

flags.DEFINE_string('method', 'ttmpd', f'Pruning method for --mode=prune: '
                    f'{", ".join(METHODS.names())}.')
flags.DEFINE_list('methods', ['ttmpd', 'netadapt', 'eagleeye', 'halp', 'uniform', 'teacher',
                              'teacher_bn'], 'Methods compared by --mode=benchmark.')
flags.DEFINE_string('kd', 'cached', 'KD mode for --mode=prune: cached (pseudo labels computed '
                    'once) or online (teacher on every batch).')
flags.DEFINE_list('kd_modes', ['cached'], 'KD modes compared by --mode=benchmark.')
flags.DEFINE_enum('latency_model', 'table', ['table', 'macs'], 'How the search predicts latency: '
                  'table = in-context measurements of this device, fitted (fusion-aware); macs = '
                  'proportional to multiply-accumulates (no table, host-independent decisions, '
                  'blind to fusion and per-layer overheads). The target is judged on measured '
                  'latency either way.')
flags.DEFINE_float('latency_target', 0.5, 'Target measured latency, a fraction of the teacher\'s.')
flags.DEFINE_float('latency_tolerance', 0.03, 'The measured latency ratio must land within '
                   'target x (1 +- tolerance).')
flags.DEFINE_integer('measure_rounds', 4, 'Measure-and-correct rounds to meet the measured target '
                     '(0: trust the latency model).')
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
flags.DEFINE_integer('calibration_iterations', 3, 'TT-MPD fine-tunes the candidates of this many '
                     'iterations, spread over the run, to fit its accuracy model.')
flags.DEFINE_integer('calibration_candidates', 0, 'Candidates fine-tuned per calibration '
                     'iteration (0: all).')
flags.DEFINE_integer('shortlist', 3, 'ttmpd_shortlist: candidates (best first by the accuracy '
                     'model) short-term fine-tuned per iteration; the best of them by real '
                     'accuracy is chosen.')
flags.DEFINE_integer('short_term_steps', 30, 'KD steps of each short-term fine-tuning.')
flags.DEFINE_integer('ground_truth_repeats', 1, 'Benchmarking: fine-tune every fine-tuned '
                     'candidate this many times (other batch orders) and record the repeats, to '
                     'measure how reproducible short-term accuracies are (bench/bench_proxy.py).')
flags.DEFINE_list('ground_truth_steps', [], 'Benchmarking: also fine-tune every fine-tuned '
                  'candidate for each of these (fewer) steps and record its accuracy, to measure '
                  'how well cheaper fine-tunings rank candidates (bench/bench_proxy.py).')
flags.DEFINE_integer('long_term_steps', 300, 'KD steps of the final long-term fine-tuning.')
flags.DEFINE_float('short_term_lr', 0.01, 'Short-term KD learning rate (constant).')
flags.DEFINE_float('long_term_lr', 0.01, 'Long-term KD learning rate (cosine decay).')
flags.DEFINE_integer('kd_batch_size', 128, 'KD fine-tuning batch size.')
flags.DEFINE_float('temperature', 1.0, 'KD temperature.')
flags.DEFINE_float('hard_weight', 0.0, 'Weight of the hard pseudo-label cross-entropy term.')
flags.DEFINE_enum('importance', 'l2', CRITERIA.names(), 'Channel importance within a group.')
flags.DEFINE_bool('teacher_bn_adapt', True, 'Adapt the teacher\'s BatchNorm statistics to the '
                  'shifted test set before labelling and pruning (test-time BN adaptation).')
flags.DEFINE_bool('resume', True, 'Continue a killed run: finished methods are read back from '
                  'report.json, an unfinished one resumes from its last search step.')
flags.DEFINE_list('source_eval_corruptions', [], 'Before pruning, print the source model\'s '
                  'accuracy on the clean test split and on these corruptions (at --severities).')
flags.DEFINE_integer('trajectory_eval_limit', 2000, 'Test samples used to report accuracy along '
                     'the search trajectory (0: skip; reporting only, not timed).')

flags.DEFINE_list('grid_models', [], 'Benchmark grid: zoo models, each NAME or NAME:KEY=VALUE '
                  '(e.g. resnet20:base_width=8, mobilenetv2:width_multiplier=0.5); one source '
                  'model per architecture. Empty: --model.')
flags.DEFINE_list('seeds', [], 'Benchmark grid: search seeds (subset selection, data order). '
                  'Empty: --seed.')

flags.register_validator('source_eval_corruptions', common.check_corruptions)

# SearchConfig fields whose flag has another name.
FLAG_OF_FIELD = {'batch_size': 'kd_batch_size'}


def search_config(kd: str, seed: int) -> SearchConfig:
  """The one place flags become the search's configuration."""
  fields = {f: FLAGS[FLAG_OF_FIELD.get(f, f)].value for f in SearchConfig.__dataclass_fields__
            if f not in ('kd', 'seed')}
  with config_errors_as_flags():
    return SearchConfig(kd=kd, seed=seed, **fields)


class config_errors_as_flags:  # pylint: disable=invalid-name
  """Context manager: a library ``ConfigError`` becomes a one-line error naming the flag."""

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if isinstance(error, ConfigError):
      raise UserError(f'--{FLAG_OF_FIELD.get(error.field, error.field)}: {error.detail}') from error
    return False


def run_key(method: str, config: SearchConfig, dataset: str, source_path: str) -> str:
  """Identity of one method run: what determines its result (the resume key)."""
  latency = {name: getattr(FLAGS, name) for name in (
      'latency_batch', 'latency_round_to', 'latency_max_grid_points', 'latency_random_probes',
      'latency_fusion')}
  if FLAGS.latency_model != 'table':   # Keys of table runs stay those of earlier reports.
    latency['latency_model'] = FLAGS.latency_model
  fields = config.to_json()
  for name, default in (('ground_truth_repeats', 1), ('ground_truth_steps', ()),
                        ('shortlist', 3)):
    if fields[name] == default:   # Knobs added later, at defaults: earlier keys stay valid.
      del fields[name]
  identity = {'method': method, 'config': fields, 'dataset': dataset, 'source': source_path,
              'latency': latency, 'version': harness.RESULT_VERSION}
  revision = getattr(METHODS.get(method), 'revision', 0)   # Optional on a method.
  if revision:   # A change to one method's results: the other methods' rows stay valid.
    identity['method_revision'] = revision
  data = json.dumps(identity, sort_keys=True)
  return hashlib.sha256(data.encode()).hexdigest()[:12]


def _spearman_cell(row: dict[str, Any]) -> str:
  ps = row.get('proxy_spearman') or {}
  if 'ttmpd' not in ps:   # Only rows with a fitted accuracy model.
    return ''
  cell = f'{_num(ps.get("ttmpd"))} (v1 {_num(ps.get("v1"))}, v2 {_num(ps.get("v2"))})'
  if 'proxy_spearman_ground_truth' in row:
    cell += f' / {_num(row["proxy_spearman_ground_truth"].get("ttmpd"))}'
  return cell


def _num(value: Any) -> str:
  return '-' if value is None or (isinstance(value, float) and np.isnan(value)) else f'{value:.2f}'


def table(rows: list[dict[str, Any]]) -> str:
  base_time = {evidence.cell_of(r): r['prune_finetune_s'] for r in rows
               if r['method'] == evidence.TIME_BASELINE}
  out = []
  for r in rows:
    base = base_time.get(evidence.cell_of(r))
    pruned = METHODS.get(r['method']).prunes
    target = '-' if not pruned else ('met' if r.get('met_target') else 'MISSED')
    out.append([r['dataset'], r['method'], r['kd'] if pruned else '-', f'{100 * r["accuracy"]:.2f}',
                f'{r["latency_ratio"]:.3f}' + ('' if r.get('latency_reliable', True) else '?'),
                target, f'{r["latency_ms_measured"]:.2f}', f'{r["latency_ms_predicted"]:.2f}',
                f'{r["flops"] / 1e6:.2f}M', f'{r["params"] / 1e3:.1f}k',
                f'{r["prune_finetune_s"]:.1f}' if pruned else '-',
                f'{r["prune_finetune_s"] / base:.2f}' if pruned and base else '-',
                _spearman_cell(r)])
  return common.format_table(
      ['dataset', 'method', 'kd', 'acc %', 'lat ratio', 'target', 'lat ms', 'pred ms', 'MACs',
       'params', 'prune+FT s', f'vs {evidence.TIME_BASELINE}',
       'Â spearman within iter (v1, v2) / on ground truth'], out)


def cross_check_proxy(rows: list[dict[str, Any]]) -> None:
  """Out-of-sample check of a fitted accuracy model on a ground-truth run of the same cell.

  A run that fine-tuned *every* candidate of every iteration (NetAdapt) records (v1, v2, real
  accuracy) for whole candidate sets: free ground truth for the accuracy model another run (TT-MPD)
  fitted on its own calibration candidates. Adds the within-iteration medians
  (``proxy_spearman_ground_truth``; ``proxy_spearman_netadapt`` is kept as an alias) and the
  pooled Spearman (``spearman_netadapt_candidates``) to each row with a fitted model.
  """
  truth = {evidence.cell_of(r): r for r in rows
           if r.get('candidates') and all(c.get('real') is not None for c in r['candidates'])}
  for row in (r for r in rows if (r.get('proxy') or {}).get('fitted')):
    ground = truth.get(evidence.cell_of(row))
    if ground is None or ground is row:
      continue
    model = AccuracyModel.from_json(row['proxy'])
    points = ground['candidates']
    rho = judges.within_iteration_spearman(points, model)
    row['proxy_spearman_ground_truth'] = row['proxy_spearman_netadapt'] = rho
    row['spearman_netadapt_candidates'] = spearman(
        model.predict([c['v1'] for c in points], [c['v2'] for c in points]),
        [c['real'] for c in points])
    row['spearman_netadapt_candidates_n'] = len(points)


def _trajectory_accuracy(row: dict[str, Any], pruned: Any, model: Any, dataset: Any) -> None:
  limit = FLAGS.trajectory_eval_limit
  if not limit or not pruned.snapshots or 'trajectory' not in row:
    return
  subset = dataset.take(limit)
  runner = Resizable(model)
  accuracies = {k: train.accuracy(runner, v, subset, FLAGS.eval_batch_size)
                for k, v in pruned.snapshots}
  for point in row['trajectory']:
    point['accuracy_short_term'] = accuracies.get(point['iteration'])


def artefact_name(method: str, config: SearchConfig, dataset: str, model: str, key: str) -> str:
  """Name of one run's files under ``--output_dir`` (its network in ``models/``, its resume
  state in ``work/``): readable, and unique to the run through its ``run_key``, so the runs of a
  grid (models x shifts x seeds x methods x KD modes, any target) never share one."""
  readable = f'{method}_{config.kd}_{model}_{dataset}_s{config.seed}'
  return f'{readable.replace("/", "_").replace(os.sep, "_")}_{key}'


def _work_dir(ctx: common.Context, method: str, config: SearchConfig, key: str, name: str) -> str:
  """``work/<name>``; a run killed under its name of before (also one per key) resumes there."""
  legacy = ctx.path('work', f'{method}_{config.kd}_{key}')
  return legacy if os.path.isdir(legacy) else ctx.path('work', name)


def _save_model(ctx: common.Context, source: Any, method: str, kd: str, name: str,
                row: dict[str, Any], variables: Any, file_name: str) -> str:
  """Saves the pruned network as ``models/<file_name>``; returns that path as reports hold it."""
  path = ctx.path('models', file_name)
  checkpoint.save(path, variables, checkpoint.CheckpointMeta(
      source.spec.with_widths_of(variables), tuple(source.meta.image_shape), source.meta.family,
      {'method': method, 'kd': kd, 'dataset': name, 'accuracy': row['accuracy'],
       'latency_ratio': row['latency_ratio'], 'run_key': row['run_key'], 'seed': row['seed'],
       'model': row['model']}), overwrite=True)
  return ctx.relative(path)


def _holds_row(path: str, row: dict[str, Any]) -> bool:
  """Whether checkpoint ``path`` is the network of finished ``row`` (its run key; checkpoints
  saved before they recorded one: its method, shift and accuracy)."""
  try:
    info = checkpoint.load_meta(path).info
  except checkpoint.CheckpointError:
    return False
  if 'run_key' in info:
    return info['run_key'] == row.get('run_key')
  return all(info.get(k) == row.get(k) for k in ('method', 'kd', 'dataset', 'accuracy'))


def _reused_row(ctx: common.Context, row: dict[str, Any]) -> dict[str, Any]:
  """A finished row of report.json with its ``checkpoint`` checked: relative to --output_dir
  (absolute in reports of before), and dropped, with a note, when that network is gone or is
  another run's (saved before file names were unique to runs, a grid's runs overwrote theirs)."""
  path = row.get('checkpoint')
  if not path:
    return row
  candidates = [ctx.resolve(path)]
  if os.path.isabs(path):   # An absolute path of a folder since moved (another machine).
    candidates.append(ctx.path('models', os.path.basename(path)))
  held = next((p for p in candidates if _holds_row(p, row)), None)
  row = dict(row)
  if held is None:
    common.log(f'note: {path} does not hold this run\'s network (gone, or overwritten by another '
               'run); its row is kept without a checkpoint (--noresume reruns it)')
    del row['checkpoint']
  else:
    row['checkpoint'] = ctx.relative(held)
  return row


def run_cell(ctx: common.Context, source: Any, problem: Any, method: str, config: SearchConfig,
             finished: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """One method on one prepared problem; a finished row with the same key is reused."""
  name = problem.dataset.name
  key = run_key(method, config, name, source.path)
  if FLAGS.resume and key in finished:
    common.log(f'=== {method} ({config.kd} KD) on {name}: finished earlier, reusing its row ===')
    return _reused_row(ctx, finished[key])
  common.log(f'=== {method} ({config.kd} KD) on {name} ===')
  start = time.time()
  file_name = artefact_name(method, config, name, source.spec.name, key)
  work_dir = _work_dir(ctx, method, config, key, file_name) if FLAGS.resume else None
  report, variables, pruned = harness.run_method(method, problem, config, work_dir=work_dir,
                                                 log=common.log)
  row = report.to_json()
  row.update(run_key=key, seed=config.seed, model=source.spec.name,
             accuracy=train.accuracy(problem.model, variables, problem.dataset,
                                     FLAGS.eval_batch_size))
  row['source_checkpoint'] = ctx.relative(source.path)   # A grid has one per model.
  common.log(f'[{method}/{config.kd}] accuracy {row["accuracy"]:.4f}')
  _trajectory_accuracy(row, pruned, source.model, problem.dataset)
  if METHODS.get(method).prunes:
    row['checkpoint'] = _save_model(ctx, source, method, config.kd, name, row, variables,
                                    file_name)
  row['elapsed_s'] = time.time() - start   # Everything this row took (the grid's ETA).
  return row


def _finished_rows(ctx: common.Context) -> dict[str, dict[str, Any]]:
  """Rows of an earlier run in ``report.json`` by run key (none when resuming is off)."""
  path = ctx.path('report.json')
  if not FLAGS.resume or not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      previous = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} exists but cannot be read as JSON ({e}); move it away, or pass '
                    '--noresume to start over') from e
  rows = previous.get('runs', []) + previous.get('earlier_runs', [])
  for row in (r for r in rows if r.get('checkpoint')):   # Absolute in reports of before.
    row['checkpoint'] = ctx.relative(row['checkpoint'])
  return {r['run_key']: r for r in rows if 'run_key' in r}


def _keep_earlier(report: dict[str, Any], finished: dict[str, dict[str, Any]]) -> None:
  """Finished rows of the earlier report.json that this run has not (yet) reached stay on
  disk under ``earlier_runs``: not summarised, reused when a later run reaches their cell (a
  grid resumed in another order, or a smaller grid in the same folder, loses no finished work)."""
  done = {r.get('run_key') for r in report['runs']}
  earlier = [row for key, row in finished.items() if key not in done]
  if earlier:
    report['earlier_runs'] = earlier
  else:
    report.pop('earlier_runs', None)


def _source_rows(ctx: common.Context, source: Any) -> Any:
  if not FLAGS.source_eval_corruptions:
    return None
  base = ctx.shifted_dataset_names()[0].partition('/')[0]
  names = [f'{base}/{c}_{s}' for c in FLAGS.source_eval_corruptions for s in FLAGS.severities]
  common.log('source model under covariate shift:')
  rows = mode_evaluate.evaluation_rows(source.model, source.variables, ctx, names)
  mode_evaluate.print_rows(rows)
  return rows


def grid_specs(num_classes: int) -> list[Any]:
  """``--grid_models`` as model specs (``None``: the single model of --model)."""
  specs = []
  for item in FLAGS.grid_models:
    name, _, rest = item.partition(':')
    kwargs: dict[str, Any] = {}
    for part in filter(None, rest.split('/')):
      key, eq, value = part.partition('=')
      if not eq:
        raise UserError(f'--grid_models: {item!r} is not NAME or NAME:KEY=VALUE')
      try:
        kwargs[key] = json.loads(value)
      except ValueError:
        kwargs[key] = value
    if name not in MODEL_NAMES:
      raise UserError(f'--grid_models: unknown model {name!r}; valid: {", ".join(MODEL_NAMES)}')
    specs.append(ModelSpec(name, num_classes, kwargs))
  return specs or [None]


def grid_seeds() -> list[int]:
  try:
    return [int(s) for s in FLAGS.seeds] or [FLAGS.seed]
  except ValueError as e:
    raise UserError(f'--seeds: integers expected, got {",".join(FLAGS.seeds)}') from e


class Progress:
  """Cells done, ETA and the running summary of a benchmark grid.

  Design choice: the ETA sums, over the cells left, the mean duration of the finished cells of
  the same model (the sum of their rows' ``elapsed_s``; ``wall_s`` for rows written before that
  was recorded), counting rows reused from an earlier process at the time they took then. Dividing
  this process's time by the cells it finished would make a resumed grid look almost done: its
  reused cells take seconds.
  """

  def __init__(self, cell_models: Sequence[str]):
    self.cells, self.done = list(cell_models), 0
    self.seconds: dict[str, list[float]] = {}

  @property
  def total(self) -> int:
    return len(self.cells)

  def eta(self) -> float:
    """Seconds the cells left should take (NaN before any cell finished)."""
    known = [s for values in self.seconds.values() for s in values]
    if not known:
      return float('nan')
    return float(sum(np.mean(self.seconds.get(m) or known) for m in self.cells[self.done:]))

  def cell_finished(self, runs: list[dict[str, Any]], cell_runs: list[dict[str, Any]]) -> None:
    model = self.cells[self.done]
    self.done += 1
    self.seconds.setdefault(model, []).append(
        sum(float(r.get('elapsed_s', r.get('wall_s', 0.0))) for r in cell_runs))
    eta = self.eta()
    common.log(f'grid: {self.done}/{self.total} cells done, ETA '
               f'{train.format_seconds(eta) if eta == eta else "?"}')
    if self.total > 1:
      common.log(common.format_table(*evidence.summary_table(evidence.summarize(runs))))


def macs_latency(spec: Any, image_shape: tuple[int, ...]) -> MacsLatency:
  """--latency_model=macs: latency proportional to MACs; process 0 times the teacher once."""
  model = None
  if distributed.is_primary():
    model = MacsLatency.from_spec(spec, image_shape, FLAGS.latency_batch,
                                  dtype=FLAGS.latency_dtype, repeats=FLAGS.latency_repeats)
  teacher_ms = distributed.broadcast_json(None if model is None else model.teacher_ms)
  if model is None:
    model = MacsLatency.from_spec(spec, image_shape, FLAGS.latency_batch,
                                  dtype=FLAGS.latency_dtype, teacher_ms=teacher_ms)
  common.log(model.describe())
  return model


def shared_predictor(source: Any) -> Any:
  """The latency predictor of ``source``, the same on every process of a job.

  Design choice: timings differ between hosts (and between runs), and a predictor that differs
  by a fraction of a millisecond can make two processes choose different candidates, after which
  their collectives no longer match. So process 0 alone builds, loads and verifies the table (it
  measures and saves it); the others receive its entries (``distributed.broadcast_json``) and fit
  the same predictor from them without measuring anything.
  """
  spec, image_shape = source.spec, tuple(source.meta.image_shape)
  if FLAGS.latency_model == 'macs':
    return macs_latency(spec, image_shape)
  if jax.process_count() == 1:
    return predictor_from_flags(spec, image_shape)
  predictor, shared = None, None
  if distributed.is_primary():
    predictor = predictor_from_flags(spec, image_shape)
    table = predictor.table
    shared = {'key': table.key, 'entries': table.entries, 'models': table.models}
  shared = distributed.broadcast_json(shared)
  if predictor is None:
    table = LatencyTable(shared['key'], None, shared['entries'], shared['models'], log=common.log)
    predictor = LatencyPredictor.from_spec(spec, image_shape, FLAGS.latency_batch, table,
                                           round_to=FLAGS.latency_round_to,
                                           dtype=FLAGS.latency_dtype, build=False,
                                           fusion_aware=FLAGS.latency_fusion)
    predictor.refit()
  distributed.check_same(predictor.predict(), 'the predicted latency of the teacher')
  return predictor


def run(ctx: common.Context, mode: str) -> None:
  methods = [FLAGS.method] if mode == 'prune' else list(FLAGS.methods)
  kd_modes = [FLAGS.kd] if mode == 'prune' else list(FLAGS.kd_modes)
  with config_errors_as_flags():
    for method in methods:
      METHODS.get(method)
  seeds = grid_seeds()
  configs = {(kd, seed): search_config(kd, seed) for kd in kd_modes for seed in seeds}
  names = ctx.shifted_dataset_names()
  if not names:
    raise UserError('no shifted test set: pass --corruptions/--severities or --test_datasets')
  ctx.preflight(['tradeoff.png', 'benchmark_grid.png'],
                folders=['models'] + (['work'] if FLAGS.resume else []), latency=True)
  # Process 0 reads report.json; every process resumes the same way (no shared file needed).
  finished = distributed.broadcast_json(_finished_rows(ctx) if distributed.is_primary() else None)
  specs = grid_specs(ctx.clean_test_set().num_classes)
  report: dict[str, Any] = {'mode': mode, 'runs': [], 'latency_batch': FLAGS.latency_batch,
                            'flags': common.flag_values_for_report()}
  models = []
  for spec in specs:
    source = ctx.source_model(spec) if spec is not None else ctx.source_model()
    report.setdefault('source_checkpoint', ctx.relative(source.path))
    report.setdefault('teacher_spec', source.spec.to_json())
    report.setdefault('source_evaluation', _source_rows(ctx, source))
    start = time.time()
    predictor = shared_predictor(source)
    latency_s = time.time() - start
    common.log(f'latency model ready in {latency_s:.1f}s: {source.spec.name} predicted '
               f'{predictor.predict():.2f} ms at batch {FLAGS.latency_batch}')
    models.append((source, predictor, latency_s))
  # Seeds outermost: a grid stopped part-way holds every (model, shift) cell of its first seeds.
  progress = Progress([source.spec.name for _ in seeds for source, _, _ in models for _ in names])
  for seed in seeds:
    for source, predictor, latency_s in models:
      for name in names:
        dataset = ctx.dataset(name, 'test', FLAGS.test_limit)
        with config_errors_as_flags():
          problem = prepare(source.model, source.variables, dataset, configs[kd_modes[0], seed],
                            latency=predictor, latency_batch=FLAGS.latency_batch,
                            latency_table_s=latency_s, log=common.log)
        first = len(report['runs'])
        for kd in kd_modes:
          for method in methods:
            if not METHODS.get(method).prunes and kd != kd_modes[0]:
              continue
            interrupt.check()   # Between grid cells: every finished row is on disk.
            report['runs'].append(run_cell(ctx, source, problem, method, configs[kd, seed],
                                           finished))
            cross_check_proxy(report['runs'])
            report['summary'] = evidence.summarize(report['runs'])
            _keep_earlier(report, finished)
            ctx.write_report(report)  # Each finished method is on disk before the next starts.
        progress.cell_finished(report['runs'], report['runs'][first:])
  _keep_earlier(report, finished)
  _finish(ctx, report, source)


def _finish(ctx: common.Context, report: dict[str, Any], source: Any) -> None:
  common.log('')
  common.log(table(report['runs']))
  common.log('')
  missed = [f'{r["method"]} on {r["dataset"]}' for r in report['runs'] if not r.get('met_target')]
  if missed:
    common.log(f'note: measured latency target missed by {", ".join(missed)} (marked MISSED)')
  if len({evidence.cell_of(r) for r in report['runs']}) > 1:
    header, rows = evidence.summary_table(report['summary'])
    common.log(common.format_table(header, rows))
    common.log('')
  if not distributed.is_primary():   # Plots and the report: process 0's.
    return
  if len({evidence.cell_of(r) for r in report['runs']}) > 1:
    report['grid_plot'] = ctx.relative(evidence.plot_grid(
        report['summary'], ctx.path('benchmark_grid.png'),
        title=f'accuracy vs prune + fine-tune time (target {FLAGS.latency_target:g}, 95% CIs)'))
  report['plot'] = ctx.relative(plot_tradeoff(
      report['runs'], ctx.path('tradeoff.png'),
      title=f'{source.spec.name}: accuracy vs measured latency (target {FLAGS.latency_target:g})'))
  ctx.write_report(report)
  common.log(f'plot: {ctx.resolve(report["plot"])}')
