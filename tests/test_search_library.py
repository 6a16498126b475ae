"""The search as a library: strategies on constructed candidates, the accuracy model's
calibration, the registry, the search state, and resume = load the state."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttmpd_jax.search import judges, methods as methods_lib, proxy as proxy_lib, registry
from ttmpd_jax.search.config import ConfigError, SearchConfig
from ttmpd_jax.search.loop import Proposal, choose, ranking
from ttmpd_jax.search.proxy import AccuracyModel, spearman
from ttmpd_jax.search.state import SearchState


def _proposal(v1, v2, predicted_ms):
  cands = [dataclasses.make_dataclass('C', ['predicted_ms', 'group'])(ms, f'g{i}')
           for i, ms in enumerate(predicted_ms)]
  return Proposal(cands, [{} for _ in cands], np.asarray(v1, float), np.asarray(v2, float),
                  1.0, 0.0, (), None)


def test_each_strategy_chooses_by_its_own_estimate():
  # Equal savings; candidate 0 has the best v1, 1 the best KL, 2 the best real accuracy.
  p = _proposal([0.9, 0.8, 0.7], [0.5, 0.1, 0.4], [8.0, 8.0, 8.0])
  real = np.array([0.80, 0.82, 0.90])
  assert choose(judges.Judge(), p, np.full(3, np.nan), 10.0)[0] == 0          # EagleEye: v1.
  assert choose(judges.NetAdaptJudge(), p, real, 10.0)[0] == 2                 # Real accuracy.
  kl_only = judges.TTMPDJudge(model=AccuracyModel(np.array([0.0, 0.0, -1.0]), True))
  assert choose(kl_only, p, np.full(3, np.nan), 10.0)[0] == 1                  # Fitted Â.
  # Accuracy lost per ms saved: a bigger saving can beat a smaller loss.
  p = _proposal([0.9, 0.8], [0.0, 0.0], [9.0, 5.0])
  assert choose(judges.Judge(), p, np.full(2, np.nan), 10.0)[0] == 1


def test_choose_passes_over_candidates_that_overshoot_the_target_band():
  # Candidate 1 loses less per ms saved but lands below the band's lower edge (6 ms).
  p = _proposal([0.9, 0.8], [0.0, 0.0], [9.0, 5.0])
  assert choose(judges.Judge(), p, np.full(2, np.nan), 10.0, floor_ms=6.0)[0] == 0
  # When every candidate overshoots, the best one per ms is still taken.
  assert choose(judges.Judge(), p, np.full(2, np.nan), 10.0, floor_ms=9.5)[0] == 1


def _unused_ranking():
  raise AssertionError('a judge without a shortlist never asks for the ranking')


def test_ttmpd_calibrates_at_spread_progress_levels():
  judge = judges.TTMPDJudge(calibration_iterations=3)
  v = np.array([0.5, 0.6, 0.7, 0.8])
  assert judge.to_finetune(1, 0.0, v, v, _unused_ranking) == [0, 1, 2, 3]
  judge.learn(1, v, 1 - v, v + 0.01)
  assert judge.to_finetune(2, 0.1, v, v, _unused_ranking) == []   # Below the next level (1/3).
  assert judge.to_finetune(5, 0.4, v, v, _unused_ranking) == [0, 1, 2, 3]
  judge.learn(5, v, 1 - v, v)
  assert judge.out_of_sample and judge.out_of_sample[0]['ttmpd'] == pytest.approx(1.0)
  judge.learn(9, v, 1 - v, v)
  assert judge.to_finetune(12, 0.99, v, v, _unused_ranking) == []   # Three levels done.
  restored = judges.TTMPDJudge(3)
  restored.load_json(json.loads(json.dumps(judge.to_json())))
  np.testing.assert_allclose(restored.model.coef, judge.model.coef)
  assert restored.levels_done == 3


def test_shortlist_fine_tunes_the_best_by_the_estimate_and_chooses_by_real_accuracy():
  # Equal savings: Â (v1 before any fit) ranks 0 > 1 > 2 > 3; after fine-tuning, 1 is best.
  p = _proposal([0.9, 0.8, 0.7, 0.6], [0.1, 0.1, 0.1, 0.1], [8.0, 8.0, 8.0, 8.0])
  judge = judges.TTMPDJudge(calibration_iterations=0, shortlist=2)
  order = ranking(judge, p, 10.0)
  assert list(order) == [0, 1, 2, 3]
  which = judge.to_finetune(3, 0.5, p.v1, p.v2, lambda: order)
  assert which == [0, 1]
  real = np.array([0.85, 0.88, np.nan, np.nan])
  best, accuracy = choose(judge, p, real, 10.0)   # Only the shortlist competes, by real accuracy.
  assert best == 1 and accuracy[1] == pytest.approx(0.88) and accuracy[2] == pytest.approx(0.7)
  # Shortlist points refit Â every iteration without using up a calibration level.
  judge.learn(3, p.v1, p.v2, real)
  assert judge.levels_done == 0 and len(judge.points) == 2 and judge.model.fitted
  assert judge.out_of_sample == []   # Out-of-sample checks are calibration iterations' only.
  # The shortlist is ranked by Â on both sides of the criterion (Â_current, not the current
  # agreement): with Â = 0.5·v1, candidate 0 loses 0.05 per ms, candidate 1 0.0625.
  fitted = judges.TTMPDJudge(calibration_iterations=0, shortlist=1,
                             model=AccuracyModel(np.array([0.0, 0.5, 0.0]), True))
  q = _proposal([0.9, 0.5], [0.0, 0.0], [9.0, 6.0])
  assert fitted.to_finetune(2, 0.5, q.v1, q.v2, lambda: ranking(fitted, q, 10.0)) == [0]
  # The ranking passes over candidates that overshoot the band, as choose does.
  p = _proposal([0.9, 0.8, 0.7], [0.1, 0.1, 0.1], [5.0, 8.0, 8.0])
  assert list(ranking(judges.TTMPDJudge(shortlist=2), p, 10.0, floor_ms=6.0)) == [1, 2, 0]
  # Without a shortlist, TT-MPD chooses by Â among all candidates (the paper's method).
  plain = judges.TTMPDJudge(calibration_iterations=0)
  assert plain.to_finetune(3, 0.5, p.v1, p.v2, _unused_ranking) == []
  assert plain.eligible(np.full(3, np.nan)).all()


def test_calibration_fits_within_iteration_ranking():
  # Iterations differ by an offset (damage level) that says nothing about ranking inside one.
  rng = np.random.default_rng(0)
  v1, v2, acc, it = [], [], [], []
  for k, offset in enumerate([0.0, -0.2, -0.4]):
    a, b = rng.uniform(0.5, 0.9, 6), rng.uniform(0.1, 1.0, 6)
    v1 += list(a + offset)
    v2 += list(b)
    acc += list(0.5 * a - 0.2 * b + 3 * offset + 0.005 * rng.standard_normal(6))
    it += [k] * 6
  model = AccuracyModel.fit(v1, v2, acc, groups=it)
  assert model.coef[1] > 0 and model.coef[2] < 0 and model.form in ('nnls', 'equal')
  rho = judges.within_iteration_spearman(
      [{'iteration': i, 'v1': a, 'v2': b, 'real': c} for i, a, b, c in zip(it, v1, v2, acc)],
      model)
  assert rho['n_iterations'] == 3 and rho['ttmpd'] >= max(rho['v1'], rho['v2'])
  assert rho['ttmpd'] > 0.9


def test_calibration_keeps_one_variable_when_the_other_is_noise():
  rng = np.random.default_rng(1)
  v1, v2 = rng.uniform(0.5, 0.9, 18), rng.uniform(0.1, 1.0, 18)
  model = AccuracyModel.fit(v1, v2, v1 + 0.001 * rng.standard_normal(18),
                            groups=np.repeat([0, 1, 2], 6))
  assert model.form in ('v1', 'nnls')
  assert spearman(model.predict(v1, v2), v1) > 0.95


def test_registry_lists_valid_names_and_refuses_duplicates():
  assert set(methods_lib.METHODS.names()) == {'ttmpd', 'ttmpd_unchecked', 'ttmpd_shortlist', 'netadapt', 'eagleeye',
                                             'halp', 'uniform', 'teacher', 'teacher_bn'}
  with pytest.raises(ConfigError, match='method: unknown method .magic.; valid: ttmpd'):
    methods_lib.METHODS.get('magic')
  reg = registry.Registry('thing', 'thing')
  reg.register('a')(1)
  with pytest.raises(ValueError):
    reg.register('a')(2)


def test_adding_a_method_is_one_registration():
  class Greedy(judges.Judge):
    def estimate(self, v1, v2, real, v1_cur, v2_cur):
      return -np.asarray(v2), 0.0
  methods_lib.METHODS.register('test_greedy_kl')(methods_lib.IterativeMethod(lambda c: Greedy()))
  try:
    assert isinstance(methods_lib.METHODS.get('test_greedy_kl'), methods_lib.IterativeMethod)
  finally:
    methods_lib.METHODS._items.pop('test_greedy_kl')


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError) as e:
    SearchConfig(latency_target=1.5)
  assert e.value.field == 'latency_target'
  with pytest.raises(ConfigError, match='importance: unknown importance criterion'):
    SearchConfig(importance='magic')
  config = SearchConfig(round_to=8)
  assert SearchConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_search_state_round_trip():
  state = SearchState('ttmpd', 10.0, 5.0, iteration=3, status='reached',
                      trajectory=[{'iteration': 1, 'widths': {'a': 4}}],
                      judge=judges.TTMPDJudge().to_json())
  again = SearchState.from_json(json.loads(json.dumps(state.to_json())))
  assert again == state


class _Net(nn.Module):
  """A user model outside the zoo: conv stem, a residual block, a second stage, a classifier."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda: nn.BatchNorm(use_running_average=not train)
    x = nn.relu(bn()(nn.Conv(16, (3, 3))(x)))
    y = nn.relu(bn()(nn.Conv(16, (3, 3))(x)))
    x = nn.relu(x + bn()(nn.Conv(16, (3, 3))(y)))
    x = nn.relu(bn()(nn.Conv(24, (3, 3), strides=2)(x)))
    return nn.Dense(4)(x.mean(axis=(1, 2)))


