"""The iterative, latency-constrained pruning loop shared by TT-MPD, NetAdapt and EagleEye.

``search_step(run, state, variables)`` is one NetAdapt-style iteration (``docs/method.md``):

1. *propose*: one candidate per channel group, sized by the latency model to save this
   iteration's share, evaluated **with masks** → ``v1``, ``v2`` per candidate;
2. *fine-tune* the candidates the judge asks for;
3. *choose* the candidate losing the least estimated accuracy per millisecond saved;
4. *commit*: short-term fine-tune the chosen one (masked), then remove its channels for real.

Design choice: candidate work happens in a teacher-shaped :class:`Workspace` — the current
network embedded into the teacher's shapes (``surgery.embed_channels``) with every channel removed
so far masked off — so the evaluator and the KD steps compile **once per search**, not once per
iteration (the masking law makes this exact). On CPU a compilation of a small ResNet costs seconds,
more than ten short-term KD steps; compiling per architecture made every method's iteration cost
mostly compilation and hid the difference between fine-tuning one candidate and fine-tuning all.
The price: masked work runs at the teacher's width, at most ``1 / latency_target`` times the cost.

What differs between methods is the :class:`~ttmpd_jax.search.judges.Judge`. The state is a
:class:`~ttmpd_jax.search.state.SearchState`; the caller owns the loop (``methods.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from ttmpd_jax import interrupt
from ttmpd_jax.latency.compilations import CompilationCounter
from ttmpd_jax.models.common import widths_from_variables
from ttmpd_jax.pruning.graph import discover_groups
from ttmpd_jax.pruning.masks import masks_remove_lowest
from ttmpd_jax.pruning.surgery import remove_channels
from ttmpd_jax.search import state as state_lib
from ttmpd_jax.search.candidates import Candidate, make_candidates, selection_score
from ttmpd_jax.search.config import SearchConfig
from ttmpd_jax.pruning.surgery import embed_channels
from ttmpd_jax.search.evaluation import (CandidateEvaluator, CandidateKDRunner, KDRunner,
                                         make_candidate_evaluator)
from ttmpd_jax.search.judges import Judge
from ttmpd_jax.search.problem import Problem
from ttmpd_jax.search.proxy import STATISTICS
from ttmpd_jax.search.scoring import make_scorer
from ttmpd_jax.search.state import SearchState


@dataclasses.dataclass
class Run:
  """The fixed context of one search: problem, budgets, judge, logging, and where each step's
  state is saved (``store``; None: not saved)."""

  problem: Problem
  config: SearchConfig
  judge: Judge
  log: Callable[[str], None] = print
  store: Any = None

  @property
  def online_teacher(self) -> Optional[tuple[Any, Any]]:
    return self.problem.teacher if self.config.kd == 'online' else None

  @functools.cached_property
  def workspace(self) -> 'Workspace':
    return Workspace.create(self)


@dataclasses.dataclass
class Workspace:
  """Teacher-shaped candidate work of one search: its groups, evaluator and KD runners (each
  compiled on first use, then reused by every iteration)."""

  groups: tuple
  teacher: Any                              # Host variables: the shapes (and fillers) to embed.
  evaluate: CandidateEvaluator
  runner: Optional[KDRunner]                # The chosen candidate's short-term KD.
  batched: Optional[CandidateKDRunner]      # The judge's candidates, mesh.size at a time.

  @classmethod
  def create(cls, run: 'Run') -> 'Workspace':
    problem, config = run.problem, run.config
    teacher = jax.device_get(problem.teacher_variables)
    groups = tuple(discover_groups(problem.model, teacher, example_input(problem)))
    evaluate = make_candidate_evaluator(problem.model, groups, problem.data)
    runner = batched = None
    if config.short_term_steps > 0:
      kd = dict(learning_rate=config.short_term_lr, steps=config.short_term_steps,
                batch_size=config.batch_size, temperature=config.temperature,
                hard_weight=config.hard_weight, seed=config.seed,
                online_teacher=run.online_teacher)
      runner = KDRunner(problem.model, groups, problem.data, **kd)
      batched = CandidateKDRunner(problem.model, groups, problem.data, mesh=evaluate.mesh, **kd)
    return cls(groups, teacher, evaluate, runner, batched)

  def removed_so_far(self, kept: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Masks over the teacher's channels keeping the channels ``kept`` (SearchState.kept)."""
    return {g.name: np.isin(np.arange(g.size), kept[g.name]) if g.name in kept
            else np.ones(g.size, bool) for g in self.groups if g.prunable}

  def lift(self, kept: dict[str, list[int]], masks: dict[str, Any]) -> dict[str, np.ndarray]:
    """Masks over the current network's channels → masks over the teacher's."""
    out = self.removed_so_far(kept)
    for name, mask in masks.items():
      ids = np.flatnonzero(out[name])
      out[name] = np.zeros_like(out[name])
      out[name][ids[np.asarray(mask, bool)]] = True
    return out

  def embed(self, variables: Any, kept: dict[str, list[int]]) -> Any:
    """The current (physically pruned) network at the teacher's shapes."""
    return embed_channels(variables, self.teacher, self.groups, self.removed_so_far(kept))

  def reseed(self, seed: int) -> None:
    """This iteration's batch order (a host-side choice: nothing recompiles)."""
    for runner in (self.runner, self.batched):
      if runner is not None:
        runner.seed = seed


