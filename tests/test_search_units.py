"""Search building blocks: candidate sizing, knapsack/uniform, the accuracy model, Spearman."""

from __future__ import annotations

import numpy as np
import pytest

from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning.graph import ChannelGroup, Member
from ttmpd_jax.search import oneshot
from ttmpd_jax.search.candidates import keep_counts, make_candidates, selection_score
from ttmpd_jax.search.config import ConfigError, SearchConfig
from ttmpd_jax.search.methods import METHODS
from ttmpd_jax.search.proxy import AccuracyModel, agreement_and_kl, spearman


def _group(name, size):
  return ChannelGroup(name=name, size=size, members=(
      Member(path=('params', name, 'kernel'), axis=3, role='out', index=None),), prunable=True)


GROUPS = (_group('a', 16), _group('b', 32))


def _predict(widths):
  # A toy latency model: 1 ms per channel of 'a', 3 ms per channel of 'b', 10 ms fixed.
  return 10.0 + widths.get('a', 16) + 3.0 * widths.get('b', 32)


def test_keep_counts_are_multiples_and_never_empty():
  assert keep_counts(16, 4) == [12, 8, 4]
  assert keep_counts(18, 4) == [16, 12, 8, 4]
  assert keep_counts(3, 4) == [2, 1]        # Smaller than round_to: one channel at a time.
  assert keep_counts(8, 8) == []            # At round_to: never off the multiple.
  assert keep_counts(9, 8) == [8]
  assert keep_counts(1, 4) == []


def test_candidates_remove_the_fewest_channels_reaching_the_saving():
  widths = {'a': 16, 'b': 32}
  cands = {c.group: c for c in make_candidates(GROUPS, widths, _predict, 10.0, round_to=4)}
  # 'a' saves 1 ms/channel: 12 kept saves only 4, 4 kept saves 12 >= 10 -> remove 12.
  assert cands['a'].removed == 12 and cands['a'].reaches_target
  # 'b' saves 3 ms/channel: 28 kept saves 12 >= 10 -> remove 4.
  assert cands['b'].removed == 4 and cands['b'].saving_ms == pytest.approx(12.0)
  assert cands['b'].widths == {'a': 16, 'b': 28}


def test_unreachable_saving_falls_back_to_largest_savings():
  widths = {'a': 16, 'b': 32}
  cands = make_candidates(GROUPS, widths, _predict, 100.0, round_to=4)
  assert {c.group: c.removed for c in cands} == {'a': 12, 'b': 28}
  assert not any(c.reaches_target for c in cands)
  # A candidate saving under 10% of the request is no progress: 'a' saves 12 of 500 ms.
  cands = make_candidates(GROUPS, widths, _predict, 500.0, round_to=4)
  assert {c.group: c.removed for c in cands} == {'b': 28}
  assert make_candidates(GROUPS, widths, _predict, 5000.0, round_to=4) == []


def test_selection_prefers_least_accuracy_lost_per_ms():
  scores = selection_score(0.9, np.array([0.8, 0.85]), 100.0, np.array([80.0, 95.0]))
  np.testing.assert_allclose(scores, [0.1 / 20, 0.05 / 5])
  assert int(np.argmin(scores)) == 0


def test_uniform_and_knapsack_meet_the_target():
  widths = {'a': 16, 'b': 32}
  counts, ratio, reached = oneshot.uniform_counts(GROUPS, widths, _predict, 60.0, 4)
  assert reached and _predict({'a': counts['a'], 'b': counts['b']}) <= 60.0
  assert counts['a'] / 16 == pytest.approx(counts['b'] / 32, abs=0.15)
  # 'b' channels are unimportant and expensive: the knapsack prunes them first.
  scores = {'a': np.ones(16), 'b': np.full(32, 0.01)}
  counts, reached = oneshot.knapsack_counts(GROUPS, scores, widths, _predict, 60.0, 4)
  assert reached and counts['a'] == 16 and counts['b'] < 32
  assert _predict(counts) <= 60.0
  _, reached = oneshot.knapsack_counts(GROUPS, scores, widths, _predict, 1.0, 4)
  assert not reached


