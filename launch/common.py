"""Flags shared by every mode, and the run context that turns them into library calls.

Configuration enters here and only here: the library (``ttmpd_jax``) takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

from absl import flags

from ttmpd_jax import checkpoint, train
from ttmpd_jax.fileio import write_json_atomic
from ttmpd_jax.data import datasets, fashion_mnist
from ttmpd_jax.distill import distributed
from ttmpd_jax.errors import OutputError, UserError
from ttmpd_jax.runlock import RunLock
from ttmpd_jax.models import MODEL_NAMES, ModelSpec, build_model

FLAGS = flags.FLAGS

flags.DEFINE_string('output_dir', 'runs/default', 'Where checkpoints, report.json and plots go.')
flags.DEFINE_integer('seed', 0, 'Seed for initialisation, shuffling and subset selection.')
# Model.
flags.DEFINE_enum('model', 'resnet8', MODEL_NAMES, 'Source model architecture (model zoo).')
flags.DEFINE_integer('base_width', None, 'Base channel width of the model (zoo default if unset).')
flags.DEFINE_bool('small_input', None, 'ImageNet-style models: 3x3/1 stem for small images.')
flags.DEFINE_string('checkpoint', None, 'Source model checkpoint directory. Default: '
                    '<output_dir>/checkpoints/source_<model>_<config hash>; trained if missing.')
# Data.
flags.DEFINE_string('dataset', 'fashion_mnist', 'Clean source dataset (fashion_mnist, cifar10, '
                    'or a prepared TFDS name).')
flags.DEFINE_string('data_dir', fashion_mnist.DEFAULT_DIR,
                    'Folder with the Fashion-MNIST IDX .gz files.')
flags.DEFINE_string('tfds_data_dir', None, 'TFDS data folder (prepared datasets).')
flags.DEFINE_list('corruptions', ['gaussian_noise', 'defocus_blur', 'fog', 'contrast'],
                  'Corruptions applied to the clean test split to build the shifted test sets.')
flags.DEFINE_list('severities', ['5'], 'Corruption severities (1..5).')
flags.DEFINE_list('test_datasets', [], 'Extra shifted test sets by name, e.g. '
                  'cifar10_corrupted/fog_5 (TFDS) or fashion_mnist_c/fog_3.')
flags.DEFINE_integer('test_limit', None, 'Use only the first N examples of each test set.')
flags.DEFINE_integer('corruption_seed', 0, 'Seed of the corruption noise (fixed test sets).')
# Pretraining.
flags.DEFINE_float('epochs', 2.0, 'Source pretraining epochs.')
flags.DEFINE_integer('batch_size', 128, 'Source pretraining batch size (global).')
flags.DEFINE_float('learning_rate', 0.1, 'Peak SGD learning rate for source pretraining.')
flags.DEFINE_float('weight_decay', 5e-4, 'Weight decay for source pretraining.')
flags.DEFINE_integer('train_limit', None, 'Use only N training examples (quick experiments).')
flags.DEFINE_integer('eval_batch_size', 500, 'Batch size for evaluation.')
# Multi-host.
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() first (multi-host '
                  'GPU/TPU jobs; see BUILD.md).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (clusters JAX cannot '
                    'auto-detect).')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-host job.')
flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-host job.')


def _check_severities(values) -> bool:
  for v in values:
    if not v.strip().isdigit() or not 1 <= int(v) <= 5:
      raise flags.ValidationError(f'--severities: each severity must be an integer in 1..5, '
                                  f'got {v!r}')
  return True


def check_corruptions(values) -> bool:
  from ttmpd_jax.data import corruptions
  unknown = [c for c in values if c not in corruptions.CORRUPTIONS]
  if unknown:
    raise flags.ValidationError(
        f'unknown corruption(s) {", ".join(unknown)}; valid names: '
        f'{", ".join(corruptions.CORRUPTIONS)}')
  return True


def _check_positive_or_none(value) -> bool:
  return value is None or value > 0


flags.register_validator('severities', _check_severities)
flags.register_validator('corruptions', check_corruptions)
for _name in ('test_limit', 'train_limit', 'base_width'):
  flags.register_validator(_name, _check_positive_or_none, f'--{_name} must be positive')
flags.register_validator('epochs', lambda v: v > 0, '--epochs must be positive')
flags.register_validator('batch_size', lambda v: v > 0, '--batch_size must be positive')
flags.register_validator('eval_batch_size', lambda v: v > 0, '--eval_batch_size must be positive')


def log(message: str) -> None:
  """Prints a progress line; in a multi-process job only process 0 prints (the others repeat it)."""
  if distributed.is_primary():
    print(message, flush=True)


def ensure_writable_dir(path: str, flag: str = '--output_dir') -> str:
  """Creates ``path`` if needed and checks that we can write into it."""
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test_'):
      pass
  except OSError as e:
    raise OutputError(f'{flag}={path} is not a writable directory ({e.strerror or e})') from e
  return path


def check_writable_dir(path: str, label: str) -> None:
  """Checks that folder ``path`` exists and is writable, or could be created; creates nothing.

  Design choice: the test is a real temporary file in the folder (or its nearest existing
  ancestor), not ``os.access``: it also catches read-only mounts, full quotas, and runs as root.
  """
  path = os.path.abspath(os.path.expanduser(path))
  probe = path
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise OutputError(f'{label}: {probe} is not a folder, so {path} cannot be written; remove '
                      'or rename it, or choose another --output_dir')
  try:
    with tempfile.NamedTemporaryFile(dir=probe, prefix='.write_test_'):
      pass
  except OSError as e:
    raise OutputError(f'{label}: cannot write into {probe} ({e.strerror or e}); fix its '
                      'permissions or choose another --output_dir') from e


def check_writable_file(path: str, label: str) -> None:
  """Checks that file ``path`` can be (re)written atomically: its folder is writable and the
  path is not a folder itself. The file's own mode does not matter (it is replaced by rename)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    raise OutputError(f'{label}: {path} is a folder, but the run writes a file there; remove or '
                      'rename it, or choose another --output_dir')
  check_writable_dir(os.path.dirname(path), label)


