"""Whole-model latency prediction from the lookup table, calibration, and validation.

``predict(widths) = scale * sum_u table(u, c_in_u, c_out_u) + offset`` where the sum runs over
the model's units (``latency.structure``) and ``(scale, offset)`` are fitted on end-to-end
measurements of a few calibration architectures. ``offset`` stands for the non-prunable rest
(input handling, residual adds beyond the fused elementwise op, pooling, dispatch).

Design choice: by default we fit both ``scale`` and ``offset`` by least squares in relative
error over 10 calibration architectures (the full model, uniform keep ratios 0.75 / 0.5 / 0.3
and six random prunings), constrained to ``offset >= 0`` (see :func:`fit_calibration`);
``fit='offset'`` keeps ``scale = 1`` (plain "sum + constant"). Isolated units are timed with their input hot in cache
and without XLA's inter-op scheduling, and XLA:CPU fuses runs of convolutions into one library
call (YNNPACK) differently inside the model, so in-model units differ from isolated ones by a
factor that the scale absorbs on average (the remaining per-architecture differences are the
model's error; see bench/bench_latency.py).

Known limitation (measured on XLA:CPU, jax 0.10): XLA hands a whole connected region of
"YNNPACK-eligible" layers to one YNNPACK fusion, and whether a residual join falls inside that
region depends on the widths of the layers *after* it (e.g. ResNet-8 stage 2 convolutions with
8 input channels stay on XLA's path, with 12+ they go to YNNPACK and pull stage 1's 28x28 join
into the fusion). Such switches change the end-to-end latency by up to ~25% in steps that no sum
of independently measured units reproduces; they are the bulk of the remaining error in
``bench/bench_latency.py`` (MAPE 7-10%; Spearman 0.75-0.93 per model, so rankings of close
architectures are not reliable on XLA:CPU). A second context effect of
the same kind: the last ResNet-8 block (7x7, widths 64/64 -> 64/32) saves 2.3 ms when XLA fuses
its join, ReLU and global pooling into one YNNPACK region with the classifier (8.4 -> 6.1 ms),
but 5.9 ms (18.1 -> 12.2 ms, what the isolated units predict) when its output is materialised:
the same layers cost half as much in one context as in the other. Isolated units cannot see
their consumers, so the scale and offset fit the average context.

``predict`` is pure Python/NumPy over memoised per-unit interpolations: no tracing, no
compilation, typically 10-100 microseconds, so the search can call it for every candidate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ttmpd_jax.errors import UserError
from ttmpd_jax.latency import protocol
from ttmpd_jax.latency.structure import ModelStructure, Widths
from ttmpd_jax.latency.table import (PATHS, LatencyTable, Request, interpolate,
                                     interpolate_diagonal)

DEFAULT_CALIBRATION_KEEPS = (1.0, 0.75, 0.5, 0.3)
DEFAULT_CALIBRATION_RANDOM = 6
CALIBRATION_SEED = 987_654


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Fitted ``measured ~ scale * sum_xla + scale_ynn * sum_ynn + offset`` (ms).

  ``sum_xla`` / ``sum_ynn`` are the summed table latencies of the units XLA runs itself / hands
  to YNNPACK (``table.execution_path``); ``scale_ynn=None`` means one common ``scale``.

  Attributes:
    points: the calibration data, ``(sum_xla, sum_ynn, measured)`` per architecture.
  """

  scale: float = 1.0
  offset_ms: float = 0.0
  fit: str = 'none'                   # 'none', 'offset', 'affine' or 'per_path'.
  scale_ynn: Optional[float] = None
  points: tuple[tuple[float, float, float], ...] = ()

  def apply(self, sum_xla: float, sum_ynn: float = 0.0) -> float:
    ynn = self.scale if self.scale_ynn is None else self.scale_ynn
    return self.scale * sum_xla + ynn * sum_ynn + self.offset_ms

  @property
  def max_relative_error(self) -> float:
    """Largest relative error on the calibration architectures themselves."""
    if not self.points:
      return float('nan')
    return max(abs(self.apply(x, y) - m) / m for x, y, m in self.points)

  def describe(self) -> str:
    if self.scale_ynn is None:
      return f'{self.scale:.3f} * sum(units) + {self.offset_ms:.2f} ms'
    return (f'{self.scale:.3f} * sum(XLA units) + {self.scale_ynn:.3f} * sum(YNNPACK units) + '
            f'{self.offset_ms:.2f} ms')