@dataclasses.dataclass
class Proposal:
  """One iteration's candidates, their masks over the current network and their variables."""

  candidates: list[Candidate]
  masks: list[dict[str, np.ndarray]]
  v1: np.ndarray
  v2: np.ndarray
  v1_current: float
  v2_current: float
  groups: tuple
  evaluate: Callable
  embedded: Any = None               # The current network at the teacher's shapes.
  lifted: Optional[list[dict[str, np.ndarray]]] = None   # ``masks`` over the teacher's channels.
  real_repeats: Optional[np.ndarray] = None   # ``ground_truth_extras`` of this iteration.
  real_at_steps: Optional[dict[int, np.ndarray]] = None
  statistics: Optional[np.ndarray] = None     # [candidates, len(proxy.STATISTICS)]


@contextlib.contextmanager
def _timed(times: dict[str, float], key: str):
  start = time.time()
  try:
    yield
  finally:
    times[key] = times.get(key, 0.0) + time.time() - start


def example_input(problem: Problem) -> np.ndarray:
  return np.zeros((1, *problem.image_shape), np.float32)


def requested_saving(config: SearchConfig, state: SearchState, k: int, current_ms: float) -> float:
  """ΔL_k = r0 · L0 · decay^(k−1), never past the target."""
  return min(config.r0 * state.l0_ms * config.decay ** (k - 1), current_ms - state.target_ms)


def propose(run: Run, variables: Any, k: int, delta_ms: float,
            kept: Optional[dict[str, list[int]]] = None) -> Optional[Proposal]:
  """Candidates of iteration ``k`` and their two variables, or ``None`` when none can progress.

  ``kept``: the teacher channels the current network keeps (``SearchState.kept``; default all).
  """
  problem, config = run.problem, run.config
  model = problem.model
  groups = tuple(discover_groups(model, variables, example_input(problem)))
  widths = widths_from_variables(variables)
  cands = make_candidates(groups, widths, problem.latency.predict, delta_ms, config.round_to)
  if not cands:
    return None
  scores = make_scorer(config.importance, model, groups, problem.data,
                       seed=config.seed + k)(variables)
  masks = [masks_remove_lowest(scores, groups, {c.group: c.removed}) for c in cands]
  kept = kept or {}
  ws = run.workspace
  embedded = ws.embed(jax.device_get(variables), kept)
  lifted = [ws.lift(kept, m) for m in masks]
  # The current network first (only the channels removed so far masked off).
  v = ws.evaluate.many(embedded, [ws.removed_so_far(kept)] + lifted)
  return Proposal(cands, masks, v[1:, 0], v[1:, 1], float(v[0, 0]), float(v[0, 1]), groups,
                  ws.evaluate, embedded, lifted, statistics=v[1:])


def kd_runner(run: Run, k: int) -> Optional[KDRunner]:
  """The search's one masked KD step (compiled once), batches ordered for iteration ``k``."""
  run.workspace.reseed(run.config.seed + k)
  return run.workspace.runner


