"""Latency table: in-context latency measurements on *this* device, cached on disk.

An entry is one architecture of one model (the model's fingerprint, the input shape, the dtype
and the channels each prunable group keeps) measured end to end with ``latency.protocol``, as
a ratio to the unpruned model timed in the same rounds and as milliseconds, plus how busy the
machine was (``protocol.foreign_load``: CPU time other processes took during the measurement)
and the spread between repeats. ``latency.predictor`` fits its unit costs on these entries, so
a table holds *in-context* numbers: every fusion XLA performs inside the model is in them.

The file (JSON, written atomically: temp file + ``os.replace``) carries a **device key**
(device kind, platform, JAX/jaxlib versions, XLA flags, CPU model and core count on CPU hosts).
A table whose key differs from the current device's is refused, never silently used. A corrupted
file (or one of an older format) is reported, moved aside and rebuilt (or refused with
``on_corrupt='error'``) before anything is measured.

Design choice (no stale bias): entries measured while other processes used the CPU are flagged
``loaded`` (the spread between repeats is recorded too); :meth:`LatencyTable.stale` lists them
so that the predictor re-measures them as soon as the machine is quiet, instead of trusting them
for ever.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform as py_platform
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from ttmpd_jax.errors import UserError
from ttmpd_jax.fileio import write_json_atomic

FORMAT = 'ttmpd_jax.latency_table'
FORMAT_VERSION = 2


class TableError(UserError):
  """A latency table that cannot be used: wrong device/version, corrupted, or incomplete."""


# ---- device key --------------------------------------------------------------------------------
def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return py_platform.processor() or py_platform.machine()


def device_key(device: Optional[jax.Device] = None) -> dict[str, Any]:
  """What a table's numbers depend on. Two tables are interchangeable only if keys are equal.

  Design choice: on CPU the device kind is just 'cpu', so the CPU model name and the number of
  cores this process may use are part of the key. XLA compiler flags (``XLA_FLAGS``) change
  code generation (e.g. ``--xla_cpu_experimental_ynn_fusion_type=`` turns off the YNNPACK
  fusions, which changes CPU latencies by up to 2x), so they are part of the key when set;
  ``--xla_force_host_platform_device_count`` only splits the host into virtual devices and
  is left out.
  """
  device = device or jax.devices()[0]
  import jaxlib  # pylint: disable=g-import-not-at-top
  key = {'device_kind': str(device.device_kind), 'platform': str(device.platform),
         'jax_version': jax.__version__,
         'jaxlib_version': getattr(jaxlib, '__version__', jax.__version__)}
  if device.platform == 'cpu':
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    key['cpu_model'] = _cpu_model()
    key['cpu_cores'] = int(cores or 1)
  flags = codegen_flags()
  if flags:
    key['xla_flags'] = flags
  return key


_KEYLESS_FLAGS = ('--xla_force_host_platform_device_count',)


def codegen_flags(xla_flags: Optional[str] = None) -> str:
  """The ``XLA_FLAGS`` that can change compiled code, sorted and space-joined ('' if none)."""
  text = os.environ.get('XLA_FLAGS', '') if xla_flags is None else xla_flags
  flags = [f for f in text.split() if not f.startswith(_KEYLESS_FLAGS)]
  return ' '.join(sorted(flags))


def _slug(text: str) -> str:
  return ''.join(c if c.isalnum() or c in '.-' else '-' for c in text).strip('-') or 'device'


def default_table_path(cache_dir: str, key: Optional[Mapping[str, Any]] = None) -> str:
  """``<cache_dir>/latency/<device-kind>_<platform>_jax<version>_<key hash>.json``."""
  key = dict(key or device_key())
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
  name = f'{_slug(key["device_kind"])}_{key["platform"]}_jax{key["jax_version"]}_{digest}.json'
  return os.path.join(os.path.expanduser(cache_dir), 'latency', name)


def describe_key(key: Mapping[str, Any]) -> str:
  return ', '.join(f'{k}={v}' for k, v in sorted(key.items()))


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def load_average() -> Optional[float]:
  """1-minute load average of the host (None where the OS does not report it)."""
  try:
    return round(os.getloadavg()[0], 2)
  except (AttributeError, OSError):
    return None


def warn_if_busy(log: Callable[[str], None] = print, threshold: float = 0.5) -> bool:
  """Warns (and returns True) when the host's load average exceeds ``threshold`` x cores.

  CPU latencies measured next to other busy processes are inflated unevenly (XLA's own
  convolutions, split over all cores, suffer more than YNNPACK fusions), so such tables and
  validations should be redone on a quiet machine.
  """
  load = load_average()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  if load is not None and cores and jax.default_backend() == 'cpu' and load > threshold * cores:
    log(f'  warning: load average {load:.2f} on {cores} cores: other processes compete for the '
        f'CPU, latency measurements will be noisy and biased (re-run on a quiet machine)')
    return True
  return False


# ---- the table ---------------------------------------------------------------------------------
def _validate_entry(name: str, value: Any) -> dict[str, Any]:
  if not isinstance(value, dict):
    raise ValueError(f'entry {name!r} is not an object')
  for field in ('ms', 'ratio'):
    x = value.get(field)
    if not isinstance(x, (int, float)) or not np.isfinite(x) or x <= 0:
      raise ValueError(f'entry {name!r} has no positive "{field}"')
  return value


class LatencyTable:
  """In-context latency measurements (see module docstring) of one device.

  Attributes:
    key: the device key the numbers belong to (see :func:`device_key`).
    entries: entry key (``model fingerprint|input|dtype|kept channels``) -> {'ms': latency,
      'ratio': latency / unpruned model's latency in the same rounds, 'ref_ms', 'iqr_ms', 'n',
      'spread': IQR / median of the per-round ratios, 'foreign_load': CPU share other
      processes took meanwhile (0..1, None if unknown), 'loadavg', 'loaded': measured on a busy
      machine, 'source': 'probe' or 'correction', 'utc'}.
    models: model fingerprint -> {'description', 'corrections': [...]} (see the predictor).
    builds: one record per build that measured something (when, how many, seconds, load).
    path: file the table is saved to (None: in memory only).
    measured: entries measured by this process (0 on a fully cached run).
  """

  def __init__(self, key: Optional[Mapping[str, Any]] = None, path: Optional[str] = None,
               entries: Optional[dict] = None, models: Optional[dict] = None,
               builds: Optional[list] = None, log: Callable[[str], None] = print):
    self.key = dict(key if key is not None else device_key())
    self.path = path
    self.entries: dict[str, dict[str, Any]] = dict(entries or {})
    self.models: dict[str, dict[str, Any]] = dict(models or {})
    self.builds: list[dict[str, Any]] = list(builds or [])
    self.measured = 0
    self.log = log

  # ---- files --------------------------------------------------------------------------------
  @classmethod
  def open(cls, path: Optional[str] = None, cache_dir: Optional[str] = None,
           on_corrupt: str = 'rebuild', key: Optional[Mapping[str, Any]] = None,
           log: Callable[[str], None] = print) -> 'LatencyTable':
    """Loads the table at ``path`` (default: per-device file under ``cache_dir``) or starts one.

    Args:
      path: explicit table file. Its device key must match the current device.
      cache_dir: used when ``path`` is None: ``default_table_path(cache_dir)``.
      on_corrupt: 'rebuild' (say so, move the file to ``<path>.corrupt``, start empty) or
        'error' (raise :class:`TableError`).
      key: the current device key (default :func:`device_key`); tests pass fakes.
    Raises:
      TableError: the file belongs to another device / JAX version / XLA flags, or is
        corrupted and ``on_corrupt='error'``, or its folder is not writable.
    """
    if on_corrupt not in ('rebuild', 'error'):
      raise ValueError(f"on_corrupt must be 'rebuild' or 'error', got {on_corrupt!r}")
    key = dict(key if key is not None else device_key())
    if path is None:
      if cache_dir is None:
        raise ValueError('pass a table path or a cache_dir')
      path = default_table_path(cache_dir, key)
    path = os.path.abspath(os.path.expanduser(path))
    directory = os.path.dirname(path)
    try:  # Fail now, not after minutes of measuring, if the table cannot be saved.
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      raise TableError(f'cannot create the latency table folder {directory}: '
                       f'{e.strerror or e}') from e
    if not os.access(directory, os.W_OK):
      raise TableError(f'latency table folder {directory} is not writable')
    if not os.path.exists(path):
      return cls(key, path, log=log)
    try:
      data = cls._read(path)
    except ValueError as e:
      message = f'latency table {path} is corrupted ({e})'
      if on_corrupt == 'error':
        raise TableError(f'{message}; delete it to rebuild') from e
      backup = path + '.corrupt'
      os.replace(path, backup)
      log(f'warning: {message}; moved it to {backup} and rebuilding from scratch')
      return cls(key, path, log=log)
    if data['key'] != key:
      raise TableError(
          f'latency table {path} was measured on a different device, JAX version or XLA '
          f'flags and is refused.\n  table:   {describe_key(data["key"])}\n'
          f'  current: {describe_key(key)}\n'
          f'Pass a table built on this device, or delete the file to rebuild it here.')
    return cls(key, path, data['entries'], data.get('models', {}), data.get('builds', []),
               log=log)

  @staticmethod
  def _read(path: str) -> dict[str, Any]:
    """Parses and validates a table file; ValueError (with the reason) if it is malformed."""
    try:
      with open(path) as f:
        data = json.load(f)
    except UnicodeDecodeError as e:
      raise ValueError(f'not UTF-8 text: {e}') from e
    except json.JSONDecodeError as e:
      raise ValueError(f'invalid JSON: {e}') from e
    if not isinstance(data, dict) or data.get('format') != FORMAT:
      raise ValueError(f'not a latency table (missing "format": "{FORMAT}")')
    if data.get('version') != FORMAT_VERSION:
      raise ValueError(f'unsupported table version {data.get("version")!r}, expected '
                       f'{FORMAT_VERSION}')
    if not isinstance(data.get('key'), dict):
      raise ValueError('missing device "key"')
    entries, models = data.get('entries'), data.get('models', {})
    if not isinstance(entries, dict) or not isinstance(models, dict):
      raise ValueError('"entries" / "models" must be objects')
    if not isinstance(data.get('builds', []), list):
      raise ValueError('"builds" must be a list')
    for name, value in entries.items():
      _validate_entry(name, value)
    return data

  def save(self, path: Optional[str] = None) -> str:
    """Writes the table atomically (temp file + rename): readers never see a partial file."""
    path = path or self.path
    if not path:
      raise ValueError('LatencyTable.save: no path')
    path = os.path.abspath(path)
    data = {'format': FORMAT, 'version': FORMAT_VERSION, 'key': self.key, 'updated': utc_now(),
            'builds': self.builds, 'models': self.models,
            'entries': dict(sorted(self.entries.items()))}
    try:
      write_json_atomic(path, data, indent=1)
    except OSError as e:
      raise TableError(f'cannot write latency table {path}: {e.strerror or e}') from e
    self.path = path
    return path

  # ---- entries ------------------------------------------------------------------------------
  def __len__(self) -> int:
    return len(self.entries)

  def get(self, key: str) -> Optional[dict[str, Any]]:
    return self.entries.get(key)

  def put(self, key: str, entry: Mapping[str, Any]) -> None:
    self.entries[key] = _validate_entry(key, dict(entry))

  def missing(self, keys: Iterable[str]) -> list[str]:
    """``keys`` not in the table, in order, without repeats."""
    seen: set[str] = set()
    out = []
    for k in keys:
      if k not in self.entries and k not in seen:
        seen.add(k)
        out.append(k)
    return out

  def stale(self, keys: Iterable[str]) -> list[str]:
    """``keys`` whose entries were measured on a busy machine (``loaded``)."""
    return [k for k in keys if self.entries.get(k, {}).get('loaded')]


def entry_digest(data: Any) -> str:
  """Short stable digest of JSON-able data (model fingerprints)."""
  return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = ['FORMAT', 'LatencyTable', 'TableError', 'default_table_path', 'describe_key',
           'device_key', 'entry_digest', 'load_average', 'warn_if_busy']
