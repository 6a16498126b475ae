"""TT-MPD and the baselines as registered strategies (``METHODS``).

Three kinds, one interface — ``method.prune(problem, config, name=..., store=..., log=...)``
returns a :class:`Pruned` network (before long-term fine-tuning):

* :class:`IterativeMethod` — the shared loop (``loop.py``) with a judge: ``ttmpd`` (Â with a
  shrunk scale, each pick checked after its fine-tuning), ``ttmpd_unchecked`` (Â as fitted, no
  check: the earlier TT-MPD), ``ttmpd_shortlist`` (Â shortlists, the shortlist is fine-tuned),
  ``netadapt``, ``eagleeye``;
* :class:`OneShotMethod` — an allocator picks a whole architecture at once: ``halp``, ``uniform``;
* :class:`Reference` — no pruning: ``teacher``, ``teacher_bn``.

Every pruning method ends the same way: the network reaching the *predicted* target is measured
against the teacher, and while the measured ratio misses ``latency_target ± latency_tolerance``
the predicted target is corrected from the measurement and the method continues (or steps back)
— at most ``measure_rounds`` times (a one-shot method then ends on the allocation measured closest
to the target). Adding a method = one class (or one judge/allocator) and one
``METHODS.register`` line; a method has ``prunes`` and, optionally, ``revision`` (a change that
alters only its results bumps it, so the launcher's resume key drops only its finished rows).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from ttmpd_jax.distill import bn_adapt
from ttmpd_jax.latency.compilations import CompilationCounter
from ttmpd_jax.models.common import widths_from_variables
from ttmpd_jax.pruning.graph import discover_groups
from ttmpd_jax.pruning.surgery import remove_channels
from ttmpd_jax.search import judges, measure, oneshot, state as state_lib
from ttmpd_jax.search.candidates import width_keys
from ttmpd_jax.search.config import SearchConfig
from ttmpd_jax.search.loop import Run, example_input, search_step
from ttmpd_jax.search.problem import Problem
from ttmpd_jax.search.registry import Registry
from ttmpd_jax.search.scoring import make_scorer
from ttmpd_jax.search.state import IterationStore, SearchState

Log = Callable[[str], None]
METHODS: Registry = Registry('method', 'method')


@dataclasses.dataclass
class Pruned:
  """A method's network before long-term fine-tuning, with how it got there."""

  variables: Any
  times: dict[str, float]
  compilations: list[int]
  reached_target: bool
  message: str
  measurements: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  details: dict[str, Any] = dataclasses.field(default_factory=dict)   # Method-specific.
  snapshots: list[tuple[int, Any]] = dataclasses.field(default_factory=list)
  masks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # Over the teacher.


def measure_network(problem: Problem, variables: Any, log: Log,
                    band: Optional[tuple[float, float]] = None) -> measure.Measurement:
  """``variables`` measured against the teacher; ``band``: the ratios the decision turns on
  (measuring stops once the ratio is known to lie inside or outside it)."""
  return measure.measure_against_teacher(problem.teacher, (problem.model, variables),
                                         problem.latency_batch, problem.image_shape, band=band,
                                         log=log)


def target_band(config: SearchConfig, margin: float = 0.0) -> tuple[float, float]:
  """``latency_target ± (latency_tolerance − margin)`` as (low, high) ratios."""
  return measure.band(config.latency_target,
                      max(config.latency_tolerance - margin, config.latency_tolerance / 3))


def _rescale(run: Run, state: SearchState, l0_ms: float) -> None:
  """Re-expresses a resumed state's predicted-ms target on today's latency model.

  Design choice: the target is a fraction of the teacher's *prediction*, and a resumed run's
  latency model may predict the teacher differently (a re-timed teacher, a table refitted after a
  fresh measurement), so the saved milliseconds are scaled by the new/old teacher prediction.
  """
  factor = l0_ms / state.l0_ms
  if abs(factor - 1.0) > 1e-9:
    run.log(f'[{state.method}] the latency model now predicts the teacher at {l0_ms:.2f} ms '
            f'(saved run: {state.l0_ms:.2f} ms); its target is rescaled to the same ratio')
    state.target_ms *= factor
    state.l0_ms = l0_ms


def _measurement_row(m: measure.Measurement, predicted_ms: float, l0_ms: float,
                     widths: dict[str, int], **extra: Any) -> dict[str, Any]:
  """A measurement as reported; ``widths`` name the measured network (the final report pools
  every measurement of the network it ends with)."""
  return {**m.to_json(), 'predicted_ratio': predicted_ms / l0_ms, 'widths': dict(widths),
          **extra}


