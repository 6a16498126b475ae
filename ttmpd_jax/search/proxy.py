"""The two cheap variables of TT-MPD and the approximated fine-tuned accuracy built from them.

Design choice (the paper's abstract names "two variables" without defining them): for a masked,
BN-adapted candidate evaluated on a held-out slice of the fine-tuning subset,

* ``v1`` = top-1 agreement with the teacher's cached pseudo labels (in [0, 1]);
* ``v2`` = mean KL(teacher soft labels || candidate soft labels) (nats, >= 0).

The approximated fine-tuned accuracy is ``Â = a0 + a1 * v1 + a2 * v2``, fitted by least squares
on a few calibration candidates that *are* short-term fine-tuned. Both pieces are pluggable: any
callable ``(v1, v2) -> Â`` with ``fit``/``predict`` can replace ``LinearAccuracyModel``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def agreement_and_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> tuple[jax.Array,
                                                                                   jax.Array]:
  """``(v1, v2)`` for logits [B, K]: top-1 agreement and mean KL(teacher || student)."""
  agree = jnp.mean(jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1))
  teacher_logp = jax.nn.log_softmax(teacher_logits, -1)
  student_logp = jax.nn.log_softmax(student_logits, -1)
  kl = jnp.mean(jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), -1))
  return agree, kl


@dataclasses.dataclass
class LinearAccuracyModel:
  """``Â = coef[0] + coef[1] * v1 + coef[2] * v2``; before fitting, ``Â = v1`` (no calibration).

  Design choice: the fit is least squares *constrained to the monotone directions* — more
  agreement never lowers Â (``coef[1] >= 0``) and more KL never raises it (``coef[2] <= 0``).
  Calibration candidates of one iteration are similar to each other, so an unconstrained fit on
  a handful of points can give KL a positive weight and then rank a badly damaged candidate first
  by extrapolation; the constraint rules that out. Solved exactly as non-negative least squares
  on centred features ``(v1, -v2)``, with a free intercept.
  """

  coef: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.0, 1.0, 0.0]))
  fitted: bool = False
  num_points: int = 0

  def fit(self, v1: Sequence[float], v2: Sequence[float],
          accuracy: Sequence[float]) -> 'LinearAccuracyModel':
    from scipy import optimize
    features = np.stack([np.asarray(v1, float), -np.asarray(v2, float)], axis=1)
    y = np.asarray(accuracy, float)
    mean_x, mean_y = features.mean(0), y.mean()
    slopes, _ = optimize.nnls(features - mean_x, y - mean_y)
    coef = np.array([mean_y - slopes @ mean_x, slopes[0], -slopes[1]])
    return LinearAccuracyModel(coef, True, len(y))

  def predict(self, v1, v2) -> np.ndarray:
    v1, v2 = np.asarray(v1, float), np.asarray(v2, float)
    return self.coef[0] + self.coef[1] * v1 + self.coef[2] * v2

  def to_json(self) -> dict:
    return {'coef': [float(c) for c in self.coef], 'fitted': self.fitted,
            'num_points': self.num_points}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
    return float('nan')
  from scipy import stats
  return float(stats.spearmanr(a, b).statistic)
