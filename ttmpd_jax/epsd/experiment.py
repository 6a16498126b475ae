"""The EPSD experiment: prune at initialisation with one of several criteria, then train.

One *run* = (method, sparsity, seed): initialise the model with ``seed``; score every prunable
weight with the method's criterion on a few training batches; keep a global unstructured mask at
``sparsity``; train the masked network (masks fixed) with plain cross-entropy or with PS-KD
self-distillation; evaluate top-1 accuracy on the test set. For a given seed every method starts
from the *same* initial weights and sees the same saliency batches and the same data order, so
methods differ only in their mask and their training objective.

Methods (``METHODS``; saliency criterion x training objective):

==============  =========================================  ===============================
name            mask (at initialisation)                   training
==============  =========================================  ===============================
dense           none                                       cross-entropy
dense_sd        none                                       PS-KD self-distillation
random          uniform random scores                      cross-entropy
random_sd       uniform random scores                      self-distillation
magnitude       |w|                                        cross-entropy
magnitude_sd    |w|                                        self-distillation
snip            |w ⊙ ∂L_CE/∂w| (SNIP)                      cross-entropy
snip_sd         |w ⊙ ∂L_CE/∂w|                             self-distillation
epsd            |w ⊙ ∂L_SD/∂w| (``saliency.sd_objective``)  self-distillation
epsd_ce         |w ⊙ ∂L_SD/∂w|                             cross-entropy (ablation)
==============  =========================================  ===============================

``time_s`` of a run is its wall time for scoring (shared across the sparsities of one seed and
counted in full for each), building the mask and training; evaluation is excluded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.fileio import write_json_atomic
from ttmpd_jax import checkpoint, train as train_lib
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.epsd import saliency, training
from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec, build_model
from ttmpd_jax.pruning import unstructured


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  saliency: Optional[str]  # A ``compute_scores`` criterion; None = dense (no pruning).
  self_distill: bool


METHODS: dict[str, Method] = {m.name: m for m in (
    Method('dense', None, False), Method('dense_sd', None, True),
    Method('random', 'random', False), Method('random_sd', 'random', True),
    Method('magnitude', 'magnitude', False), Method('magnitude_sd', 'magnitude', True),
    Method('snip', 'snip', False), Method('snip_sd', 'snip', True),
    Method('epsd', 'sd', True), Method('epsd_ce', 'sd', False),
)}
DEFAULT_METHODS = ('dense', 'dense_sd', 'random', 'magnitude', 'snip', 'snip_sd', 'epsd')
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95)
MASK_SCOPES = ('global', 'per_leaf')


@dataclasses.dataclass(frozen=True)
class EPSDConfig:
  """Everything that defines a sweep (recorded in the report; resuming requires equality).

  Attributes:
    spec: model to initialise (zoo ``ModelSpec``).
    methods, sparsities, seeds: the grid; dense methods run once per seed (sparsity 0).
    epochs, batch_size, learning_rate, weight_decay: training (SGD + Nesterov, cosine decay).
    sd_alpha: PS-KD's final weight α_T of the self-distillation target.
    saliency_alpha, saliency_temperature: α and τ of EPSD's SD saliency objective
      (``saliency.sd_objective``); ``saliency_alpha`` defaults to ``sd_alpha``.
    saliency_batches: number of training batches (of ``batch_size``) the gradient saliencies
      average over.
    mask_scope: 'global' (one ranking over all prunable weights) or 'per_leaf'.
    prune_head: whether the classifier head's kernel is prunable (default yes, see
      ``pruning.unstructured``).
    eval_batch_size: evaluation batch size.
  """

  spec: ModelSpec
  methods: tuple[str, ...] = DEFAULT_METHODS
  sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
  seeds: tuple[int, ...] = (0, 1, 2)
  epochs: float = 3.0
  batch_size: int = 128
  learning_rate: float = 0.1
  weight_decay: float = 5e-4
  sd_alpha: float = 0.8
  saliency_alpha: Optional[float] = None
  saliency_temperature: float = 4.0
  saliency_batches: int = 4
  mask_scope: str = 'global'
  prune_head: bool = True
  eval_batch_size: int = 500

  def validate(self) -> 'EPSDConfig':
    """Checks every field; raises ``UserError`` naming the offending setting."""
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown or not self.methods:
      raise UserError(f'EPSD methods: unknown or empty {unknown or list(self.methods)}; valid '
                      f'methods: {", ".join(METHODS)}')
    if len(set(self.methods)) != len(self.methods):
      raise UserError(f'EPSD methods: duplicates in {list(self.methods)}')
    if any(METHODS[m].saliency for m in self.methods) and not self.sparsities:
      raise UserError('EPSD sparsities: at least one sparsity is needed for pruned methods')
    for s in self.sparsities:
      unstructured.check_sparsity(s, 'EPSD sparsity')
    if len(set(self.sparsities)) != len(self.sparsities):
      raise UserError(f'EPSD sparsities: duplicates in {list(self.sparsities)}')
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise UserError(f'EPSD seeds: need at least one seed, without duplicates (got '
                      f'{list(self.seeds)})')
    if self.epochs <= 0 or self.batch_size <= 0 or self.learning_rate <= 0:
      raise UserError('EPSD training: epochs, batch_size and learning_rate must be positive')
    if self.weight_decay < 0:
      raise UserError(f'EPSD training: weight_decay must be >= 0, got {self.weight_decay}')
    for name, value in (('sd_alpha', self.sd_alpha), ('saliency_alpha', self.saliency_alpha)):
      if value is not None and not 0.0 <= value <= 1.0:
        raise UserError(f'EPSD {name}={value}: expected a weight in [0, 1]')
    if self.saliency_temperature <= 0:
      raise UserError(f'EPSD saliency_temperature={self.saliency_temperature}: must be positive')
    if self.saliency_batches <= 0:
      raise UserError(f'EPSD saliency_batches={self.saliency_batches}: must be positive')
    if self.mask_scope not in MASK_SCOPES:
      raise UserError(f'EPSD mask_scope={self.mask_scope!r}: expected one of {MASK_SCOPES}')
    return self

  def to_json(self) -> dict[str, Any]:
    data = dataclasses.asdict(self)
    data['spec'] = self.spec.to_json()
    for key in ('methods', 'sparsities', 'seeds'):
      data[key] = list(data[key])
    return data


# ------------------------------------------------------------------------------------------------
# Scoring.


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(model, image_shape: tuple[int, ...], key: jax.Array) -> dict[str, Any]:
  variables = model.init(key, jnp.zeros((1, *image_shape)), train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def init_variables(model, image_shape: tuple[int, ...], seed: int) -> dict[str, Any]:
  """Same values as ``train.init_variables``, compiled once per (model, shape) for a sweep."""
  return _init(model, tuple(image_shape), jax.random.key(seed))


def saliency_batches(train_set: Dataset, batch_size: int, count: int, seed: int) -> list[dict]:
  """The first ``count`` shuffled training batches (seeded) used by the gradient criteria."""
  if len(train_set) < batch_size:
    raise UserError(f'the training set ({len(train_set)} examples) is smaller than one batch '
                    f'({batch_size}); lower --batch_size or raise --train_limit')
  out = []
  for batch in pipeline.batches(train_set.images, train_set.labels, batch_size,
                                family=train_set.family, seed=10_007 + seed, drop_remainder=True):
    out.append({'image': batch['image'], 'label': batch['label']})
    if len(out) == count:
      break
  return out


def compute_scores(criterion: str, model, variables, batches: Sequence[dict], *, seed: int,
                   sd_alpha: float, temperature: float) -> Any:
  """Scores (tree like ``variables['params']``; higher = keep) of one criterion.

  Criteria (pluggable, add entries here): 'random', 'magnitude', 'snip' (cross-entropy
  saliency), 'sd' (EPSD: self-distillation saliency, ``saliency.sd_objective``).
  """
  params = variables['params']
  if criterion == 'random':
    return unstructured.random_scores(params, jax.random.key(seed + 424_242))
  if criterion == 'magnitude':
    return unstructured.magnitude_scores(params)
  if criterion == 'snip':
    return unstructured.gradient_saliency(saliency.ce_objective(model), params, batches)
  if criterion == 'sd':
    return unstructured.gradient_saliency(
        saliency.sd_objective(model, alpha=sd_alpha, temperature=temperature),
        params, batches)
  raise UserError(f'unknown saliency criterion {criterion!r}; expected random, magnitude, snip '
                  f'or sd')


def build_mask(scores: Any, sparsity: float, *, scope: str = 'global',
               prune_head: bool = True) -> Any:
  prunable = unstructured.default_prunable if prune_head else unstructured.kernels_except('head')
  fn = unstructured.global_mask if scope == 'global' else unstructured.per_leaf_mask
  return fn(scores, sparsity, prunable=prunable)


def kept_overlap(a: Any, b: Any) -> float:
  """Fraction of the weights kept by mask ``a`` that mask ``b`` keeps too."""
  kept = both = 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    kept += int(x.sum())
    both += int((x & y).sum())
  return both / kept if kept else 1.0


def pruned_nonzero(params: Any, masks: Any) -> int:
  """How many weights that ``masks`` prunes are not exactly zero in ``params`` (should be 0)."""
  count = 0
  flat_masks = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
  for m, w in zip(flat_masks, jax.tree.leaves(params)):
    if m is not None:
      count += int(np.count_nonzero(np.asarray(w)[~np.asarray(m)]))
  return count


# ------------------------------------------------------------------------------------------------
# Reports.


def summarise(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Mean ± std (sample std, ddof=1; 0 for a single seed) of accuracy per (method, sparsity)."""
  groups: dict[tuple[str, float], list[float]] = {}
  for r in runs:
    groups.setdefault((r['method'], float(r['sparsity'])), []).append(float(r['accuracy']))
  out = []
  for (method, sparsity), accs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    a = np.asarray(accs)
    out.append({'method': method, 'sparsity': sparsity, 'mean': float(a.mean()),
                'std': float(a.std(ddof=1)) if len(a) > 1 else 0.0, 'n': int(len(a))})
  return out