def variables_of_widths(problem: Problem, widths: dict[str, int]) -> Any:
  """The teacher's variables cut to ``widths`` (first channels kept): shapes for restoring."""
  teacher = jax.device_get(problem.teacher_variables)
  groups = discover_groups(problem.model, teacher, example_input(problem))
  masks = {}
  for g in groups:
    keys = [k for k in width_keys(g) if k in widths]
    if g.prunable and keys:
      masks[g.name] = np.arange(g.size) < widths[keys[0]]
  return remove_channels(teacher, groups, masks) if masks else teacher


@dataclasses.dataclass(frozen=True)
class IterativeMethod:
  """The shared iterative loop; ``judge`` builds the candidate-judging strategy from a config."""

  judge: Callable[[SearchConfig], judges.Judge]
  prunes: bool = True
  revision: int = 0   # Enters the run key when not 0 (see OneShotMethod).

  def prune(self, problem: Problem, config: SearchConfig, *, name: str,
            store: Optional[IterationStore] = None, log: Log = print) -> Pruned:
    run = Run(problem, config, self.judge(config), log, store)
    state, variables, resumed = self._start(run, name, store)
    snapshots = {state.iteration: (variables, dict(state.kept))}
    while state.status != state_lib.DONE:
      while state.status == state_lib.SEARCHING and state.iteration < config.max_iterations:
        state, variables = search_step(run, state, variables)   # Saves each step to the store.
        snapshots[state.iteration] = (variables, dict(state.kept))
      variables = self._settle(run, state, variables, snapshots)
      if store is not None:
        store.save(state, variables)
    reached = state.met_target if state.measurements else (
        problem.latency.predict(widths_from_variables(variables)) <= state.target_ms * 1.000001)
    details = {'trajectory': state.trajectory, 'candidates': state.candidates,
               'judge': state.judge, 'resumed_from': resumed}
    sizes = {g.name: g.size for g in discover_groups(
        problem.model, jax.device_get(problem.teacher_variables), example_input(problem))}
    masks = {name: np.isin(np.arange(sizes[name]), ids) for name, ids in state.kept.items()}
    return Pruned(variables, state.times, state.compilations, reached,
                  state.message or 'latency target reached', state.measurements, details,
                  [(k, v) for k, (v, _) in sorted(snapshots.items())], masks)

  def _start(self, run: Run, name: str, store: Optional[IterationStore]):
    problem = run.problem
    variables = jax.device_get(problem.teacher_variables)
    l0 = problem.latency.predict(widths_from_variables(variables))
    state = SearchState(name, l0, run.config.latency_target * l0)
    state.judge = run.judge.to_json()   # Reported even when the search stops before iterating.
    if store is not None:
      restored = store.latest(lambda widths: variables_of_widths(problem, widths))
      if restored is not None:
        state, variables = restored
        if state.judge:
          run.judge.load_json(state.judge)
        run.log(f'[{name}] resuming after iteration {state.iteration} ({state.status})')
        _rescale(run, state, l0)
        return state, variables, state.iteration
    return state, variables, None

  def _settle(self, run: Run, state: SearchState, variables: Any, snapshots: dict) -> Any:
    """Measures the network; if it misses the band, moves the predicted target and continues.

    Too slow: the predicted target is corrected by the local measured/predicted ratio and the
    search goes on. Too fast: the trajectory is bisected *by measurement* for the last network
    not too fast; inside the band it is taken, otherwise the search restarts from it aiming
    between it and its successor (interpolated in predicted ms). While corrections remain, a
    network is accepted only inside the band narrowed by ``NOISE_MARGIN`` (a measurement at the
    band's edge may fall outside when measured again); when they run out (``measure_rounds``) or
    a bracket was already tried, the measured network closest to the target is taken and judged
    against the full band.
    """
    config, problem = run.config, run.problem
    predicted = problem.latency.predict(widths_from_variables(variables))
    if state.status == state_lib.SEARCHING:   # max_iterations hit before the target.
      state.message = (f'stopped after max_iterations={config.max_iterations} at {predicted:.2f} '
                       f'ms predicted = {predicted / state.l0_ms:.3f} of the teacher')
    if config.measure_rounds == 0:
      state.status = state_lib.DONE
      return variables
    ratio = _measure_into(run, state, variables, state.iteration)
    if _within(config, ratio, NOISE_MARGIN) or (ratio > config.latency_target and
                                                state.status != state_lib.REACHED):
      return self._done(state, variables, _within(config, ratio), ratio)
    if len(state.stepped_back) + state.corrections >= config.measure_rounds:
      return self._closest(run, state, snapshots, variables, ratio)
    if ratio > config.latency_target:   # Too slow, target reached as predicted: aim lower.
      state.corrections += 1
      state.target_ms = measure.corrected_target_ms(ratio, predicted, state.l0_ms,
                                                    config.latency_target)
      state.status = state_lib.SEARCHING
      return variables
    keys = sorted(snapshots)
    lo, hi, ratios = 0, len(keys) - 1, {keys[0]: 1.0, keys[-1]: ratio}
    predicted_of = lambda k: problem.latency.predict(widths_from_variables(snapshots[k][0]))
    while hi - lo > 1:
      mid = _aimed_between(keys, lo, hi, ratios, predicted_of, config.latency_target)
      ratios[keys[mid]] = _measure_into(run, state, snapshots[keys[mid]][0], keys[mid])
      if _within(config, ratios[keys[mid]], NOISE_MARGIN):
        variables, state.kept = snapshots[keys[mid]][0], dict(snapshots[keys[mid]][1])
        run.log(f'[{state.method}] taking the network of iteration {keys[mid]}')
        return self._done(state, variables, True, ratios[keys[mid]])
      lo, hi = (lo, mid) if ratios[keys[mid]] < config.latency_target else (mid, hi)
    back = keys[lo]
    if back in state.stepped_back:   # Channel steps too coarse to land in the band.
      return self._closest(run, state, snapshots, variables, ratio)
    state.stepped_back.append(back)
    p_lo, p_hi = (problem.latency.predict(widths_from_variables(snapshots[k][0]))
                  for k in (keys[lo], keys[hi]))
    state.target_ms = measure.interpolated_target_ms((ratios[keys[lo]], p_lo),
                                                     (ratios[keys[hi]], p_hi),
                                                     config.latency_target)
    variables, state.kept = snapshots[back][0], dict(snapshots[back][1])
    run.log(f'[{state.method}] stepping back to the network of iteration {back}, aiming at '
            f'{state.target_ms:.2f} ms predicted')
    state.status = state_lib.SEARCHING
    return variables

  def _closest(self, run: Run, state: SearchState, snapshots: dict, variables: Any,
               ratio: float) -> Any:
    """Ends with the measured network closest to the target (judged against the full band)."""
    config = run.config
    measured = [m for m in state.measurements if m.get('iteration') in snapshots]
    if not measured:   # Resumed past the measurements: only the current network is known.
      return self._done(state, variables, _within(config, ratio), ratio)
    best = min(measured, key=lambda m: abs(m['ratio'] - config.latency_target))
    variables, state.kept = snapshots[best['iteration']][0], dict(
        snapshots[best['iteration']][1])
    run.log(f'[{state.method}] taking the network of iteration {best["iteration"]}, the closest '
            f'to the target as measured ({best["ratio"]:.3f})')
    return self._done(state, variables, _within(config, best['ratio']), best['ratio'])

  @staticmethod
  def _done(state: SearchState, variables: Any, met: bool, ratio: float) -> Any:
    state.status, state.met_target = state_lib.DONE, met
    if not met and not state.message:
      state.message = (f'measured latency {ratio:.3f} of the teacher is outside the target '
                       f'band after {len(state.measurements)} measurements (channel steps or '
                       f'the latency model too coarse to land in it)')
    return variables


