"""How an iterative method judges its candidates: the only thing TT-MPD, NetAdapt and EagleEye
do differently (``loop.py`` is shared).

A judge answers four questions per iteration (see ``docs/method.md``):

* ``to_finetune``: which candidates get a short-term KD fine-tuning (costly, real accuracy);
* ``eligible``: which candidates may be chosen (all, unless the judge chooses from a shortlist);
* ``estimate``: each candidate's accuracy (and the current network's), from the two cheap
  variables ``v1`` (agreement with the cached pseudo labels after adaptive BN) and ``v2`` (KL
  to the teacher's soft labels) and from real accuracies where known;
* ``learn``: what it takes from fine-tuned candidates (TT-MPD refits its accuracy model).

Two attributes of a judge shape the choice (``loop.choose`` and ``loop.verify``):
``max_drop`` passes over candidates whose *estimated* accuracy loss exceeds it while another
candidate stays within it, and ``verify_limit`` > 0 checks the chosen candidate's *real* loss
after its short-term fine-tuning (paid anyway) against ``max_drop``, taking the next candidate
when it exceeds it (at most ``verify_limit`` times). Both are off (inf, 0) for the baselines.

A judge's state is JSON (``to_json`` / ``from_json``), part of the resumable search state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ttmpd_jax.search.config import SearchConfig
from ttmpd_jax.search.proxy import AccuracyModel, spearman


# Measured on the design half of the grid (seeds 0 and 1 of bench/results/
# benchmark_grid_v6_report.json, NetAdapt's 16 runs, every candidate short-term fine-tuned):
# the real accuracy a candidate loses is 0.27 of the agreement v1 it loses (least squares
# through the origin, candidates losing > 0.02 of v1), and the 95th percentile of the real loss
# of the candidates NetAdapt chose is 0.04.
PRIOR_SLOPE = 0.27
PRIOR_WEIGHT = 16.0   # The prior counts as many calibration points (a run fits on ~8).
MAX_DROP = 0.04
VERIFY_LIMIT = 2


@dataclasses.dataclass
class Judge:
  """Base judge: EagleEye's single variable, no fine-tuned candidates."""

  max_drop: float = dataclasses.field(default=float('inf'), init=False)
  verify_limit: int = dataclasses.field(default=0, init=False)

  def to_finetune(self, iteration: int, progress: float, v1: np.ndarray, v2: np.ndarray,
                  ranking: Callable[[], np.ndarray]) -> list[int]:
    """Indices of candidates to fine-tune; ``progress`` = latency removed / latency to remove;
    ``ranking()`` = candidate indices, best first by this judge's estimate (no real accuracy)."""
    del iteration, progress, v1, v2, ranking
    return []

  def eligible(self, real: np.ndarray) -> np.ndarray:
    """Which candidates may be chosen this iteration (``real``: NaN where not fine-tuned)."""
    return np.ones(len(real), bool)

  def estimate(self, v1: np.ndarray, v2: np.ndarray, real: np.ndarray, v1_cur: float,
               v2_cur: float) -> tuple[np.ndarray, float]:
    del v2, real, v2_cur
    return np.asarray(v1, float), float(v1_cur)

  def learn(self, iteration: int, v1: np.ndarray, v2: np.ndarray,
            real: np.ndarray) -> Optional[str]:
    """Takes the fine-tuned candidates' real accuracies (NaN where not fine-tuned)."""
    del iteration, v1, v2, real
    return None

  def to_json(self) -> dict[str, Any]:
    return {}

  def load_json(self, data: dict[str, Any]) -> None:
    del data


@dataclasses.dataclass
class NetAdaptJudge(Judge):
  """Fine-tunes every candidate and judges it by its real short-term accuracy."""

  def to_finetune(self, iteration, progress, v1, v2, ranking):
    return list(range(len(v1)))

  def estimate(self, v1, v2, real, v1_cur, v2_cur):
    return np.asarray(real, float), float(v1_cur)


