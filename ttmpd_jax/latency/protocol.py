"""The one latency measurement protocol used everywhere (table entries, whole models, benchmarks).

Protocol: compile ahead of time (``jit(...).lower(...).compile()``, timed separately), run
``warmup`` untimed calls, then time ``repeats`` calls, each ending in ``block_until_ready`` so
that asynchronous dispatch does not hide device time. Report the median (robust to the bursts of
a shared machine) with the interquartile range as spread.

Design choice: :func:`measure_many` interleaves the timed calls of several functions (round
robin, one call of each per round, order rotated every round) instead of timing each function in
a block. Background load then hits every function about equally, which keeps *relative*
latencies (what a latency table is for) stable on a busy machine.

Design choice: with several functions, each timed call is the second of two back to back (one
untimed *settle* call first). The first call of an executable after another one ran pays a cost
that depends on what ran before it and on the executable's own code paths: on a 2-core CPU a
VGG-small whose stem convolution runs as XLA's own code between library (YNNPACK) regions
measured 3-11% slower than its all-library parent on first calls and 0.985-1.004x on second calls
(four repetitions each, interleaved with five other architectures), and 0.99-1.01x when only the
two alternated. A deployed model runs batch after batch, so the settled call is the latency a
user gets; the first-call cost varied with the company a function was timed in, which made the
same architecture's measured latency depend on the group it was measured with. That cost is a few
milliseconds (2-6 ms there), so functions slower than ``SETTLE_BELOW_MS`` (MobileNetV2 at batch
256 on 2 cores: 1.5 s a call) are timed without settle calls, which would double their rounds.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax import interrupt

Variables = Mapping[str, Any]

DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 2
DEFAULT_SETTLE = 1        # Untimed calls right before each timed call (several functions only).
SETTLE_BELOW_MS = 250.0   # Only functions whose last warm-up call was faster than this settle.
# Part of every table entry's identity, derived from the settings above: a change re-measures.
PROTOCOL = f'interleaved, settled {DEFAULT_SETTLE} below {SETTLE_BELOW_MS:g} ms'
MIN_ROUNDS = 3            # Fewest rounds a time budget (``max_seconds``) may stop at.


@dataclasses.dataclass(frozen=True)
class Timing:
  """Latency of one function: statistics over ``repeats`` timed calls, in milliseconds.

  Attributes:
    median_ms: median wall time of one call (the number every other module uses).
    iqr_ms: interquartile range (75th - 25th percentile) of the calls: the spread.
    min_ms: fastest call.
    repeats: number of timed calls.
    compile_s: seconds spent compiling (0 when the caller passed a compiled function).
    times_ms: every timed call, in the order they ran.
  """

  median_ms: float
  iqr_ms: float
  min_ms: float
  repeats: int
  compile_s: float = 0.0
  times_ms: tuple[float, ...] = ()

  def __str__(self) -> str:
    return f'{self.median_ms:.3f} ms (IQR {self.iqr_ms:.3f}, n={self.repeats})'


def timing_from_samples(times_ms: Sequence[float], compile_s: float = 0.0) -> Timing:
  """Summarises raw per-call times (ms) into a :class:`Timing`."""
  t = np.asarray(times_ms, np.float64)
  chex.assert_rank(t, 1)
  if t.size == 0:
    raise ValueError('no timed calls')
  q25, q50, q75 = np.percentile(t, [25, 50, 75])
  return Timing(float(q50), float(q75 - q25), float(t.min()), int(t.size), float(compile_s),
                tuple(float(x) for x in t))


def compile_fn(fn: Callable, *args) -> tuple[Callable, float]:
  """Ahead-of-time compiles ``fn`` (jitting it if needed) for ``args``; returns (exe, seconds)."""
  start = time.perf_counter()
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _call_blocking(compiled: Callable, args: tuple) -> float:
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return (time.perf_counter() - start) * 1e3


def measure_many(calls: Sequence[tuple[Callable, tuple]], repeats: int = DEFAULT_REPEATS,
                 warmup: int = DEFAULT_WARMUP, max_seconds: Optional[float] = None,
                 settle: int = DEFAULT_SETTLE) -> list[Timing]:
  """Times several ``(fn, args)`` pairs with interleaved calls; one :class:`Timing` each.

  Args:
    calls: functions (plain, jitted or already compiled) with their argument tuples. Arguments
      should already live on the device (``jax.device_put``) so no transfer is timed.
    repeats: timed calls per function (>= 1).
    warmup: untimed calls per function after compilation (>= 0).
    max_seconds: stop after the round that brings the timed rounds past this many seconds,
      provided ``MIN_ROUNDS`` rounds (or ``repeats``, if fewer) are done. Design choice: a
      model whose single call takes a second (MobileNetV2 at batch 256 on 2 CPU cores) has
      little call-to-call jitter relative to its time, while ten rounds of a group of seven
      cost over a minute; fast models never reach the budget and keep every round.
    settle: untimed calls of a function right before each of its timed calls (see the module
      docstring); ignored for a single function, whose calls already run back to back, and for
      a function whose last warm-up call took ``SETTLE_BELOW_MS`` or more.
  """
  if repeats < 1 or warmup < 0 or settle < 0:
    raise ValueError(f'need repeats >= 1, warmup >= 0 and settle >= 0, got {repeats}, {warmup}, '
                     f'{settle}')
  compiled, compile_s = [], []
  for fn, args in calls:
    exe, seconds = compiled_call(fn, args)
    compiled.append((exe, args))
    compile_s.append(seconds)
  samples: list[list[float]] = [[] for _ in calls]
  start = time.perf_counter()
  for r, times in zip(range(repeats), interleaved_rounds(compiled, warmup, settle)):
    for i, t in enumerate(times):
      samples[i].append(t)
    if (max_seconds is not None and r + 1 >= min(MIN_ROUNDS, repeats)
        and time.perf_counter() - start >= max_seconds):
      break
  return [timing_from_samples(s, c) for s, c in zip(samples, compile_s)]


def compiled_call(fn: Callable, args: tuple) -> tuple[Callable, float]:
  """``fn`` compiled ahead of time for ``args`` (so compilation is never timed), and seconds."""
  interrupt.check()
  if isinstance(fn, jax.stages.Compiled):
    return fn, 0.0
  return compile_fn(fn if hasattr(fn, 'lower') else jax.jit(fn), *args)


def interleaved_rounds(calls: Sequence[tuple[Callable, tuple]], warmup: int = DEFAULT_WARMUP,
                       settle: int = DEFAULT_SETTLE) -> Iterator[list[float]]:
  """Endless rounds over compiled ``(exe, args)`` calls: each yields one timed call (ms) per
  function, in the order of ``calls`` (the calling order rotates every round).

  The protocol of :func:`measure_many` (``warmup`` untimed calls each first; with several
  functions, ``settle`` untimed calls before each timed call of a function faster than
  ``SETTLE_BELOW_MS``). The caller decides when to stop: a fixed count, a time budget, or a
  sequential rule (``search.measure``).
  """
  n = len(calls)
  settles = []
  for exe, args in calls:
    last_ms = 0.0
    for _ in range(warmup):
      last_ms = _call_blocking(exe, args)
    settles.append(settle if n > 1 and last_ms < SETTLE_BELOW_MS else 0)
  for r in itertools.count():
    interrupt.check()   # Between rounds (a round's timings are never cut short).
    times = [0.0] * n
    for j in range(n):
      i = (j + r) % n  # Rotate the order so no function always starts a round.
      exe, args = calls[i]
      for _ in range(settles[i]):
        jax.block_until_ready(exe(*args))
      times[i] = _call_blocking(exe, args)
    yield times


def measure(fn: Callable, *args, repeats: int = DEFAULT_REPEATS,
            warmup: int = DEFAULT_WARMUP) -> Timing:
  """Latency of ``fn(*args)``: jit-compile, warm up, median of ``repeats`` blocking calls."""
  return measure_many([(fn, args)], repeats=repeats, warmup=warmup)[0]


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts every floating-point leaf of ``tree`` to ``dtype`` (integer leaves are kept)."""
  dtype = jnp.dtype(dtype)
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def synthetic_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0,
                        dtype: Any = jnp.float32) -> Variables:
  """Variables of the right shapes for timing, without running (and compiling) ``model.init``.

  Values are small normals (BatchNorm variances are ones): latency does not depend on them, and
  this keeps measuring many architectures cheap. ``input_shape`` includes the batch dimension.
  """
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False))
  return synthetic_variables_like(abstract, seed, dtype)