FITS = ('affine', 'per_path', 'offset')
_SCALE_BOUNDS = (0.2, 5.0)
_PATH_RIDGE = 0.3  # Pulls the two path scales together when the data cannot separate them.


def fit_calibration(sums_ms: Sequence[Union[float, Sequence[float]]],
                    measured_ms: Sequence[float], fit: str = 'affine',
                    log: Callable[[str], None] = print) -> Calibration:
  """Least-squares fit of the calibration in *relative* error (MAPE is what we report).

  Args:
    sums_ms: per architecture, the summed unit latency, or a pair ``(sum_xla, sum_ynn)``.
    measured_ms: the measured end-to-end latencies.
    fit: 'affine': ``scale * sum + offset``; 'per_path': one scale per execution path plus an
      offset (a ridge term keeps the two scales equal unless the data say otherwise);
      'offset': ``sum + offset`` (scale 1).

  Design choice: scales are bounded to [0.2, 5] and the offset to >= 0 (the non-prunable rest
  costs time), so every prediction is positive; a scale far from 1 is reported, since it means
  a busy machine or layers that XLA fuses very differently inside the model.
  """
  if fit not in FITS:
    raise ValueError(f'fit must be one of {FITS}, got {fit!r}')
  pairs = np.array([(float(v), 0.0) if np.ndim(v) == 0 else tuple(map(float, v))
                    for v in sums_ms], np.float64).reshape(-1, 2)
  m = np.asarray(measured_ms, np.float64)
  if pairs.shape[0] != m.shape[0] or m.size == 0 or np.any(m <= 0):
    raise ValueError('need matching, non-empty sums and positive measurements')
  points = tuple((float(x), float(y), float(z)) for (x, y), z in zip(pairs, m))
  total = pairs.sum(axis=1)
  if fit == 'offset':
    return Calibration(1.0, float(np.mean(m - total)), 'offset', None, points)

  from scipy import optimize  # pylint: disable=g-import-not-at-top
  ones = np.ones_like(m)
  lo, hi = _SCALE_BOUNDS
  if fit == 'affine':
    a = np.stack([total, ones], axis=1) / m[:, None]
    result = optimize.lsq_linear(a, ones, bounds=([lo, 0.0], [hi, np.inf]))
    scale, offset = (float(v) for v in result.x)
    calibration = Calibration(scale, offset, 'affine', None, points)
    scales = [scale]
  else:
    a = np.stack([pairs[:, 0], pairs[:, 1], ones], axis=1) / m[:, None]
    a = np.concatenate([a, [[_PATH_RIDGE, -_PATH_RIDGE, 0.0]]])
    b = np.concatenate([ones, [0.0]])
    result = optimize.lsq_linear(a, b, bounds=([lo, lo, 0.0], [hi, hi, np.inf]))
    scale, scale_ynn, offset = (float(v) for v in result.x)
    calibration = Calibration(scale, offset, 'per_path', scale_ynn, points)
    scales = [scale, scale_ynn]
  if any(not 0.5 <= x <= 2.0 for x in scales):
    log(f'  latency calibration: measured = {calibration.describe()}: a scale far from 1 '
        f'(a busy machine, or a model whose layers XLA fuses very differently?)')
  return calibration


def architecture_key(spec: Any, widths: Mapping[str, int], input_shape: Sequence[int],
                     dtype: str) -> str:
  """Stable key of one concrete architecture at one input shape (end-to-end cache)."""
  data = {'name': spec.name, 'num_classes': spec.num_classes, 'kwargs': dict(spec.kwargs),
          'widths': dict(sorted(widths.items())), 'input': list(input_shape), 'dtype': dtype}
  digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
  return f'{spec.name}|{"x".join(map(str, input_shape))}|{dtype}|{digest[:16]}'


