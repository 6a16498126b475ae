"""Measuring a pruned network against its teacher, and meeting the target *as measured*.

The latency model predicts; the target is judged on measurements. A :class:`Measurement` is the
teacher and the network timed together (interleaved calls, ``latency.protocol``), so background
load hits both alike and their *ratio* is robust where raw milliseconds are not.

What a measurement spends (design choices, measured in ``docs/method.md``):

* *Compiled once.* The teacher's executable (and the input batch) is compiled once per process
  and teacher shape and reused by every measurement of every run (a BN-adapted teacher has the
  same shapes: only its variables change); a measured network is compiled once.
* *Sequential stopping.* Rounds (one settled call of each, order alternating) go on only until
  the median per-round ratio's 95% interval lies inside the band the caller asks about, or
  outside it, or ``max_rounds`` are done. A network far from the band costs ``min_rounds``.
* *Host noise is not load.* The host's own noise -- the spread of the teacher timed against
  itself -- is measured once with the compiled teacher and floors the interval (few rounds
  under-estimate a spread). A measurement is *unreliable* only when other processes took more
  than ``max_load`` of the CPUs while it ran (``protocol.CpuMonitor``: our own threads do not
  count); it is then repeated up to ``attempts`` times and, if still loaded, kept but flagged,
  and the message gives the load. A wide spread on a quiet machine means more rounds, not a
  repeat and not a warning.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.latency import protocol

Log = Callable[[str], None]
MIN_ROUNDS = 3
MAX_ROUNDS = 15
NOISE_ROUNDS = 8       # Rounds of the teacher against itself, once per compiled teacher.
Z = 1.96
# Sampling error of a median: 1.2533 sigma / sqrt(n) for normal data; sigma = IQR / 1.349.
MEDIAN_SE = 1.2533 / 1.349


@dataclasses.dataclass(frozen=True)
class Measurement:
  """Medians of the two timings, and the ratio as the median of *per-round* ratios.

  Design choice: each round times the teacher and the network back to back, so a round's ratio
  cancels whatever slowed both (a busy neighbour, frequency changes); the ratio of the two
  medians does not, and on a 2-core VM it moved by 8% between two measurements of one network.
  ``spread`` is the relative IQR of the per-round ratios; ``noise`` the host's (the teacher
  against itself); ``rounds`` how many rounds the sequential rule needed.
  """

  teacher_ms: float
  model_ms: float
  spread: float                 # Relative IQR of the per-round ratios.
  load: Optional[float]         # Share of the CPUs other processes took while measuring.
  reliable: bool
  paired_ratio: Optional[float] = None   # Median per-round ratio (None: ratio of the medians).
  rounds: int = 0
  noise: Optional[float] = None
  seconds: float = 0.0

  @property
  def ratio(self) -> float:
    return self.model_ms / self.teacher_ms if self.paired_ratio is None else self.paired_ratio

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'ratio': self.ratio}


@dataclasses.dataclass
class _Teacher:
  """The compiled teacher of one shape, its input batch, and the host's noise (once)."""

  exe: Any
  x: jax.Array
  noise: Optional[float] = None


_TEACHERS: dict[Any, _Teacher] = {}


def _shape_key(module: Any, variables: Any, shape: tuple[int, ...]) -> tuple:
  try:
    module_key = hash(module)
  except TypeError:
    module_key = id(module)
  leaves = tuple((tuple(np.shape(x)), str(getattr(x, 'dtype', ''))) for x in
                 jax.tree.leaves(variables))
  return module_key, jax.tree.structure(variables), leaves, shape


def _compile(module: Any, variables: Any, x: jax.Array) -> Any:
  return protocol.compiled_call(protocol.eval_apply(module), (variables, x))[0]


def _teacher(module: Any, variables: Any, shape: tuple[int, ...]) -> _Teacher:
  key = _shape_key(module, variables, shape)
  if key not in _TEACHERS:
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32))
    _TEACHERS[key] = _Teacher(_compile(module, variables, x), x)
  return _TEACHERS[key]


def host_noise(teacher: _Teacher, variables: Any) -> float:
  """Relative IQR of the teacher timed against itself (same executable, same protocol)."""
  if teacher.noise is None:
    calls = [(teacher.exe, (variables, teacher.x))] * 2
    rounds = [t for _, t in zip(range(NOISE_ROUNDS), protocol.interleaved_rounds(calls))]
    ratios = np.array([b / a for a, b in rounds])
    teacher.noise = float(np.subtract(*np.percentile(ratios, [75, 25])) / np.median(ratios))
  return teacher.noise