def synthetic_variables_like(abstract: Any, seed: int = 0, dtype: Any = jnp.float32) -> Any:
  """Values for a tree of ``jax.ShapeDtypeStruct`` (see :func:`synthetic_variables`)."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  values = []
  for path, leaf in leaves:
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'var':
      value = np.ones(leaf.shape, np.float32)
    else:
      value = (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)
    values.append(value)
  variables = jax.tree_util.tree_unflatten(treedef, values)
  return jax.device_put(cast_floating(variables, dtype))


def timeable_variables(variables: Any, seed: int = 0) -> Any:
  """``variables`` themselves, or synthetic values when they are abstract (``jax.eval_shape``):
  latency does not depend on the values."""
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(variables)):
    return synthetic_variables_like(variables, seed)
  return variables


def measure_model(model: nn.Module, variables: Variables, input_shape: tuple[int, ...],
                  dtype: Any = jnp.float32, repeats: int = DEFAULT_REPEATS,
                  warmup: int = DEFAULT_WARMUP) -> Timing:
  """End-to-end eval-mode latency of ``model.apply(variables, x, train=False)``.

  Variables are passed as jit *arguments* (not closed-over constants), as in real inference, so
  XLA cannot constant-fold them. ``input_shape`` is the full batch shape, e.g. (256, 28, 28, 1);
  variables and input are cast to ``dtype``.
  """
  return measure_models([(model, variables)], input_shape, dtype, repeats, warmup)[0]


def eval_apply(model: nn.Module) -> Callable:
  """``model.apply(variables, x, train=False)`` jitted, variables as arguments (not constants)."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def measure_models(models: Sequence[tuple[nn.Module, Variables]], input_shape: tuple[int, ...],
                   dtype: Any = jnp.float32, repeats: int = DEFAULT_REPEATS,
                   warmup: int = DEFAULT_WARMUP) -> list[Timing]:
  """:func:`measure_model` for several models at once, with interleaved timed calls."""
  if len(input_shape) < 2:
    raise ValueError(f'input_shape must include the batch dimension, got {input_shape}')
  x = jax.device_put(jnp.asarray(
      np.random.default_rng(0).standard_normal(input_shape), dtype=jnp.dtype(dtype)))
  calls = [(eval_apply(model), (jax.device_put(cast_floating(variables, dtype)), x))
           for model, variables in models]
  return measure_many(calls, repeats=repeats, warmup=warmup)