def _aimed_between(keys: list[int], lo: int, hi: int, ratios: dict[int, float],
                   predicted_of: Callable[[int], float], target: float) -> int:
  """The snapshot strictly between ``keys[lo]`` and ``keys[hi]`` (both measured) to measure next.

  Design choice: the line through the two measured networks (measured ratio against predicted
  ms) says where the target lies; the snapshot predicted closest to that point is measured, not
  the middle one. The predictor is locally right to a few percent, so this usually lands in the
  band with one measurement where bisecting a 12-step trajectory took three or four.
  """
  aim = measure.interpolated_target_ms((ratios[keys[lo]], predicted_of(keys[lo])),
                                       (ratios[keys[hi]], predicted_of(keys[hi])), target)
  return min(range(lo + 1, hi), key=lambda i: abs(predicted_of(keys[i]) - aim))


# Part of the tolerance kept free while the search can still correct: the ratio of one network
# measured twice differs by about 1% of the target (median of per-round ratios, 2-core CPU).
NOISE_MARGIN = 0.01


def _within(config: SearchConfig, ratio: float, margin: float = 0.0) -> bool:
  """Inside ``latency_target ± (latency_tolerance − margin)`` (relative)."""
  low, high = target_band(config, margin)
  return low <= ratio <= high


def _measure_into(run: Run, state: SearchState, variables: Any, iteration: int) -> float:
  """Measures ``variables`` against the teacher; records and prints it; returns the ratio."""
  config, problem = run.config, run.problem
  start = time.time()
  m = measure_network(problem, variables, run.log, target_band(config, NOISE_MARGIN))
  state.times['measure'] = state.times.get('measure', 0.0) + time.time() - start
  widths = widths_from_variables(variables)
  predicted = problem.latency.predict(widths)
  met = _within(config, m.ratio)
  state.measurements.append(_measurement_row(m, predicted, state.l0_ms, widths, met_target=met,
                                             iteration=iteration))
  run.log(f'[{state.method}] network of iteration {iteration}: measured {m.ratio:.3f} of the '
          f'teacher ({m.model_ms:.2f} / {m.teacher_ms:.2f} ms), predicted '
          f'{predicted / state.l0_ms:.3f}; target {config.latency_target:g} ± '
          f'{100 * config.latency_tolerance:g}%{" met" if met else ""}')
  return m.ratio