_OUTPUT_LOCK: Optional[RunLock] = None


def release_output_lock() -> None:
  """Frees the ``--output_dir`` lock of this process (idempotent; the launcher calls it)."""
  global _OUTPUT_LOCK
  if _OUTPUT_LOCK is not None:
    _OUTPUT_LOCK.release()
    _OUTPUT_LOCK = None


def format_table(header: list[str], rows: list[list[Any]]) -> str:
  """A plain fixed-width text table."""
  cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4f}' if abs(value) < 10 else f'{value:.1f}'
  return str(value)


@dataclasses.dataclass
class SourceModel:
  spec: ModelSpec
  model: Any
  variables: Any
  meta: checkpoint.CheckpointMeta
  path: str
  trained_now: bool


class Context:
  """What every mode needs, built from the shared flags."""

  def __init__(self):
    from ttmpd_jax.distill import distributed
    self.hosts = distributed.initialize(
        FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    self.output_dir = ensure_writable_dir(FLAGS.output_dir)
    self.seed = FLAGS.seed
    self.start_time = time.time()
    self._cache: dict[str, Any] = {}

  def lock_output_dir(self) -> None:
    """Takes the exclusive lock on ``--output_dir`` for this run (process 0 of a job only).

    Released by ``release_output_lock()`` (the launcher calls it on every exit path); the
    kernel frees it if the process dies. Refuses with a ``UserError`` naming the running pid.
    """
    global _OUTPUT_LOCK
    if self.hosts.get('process_index', 0) != 0 or _OUTPUT_LOCK is not None:
      return
    _OUTPUT_LOCK = RunLock.acquire(self.output_dir, label=f'--output_dir={self.output_dir}',
                                   log=log)

  # ---- pre-flight ---------------------------------------------------------------------------
  def preflight(self, extra_paths: Sequence[str] = (), *, folders: Sequence[str] = (),
                report: str = 'report.json', source: bool = True, data: bool = True,
                shifted: bool = True, train_data: bool = False, latency: bool = False) -> None:
    """Checks, before any long work, what the run will need; raises ``UserError`` on a mismatch.

    Args:
      extra_paths: further files the run writes (plots...), relative to ``--output_dir``.
      folders: subfolders of ``--output_dir`` the run writes (``models``, ``work``...);
        ``checkpoints`` is added when the source model will be pretrained.
      report: the report file name.
      source: the run uses the source model (``--checkpoint`` or the default one).
      data: the run reads the clean test set (and, with ``shifted``, the shifted test sets of
        the flags); they are loaded (and cached) now, which checks they are readable, finite
        and in range, and that the source model takes their images and classes.
      train_data: the run reads the training split (pretraining, EPSD).
      latency: the run uses the latency table (its folder or file must be writable).
    Design choice: everything here is cheap next to the run (reading files, no compilation
    beyond the corruption of the test sets, which the run would do first anyway), and every
    dataset loaded here is the cached one the run then uses.
    """
    for name in self.shifted_dataset_names() if data and shifted else ():
      datasets.check_name(name)
    meta = self._preflight_checkpoint() if source else None
    pretrain = source and meta is None
    self._preflight_outputs([report, *extra_paths],
                            [*folders, *(['checkpoints'] if pretrain else [])], latency)
    if train_data or pretrain:
      self.train_set()
    if data:
      self._preflight_data(meta, shifted, pretrain)
    log('pre-flight checks passed')

  def _preflight_outputs(self, files: Sequence[str], folders: Sequence[str],
                         latency: bool) -> None:
    for folder in folders:
      check_writable_dir(self.path(folder), f'--output_dir subfolder {folder}/')
    for name in files:
      check_writable_file(self.path(name), f'output file {name}')
    if latency and 'latency_cache_dir' in FLAGS:
      table = FLAGS['latency_table'].value if 'latency_table' in FLAGS else None
      if table:
        check_writable_file(table, f'--latency_table={table}')
      else:
        check_writable_dir(os.path.join(os.path.expanduser(FLAGS.latency_cache_dir), 'latency'),
                           f'--latency_cache_dir={FLAGS.latency_cache_dir}')

  def _preflight_checkpoint(self) -> Optional[checkpoint.CheckpointMeta]:
    """The source checkpoint's metadata (checked), or None when it will be pretrained."""
    if FLAGS.checkpoint:
      path = self.checkpoint_flag_path()
      meta = checkpoint.load_meta(path)
      requested = {'model': meta.spec.name, **{k: meta.spec.kwargs.get(k)
                                                for k in ('base_width', 'small_input')}}
      for flag, held in requested.items():
        if FLAGS[flag].present and FLAGS[flag].value != held:
          log(f'note: --checkpoint overrides --{flag}={FLAGS[flag].value}: the checkpoint holds '
              f'{flag}={held}')
      return meta
    spec = self.requested_spec(self.train_set().num_classes)
    path = self.default_checkpoint_path(spec)
    if not checkpoint.exists(path):
      return None
    meta = checkpoint.load_meta(path)
    checkpoint.check_spec(meta, spec, path)
    return meta

  def _preflight_data(self, meta: Optional[checkpoint.CheckpointMeta], shifted: bool,
                      pretrain: bool) -> None:
    """Loads the test sets; each must fit the source model (or, when it will be pretrained, the
    training split's image shape and classes)."""
    sets = [self.clean_test_set(), *(self.shifted_test_sets() if shifted else [])]
    for dataset in sets:
      if meta is not None:
        checkpoint.check_compatible(meta, dataset.image_shape, dataset.num_classes,
                                    f'dataset {dataset.name!r}', self._source_label())
      elif pretrain:
        train_set = self.train_set()
        if (dataset.image_shape, dataset.num_classes) != (train_set.image_shape,
                                                          train_set.num_classes):
          raise UserError(
              f'dataset {dataset.name!r} has {dataset.num_classes} classes of '
              f'{"x".join(map(str, dataset.image_shape))} images, but the model is pretrained '
              f'on --dataset={FLAGS.dataset} ({train_set.num_classes} classes of '
              f'{"x".join(map(str, train_set.image_shape))}); use test sets of that family')

  def _source_label(self) -> str:
    return f'--checkpoint={FLAGS.checkpoint}' if FLAGS.checkpoint else 'the source checkpoint'

  def checkpoint_flag_path(self) -> str:
    """``--checkpoint`` as an absolute path. A relative one is taken from the working directory,
    or else from ``--output_dir`` (the paths reports hold are relative to it)."""
    path = os.path.expanduser(FLAGS.checkpoint)
    if not os.path.exists(path) and os.path.exists(self.resolve(path)):
      path = self.resolve(path)
    path = os.path.abspath(path)
    if not os.path.exists(path):
      also = '' if os.path.isabs(os.path.expanduser(FLAGS.checkpoint)) else (
          f' (nor does {self.resolve(FLAGS.checkpoint)})')
      raise UserError(f'--checkpoint={path} does not exist{also}; pass the folder of a '
                      'checkpoint written by --mode=pretrain or --mode=prune')
    if not checkpoint.exists(path):
      raise UserError(f'--checkpoint={path} is a file, not a checkpoint folder; pass the folder '
                      'of a checkpoint written by --mode=pretrain or --mode=prune')
    return path

  # ---- model --------------------------------------------------------------------------------
  def requested_spec(self, num_classes: int) -> ModelSpec:
    kwargs: dict[str, Any] = {}
    if FLAGS.base_width is not None:
      kwargs['base_width'] = FLAGS.base_width
    if FLAGS.small_input is not None:
      kwargs['small_input'] = FLAGS.small_input
    return ModelSpec(FLAGS.model, num_classes, kwargs)

  def _train_config(self, spec: ModelSpec) -> dict[str, Any]:
    return {'spec': spec.to_json(), 'dataset': FLAGS.dataset, 'epochs': FLAGS.epochs,
            'batch_size': FLAGS.batch_size, 'learning_rate': FLAGS.learning_rate,
            'weight_decay': FLAGS.weight_decay, 'train_limit': FLAGS.train_limit,
            'seed': FLAGS.seed}

  def default_checkpoint_path(self, spec: ModelSpec) -> str:
    digest = hashlib.sha256(json.dumps(self._train_config(spec), sort_keys=True).encode())
    return os.path.join(self.output_dir, 'checkpoints',
                        f'source_{spec.name}_{digest.hexdigest()[:10]}')

  def source_model(self, spec: Optional[ModelSpec] = None) -> SourceModel:
    """Loads the source checkpoint if it exists (and matches), otherwise pretrains and saves it.

    ``spec`` (a benchmark grid's architecture) replaces the model flags; --checkpoint then
    does not apply (one source model per architecture, keyed like the default one).
    """
    cache_key = 'source' if spec is None else 'source:' + json.dumps(spec.to_json(),
                                                                     sort_keys=True)
    if cache_key in self._cache:
      return self._cache[cache_key]
    if FLAGS.checkpoint and spec is None:
      path = self.checkpoint_flag_path()
      variables, meta = checkpoint.load(path)
      log(f'loaded checkpoint {path} ({meta.spec.name})')
      trained = False
    else:
      train_set = self.train_set()
      spec = spec or self.requested_spec(train_set.num_classes)
      path = self.default_checkpoint_path(spec)
      if checkpoint.exists(path):
        variables, meta = checkpoint.load(path, expected_spec=spec)
        log(f'reusing source checkpoint {path}')
        trained = False
      else:
        variables, meta = self._pretrain(spec, train_set, path)
        trained = True
    source = SourceModel(meta.spec, build_model(meta.spec), variables, meta, path, trained)
    self._cache[cache_key] = source
    return source

  def _pretrain(self, spec: ModelSpec, train_set: datasets.Dataset, path: str):
    log(f'pretraining {spec.name} on {train_set.name} ({len(train_set)} examples, '
        f'{FLAGS.epochs:g} epochs, batch {FLAGS.batch_size}); checkpoint -> {path}')
    model = build_model(spec)
    validation = self.dataset(FLAGS.dataset, 'validation')
    variables, summary = train.pretrain(
        model, train_set, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay, seed=FLAGS.seed,
        validation_set=validation, print_fn=log)
    meta = checkpoint.CheckpointMeta(spec, train_set.image_shape, train_set.family,
                                     {'train_config': self._train_config(spec), **summary})
    try:
      checkpoint.save(path, variables, meta)
    except OSError as e:
      raise OutputError(f'cannot save the source checkpoint {path} ({e.strerror or e}); make '
                        '--output_dir writable or pass --checkpoint') from e
    log(f'saved source checkpoint {path}')
    return variables, meta

  # ---- data ---------------------------------------------------------------------------------
  def dataset(self, name: str, split: str = 'test', limit: Optional[int] = None):
    key = f'{name}:{split}:{limit}'
    if key not in self._cache:
      self._cache[key] = datasets.load(
          name, split, data_dir=FLAGS.data_dir, tfds_data_dir=FLAGS.tfds_data_dir,
          split_seed=0, corruption_seed=FLAGS.corruption_seed, limit=limit)
    return self._cache[key]

  def train_set(self):
    return self.dataset(FLAGS.dataset, 'train', FLAGS.train_limit)

  def clean_test_set(self):
    return self.dataset(FLAGS.dataset, 'test', FLAGS.test_limit)

  def shifted_dataset_names(self) -> list[str]:
    base = {'fashion_mnist': 'fashion_mnist_c', 'cifar10': 'cifar10_c'}.get(FLAGS.dataset)
    names = []
    if base is not None:
      names = [f'{base}/{c}_{s}' for c in FLAGS.corruptions for s in FLAGS.severities]
    elif FLAGS.corruptions and not FLAGS.test_datasets:
      raise UserError(f'--corruptions are generated on the fly only for fashion_mnist and '
                      f'cifar10; for --dataset={FLAGS.dataset} pass --test_datasets')
    return names + list(FLAGS.test_datasets)

  def shifted_test_sets(self):
    return [self.dataset(name, 'test', FLAGS.test_limit) for name in self.shifted_dataset_names()]

  # ---- outputs ------------------------------------------------------------------------------
  def path(self, *parts: str) -> str:
    return os.path.join(self.output_dir, *parts)

  def relative(self, path: str) -> str:
    """``path`` as reports hold it: relative to ``--output_dir`` when inside it (the folder can
    be moved or copied to another machine), else absolute (e.g. a ``--checkpoint`` elsewhere).
    A relative ``path`` is one already relative to ``--output_dir``."""
    path = os.path.abspath(self.resolve(path))
    rel = os.path.relpath(path, self.output_dir)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel

  def resolve(self, path: str) -> str:
    """A path read back from a report: a relative one is relative to ``--output_dir``; an
    absolute one (reports written before paths were relative) stays as it is."""
    return os.path.join(self.output_dir, os.path.expanduser(path))

  def write_report(self, report: dict[str, Any], name: str = 'report.json') -> str:
    """Writes ``report`` atomically; in a multi-process job process 0 writes, the others skip."""
    path = self.path(name)
    if not distributed.is_primary():
      return path
    try:
      write_json_atomic(path, report)
    except OSError as e:
      raise OutputError(f'cannot write {path} ({e.strerror or e}); fix --output_dir (results so '
                        'far are in the previous version of the file, if any)') from e
    log(f'wrote {path}')
    return path


def flag_values_for_report() -> dict[str, Any]:
  """The non-default flags of this run (recorded in report.json for reproducibility)."""
  values = {}
  for name in sorted(FLAGS):
    flag = FLAGS[name]
    if flag.present and not name.startswith(('flagfile', 'logtostderr', 'alsologtostderr')):
      values[name] = flag.value
  values['argv'] = sys.argv
  return values
