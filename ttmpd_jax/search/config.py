"""Typed configuration of a pruning run: every budget, in one frozen dataclass.

The library never sees command-line flags. Invalid values raise :class:`ConfigError`, which names
the *field*; a launcher that builds the config from flags maps fields to its flag names
(``launch/mode_prune.py`` does).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ttmpd_jax.errors import ConfigError

KD_MODES = ('cached', 'online')


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Every budget of a pruning run (one config serves TT-MPD and every baseline).

  Attributes:
    latency_target: final *measured* latency as a fraction of the teacher's, in (0, 1).
    latency_tolerance: the measured ratio must land within ``target * (1 ± tolerance)``.
    measure_rounds: measure → correct → continue rounds allowed to meet the measured target.
    r0, decay: iteration k asks for a predicted saving of ``r0 * L0 * decay**(k-1)`` (NetAdapt).
    round_to: kept channel counts are multiples of this (unless a group is smaller).
    max_iterations: safety stop of the iterative loop.
    finetune_fraction: size of the fine-tuning subset S as a fraction of the test set (or an
      absolute count when > 1).
    heldout_fraction: part of S held out to compute v1/v2 and short-term accuracies.
    bn_batches, bn_batch_size: adaptive-BN batches (of S) per candidate evaluation.
    calibration_iterations: TT-MPD fine-tunes candidates in this many iterations to fit Â
      (spread over the run, see ``judges.TTMPDJudge``).
    calibration_candidates: how many candidates per calibration iteration (0: all).
    shortlist: method ``ttmpd_shortlist``: outside calibration, this many candidates (best first
      by Â's criterion) are short-term fine-tuned and the best of them by real accuracy is
      chosen (``judges.TTMPDJudge``). The other methods ignore it.
    short_term_steps, long_term_steps: KD steps per short-term / final fine-tuning.
    ground_truth_repeats: each fine-tuned candidate is fine-tuned this many times, each with
      another batch order; the first run is the one the method uses, the others are recorded
      (``real_repeats``) to measure how reproducible a "real" short-term accuracy is — the
      ceiling of any accuracy proxy's rank correlation (``bench/bench_proxy.py``). Benchmarking
      only: it changes no decision and costs fine-tuning time.
    ground_truth_steps: benchmarking, like ``ground_truth_repeats``: each fine-tuned candidate is
      also fine-tuned for each of these (fewer) steps, same batches, and its accuracy recorded
      (``real_at_steps``): how well a cheaper fine-tuning ranks candidates.
    short_term_lr, long_term_lr: their SGD learning rates (constant / cosine).
    batch_size: KD batch size.
    temperature, hard_weight: KD loss (see ``distill.losses.kd_loss``).
    kd: 'cached' (pseudo labels computed once) or 'online' (teacher on every batch).
    importance: channel importance inside a group (a name in ``search.scoring.CRITERIA``).
    teacher_bn_adapt: re-estimate the teacher's BatchNorm statistics on the test samples first.
    seed: subset selection, data order, random importance.
  """

  latency_target: float = 0.5
  latency_tolerance: float = 0.03
  measure_rounds: int = 4
  r0: float = 0.1
  decay: float = 0.96
  round_to: int = 4
  max_iterations: int = 40
  finetune_fraction: float = 0.1
  heldout_fraction: float = 0.25
  bn_batches: int = 4
  bn_batch_size: int = 128
  calibration_iterations: int = 3
  calibration_candidates: int = 0
  shortlist: int = 3
  short_term_steps: int = 30
  ground_truth_repeats: int = 1
  ground_truth_steps: tuple[int, ...] = ()
  long_term_steps: int = 300
  short_term_lr: float = 0.01
  long_term_lr: float = 0.01
  batch_size: int = 128
  temperature: float = 1.0
  hard_weight: float = 0.0
  kd: str = 'cached'
  importance: str = 'l2'
  teacher_bn_adapt: bool = True
  seed: int = 0

  def __post_init__(self):
    _check(0.0 < self.latency_target < 1.0, 'latency_target',
           f'must lie strictly between 0 and 1 (a fraction of the teacher latency), '
           f'got {self.latency_target}')
    _check(0.0 <= self.latency_tolerance < 0.5, 'latency_tolerance',
           f'must lie in [0, 0.5), got {self.latency_tolerance}')
    _check(0.0 < self.r0 <= 1.0, 'r0', f'must lie in (0, 1], got {self.r0}')
    _check(0.0 < self.decay <= 1.0, 'decay', f'must lie in (0, 1], got {self.decay}')
    _check(self.round_to >= 1, 'round_to', f'must be >= 1, got {self.round_to}')
    _check(self.kd in KD_MODES, 'kd', f'must be one of {", ".join(KD_MODES)}, got {self.kd!r}')
    for name in ('short_term_steps', 'long_term_steps', 'bn_batches', 'calibration_iterations',
                 'calibration_candidates', 'measure_rounds'):
      _check(getattr(self, name) >= 0, name, f'must be >= 0, got {getattr(self, name)}')
    for name in ('bn_batch_size', 'batch_size', 'max_iterations', 'ground_truth_repeats',
                 'shortlist'):
      _check(getattr(self, name) > 0, name, f'must be positive, got {getattr(self, name)}')
    _check(0.0 < self.heldout_fraction < 1.0, 'heldout_fraction',
           f'must lie in (0, 1), got {self.heldout_fraction}')
    _check(self.finetune_fraction > 0, 'finetune_fraction',
           f'must be positive, got {self.finetune_fraction}')
    try:   # A launcher passes a list of strings.
      steps = tuple(sorted({int(k) for k in self.ground_truth_steps}))
    except (TypeError, ValueError):
      raise ConfigError('ground_truth_steps',
                        f'must be integers, got {self.ground_truth_steps!r}') from None
    _check(all(0 < k < max(self.short_term_steps, 1) for k in steps), 'ground_truth_steps',
           f'must lie between 1 and short_term_steps - 1 = {self.short_term_steps - 1}, got '
           f'{list(steps)}')
    object.__setattr__(self, 'ground_truth_steps', steps)
    from ttmpd_jax.search import scoring  # The criteria registry (import cycle otherwise).
    scoring.CRITERIA.get(self.importance, field='importance')

  def replace(self, **changes: Any) -> 'SearchConfig':
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'SearchConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(field, message)