@dataclasses.dataclass(frozen=True)
class OneShotMethod:
  """An allocator ``(groups, scores, widths, predict, target_ms, round_to) -> (counts, extra)``
  picks kept channels per group at once; ``criterion`` scores channels (None: the config's).

  Meeting the measured target (design choice): an allocator moves in discrete jumps, so the
  corrected target may lead back to an allocation already measured — it is then never measured
  again; the neighbouring allocation on the side the measurement asks for is tried instead
  (:func:`oneshot.neighbour`), and when that one is measured too, no allocation lies in the band
  between them and the method stops ("no allocation in the band"). Once measurements lie on both
  sides of the target, the next predicted target is interpolated between the closest pair
  (:func:`oneshot.bracketed_target_ms`) rather than corrected from the latest one alone, which
  made an allocator oscillate between two networks. ``revision`` enters the run key of the
  methods it is not 0 for (results of earlier revisions are not reused).
  """

  allocate: Callable[..., tuple[dict[str, int], dict[str, Any]]]
  criterion: Optional[str] = None
  prunes: bool = True
  revision: int = 1   # 1: no allocation measured twice; neighbours; bracketed targets.

  def prune(self, problem: Problem, config: SearchConfig, *, name: str,
            store: Optional[IterationStore] = None, log: Log = print) -> Pruned:
    del store  # Seconds of work: recomputed rather than resumed.
    counter, start = CompilationCounter(), time.time()
    teacher = jax.device_get(problem.teacher_variables)
    full = widths_from_variables(teacher)
    l0 = problem.latency.predict(full)
    target_ms, measurements, measure_s = config.latency_target * l0, [], 0.0
    with counter:
      groups = discover_groups(problem.model, teacher, example_input(problem))
      scores = make_scorer(self.criterion or config.importance, problem.model, groups,
                           problem.data, seed=config.seed)(teacher)

    def allocate(target):
      return self.allocate(groups, scores, full, problem.latency.predict, target,
                           config.round_to)

    tried: dict[tuple, int] = {}   # Allocation -> index of its measurement.
    choices = []                   # (variables, counts, extra) of each measured allocation.
    stop = ''
    counts, extra = allocate(target_ms)
    for _ in range(config.measure_rounds + 1):
      variables = remove_channels(teacher, groups, oneshot.masks_for_counts(scores, groups,
                                                                            counts))
      predicted = problem.latency.predict(widths_from_variables(variables))
      if config.measure_rounds == 0:
        break
      t0 = time.time()
      m = measure_network(problem, variables, log, target_band(config))
      measure_s += time.time() - t0
      met = measure.within(m.ratio, config.latency_target, config.latency_tolerance)
      measurements.append(_measurement_row(m, predicted, l0, widths_from_variables(variables),
                                           met_target=met, **extra))
      tried[oneshot.allocation_key(counts)] = len(choices)
      choices.append((variables, counts, extra))
      log(f'[{name}] measured {m.ratio:.3f} of the teacher (predicted {predicted / l0:.3f})')
      if met or len(measurements) > config.measure_rounds:
        break
      target_ms = oneshot.bracketed_target_ms(measurements, l0, config.latency_target)
      found, stop = _unmeasured_allocation(allocate, target_ms, tried, measurements,
                                           config.latency_target, l0)
      if found is None:
        log(f'[{name}] {stop}')
        break
      counts, extra = found
    final = None
    if measurements:
      # The allocation measured closest to the target: the in-band one if any, else — the
      # corrections ran out, or no allocation lies in the band — not necessarily the last.
      best = min(range(len(measurements)),
                 key=lambda i: abs(measurements[i]['ratio'] - config.latency_target))
      final = measurements[best]
      variables, counts, extra = choices[best]
      if best != len(measurements) - 1:
        log(f'[{name}] taking the allocation measured closest to the target '
            f'({final["ratio"]:.3f})')
    reached = final['met_target'] if final else predicted <= target_ms
    message = _one_shot_message(bool(reached), final, extra, stop, len(measurements),
                                config.round_to)
    times = {'search': time.time() - start - measure_s, 'measure': measure_s}
    masks = oneshot.masks_for_counts(scores, groups, counts)
    return Pruned(variables, times, [counter.count], bool(reached), message, measurements,
                  dict(extra), masks={k: np.asarray(v, bool) for k, v in masks.items()})


