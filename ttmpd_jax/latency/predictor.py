"""Whole-model latency prediction from the lookup table, calibration, and validation.

``predict(widths) = scale * sum_u table(u, c_in_u, c_out_u) + offset`` where the sum runs over
the model's units (``latency.structure``) and ``(scale, offset)`` are fitted on end-to-end
measurements of a few calibration architectures. ``offset`` stands for the non-prunable rest
(input handling, residual adds beyond the fused elementwise op, pooling, dispatch).

Design choice: by default we fit both ``scale`` and ``offset`` by least squares in relative
error over 4 calibration architectures (the full model and uniform keep ratios 0.75 / 0.5 /
0.3), constrained to ``offset >= 0`` (see :func:`fit_calibration`); ``fit='offset'`` keeps
``scale = 1`` (plain "sum + constant"). Isolated units are timed with their input hot in cache
and without XLA's inter-op scheduling, and XLA:CPU fuses runs of convolutions into one library
call (YNNPACK) differently inside the model, so in-model units differ from isolated ones by a
roughly constant factor; the scale absorbs it.

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
from ttmpd_jax.latency.table import LatencyTable, Request, interpolate, interpolate_diagonal

DEFAULT_CALIBRATION_KEEPS = (1.0, 0.75, 0.5, 0.3)


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Fitted ``measured ~ scale * sum_units + offset`` (ms) and its calibration residuals."""

  scale: float = 1.0
  offset_ms: float = 0.0
  fit: str = 'none'                   # 'none', 'offset', 'scale' or 'affine'.
  points: tuple[tuple[float, float], ...] = ()  # (sum_units_ms, measured_ms).

  @property
  def max_relative_error(self) -> float:
    if not self.points:
      return float('nan')
    return max(abs(self.scale * s + self.offset_ms - m) / m for s, m in self.points)


def fit_calibration(sums_ms: Sequence[float], measured_ms: Sequence[float],
                    fit: str = 'affine', log: Callable[[str], None] = print) -> Calibration:
  """Least-squares fit of ``measured ~ scale * sum + offset`` in relative error.

  Design choice: with ``fit='affine'`` the fit is constrained to ``offset >= 0`` (the
  non-prunable rest costs time) and ``0.5 <= scale <= 2`` (a sanity bound), so predictions stay
  positive for every width spec: an affine fit violating them is replaced by a scale-only fit
  (``offset = 0``), with a warning if that scale is far from 1. ``fit='offset'`` fits
  ``scale = 1`` and the mean difference as offset.
  """
  s = np.asarray(sums_ms, np.float64)
  m = np.asarray(measured_ms, np.float64)
  if s.shape != m.shape or s.size == 0:
    raise ValueError('need matching, non-empty sums and measurements')
  if fit not in ('affine', 'offset'):
    raise ValueError(f"fit must be 'affine' or 'offset', got {fit!r}")
  points = tuple((float(a), float(b)) for a, b in zip(s, m))
  if fit == 'affine' and s.size >= 2 and np.ptp(s) > 1e-9:
    # Relative errors matter (MAPE), so weight each point by 1 / measured.
    a = np.stack([s, np.ones_like(s)], axis=1) / m[:, None]
    scale, offset = np.linalg.lstsq(a, np.ones_like(m), rcond=None)[0]
    if 0.5 <= scale <= 2.0 and offset >= 0.0:
      return Calibration(float(scale), float(offset), 'affine', points)
  if fit == 'affine':
    scale = float(np.sum(s / m) / np.sum((s / m) ** 2))  # offset = 0.
    if not 0.5 <= scale <= 2.0:
      log(f'  latency calibration: measured / summed unit latency = {scale:.3f}, far from 1 '
          f'(a busy machine, or a model whose layers XLA fuses unusually?)')
    return Calibration(scale, 0.0, 'scale', points)
  offset = float(np.mean(m - s))
  return Calibration(1.0, offset, 'offset', points)


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
    self._values = [table.grid_values(u.config, gi, go)
                    for u, (gi, go) in zip(structure.units, self._grids)]
    self._memo: list[dict[tuple[int, int], float]] = [{} for _ in structure.units]

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
  def unit_ms(self, index: int, c_in: int, c_out: int) -> float:
    """Interpolated latency of unit ``index`` at the given channels (memoised)."""
    memo = self._memo[index]
    value = memo.get((c_in, c_out))
    if value is None:
      gi, go = self._grids[index]
      if self.structure.units[index].depthwise:
        value = interpolate_diagonal(gi, self._values[index], c_in)
      else:
        value = interpolate(gi, go, self._values[index], c_in, c_out)
      memo[(c_in, c_out)] = value
    return value

  def units_ms(self, widths: Optional[Widths] = None) -> np.ndarray:
    """Per-unit latencies (ms), in ``structure.units`` order."""
    c_in, c_out = self.structure.channels(widths)
    return np.array([self.unit_ms(i, a, b) for i, (a, b) in enumerate(zip(c_in, c_out))])

  def sum_units_ms(self, widths: Optional[Widths] = None) -> float:
    c_in, c_out = self.structure.channels(widths)
    return float(sum(self.unit_ms(i, a, b) for i, (a, b) in enumerate(zip(c_in, c_out))))

  def predict(self, widths: Optional[Widths] = None) -> float:
    """Predicted end-to-end latency (ms) of the architecture ``widths`` (missing keys: full)."""
    return self.calibration.scale * self.sum_units_ms(widths) + self.calibration.offset_ms

  def saving(self, widths_before: Optional[Widths], widths_after: Widths) -> float:
    """Predicted latency saved (ms) by going from ``widths_before`` to ``widths_after``."""
    return self.predict(widths_before) - self.predict(widths_after)

  # ---- calibration --------------------------------------------------------------------------
  def calibration_architectures(self, keeps: Sequence[float] = DEFAULT_CALIBRATION_KEEPS
                                ) -> list[dict[str, int]]:
    """Full model and uniformly pruned variants (duplicates after rounding removed)."""
    out: list[dict[str, int]] = []
    for keep in keeps:
      widths = self.structure.uniform_widths(keep, self.round_to)
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
    sums = [self.sum_units_ms(w) for w in widths_list]
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
    sums = [predictor.sum_units_ms(w) for w in calibration]
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


__all__ = ['Calibration', 'LatencyPredictor', 'Validation', 'architecture_key', 'fit_calibration',
           'random_architectures', 'validate']