# ---- machine load ------------------------------------------------------------------------------
def _cpu_jiffies() -> Optional[tuple[float, float]]:
  """(busy jiffies of the CPUs this process may use, jiffies this process used), or None."""
  try:
    cpus = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None
    busy = 0.0
    with open('/proc/stat') as f:
      for line in f:
        name, *values = line.split()
        if not name.startswith('cpu') or name == 'cpu':
          continue
        if cpus is not None and int(name[3:]) not in cpus:
          continue
        v = [float(x) for x in values]
        busy += v[0] + v[1] + v[2] + sum(v[5:8])  # user nice system irq softirq steal
    with open('/proc/self/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return busy, float(fields[11]) + float(fields[12])  # utime + stime (all threads)
  except (OSError, ValueError, IndexError):
    return None


class CpuMonitor:
  """Share of this process's CPUs that *other* processes used while the block ran.

  ``foreign_load`` is in [0, 1] (1: other processes kept every core busy), None where the OS
  does not tell (not Linux). Unlike the load average, it does not count this process's own
  threads, so it stays meaningful while we are the ones keeping the machine busy.

  Usage::

    with CpuMonitor() as monitor:
      ...
    monitor.foreign_load
  """

  def __init__(self):
    self.foreign_load: Optional[float] = None
    self._start: Optional[tuple[float, float]] = None
    self._t0 = 0.0

  def __enter__(self) -> 'CpuMonitor':
    self._start = _cpu_jiffies()
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    end = _cpu_jiffies()
    wall = time.perf_counter() - self._t0
    if self._start is None or end is None or wall <= 0:
      return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    hz = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
    foreign = (end[0] - self._start[0]) - (end[1] - self._start[1])
    self.foreign_load = float(np.clip(foreign / (hz * wall * max(1, cores or 1)), 0.0, 1.0))


def foreign_load(seconds: float = 0.5) -> Optional[float]:
  """Share of the CPUs other processes use now, sampled over ``seconds`` (see CpuMonitor)."""
  with CpuMonitor() as monitor:
    time.sleep(seconds)
  return monitor.foreign_load


# ---- relative measurement ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Relative:
  """Latency of one function measured in rounds together with a reference function.

  Attributes:
    timing: the function's own :class:`Timing`.
    ratio: median over rounds of (its time / the reference's time in the same round).
    ratio_iqr: interquartile range of those per-round ratios.
    reference: the reference's :class:`Timing` (the same object for every function of a call).
    foreign_load: CPU share other processes took during the measurement (None: unknown).
  """

  timing: Timing
  ratio: float
  ratio_iqr: float
  reference: Timing
  foreign_load: Optional[float]

  @property
  def ms(self) -> float:
    return self.timing.median_ms


def measure_relative(reference: tuple[Callable, tuple], calls: Sequence[tuple[Callable, tuple]],
                     repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
                     max_seconds: Optional[float] = None) -> list[Relative]:
  """Times ``calls`` interleaved with ``reference``; each result carries its per-round ratio.

  Design choice: a slow drift of background load (another process starting) inflates every
  function of a round alike, so the per-round ratio to a reference (the unpruned model, the
  teacher) is far more stable on a shared machine than absolute times; a latency target is a
  fraction of the teacher's latency anyway. ``max_seconds``: see :func:`measure_many`.
  """
  with CpuMonitor() as monitor:
    timings = measure_many([reference, *calls], repeats=repeats, warmup=warmup,
                           max_seconds=max_seconds)
  ref = timings[0]
  ref_times = np.asarray(ref.times_ms)
  out = []
  for t in timings[1:]:
    ratios = np.asarray(t.times_ms) / ref_times
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    out.append(Relative(t, float(q50), float(q75 - q25), ref, monitor.foreign_load))
  return out
