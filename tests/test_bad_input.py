"""Bad input through launch/main.py: every user mistake fails cleanly and loses nothing.

Each failing case asserts: a non-zero exit status, stderr ending in exactly one line
``error: ...`` that names the problem, no traceback anywhere, and byte-identical files already on
disk (the source checkpoint, its report.json, the case's pre-existing report.json, any input file
the case damaged). Most cases fail in pre-flight, before any training or search. One tiny
checkpoint is pretrained once for the whole module (256 images, 4 steps).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import FASHION_MNIST_DIR, requires_fashion_mnist
from tests.test_cli import MAIN, ROOT, run_main

pytestmark = requires_fashion_mnist

QUICK = [f'--data_dir={FASHION_MNIST_DIR}', '--base_width=4', '--test_limit=64',
         '--corruptions=gaussian_noise', '--severities=5', '--train_limit=256', '--epochs=1',
         '--batch_size=64', '--eval_batch_size=64']
LATENCY = ['--latency_batch=8', '--latency_round_to=4', '--latency_repeats=2',
           '--latency_model_repeats=2', '--latency_validate=0']
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype('>f4'): 0x0D}


# ---- helpers ------------------------------------------------------------------------------------
def tree_hashes(*roots) -> dict[str, str]:
  """sha256 of every file under ``roots`` (files or folders), by path."""
  out = {}
  for root in map(str, roots):
    paths = [root] if os.path.isfile(root) else [
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    for path in paths:
      with open(path, 'rb') as f:
        out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_clean_failure(result, *needles, status=2):
  """Non-zero exit, one ``error:`` line last on stderr naming ``needles``, no traceback."""
  output = result.stdout + result.stderr
  assert result.returncode != 0, output[-3000:]
  if status is not None:
    assert result.returncode == status, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith('error: '), result.stderr[-3000:]
  assert sum(line.startswith('error: ') for line in lines) == 1, result.stderr[-3000:]
  for needle in needles:
    assert needle in lines[-1], lines[-1]


def write_idx(path, array: np.ndarray) -> None:
  array = np.asarray(array)
  header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim]) + struct.pack(
      f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A tiny pretrained checkpoint (and its report.json), plus mismatching checkpoints."""
  tmp = tmp_path_factory.mktemp('bad_input')
  result = run_main('--mode=pretrain', f'--output_dir={tmp / "source"}', *QUICK)
  assert result.returncode == 0, result.stderr[-3000:]
  (checkpoint,) = (tmp / 'source' / 'checkpoints').iterdir()
  import jax
  from ttmpd_jax import checkpoint as ckpt
  from ttmpd_jax.models import ModelSpec, build_model
  others = {}  # Zero weights of the right shapes: only the shapes matter here (no compilation).
  for name, classes, shape, family in [('rgb32', 10, (32, 32, 3), 'cifar10'),
                                       ('classes5', 5, (28, 28, 1), 'fashion_mnist')]:
    spec = ModelSpec('resnet8', classes, {'base_width': 4})
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                             ckpt.abstract_variables(build_model(spec), shape))
    others[name] = ckpt.save(str(tmp / name), variables, ckpt.CheckpointMeta(spec, shape, family))
  return {'tmp': tmp, 'dir': tmp / 'source', 'checkpoint': checkpoint, **others}


@pytest.fixture
def case(source, tmp_path):
  """Runs one failing command and checks that nothing on disk changed."""
  out = tmp_path / 'out'
  out.mkdir()
  shutil.copy(source['dir'] / 'report.json', out / 'report.json')

  def run(*args, needles=(), watch=(), status=2, use_checkpoint=True, output_dir=None,
          locked_by_other=False):
    before = tree_hashes(source['dir'], out, *watch)
    flags = [f'--output_dir={output_dir or out}', *QUICK]
    if use_checkpoint:
      flags.append(f'--checkpoint={source["checkpoint"]}')
    start = time.time()
    result = run_main(*flags, *args)
    assert_clean_failure(result, *needles, status=status)
    assert tree_hashes(source['dir'], out, *watch) == before
    if not locked_by_other:
      assert not os.path.exists(out / '.ttmpd.lock')  # The lock was released.
    return result, time.time() - start

  run.out = out
  return run


def data_dir_with(tmp_path, **files) -> str:
  """A Fashion-MNIST folder: the real files, except ``files`` (name -> array or bytes)."""
  folder = tmp_path / 'data'
  folder.mkdir()
  for name in os.listdir(FASHION_MNIST_DIR):
    os.symlink(os.path.join(FASHION_MNIST_DIR, name), folder / name)
  for name, content in files.items():
    name = name.replace('_', '-') + '.gz'
    os.unlink(folder / name)
    if isinstance(content, bytes):
      (folder / name).write_bytes(content)
    else:
      write_idx(folder / name, content)
  return str(folder)


