"""The iterative, latency-constrained pruning loop: TT-MPD and the NetAdapt / EagleEye baselines.

One loop, three ways to judge a candidate (DESIGN.md §3-§4):

* ``ttmpd``: Â = f(v1, v2) (``search.proxy``), with f fitted on the candidates of the first
  ``calibration_iterations`` iterations, which are really short-term fine-tuned; afterwards no
  candidate is fine-tuned, only the chosen network (after physical removal).
* ``netadapt``: every candidate is short-term fine-tuned and judged by its real (held-out,
  pseudo-label) accuracy; the fine-tuned chosen candidate is kept.
* ``eagleeye``: one variable only, the adaptive-BN agreement v1; no calibration.

All three choose the candidate minimising (A_current − A_g) / (L_current − L_g). Candidates are
masks over the current network: per iteration one compiled evaluator and (when candidates are
fine-tuned) one compiled masked KD step serve every candidate; the chosen network gets new
shapes and one more compiled KD step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from ttmpd_jax.latency.compilations import CompilationCounter
from ttmpd_jax.models import ModelSpec, build_model, widths_from_variables
from ttmpd_jax.pruning.graph import discover_groups
from ttmpd_jax.pruning.masks import masks_remove_lowest
from ttmpd_jax.pruning.surgery import remove_channels, shrink_groups
from ttmpd_jax.search.scoring import make_scorer
from ttmpd_jax.search.candidates import make_candidates, selection_score
from ttmpd_jax.search.config import SearchConfig
from ttmpd_jax.search.evaluation import KDRunner, SearchData, make_candidate_evaluator
from ttmpd_jax.search.proxy import LinearAccuracyModel, spearman
from ttmpd_jax.search.resume import IterationStore


@dataclasses.dataclass
class SearchOutcome:
  """What the loop hands to the harness (before long-term fine-tuning)."""

  spec: ModelSpec
  variables: Any
  trajectory: list[dict[str, Any]]
  times: dict[str, float]
  compilations_per_iteration: list[int]
  candidates: list[dict[str, Any]]
  proxy: Optional[dict[str, Any]]
  reached_target: bool
  message: str
  resumed_from: Optional[int] = None
  # (iteration, spec, variables) after each iteration of this process (for reporting only).
  snapshots: list[tuple[int, ModelSpec, Any]] = dataclasses.field(default_factory=list)


def _timer(times: dict[str, float], key: str):
  class _T:
    def __enter__(self):
      self.t = time.time()

    def __exit__(self, *exc):
      times[key] = times.get(key, 0.0) + time.time() - self.t
  return _T()


def remove_channels_host(variables: Any, groups: Any, masks: Any) -> Any:
  """``remove_channels`` on host numpy arrays (no eager device gathers, so no compilations)."""
  return remove_channels(jax.device_get(variables), groups, masks)


def _calibration_subset(v1: np.ndarray, count: int) -> list[int]:
  """``count`` candidates spread over the range of v1 (a well-conditioned fit), or all."""
  order = list(np.argsort(v1))
  if count <= 0 or count >= len(order):
    return order
  picks = np.linspace(0, len(order) - 1, count).round().astype(int)
  return sorted({order[i] for i in picks})


def iterative_prune(method: str, *, spec: ModelSpec, variables: Mapping[str, Any],
                    image_shape: tuple[int, ...], data: SearchData,
                    predict_ms: Callable[[Mapping[str, int]], float], config: SearchConfig,
                    online_teacher: Optional[tuple[Any, Any]] = None,
                    store: Optional[IterationStore] = None,
                    log: Callable[[str], None] = print) -> SearchOutcome:
  """Prunes ``variables`` (the teacher's) until the predicted latency reaches the target.

  Args:
    method: 'ttmpd', 'netadapt' or 'eagleeye'.
    spec, variables, image_shape: the source (teacher) model.
    data: the fine-tuning subset split (``evaluation.SearchData``).
    predict_ms: width spec -> predicted latency (ms), e.g. ``LatencyPredictor.predict``.
    config: budgets.
    online_teacher: ``(model, variables)`` for ``kd='online'`` (teacher runs on every KD batch).
    store: per-iteration state for resuming; a run restarted with the same store continues.
  """
  times: dict[str, float] = {'search': 0.0, 'short_term_ft': 0.0}
  full_widths = widths_from_variables(variables)
  l0 = predict_ms(full_widths)
  target_ms = config.latency_target * l0
  trajectory: list[dict[str, Any]] = [{
      'iteration': 0, 'predicted_ms': l0, 'latency_ratio_predicted': 1.0, 'group': None,
      'removed': 0, 'score': None, 'elapsed_s': 0.0}]
  candidates_log: list[dict[str, Any]] = []
  compilations: list[int] = []
  proxy = LinearAccuracyModel()
  calibration: list[tuple[float, float, float]] = []
  start_iteration, resumed_from = 1, None
  current = jax.device_get(dict(variables))
  current_spec = spec

  def abstract_for(state):
    s = spec.with_widths(state['widths'])
    from ttmpd_jax.checkpoint import abstract_variables
    return abstract_variables(build_model(s), image_shape)

  if store is not None:
    restored = store.latest(abstract_for)
    if restored is not None:
      resumed_from, current, state = restored
      current_spec = spec.with_widths(state['widths'])
      trajectory, candidates_log = state['trajectory'], state['candidates']
      compilations, times = state['compilations'], state['times']
      proxy = LinearAccuracyModel(np.asarray(state['proxy']['coef']), state['proxy']['fitted'],
                                  state['proxy']['num_points'])
      calibration = [tuple(p) for p in state['calibration']]
      start_iteration = resumed_from + 1
      log(f'[{method}] resuming after iteration {resumed_from} '
          f'(predicted {trajectory[-1]["predicted_ms"]:.2f} ms)')

  snapshots = [] if resumed_from else [(0, spec, current)]
  model = build_model(current_spec)
  groups = discover_groups(model, current, np.zeros((1, *image_shape), np.float32))
  start = time.time() - trajectory[-1]['elapsed_s']
  message, reached = '', False
  for k in range(start_iteration, config.max_iterations + 1):
    widths = widths_from_variables(current)
    current_ms = predict_ms(widths)
    if current_ms <= target_ms * (1 + 1e-9):
      reached = True
      break
    counter = CompilationCounter()
    with counter, _timer(times, 'search'):
      delta = min(config.r0 * l0 * config.decay ** (k - 1), current_ms - target_ms)
      scores = make_scorer(config.importance, model, groups, data, seed=config.seed + k)(current)
      cands = make_candidates(groups, widths, predict_ms, delta, config.round_to)
      if not cands:
        message = (f'latency target unreachable: no channel group can save a tenth of the '
                   f'requested {delta:.2f} ms any more (groups at their minimum with '
                   f'round_to={config.round_to}, or savings below what the latency table '
                   f'resolves); stopping at the best reachable, {current_ms:.2f} ms predicted = '
                   f'{current_ms / l0:.3f} of the teacher')
        break
      masks = [masks_remove_lowest(scores, groups, {c.group: c.removed}) for c in cands]
      evaluate = make_candidate_evaluator(model, groups, data)
      base_masks = {g.name: np.ones((g.size,), bool) for g in groups if g.prunable}
      v1_cur, v2_cur = evaluate(current, base_masks)
      v = np.array([evaluate(current, m) for m in masks])
      v1, v2 = v[:, 0], v[:, 1]
    finetuned: dict[int, Any] = {}
    real = np.full(len(cands), np.nan)
    calibrating = method == 'ttmpd' and k <= config.calibration_iterations
    runner = None
    if config.short_term_steps > 0:
      # One masked KD step per iteration serves every candidate *and* the chosen network
      # (fine-tuned masked, then removed: equal to fine-tuning it pruned, by the masking law).
      runner = KDRunner(model, groups, data, learning_rate=config.short_term_lr,
                        steps=config.short_term_steps, batch_size=config.batch_size,
                        temperature=config.temperature, hard_weight=config.hard_weight,
                        seed=config.seed + k, online_teacher=online_teacher)
    if runner is not None and (method == 'netadapt' or calibrating):
      with counter, _timer(times, 'short_term_ft'):
        which = (range(len(cands)) if method == 'netadapt' else
                 _calibration_subset(v1, config.calibration_candidates))
        for i in which:
          finetuned[i] = runner.run(current, masks[i], config.short_term_steps)
          real[i] = evaluate(finetuned[i], masks[i])[0]
    with counter, _timer(times, 'search'):
      if calibrating:
        calibration += [(float(v1[i]), float(v2[i]), float(real[i])) for i in finetuned]
        if k == config.calibration_iterations or k == config.max_iterations:
          points = np.asarray(calibration)
          proxy = proxy.fit(points[:, 0], points[:, 1], points[:, 2])
          log(f'[{method}] fitted Â = {proxy.coef[0]:+.3f} {proxy.coef[1]:+.3f}·v1 '
              f'{proxy.coef[2]:+.3f}·v2 on {len(points)} fine-tuned candidates')
      if method == 'ttmpd':
        accuracy, accuracy_cur = proxy.predict(v1, v2), float(proxy.predict(v1_cur, v2_cur))
      elif method == 'eagleeye':
        accuracy, accuracy_cur = v1, v1_cur
      else:
        accuracy, accuracy_cur = real, v1_cur
      predicted = np.array([c.predicted_ms for c in cands])
      criterion = selection_score(accuracy_cur, accuracy, current_ms, predicted)
      best = int(np.nanargmin(criterion))
      chosen = cands[best]
    source = current
    if best in finetuned:
      source = finetuned[best]
    elif runner is not None:
      with counter, _timer(times, 'short_term_ft'):
        source = runner.run(current, masks[best], config.short_term_steps)
    with counter, _timer(times, 'search'):
      current = remove_channels_host(source, groups, masks[best])
      groups = shrink_groups(groups, masks[best])
      current_spec = spec.with_widths_of(current)
      model = build_model(current_spec)
    for i, c in enumerate(cands):
      candidates_log.append({'iteration': k, 'group': c.group, 'removed': c.removed,
                             'predicted_ms': c.predicted_ms, 'v1': float(v1[i]),
                             'v2': float(v2[i]), 'accuracy_hat': float(accuracy[i]),
                             'real': None if np.isnan(real[i]) else float(real[i]),
                             'chosen': i == best})
    compilations.append(counter.count)
    snapshots.append((k, current_spec, current))
    new_ms = predict_ms(widths_from_variables(current))
    elapsed = time.time() - start
    trajectory.append({'iteration': k, 'predicted_ms': new_ms,
                       'latency_ratio_predicted': new_ms / l0, 'group': chosen.group,
                       'removed': chosen.removed, 'kept': chosen.size - chosen.removed,
                       'score': float(accuracy[best]), 'v1': float(v1[best]),
                       'elapsed_s': elapsed, 'compilations': counter.count})
    # ETA: the remaining latency to remove at the average rate so far.
    eta = elapsed * max(new_ms - target_ms, 0.0) / max(l0 - new_ms, 1e-9)
    # Save before reporting: once the line is printed, the iteration is on disk.
    if store is not None:
      store.save(k, current, {
          'widths': widths_from_variables(current), 'trajectory': trajectory,
          'candidates': candidates_log, 'compilations': compilations, 'times': times,
          'proxy': proxy.to_json(), 'calibration': [list(p) for p in calibration]})
    log(f'[{method}] iter {k}: {current_ms:.2f} -> {new_ms:.2f} ms predicted (target '
        f'{target_ms:.2f}); pruned {chosen.removed}/{chosen.size} of {chosen.group}; '
        f'A={accuracy[best]:.4f} v1={v1[best]:.4f}; {counter.count} compilations; elapsed '
        f'{elapsed:.0f}s ETA {eta:.0f}s')
  final_ms = predict_ms(widths_from_variables(current))
  reached = reached or final_ms <= target_ms * (1 + 1e-9)
  if reached:
    message = 'latency target reached'
  elif not message:
    message = (f'stopped after --max_iterations={config.max_iterations} iterations at '
               f'{final_ms:.2f} ms predicted = {final_ms / l0:.3f} of the teacher')
  proxy_report = None
  if method == 'ttmpd':
    points = np.asarray(calibration) if calibration else np.zeros((0, 3))
    rho = spearman(proxy.predict(points[:, 0], points[:, 1]), points[:, 2]) if len(points) else \
        float('nan')
    proxy_report = {**proxy.to_json(), 'spearman': rho,
                    'points': [list(map(float, p)) for p in points]}
  return SearchOutcome(current_spec, current, trajectory, times, compilations, candidates_log,
                       proxy_report, reached, message, resumed_from, snapshots)
