"""launch/main.py: user mistakes exit non-zero with one clear line and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FASHION_MNIST_DIR, requires_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'launch', 'main.py')


def run_main(*args, timeout=600):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def assert_user_error(result, *needles):
  output = result.stdout + result.stderr
  assert result.returncode != 0, output
  assert 'Traceback' not in output, output
  for needle in needles:
    assert needle in output, output


def test_unknown_corruption_lists_valid_names(tmp_path):
  result = run_main('--mode=evaluate', f'--output_dir={tmp_path}', '--corruptions=gaussian_nose')
  assert_user_error(result, 'gaussian_nose', 'gaussian_noise', 'defocus_blur')


@pytest.mark.parametrize('severity', ['0', '6', 'x'])
def test_severity_outside_range(tmp_path, severity):
  result = run_main('--mode=evaluate', f'--output_dir={tmp_path}', f'--severities={severity}')
  assert_user_error(result, '1..5')


def test_unknown_mode_and_flag(tmp_path):
  assert_user_error(run_main('--mode=fly', f'--output_dir={tmp_path}'), 'evaluate')
  assert_user_error(run_main('--not_a_flag=1'), 'not_a_flag')


def test_missing_dataset_folder(tmp_path):
  result = run_main('--mode=evaluate', f'--output_dir={tmp_path / "out"}',
                    f'--data_dir={tmp_path / "nope"}')
  assert_user_error(result, str(tmp_path / 'nope'), 'apt-get install -y dataset-fashion-mnist',
                    '--data_dir')


def test_unwritable_output_dir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  assert_user_error(run_main('--mode=evaluate', f'--output_dir={blocker / "sub"}'),
                    '--output_dir', 'not a writable directory')


def test_missing_and_corrupted_checkpoint(tmp_path):
  assert_user_error(run_main('--mode=evaluate', f'--output_dir={tmp_path / "o"}',
                             f'--checkpoint={tmp_path / "missing"}'), 'does not exist')
  bad = tmp_path / 'bad_ckpt'
  bad.mkdir()
  (bad / 'meta').mkdir()
  (bad / 'meta' / 'metadata').write_text('{not json')
  assert_user_error(run_main('--mode=evaluate', f'--output_dir={tmp_path / "o"}',
                             f'--checkpoint={bad}'), 'corrupted')
  assert (bad / 'meta' / 'metadata').read_text() == '{not json'  # Nothing overwritten.


@requires_fashion_mnist
def test_pretrain_then_evaluate_end_to_end(tmp_path):
  common = [f'--output_dir={tmp_path}', f'--data_dir={FASHION_MNIST_DIR}', '--base_width=4',
            '--train_limit=2560', '--epochs=1', '--batch_size=64', '--learning_rate=0.05', '--test_limit=500',
            '--corruptions=gaussian_noise,fog', '--severities=5']
  first = run_main('--mode=pretrain', *common)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'pretrain step' in first.stdout and 'ETA' in first.stdout
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['trained_now'] is True
  rows = {r['dataset']: r['accuracy'] for r in report['evaluation']}
  assert set(rows) == {'fashion_mnist (clean test)', 'fashion_mnist_c/gaussian_noise_5',
                       'fashion_mnist_c/fog_5'}
  assert rows['fashion_mnist (clean test)'] > 0.25
  second = run_main('--mode=evaluate', *common)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'reusing source checkpoint' in second.stdout and 'pretrain step' not in second.stdout
  assert json.loads((tmp_path / 'report.json').read_text())['trained_now'] is False