def decided(ratios: np.ndarray, noise: float, band: Optional[tuple[float, float]],
            min_rounds: int = MIN_ROUNDS) -> bool:
  """Whether the median per-round ratio is known well enough for ``band`` = (low, high):
  its 95% interval lies inside the band or wholly on one side of it. Without a band, never
  (the caller's round count decides)."""
  n = len(ratios)
  if band is None or n < min_rounds:
    return False
  median = float(np.median(ratios))
  iqr = max(float(np.subtract(*np.percentile(ratios, [75, 25]))), noise * median)
  half = Z * MEDIAN_SE * iqr / np.sqrt(n)
  low, high = band
  inside = low <= median - half and median + half <= high
  return inside or median + half < low or median - half > high


def measure_against_teacher(teacher: tuple[Any, Any], model: tuple[Any, Any], batch: int,
                            image_shape: tuple[int, ...], *,
                            band: Optional[tuple[float, float]] = None,
                            min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS,
                            attempts: int = 3, max_load: float = 0.15,
                            log: Log = print) -> Measurement:
  """Teacher and ``model`` (each ``(module, variables)``) timed together at ``batch``.

  ``band``: the ratios the caller's decision turns on (e.g. the target band); rounds stop once
  the ratio is known to lie inside or outside it (``decided``), else at ``max_rounds``. Without
  a band, ``max_rounds`` rounds are timed.

  Multi-process jobs: process 0 measures and every process gets its numbers
  (``distributed.broadcast_json``), so all of them correct the target and stop alike.
  """
  args = (teacher, model, batch, image_shape, band, min_rounds, max_rounds, attempts, max_load,
          log)
  if jax.process_count() > 1:
    from ttmpd_jax.distill import distributed  # pylint: disable=g-import-not-at-top
    mine = None
    if jax.process_index() == 0:
      mine = dataclasses.asdict(_measure(*args))
    return Measurement(**distributed.broadcast_json(mine))
  return _measure(*args)


def _rounds(calls, noise, band, min_rounds, max_rounds) -> np.ndarray:
  """[rounds, 2] timings (teacher, model) until ``decided`` or ``max_rounds``."""
  times = []
  for t in protocol.interleaved_rounds(calls, warmup=1):
    times.append(t)
    ratios = np.array([m / t for t, m in times])
    if len(times) >= max_rounds or decided(ratios, noise, band, min_rounds):
      break
  return np.asarray(times)


def _measure(teacher: tuple[Any, Any], model: tuple[Any, Any], batch: int,
             image_shape: tuple[int, ...], band: Optional[tuple[float, float]],
             min_rounds: int, max_rounds: int, attempts: int, max_load: float,
             log: Log) -> Measurement:
  start = time.perf_counter()
  shape = (batch, *image_shape)
  t_module, t_vars = teacher[0], jax.device_put(teacher[1])
  compiled = _teacher(t_module, t_vars, shape)
  noise = host_noise(compiled, t_vars)
  m_vars = jax.device_put(model[1])
  calls = [(compiled.exe, (t_vars, compiled.x)),
           (_compile(model[0], m_vars, compiled.x), (m_vars, compiled.x))]
  result = None
  for attempt in range(attempts):
    with protocol.CpuMonitor() as monitor:
      times = _rounds(calls, noise, band, min_rounds, max_rounds)
    load = None if monitor.foreign_load is None else round(monitor.foreign_load, 2)
    ratios = times[:, 1] / times[:, 0]
    ratio = float(np.median(ratios))
    spread = float(np.subtract(*np.percentile(ratios, [75, 25]))) / ratio
    reliable = load is None or load <= max_load
    result = Measurement(float(np.median(times[:, 0])), float(np.median(times[:, 1])), spread,
                         load, reliable, ratio, len(times), round(noise, 4),
                         time.perf_counter() - start)
    if reliable:
      return result
    log(f'  latency measurement {attempt + 1}/{attempts}: other processes took {load:.2f} of '
        f'the CPUs (more than {max_load:g}): measuring again')
  log(f'  WARNING: latency measured on a busy machine (other processes took {result.load:.2f} '
      f'of the CPUs, more than {max_load:g}); ratio {result.ratio:.3f} is flagged unreliable')
  return result


def band(target: float, tolerance: float) -> tuple[float, float]:
  """``target ± tolerance`` (relative) as (low, high) ratios."""
  return target * (1 - tolerance), target * (1 + tolerance)


def within(ratio: float, target: float, tolerance: float) -> bool:
  low, high = band(target, tolerance)
  return low <= ratio <= high


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