def ordering_claims(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per sparsity: does EPSD >= SNIP+SD >= SNIP hold (on means), with paired differences.

  Paired differences use the seeds common to both methods (same initialisation and data order).
  """
  by_key = {(r['method'], float(r['sparsity']), r['seed']): float(r['accuracy']) for r in runs}
  sparsities = sorted({float(r['sparsity']) for r in runs if r['method'] in
                       ('epsd', 'snip_sd', 'snip')})
  claims = []
  for s in sparsities:
    entry: dict[str, Any] = {'sparsity': s}
    means = {}
    for m in ('epsd', 'snip_sd', 'snip'):
      accs = [v for (mm, ss, _), v in by_key.items() if mm == m and ss == s]
      if accs:
        means[m] = float(np.mean(accs))
    entry['means'] = means
    for hi, lo in (('epsd', 'snip_sd'), ('snip_sd', 'snip'), ('epsd', 'snip')):
      seeds = sorted({k[2] for k in by_key if k[0] == hi and k[1] == s} &
                     {k[2] for k in by_key if k[0] == lo and k[1] == s})
      if not seeds:
        continue
      d = np.asarray([by_key[(hi, s, k)] - by_key[(lo, s, k)] for k in seeds])
      entry[f'{hi}_minus_{lo}'] = {'mean': float(d.mean()),
                                   'std': float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                                   'n': int(len(d)), 'wins': int((d > 0).sum()),
                                   'ties': int((d == 0).sum())}
      entry[f'{hi}_ge_{lo}'] = bool(means[hi] >= means[lo])
    if all(m in means for m in ('epsd', 'snip_sd', 'snip')):
      entry['epsd_ge_snip_sd_ge_snip'] = bool(means['epsd'] >= means['snip_sd'] >= means['snip'])
    claims.append(entry)
  return claims


def plot_accuracy_vs_sparsity(runs: Sequence[Mapping[str, Any]], path: str,
                              title: str = '') -> str:
  """Accuracy vs sparsity, mean ± std error bars per method; dense methods as bands. PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  summary = summarise(runs)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  methods = list(dict.fromkeys(r['method'] for r in summary))
  for i, method in enumerate(methods):
    rows = [r for r in summary if r['method'] == method]
    color = colors[i % len(colors)]
    if METHODS.get(method, Method(method, 'x', False)).saliency is None:
      r = rows[0]
      ax.axhline(r['mean'], color=color, linestyle='--' if method.endswith('_sd') else ':',
                 label=f'{method} ({r["mean"]:.3f})')
      ax.axhspan(r['mean'] - r['std'], r['mean'] + r['std'], color=color, alpha=0.12)
      continue
    x = np.asarray([100 * r['sparsity'] for r in rows])
    ax.errorbar(x, [r['mean'] for r in rows], yerr=[r['std'] for r in rows], marker='o',
                capsize=3, color=color, label=method)
  ax.set_xlabel('sparsity of the prunable weights (%)')
  ax.set_ylabel('test accuracy')
  ax.set_title(title or 'Pruning at initialisation: accuracy vs sparsity (mean ± std over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def format_summary(summary: Sequence[Mapping[str, Any]]) -> str:
  """A text table: one row per method, one column per sparsity, 'mean ± std' in percent."""
  sparsities = sorted({r['sparsity'] for r in summary})
  methods = list(dict.fromkeys(r['method'] for r in summary))
  cell = {(r['method'], r['sparsity']): f'{100 * r["mean"]:.2f} ± {100 * r["std"]:.2f}'
          for r in summary}
  header = ['method'] + [f'{100 * s:g}%' for s in sparsities]
  rows = [[m] + [cell.get((m, s), '') for s in sparsities] for m in methods]
  widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
  lines = ['  '.join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# The sweep.


def _run_key(method: str, sparsity: float, seed: int) -> str:
  return f'{method}_sp{sparsity:g}_seed{seed}'


def run_sweep(config: EPSDConfig, train_set: Dataset, test_set: Dataset, output_dir: str, *,
              save_checkpoints: bool = True, resume: bool = True, plot: bool = True,
              log_every: int = 0, extra_report: Optional[Mapping[str, Any]] = None,
              print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every (method, sparsity, seed) of ``config``; writes ``report.json`` and the plot.

  Args:
    config: the sweep (validated here).
    train_set: training data (all of it is used for training; saliency batches come from it).
    test_set: evaluation data (labels used only for the reported accuracy).
    output_dir: gets ``report.json`` (rewritten after every run), ``accuracy_vs_sparsity.png``
      and, if ``save_checkpoints``, one orbax checkpoint per run under ``checkpoints/epsd/``.
    resume: reuse the runs of an existing ``report.json`` whose config equals this one.
    extra_report: merged into the report (e.g. the launcher's flags).
  Returns:
    The report dict: ``config``, ``runs`` (one record per run: ``method``, ``sparsity``,
    ``accuracy``, ``seed``, ``time_s`` and diagnostics), ``summary`` (mean ± std),
    ``claims`` (EPSD >= SNIP+SD >= SNIP per sparsity), ``plot``.
  """
  config.validate()
  os.makedirs(output_dir, exist_ok=True)
  report_path = os.path.join(output_dir, 'report.json')
  plot_path = os.path.join(output_dir, 'accuracy_vs_sparsity.png')
  config_json = config.to_json()
  done: dict[str, dict[str, Any]] = {}
  if resume and os.path.exists(report_path):
    try:
      with open(report_path) as f:
        previous = json.load(f)
    except (OSError, ValueError):
      previous = {}
    if previous.get('mode') == 'epsd' and previous.get('config') == config_json:
      done = {_run_key(r['method'], r['sparsity'], r['seed']): r for r in previous.get('runs', [])}
      if done:
        print_fn(f'resuming: {len(done)} runs already in {report_path}')

  model = build_model(config.spec)
  predict = train_lib.make_predict(model)  # Compiled once for the whole sweep.
  sal_alpha = config.sd_alpha if config.saliency_alpha is None else config.saliency_alpha
  runs: list[dict[str, Any]] = []
  sweep_start = time.time()
  grid = [(seed, m, s) for seed in config.seeds for m in config.methods
          for s in ((0.0,) if METHODS[m].saliency is None else config.sparsities)]

  def write_report(final: bool) -> dict[str, Any]:
    report = {'mode': 'epsd', 'complete': final, 'config': config_json,
              'train_examples': len(train_set), 'test_set': test_set.name,
              'test_examples': len(test_set), 'runs': runs, 'summary': summarise(runs),
              'claims': ordering_claims(runs), 'sweep_time_s': time.time() - sweep_start,
              **dict(extra_report or {})}
    if final and plot and runs:
      report['plot'] = plot_accuracy_vs_sparsity(
          runs, plot_path, f'{config.spec.name} on {train_set.name}: pruning at init '
          f'(mean ± std, {len(config.seeds)} seeds)')
    write_json_atomic(report_path, report)
    return report

  for index, (seed, method_name, sparsity) in enumerate(grid):
    key = _run_key(method_name, sparsity, seed)
    if key in done:
      runs.append(done[key])
      continue
    method = METHODS[method_name]
    start = time.time()
    variables = init_variables(model, train_set.image_shape, seed)
    saliency_time = 0.0
    masks = unstructured.dense_masks(variables['params'])
    overlap = None
    if method.saliency is not None:
      # Scores depend on (criterion, seed) only: computing them per run keeps each run
      # self-contained (its time_s honest) at the price of recomputing a few gradients.
      batches = saliency_batches(train_set, config.batch_size, config.saliency_batches, seed)
      t0 = time.time()
      scores = jax.block_until_ready(compute_scores(
          method.saliency, model, variables, batches, seed=seed, sd_alpha=sal_alpha,
          temperature=config.saliency_temperature))
      masks = build_mask(scores, sparsity, scope=config.mask_scope, prune_head=config.prune_head)
      saliency_time = time.time() - t0
      t1 = time.time()
      if method.saliency != 'snip':
        snip_scores = compute_scores('snip', model, variables, batches, seed=seed,
                                     sd_alpha=sal_alpha, temperature=config.saliency_temperature)
        overlap = kept_overlap(masks, build_mask(snip_scores, sparsity, scope=config.mask_scope,
                                                 prune_head=config.prune_head))
      else:
        overlap = 1.0
      start += time.time() - t1  # The diagnostic is not part of the method's time.
    print_fn(f'[{index + 1}/{len(grid)}] {method_name} sparsity {sparsity:g} seed {seed}: '
             f'{"SD" if method.self_distill else "CE"} training '
             f'({unstructured.sparsity_of(masks):.4f} of prunable weights zeroed)')
    variables, summary = training.train_masked(
        model, variables, masks, train_set, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, seed=seed,
        sd_alpha=config.sd_alpha if method.self_distill else None, log_every=log_every,
        print_fn=print_fn)
    time_s = time.time() - start
    accuracy = train_lib.accuracy(model, variables, test_set, config.eval_batch_size, predict)
    zeroed, prunable = unstructured.mask_counts(masks)
    record: dict[str, Any] = {
        'method': method_name, 'sparsity': float(sparsity), 'accuracy': accuracy, 'seed': seed,
        'time_s': time_s, 'saliency': method.saliency, 'self_distill': method.self_distill,
        'achieved_sparsity': zeroed / prunable, 'zeroed_weights': zeroed,
        'prunable_weights': prunable,
        'pruned_weights_nonzero_after_training': pruned_nonzero(variables['params'], masks),
        'kept_overlap_with_snip': overlap, 'saliency_time_s': saliency_time,
        'train_time_s': summary['train_time_s'], 'steps': summary['steps'],
        'final_loss': summary['final_loss']}
    if save_checkpoints:
      path = os.path.join(output_dir, 'checkpoints', 'epsd', key)
      meta = checkpoint.CheckpointMeta(config.spec, train_set.image_shape, train_set.family,
                                       {'epsd_run': record, 'epsd_config': config_json})
      record['checkpoint'] = checkpoint.save(path, variables, meta, overwrite=True)
    print_fn(f'    accuracy {accuracy:.4f}  time {time_s:.1f} s  '
             f'(saliency {saliency_time:.1f} s, overlap with SNIP mask '
             f'{"-" if overlap is None else f"{overlap:.3f}"})')
    runs.append(record)
    write_report(final=False)
  return write_report(final=True)
