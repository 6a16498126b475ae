"""Where a benchmark grid saves its artefacts: every run its own network and work folder (named
by its run key), and every path a report holds relative to ``--output_dir``."""

from __future__ import annotations

import json
import os

from tests.conftest import FASHION_MNIST_DIR, requires_fashion_mnist
from tests.test_cli import run_main

# The flags of tests/test_benchmark_grid.py (through test_prune_cli._flags), cut further: the
# cheapest method (uniform: no search iterations), a small latency batch, no latency rounds (MACs
# decide), two architectures x two seeds.
FLAGS = ('--mode=benchmark', '--methods=uniform', '--corruptions=gaussian_noise',
         '--severities=5', '--grid_models=resnet8:base_width=8,vgg_small:hidden=16',
         '--seeds=0,1', '--train_limit=1280', '--epochs=1', '--batch_size=64',
         '--learning_rate=0.05', '--test_limit=300', '--latency_model=macs',
         '--latency_batch=16', '--latency_repeats=3', '--latency_target=0.7',
         '--measure_rounds=0', '--round_to=8', '--finetune_fraction=0.4', '--bn_batches=2',
         '--bn_batch_size=64', '--long_term_steps=2', '--kd_batch_size=64',
         '--trajectory_eval_limit=0')


def _relative(path: str) -> bool:
  return not os.path.isabs(path) and os.pardir not in path.split(os.sep)


def test_artefact_names_follow_the_run_key(tmp_path):
  from absl import flags
  from launch import mode_prune
  from ttmpd_jax.search.config import SearchConfig
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['test'])
  names = set()
  for target in (0.5, 0.7):
    for seed in (0, 1):
      config = SearchConfig(seed=seed, latency_target=target)
      for source in ('checkpoints/source_resnet8_a', 'checkpoints/source_resnet8_b'):
        key = mode_prune.run_key('uniform', config, 'fashion_mnist_c/fog_5', source)
        names.add(mode_prune.artefact_name('uniform', config, 'fashion_mnist_c/fog_5', 'resnet8',
                                           key))
  assert len(names) == 8
  assert all(n.startswith('uniform_cached_resnet8_fashion_mnist_c_fog_5_s') and '/' not in n
             for n in names)


def _context(output_dir):
  from launch import common
  ctx = common.Context.__new__(common.Context)   # Its paths only (no data, no devices).
  ctx.output_dir = str(output_dir)
  return ctx


def test_reused_rows_point_at_their_own_networks_relative_to_output_dir(tmp_path):
  """Rows of reports of before: absolute paths (maybe of a folder since moved), and networks a
  later run of the grid overwrote (their file names were not unique to runs)."""
  import numpy as np
  from launch import mode_prune
  from ttmpd_jax import checkpoint
  from ttmpd_jax.models import ModelSpec
  spec = ModelSpec('resnet8', 10, {'base_width': 4})
  variables = {'params': {'w': np.zeros(2, np.float32)}}   # Only metadata is read back.

  def save(name, **info):
    checkpoint.save(str(tmp_path / 'models' / name), variables,
                    checkpoint.CheckpointMeta(spec, (28, 28, 1), 'fashion_mnist', info))
    return f'models/{name}'

  ctx = _context(tmp_path)
  row = {'run_key': 'k1', 'method': 'uniform', 'kd': 'cached', 'dataset': 'd', 'accuracy': 0.5}
  new = save('new', run_key='k1')
  assert mode_prune._reused_row(ctx, dict(row, checkpoint=new))['checkpoint'] == new
  old = save('old', method='uniform', kd='cached', dataset='d', accuracy=0.5)   # No run key.
  for path in (str(tmp_path / old), f'/elsewhere/runs/grid/{old}', old):
    assert mode_prune._reused_row(ctx, dict(row, checkpoint=path))['checkpoint'] == old
  overwritten = save('other', method='uniform', kd='cached', dataset='d', accuracy=0.25)
  for path in (overwritten, save('other_key', run_key='k2'), 'models/gone'):
    assert 'checkpoint' not in mode_prune._reused_row(ctx, dict(row, checkpoint=path))
  assert ctx.relative(str(tmp_path / 'tradeoff.png')) == 'tradeoff.png'
  assert ctx.relative('/elsewhere/source') == '/elsewhere/source'
  assert ctx.resolve(new) == str(tmp_path / new) and ctx.resolve('/a/b') == '/a/b'


@requires_fashion_mnist
def test_grid_runs_keep_their_own_networks_under_relative_paths(tmp_path):
  from ttmpd_jax import checkpoint
  out = tmp_path / 'grid'
  common = (f'--output_dir={out}', f'--data_dir={FASHION_MNIST_DIR}',
            f'--latency_cache_dir={tmp_path / "latency"}')
  result = run_main(*common, *FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((out / 'report.json').read_text())
  runs = report['runs']
  assert len(runs) == 4 and {(r['model'], r['seed']) for r in runs} == {
      (m, s) for m in ('resnet8', 'vgg_small') for s in (0, 1)}
  paths = [r['checkpoint'] for r in runs]
  assert len(set(paths)) == 4, paths                    # One network per run, none overwritten.
  for path in [*paths, report['source_checkpoint'], report['plot'], report['grid_plot'],
               *(r['source_checkpoint'] for r in runs)]:
    assert _relative(path), path
    assert os.path.exists(out / path), path
  assert len({r['source_checkpoint'] for r in runs}) == 2   # One source model per architecture.
  for row in runs:
    variables, meta = checkpoint.load(str(out / row['checkpoint']))
    assert meta.spec.name == row['model'] and meta.info['run_key'] == row['run_key']
    assert meta.info['seed'] == row['seed']
    assert dict(meta.spec.widths) == row['widths'], row['checkpoint']
    assert dict(meta.spec.with_widths_of(variables).widths) == row['widths']
    assert row['checkpoint'].startswith(
        f'models/uniform_cached_{row["model"]}_fashion_mnist_c_gaussian_noise_5_s{row["seed"]}_')
  work = os.listdir(out / 'work')     # Resume state: one folder per run, named by its key.
  assert len({w for r in runs for w in work if r['run_key'] in w}) == 4

  # --checkpoint as a report holds it (relative to --output_dir) evaluates that run's network.
  row = runs[-1]
  evaluated = run_main('--mode=evaluate', f'--checkpoint={row["checkpoint"]}', *common,
                       '--corruptions=gaussian_noise', '--severities=5', '--test_limit=300')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  evaluation = json.loads((out / 'report.json').read_text())
  assert evaluation['checkpoint'] == row['checkpoint']
  (shifted,) = [r for r in evaluation['evaluation']
                if r['dataset'] == 'fashion_mnist_c/gaussian_noise_5']
  assert abs(shifted['accuracy'] - row['accuracy']) <= 1e-6