class LatencyPredictor:
  """Predicts the eval-mode latency (ms) of any width spec of one architecture family.

  Args:
    structure: the family's units (:class:`ModelStructure`).
    table: a latency table holding every grid entry of ``structure.unit_grids(round_to, ...)``.
    round_to: channel step of the grid.
    max_grid_points: see ``structure.channel_grid``.
    spec: the zoo ``ModelSpec`` (needed only for :meth:`calibrate`, to build models).
    calibration: a previously fitted :class:`Calibration` (default: none, predictions are the
      raw sum of units).
  Raises:
    TableError: the table lacks entries (build it with :meth:`build`).
  """

  def __init__(self, structure: ModelStructure, table: LatencyTable, round_to: int = 8,
               max_grid_points: Optional[int] = 16, spec: Any = None,
               calibration: Optional[Calibration] = None):
    self.structure = structure
    self.table = table
    self.round_to = int(round_to)
    self.max_grid_points = max_grid_points
    self.spec = spec
    self.calibration = calibration or Calibration()
    self._grids = structure.unit_grids(self.round_to, max_grid_points)
    # Per unit, one value grid per execution path (entries of the other path read 0).
    self._values = [{path: table.grid_values(u.config, gi, go, path) for path in PATHS}
                    for u, (gi, go) in zip(structure.units, self._grids)]
    self._memo: list[dict[tuple[int, int], tuple[float, float]]] = [{} for _ in structure.units]

  # ---- construction -------------------------------------------------------------------------
  @staticmethod
  def requests(structure: ModelStructure, round_to: int,
               max_grid_points: Optional[int] = 16) -> list[Request]:
    """Every table entry a predictor for ``structure`` needs."""
    out: list[Request] = []
    for u, (gi, go) in zip(structure.units, structure.unit_grids(round_to, max_grid_points)):
      if u.depthwise:
        out += [(u.config, c, c) for c in gi]
      else:
        out += [(u.config, ci, co) for ci in gi for co in go]
    return out

  @classmethod
  def build(cls, spec: Any, image_shape: Sequence[int], batch: int, table: LatencyTable,
            round_to: int = 8, dtype: str = 'float32', max_grid_points: Optional[int] = 16,
            repeats: int = 9, warmup: int = 1) -> 'LatencyPredictor':
    """Predictor for the zoo model ``spec``: measures the table entries it lacks (incremental)."""
    structure = ModelStructure.from_spec(spec, image_shape, batch, dtype)
    table.ensure(cls.requests(structure, round_to, max_grid_points), repeats=repeats,
                 warmup=warmup)
    return cls(structure, table, round_to, max_grid_points, spec)

  # ---- prediction ---------------------------------------------------------------------------
  def unit_ms(self, index: int, c_in: int, c_out: int) -> tuple[float, float]:
    """Interpolated latency of unit ``index``: ``(ms on XLA's path, ms on YNNPACK's path)``.

    At a grid point one of the two is 0; between grid points whose entries ran on different
    paths both are partial. Memoised.
    """
    memo = self._memo[index]
    value = memo.get((c_in, c_out))
    if value is None:
      gi, go = self._grids[index]
      grids = self._values[index]
      if self.structure.units[index].depthwise:
        value = tuple(interpolate_diagonal(gi, grids[p], c_in) for p in PATHS)
      else:
        value = tuple(interpolate(gi, go, grids[p], c_in, c_out) for p in PATHS)
      memo[(c_in, c_out)] = value
    return value

  def units_ms(self, widths: Optional[Widths] = None) -> np.ndarray:
    """Per-unit latencies (ms, both paths summed), in ``structure.units`` order."""
    c_in, c_out = self.structure.channels(widths)
    return np.array([sum(self.unit_ms(i, a, b)) for i, (a, b) in enumerate(zip(c_in, c_out))])

  def path_sums_ms(self, widths: Optional[Widths] = None) -> tuple[float, float]:
    """``(sum over XLA-path units, sum over YNNPACK-path units)`` in ms."""
    c_in, c_out = self.structure.channels(widths)
    xla = ynn = 0.0
    for i, (a, b) in enumerate(zip(c_in, c_out)):
      x, y = self.unit_ms(i, a, b)
      xla += x
      ynn += y
    return xla, ynn

  def sum_units_ms(self, widths: Optional[Widths] = None) -> float:
    return float(sum(self.path_sums_ms(widths)))

  def predict(self, widths: Optional[Widths] = None) -> float:
    """Predicted end-to-end latency (ms) of the architecture ``widths`` (missing keys: full)."""
    return self.calibration.apply(*self.path_sums_ms(widths))

  def saving(self, widths_before: Optional[Widths], widths_after: Widths) -> float:
    """Predicted latency saved (ms) by going from ``widths_before`` to ``widths_after``."""
    return self.predict(widths_before) - self.predict(widths_after)

  # ---- calibration --------------------------------------------------------------------------
  def calibration_architectures(self, keeps: Sequence[float] = DEFAULT_CALIBRATION_KEEPS,
                                random: int = DEFAULT_CALIBRATION_RANDOM,
                                seed: int = CALIBRATION_SEED) -> list[dict[str, int]]:
    """Full model, uniformly pruned variants, and ``random`` randomly pruned ones.

    Design choice: the random ones (fixed seed, never the validation seeds) make the fit see
    architectures whose layers are pruned unevenly, as the search produces them.
    """
    out: list[dict[str, int]] = []
    candidates = [self.structure.uniform_widths(keep, self.round_to) for keep in keeps]
    if random:
      candidates += random_architectures(self.structure, random, self.round_to, seed=seed)
    for widths in candidates:
      if widths not in out:
        out.append(widths)
    return out

  def measure_end_to_end(self, widths_list: Sequence[Widths], repeats: int = 10,
                         warmup: int = 2, use_cache: Union[bool, Sequence[bool]] = True,
                         seed: int = 0, group: int = 8) -> list[float]:
    """Measured eval-mode latency (ms) of each architecture (same protocol as the table).

    Args:
      widths_list: architectures (width specs; missing keys: full width).
      use_cache: per architecture (or for all): read from / store in ``table.end_to_end``, so
        a second build measures nothing. Validation passes False to measure afresh.
      group: architectures compiled and timed together (interleaved calls: fair under
        background load); bounds memory.
    """
    if self.spec is None:
      raise UserError('LatencyPredictor.measure_end_to_end needs the model spec (use .build)')
    from ttmpd_jax.models import build_model  # pylint: disable=g-import-not-at-top
    input_shape = self.structure.input_shape
    dtype = self.structure.dtype
    cached = ([bool(use_cache)] * len(widths_list) if isinstance(use_cache, bool)
              else [bool(c) for c in use_cache])
    keys = [architecture_key(self.spec, self.structure.complete_widths(w), input_shape, dtype)
            for w in widths_list]
    results: dict[int, float] = {}
    todo = []
    for i, k in enumerate(keys):
      if cached[i] and k in self.table.end_to_end:
        results[i] = float(self.table.end_to_end[k]['ms'])
      else:
        todo.append(i)
    for lo in range(0, len(todo), group):
      part = todo[lo:lo + group]
      models = []
      for i in part:
        spec = self.spec.with_widths(self.structure.complete_widths(widths_list[i]))
        model = build_model(spec)
        models.append((model, protocol.synthetic_variables(model, input_shape, seed)))
      timings = protocol.measure_models(models, input_shape, dtype, repeats, warmup)
      for i, t in zip(part, timings):
        results[i] = t.median_ms
        if cached[i]:
          self.table.end_to_end[keys[i]] = {'ms': t.median_ms, 'iqr_ms': t.iqr_ms,
                                            'n': t.repeats}
          self.table.measured_end_to_end += 1
    if any(cached[i] for i in todo) and self.table.path:
      self.table.save()
    return [results[i] for i in range(len(keys))]

  def calibrate(self, widths_list: Optional[Sequence[Widths]] = None, fit: str = 'affine',
                repeats: int = 10, warmup: int = 2) -> Calibration:
    """Fits ``(scale, offset)`` on end-to-end measurements (cached in the table)."""
    widths_list = list(widths_list or self.calibration_architectures())
    measured = self.measure_end_to_end(widths_list, repeats, warmup)
    sums = [self.path_sums_ms(w) for w in widths_list]
    self.calibration = fit_calibration(sums, measured, fit, self.table.log)
    return self.calibration


