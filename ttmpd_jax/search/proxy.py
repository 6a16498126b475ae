"""The two cheap variables of TT-MPD and the approximated fine-tuned accuracy built from them.

Design choice (the paper's abstract names "two variables" without defining them): for a masked,
BN-adapted candidate evaluated on a held-out slice of the fine-tuning subset,

* ``v1`` = top-1 agreement with the teacher's cached pseudo labels (in [0, 1]);
* ``v2`` = mean KL(teacher soft labels || candidate soft labels) (nats, >= 0).

The approximated fine-tuned accuracy is linear, ``Â = a0 + a1 * v1 + a2 * v2`` with ``a1 >= 0``
and ``a2 <= 0`` (more agreement never lowers Â, more KL never raises it). How it is fitted is
described on :meth:`AccuracyModel.fit` and in ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

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


# Everything the candidate evaluator computes per candidate: the two variables, then diagnostic
# statistics recorded beside them (``candidate_statistics``) for offline study of the proxy
# (``bench/bench_proxy.py``); selection uses only the two variables.
STATISTICS = ('v1', 'v2', 'soft_agreement', 'margin', 'hard_ce')


def candidate_statistics(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """``[len(STATISTICS)]`` for logits [B, K]: ``agreement_and_kl``, then, against the teacher's
  top-1 class y: mean probability of y, mean logit margin of y over the best other class, and
  mean cross-entropy to y (smooth versions of v1, with less sampling noise than a 0/1 count)."""
  agree, kl = agreement_and_kl(student_logits, teacher_logits)
  y = jnp.argmax(teacher_logits, -1)
  logp = jax.nn.log_softmax(student_logits, -1)
  logp_y = jnp.take_along_axis(logp, y[:, None], -1)[:, 0]
  logit_y = jnp.take_along_axis(student_logits, y[:, None], -1)[:, 0]
  others = jnp.where(jax.nn.one_hot(y, student_logits.shape[-1], dtype=bool), -jnp.inf,
                     student_logits)
  margin = jnp.mean(logit_y - jnp.max(others, -1))
  return jnp.stack([agree, kl, jnp.mean(jnp.exp(logp_y)), margin, -jnp.mean(logp_y)])


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
    return float('nan')
  from scipy import stats
  return float(stats.spearmanr(a, b).statistic)


def _centred(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
  out = values.astype(float).copy()
  for g in np.unique(groups):
    out[groups == g] -= out[groups == g].mean(0)
  return out


def _nnls_weights(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  from scipy import optimize
  if not np.any(x):
    return np.array([1.0, 0.0])
  w, _ = optimize.nnls(x, y)
  return w if np.any(w) else np.array([1.0, 0.0])


# Candidate forms, as weights on the standardised features (v1, -v2); 'nnls' is fitted.
FORMS = {'v1': np.array([1.0, 0.0]), 'v2': np.array([0.0, 1.0]), 'equal': np.array([1.0, 1.0]),
         'nnls': None}
# Ties in the cross-validated score go to the simplest form, in this order. Design choice,
# measured: with 4 calibration candidates per iteration a within-iteration Spearman takes few
# values and the four forms tied in all 9 runs of the first grid cells; the tie then went to
# 'equal', while on NetAdapt's fully fine-tuned candidates v1 alone ranked at least as well.
SIMPLICITY = ('v1', 'v2', 'equal', 'nnls')


def _form_weights(form: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  fixed = FORMS[form]
  return _nnls_weights(x, y) if fixed is None else fixed


def _cv_score(form: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
  """Mean within-group Spearman of ``form`` when each group is predicted from the others."""
  scores = []
  for g in np.unique(groups):
    test = groups == g
    if test.sum() < 3:
      continue
    w = _form_weights(form, x[~test], y[~test])
    rho = spearman(x[test] @ w, y[test])
    if not np.isnan(rho):
      scores.append(rho)
  return float(np.mean(scores)) if scores else float('nan')


def _in_accuracy_units(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """``w`` rescaled so that ``x @ w`` is in the units of ``y``: the least-squares scale where it
  is positive, else the ratio of spreads. A positive scale never changes a ranking (the form
  fixes the direction); it makes the reported Â an accuracy, not a z-score sum."""
  pred = x @ w
  norm = float(pred @ pred)
  if norm == 0.0:
    return w
  alpha = float(pred @ y) / norm
  if alpha <= 0.0:
    alpha = float(y.std() / pred.std()) if y.std() > 0 else 1.0
  return alpha * w


@dataclasses.dataclass
class AccuracyModel:
  """``Â = coef[0] + coef[1] * v1 + coef[2] * v2``; before fitting, ``Â = v1`` (no calibration)."""

  coef: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.0, 1.0, 0.0]))
  fitted: bool = False
  num_points: int = 0
  form: str = 'v1'
  cv: Mapping[str, float] = dataclasses.field(default_factory=dict)

  @classmethod
  def fit(cls, v1: Sequence[float], v2: Sequence[float], accuracy: Sequence[float],
          groups: Optional[Sequence[int]] = None) -> 'AccuracyModel':
    """Fits Â on fine-tuned candidates; ``groups`` = the iteration of each point.

    Design choice: selection compares candidates *of one iteration*, so the fit uses
    within-iteration deviations (each iteration's means subtracted: a per-iteration intercept)
    on standardised features ``(v1, −v2)``. Four forms compete — v1 alone, v2 alone, equal
    weights, non-negative least squares — and the one with the best leave-one-iteration-out
    within-iteration Spearman wins, ties going to the simplest (``SIMPLICITY``); NNLS when
    fewer than two iterations have ≥ 3 points. The weights are scaled to accuracy units and
    the intercept maps Â back to the overall means, for reporting only.
    """
    v = np.stack([np.asarray(v1, float), -np.asarray(v2, float)], axis=1)
    y = np.asarray(accuracy, float)
    groups = np.zeros(len(y)) if groups is None else np.asarray(groups)
    xc, yc = _centred(v, groups), _centred(y, groups)
    scale = xc.std(0)
    scale[scale == 0] = 1.0
    xs = xc / scale
    usable = sum((groups == g).sum() >= 3 for g in np.unique(groups))
    cv = {f: _cv_score(f, xs, yc, groups) for f in FORMS} if usable >= 2 else {}
    valid = {f: s for f, s in cv.items() if not np.isnan(s)}
    form = max(valid, key=lambda f: (round(valid[f], 9), -SIMPLICITY.index(f))) if valid else (
        'nnls')
    w = _in_accuracy_units(_form_weights(form, xs, yc), xs, yc) / scale
    slopes = np.array([w[0], -w[1]])
    coef = np.array([y.mean() - slopes @ np.array([np.mean(v1), np.mean(v2)]), *slopes])
    return cls(coef, True, len(y), form, cv)

  def predict(self, v1, v2) -> np.ndarray:
    v1, v2 = np.asarray(v1, float), np.asarray(v2, float)
    return self.coef[0] + self.coef[1] * v1 + self.coef[2] * v2

  def describe(self) -> str:
    return (f'Â = {self.coef[0]:+.3f} {self.coef[1]:+.3f}·v1 {self.coef[2]:+.3f}·v2 '
            f'(form {self.form})')

  def to_json(self) -> dict[str, Any]:
    return {'coef': [float(c) for c in self.coef], 'fitted': self.fitted,
            'num_points': self.num_points, 'form': self.form,
            'cv': {k: (None if np.isnan(v) else float(v)) for k, v in self.cv.items()}}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'AccuracyModel':
    cv = {k: float('nan') if v is None else float(v) for k, v in data.get('cv', {}).items()}
    return cls(np.asarray(data['coef'], float), bool(data['fitted']),
               int(data.get('num_points', 0)), str(data.get('form', 'nnls')), cv)