def finetune_candidates(run: Run, runner: Optional[KDRunner], variables: Any, p: Proposal,
                        which: list[int]) -> tuple[dict[int, Any], np.ndarray]:
  """Short-term KD of candidates ``which``; their real (held-out, pseudo-label) accuracies.

  The runs are ``runner``'s (same optimizer, loss and batches), spread over every device of the
  evaluator's mesh ``mesh.size`` candidates at a time (``CandidateKDRunner``). Fine-tuned
  candidates are teacher-shaped (``p.embedded`` under ``p.lifted`` masks).
  """
  del variables
  if runner is None or not which:
    return {}, np.full(len(p.candidates), np.nan)
  return tuned_accuracies(run.workspace.batched, p, which, run.config.short_term_steps)


def tuned_accuracies(batched: CandidateKDRunner, p: Proposal, which: list[int],
                     steps: int) -> tuple[dict[int, Any], np.ndarray]:
  """Candidates ``which`` after ``steps`` masked KD steps of ``batched`` and their real
  accuracies (NaN for the other candidates)."""
  finetuned: dict[int, Any] = {}
  real = np.full(len(p.candidates), np.nan)
  for i, variables_i in zip(which, batched.run_many(p.embedded, [p.lifted[i] for i in which],
                                                    steps)):
    finetuned[i] = variables_i
    real[i] = p.evaluate(variables_i, p.lifted[i])[0]
  return finetuned, real


def ground_truth_extras(run: Run, p: Proposal, which: list[int]) -> None:
  """Benchmarking only (``SearchConfig.ground_truth_repeats`` / ``ground_truth_steps``): the
  fine-tuned candidates ``which`` are fine-tuned again, and their accuracies set on ``p``:

  * ``p.real_repeats`` ``[candidates, repeats - 1]``: the same fine-tuning with other batch
    orders. How far two fine-tunings of one candidate disagree bounds how well any proxy can
    rank candidates by real accuracy;
  * ``p.real_at_steps`` ``{k: [candidates]}``: the first ``k`` steps of the same fine-tuning
    (same batches; the short-term schedule is constant), how well a cheaper fine-tuning ranks.

  NaN where a candidate was not fine-tuned. Changes no decision; the caller times it apart from
  the method (``times['ground_truth']``, not in prune+fine-tune time).
  """
  batched, config = run.workspace.batched, run.config
  if batched is None or not which:
    return

  p.real_at_steps = {k: tuned_accuracies(batched, p, which, k)[1]
                     for k in config.ground_truth_steps}
  seed, repeats = batched.seed, []
  try:
    for r in range(1, config.ground_truth_repeats):
      batched.seed = seed + 100_003 * r
      repeats.append(tuned_accuracies(batched, p, which, config.short_term_steps)[1])
  finally:
    batched.seed = seed
  p.real_repeats = np.stack(repeats, 1) if repeats else None


