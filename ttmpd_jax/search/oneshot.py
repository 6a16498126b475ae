"""One-shot baselines: HALP-style global saliency + knapsack, and uniform keep ratio.

Both pick a whole architecture at once against the same latency table and target, then the
harness fine-tunes it (long-term KD) with the same budget as everyone else.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ttmpd_jax.pruning.graph import ChannelGroup
from ttmpd_jax.pruning.masks import masks_from_scores, round_keep
from ttmpd_jax.search import measure
from ttmpd_jax.search.candidates import keep_counts, width_keys


def _widths_for(counts: Mapping[str, int], groups: Sequence[ChannelGroup],
                base: Mapping[str, int]) -> dict[str, int]:
  widths = dict(base)
  for g in groups:
    if g.name in counts:
      for key in width_keys(g):
        widths[key] = counts[g.name]
  return widths


def _prunable(groups: Sequence[ChannelGroup]) -> list[ChannelGroup]:
  return [g for g in groups if g.prunable and width_keys(g)]


def uniform_counts(groups: Sequence[ChannelGroup], base_widths: Mapping[str, int],
                   predict_ms: Callable[[Mapping[str, int]], float], target_ms: float,
                   round_to: int) -> tuple[dict[str, int], float, bool]:
  """The largest common keep ratio (step 0.005) whose predicted latency meets ``target_ms``.

  Returns ``(kept count per group, keep ratio, reached)``. Latency is not monotone in channel
  counts on real devices, so every ratio is tried; when none meets the target, the ratio with
  the *fastest* predicted network (not simply the smallest) is returned with ``reached=False``.
  """
  prunable = _prunable(groups)
  fastest = (np.inf, {}, 1.0)
  for ratio in np.arange(1.0, 0.0, -0.005):
    counts = {g.name: round_keep(ratio * g.size, g.size, round_to) for g in prunable}
    ms = predict_ms(_widths_for(counts, groups, base_widths))
    if ms <= target_ms:
      return counts, float(ratio), True
    if ms < fastest[0]:
      fastest = (ms, counts, float(ratio))
  return fastest[1], fastest[2], False


def knapsack_counts(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray],
                    base_widths: Mapping[str, int],
                    predict_ms: Callable[[Mapping[str, int]], float], target_ms: float,
                    round_to: int) -> tuple[dict[str, int], bool]:
  """HALP-style latency-constrained selection of how many channels each group keeps.

  Design choice: HALP solves an augmented knapsack (maximise total kept importance subject to
  the latency budget). We solve it greedily: starting from the full network, repeatedly drop
  the step of ``round_to`` lowest-importance channels (of any group) that loses the least
  importance per millisecond saved, until the predicted latency meets ``target_ms``. Scores are
  normalised per network (divided by their global sum) so groups compare. Each step may jump
  several multiples of ``round_to`` (see the loop for why).
  """
  prunable = _prunable(groups)
  total = sum(float(np.sum(scores[g.name])) for g in prunable) or 1.0
  sorted_scores = {g.name: np.sort(np.asarray(scores[g.name], float)) / total for g in prunable}
  counts = {g.name: g.size for g in prunable}
  current = predict_ms(_widths_for(counts, groups, base_widths))
  while current > target_ms:
    best, best_ratio, best_ms = None, np.inf, current
    for g in prunable:
      # Every smaller admissible size, not just the next one: measured latency is not monotone
      # in the channel count (e.g. multiples of 8 run faster on CPU), so one step can cost time
      # while two steps save it; a one-step greedy gets stuck there.
      for keep in keep_counts(counts[g.name], round_to):
        trial = dict(counts)
        trial[g.name] = keep
        ms = predict_ms(_widths_for(trial, groups, base_widths))
        saving = current - ms
        if saving <= 0:
          continue
        # Importance of the channels this step removes: the lowest of those still kept
        # (ascending order; the first ``size - counts`` are already gone).
        lost = float(np.sum(sorted_scores[g.name][g.size - counts[g.name]:g.size - keep]))
        ratio = lost / saving
        if ratio < best_ratio:
          best, best_ratio, best_ms = (g.name, keep), ratio, ms
    if best is None:
      return counts, False
    counts[best[0]] = best[1]
    current = best_ms
  return counts, True


def masks_for_counts(scores: Mapping[str, np.ndarray], groups: Sequence[ChannelGroup],
                     counts: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Keeps the ``counts[g]`` highest-scoring channels of each group."""
  return masks_from_scores({n: scores[n] for n in counts}, groups, dict(counts))


def allocation_key(counts: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
  """An allocation as a hashable value (equal counts, equal key)."""
  return tuple(sorted((k, int(v)) for k, v in counts.items()))


def bracketed_target_ms(measurements: Sequence[Mapping[str, float]], l0_ms: float,
                        target: float) -> float:
  """The predicted-ms target of the next allocation, from the measurements so far.

  Each measurement has a measured ``ratio`` and a ``predicted_ratio``. Design choice: while every
  measurement lies on one side of ``target``, the latest one corrects the target
  multiplicatively (:func:`measure.corrected_target_ms`); once they bracket it, the target is
  interpolated between the closest measurement above and the closest below
  (:func:`measure.interpolated_target_ms`; seen without it: an allocator alternating between
  networks measured 0.65 and 0.52 for a 0.6 target).
  """
  below = [m for m in measurements if m['ratio'] < target]
  above = [m for m in measurements if m['ratio'] >= target]
  if not below or not above:
    last = measurements[-1]
    return measure.corrected_target_ms(last['ratio'], last['predicted_ratio'] * l0_ms, l0_ms,
                                       target)
  slow = min(above, key=lambda m: m['ratio'])
  fast = max(below, key=lambda m: m['ratio'])
  return measure.interpolated_target_ms((slow['ratio'], slow['predicted_ratio'] * l0_ms),
                                        (fast['ratio'], fast['predicted_ratio'] * l0_ms), target)


def neighbour(allocate: Callable[[float], tuple[dict[str, int], dict]], target_ms: float,
              counts: Mapping[str, int], slower: bool, l0_ms: float, step: float = 0.01,
              max_steps: int = 60) -> Optional[tuple[dict[str, int], dict]]:
  """The first allocation other than ``counts`` met by moving ``target_ms`` up (``slower``) or
  down in steps of ``step`` of the teacher's predicted latency; None if there is none.

  An allocator's result is a step function of the target: the next step up (down) is the
  neighbouring allocation, which is what a measurement just outside the band asks for when the
  corrected target falls on the same step.
  """
  key = allocation_key(counts)
  for k in range(1, max_steps + 1):
    trial = target_ms + (k if slower else -k) * step * l0_ms
    if trial <= 0 or trial > l0_ms * (1 + step):
      return None
    found = allocate(trial)
    if allocation_key(found[0]) != key:
      return found
  return None
