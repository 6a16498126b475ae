"""--mode=epsd: pruning at initialisation + self-distillation (EPSD) against its baselines.

One command runs the whole grid ``--epsd_methods`` x ``--epsd_sparsities`` x ``--epsd_seeds``
(dense methods once per seed): initialise ``--model`` from scratch, score the weights (random,
magnitude, SNIP's cross-entropy saliency, or EPSD's self-distillation saliency) on
``--epsd_saliency_batches`` training batches, keep a global unstructured mask at each sparsity,
train the masked network with cross-entropy or PS-KD self-distillation (masks fixed), and evaluate
on the clean test split. The shared training flags mean *this* training here: ``--epochs``,
``--batch_size``, ``--learning_rate``, ``--weight_decay``, ``--train_limit``, ``--test_limit``.

Writes ``<output_dir>/report.json`` (after every run, so a killed sweep resumes where it
stopped), ``accuracy_vs_sparsity.png`` and one orbax checkpoint per run under
``<output_dir>/checkpoints/epsd/``. See ``ttmpd_jax.epsd`` for the method definitions.

    python launch/main.py --flagfile=launch/flags/epsd.cfg
"""

from __future__ import annotations

from absl import flags

from launch import common
from ttmpd_jax.epsd import experiment
from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning import unstructured

FLAGS = flags.FLAGS
MODES = ('epsd',)

flags.DEFINE_list('epsd_methods', list(experiment.DEFAULT_METHODS),
                  f'Methods to compare; any of {", ".join(experiment.METHODS)}.')
flags.DEFINE_list('epsd_sparsities', [f'{s:g}' for s in experiment.DEFAULT_SPARSITIES],
                  'Target sparsities: fractions in (0, 1) of the prunable weights to zero.')
flags.DEFINE_list('epsd_seeds', [], 'Seeds (initialisation, saliency batches, data order); '
                  'default: --seed only.')
flags.DEFINE_float('epsd_alpha', 0.8, "PS-KD's final self-distillation weight alpha_T "
                   '(alpha_t = alpha_T * epoch / epochs).')
flags.DEFINE_float('epsd_saliency_alpha', None, 'Weight of the self-prediction target in EPSD\'s '
                   'SD saliency objective (default: --epsd_alpha).')
flags.DEFINE_float('epsd_temperature', 4.0, 'Temperature softening the self-teacher in EPSD\'s '
                   'SD saliency objective (1 would make it rank like SNIP).')
flags.DEFINE_integer('epsd_saliency_batches', 4, 'Training batches (of --batch_size) the '
                     'gradient saliencies average over.')
flags.DEFINE_enum('epsd_mask_scope', 'global', list(experiment.MASK_SCOPES),
                  'global: one ranking over all prunable weights; per_leaf: same sparsity in '
                  'every layer.')
flags.DEFINE_bool('epsd_prune_head', True, 'Whether the classifier head kernel is prunable.')
flags.DEFINE_bool('epsd_save_checkpoints', True, 'Save an orbax checkpoint of every trained run.')
flags.DEFINE_bool('epsd_resume', True, 'Reuse finished runs of an existing report.json with the '
                  'same configuration.')
flags.DEFINE_integer('epsd_log_every', 0, 'Print a training line every N steps (0: per run only).')


def _parse_floats(values, flag: str) -> tuple[float, ...]:
  out = []
  for v in values:
    out.append(unstructured.check_sparsity(v.strip() if isinstance(v, str) else v, f'--{flag}'))
  return tuple(out)


def _parse_ints(values, flag: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise UserError(f'--{flag}: expected comma-separated integers, got {",".join(values)}') \
        from None


def config_from_flags(ctx: common.Context, num_classes: int) -> experiment.EPSDConfig:
  """The ``EPSDConfig`` the flags describe (validated; bad values raise ``UserError``)."""
  unknown = [m for m in FLAGS.epsd_methods if m not in experiment.METHODS]
  if unknown or not FLAGS.epsd_methods:
    raise UserError(f'--epsd_methods: unknown or empty {unknown or FLAGS.epsd_methods}; valid: '
                    f'{", ".join(experiment.METHODS)}')
  seeds = _parse_ints(FLAGS.epsd_seeds, 'epsd_seeds') if FLAGS.epsd_seeds else (ctx.seed,)
  config = experiment.EPSDConfig(
      spec=ctx.requested_spec(num_classes), methods=tuple(FLAGS.epsd_methods),
      sparsities=_parse_floats(FLAGS.epsd_sparsities, 'epsd_sparsities'), seeds=seeds,
      epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
      weight_decay=FLAGS.weight_decay, sd_alpha=FLAGS.epsd_alpha,
      saliency_alpha=FLAGS.epsd_saliency_alpha, saliency_temperature=FLAGS.epsd_temperature,
      saliency_batches=FLAGS.epsd_saliency_batches, mask_scope=FLAGS.epsd_mask_scope,
      prune_head=FLAGS.epsd_prune_head, eval_batch_size=FLAGS.eval_batch_size)
  return config.validate()


def run(ctx: common.Context, mode: str) -> None:
  del mode
  _parse_floats(FLAGS.epsd_sparsities, 'epsd_sparsities')  # Fail fast, before loading data.
  ctx.preflight(['accuracy_vs_sparsity.png'],
                folders=['checkpoints/epsd'] if FLAGS.epsd_save_checkpoints else [],
                source=False, shifted=False, train_data=True)
  train_set = ctx.train_set()
  test_set = ctx.clean_test_set()
  config = config_from_flags(ctx, train_set.num_classes)
  n_runs = len(config.seeds) * sum(
      1 if experiment.METHODS[m].saliency is None else len(config.sparsities)
      for m in config.methods)
  common.log(f'EPSD sweep: {config.spec.name} {dict(config.spec.kwargs)}, {len(train_set)} '
             f'training / {len(test_set)} test examples, {n_runs} runs '
             f'(methods {",".join(config.methods)}; sparsities '
             f'{",".join(f"{s:g}" for s in config.sparsities)}; seeds '
             f'{",".join(map(str, config.seeds))}) -> {ctx.output_dir}')
  report = experiment.run_sweep(
      config, train_set, test_set, ctx.output_dir, save_checkpoints=FLAGS.epsd_save_checkpoints,
      resume=FLAGS.epsd_resume, log_every=FLAGS.epsd_log_every,
      extra_report={'flags': common.flag_values_for_report()}, print_fn=common.log)
  print()
  print('test accuracy (%), mean ± std over seeds:')
  print(experiment.format_summary(report['summary']))
  print()
  for claim in report['claims']:
    means = claim['means']
    order = ' >= '.join(f'{m} {100 * means[m]:.2f}' for m in ('epsd', 'snip_sd', 'snip')
                        if m in means)
    holds = claim.get('epsd_ge_snip_sd_ge_snip')
    verdict = '' if holds is None else ('  holds' if holds else '  does NOT hold')
    print(f'sparsity {100 * claim["sparsity"]:g}%: {order}{verdict}')
  common.log(f'wrote {ctx.path("report.json")}' +
             (f' and {report["plot"]}' if 'plot' in report else ''))
