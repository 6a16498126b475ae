"""Whole-model latency prediction from in-context unit costs; measurement, correction, validation.

Model (``r`` is latency as a fraction of the unpruned model's, measured in the same rounds)::

  r(widths) = c + sum_u theta_u . phi_u(widths)       predict(widths) = anchor_ms * scale * r

``phi_u`` are unit ``u``'s cost features (G-MACs, output and input activation sizes; see
``latency.structure``) in the regime it runs in (see below), ``theta_u >= 0`` its per-feature
costs and ``c >= 0`` the rest (input handling, dispatch). ``anchor_ms`` is the unpruned model's
measured latency and ``scale`` a correction from fresh measurements (1 until one disagrees, see
:meth:`LatencyPredictor.correct`).

Design choices:

* **Units measured in context.** XLA fuses each layer with its neighbours (on CPU a YNNPACK
  region can cover a whole chain of layers and a layer costs 0.07-1.2x its isolated time
  depending on its consumers), so nothing is timed in isolation: ``theta`` is fitted on
  end-to-end measurements of the model itself, pruned to a *probe design*: the full model, each
  prunable group narrowed alone to 1/4, 1/2 and 3/4 of its channels ("group probes": they
  measure what a single-group pruning candidate saves, which is what the search compares),
  uniform prunings and random ones (they expose the interactions between groups: a layer's
  MACs are the product of its input and output group widths, which an additive per-group table
  gets wrong). A model with few groups has few group probes, so random ones fill its design up
  to ``MIN_PROBES``. What the fill buys, measured (``bench/bench_probe_design.py``: 52-58
  held-out random architectures, quiet 2-core host, noise floor 1.3-1.9%): little in the mean
  -- ResNet-8 5.5% MAPE with the 18 structured probes alone, 5.3% with 77 random ones added;
  VGG-small 3.6% and 3.5% --, more in the worst case (VGG-small's largest error 26-32% with
  24-60 random probes, 10% with 74; ResNet-8's 25-29% with 12-48, 18% with 77); the same model
  fitted on every measurement reaches 4.1% and 2.8% in-sample (the additive form's limit on
  that data). 96 probes keep the quickstart table's build near two minutes.
* **Regimes read from the compiled model.** The same layer costs very different amounts inside
  a library fusion region (YNNPACK on CPU) and as native code, and which one it gets depends on
  its channel counts (``latency.fusion``). Every probe's compiled HLO says which units ran where;
  each unit gets separate costs per regime (``fusion.split_by_regime``), and a rule learned from
  the probes predicts the regimes of any architecture without compiling.
* **Relative measurements.** Every probe is timed in rounds together with the unpruned model
  (``protocol.measure_relative``); the fit is on the per-round ratios, which background load
  barely moves, and the absolute level is one number (``anchor_ms``) that one fresh measurement
  of the unpruned model corrects. A group's rounds stop once they have taken
  ``ROUNDS_BUDGET_S`` (after at least three): models whose single call takes a second have
  little jitter relative to it, and ten rounds of them would dominate the table's build. Each
  timed call follows an untimed call of the same architecture (``protocol.measure_many``): the
  first call after another executable costs more, by an amount that depends on the company.
* **Shrinkage.** Each unit's costs are pulled (ridge, in relative terms) towards the costs shared
  by all units, so models with more units than probes stay well posed.
* **No stale bias.** Probes measured on a busy machine are flagged in the table and re-measured
  when the machine is quiet; :meth:`LatencyPredictor.verify` measures the unpruned model (and a
  few probes) afresh and refits when they disagree with the prediction beyond their noise,
  saying so.

``predict`` is NumPy over a handful of per-unit numbers: no tracing, no compilation, tens of
microseconds per call (200 us for MobileNetV2's 53 units).

Measured figures (MAPE, Spearman and single-group saving ranks per model, each beside its
measurement-noise floor, two consecutive runs, the host named) live in the README's latency
section and ``bench/results/latency_validation_cpu.json``, written by ``bench/bench_latency.py``;
they depend on the host, so they are not copied here.

Channel counts off multiples of 8 run slower kernels (CPU and GPU alike), so pruning in steps of
8 keeps the model's smooth features meaningful.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax import interrupt
from ttmpd_jax.latency import fusion, protocol
from ttmpd_jax.latency.structure import ModelStructure, Widths, round_channels, zoo_model
from ttmpd_jax.latency.table import (LatencyTable, TableError, entry_digest, load_average,
                                     utc_now)

PROBES_PER_GROUP = 3    # Group probes at 1/4, 1/2, 3/4 of the group's channels.
UNIFORM_KEEPS = (0.75, 0.5, 0.3)
DESIGN_SEED = 987_654
MIN_PROBES = 96         # Random probes fill the design up to this: few groups, few group probes.
RIDGE = 0.1             # Pull of each unit's costs towards the shared ones (relative units).
RIDGES = (0.01, 0.03, 0.1, 0.3)  # Candidates the cross-validation chooses the pull from.
CV_FOLDS = 5
LOADED_FOREIGN = 0.15   # Other processes took more than this share of the CPUs: 'loaded'.
CORRECTION_WEIGHT = 4.0  # Weight of a fresh measurement in a refit (a probe weighs 1).
GROUP_SIZE = 6          # Architectures timed together with the reference per round robin.
ROUNDS_BUDGET_S = 20.0  # Timed rounds of one group stop past this (``protocol.measure_many``).
COMPILE_WORKERS = max(1, min(GROUP_SIZE, os.cpu_count() or 1))  # Concurrent compilations.


@dataclasses.dataclass(frozen=True)
class Measured:
  """One end-to-end measurement of an architecture against the unpruned model (the teacher).

  Attributes:
    widths: the architecture.
    ms: its median latency.
    ratio: median over rounds of its time / the teacher's time in the same round.
    teacher_ms: the teacher's median latency in the same measurement.
    spread: IQR / median of the per-round ratios.
    foreign_load: CPU share other processes took meanwhile (None: unknown).
    loaded: other processes took more than ``LOADED_FOREIGN`` of the CPUs meanwhile.
    library: the units' regimes in the compiled architecture (``fusion.encode``), if known.
  """

  widths: Mapping[str, int]
  ms: float
  ratio: float
  teacher_ms: float
  spread: float
  foreign_load: Optional[float]
  loaded: bool
  library: Optional[str] = None

  def entry(self, source: str) -> dict[str, Any]:
    out = {'ms': self.ms, 'ratio': self.ratio, 'ref_ms': self.teacher_ms,
           'spread': self.spread, 'foreign_load': self.foreign_load,
           'loadavg': load_average(), 'loaded': self.loaded, 'source': source,
           'utc': utc_now()}
    if self.library is not None:
      out['library'] = self.library
    return out


@dataclasses.dataclass(frozen=True)
class Fit:
  """Fitted unit costs: ``ratio = constant + sum(theta * features)``.

  Attributes:
    theta: float [units, k] per-unit costs of their features (G-MACs, M output, M input
      elements; in each regime when the features are split by ``fusion.split_by_regime``).
    constant: the non-prunable rest, as a fraction of the unpruned model's latency.
    n: architectures fitted on.
    max_error: largest relative error on them.
  """

  theta: np.ndarray
  constant: float
  n: int
  max_error: float

  def ratio(self, features: np.ndarray) -> float:
    return float(self.constant + np.sum(self.theta * features))


def fit_costs(features: Sequence[np.ndarray], ratios: Sequence[float],
              weights: Optional[Sequence[float]] = None, ridge: float = RIDGE) -> Fit:
  """Non-negative least squares in relative error, each unit's costs shrunk to shared ones.

  Two steps: shared costs (3 numbers + constant) fitted on the summed features, then per-unit
  costs with a ridge term ``ridge * (theta_u - shared) / shared`` per unit and feature (``shared``
  floored at the cost that would explain a tenth of the latency).
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  f = np.stack([np.asarray(x, np.float64) for x in features])  # [n, units, 3]
  y = np.asarray(ratios, np.float64)
  w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
  if f.shape[0] != y.size or y.size == 0 or np.any(y <= 0):
    raise ValueError('need matching, non-empty features and positive ratios')
  n, units, k = f.shape
  rows = np.sqrt(w)[:, None] / y[:, None]
  shared_a = np.concatenate([f.sum(axis=1), np.ones((n, 1))], axis=1) * rows
  shared = optimize.lsq_linear(shared_a, np.sqrt(w), bounds=(0, np.inf), method='bvls').x
  a = np.concatenate([f.reshape(n, units * k), np.ones((n, 1))], axis=1) * rows
  b = np.sqrt(w)
  # A feature the shared fit does not use still gets a scale: the cost at which it would explain
  # a tenth of the latency (otherwise its per-unit costs would be pinned to zero).
  typical = 0.1 / np.maximum(f.sum(axis=1).mean(axis=0), 1e-12)
  prior = np.tile(np.maximum(shared[:k], typical), units)
  penalty = np.zeros((units * k, units * k + 1))
  penalty[np.arange(units * k), np.arange(units * k)] = ridge / prior
  a = np.concatenate([a, penalty])
  b = np.concatenate([b, np.full(units * k, ridge)])
  x = optimize.lsq_linear(a, b, bounds=(0, np.inf), method='bvls').x
  fit = Fit(x[:-1].reshape(units, k), float(x[-1]), n, 0.0)
  errors = [abs(fit.ratio(fi) - yi) / yi for fi, yi in zip(f, y)]
  return dataclasses.replace(fit, max_error=float(max(errors)))


