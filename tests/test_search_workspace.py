"""The search's teacher-shaped workspace: candidates of a pruned network, evaluated and fine-tuned
at the teacher's shapes, equal those of the physically pruned network — and nothing recompiles
from one iteration to the next."""

from __future__ import annotations

import jax
import numpy as np

from ttmpd_jax import pruning
from ttmpd_jax.latency.compilations import CompilationCounter
from ttmpd_jax.search import judges
from ttmpd_jax.search.config import SearchConfig
from ttmpd_jax.search.evaluation import KDRunner, SearchData, make_candidate_evaluator
from ttmpd_jax.search.loop import Run
from ttmpd_jax.search.problem import Problem, Resizable
from ttmpd_jax.search.state import SearchState
from tests.candidate_setup import Net


def _setup():
  rng = np.random.default_rng(0)
  img = lambda *s: rng.standard_normal(s).astype(np.float32)
  model = Resizable(Net())
  variables = jax.device_get(model.model.init(jax.random.key(0), img(1, 8, 8, 1)))
  data = SearchData(img(32, 8, 8, 1), img(32, 4), img(24, 8, 8, 1), img(24, 4),
                    img(2, 16, 8, 8, 1))
  problem = Problem(model, variables, variables, (8, 8, 1), None, None, data, None, 64, 0.0)
  config = SearchConfig(short_term_steps=3, batch_size=8, bn_batches=2, bn_batch_size=16)
  return model, variables, data, Run(problem, config, judges.Judge(), log=lambda s: None)


def _remove_some(groups, index, seed):
  """Masks switching off a few channels of the ``index``-th prunable group."""
  prunable = [g for g in groups if g.prunable]
  g = prunable[index]
  mask = np.ones(g.size, bool)
  mask[np.random.default_rng(seed).choice(g.size, g.size // 4, replace=False)] = False
  return {g.name: mask}


def test_workspace_candidates_equal_physically_pruned_ones():
  model, teacher, data, run = _setup()
  x = np.zeros((1, 8, 8, 1), np.float32)
  groups = pruning.discover_groups(model, teacher, x)
  state = SearchState('t', 1.0, 0.5)
  # An earlier iteration removed channels of group 0; the candidate removes some of group 1.
  first = _remove_some(groups, 0, 0)
  pruned = pruning.remove_channels(teacher, groups, first)
  state.keep(first)
  small_groups = pruning.discover_groups(model, pruned, x)
  candidate = _remove_some(small_groups, 1, 1)

  ws = run.workspace
  embedded = ws.embed(pruned, state.kept)
  lifted = ws.lift(state.kept, candidate)
  at_teacher = ws.evaluate.many(embedded, [ws.removed_so_far(state.kept), lifted])
  physical = make_candidate_evaluator(model, small_groups, data).many(pruned, [{}, candidate])
  np.testing.assert_allclose(at_teacher, physical, atol=1e-5)

  # Short-term KD of the candidate, then removal: the same network either way.
  ws.reseed(7)
  tuned = pruning.remove_channels(ws.runner.run(embedded, lifted, 3), ws.groups, lifted)
  small = KDRunner(model, small_groups, data, learning_rate=0.01, steps=3, batch_size=8,
                   temperature=1.0, hard_weight=0.0, seed=7)
  direct = pruning.remove_channels(small.run(pruned, candidate, 3), small_groups, candidate)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), tuned, direct)


def test_workspace_compiles_once_for_every_architecture():
  model, teacher, _, run = _setup()
  x = np.zeros((1, 8, 8, 1), np.float32)
  groups = pruning.discover_groups(model, teacher, x)
  ws = run.workspace
  state, variables = SearchState('t', 1.0, 0.5), teacher
  counts = []
  for index in range(3):   # Three successively smaller networks, each with one candidate.
    current = pruning.discover_groups(model, variables, x)
    candidate = _remove_some(current, index % 2, index)
    with CompilationCounter() as counter:
      embedded = ws.embed(variables, state.kept)
      lifted = ws.lift(state.kept, candidate)
      ws.evaluate.many(embedded, [lifted])
      ws.runner.run(embedded, lifted, 2)
    counts.append(counter.count)
    variables = pruning.remove_channels(variables, current, candidate)
    state.keep(candidate)
  assert counts[0] >= 1 and counts[1:] == [0, 0], counts
  sizes = lambda v: [g.size for g in pruning.discover_groups(model, v, x) if g.prunable]
  assert sizes(variables) != sizes(teacher) == [g.size for g in groups if g.prunable]


class _ChannelLatency:
  """Predicted ms = kept channels: monotone in every group."""

  def __init__(self, full):
    self.full = dict(full)

  def predict(self, widths=None):
    return float(sum({**self.full, **dict(widths or {})}.values()))


def test_a_biased_latency_model_is_corrected_by_measurement(monkeypatch):
  from ttmpd_jax.models.common import widths_from_variables
  from ttmpd_jax.search import methods
  from ttmpd_jax.search.measure import Measurement
  model, teacher, data, run = _setup()
  latency = _ChannelLatency(widths_from_variables(teacher))
  problem = Problem(model, teacher, teacher, (8, 8, 1), None, None, data, latency, 64, 0.0)
  l0 = latency.predict()
  # The device runs every pruned network 15% slower than predicted (relative to the teacher).
  fake = lambda problem, variables, log, band=None: (lambda r: Measurement(100.0, 100 * r, 0.01, 0.0, True,
                                                                r))(
      min(1.0, 1.15 * latency.predict(widths_from_variables(variables)) / l0))
  monkeypatch.setattr(methods, 'measure_network', fake)
  config = SearchConfig(latency_target=0.6, latency_tolerance=0.03, r0=0.05, round_to=1,
                        short_term_steps=1, batch_size=8, bn_batches=2, bn_batch_size=16,
                        measure_rounds=4)
  pruned = methods.METHODS.get('eagleeye').prune(problem, config, name='eagleeye',
                                                 log=lambda s: None)
  final = fake(problem, pruned.variables, None).ratio
  assert pruned.reached_target and abs(final - 0.6) <= 0.6 * 0.03, (final, pruned.measurements)
  assert len(pruned.measurements) >= 2   # The first measurement missed: it had to correct.
