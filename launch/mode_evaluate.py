"""--mode=pretrain and --mode=evaluate: the source model and its accuracy under covariate shift."""

from __future__ import annotations

from typing import Optional, Sequence

from absl import flags

from launch import common
from ttmpd_jax import train
from ttmpd_jax.models import build_model
from ttmpd_jax.models.inspect import count_flops_and_params

FLAGS = flags.FLAGS
MODES = ('pretrain', 'evaluate')


def evaluation_rows(model, variables, ctx: common.Context,
                    names: Optional[Sequence[str]] = None) -> list[dict]:
  """Accuracy on the clean test split and on each shifted test set (default: the flags')."""
  predict = train.make_predict(model)
  rows = []
  clean = ctx.clean_test_set()
  clean_acc = train.accuracy(model, variables, clean, FLAGS.eval_batch_size, predict)
  rows.append({'dataset': f'{clean.name} (clean test)', 'accuracy': clean_acc, 'drop_pp': 0.0})
  common.log(f'  {rows[-1]["dataset"]}: {clean_acc:.4f}')
  for name in ctx.shifted_dataset_names() if names is None else names:
    shifted = ctx.dataset(name, 'test', FLAGS.test_limit)
    acc = train.accuracy(model, variables, shifted, FLAGS.eval_batch_size, predict)
    rows.append({'dataset': name, 'accuracy': acc, 'drop_pp': 100.0 * (clean_acc - acc)})
    common.log(f'  {name}: {acc:.4f}')
  return rows


def print_rows(rows: list[dict]) -> None:
  print()
  print(common.format_table(['dataset', 'accuracy', 'drop (pp)'],
                            [[r['dataset'], r['accuracy'], f'{r["drop_pp"]:.1f}'] for r in rows]))
  print()


def run(ctx: common.Context, mode: str) -> None:
  ctx.preflight()
  source = ctx.source_model()
  if mode == 'evaluate' and FLAGS.checkpoint:
    model, variables, meta = build_model(source.spec), source.variables, source.meta
  else:
    model, variables, meta = source.model, source.variables, source.meta
  common.log(f'evaluating {meta.spec.name} ({source.path})')
  rows = evaluation_rows(model, variables, ctx)
  print_rows(rows)
  macs, params = count_flops_and_params(model, variables, meta.image_shape)
  ctx.write_report({
      'mode': mode, 'checkpoint': ctx.relative(source.path), 'spec': meta.spec.to_json(),
      'flops': macs, 'params': params, 'trained_now': source.trained_now,
      'pretrain': {k: v for k, v in meta.info.items() if k != 'train_config'},
      'evaluation': rows, 'flags': common.flag_values_for_report(),
  })