def choose_ridge(features: Sequence[np.ndarray], ratios: Sequence[float],
                 weights: Optional[Sequence[float]] = None, candidates: Sequence[float] = RIDGES,
                 folds: int = CV_FOLDS) -> float:
  """The pull towards shared costs (``fit_costs``'s ``ridge``) with the smallest ``folds``-fold
  cross-validated relative error over the measured architectures (``RIDGE`` below ``2 * folds``).

  Design choice: splitting every unit's costs by regime doubles the unknowns; how hard to pull
  them towards the shared costs then depends on how many probes saw each regime, which differs
  per model, so the data chooses (fixed folds: the same table always gives the same choice).
  """
  y = np.asarray(ratios, np.float64)
  w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
  if y.size < 2 * folds or len(candidates) < 2:
    return RIDGE
  order = np.random.default_rng(0).permutation(y.size)
  errors = []
  for ridge in candidates:
    error = 0.0
    for k in range(folds):
      test = order[k::folds]
      train = np.setdiff1d(order, test)
      fit = fit_costs([features[i] for i in train], y[train], w[train], ridge)
      error += sum(w[i] * abs(fit.ratio(features[i]) - y[i]) / y[i] for i in test)
    errors.append(error)
  return float(candidates[int(np.argmin(errors))])


class LatencyPredictor:
  """Predicts the eval-mode latency (ms) of any pruned architecture of one traced model.

  Build with :meth:`from_model` (any model with ``.apply(variables, x, train=False)``) or
  :meth:`from_spec` (zoo models). Width specs map module paths to output channels (as
  ``models.widths_from_variables`` returns them); missing keys mean full width.
  """

  def __init__(self, structure: ModelStructure, table: LatencyTable, model: Any,
               variables: Any, round_to: int = 8, random_probes: Optional[int] = None,
               probes_per_group: int = PROBES_PER_GROUP, repeats: int = 10, warmup: int = 2,
               log: Optional[Callable[[str], None]] = None, fusion_aware: bool = True):
    self.structure = structure
    self.table = table
    self.model = model
    self.variables = variables
    self.round_to = int(round_to)
    self.random_probes = random_probes
    self.probes_per_group = int(probes_per_group)
    self.repeats, self.warmup = int(repeats), int(warmup)
    self.log = log or table.log
    self.fingerprint = self._fingerprint()
    self.fusion_aware = bool(fusion_aware)
    self.fit: Optional[Fit] = None
    self.rule = fusion.RegimeRule.native(len(structure.units))
    self.split = False        # Costs split by regime (some unit was seen in a library region).
    self._library: dict[str, Optional[str]] = {}   # key_of(widths) -> regimes when compiled.
    self._memo: dict[str, float] = {}

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def from_model(cls, model: Any, variables: Any, input_shape: Sequence[int],
                 table: LatencyTable, round_to: int = 8, dtype: str = 'float32',
                 random_probes: Optional[int] = None,
                 probes_per_group: int = PROBES_PER_GROUP, repeats: int = 10, warmup: int = 2,
                 build: bool = True, log: Optional[Callable[[str], None]] = None,
                 fusion_aware: bool = True) -> 'LatencyPredictor':
    """Predictor for ``model`` at ``input_shape`` (batch first), e.g. ``(256, 28, 28, 1)``.

    Traces the model once (``pruning.graph``), then (``build``) measures the probes the table
    lacks (nothing when cached) and fits. ``variables`` may be abstract (``jax.eval_shape``):
    latency does not depend on their values, so synthetic ones are timed then.
    """
    structure = ModelStructure.from_model(model, variables, input_shape, dtype)
    predictor = cls(structure, table, model, variables, round_to, random_probes,
                    probes_per_group, repeats, warmup, log, fusion_aware)
    if build:
      predictor.build()
    return predictor

  @classmethod
  def from_spec(cls, spec: Any, image_shape: Sequence[int], batch: int, table: LatencyTable,
                **kwargs: Any) -> 'LatencyPredictor':
    """:meth:`from_model` for the zoo model ``spec`` (a ``ModelSpec``) on [batch, *image_shape]."""
    model, variables = zoo_model(spec, image_shape)
    return cls.from_model(model, variables, (batch, *image_shape), table, **kwargs)

  def _fingerprint(self) -> str:
    s = self.structure
    layers = [(u.path, u.record.kind, u.record.input_shape[1:], u.record.output_shape[1:],
               u.record.c_in, u.record.c_out, u.record.kernel_size, u.record.strides,
               u.record.padding, u.record.feature_group_count) for u in s.units]
    groups = [(g.name, g.size, g.prunable) for g in s.groups]
    text = re.sub(r' at 0x[0-9a-fA-F]+', '', repr(self.model))[:2000]  # No object addresses.
    return entry_digest({'layers': layers, 'groups': groups, 'model': type(self.model).__name__,
                         'repr': text, 'protocol': protocol.PROTOCOL})

  def entry_key(self, widths: Optional[Widths]) -> str:
    shape = 'x'.join(map(str, self.structure.input_shape))
    return f'{self.fingerprint}|{shape}|{self.structure.dtype}|{self.structure.key_of(widths)}'

  # ---- probe design -------------------------------------------------------------------------
  def probe_counts(self, group: str) -> list[int]:
    """Channel counts the group probes narrow ``group`` to (below its full size)."""
    full = self.structure.sizes[group]
    step = self.round_to if full > self.round_to else 1
    n = self.probes_per_group
    counts = {round_channels(full * (i + 1) / (n + 1), full, step) for i in range(n)}
    return sorted(c for c in counts if 1 <= c < full)

  def design(self) -> list[dict[str, int]]:
    """The architectures measured to fit the predictor (see module docstring)."""
    base, random = self.design_parts()
    return base + random

  def design_parts(self) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """The design's structured part (the full model, group probes, uniform prunings) and its
    random fill, each without duplicates (a random probe equal to a structured one is dropped)."""
    s = self.structure
    base = [s.complete_widths()]
    for g in s.prunable:
      base += [s.group_widths(g, c) for c in self.probe_counts(g)]
    base += [s.uniform_widths(k, self.round_to) for k in UNIFORM_KEEPS]
    n_random = self.random_probes
    if n_random is None:   # Small models: their few group probes would leave the fit loose.
      n_random = max(8, len(s.prunable) // 2, MIN_PROBES - len(base))
    rng = np.random.default_rng(DESIGN_SEED)
    random = [s.random_widths(rng, self.round_to) for _ in range(n_random)]
    unique: dict[str, dict[str, int]] = {}
    for w in base:
      unique.setdefault(s.key_of(w), w)
    structured = len(unique)
    for w in random:
      unique.setdefault(s.key_of(w), w)
    widths = list(unique.values())
    return widths[:structured], widths[structured:]

  # ---- measuring ----------------------------------------------------------------------------
  def _concrete_variables(self) -> Any:
    self.variables = protocol.timeable_variables(self.variables)
    return self.variables

  def _input(self) -> jax.Array:
    s = self.structure
    return jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal(s.input_shape),
                                      jnp.dtype(s.dtype)))

  def _call(self, widths: Optional[Widths], x: jax.Array) -> tuple[Callable, tuple]:
    """The architecture compiled ahead of time with its arguments; records its regimes."""
    from ttmpd_jax import pruning  # pylint: disable=g-import-not-at-top
    s = self.structure
    kept = s.kept(widths)
    variables = self._concrete_variables()
    masks = {g: np.arange(s.sizes[g]) < kept[g] for g in s.prunable if kept[g] < s.sizes[g]}
    small = pruning.remove_channels(variables, s.groups, masks) if masks else variables
    small = jax.device_put(protocol.cast_floating(small, s.dtype))
    model = self.model
    compiled = jax.jit(lambda v, x: pruning.run_pruned(model, v, x, train=False)).lower(
        small, x).compile()
    if self.fusion_aware:
      self._library[s.key_of(widths)] = self._regimes_of(compiled)
    return compiled, (small, x)

  def _compile_all(self, widths_list: Sequence[Optional[Widths]], x: jax.Array) -> list[tuple]:
    """:meth:`_call` for each architecture, compiled concurrently (XLA compiles outside
    Python's lock); all compilation ends before any timing starts, so timings are unaffected."""
    self._concrete_variables()
    workers = min(len(widths_list), COMPILE_WORKERS)
    if workers <= 1:
      return [self._call(w, x) for w in widths_list]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return list(pool.map(lambda w: self._call(w, x), widths_list))

  def _regimes_of(self, compiled: Any) -> Optional[str]:
    try:
      text = compiled.as_text()
    except Exception:  # pylint: disable=broad-except  (a backend without HLO text: no regimes)
      return None
    if not text:
      return None
    paths = self.structure.paths
    return fusion.encode(fusion.library_units(text, paths), paths)

  def library_of(self, widths: Optional[Widths]) -> Optional[str]:
    """Regimes of the compiled architecture (``fusion.encode``): from its table entry, this
    process's compilations, or (an entry measured before regimes were recorded, a correction)
    compiled now and stored in its entry -- compiling only, never timing."""
    key = self.structure.key_of(widths)
    entry = self.table.get(self.entry_key(widths))
    if entry is not None and 'library' in entry:
      return entry['library']
    if key not in self._library:
      self._call(widths, self._input())
    code = self._library.get(key)
    if entry is not None and code is not None:
      self.table.put(self.entry_key(widths), {**entry, 'library': code})
    return code

  def measure(self, widths_list: Sequence[Optional[Widths]], repeats: Optional[int] = None,
              warmup: Optional[int] = None, reference: Optional[Widths] = None
              ) -> list[Measured]:
    """Measures each architecture end to end, interleaved with the unpruned model (teacher).

    Nothing is cached; each result carries its ratio to the teacher timed in the same rounds,
    the machine's load and whether it counts as ``loaded``. ``reference`` replaces the teacher
    (e.g. the current network, to measure what candidates save relative to it).
    """
    s = self.structure
    repeats = self.repeats if repeats is None else int(repeats)
    warmup = self.warmup if warmup is None else int(warmup)
    x = self._input()
    ref = self._call(reference, x)
    out: list[Measured] = []
    for lo in range(0, len(widths_list), GROUP_SIZE):
      part = list(widths_list[lo:lo + GROUP_SIZE])
      results = protocol.measure_relative(ref, self._compile_all(part, x), repeats, warmup,
                                          ROUNDS_BUDGET_S)
      for w, r in zip(part, results):
        spread = r.ratio_iqr / r.ratio
        # Only other processes make a measurement 'loaded': a wide spread on a quiet machine
        # is the device's own noise, and re-measuring would not remove it.
        loaded = r.foreign_load is not None and r.foreign_load > LOADED_FOREIGN
        out.append(Measured(s.complete_widths(w), r.ms, r.ratio, r.reference.median_ms,
                            spread, r.foreign_load, loaded, self._library.get(s.key_of(w))))
    return out

  def build(self) -> int:
    """Measures the design's missing probes (and re-measures 'loaded' ones when the machine is
    quiet), saves the table, fits. Returns how many probes were measured (0 when cached)."""
    design = self.design()
    keys = [self.entry_key(w) for w in design]
    todo = set(self.table.missing(keys))
    stale = [k for k in self.table.stale(keys) if k not in todo]
    if stale:
      load = protocol.foreign_load(0.5)
      if load is not None and load <= LOADED_FOREIGN:
        self.log(f'  latency table: re-measuring {len(stale)} probes measured on a busy '
                 f'machine (the machine is quiet now)')
        todo.update(stale)
    widths = [w for w, k in zip(design, keys) if k in todo]
    if widths:
      start = time.perf_counter()
      loaded = 0
      reference_ms: list[float] = []
      for lo in range(0, len(widths), 4 * GROUP_SIZE):
        interrupt.check()   # The probes measured so far are saved (below).
        part = widths[lo:lo + 4 * GROUP_SIZE]
        for m in self.measure(part):
          self.table.put(self.entry_key(m.widths), m.entry('probe'))
          loaded += m.loaded
          reference_ms.append(m.teacher_ms)
        self.table.measured += len(part)
        if self.table.path:
          self.table.save()
        self.log(f'  latency table: {min(lo + len(part), len(widths))}/{len(widths)} probes '
                 f'measured ({time.perf_counter() - start:.1f} s)')
      low, high = min(reference_ms), max(reference_ms)
      self.table.builds.append({'utc': utc_now(), 'model': self.fingerprint,
                                'probes': len(widths), 'loaded': loaded,
                                'seconds': round(time.perf_counter() - start, 2),
                                'reference_ms': [round(low, 4), round(high, 4)]})
      if loaded:
        self.log(f'  warning: {loaded} of {len(widths)} probes were measured on a busy machine '
                 f'(flagged; re-measured when it is quiet)')
      # A quiet host can still change speed for minutes at a time, and not uniformly (a clock
      # change slows compute-bound kernels more than memory-bound ones), so ratios to the
      # unpruned model do not cancel it: its range over the build is the size of that risk.
      shift = (high - low) / float(np.median(reference_ms))
      self.log(f'  latency table: the unpruned model took {low:.2f}-{high:.2f} ms across these '
               f'rounds ({100 * shift:.0f}% apart: when the host changed speed meanwhile, '
               'ratios carry errors of up to that size)')
      self.table.models[self.fingerprint] = {
          **self.table.models.get(self.fingerprint, {}), 'description': self.structure.describe()}
      if self.table.path:
        self.table.save()
    self.refit()
    if widths:
      self.log(f'  latency model: {self.regimes()}')
    return len(widths)

  # ---- fitting ------------------------------------------------------------------------------
  def _model_entries(self) -> list[tuple[str, dict[str, Any]]]:
    prefix = self.entry_key(None).rsplit('|', 1)[0] + '|'
    return sorted((k, e) for k, e in self.table.entries.items() if k.startswith(prefix))

  def refit(self, only: Optional[Sequence[Optional[Widths]]] = None) -> Fit:
    """Fits the regime rule and the unit costs on every measurement of this model in the table
    (``only``: on those of these architectures alone, e.g. a part of the design).

    With ``fusion_aware``, each measured architecture's regimes (``library_of``) split its
    features, and ``fusion.RegimeRule`` learns to predict them; the pull towards shared costs
    is cross-validated (``choose_ridge``) when the probes change and kept in the table's model
    record, so a correction refits with the same pull.
    """
    entries = self._model_entries()
    if only is not None:
      keep = {self.entry_key(w) for w in only}
      entries = [(k, e) for k, e in entries if k in keep]
    full_key = self.entry_key(None)
    if full_key not in self.table.entries:
      raise TableError(f'latency table {self.table.path or "(in memory)"} has no measurement of '
                      'this model; build the predictor (LatencyPredictor.from_model)')
    s = self.structure
    widths_list, ratios, weights = [], [], []
    for key, e in entries:
      kept = [int(c) for c in key.rsplit('|', 1)[1].split(',') if c]
      widths_list.append(s.widths_of(dict(zip(s.prunable, kept))))
      ratios.append(float(e['ratio']))
      weights.append(CORRECTION_WEIGHT if e.get('source') == 'correction' else 1.0)
    feats = [s.features(w) for w in widths_list]
    self.rule, self.split = fusion.RegimeRule.native(len(s.units)), False
    if self.fusion_aware:
      known = [e.get('library') for _, e in entries]
      codes = [self.library_of(w) for w in widths_list]
      if codes != known and self.table.path:
        self.table.save()    # Regimes compiled now are kept: the next refit compiles nothing.
      if all(c is not None for c in codes):
        library = np.stack([fusion.decode(c) for c in codes])
        if library.any():
          channels = [s.channels(w) for w in widths_list]
          self.rule = fusion.RegimeRule.fit(np.array([c for c, _ in channels]),
                                            np.array([c for _, c in channels]), library)
          self.split = True
          feats = [fusion.split_by_regime(f, lib) for f, lib in zip(feats, library)]
    self.fit = fit_costs(feats, ratios, weights, self._ridge(feats, ratios, weights, entries))
    self._memo.clear()
    return self.fit

  def _ridge(self, feats: list[np.ndarray], ratios: list[float], weights: list[float],
             entries: list[tuple[str, dict[str, Any]]]) -> float:
    info = self.table.models.get(self.fingerprint, {})
    basis = [sum(e.get('source') != 'correction' for _, e in entries), int(self.split)]
    if info.get('ridge_for') == basis:
      return float(info['ridge'])
    ridge = choose_ridge(feats, ratios, weights)
    self.table.models[self.fingerprint] = {**info, 'ridge': ridge, 'ridge_for': basis}
    return ridge

  def regimes(self) -> str:
    """One line on what the regime rule learned (for logs)."""
    if not self.split:
      return 'one regime (no unit ran inside a library fusion region)'
    switching = [t for t in self.rule.thresholds if t is not None]
    library = sum(1 for t, c in zip(self.rule.thresholds, self.rule.constant) if t is None and c)
    shared = sorted(set(switching))
    return (f'{len(switching)} of {len(self.rule.thresholds)} units switch between a library '
            f'fusion region and native code with their width (library above '
            f'{"/".join(map(str, shared))} channels), {library} always in a library region')

  @property
  def anchor_ms(self) -> float:
    """Latency of the unpruned model: its latest measurement (a correction or the probe)."""
    info = self.table.models.get(self.fingerprint, {})
    if 'anchor_ms' in info:
      return float(info['anchor_ms'])
    return float(self.table.entries[self.entry_key(None)]['ms'])

  @property
  def scale(self) -> float:
    return float(self.table.models.get(self.fingerprint, {}).get('scale', 1.0))

  # ---- prediction ---------------------------------------------------------------------------
  def predict_ratio(self, widths: Optional[Widths] = None) -> float:
    """Predicted latency as a fraction of the unpruned model's (before ``scale``)."""
    if self.fit is None:
      self.refit()
    key = self.structure.key_of(widths)
    value = self._memo.get(key)
    if value is None:
      features = self.structure.features(widths)
      if self.split:
        features = fusion.split_by_regime(
            features, self.rule.predict(*self.structure.channels(widths)))
      value = self.fit.ratio(features)
      self._memo[key] = value
    return value

  def predict(self, widths: Optional[Widths] = None) -> float:
    """Predicted end-to-end latency (ms) of the architecture ``widths`` (missing keys: full)."""
    ratio = self.predict_ratio(widths)
    return self.anchor_ms * self.scale * ratio

  def saving(self, widths_before: Optional[Widths], widths_after: Widths) -> float:
    """Predicted latency saved (ms) by going from ``widths_before`` to ``widths_after``."""
    return self.predict(widths_before) - self.predict(widths_after)

  # ---- keeping it honest --------------------------------------------------------------------
  def correct(self, widths: Optional[Widths], measured_ms: float,
              teacher_ms: Optional[float] = None, spread: float = 0.0) -> bool:
    """Takes a fresh measurement into account; returns True when the predictor changed.

    Args:
      widths: the measured architecture.
      measured_ms: its measured latency.
      teacher_ms: the unpruned model's latency measured alongside (e.g. ``Measured.teacher_ms``);
        without it, only an overall scale can be corrected.
      spread: relative spread of the measurement (its noise).

    When the prediction is off by more than the noise (``max(3 * spread, 3%)``), the measurement
    is stored in the table (replacing any cached one of the same architecture), the unit costs
    are refitted with it weighted ``CORRECTION_WEIGHT``, the unpruned model's latency is
    re-anchored to ``teacher_ms``, and any error left is absorbed by ``scale``; this is logged.
    """
    predicted = self.predict(widths)
    tolerance = max(3.0 * spread, 0.03)
    if abs(predicted - measured_ms) <= tolerance * measured_ms:
      return False
    info = dict(self.table.models.get(self.fingerprint, {}))
    if teacher_ms is not None:
      ratio = measured_ms / teacher_ms
      entry = {'ms': measured_ms, 'ratio': ratio, 'ref_ms': teacher_ms, 'spread': spread,
               'foreign_load': None, 'loadavg': load_average(), 'loaded': False,
               'source': 'correction', 'utc': utc_now()}
      if self.structure.key_of(widths) != self.structure.key_of(None):
        self.table.put(self.entry_key(widths), entry)
      info['anchor_ms'] = float(teacher_ms)
      info['scale'] = 1.0
      self.table.models[self.fingerprint] = info
      self.refit()
    after = self.predict(widths)
    if abs(after - measured_ms) > tolerance * measured_ms:
      info = dict(self.table.models.get(self.fingerprint, {}))
      info['scale'] = self.scale * measured_ms / after
      self.table.models[self.fingerprint] = info
    self.log(f'  latency model refitted: predicted {predicted:.2f} ms, measured '
             f'{measured_ms:.2f} ms ({100 * (predicted - measured_ms) / measured_ms:+.1f}%, noise '
             f'{100 * tolerance:.0f}%); now predicts {self.predict(widths):.2f} ms')
    if self.table.path:
      self.table.save()
    return True

  def verify(self, extra: int = 2, repeats: Optional[int] = None) -> bool:
    """Measures the unpruned model and ``extra`` probes afresh; corrects if they disagree.

    Returns True when the predictor was refitted. This is the check against stale tables
    (built on a busy machine, or on another day): a few seconds of measurement.
    """
    design = self.design()
    picks = [design[len(design) * (i + 1) // (extra + 1)] for i in range(extra)] if extra else []
    results = self.measure(picks, repeats=repeats) if picks else []
    teacher = results[0].teacher_ms if results else self.measure([None], repeats)[0].teacher_ms
    changed = False
    if abs(self.predict(None) - teacher) > 0.03 * teacher:
      changed |= self.correct(None, teacher, teacher)
    for m in results:
      changed |= self.correct(m.widths, m.ms, m.teacher_ms, m.spread)
    return changed

  def calibrate(self, verify: bool = True) -> Fit:
    """Builds what is missing, fits, and (``verify``) checks against a fresh measurement."""
    self.build()
    if verify:
      self.verify()
    return self.fit


# ---- validation --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Validation:
  """Predicted vs measured values over a set of architectures (ms, ratios or savings)."""

  predicted: tuple[float, ...]
  measured: tuple[float, ...]

  @property
  def mape(self) -> float:
    """Mean absolute percentage error, in percent."""
    p, m = np.asarray(self.predicted), np.asarray(self.measured)
    return float(100.0 * np.mean(np.abs(p - m) / np.abs(m)))

  @property
  def max_ape(self) -> float:
    p, m = np.asarray(self.predicted), np.asarray(self.measured)
    return float(100.0 * np.max(np.abs(p - m) / np.abs(m)))

  @property
  def spearman(self) -> float:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    if len(self.measured) < 2:
      return float('nan')
    return float(stats.spearmanr(self.predicted, self.measured).statistic)

  def summary(self) -> str:
    return (f'n={len(self.measured)}  MAPE {self.mape:.2f}%  (max {self.max_ape:.1f}%)  '
            f'Spearman {self.spearman:.3f}')


def validate(predictor: LatencyPredictor, widths_list: Sequence[Widths],
             repeats: Optional[int] = None) -> tuple[Validation, list[Measured]]:
  """Measures each architecture afresh and compares its latency with ``predictor.predict``.

  Design choice: measured milliseconds are ``ratio to the teacher x the teacher's latency``
  with the teacher measured alongside, and the predictor is anchored to the same teacher
  measurement first (:meth:`LatencyPredictor.correct`), so a load change since the table was
  built does not masquerade as a prediction error, nor hide one.
  """
  measured = predictor.measure(widths_list, repeats=repeats)
  teacher = float(np.median([m.teacher_ms for m in measured]))
  predictor.correct(None, teacher, teacher)
  predicted = tuple(predictor.predict(w) for w in widths_list)
  return Validation(predicted, tuple(m.ratio * teacher for m in measured)), measured


def random_architectures(structure: ModelStructure, n: int, round_to: int, seed: int = 0,
                         min_keep: float = 0.25, min_channels: int = 0) -> list[dict[str, int]]:
  """``n`` distinct random pruned architectures (see ``ModelStructure.random_widths``).

  Half prune every group independently; the other half prune only a random subset of groups
  (what an iterative pruner's intermediate architectures look like).
  """
  rng = np.random.default_rng(seed)
  out: list[dict[str, int]] = []
  keys = {structure.key_of(None)}
  attempts = 0
  while len(out) < n and attempts < 50 * n:
    attempts += 1
    widths = structure.random_widths(rng, round_to, min_keep, min_channels=min_channels)
    if len(out) % 2 and structure.prunable:
      kept = structure.kept(widths)
      for g, reset in zip(structure.prunable, rng.random(len(structure.prunable)) < 0.5):
        if reset:
          kept[g] = structure.sizes[g]
      widths = structure.widths_of(kept)
    key = structure.key_of(widths)
    if key not in keys:
      keys.add(key)
      out.append(widths)
  return out


__all__ = ['Fit', 'LatencyPredictor', 'Measured', 'Validation', 'choose_ridge', 'fit_costs',
           'random_architectures', 'validate']