@dataclasses.dataclass
class _LinearLatency:
  """A deterministic stand-in latency model: 0.1 ms per output channel of every layer."""

  full: dict
  per_channel: float = 0.1

  def predict(self, widths=None):
    merged = {**self.full, **(widths or {})}
    return self.per_channel * sum(merged.values())


def _problem(config):
  from ttmpd_jax.models.common import widths_from_variables
  from ttmpd_jax.search.problem import prepare, unlabeled_dataset
  rng = np.random.default_rng(0)
  images = rng.standard_normal((96, 8, 8, 1)).astype(np.float32)
  model = _Net()
  variables = model.init(jax.random.key(0), jnp.asarray(images[:1]))
  latency = _LinearLatency(widths_from_variables(variables))
  return prepare(model, variables, unlabeled_dataset(images), config, latency=latency,
                 latency_batch=8, log=lambda s: None)


_CONFIG = SearchConfig(latency_target=0.6, r0=0.1, round_to=2, max_iterations=3,
                       finetune_fraction=64, bn_batches=1, bn_batch_size=16,
                       short_term_steps=2, long_term_steps=0, batch_size=16, measure_rounds=0,
                       calibration_iterations=2)


@pytest.fixture(scope='module')
def searched():
  problem = _problem(_CONFIG)
  return problem, methods_lib.METHODS.get('ttmpd').prune(problem, _CONFIG, name='ttmpd',
                                                         log=lambda s: None)