@dataclasses.dataclass
class TTMPDJudge(Judge):
  """Â = f(v1, v2), fitted on candidates fine-tuned at a few points spread over the run.

  Design choices (measured in ``docs/method.md``):

  * *When to calibrate*: at the first iteration whose progress towards the latency target
    passes each of ``calibration_iterations`` evenly spaced levels (0, 1/n, 2/n, ...): the fit
    sees lightly and heavily pruned networks, not only first-iteration look-alikes.
  * *What is fitted*: only the *direction* of Â matters for selection (the intercept cancels in
    Â_current − Â_g and a positive scale does not change the argmin), so the model is fitted on
    within-iteration deviations (``proxy.AccuracyModel``).
  * ``calibration_candidates`` > 0 fine-tunes only that many candidates per calibration
    iteration, spread over the range of v1.
  * ``shortlist`` > 0 (method ``ttmpd_shortlist``): outside calibration, Â only *shortlists* —
    the ``shortlist`` candidates its criterion ranks best are short-term fine-tuned and the best
    of them by real accuracy is chosen (its fine-tuning is the one committed, so a shortlist of
    m costs m − 1 extra fine-tunings per iteration). Why: scored against an independent
    fine-tuning, Â = v1's pick loses about 0.4 pp per iteration to fine-tuning every candidate,
    a shortlist of 3 of 8 about 0.1 pp (``bench/bench_proxy.py``, selection). The shortlisted
    candidates' real accuracies also refit Â every iteration. Measured on the grid (7 cells of
    one seed) the gain did not reach the final accuracy, at 0.86× NetAdapt's time
    (``docs/method.md``): an option to compare, not the default.
  """

  calibration_iterations: int = 3
  calibration_candidates: int = 0
  shortlist: int = 0
  prior_slope: Optional[float] = None     # None: Â's scale as fitted (no shrinkage).
  prior_weight: float = PRIOR_WEIGHT
  model: AccuracyModel = dataclasses.field(default_factory=AccuracyModel)
  points: list[list[float]] = dataclasses.field(default_factory=list)   # [iteration, v1, v2, real]
  levels_done: int = 0
  out_of_sample: list[dict[str, float]] = dataclasses.field(default_factory=list)
  shortlisting: bool = False   # This iteration's fine-tuned candidates are a shortlist.

  @classmethod
  def create(cls, config: SearchConfig, shortlist: int = 0) -> 'TTMPDJudge':
    """TT-MPD as registered (``ttmpd``): Â's scale shrunk towards ``PRIOR_SLOPE`` and every
    pick checked against ``MAX_DROP`` (see :class:`TTMPDJudge` and ``docs/method.md``)."""
    judge = cls(config.calibration_iterations, config.calibration_candidates, shortlist,
                prior_slope=PRIOR_SLOPE)
    judge.max_drop, judge.verify_limit = MAX_DROP, VERIFY_LIMIT
    return judge

  @classmethod
  def unchecked(cls, config: SearchConfig) -> 'TTMPDJudge':
    """The earlier TT-MPD (``ttmpd_unchecked``): Â's scale as fitted, no check of the pick."""
    return cls(config.calibration_iterations, config.calibration_candidates)

  def _calibrating(self, progress: float) -> bool:
    n = self.calibration_iterations
    return self.levels_done < n and progress >= self.levels_done / max(n, 1) - 1e-9

  def to_finetune(self, iteration, progress, v1, v2, ranking):
    self.shortlisting = False
    if not self._calibrating(progress):
      if self.shortlist <= 0:
        return []
      picks = sorted(int(i) for i in ranking()[:self.shortlist])   # By Â, current Â included.
      self.shortlisting = True
      return picks
    order = list(np.argsort(v1))
    count = self.calibration_candidates
    if count <= 0 or count >= len(order):
      return order
    picks = np.linspace(0, len(order) - 1, count).round().astype(int)
    return sorted({order[i] for i in picks})

  def estimate(self, v1, v2, real, v1_cur, v2_cur):
    known = ~np.isnan(np.asarray(real, float))
    if len(real) and known.all():   # A calibration iteration fine-tuned them all.
      return np.asarray(real, float), float(v1_cur)
    accuracy = self.model.predict(v1, v2)
    if self.shortlisting:   # Chosen among the shortlist (``eligible``), by real accuracy.
      return np.where(known, real, accuracy), float(v1_cur)
    return accuracy, float(self.model.predict([v1_cur], [v2_cur])[0])

  def eligible(self, real):
    return ~np.isnan(real) if self.shortlisting else np.ones(len(real), bool)

  def learn(self, iteration, v1, v2, real):
    known = ~np.isnan(real)
    if not known.any():
      return None
    calibration = not self.shortlisting
    if calibration and self.model.fitted and known.sum() >= 3:   # Fitted before this iteration.
      self.out_of_sample.append({'iteration': iteration, 'ttmpd': spearman(
          self.model.predict(v1[known], v2[known]), real[known])})
    self.points += [[iteration, float(a), float(b), float(c)]
                    for a, b, c in zip(v1[known], v2[known], real[known])]
    self.levels_done += int(calibration)
    p = np.asarray(self.points)
    self.model = AccuracyModel.fit(p[:, 1], p[:, 2], p[:, 3], groups=p[:, 0])
    if self.prior_slope is not None:
      self.model = shrink_scale(self.model, p, self.prior_slope, self.prior_weight)
    return f'fitted {self.model.describe()} on {len(p)} fine-tuned candidates'

  def to_json(self):
    return {'model': self.model.to_json(), 'points': self.points, 'levels_done': self.levels_done,
            'out_of_sample': self.out_of_sample,
            'calibration_iterations': self.calibration_iterations,
            'calibration_candidates': self.calibration_candidates, 'shortlist': self.shortlist}

  def load_json(self, data):
    self.model = AccuracyModel.from_json(data['model'])
    self.points = [list(p) for p in data['points']]
    self.levels_done = int(data['levels_done'])
    self.out_of_sample = list(data.get('out_of_sample', []))


