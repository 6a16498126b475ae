"""One harness for TT-MPD and every baseline: same data, teacher, latency table, seed, budgets.

``prepare`` does the per-dataset work every method shares (the fine-tuning subset S, the
teacher's pseudo labels computed once, the held-out split, adaptive-BN batches);
``run_method`` prunes, fine-tunes and measures one method and returns its report row.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from ttmpd_jax import train
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.distill import bn_adapt, cache as cache_lib, finetune as finetune_lib
from ttmpd_jax.latency import protocol
from ttmpd_jax.latency.compilations import CompilationCounter
from ttmpd_jax.models import ModelSpec, build_model, widths_from_variables
from ttmpd_jax.models.inspect import count_flops_and_params
from ttmpd_jax.pruning.graph import discover_groups
from ttmpd_jax.pruning.surgery import remove_channels
from ttmpd_jax.search import oneshot
from ttmpd_jax.search.config import ITERATIVE_METHODS, ONE_SHOT_METHODS, SearchConfig, \
    check_method
from ttmpd_jax.search.evaluation import SearchData
from ttmpd_jax.search.iterative import iterative_prune
from ttmpd_jax.search.resume import IterationStore
from ttmpd_jax.search.scoring import make_scorer

Log = Callable[[str], None]


@dataclasses.dataclass
class Prepared:
  """Shared inputs of every method on one shifted test set."""

  spec: ModelSpec
  teacher: Any                  # Flax module.
  teacher_variables: Any
  image_shape: tuple[int, ...]
  dataset: Dataset              # The shifted test set (labels used only for reporting).
  cache: cache_lib.PseudoLabelCache
  data: SearchData
  pseudo_labels_s: float
  latency_batch: int
  source_variables: Any         # The unadapted source model (reference rows start from it).


def prepare(spec: ModelSpec, teacher_variables: Any, dataset: Dataset, config: SearchConfig, *,
            latency_batch: int, teacher_bn_adapt: bool = False, log: Log = print) -> Prepared:
  """Selects S, pseudo-labels it once with the teacher, splits it and stacks adaptive-BN batches.

  With ``teacher_bn_adapt`` the teacher's BatchNorm statistics are first re-estimated on the
  (unlabeled) shifted test set: that adapted teacher labels S and is what every method prunes.
  Its cost is counted in ``pseudo_labels_s``.
  """
  teacher = build_model(spec)
  source_variables = jax.device_get(teacher_variables)
  start = time.time()
  if teacher_bn_adapt:
    teacher_variables = bn_adapt.teacher_bn_adapt(teacher, teacher_variables, dataset,
                                                  seed=config.seed)
    log(f'teacher BatchNorm statistics adapted to {dataset.name} in {time.time() - start:.1f}s')
  size: Any = config.finetune_fraction
  size = int(size) if size > 1 else float(size)
  ids = cache_lib.select_subset(len(dataset), size, config.seed)
  if len(ids) < 4:
    raise cache_lib.CacheError(f'the fine-tuning subset has {len(ids)} samples; need at least 4 '
                               '(raise --finetune_fraction)')
  cache = cache_lib.build_cache(teacher, teacher_variables, dataset, ids, print_fn=log)
  pseudo_labels_s = time.time() - start
  order = np.random.default_rng(config.seed + 1).permutation(len(ids))
  n_heldout = max(2, int(round(config.heldout_fraction * len(ids))))
  heldout, train_rows = np.sort(order[:n_heldout]), np.sort(order[n_heldout:])
  images = pipeline.normalize(dataset.images[cache.ids], dataset.family)
  bn_batch = min(config.bn_batch_size, len(train_rows))
  stream = np.random.default_rng(config.seed + 2).permutation(
      np.resize(train_rows, max(config.bn_batches, 1) * bn_batch))
  bn_images = images[stream].reshape(max(config.bn_batches, 1), bn_batch, *images.shape[1:])
  data = SearchData(images[train_rows], cache.logits[train_rows], images[heldout],
                    cache.logits[heldout], bn_images)
  return Prepared(spec, teacher, jax.device_get(teacher_variables), tuple(dataset.image_shape),
                  dataset, cache, data, pseudo_labels_s, latency_batch, source_variables)


def measure_against_teacher(prepared: Prepared, model: Any, variables: Any,
                            repeats: int = 15) -> tuple[float, float]:
  """``(teacher ms, model ms)`` measured together (interleaved), eval mode, batch of the table."""
  shape = (prepared.latency_batch, *prepared.image_shape)
  teacher_t, model_t = protocol.measure_models(
      [(prepared.teacher, prepared.teacher_variables), (model, variables)], shape,
      repeats=repeats, warmup=2)
  return teacher_t.median_ms, model_t.median_ms


def _long_term(prepared: Prepared, model: Any, variables: Any, config: SearchConfig,
               checkpoint_dir: Optional[str], log: Log) -> tuple[Any, float]:
  if config.long_term_steps <= 0:
    return variables, 0.0
  start = time.time()
  teacher = (prepared.teacher, prepared.teacher_variables) if config.kd == 'online' else None
  variables, _ = finetune_lib.finetune(
      model, variables, prepared.dataset, steps=config.long_term_steps,
      batch_size=min(config.batch_size, len(prepared.cache)), learning_rate=config.long_term_lr,
      seed=config.seed, cache=prepared.cache, teacher=teacher, ids=prepared.cache.ids,
      temperature=config.temperature, hard_weight=config.hard_weight, schedule='cosine',
      checkpoint_dir=checkpoint_dir, log_every=max(config.long_term_steps // 5, 1),
      print_fn=lambda s: log(f'  long-term KD: {s}'))
  return variables, time.time() - start


def run_method(method: str, prepared: Prepared, config: SearchConfig, *,
               predict_ms: Callable[[Mapping[str, int]], float], latency_table_s: float,
               work_dir: Optional[str] = None, eval_batch_size: int = 500,
               trajectory_eval_limit: Optional[int] = 2000, log: Log = print
               ) -> tuple[dict[str, Any], ModelSpec, Any]:
  """Runs one method end to end; returns ``(report row, pruned spec, pruned variables)``.

  ``work_dir`` (optional) holds the per-iteration resume state and long-term KD checkpoints.
  """
  check_method(method)
  start = time.time()
  times = {'pseudo_labels': prepared.pseudo_labels_s, 'latency_table': latency_table_s,
           'search': 0.0, 'short_term_ft': 0.0, 'long_term_ft': 0.0}
  spec, variables = prepared.spec, prepared.teacher_variables
  if method in ('teacher', 'teacher_bn'):
    variables = prepared.source_variables  # References: the source model as given.
  extra: dict[str, Any] = {}
  compilations: list[int] = []
  online = (prepared.teacher, prepared.teacher_variables) if config.kd == 'online' else None
  if method in ITERATIVE_METHODS:
    store = IterationStore(os.path.join(work_dir, 'iterations')) if work_dir else None
    outcome = iterative_prune(method, spec=spec, variables=variables,
                              image_shape=prepared.image_shape, data=prepared.data,
                              predict_ms=predict_ms, config=config, online_teacher=online,
                              store=store, log=log)
    if store is not None:
      store.close()
    spec, variables = outcome.spec, outcome.variables
    times['search'] += outcome.times.get('search', 0.0)
    times['short_term_ft'] += outcome.times.get('short_term_ft', 0.0)
    compilations = outcome.compilations_per_iteration
    extra.update(trajectory=outcome.trajectory, reached_target=outcome.reached_target,
                 message=outcome.message, candidates=outcome.candidates,
                 resumed_from=outcome.resumed_from)
    if outcome.proxy is not None:
      extra['spearman'] = outcome.proxy['spearman']
      extra['proxy'] = outcome.proxy
    snapshots = outcome.snapshots
  elif method in ONE_SHOT_METHODS:
    counter = CompilationCounter()
    with counter:
      t0 = time.time()
      model = build_model(spec)
      groups = discover_groups(model, variables, np.zeros((1, *prepared.image_shape), np.float32))
      full = widths_from_variables(variables)
      target_ms = config.latency_target * predict_ms(full)
      if method == 'uniform':
        scores = make_scorer(config.importance, model, groups, prepared.data,
                             seed=config.seed)(variables)
        counts, ratio, reached = oneshot.uniform_counts(groups, full, predict_ms, target_ms,
                                                        config.round_to)
        extra['keep_ratio'] = ratio
      else:
        scores = make_scorer('taylor', model, groups, prepared.data, seed=config.seed)(variables)
        counts, reached = oneshot.knapsack_counts(groups, scores, full, predict_ms, target_ms,
                                                  config.round_to)
      masks = oneshot.masks_for_counts(scores, groups, counts)
      variables = jax.device_get(remove_channels(variables, groups, masks))
      spec = spec.with_widths_of(variables)
      times['search'] += time.time() - t0
    compilations = [counter.count]
    extra.update(reached_target=reached, message='latency target reached' if reached else
                 'latency target unreachable with this round_to; using the smallest network')
    snapshots = []
  else:
    snapshots = []
  model = build_model(spec)
  if method == 'teacher_bn':
    t0 = time.time()
    variables = bn_adapt.teacher_bn_adapt(model, variables, prepared.dataset,
                                          seed=config.seed)
    times['search'] += time.time() - t0
  elif method not in ('teacher',):
    ckpt = os.path.join(work_dir, 'long_term') if work_dir else None
    variables, times['long_term_ft'] = _long_term(prepared, model, variables, config, ckpt, log)
  run_s = time.time() - start
  teacher_ms, measured_ms = measure_against_teacher(prepared, model, variables)
  accuracy = train.accuracy(model, variables, prepared.dataset, eval_batch_size)
  macs, params = count_flops_and_params(model, variables, prepared.image_shape)
  prune_finetune_s = times['search'] + times['short_term_ft'] + times['long_term_ft']
  times['total'] = sum(v for k, v in times.items() if k != 'total')
  row = {
      'method': method, 'kd': config.kd, 'dataset': prepared.dataset.name,
      'accuracy': accuracy, 'latency_ms_measured': measured_ms,
      'latency_ms_predicted': predict_ms(widths_from_variables(variables)),
      'latency_ms_teacher_measured': teacher_ms, 'latency_ratio': measured_ms / teacher_ms,
      'latency_target': config.latency_target if method not in ('teacher', 'teacher_bn') else 1.0,
      'flops': macs, 'params': params, 'time_s': times, 'prune_finetune_s': prune_finetune_s,
      'wall_s': run_s,
      'compilations': {'total': int(sum(compilations)), 'per_iteration': compilations,
                       'max_per_iteration': int(max(compilations, default=0))},
      'widths': widths_from_variables(variables), **extra,
  }
  if snapshots and trajectory_eval_limit != 0:
    subset = prepared.dataset.take(trajectory_eval_limit)
    accuracies = {k: train.accuracy(build_model(s), v, subset, eval_batch_size)
                  for k, s, v in snapshots}
    for point in row['trajectory']:
      point['accuracy_short_term'] = accuracies.get(point['iteration'])
  log(f'[{method}/{config.kd}] accuracy {accuracy:.4f}  latency {measured_ms:.2f} ms measured '
      f'({measured_ms / teacher_ms:.3f} of teacher {teacher_ms:.2f} ms; predicted '
      f'{row["latency_ms_predicted"]:.2f})  prune+fine-tune {prune_finetune_s:.1f}s')
  return row, spec, variables