def test_search_result_obeys_masked_equals_removed(searched):
  from ttmpd_jax import pruning
  problem, full = searched
  teacher = jax.device_get(problem.teacher_variables)
  x = problem.data.heldout_images[:8]
  groups = pruning.discover_groups(problem.model.model, teacher, x[:1])
  assert full.masks and all(m.sum() < m.size for m in full.masks.values())
  embedded = pruning.embed_channels(full.variables, teacher, groups, full.masks)
  masked = pruning.apply_masks(embedded, full.masks, groups)
  np.testing.assert_allclose(problem.model.model.apply(masked, x),
                             problem.model.apply(full.variables, x), atol=1e-4)
  assert len(full.details['trajectory']) == 3 and full.compilations
  assert max(full.compilations) <= 3     # Evaluator, KD step, importance: not per candidate.


def test_resume_equals_uninterrupted(tmp_path, searched):
  from ttmpd_jax.search.state import IterationStore
  problem, full = searched
  method = methods_lib.METHODS.get('ttmpd')

  class Killed(Exception):
    pass

  def killer(line):
    if 'iter 2:' in line:   # Iteration 2 is saved before its line is printed.
      raise Killed
  store = IterationStore(str(tmp_path))
  with pytest.raises(Killed):
    method.prune(problem, _CONFIG, name='ttmpd', store=store, log=killer)
  store.close()
  store = IterationStore(str(tmp_path))
  lines = []
  resumed = method.prune(problem, _CONFIG, name='ttmpd', store=store, log=lines.append)
  store.close()
  assert any('resuming after iteration 2' in l for l in lines), lines
  assert resumed.details['resumed_from'] == 2
  assert [t['widths'] for t in resumed.details['trajectory']] == \
      [t['widths'] for t in full.details['trajectory']]
  for a, b in zip(jax.tree.leaves(resumed.variables), jax.tree.leaves(full.variables)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_resumed_search_keeps_its_target_ratio_when_the_latency_model_rescales(tmp_path,
                                                                                 searched):
  # A resumed run may predict the teacher differently (re-timed, refitted): the saved target is
  # re-expressed at the same ratio, so the search continues to the same network.
  import dataclasses
  from ttmpd_jax.search.state import IterationStore
  problem, full = searched
  method = methods_lib.METHODS.get('ttmpd')

  class Killed(Exception):
    pass

  def killer(line):
    if 'iter 1:' in line:
      raise Killed
  store = IterationStore(str(tmp_path))
  with pytest.raises(Killed):
    method.prune(problem, _CONFIG, name='ttmpd', store=store, log=killer)
  store.close()
  slower = _LinearLatency(problem.latency.full, per_channel=0.2)   # Twice the milliseconds.
  store = IterationStore(str(tmp_path))
  lines = []
  resumed = method.prune(dataclasses.replace(problem, latency=slower), _CONFIG, name='ttmpd',
                         store=store, log=lines.append)
  store.close()
  assert any('target is rescaled' in l for l in lines), lines
  assert [t['widths'] for t in resumed.details['trajectory']] == \
      [t['widths'] for t in full.details['trajectory']]


def test_the_final_network_pools_its_measurements_and_a_spread_asks_for_one_more(monkeypatch):
  from ttmpd_jax.search import harness
  from ttmpd_jax.search.measure import Measurement
  config = SearchConfig(latency_target=0.6, latency_tolerance=0.03)
  row = lambda r, widths: {**Measurement(100.0, 100.0 * r, 0.01, 0.0, True, r).to_json(),
                           'met_target': True, 'widths': widths}
  # The search measured another network (0.70) and then the final one (0.605).
  pruned = methods_lib.Pruned(None, {}, [], True, '', [row(0.70, {'a': 8}), row(0.605, {'a': 4})])
  queue = []
  monkeypatch.setattr(harness, 'widths_from_variables', lambda variables: {'a': 4})
  monkeypatch.setattr(harness, 'measure_network',
                      lambda *a: Measurement(100.0, 100.0 * queue[0], 0.01, 0.0, True,
                                             queue.pop(0)))
  queue[:] = [0.600]   # Agrees with the search: the two are pooled.
  assert harness.confirmed_measurement(None, None, pruned, config, print).ratio == \
      pytest.approx(0.6025)
  queue[:] = [0.662, 0.612]   # Spread over more than the band: one more, then the median.
  assert harness.confirmed_measurement(None, None, pruned, config, print).ratio == 0.612
  assert not queue


def test_fitted_accuracy_model_speaks_accuracy_units_whatever_its_form():
  rng = np.random.default_rng(2)
  it = np.repeat([0, 1, 2], 6)
  v1, v2 = rng.uniform(0.8, 0.95, 18), rng.uniform(0.1, 0.3, 18)
  acc = 0.5 * v1 - 0.2 * v2 + 0.4
  for form in ('v1', 'v2', 'equal', 'nnls'):
    weights = proxy_lib._in_accuracy_units(  # pylint: disable=protected-access
        proxy_lib.FORMS[form] if form != 'nnls' else np.array([0.3, 0.1]),
        np.stack([v1 - v1.mean(), -(v2 - v2.mean())], 1), acc - acc.mean())
    assert weights[0] >= 0 and weights[1] >= 0
  model = AccuracyModel.fit(v1, v2, acc, groups=it)
  # Whatever form won, Â is an accuracy: same mean and at most the real spread.
  assert abs(model.predict(v1, v2).mean() - acc.mean()) < 1e-9
  assert 0 < model.predict(v1, v2).std() <= acc.std() + 1e-9
  assert np.all((model.predict(v1, v2) > 0.3) & (model.predict(v1, v2) < 1.0))


def test_tied_forms_go_to_the_simplest():
  # 4 candidates per iteration ranked the same way by both variables: every form ties.
  v1 = np.array([0.80, 0.82, 0.84, 0.86, 0.70, 0.72, 0.74, 0.76])
  v2 = np.array([0.40, 0.30, 0.20, 0.10, 0.60, 0.50, 0.40, 0.30])
  acc = v1 + 0.01
  model = AccuracyModel.fit(v1, v2, acc, groups=np.repeat([0, 1], 4))
  assert len(set(model.cv.values())) == 1 and model.form == 'v1'
  assert model.coef[2] == 0.0 and model.coef[1] > 0


def _measured_as(monkeypatch, problem, bias):
  """Measurements faked as ``bias(predicted ratio) * predicted ratio``; returns the widths
  measured, in order."""
  from ttmpd_jax.models.common import widths_from_variables
  from ttmpd_jax.search.measure import Measurement
  l0, seen = problem.latency.predict(), []

  def fake(problem, variables, log, band=None):
    widths = widths_from_variables(variables)
    seen.append(widths)
    predicted = problem.latency.predict(widths) / l0
    r = bias(predicted) * predicted
    return Measurement(100.0, 100.0 * r, 0.01, 0.0, True, r)
  monkeypatch.setattr(methods_lib, 'measure_network', fake)
  return seen


def test_one_shot_method_stops_when_no_allocation_lies_in_the_band(monkeypatch):
  # Uniform allocations of _Net are predicted at ..., 0.553, 0.632, ... of the teacher: none in
  # 0.6 ± 3%. Measured as predicted, the correction leads back to 0.553; the neighbour 0.632 is
  # tried, then the interpolated target leads back to 0.553 again: stop, never measure twice.
  from ttmpd_jax.models.common import widths_from_variables
  config = dataclasses.replace(_CONFIG, measure_rounds=4, latency_tolerance=0.03)
  problem = _problem(config)
  seen = _measured_as(monkeypatch, problem, lambda p: 1.0)
  lines = []
  pruned = methods_lib.METHODS.get('uniform').prune(problem, config, name='uniform',
                                                    log=lines.append)
  ratios = [m['ratio'] for m in pruned.measurements]
  assert np.allclose(ratios, [0.5526, 0.6316], atol=1e-3), ratios
  assert len(seen) == 2 and seen[0] != seen[1] and not pruned.reached_target
  # The closest to the target (0.632) is kept, and the message says why the band was missed.
  assert widths_from_variables(pruned.variables) == seen[1]
  assert 'no allocation in the band' in pruned.message and 'measured 0.632' in pruned.message


def test_one_shot_method_interpolates_between_measurements_on_both_sides(monkeypatch):
  # The predictor errs differently per network: 0.553 predicted measures 0.600 (too slow for
  # 0.56 ± 1%), the correction picks 0.500, measured 0.500 (too fast); a correction from that one
  # alone would go back to 0.553 — interpolating between the two aims at 0.532 predicted and
  # picks 0.526, measured 0.558: in the band.
  config = dataclasses.replace(_CONFIG, latency_target=0.56, measure_rounds=4,
                               latency_tolerance=0.01)
  problem = _problem(config)
  seen = _measured_as(monkeypatch, problem,
                      lambda p: {0.553: 1.085, 0.526: 1.06}.get(round(p, 3), 1.0))
  pruned = methods_lib.METHODS.get('uniform').prune(problem, config, name='uniform',
                                                    log=lambda s: None)
  ratios = [round(m['predicted_ratio'], 3) for m in pruned.measurements]
  assert ratios == [0.553, 0.5, 0.526], ratios
  assert pruned.reached_target and len({json.dumps(w, sort_keys=True) for w in seen}) == 3


def test_bracketed_target_and_neighbour():
  from ttmpd_jax.search import oneshot
  one_side = [{'ratio': 0.66, 'predicted_ratio': 0.60}]
  assert oneshot.bracketed_target_ms(one_side, 10.0, 0.6) == pytest.approx(10 * 0.6 / 1.1)
  both = one_side + [{'ratio': 0.50, 'predicted_ratio': 0.54},
                     {'ratio': 0.40, 'predicted_ratio': 0.40}]
  # Between (0.54 -> 0.50) and (0.60 -> 0.66): 0.6 is 5/8 of the way, predicted 0.5775.
  assert oneshot.bracketed_target_ms(both, 10.0, 0.6) == pytest.approx(5.775)
  steps = lambda t: ({'a': int(t)}, {})   # An allocator whose result changes at whole ms.
  assert oneshot.neighbour(steps, 5.5, {'a': 5}, True, 10.0)[0] == {'a': 6}
  assert oneshot.neighbour(steps, 5.5, {'a': 5}, False, 10.0)[0] == {'a': 4}
  assert oneshot.neighbour(lambda t: ({'a': 1}, {}), 5.5, {'a': 1}, True, 10.0) is None


def test_resumed_run_ending_on_another_student_keeps_the_old_fine_tuning(tmp_path, searched):
  # An interrupted run's long-term fine-tuning is kept; a resumed run that ends on another
  # network (a one-shot allocator measuring afresh) fine-tunes it without being refused.
  from ttmpd_jax.search import harness
  problem, full = searched
  config = dataclasses.replace(_CONFIG, long_term_steps=2)
  other = jax.tree.map(lambda a: a * 1.01, full.variables)
  first = harness.long_term_dir(str(tmp_path), full.variables)
  harness.long_term_finetune(problem, full.variables, config, first, lambda s: None)
  assert harness.long_term_dir(str(tmp_path), full.variables) == first
  second = harness.long_term_dir(str(tmp_path), other)
  assert second != first
  tuned, _ = harness.long_term_finetune(problem, other, config, second, lambda s: None)
  assert jax.tree.structure(tuned) == jax.tree.structure(other)
  assert sorted(p.name for p in (tmp_path / 'long_term').iterdir()) == sorted(
      [first.rsplit('/', 1)[1], second.rsplit('/', 1)[1]])


def test_a_search_stuck_before_its_first_iteration_still_reports_every_proxy_key():
  from ttmpd_jax.search.harness import proxy_spearman
  problem = _problem(_CONFIG)
  problem = dataclasses.replace(problem, latency=_ConstantLatency())   # Nothing saves time.
  pruned = methods_lib.METHODS.get('ttmpd').prune(problem, _CONFIG, name='ttmpd',
                                                  log=lambda s: None)
  assert not pruned.reached_target and 'unreachable' in pruned.message
  assert proxy_spearman(pruned) == {'n_iterations': 0, 'v1': None, 'v2': None, 'ttmpd': None}


class _ConstantLatency:

  def predict(self, widths=None):
    del widths
    return 1.0


def test_ground_truth_extras_are_recorded_without_changing_the_search_or_its_time():
  # Benchmarking knobs: every fine-tuned candidate is fine-tuned once more (another batch order)
  # and for fewer steps, and the accuracies are kept; decisions and the method's own time are
  # those of one run.
  config = _CONFIG.replace(max_iterations=2)
  method = methods_lib.METHODS.get('netadapt')
  once = method.prune(_problem(config), config, name='netadapt', log=lambda s: None)
  twice_config = config.replace(ground_truth_repeats=2, ground_truth_steps=(1,))
  twice = method.prune(_problem(twice_config), twice_config, name='netadapt', log=lambda s: None)
  assert [t['widths'] for t in twice.details['trajectory']] == \
      [t['widths'] for t in once.details['trajectory']]
  candidates = twice.details['candidates']
  assert candidates and all(len(c['real_repeats']) == 1 and 0.0 <= c['real_repeats'][0] <= 1.0
                            for c in candidates)
  assert [c['real'] for c in candidates] == [c['real'] for c in once.details['candidates']]
  assert all('real_repeats' not in c for c in once.details['candidates'])
  assert all(set(c['statistics']) == {'soft_agreement', 'margin', 'hard_ce'} for c in candidates)
  assert all(0.0 <= c['real_at_steps']['1'] <= 1.0 for c in candidates)
  assert twice.times['ground_truth'] > 0   # Timed apart from the method's own keys.
  assert 'ground_truth' not in once.times


def test_ttmpd_shortlist_fine_tunes_its_shortlist_and_commits_the_best_of_it():
  config = _CONFIG.replace(calibration_iterations=1, shortlist=2)
  pruned = methods_lib.METHODS.get('ttmpd_shortlist').prune(_problem(config), config,
                                                           name='ttmpd_shortlist',
                                                           log=lambda s: None)
  candidates = pruned.details['candidates']
  iterations = sorted({c['iteration'] for c in candidates})
  assert len(iterations) >= 2
  first = [c for c in candidates if c['iteration'] == 1]
  assert all(c['real'] is not None for c in first)   # Calibration: every candidate.
  for k in iterations[1:]:
    rows = [c for c in candidates if c['iteration'] == k]
    tuned = [c for c in rows if c['real'] is not None]
    assert len(tuned) == min(2, len(rows))            # The shortlist only.
    chosen = [c for c in rows if c['chosen']]
    assert chosen[0]['real'] is not None              # Chosen from the shortlist.
  judge = pruned.details['judge']
  assert judge['levels_done'] == 1 and judge['shortlist'] == 2
  assert len(judge['points']) == len(first) + 2 * (len(iterations) - 1)


# ---- TT-MPD's checked picks (constructed candidates, faked fine-tunings) ------------------------
def _checked_judge(slope=0.27):
  judge = judges.TTMPDJudge(calibration_iterations=0,
                            model=AccuracyModel(np.array([1.0 - slope, slope, 0.0]), True))
  judge.max_drop, judge.verify_limit = 0.04, 2
  return judge


def test_choose_passes_over_candidates_estimated_to_lose_too_much():
  # Candidate 1 cuts deep: v1 0.43 against 1.0 now, a large saving; per ms it looks cheapest
  # (0.154 / 8 ms < 0.0135 / 0.5 ms) but its estimated loss (0.154) is over max_drop.
  p = _proposal([0.95, 0.43], [0.0, 0.0], [9.5, 2.0])
  judge = _checked_judge()
  assert choose(judges.TTMPDJudge(model=judge.model), p, np.full(2, np.nan), 10.0)[0] == 1
  assert choose(judge, p, np.full(2, np.nan), 10.0)[0] == 0
  # When every candidate is estimated to lose too much, the best per ms is still taken.
  p = _proposal([0.60, 0.43], [0.0, 0.0], [9.5, 2.0])
  assert choose(judge, p, np.full(2, np.nan), 10.0)[0] == 1


class _FakeBatched:
  """Short-term fine-tuning faked: a candidate 'fine-tunes' to the accuracy given for it."""

  def __init__(self, accuracy):
    self.accuracy, self.calls = accuracy, []

  def run_many(self, embedded, lifted, steps):
    del embedded, steps
    self.calls.append([m['i'] for m in lifted])
    return [{'i': m['i']} for m in lifted]


def _checked_run(p, real_after_finetuning):
  from ttmpd_jax.search import loop
  batched = _FakeBatched(real_after_finetuning)
  p.lifted = [{'i': i} for i in range(len(p.candidates))]
  p.evaluate = lambda variables, masks: (real_after_finetuning[variables['i']], 0.0)
  workspace = dataclasses.make_dataclass('W', ['batched'])(batched)
  run = dataclasses.make_dataclass('R', ['judge', 'workspace', 'config', 'log'])(
      _checked_judge(), workspace, SearchConfig(short_term_steps=3), lambda s: None)
  return loop, run, batched


def test_a_pick_whose_real_accuracy_falls_far_below_the_estimate_is_rejected():
  # Â ranks 0 first (estimated loss 0.0135 for 1 ms); after fine-tuning it lost 0.10: rejected,
  # candidate 1 (next by the criterion) is fine-tuned, loses 0.02 and is taken.
  p = _proposal([0.95, 0.93, 0.90], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0])
  loop, run, batched = _checked_run(p, [0.90, 0.98, 0.97])
  real = np.full(3, np.nan)
  best, _ = loop.choose(run.judge, p, real, 10.0)
  assert best == 0
  best, accuracy = loop.verify(run, p, best, {}, real, 10.0, 0.0)
  assert best == 1 and batched.calls == [[0], [1]]
  assert real[0] == pytest.approx(0.90) and real[1] == pytest.approx(0.98) and np.isnan(real[2])


