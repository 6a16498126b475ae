"""One pruning candidate per channel group, sized by the latency table (NetAdapt step 3).

A candidate removes the *fewest* channels of one group (lowest importance first; kept counts on
multiples of ``round_to``) such that the predicted latency saving reaches the iteration's
target. Candidates are masks over the *current* network, so every candidate has the same shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ttmpd_jax.pruning.graph import ChannelGroup


@dataclasses.dataclass(frozen=True)
class Candidate:
  """Remove ``removed`` channels of group ``group`` (size ``size``)."""

  group: str
  size: int
  removed: int
  widths: Mapping[str, int]       # Width spec of the candidate architecture.
  predicted_ms: float             # Its predicted latency.
  saving_ms: float                # Predicted saving w.r.t. the current network.
  reaches_target: bool


def width_keys(group: ChannelGroup) -> tuple[str, ...]:
  """Width-spec keys (module paths) whose output channels are this group's channels."""
  keys = []
  for member in group.members_with_role('out'):
    path = member.path
    if path and path[0] == 'params' and path[-1] == 'kernel':
      keys.append('/'.join(str(p) for p in path[1:-1]))
  return tuple(keys)


def keep_counts(size: int, round_to: int) -> list[int]:
  """Admissible smaller kept counts of a group of ``size``, largest first.

  Multiples of ``round_to`` below ``size``; a group *smaller* than ``round_to`` can shrink one
  channel at a time (never to zero). A group of exactly ``round_to`` channels stays: below it,
  counts are off the multiple, whose kernels are slower on CPU and GPU alike — in the grid a
  stem cut from 8 to 7 channels measured 0.756 of the teacher where 0.615 was predicted.
  """
  if size < round_to:
    return list(range(size - 1, 0, -1))
  top = (size - 1) // round_to * round_to
  return list(range(top, 0, -round_to))


def make_candidates(groups: Sequence[ChannelGroup], widths: Mapping[str, int],
                    predict_ms: Callable[[Mapping[str, int]], float], target_saving_ms: float,
                    round_to: int, min_fraction: float = 0.1) -> list[Candidate]:
  """The candidate of each prunable group for a predicted saving of ``target_saving_ms``.

  Groups that cannot reach the saving even at their smallest admissible size are skipped,
  unless *no* group can: then each group contributes its largest-saving candidate, flagged
  ``reaches_target=False``, provided it saves at least ``min_fraction`` of the requested saving
  (a candidate that buys almost nothing is not progress; an empty list means "unreachable").
  """
  current_ms = predict_ms(widths)
  reaching, fallback = [], []
  for group in groups:
    keys = width_keys(group)
    if not group.prunable or not keys:
      continue
    best: Optional[Candidate] = None
    for keep in keep_counts(group.size, round_to):
      trial = dict(widths)
      for key in keys:
        trial[key] = keep
      predicted = predict_ms(trial)
      candidate = Candidate(group.name, group.size, group.size - keep, trial, predicted,
                            current_ms - predicted, current_ms - predicted >= target_saving_ms)
      if candidate.reaches_target:
        reaching.append(candidate)
        best = None
        break
      if best is None or candidate.saving_ms > best.saving_ms:
        best = candidate
    if best is not None and best.saving_ms >= min_fraction * target_saving_ms:
      fallback.append(best)
  return reaching if reaching else fallback


def selection_score(current_accuracy: float, candidate_accuracy: np.ndarray,
                    current_ms: float, candidate_ms: np.ndarray) -> np.ndarray:
  """(Â_current − Â_g) / (L_current − L_g): accuracy lost per ms saved (lower is better)."""
  saving = np.maximum(current_ms - np.asarray(candidate_ms, float), 1e-9)
  return (current_accuracy - np.asarray(candidate_accuracy, float)) / saving