TEST_IMAGES, TEST_LABELS = 't10k_images_idx3_ubyte', 't10k_labels_idx1_ubyte'
LABELS_100 = np.arange(100, dtype=np.uint8) % 10


def _float_images(value=0.5, bad=None):
  images = np.full((100, 28, 28), value, dtype='>f4')
  if bad is not None:
    images[3, 4, 5] = bad
  return images


# ---- data files ---------------------------------------------------------------------------------
@pytest.mark.parametrize('kind,needle', [
    ('truncated', 'truncated or corrupted'),
    ('bad_magic', 'bad magic number'),
    ('not_gzip', 'cannot read IDX file'),
    ('header_only', 'IDX header truncated'),
])
def test_malformed_idx_file(case, tmp_path, kind, needle):
  real = gzip.open(os.path.join(FASHION_MNIST_DIR, 't10k-images-idx3-ubyte.gz')).read()
  content = {'truncated': real[:len(real) // 2], 'bad_magic': b'\x01\x02' + real[2:4096],
             'not_gzip': None, 'header_only': real[:6]}[kind]
  blob = b'this is not gzip data' if content is None else gzip.compress(content)
  data = data_dir_with(tmp_path, **{TEST_IMAGES: blob})
  case(f'--data_dir={data}', needles=('t10k-images-idx3-ubyte.gz', needle, '--data_dir'),
       watch=[data])


@pytest.mark.parametrize('images,labels,needle', [
    (_float_images(bad=np.nan), LABELS_100, 'NaN or infinite'),
    (_float_images(bad=np.inf), LABELS_100, 'NaN or infinite'),
    (_float_images(value=2.0), LABELS_100, 'must lie in [0, 1]'),
    (_float_images(), np.full(100, 12, np.uint8), 'labels must lie in 0..9'),
    (_float_images(), LABELS_100[:50], 'do not match'),
], ids=['nan_pixel', 'inf_pixel', 'pixels_above_1', 'label_out_of_range', 'count_mismatch'])
def test_bad_pixel_or_label_values(case, tmp_path, images, labels, needle):
  data = data_dir_with(tmp_path, **{TEST_IMAGES: images, TEST_LABELS: labels})
  _, seconds = case(f'--data_dir={data}', needles=('t10k-', needle), watch=[data])
  assert seconds < 60  # Pre-flight: no training, no search.


def test_missing_data_folder(case, tmp_path):
  case(f'--data_dir={tmp_path / "nowhere"}',
       needles=(str(tmp_path / 'nowhere'), 'apt-get install -y dataset-fashion-mnist'))


# ---- dataset names ------------------------------------------------------------------------------
@pytest.mark.parametrize('args,needles', [
    (['--test_datasets=fashion_mnist_c/gausian_noise_5'], ('gausian_noise', "'gaussian_noise'")),
    (['--test_datasets=fashion_mnist_c/fog_9'], ('1..5',)),
    (['--test_datasets=fashion_mnist_c/fog'], ('fashion_mnist_c/<corruption>_<severity>',)),
    (['--test_datasets=fashion_mnst_c/fog_5'], ("did you mean 'fashion_mnist_c'",)),
    (['--dataset=fashon_mnist', '--corruptions=', '--test_datasets=fashion_mnist_c/fog_5'],
     ("did you mean 'fashion_mnist'",)),
    (['--corruptions=gaussian_nose'], ('gaussian_nose', 'gaussian_noise')),
], ids=['misspelt_corruption', 'severity_9', 'no_severity', 'misspelt_base', 'misspelt_dataset',
        'misspelt_corruptions_flag'])
def test_bad_dataset_names(case, args, needles):
  case(*args, needles=needles)


# ---- flags --------------------------------------------------------------------------------------
@pytest.mark.parametrize('args,needle', [
    (['--severities=6'], '1..5'),
    (['--epochs=0'], '--epochs must be positive'),
    (['--test_limit=-5'], '--test_limit must be positive'),
    (['--eval_batch_size=0'], '--eval_batch_size must be positive'),
    (['--model=resnet9999'], 'resnet8'),
    (['--mode=prune', '--latency_target=1.5'], 'latency_target'),
    (['--mode=epsd', '--epsd_sparsities=1.5'], 'epsd_sparsities'),
    (['stray_positional'], 'unexpected positional arguments: stray_positional'),
    (['--flagfile=/nonexistent/flags.cfg'], '/nonexistent/flags.cfg'),
], ids=['severity', 'epochs', 'test_limit', 'eval_batch', 'model', 'latency_target',
        'epsd_sparsity', 'positional', 'flagfile'])
def test_bad_flag_values(case, args, needle):
  case(*args, needles=(needle,), use_checkpoint=False)


# ---- checkpoints --------------------------------------------------------------------------------
def _damaged_copy(source, tmp_path, damage):
  bad = tmp_path / 'ckpt'
  shutil.copytree(source['checkpoint'], bad)
  damage(bad)
  return bad


def _truncate_variables(bad):
  for root, _, files in os.walk(bad / 'variables'):
    for name in files:
      if os.path.basename(root) == 'd':
        path = os.path.join(root, name)
        with open(path, 'rb') as f:
          head = f.read(20)
        with open(path, 'wb') as f:
          f.write(head)


@pytest.mark.parametrize('attempt', [1, 2, 3])
def test_corrupted_checkpoint_data_fails_quietly_every_time(case, source, tmp_path, attempt):
  """Orbax/tensorstore's "Event loop is closed" noise must never follow (it was intermittent)."""
  bad = _damaged_copy(source, tmp_path, _truncate_variables)
  result, _ = case(f'--checkpoint={bad}', needles=(str(bad), 'corrupted'), watch=[bad])
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize('damage,needle', [
    (lambda b: (b / 'meta' / 'metadata').write_text('{"format": "ttmpd_jax.check'), 'corrupted'),
    (lambda b: shutil.rmtree(b / 'variables'), 'corrupted'),
    (lambda b: (b / 'meta' / 'metadata').write_text('{"format": "other/2"}'),
     'not a ttmpd_jax checkpoint'),
], ids=['truncated_meta', 'variables_deleted', 'foreign_format'])
def test_damaged_checkpoint(case, source, tmp_path, damage, needle):
  bad = _damaged_copy(source, tmp_path, damage)
  case(f'--checkpoint={bad}', needles=(str(bad), needle), watch=[bad])


def test_missing_checkpoint(case, tmp_path):
  case(f'--checkpoint={tmp_path / "missing"}', needles=('does not exist',))


def test_checkpoint_is_a_file(case, tmp_path):
  (tmp_path / 'file').write_text('x')
  case(f'--checkpoint={tmp_path / "file"}', needles=('is a file, not a checkpoint folder',))


def test_checkpoint_for_other_image_shape(case, source):
  case(f'--checkpoint={source["rgb32"]}', needles=('32x32x3', '28x28x1'), watch=[source['rgb32']])


def test_checkpoint_for_other_class_count(case, source):
  case(f'--checkpoint={source["classes5"]}', needles=('5 classes', 'has 10'),
       watch=[source['classes5']])


# ---- latency tables -----------------------------------------------------------------------------
def _foreign_table(path):
  from ttmpd_jax.latency.table import LatencyTable
  table = LatencyTable.open(path=str(path), log=lambda s: None)
  table.save()
  data = json.loads(path.read_text())
  data['key']['jax_version'] = '0.0.1'
  path.write_text(json.dumps(data))


@pytest.mark.parametrize('mode', ['latency_table', 'prune'])
def test_foreign_latency_table(case, tmp_path, mode):
  table = tmp_path / 'foreign.json'
  _foreign_table(table)
  case(f'--mode={mode}', f'--latency_table={table}', *LATENCY,
       needles=(str(table), 'different device', 'jax_version=0.0.1'), watch=[table])


def test_corrupted_latency_table_with_on_corrupt_error(case, tmp_path):
  table = tmp_path / 'table.json'
  table.write_text('{"format": "ttmpd_jax.latency_table", "entr')
  case('--mode=latency_table', f'--latency_table={table}', '--latency_on_corrupt=error', *LATENCY,
       needles=(str(table), 'corrupted'), watch=[table])
  assert not os.path.exists(f'{table}.corrupt')


def test_latency_table_path_is_a_folder(case, tmp_path):
  (tmp_path / 'table_dir').mkdir()
  case('--mode=latency_table', f'--latency_table={tmp_path / "table_dir"}', *LATENCY,
       needles=(str(tmp_path / 'table_dir'),))


def test_unwritable_latency_cache_dir(case):
  case('--mode=latency_table', '--latency_cache_dir=/proc/ttmpd_cache', *LATENCY,
       needles=('/proc/ttmpd_cache',))


# ---- outputs ------------------------------------------------------------------------------------
def test_output_dir_is_a_file(case, tmp_path):
  (tmp_path / 'file').write_text('x')
  case(output_dir=tmp_path / 'file', needles=('--output_dir', 'not a writable directory'),
       watch=[tmp_path / 'file'])


def test_output_dir_on_read_only_file_system(case):
  case(output_dir='/proc/ttmpd_out', needles=('--output_dir=/proc/ttmpd_out',))


def test_report_json_is_a_folder(case, tmp_path):
  out = tmp_path / 'out2'
  (out / 'report.json').mkdir(parents=True)
  (out / 'report.json' / 'keep.txt').write_text('keep')
  case(output_dir=out, needles=('report.json', 'is a folder'), watch=[out])


def test_checkpoints_subfolder_is_a_file(case):
  """Pretraining would save into checkpoints/: found before training, not after it."""
  (case.out / 'checkpoints').write_text('not a folder')
  case('--mode=pretrain', use_checkpoint=False, needles=('checkpoints', 'is not a folder'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write into read-only folders')
def test_read_only_checkpoints_subfolder(case):
  (case.out / 'checkpoints').mkdir()
  os.chmod(case.out / 'checkpoints', 0o555)
  try:
    case('--mode=pretrain', use_checkpoint=False, needles=('checkpoints', 'cannot write'))
  finally:
    os.chmod(case.out / 'checkpoints', 0o755)


def test_report_json_is_strict_and_group_readable(source):
  path = source['dir'] / 'report.json'
  json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f'non-strict JSON: {c}'))
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


# ---- signals ------------------------------------------------------------------------------------
@pytest.mark.parametrize('sig,status,needle', [(signal.SIGINT, 130, 'interrupted (SIGINT)'),
                                               (signal.SIGTERM, 143, 'terminated (SIGTERM)')])
def test_signal_during_pretraining(source, tmp_path, sig, status, needle):
  out = tmp_path / 'out'
  out.mkdir()
  shutil.copy(source['dir'] / 'report.json', out / 'report.json')
  before = tree_hashes(out, source['dir'])
  flags = [f'--output_dir={out}', *QUICK, '--train_limit=20000', '--epochs=3']
  process = subprocess.Popen([sys.executable, MAIN, '--mode=pretrain', *flags], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED='1'))
  for line in process.stdout:
    if line.startswith('pretraining '):
      time.sleep(1.0)
      process.send_signal(sig)
      break
  stdout, stderr = process.communicate(timeout=120)
  result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
  assert_clean_failure(result, needle, 'rerun the same command', status=status)
  assert tree_hashes(out, source['dir']) == before
  assert not os.path.exists(out / '.ttmpd.lock')


