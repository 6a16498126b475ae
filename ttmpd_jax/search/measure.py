"""Measuring a pruned network against its teacher, and meeting the target *as measured*.

The latency model predicts; the target is judged on measurements. A :class:`Measurement` is the
teacher and the network timed together (interleaved calls, ``latency.protocol``), so background
load hits both alike and their *ratio* is robust where raw milliseconds are not. A measurement is
*unreliable* when the host is busy — other processes took more than ``max_load`` of its CPUs
while it ran (``protocol.CpuMonitor``: unlike the load average, our own threads do not count) —
or when the rounds spread widely (interquartile range of the per-round ratios above
``max_spread`` of their median); it is then repeated up to ``attempts`` times and, if still
unreliable, kept but flagged (and said loudly).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np

from ttmpd_jax.latency import protocol

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Measurement:
  """Medians of the two timings, and the ratio as the median of *per-round* ratios.

  Design choice: each round times the teacher and the network back to back, so a round's ratio
  cancels whatever slowed both (a busy neighbour, frequency changes); the ratio of the two
  medians does not, and on a 2-core VM it moved by 8% between two measurements of one network.
  ``spread`` is the relative IQR of the per-round ratios.
  """

  teacher_ms: float
  model_ms: float
  spread: float                 # Relative IQR of the per-round ratios.
  load: Optional[float]         # Share of the CPUs other processes took while measuring.
  reliable: bool
  paired_ratio: Optional[float] = None   # Median per-round ratio (None: ratio of the medians).

  @property
  def ratio(self) -> float:
    return self.model_ms / self.teacher_ms if self.paired_ratio is None else self.paired_ratio

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'ratio': self.ratio}


def measure_against_teacher(teacher: tuple[Any, Any], model: tuple[Any, Any], batch: int,
                            image_shape: tuple[int, ...], *, repeats: int = 21,
                            instances: int = 3, attempts: int = 3, max_spread: float = 0.1,
                            max_load: float = 0.15, log: Log = print) -> Measurement:
  """Teacher and ``model`` (each ``(module, variables)``) timed together at ``batch``.

  Design choice: the ``repeats`` rounds are split over ``instances`` independent instances —
  each compiles both functions afresh and places fresh buffers — and the ratio is the median of
  the instances' per-round medians. On a 2-core VM one network measured at different times
  differed by up to 9% from the teacher ratio with a single instance, while the rounds inside
  one instance agreed within 3–5%: what varies is the instance, so it is sampled.

  Multi-process jobs: process 0 measures and every process gets its numbers
  (``distributed.broadcast_json``), so all of them correct the target and stop alike.
  """
  if jax.process_count() > 1:
    from ttmpd_jax.distill import distributed  # pylint: disable=g-import-not-at-top
    mine = None
    if jax.process_index() == 0:
      mine = dataclasses.asdict(_measure(teacher, model, batch, image_shape, repeats, instances,
                                         attempts, max_spread, max_load, log))
    return Measurement(**distributed.broadcast_json(mine))
  return _measure(teacher, model, batch, image_shape, repeats, instances, attempts, max_spread,
                  max_load, log)


def _measure(teacher: tuple[Any, Any], model: tuple[Any, Any], batch: int,
             image_shape: tuple[int, ...], repeats: int, instances: int, attempts: int,
             max_spread: float, max_load: float, log: Log) -> Measurement:
  result = None
  rounds = max(1, -(-repeats // max(instances, 1)))
  for attempt in range(attempts):
    timings = []
    with protocol.CpuMonitor() as monitor:
      for _ in range(max(instances, 1)):
        timings.append(protocol.measure_models([teacher, model], (batch, *image_shape),
                                               repeats=rounds, warmup=2))
    load = None if monitor.foreign_load is None else round(monitor.foreign_load, 2)
    per_round = [np.asarray(m.times_ms) / np.asarray(t.times_ms) for t, m in timings]
    ratio = float(np.median([np.median(r) for r in per_round]))
    pooled = np.concatenate(per_round)
    spread = float(np.subtract(*np.percentile(pooled, [75, 25]))) / ratio
    reliable = spread <= max_spread and (load is None or load <= max_load)
    teacher_ms = float(np.median([t.median_ms for t, _ in timings]))
    model_ms = float(np.median([m.median_ms for _, m in timings]))
    result = Measurement(teacher_ms, model_ms, spread, load, reliable, ratio)
    if reliable:
      return result
    log(f'  latency measurement {attempt + 1}/{attempts} unreliable (other processes took '
        f'{load} of the CPUs, spread {100 * spread:.0f}%): measuring again')
  log(f'  WARNING: latency measured on a busy machine (other processes took {result.load} of '
      f'the CPUs, spread {100 * result.spread:.0f}%); ratio {result.ratio:.3f} is flagged '
      'unreliable')
  return result


def within(ratio: float, target: float, tolerance: float) -> bool:
  return target * (1 - tolerance) <= ratio <= target * (1 + tolerance)


def corrected_target_ms(measured_ratio: float, predicted_ms: float, l0_ms: float,
                        target: float) -> float:
  """The predicted-ms target that, at the local measured/predicted ratio, meets ``target``.

  Design choice: a multiplicative correction, ``c = measured ratio / predicted ratio`` at the
  network just measured; the search then aims at ``target / c`` of the predicted teacher latency.
  Local (it uses the latest measurement only), so it tracks where the predictor is wrong now.
  """
  c = measured_ratio / max(predicted_ms / l0_ms, 1e-9)
  return target / max(c, 1e-9) * l0_ms


def interpolated_target_ms(slow: tuple[float, float], fast: tuple[float, float],
                           target: float) -> float:
  """The predicted ms at which the line through two measured networks, each ``(measured ratio,
  predicted ms)`` — ``slow`` at or above ``target``, ``fast`` below it — meets ``target``.

  Design choice: once measurements bracket the target, both of them inform the next aim; a
  correction from one side alone jumps back to the other side when the predictor errs
  differently on the two networks.
  """
  (r_slow, p_slow), (r_fast, p_fast) = slow, fast
  share = (r_slow - target) / max(r_slow - r_fast, 1e-9)
  return p_slow - share * (p_slow - p_fast)