# ---- validation --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Validation:
  """Predicted vs measured end-to-end latency over a set of architectures (ms)."""

  predicted_ms: tuple[float, ...]
  measured_ms: tuple[float, ...]

  @property
  def mape(self) -> float:
    """Mean absolute percentage error, in percent."""
    p, m = np.asarray(self.predicted_ms), np.asarray(self.measured_ms)
    return float(100.0 * np.mean(np.abs(p - m) / m))

  @property
  def spearman(self) -> float:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    if len(self.measured_ms) < 2:
      return float('nan')
    return float(stats.spearmanr(self.predicted_ms, self.measured_ms).statistic)

  @property
  def max_ape(self) -> float:
    p, m = np.asarray(self.predicted_ms), np.asarray(self.measured_ms)
    return float(100.0 * np.max(np.abs(p - m) / m))

  def summary(self) -> str:
    return (f'n={len(self.measured_ms)}  MAPE {self.mape:.2f}%  (max {self.max_ape:.1f}%)  '
            f'Spearman {self.spearman:.3f}')


def validate(predictor: LatencyPredictor, widths_list: Sequence[Widths], repeats: int = 10,
             warmup: int = 2, recalibrate: bool = False, fit: str = 'affine',
             group: int = 16) -> Validation:
  """Measures each architecture afresh (no cache) and compares with ``predictor.predict``.

  With ``recalibrate``, the calibration architectures are measured afresh too, *interleaved
  with* the validation architectures (same background load for both), and the predictor is
  re-fitted on them before predicting: the validation architectures themselves never enter
  the fit. This is the experiment to run on a shared machine.
  """
  widths_list = list(widths_list)
  if recalibrate:
    calibration = predictor.calibration_architectures()
    measured = predictor.measure_end_to_end(
        calibration + widths_list, repeats, warmup, use_cache=False, group=group)
    sums = [predictor.path_sums_ms(w) for w in calibration]
    predictor.calibration = fit_calibration(sums, measured[:len(calibration)], fit,
                                            predictor.table.log)
    measured = measured[len(calibration):]
  else:
    measured = predictor.measure_end_to_end(widths_list, repeats, warmup, use_cache=False,
                                            group=group)
  predicted = [predictor.predict(w) for w in widths_list]
  return Validation(tuple(predicted), tuple(measured))


def random_architectures(structure: ModelStructure, n: int, round_to: int, seed: int = 0,
                         min_keep: float = 0.25, min_channels: int = 0) -> list[dict[str, int]]:
  """``n`` distinct random pruned architectures (see ``ModelStructure.random_widths``).

  Half prune every group independently; the other half prune only a random subset of groups
  (what an iterative pruner's intermediate architectures look like).
  """
  rng = np.random.default_rng(seed)
  out: list[dict[str, int]] = []
  groups = structure.prunable_groups()
  attempts = 0
  while len(out) < n and attempts < 50 * n:
    attempts += 1
    widths = structure.random_widths(rng, round_to, min_keep, min_channels=min_channels)
    if len(out) % 2 and groups:
      full = structure.full_widths
      keep_groups = rng.random(len(groups)) < 0.5
      for group, keep_full in zip(groups, keep_groups):
        if keep_full:
          widths.update({p: full[p] for p in group})
    if widths != structure.full_widths and widths not in out:
      out.append(widths)
  return out


__all__ = ['FITS', 'Calibration', 'LatencyPredictor', 'Validation', 'architecture_key', 'fit_calibration',
           'random_architectures', 'validate']