def shrink_scale(model: AccuracyModel, points: np.ndarray, prior_slope: float,
                 weight: float) -> AccuracyModel:
  """``model`` with its scale shrunk towards ``prior_slope`` accuracy per unit of v1.

  Design choice: the selection criterion divides an accuracy loss by a saving, so it needs Â's
  scale, and a scale fitted on eight within-iteration deviations ranged 0.10-0.41; the three
  runs with the smallest scales made the grid's three irreparable cuts. The fitted direction
  (form) is kept; its scale, expressed as the slope of Â on v1 over the calibration points
  (within-iteration deviations), becomes ``(n · fitted + weight · prior) / (n + weight)``.
  """
  v1, v2, groups = points[:, 1], points[:, 2], points[:, 0]
  dev = lambda x: x - np.array([x[groups == g].mean() for g in groups])
  x, a = dev(v1), dev(model.predict(v1, v2))
  fitted = float(x @ a / (x @ x)) if x @ x > 0 else 0.0
  if fitted <= 0:
    return model
  n = len(points)
  factor = (n * fitted + weight * prior_slope) / (n + weight) / fitted
  coef = model.coef.copy()
  coef[1:] *= factor
  coef[0] = float(np.mean(points[:, 3]) - coef[1] * v1.mean() - coef[2] * v2.mean())
  return dataclasses.replace(model, coef=coef)


def within_iteration_spearman(candidates: Sequence[dict[str, Any]],
                              model: Optional[AccuracyModel] = None) -> dict[str, Any]:
  """Median over iterations of the within-iteration Spearman with the real accuracies.

  ``candidates`` are candidate log rows (``iteration``, ``v1``, ``v2``, ``real``); iterations with
  fewer than 3 fine-tuned candidates are skipped. Reports ``v1``, ``v2`` (as −KL: higher = better)
  and, with ``model``, ``ttmpd`` (its Â), plus ``n_iterations``.
  """
  by_iteration: dict[int, list[dict[str, Any]]] = {}
  for c in candidates:
    if c.get('real') is not None:
      by_iteration.setdefault(int(c['iteration']), []).append(c)
  rhos: dict[str, list[float]] = {'v1': [], 'v2': [], 'ttmpd': []}
  for rows in by_iteration.values():
    if len(rows) < 3:
      continue
    v1 = np.array([r['v1'] for r in rows])
    v2 = np.array([r['v2'] for r in rows])
    real = np.array([r['real'] for r in rows])
    rhos['v1'].append(spearman(v1, real))
    rhos['v2'].append(spearman(-v2, real))
    if model is not None:
      rhos['ttmpd'].append(spearman(model.predict(v1, v2), real))
  out: dict[str, Any] = {'n_iterations': len(rhos['v1'])}
  for key, values in rhos.items():
    values = [v for v in values if not np.isnan(v)]
    if key != 'ttmpd' or model is not None:
      out[key] = float(np.median(values)) if values else None
  return out