def _criterion(judge: Judge, p: Proposal, real: np.ndarray, current_ms: float,
               predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(criterion, estimated accuracy, estimated accuracy loss) of every candidate."""
  accuracy, accuracy_cur = judge.estimate(p.v1, p.v2, real, p.v1_current, p.v2_current)
  return (selection_score(accuracy_cur, accuracy, current_ms, predicted), accuracy,
          accuracy_cur - np.asarray(accuracy, float))


def _allowed(predicted: np.ndarray, eligible: np.ndarray, floor_ms: float,
             drop: Optional[np.ndarray] = None, max_drop: float = float('inf')) -> np.ndarray:
  """``eligible`` candidates not predicted below ``floor_ms`` and not estimated to lose more
  than ``max_drop``; each rule applies only while some candidate satisfies it."""
  allowed = eligible & (predicted >= floor_ms)
  allowed = allowed if allowed.any() else eligible
  if drop is not None and np.isfinite(max_drop):
    within = allowed & (drop <= max_drop)
    allowed = within if within.any() else allowed
  return allowed


def choose(judge: Judge, p: Proposal, real: np.ndarray, current_ms: float,
           floor_ms: float = 0.0, excluded: Sequence[int] = ()) -> tuple[int, np.ndarray]:
  """The candidate minimising (Â_current − Â_g) / (L_current − L_g); all estimates.

  Only the judge's ``eligible`` candidates compete (less ``excluded``: picks the check turned
  down). Candidates predicted below ``floor_ms`` (the lower edge of the target band) are passed
  over while another candidate is not: per millisecond saved, a coarse step (8 of a 16-channel
  stem) can look best and overshoot the band, which no later iteration can undo. Likewise
  candidates estimated to lose more than ``judge.max_drop``: per millisecond, a deep cut with a
  large saving can look cheapest, and fine-tuning repairs moderate damage, not severe damage.
  """
  predicted = np.array([c.predicted_ms for c in p.candidates])
  criterion, accuracy, drop = _criterion(judge, p, real, current_ms, predicted)
  eligible = judge.eligible(real)
  eligible[list(excluded)] = False
  allowed = _allowed(predicted, eligible, floor_ms, drop, judge.max_drop)
  return int(np.nanargmin(np.where(allowed, criterion, np.nan))), accuracy


def verify(run: Run, p: Proposal, best: int, finetuned: dict[int, Any], real: np.ndarray,
           current_ms: float, floor_ms: float) -> tuple[int, np.ndarray]:
  """Checks the pick by its real accuracy after short-term fine-tuning (paid anyway: it is the
  commit's fine-tuning); while its real loss exceeds ``judge.max_drop``, the next candidate by
  the criterion is fine-tuned and checked, at most ``judge.verify_limit`` times. Returns the
  pick and the estimates; when every checked pick lost too much, the one losing the least per
  millisecond is kept. ``finetuned`` and ``real`` gain the checked candidates.
  """
  judge, checked = run.judge, []
  while True:
    if best not in finetuned:
      tuned, r = tuned_accuracies(run.workspace.batched, p, [best], run.config.short_term_steps)
      finetuned.update(tuned)
      real[best] = r[best]
    checked.append(best)
    loss = p.v1_current - real[best]
    if loss <= judge.max_drop:
      break
    if len(checked) > judge.verify_limit or len(checked) >= int(judge.eligible(real).sum()):
      saving = {i: max(current_ms - p.candidates[i].predicted_ms, 1e-9) for i in checked}
      best = min(checked, key=lambda i: (p.v1_current - real[i]) / saving[i])
      run.log(f'  check: every checked pick lost more than {judge.max_drop:g}; keeping '
              f'{p.candidates[best].group}, the least loss per ms saved')
      break
    run.log(f'  check: {p.candidates[best].group} lost {loss:.3f} of held-out agreement after '
            f'fine-tuning (more than {judge.max_drop:g}); trying the next candidate')
    best, _ = choose(judge, p, real, current_ms, floor_ms, excluded=checked)
  return best, judge.estimate(p.v1, p.v2, real, p.v1_current, p.v2_current)[0]


def ranking(judge: Judge, p: Proposal, current_ms: float, floor_ms: float = 0.0) -> np.ndarray:
  """Candidate indices, best first by the judge's estimate before any fine-tuning (those
  ``choose`` would pass over for overshooting come last)."""
  predicted = np.array([c.predicted_ms for c in p.candidates])
  criterion, _, drop = _criterion(judge, p, np.full(len(predicted), np.nan), current_ms,
                                  predicted)
  allowed = _allowed(predicted, np.ones(len(predicted), bool), floor_ms, drop, judge.max_drop)
  return np.lexsort((criterion, ~allowed))


def commit(run: Run, runner: Optional[KDRunner], variables: Any, p: Proposal, best: int,
           finetuned: dict[int, Any]) -> Any:
  """Fine-tunes the chosen candidate (masked; equal to pruned by the masking law), removes it."""
  source = finetuned.get(best)
  if source is None and runner is None:
    return remove_channels(jax.device_get(variables), p.groups, p.masks[best])
  if source is None:
    source = runner.run(p.embedded, p.lifted[best], run.config.short_term_steps)
  # Host numpy arrays: no eager device gathers, so no compilations.
  return remove_channels(jax.device_get(source), run.workspace.groups, p.lifted[best])


def search_step(run: Run, state: SearchState, variables: Any) -> tuple[SearchState, Any]:
  """One iteration; returns the new state and (physically pruned) variables."""
  interrupt.check()   # Between iterations: the last one is saved (``record``).
  problem, k = run.problem, state.iteration + 1
  current_ms = problem.latency.predict(widths_from_variables(variables))
  if current_ms <= state.target_ms * (1 + 1e-9):
    state.status = state_lib.REACHED
    return state, variables
  counter, times = CompilationCounter(), state.times
  start = time.time()
  with counter:
    with _timed(times, 'search'):
      delta = requested_saving(run.config, state, k, current_ms)
      p = propose(run, variables, k, delta, state.kept)
    if p is None:
      state.status = state_lib.STUCK
      state.message = (f'latency target unreachable: no channel group can save a tenth of the '
                       f'requested {delta:.2f} ms any more; stopping at {current_ms:.2f} ms '
                       f'predicted = {current_ms / state.l0_ms:.3f} of the teacher')
      return state, variables
    runner = kd_runner(run, k)
    progress = (state.l0_ms - current_ms) / max(state.l0_ms - state.target_ms, 1e-9)
    with _timed(times, 'short_term_ft'):
      floor = state.target_ms * (1 - run.config.latency_tolerance)
      which = run.judge.to_finetune(k, progress, p.v1, p.v2,
                                    lambda: ranking(run.judge, p, current_ms, floor))
      finetuned, real = finetune_candidates(run, runner, variables, p, which)
    if run.config.ground_truth_repeats > 1 or run.config.ground_truth_steps:
      with _timed(times, 'ground_truth'):
        ground_truth_extras(run, p, which)
    with _timed(times, 'search'):
      note = run.judge.learn(k, p.v1, p.v2, real)
      best, accuracy = choose(run.judge, p, real, current_ms, floor)
    if run.judge.verify_limit > 0 and runner is not None:
      with _timed(times, 'short_term_ft'):
        best, accuracy = verify(run, p, best, finetuned, real, current_ms, floor)
    with _timed(times, 'short_term_ft' if best not in finetuned else 'search'):
      variables = commit(run, runner, variables, p, best, finetuned)
  if note:
    run.log(f'[{state.method}] {note}')
  state.keep(p.masks[best])
  record(run, state, k, p, real, accuracy, best, current_ms, variables, counter.count,
         time.time() - start)
  return state, variables


def record(run: Run, state: SearchState, k: int, p: Proposal, real: np.ndarray,
           accuracy: np.ndarray, best: int, current_ms: float, variables: Any,
           compilations: int, seconds: float) -> None:
  """Appends iteration ``k`` to the state's logs and prints its progress line."""
  chosen = p.candidates[best]
  for i, c in enumerate(p.candidates):
    state.candidates.append({
        'iteration': k, 'group': c.group, 'removed': c.removed, 'predicted_ms': c.predicted_ms,
        'v1': float(p.v1[i]), 'v2': float(p.v2[i]), 'accuracy_hat': float(accuracy[i]),
        'real': None if np.isnan(real[i]) else float(real[i]), 'chosen': i == best})
    if p.statistics is not None:   # Diagnostics beside v1, v2 (``proxy.STATISTICS``).
      state.candidates[-1]['statistics'] = {name: float(x) for name, x in
                                            zip(STATISTICS[2:], p.statistics[i, 2:])}
    if p.real_repeats is not None and not np.isnan(real[i]):
      state.candidates[-1]['real_repeats'] = [float(x) for x in p.real_repeats[i]]
    if p.real_at_steps and not np.isnan(real[i]):
      state.candidates[-1]['real_at_steps'] = {str(k): float(a[i])
                                               for k, a in p.real_at_steps.items()}
  widths = widths_from_variables(variables)
  new_ms = run.problem.latency.predict(widths)
  elapsed = (state.trajectory[-1]['elapsed_s'] if state.trajectory else 0.0) + seconds
  state.iteration, state.judge = k, run.judge.to_json()
  state.compilations.append(compilations)
  state.trajectory.append({
      'iteration': k, 'predicted_ms': new_ms, 'latency_ratio_predicted': new_ms / state.l0_ms,
      'group': chosen.group, 'removed': chosen.removed, 'kept': chosen.size - chosen.removed,
      'score': float(accuracy[best]), 'v1': float(p.v1[best]), 'elapsed_s': elapsed,
      'compilations': compilations, 'widths': widths})
  eta = elapsed * max(new_ms - state.target_ms, 0.0) / max(state.l0_ms - new_ms, 1e-9)
  if run.store is not None:   # Saved before reported: once the line is printed, it is on disk.
    run.store.save(state, variables)
  run.log(f'[{state.method}] iter {k}: {current_ms:.2f} -> {new_ms:.2f} ms predicted (target '
          f'{state.target_ms:.2f}); pruned {chosen.removed}/{chosen.size} of {chosen.group}; '
          f'A={accuracy[best]:.4f} v1={p.v1[best]:.4f}; {compilations} compilations; elapsed '
          f'{elapsed:.0f}s ETA {eta:.0f}s')
