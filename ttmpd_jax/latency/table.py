"""Latency lookup table: measured unit latencies on *this* device, cached on disk, interpolated.

Entries are keyed by ``(UnitConfig, c_in, c_out)``: batch, input spatial size, kernel, stride,
padding, groups, BatchNorm/bias, following pooling, dtype, channels. They are measured with the
protocol of ``latency.protocol`` on a jit-compiled stand-alone unit (conv -> BatchNorm in
inference form, exactly the ops Flax emits -> + residual input if the model adds one -> ReLU ->
the model's pooling if one follows; or dense -> bias -> ReLU).

The file (JSON, written atomically: temp file + ``os.replace``) carries a **device key**
(device kind, platform, JAX/jaxlib versions, CPU model and core count on CPU hosts). A table whose
key differs from the current device's is refused, never silently used. A corrupted file is
reported, moved aside and rebuilt (or refused with ``on_corrupt='error'``) before anything is
measured, so a run never dies half-way through because of it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform as py_platform
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ttmpd_jax.fileio import write_json_atomic
from ttmpd_jax.errors import UserError
from ttmpd_jax.latency import protocol
from ttmpd_jax.latency.structure import UnitConfig

FORMAT = 'ttmpd_jax.latency_table'
FORMAT_VERSION = 1
BN_EPSILON = 1e-5

Request = tuple[UnitConfig, int, int]  # (config, c_in, c_out)


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


def _utc_now() -> str:
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


# ---- measuring units ---------------------------------------------------------------------------
def unit_function(config: UnitConfig) -> Callable:
  """The stand-alone jitted unit ``f(x, *params) -> y`` for ``config`` (see module docstring)."""
  if config.kind == 'dense':
    def dense(x, kernel, *bias):
      y = x @ kernel
      if bias:
        y = y + bias[0]
      return jax.nn.relu(y)
    return jax.jit(dense)

  spatial = len(config.in_spatial)
  if spatial != 2:
    raise TableError(f'latency table: only 2-D convolutions are supported, got {config.key()}')

  def conv(x, kernel, *rest):
    groups = x.shape[-1] if config.depthwise else config.groups
    y = lax.conv_general_dilated(x, kernel, config.strides, config.padding,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                 feature_group_count=groups)
    rest = list(rest)
    if config.bias:
      y = y + rest.pop(0)
    if config.batchnorm:  # Flax BatchNorm in inference mode, op for op.
      mean, var, scale, bias = rest[:4]
      y = (y - mean) * (lax.rsqrt(var + BN_EPSILON) * scale) + bias
    if config.residual:
      y = y + rest[-1]
    y = jax.nn.relu(y)
    if config.pool and config.pool[0] == 'max':
      _, window, strides, padding = config.pool
      y = lax.reduce_window(y, -jnp.inf, lax.max, window, strides, padding)
    elif config.pool and config.pool[0] == 'mean':
      y = jnp.mean(y, axis=(1, 2))
    return y

  return jax.jit(conv)


def unit_arguments(config: UnitConfig, c_in: int, c_out: int, rng: np.random.Generator,
                   x: Optional[jax.Array] = None) -> tuple:
  """Device arrays ``(x, *params)`` for one unit; ``x`` may be shared between entries."""
  dtype = jnp.dtype(config.dtype)

  def normal(*shape):
    return jax.device_put(jnp.asarray(0.1 * rng.standard_normal(shape), dtype))

  if config.kind == 'dense':
    args = [x if x is not None else normal(config.batch, c_in), normal(c_in, c_out)]
    if config.bias:
      args.append(normal(c_out))
    return tuple(args)
  if config.depthwise and c_in != c_out:
    raise ValueError(f'depthwise unit needs c_in == c_out, got {c_in}, {c_out}')
  groups = c_in if config.depthwise else config.groups
  if c_in % groups or c_out % groups:
    raise ValueError(f'channels ({c_in}, {c_out}) not divisible by groups {groups}')
  args = [x if x is not None else normal(config.batch, *config.in_spatial, c_in),
          normal(*config.kernel, c_in // groups, c_out)]
  if config.bias:
    args.append(normal(c_out))
  if config.batchnorm:
    args += [normal(c_out), jax.device_put(jnp.ones((c_out,), dtype)), normal(c_out),
             normal(c_out)]
  if config.residual:
    args.append(normal(config.batch, *config.out_spatial, c_out))
  return tuple(args)


PATHS = ('xla', 'ynn')


def execution_path(compiled: Any) -> str:
  """'ynn' if XLA:CPU compiled (part of) the unit into a YNNPACK fusion, else 'xla'.

  Recent XLA:CPU hands convolutions it deems suitable, and whole chains of them inside a model,
  to YNNPACK; such units and XLA's own convolutions react differently to being fused with
  their neighbours and to background load, so the predictor can scale the two separately.
  """
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return 'xla'
  entry = text[text.find('ENTRY'):] if 'ENTRY' in text else text
  return 'ynn' if 'ynn' in entry.lower() else 'xla'


def input_shape_of(config: UnitConfig, c_in: int) -> tuple[int, ...]:
  if config.kind == 'dense':
    return (config.batch, c_in)
  return (config.batch, *config.in_spatial, c_in)


# ---- interpolation -----------------------------------------------------------------------------
def _segment(grid: np.ndarray, value: float) -> tuple[int, float]:
  """Index i and weight t with value = (1 - t) * grid[i] + t * grid[i + 1]; t in [0, 1]."""
  if grid.size == 1:
    return 0, 0.0
  value = min(max(value, grid[0]), grid[-1])
  i = int(np.clip(np.searchsorted(grid, value, side='right') - 1, 0, grid.size - 2))
  return i, float((value - grid[i]) / (grid[i + 1] - grid[i]))


def _outside_scale(grid: np.ndarray, value: float) -> float:
  """1 up to the largest grid value, proportional scaling (latency ~ channels) above it."""
  if value > grid[-1]:
    return value / grid[-1]
  return 1.0


def interpolate(c_in_grid: Sequence[int], c_out_grid: Sequence[int], values: np.ndarray,
                c_in: float, c_out: float) -> float:
  """Bilinear interpolation of ``values[c_in_grid, c_out_grid]`` (ms) at ``(c_in, c_out)``.

  Exact at grid points; monotone wherever the entries are (bilinear weights are in [0, 1]).
  Design choice: below the smallest measured count (e.g. fewer than ``round_to`` channels) the
  boundary value is kept: on CPUs tiny layers are overhead- and memory-bound, so assuming that
  pruning below the grid saves nothing is the conservative choice ("pruned but not faster").
  Above the largest count (wider than the measured model) latency is scaled in proportion.
  """
  xs = np.asarray(c_in_grid, np.float64)
  ys = np.asarray(c_out_grid, np.float64)
  v = np.asarray(values, np.float64).reshape(xs.size, ys.size)
  i, tx = _segment(xs, c_in)
  j, ty = _segment(ys, c_out)
  i1 = min(i + 1, xs.size - 1)
  j1 = min(j + 1, ys.size - 1)
  inside = ((1 - tx) * ((1 - ty) * v[i, j] + ty * v[i, j1])
            + tx * ((1 - ty) * v[i1, j] + ty * v[i1, j1]))
  return float(inside * _outside_scale(xs, c_in) * _outside_scale(ys, c_out))


def interpolate_diagonal(grid: Sequence[int], values: np.ndarray, c: float) -> float:
  """Piecewise-linear interpolation along one axis (depthwise units: c_in == c_out == c)."""
  xs = np.asarray(grid, np.float64)
  v = np.asarray(values, np.float64).reshape(xs.size)
  i, t = _segment(xs, c)
  i1 = min(i + 1, xs.size - 1)
  return float(((1 - t) * v[i] + t * v[i1]) * _outside_scale(xs, c))


# ---- the table ---------------------------------------------------------------------------------
def entry_key(config: UnitConfig, c_in: int, c_out: int) -> str:
  return f'{config.key()}|ci{int(c_in)}|co{int(c_out)}'


def _validate_entry(name: str, value: Any) -> dict[str, Any]:
  if not isinstance(value, dict) or not isinstance(value.get('ms'), (int, float)):
    raise ValueError(f'entry {name!r} has no numeric "ms"')
  ms = float(value['ms'])
  if not np.isfinite(ms) or ms <= 0:
    raise ValueError(f'entry {name!r} has a non-positive latency {ms}')
  return value


class LatencyTable:
  """Unit latencies (ms) measured on one device, plus cached end-to-end model latencies.

  Attributes:
    key: the device key the numbers belong to (see :func:`device_key`).
    entries: ``entry_key(config, c_in, c_out)`` -> {'ms', 'iqr_ms', 'n'}.
    end_to_end: architecture key -> {'ms', 'iqr_ms', 'n'} (calibration measurements).
    builds: one record per :meth:`ensure` that measured something: when, how many entries,
      and the machine's load average before/after (timings from a busy machine are suspect).
    path: file the table is saved to (None: in memory only).
    measured: entries measured by this process (0 on a fully cached run).
  """

  def __init__(self, key: Optional[Mapping[str, Any]] = None, path: Optional[str] = None,
               entries: Optional[dict] = None, end_to_end: Optional[dict] = None,
               log: Callable[[str], None] = print, builds: Optional[list] = None):
    self.key = dict(key if key is not None else device_key())
    self.path = path
    self.entries: dict[str, dict[str, Any]] = dict(entries or {})
    self.end_to_end: dict[str, dict[str, Any]] = dict(end_to_end or {})
    self.builds: list[dict[str, Any]] = list(builds or [])
    self.measured = 0
    self.measured_end_to_end = 0
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
      TableError: the file belongs to another device / JAX version, or is corrupted and
        ``on_corrupt='error'``.
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
          f'flags and is refused.\n  table:   {describe_key(data["key"])}\n  current: {describe_key(key)}\n'
          f'Pass a table built on this device, or delete the file to rebuild it here.')
    builds = data.get('builds', [])
    return cls(key, path, data['entries'], data['end_to_end'], log=log,
               builds=builds if isinstance(builds, list) else [])

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
    entries = data.get('entries')
    end_to_end = data.get('end_to_end', {})
    if not isinstance(entries, dict) or not isinstance(end_to_end, dict):
      raise ValueError('"entries" / "end_to_end" must be objects')
    for name, value in list(entries.items()) + list(end_to_end.items()):
      _validate_entry(name, value)
    return data

  def save(self, path: Optional[str] = None) -> str:
    """Writes the table atomically (temp file + rename): readers never see a partial file."""
    path = os.path.abspath(path or self.path or '')
    if not path or path == os.path.abspath(''):
      raise ValueError('LatencyTable.save: no path')
    data = {'format': FORMAT, 'version': FORMAT_VERSION, 'key': self.key,
            'updated': _utc_now(),
            'builds': self.builds,
            'entries': dict(sorted(self.entries.items())),
            'end_to_end': dict(sorted(self.end_to_end.items()))}
    try:
      write_json_atomic(path, data, indent=1)
    except OSError as e:
      raise TableError(f'cannot write latency table {path}: {e.strerror or e}') from e
    self.path = path
    return path

  # ---- entries ------------------------------------------------------------------------------
  def __len__(self) -> int:
    return len(self.entries)

  def get(self, config: UnitConfig, c_in: int, c_out: int) -> Optional[float]:
    """The measured latency (ms) of an exact grid point, or None."""
    entry = self.entries.get(entry_key(config, c_in, c_out))
    return None if entry is None else float(entry['ms'])

  def path_of(self, config: UnitConfig, c_in: int, c_out: int) -> str:
    """Execution path XLA chose for an entry ('xla' when unknown)."""
    entry = self.entries.get(entry_key(config, c_in, c_out)) or {}
    return str(entry.get('path', 'xla'))

  def missing(self, requests: Iterable[Request]) -> list[Request]:
    seen, out = set(), []
    for config, c_in, c_out in requests:
      k = entry_key(config, c_in, c_out)
      if k not in self.entries and k not in seen:
        seen.add(k)
        out.append((config, int(c_in), int(c_out)))
    return out

  def ensure(self, requests: Iterable[Request], repeats: int = 9, warmup: int = 1,
             max_calls: int = 256, max_bytes: int = 768 << 20, seed: int = 0,
             save: bool = True) -> int:
    """Measures the requested entries that are not in the table yet; returns how many.

    Design choice: entries are measured in large batches (up to ``max_calls`` entries of any
    configurations, holding at most ``max_bytes`` of device arrays) whose timed calls are
    interleaved (``protocol.measure_many``): a burst of background load then slows every entry
    of the batch alike instead of distorting one layer's numbers. Inputs of equal shape are
    shared. With ``save`` and a ``path``, the table is saved after every batch, so an
    interrupted build keeps its progress and the file is always complete and valid.
    """
    todo = self.missing(requests)
    if not todo:
      return 0
    todo.sort(key=lambda r: (r[0].key(), r[1], r[2]))
    itemsize = {r[0].dtype: jnp.dtype(r[0].dtype).itemsize for r in todo}
    batches: list[list[Request]] = [[]]
    batch_bytes, batch_shapes = 0, set()
    for request in todo:
      config, c_in, c_out = request
      shape = (config.dtype, *input_shape_of(config, c_in))
      kernel = int(np.prod(config.kernel or (1,))) * c_in * c_out  # Upper bound (groups=1).
      cost = (kernel + (0 if shape in batch_shapes else int(np.prod(shape[1:])))) * itemsize[
          config.dtype]
      if batches[-1] and (len(batches[-1]) >= max_calls or batch_bytes + cost > max_bytes):
        batches.append([])
        batch_bytes, batch_shapes = 0, set()
      batches[-1].append(request)
      batch_bytes += cost
      batch_shapes.add(shape)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    build = {'utc': _utc_now(), 'entries': 0, 'seconds': 0.0, 'repeats': repeats,
             'loadavg_before': load_average()}
    warn_if_busy(self.log)
    self.builds.append(build)
    done = 0
    functions: dict[str, Callable] = {}
    for part in batches:
      inputs: dict[tuple[Any, ...], jax.Array] = {}
      calls, paths = [], []
      for config, c_in, c_out in part:
        fn = functions.setdefault(config.key(), unit_function(config))
        shape = (config.dtype, *input_shape_of(config, c_in))
        if shape not in inputs:
          inputs[shape] = unit_arguments(config, c_in, c_out, rng)[0]
        args = unit_arguments(config, c_in, c_out, rng, x=inputs[shape])
        compiled, _ = protocol.compile_fn(fn, *args)
        calls.append((compiled, args))
        paths.append(execution_path(compiled))
      timings = protocol.measure_many(calls, repeats=repeats, warmup=warmup)
      for (config, c_in, c_out), t, path in zip(part, timings, paths):
        self.entries[entry_key(config, c_in, c_out)] = {
            'ms': max(t.median_ms, 1e-6), 'iqr_ms': t.iqr_ms, 'n': t.repeats, 'path': path}
      done += len(part)
      self.measured += len(part)
      build.update(entries=done, seconds=round(time.perf_counter() - start, 2),
                   loadavg_after=load_average())
      del calls, inputs
      if save and self.path:
        self.save()
      self.log(f'  latency table: {done}/{len(todo)} new entries measured '
               f'({time.perf_counter() - start:.1f} s)')
    return done

  def grid_values(self, config: UnitConfig, c_in_grid: Sequence[int],
                  c_out_grid: Sequence[int], path: Optional[str] = None) -> np.ndarray:
    """Measured ms on the grid, shape [len(c_in_grid), len(c_out_grid)] (depthwise: [n]).

    With ``path`` ('xla' or 'ynn'), entries compiled to the other execution path read 0: the
    two grids sum to the full one and interpolate separately (see ``execution_path``).
    """
    if config.depthwise:
      pairs = [(c, c) for c in c_in_grid]
      shape: tuple[int, ...] = (len(c_in_grid),)
    else:
      pairs = [(ci, co) for ci in c_in_grid for co in c_out_grid]
      shape = (len(c_in_grid), len(c_out_grid))
    values = [self.get(config, ci, co) for ci, co in pairs]
    if path is not None:
      values = [v if v is None or self.path_of(config, ci, co) == path else 0.0
                for v, (ci, co) in zip(values, pairs)]
    missing = [p for p, v in zip(pairs, values) if v is None]
    if missing:
      raise TableError(
          f'latency table {self.path or "(in memory)"} lacks {len(missing)} entries for '
          f'{config.key()} (e.g. c_in={missing[0][0]}, c_out={missing[0][1]}); build it with '
          f'--mode=latency_table (or LatencyPredictor.build)')
    return np.asarray(values, np.float64).reshape(shape)

  def lookup(self, config: UnitConfig, c_in: float, c_out: float) -> float:
    """Latency (ms) at any channel counts, interpolated over all entries of ``config``.

    Uses the largest complete rectangular grid among the stored entries.
    """
    prefix = config.key() + '|'
    points = []
    for k in self.entries:
      if k.startswith(prefix):
        ci, co = k[len(prefix):].split('|')
        points.append((int(ci[2:]), int(co[2:])))
    if not points:
      raise TableError(f'latency table has no entries for {config.key()}')
    if config.depthwise:
      grid = sorted({ci for ci, co in points if ci == co})
      return interpolate_diagonal(grid, self.grid_values(config, grid, grid), c_in)
    c_in_grid = sorted({ci for ci, _ in points})
    rows = [{co for ci2, co in points if ci2 == ci} for ci in c_in_grid]
    c_out_grid = sorted(set.intersection(*rows))
    if not c_out_grid:
      raise TableError(f'latency table entries for {config.key()} do not form a grid')
    return interpolate(c_in_grid, c_out_grid, self.grid_values(config, c_in_grid, c_out_grid),
                       c_in, c_out)


__all__ = ['FORMAT', 'LatencyTable', 'TableError', 'device_key', 'default_table_path',
           'describe_key', 'entry_key', 'interpolate', 'interpolate_diagonal', 'unit_function',
           'unit_arguments']
