"""Budgets and knobs shared by TT-MPD and every baseline (one harness, same budgets)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ttmpd_jax.errors import UserError

ITERATIVE_METHODS = ('ttmpd', 'netadapt', 'eagleeye')
ONE_SHOT_METHODS = ('halp', 'uniform')
REFERENCE_METHODS = ('teacher', 'teacher_bn')
METHODS = ITERATIVE_METHODS + ONE_SHOT_METHODS + REFERENCE_METHODS
KD_MODES = ('cached', 'online')


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Every budget of a pruning run.

  Attributes:
    latency_target: final latency as a fraction of the teacher's latency, in (0, 1).
    r0, decay: iteration k asks for a predicted saving of ``r0 * L0 * decay**(k-1)`` (NetAdapt).
    round_to: kept channel counts are multiples of this (unless a group is smaller).
    max_iterations: safety stop of the iterative loop.
    finetune_fraction: size of the fine-tuning subset S as a fraction of the test set (or an
      absolute count when > 1).
    heldout_fraction: part of S held out to compute v1/v2 and short-term accuracies.
    bn_batches, bn_batch_size: adaptive-BN batches (of S) per candidate evaluation.
    calibration_iterations: TT-MPD fine-tunes candidates of this many first iterations to fit Â.
    calibration_candidates: how many candidates per calibration iteration (0: all).
    short_term_steps, long_term_steps: KD steps per short-term / final fine-tuning.
    short_term_lr, long_term_lr: their SGD learning rates (constant / cosine).
    batch_size: KD batch size.
    temperature, hard_weight: KD loss (see ``distill.losses.kd_loss``).
    kd: 'cached' (pseudo labels computed once) or 'online' (teacher on every batch).
    importance: channel importance inside a group ('l2', 'l1', 'bn_gamma', 'taylor', 'random').
    seed: subset selection, data order, random importance.
  """

  latency_target: float = 0.5
  r0: float = 0.1
  decay: float = 0.96
  round_to: int = 4
  max_iterations: int = 40
  finetune_fraction: float = 0.1
  heldout_fraction: float = 0.25
  bn_batches: int = 4
  bn_batch_size: int = 128
  calibration_iterations: int = 1
  calibration_candidates: int = 0
  short_term_steps: int = 30
  long_term_steps: int = 300
  short_term_lr: float = 0.01
  long_term_lr: float = 0.01
  batch_size: int = 128
  temperature: float = 1.0
  hard_weight: float = 0.0
  kd: str = 'cached'
  importance: str = 'l2'
  seed: int = 0

  def __post_init__(self):
    if not 0.0 < self.latency_target < 1.0:
      raise UserError(f'--latency_target must lie strictly between 0 and 1 (a fraction of the '
                      f'teacher latency), got {self.latency_target}')
    if not 0.0 < self.r0 <= 1.0 or not 0.0 < self.decay <= 1.0:
      raise UserError(f'--r0 and --decay must lie in (0, 1], got {self.r0} and {self.decay}')
    if self.round_to < 1:
      raise UserError(f'--round_to must be >= 1, got {self.round_to}')
    if self.kd not in KD_MODES:
      raise UserError(f'--kd must be one of {", ".join(KD_MODES)}, got {self.kd!r}')
    for name in ('short_term_steps', 'long_term_steps', 'bn_batches', 'calibration_iterations',
                 'calibration_candidates'):
      if getattr(self, name) < 0:
        raise UserError(f'--{name} must be >= 0, got {getattr(self, name)}')
    for name in ('bn_batch_size', 'batch_size', 'max_iterations'):
      if getattr(self, name) <= 0:
        raise UserError(f'--{name} must be positive, got {getattr(self, name)}')
    if not 0.0 < self.heldout_fraction < 1.0:
      raise UserError(f'--heldout_fraction must lie in (0, 1), got {self.heldout_fraction}')
    if self.finetune_fraction <= 0:
      raise UserError(f'--finetune_fraction must be positive, got {self.finetune_fraction}')

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_method(method: str) -> str:
  if method not in METHODS:
    raise UserError(f'unknown method {method!r}; valid methods: {", ".join(METHODS)}')
  return method
