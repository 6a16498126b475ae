"""One method end to end on a prepared problem: prune, fine-tune long-term, measure, report.

``run_method`` returns a typed :class:`MethodReport` (JSON via ``to_json``) and the final
variables. Every method goes through the same steps with the same budgets; what a method does
differently lives in its registered strategy (``methods.METHODS``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from ttmpd_jax.distill import cache as cache_lib
from ttmpd_jax.distill import finetune as finetune_lib
from ttmpd_jax.models.common import widths_from_variables
from ttmpd_jax.pruning.cost import count_cost
from ttmpd_jax.search import judges
from ttmpd_jax.search.config import SearchConfig
from ttmpd_jax.search.measure import Measurement, band, within
from ttmpd_jax.search.methods import METHODS, Pruned, measure_network, target_band
from ttmpd_jax.search.problem import Problem
from ttmpd_jax.search.proxy import AccuracyModel, spearman
from ttmpd_jax.search.state import IterationStore

# Bumped whenever a change alters what a method returns for the same inputs (search, measurement,
# fine-tuning): part of every run's identity, so a resumed benchmark never mixes rows computed by
# different versions of the method.
RESULT_VERSION = 7   # 7: sequential measuring, TT-MPD checks its picks; 6: a group at
                     # round_to channels is not cut below; 5: fusion regimes.

Log = Callable[[str], None]


@dataclasses.dataclass
class MethodReport:
  """One method's result on one test set (``accuracy`` is filled by callers holding labels)."""

  method: str
  kd: str
  dataset: str
  latency_target: float
  latency_ratio: float
  latency_ms_measured: float
  latency_ms_teacher_measured: float
  latency_ms_predicted: float
  latency_reliable: bool
  met_target: bool
  reached_target: bool
  message: str
  flops: int
  params: int
  time_s: dict[str, float]
  prune_finetune_s: float
  wall_s: float
  compilations: dict[str, Any]
  widths: dict[str, int]
  measurements: list[dict[str, Any]]
  accuracy: Optional[float] = None
  trajectory: Optional[list[dict[str, Any]]] = None
  candidates: Optional[list[dict[str, Any]]] = None
  proxy: Optional[dict[str, Any]] = None
  proxy_spearman: Optional[dict[str, Any]] = None
  resumed_from: Optional[int] = None
  spearman: Optional[float] = None      # Â on its own calibration points (in sample).
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    row = dataclasses.asdict(self)
    row.update(row.pop('extra'))
    return {k: v for k, v in row.items() if v is not None or k == 'accuracy'}


def long_term_dir(work_dir: str, student: Any) -> str:
  """Resume folder of the long-term fine-tuning of ``student``, keyed by its weights.

  Design choice: a method whose search ends on measurements (a one-shot allocator taking the
  allocation measured closest to the target) can end on another network when an interrupted run
  is resumed; its half-done fine-tuning then belongs to a different student. Keying the folder by
  the student keeps that work on disk and lets the new student start, instead of refusing.
  """
  return os.path.join(work_dir, 'long_term', cache_lib.fingerprint_variables(student)[:16])