def _unmeasured_allocation(allocate: Callable[[float], tuple[dict[str, int], dict[str, Any]]],
                           target_ms: float, tried: dict[tuple, int],
                           measurements: list[dict[str, Any]], target: float, l0_ms: float
                           ) -> tuple[Optional[tuple[dict[str, int], dict[str, Any]]], str]:
  """The allocation to measure next, aiming at ``target_ms`` but never one measured before:
  ``(allocation, '')``, or ``(None, why)`` when no allocation is left to try."""
  found = allocate(target_ms)
  again = tried.get(oneshot.allocation_key(found[0]))
  if again is None:
    return found, ''
  slower = measurements[again]['ratio'] < target
  found = oneshot.neighbour(allocate, target_ms, found[0], slower, l0_ms)
  if found is None:
    return None, (f'no {"slower" if slower else "faster"} allocation than the one measured '
                  f'{measurements[again]["ratio"]:.3f}')
  if oneshot.allocation_key(found[0]) in tried:
    return None, 'no allocation in the band: the allocations on either side of it are measured'
  return found, ''


def _one_shot_message(reached: bool, final: Optional[dict[str, Any]], extra: dict[str, Any],
                      stop: str, n_measured: int, round_to: int) -> str:
  measured = (f'; its network measured {final["ratio"]:.3f} of the teacher' if final else '')
  if reached:
    return 'latency target reached'
  if not extra.get('predicted_reached', True):
    return (f'latency target unreachable: no allocation with round_to={round_to} reaches it as '
            f'predicted, kept the fastest one{measured}')
  if stop:
    return f'latency target missed: {stop}{measured}'
  return f'latency target missed after {n_measured} measurements{measured}'


@dataclasses.dataclass(frozen=True)
class Reference:
  """No pruning: the source model as given, optionally with test-time BN adaptation."""

  adapt_bn: bool = False
  prunes: bool = False
  revision: int = 0

  def prune(self, problem: Problem, config: SearchConfig, *, name: str,
            store: Optional[IterationStore] = None, log: Log = print) -> Pruned:
    del name, store, log
    start, variables = time.time(), problem.source_variables
    if self.adapt_bn:
      variables = bn_adapt.teacher_bn_adapt(problem.model, variables, problem.dataset,
                                            seed=config.seed)
    return Pruned(jax.device_get(variables), {'search': time.time() - start}, [], True,
                  'reference (not pruned)')


def _uniform(groups, scores, widths, predict, target_ms, round_to):
  del scores
  counts, ratio, reached = oneshot.uniform_counts(groups, widths, predict, target_ms, round_to)
  return counts, {'keep_ratio': ratio, 'predicted_reached': reached}


def _knapsack(groups, scores, widths, predict, target_ms, round_to):
  counts, reached = oneshot.knapsack_counts(groups, scores, widths, predict, target_ms, round_to)
  return counts, {'predicted_reached': reached}


METHODS.register('ttmpd')(IterativeMethod(judges.TTMPDJudge.create))
METHODS.register('ttmpd_unchecked')(IterativeMethod(judges.TTMPDJudge.unchecked))
METHODS.register('ttmpd_shortlist')(IterativeMethod(
    lambda config: judges.TTMPDJudge.create(config, shortlist=config.shortlist)))
METHODS.register('netadapt')(IterativeMethod(lambda config: judges.NetAdaptJudge()))
METHODS.register('eagleeye')(IterativeMethod(lambda config: judges.Judge()))
METHODS.register('halp')(OneShotMethod(_knapsack, criterion='taylor'))
METHODS.register('uniform')(OneShotMethod(_uniform))
METHODS.register('teacher')(Reference())
METHODS.register('teacher_bn')(Reference(adapt_bn=True))