def test_a_pick_within_max_drop_costs_no_extra_fine_tuning():
  p = _proposal([0.95, 0.93], [0.0, 0.0], [9.0, 9.0])
  loop, run, batched = _checked_run(p, [0.97, 0.99])
  finetuned = {0: {'i': 0}}   # The commit's fine-tuning, already done by the judge's request.
  real = np.array([0.97, np.nan])
  best, _ = loop.verify(run, p, 0, finetuned, real, 10.0, 0.0)
  assert best == 0 and batched.calls == []


def test_when_every_checked_pick_loses_too_much_the_least_loss_per_ms_is_kept():
  # Three checks (the pick and verify_limit = 2 more), all over max_drop: candidate 2 loses 0.06
  # for 4 ms saved, the least per ms.
  p = _proposal([0.95, 0.94, 0.93, 0.5], [0.0] * 4, [9.0, 9.0, 6.0, 9.0])
  loop, run, batched = _checked_run(p, [0.90, 0.91, 0.94, 0.5])
  best, _ = loop.verify(run, p, 0, {}, np.full(4, np.nan), 10.0, 0.0)
  assert best == 2 and len(batched.calls) == 3


def test_shrunk_scale_moves_a_small_fitted_slope_towards_the_prior():
  v1 = np.array([0.80, 0.85, 0.90, 0.95, 0.70, 0.75, 0.80, 0.85])
  real = 0.8 + 0.1 * v1   # A fitted slope of 0.10 (the grid's collapsing runs: 0.10-0.15).
  points = np.stack([np.repeat([1, 2], 4), v1, np.zeros(8), real], 1)
  model = AccuracyModel.fit(v1, np.zeros(8), real, groups=points[:, 0])
  assert model.coef[1] == pytest.approx(0.1)
  shrunk = judges.shrink_scale(model, points, prior_slope=0.27, weight=16.0)
  assert shrunk.coef[1] == pytest.approx((8 * 0.1 + 16 * 0.27) / 24)
  assert shrunk.predict(v1, np.zeros(8)).mean() == pytest.approx(real.mean())