def long_term_finetune(problem: Problem, variables: Any, config: SearchConfig,
                       checkpoint_dir: Optional[str], log: Log) -> tuple[Any, float]:
  """KD from the cached pseudo labels (or the online teacher) for ``long_term_steps`` steps."""
  if config.long_term_steps <= 0:
    return variables, 0.0
  start = time.time()
  teacher = problem.teacher if config.kd == 'online' else None
  variables, _ = finetune_lib.finetune(
      problem.model, variables, problem.dataset, steps=config.long_term_steps,
      batch_size=min(config.batch_size, len(problem.cache)), learning_rate=config.long_term_lr,
      seed=config.seed, cache=problem.cache, teacher=teacher, ids=problem.cache.ids,
      temperature=config.temperature, hard_weight=config.hard_weight, schedule='cosine',
      checkpoint_dir=checkpoint_dir, log_every=max(config.long_term_steps // 5, 1),
      print_fn=lambda s: log(f'  long-term KD: {s}'))
  return variables, time.time() - start


def proxy_spearman(pruned: Pruned) -> Optional[dict[str, Any]]:
  """Within-iteration Spearman of v1, v2 and Â with real accuracies, where the run knows them."""
  if 'candidates' not in pruned.details:
    return None
  judge = pruned.details.get('judge') or {}
  model = AccuracyModel.from_json(judge['model']) if 'model' in judge else None
  out = judges.within_iteration_spearman(pruned.details['candidates'], model)
  if judge.get('out_of_sample'):
    out['ttmpd_out_of_sample'] = [r['ttmpd'] for r in judge['out_of_sample']]
  if model is not None and judge.get('points'):   # In sample, pooled (the calibration fit).
    p = np.asarray(judge['points'], float)
    out['calibration_pooled'] = spearman(model.predict(p[:, 1], p[:, 2]), p[:, 3])
  return out


def confirmed_measurement(problem: Problem, variables: Any, pruned: Pruned,
                          config: SearchConfig, log: Log) -> Measurement:
  """The reported measurement of the final network (after long-term fine-tuning).

  Design choice: long-term fine-tuning changes weights, not the architecture, so every
  measurement the search took of a network with the final widths is a measurement of this one;
  they are pooled with a fresh one (medians of the ratio and the timings). One network measured
  twice differs by about 1% of the target, at times by more, so when the measurements spread over
  more than the tolerance a further one is taken first.
  """
  widths = widths_from_variables(variables)
  fields = {f.name for f in dataclasses.fields(Measurement)}
  same = [Measurement(**{k: v for k, v in m.items() if k in fields})
          for m in pruned.measurements if m.get('widths') == widths]
  edges = target_band(config)
  same.append(measure_network(problem, variables, log, edges))
  ratios = [m.ratio for m in same]
  if len(same) >= 2 and max(ratios) - min(ratios) > config.latency_tolerance * \
      config.latency_target:
    log(f'  measurements of the final network spread from {min(ratios):.3f} to '
        f'{max(ratios):.3f} of the teacher: measuring once more')
    same.append(measure_network(problem, variables, log, edges))
  if len(same) == 1:
    return same[0]
  loads = [m.load for m in same if m.load is not None]
  return Measurement(float(np.median([m.teacher_ms for m in same])),
                     float(np.median([m.model_ms for m in same])),
                     max(m.spread for m in same), max(loads) if loads else None,
                     all(m.reliable for m in same),
                     float(np.median([m.ratio for m in same])))


def run_method(name: str, problem: Problem, config: SearchConfig, *,
               work_dir: Optional[str] = None, log: Log = print
               ) -> tuple[MethodReport, Any, Pruned]:
  """Runs the registered method ``name`` end to end; ``work_dir`` holds its resume state.

  Returns the report, the final variables, and the method's :class:`Pruned` record (with its
  per-iteration snapshots, for callers that evaluate the trajectory).
  """
  method = METHODS.get(name)
  start = time.time()
  store = IterationStore(os.path.join(work_dir, 'iterations')) if work_dir else None
  try:
    pruned = method.prune(problem, config, name=name, store=store, log=log)
  finally:
    if store is not None:
      store.close()
  variables, long_s = pruned.variables, 0.0
  if method.prunes:
    ckpt = long_term_dir(work_dir, variables) if work_dir else None
    variables, long_s = long_term_finetune(problem, variables, config, ckpt, log)
  times = {'pseudo_labels': problem.pseudo_labels_s, 'latency_table': problem.latency_table_s,
           'search': 0.0, 'short_term_ft': 0.0, 'measure': 0.0, **pruned.times,
           'long_term_ft': long_s}
  wall = time.time() - start
  final_start = time.time()
  final = confirmed_measurement(problem, variables, pruned, config, log) if method.prunes else (
      measure_network(problem, variables, log, band(1.0, config.latency_tolerance)))
  # The report's own measurement, apart from the method's (not in prune + fine-tune time).
  times['measure_final'] = time.time() - final_start
  cost = count_cost(problem.model.model, variables, problem.image_shape)
  prune_finetune = sum(times[k] for k in ('search', 'short_term_ft', 'long_term_ft', 'measure'))
  times['total'] = sum(v for k, v in times.items() if k != 'measure_final')
  widths = widths_from_variables(variables)
  final_met = within(final.ratio, config.latency_target, config.latency_tolerance)
  if not method.prunes or (final_met and pruned.reached_target):
    message = pruned.message
  elif final_met:
    message = f'latency target met as measured ({final.ratio:.3f} of the teacher)'
  else:
    message = (f'measured {final.ratio:.3f} of the teacher, outside the target band'
               f'{"" if pruned.reached_target else ": " + pruned.message}')
  report = MethodReport(
      method=name, kd=config.kd, dataset=problem.dataset.name,
      latency_target=config.latency_target if method.prunes else 1.0,
      latency_ratio=final.ratio, latency_ms_measured=final.model_ms,
      latency_ms_teacher_measured=final.teacher_ms,
      latency_ms_predicted=problem.latency.predict(widths), latency_reliable=final.reliable,
      met_target=(not method.prunes) or final_met,
      reached_target=pruned.reached_target, message=message, flops=cost.macs,
      params=cost.params, time_s=times, prune_finetune_s=prune_finetune if method.prunes else 0.0,
      wall_s=wall, compilations={'total': int(sum(pruned.compilations)),
                                 'per_iteration': pruned.compilations,
                                 'max_per_iteration': int(max(pruned.compilations, default=0))},
      widths=widths, measurements=pruned.measurements,
      trajectory=pruned.details.get('trajectory'), candidates=pruned.details.get('candidates'),
      proxy=(pruned.details.get('judge') or {}).get('model'), proxy_spearman=proxy_spearman(pruned),
      resumed_from=pruned.details.get('resumed_from'),
      spearman=(proxy_spearman(pruned) or {}).get('calibration_pooled'),
      extra={k: v for k, v in pruned.details.items()
             if k not in ('trajectory', 'candidates', 'judge', 'resumed_from')})
  log(f'[{name}/{config.kd}] latency {final.model_ms:.2f} ms measured ({final.ratio:.3f} of '
      f'teacher {final.teacher_ms:.2f} ms{"" if final.reliable else ", UNRELIABLE"}; predicted '
      f'{report.latency_ms_predicted:.2f})  prune+fine-tune {prune_finetune:.1f}s'
      f'{"" if report.met_target else "  TARGET MISSED: " + report.message}')
  return report, variables, pruned