def test_knapsack_jumps_over_a_locally_slower_width():
  # 16 -> 12 channels of 'a' is slower (misaligned), 16 -> 8 is faster: the knapsack must find it.
  def predict(widths):
    a = widths.get('a', 16)
    return 10.0 + (20.0 if a == 12 else a) + 3.0 * widths.get('b', 32)
  scores = {'a': np.full(16, 0.01), 'b': np.ones(32)}
  counts, reached = oneshot.knapsack_counts(GROUPS, scores, {'a': 16, 'b': 32}, predict, 120.0, 4)
  assert reached and counts['a'] <= 8 and counts['b'] == 32


def test_linear_accuracy_model_recovers_coefficients_and_ranks():
  rng = np.random.default_rng(0)
  v1, v2 = rng.uniform(0.3, 1.0, 12), rng.uniform(0.0, 2.0, 12)
  acc = 0.1 + 0.8 * v1 - 0.05 * v2
  model = AccuracyModel.fit(v1, v2, acc)
  np.testing.assert_allclose(model.coef, [0.1, 0.8, -0.05], atol=2e-3)
  assert spearman(model.predict(v1, v2), acc) == pytest.approx(1.0)
  assert np.isnan(spearman([1, 2], [2, 1]))


def test_accuracy_model_never_rewards_kl():
  # Noise makes KL look helpful on a few points; the fit must not follow it.
  v1 = np.array([0.80, 0.82, 0.84, 0.86])
  v2 = np.array([0.50, 0.30, 0.60, 0.40])
  acc = np.array([0.80, 0.81, 0.84, 0.845])
  model = AccuracyModel.fit(v1, v2, acc)
  assert model.coef[1] >= 0 and model.coef[2] <= 0
  # A candidate with poor agreement and a huge KL is never predicted to beat a good one.
  assert model.predict(0.3, 3.0) < model.predict(0.85, 0.4)


def test_agreement_and_kl():
  teacher = np.array([[2.0, 0.0], [0.0, 2.0]], np.float32)
  v1, v2 = agreement_and_kl(teacher, teacher)
  assert float(v1) == 1.0 and float(v2) == pytest.approx(0.0, abs=1e-6)
  v1, v2 = agreement_and_kl(teacher[::-1], teacher)
  assert float(v1) == 0.0 and float(v2) > 1.0


def test_candidate_statistics_by_hand():
  from ttmpd_jax.search.proxy import STATISTICS, candidate_statistics
  teacher = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], np.float32)   # Teacher classes 0, 1.
  student = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], np.float32)   # Right, then wrong.
  stats = dict(zip(STATISTICS, np.asarray(candidate_statistics(student, teacher))))
  v1, v2 = agreement_and_kl(student, teacher)
  assert stats['v1'] == pytest.approx(float(v1)) == 0.5 and stats['v2'] == pytest.approx(float(v2))
  p = np.exp(student) / np.exp(student).sum(1, keepdims=True)
  assert stats['soft_agreement'] == pytest.approx((p[0, 0] + p[1, 1]) / 2, rel=1e-5)
  assert stats['margin'] == pytest.approx(((1.0 - 0.0) + (0.0 - 2.0)) / 2, rel=1e-5)
  assert stats['hard_ce'] == pytest.approx(-(np.log(p[0, 0]) + np.log(p[1, 1])) / 2, rel=1e-5)


@pytest.mark.parametrize('kwargs,needle', [
    ({'latency_target': 1.0}, 'latency_target'), ({'latency_target': 0.0}, 'latency_target'),
    ({'kd': 'sometimes'}, 'kd'), ({'round_to': 0}, 'round_to')])
def test_bad_budgets(kwargs, needle):
  with pytest.raises(UserError, match=needle):
    SearchConfig(**kwargs)


def test_unknown_method_lists_methods():
  with pytest.raises(ConfigError,
                     match='ttmpd, ttmpd_unchecked, ttmpd_shortlist, netadapt, eagleeye, halp, uniform, teacher'):
    METHODS.get('magic')