# ---- concurrency --------------------------------------------------------------------------------
HOLDER = ('import sys, time; from ttmpd_jax.runlock import RunLock; '
          'lock = RunLock.acquire(sys.argv[1]); print("locked", flush=True); time.sleep(120)')


def _lock_holder(folder):
  process = subprocess.Popen([sys.executable, '-c', HOLDER, str(folder), '--pretend-run'],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == 'locked'
  return process


def test_second_run_on_a_locked_output_dir_is_refused(case):
  holder = _lock_holder(case.out)
  try:
    case(needles=('in use by another run', f'pid {holder.pid}', '--pretend-run'),
         locked_by_other=True)
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_is_taken_over_and_overridden_flags_are_reported(source, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  holder = _lock_holder(out)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert os.path.exists(out / '.ttmpd.lock')
  result = run_main('--mode=evaluate', f'--output_dir={out}', *QUICK, '--model=resnet20',
                    f'--checkpoint={source["checkpoint"]}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'taking over the stale lock' in result.stdout and f'pid {holder.pid}' in result.stdout
  # Pre-flight also reports the flag the checkpoint overrides.
  assert 'overrides --model=resnet20: the checkpoint holds model=resnet8' in result.stdout
  assert not os.path.exists(out / '.ttmpd.lock')
  assert json.loads((out / 'report.json').read_text())['mode'] == 'evaluate'


def test_lock_is_exclusive_within_the_library(tmp_path):
  from ttmpd_jax.errors import OutputLockedError
  from ttmpd_jax.runlock import RunLock
  with RunLock.acquire(str(tmp_path)):
    with pytest.raises(OutputLockedError, match=f'pid {os.getpid()}'):
      RunLock.acquire(str(tmp_path))
  with RunLock.acquire(str(tmp_path)) as again:  # Released: free again, without a stale note.
    assert again.previous is None


# ---- strict JSON and file modes -----------------------------------------------------------------
def test_write_json_atomic_is_strict_and_group_readable(tmp_path):
  from ttmpd_jax.fileio import write_json_atomic
  path = tmp_path / 'r.json'
  write_json_atomic(str(path), {'a': float('nan'), 'b': [float('inf'), np.float32(-np.inf)],
                                'c': np.arange(3), 'd': (1, np.float64(2.5)), 'e': np.nan})
  assert 'NaN' not in path.read_text() and 'Infinity' not in path.read_text()
  assert json.loads(path.read_text()) == {'a': None, 'b': [None, None], 'c': [0, 1, 2],
                                          'd': [1, 2.5], 'e': None}
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
  assert [p.name for p in tmp_path.iterdir()] == ['r.json']  # No temporary file left.
