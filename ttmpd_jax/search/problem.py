"""What every method shares on one shifted test set: the prepared pruning problem.

``prepare`` does the per-dataset work once (optional test-time BN adaptation of the teacher, the
fine-tuning subset S, the teacher's pseudo labels computed **once**, the held-out split and the
adaptive-BN batches); every method then runs on the same :class:`Problem`, with the same budgets.
The model may be any Flax model the channel-group analysis follows: :class:`Resizable` runs it at
whatever widths its variables have, so no method needs to rebuild it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Protocol

import jax
import numpy as np

from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.distill import bn_adapt, cache as cache_lib
from ttmpd_jax.pruning.run import run_pruned
from ttmpd_jax.search.config import ConfigError, SearchConfig
from ttmpd_jax.search.evaluation import SearchData

Log = Callable[[str], None]
Widths = Mapping[str, int]


class LatencyModel(Protocol):
  """What the search needs of a latency predictor (``ttmpd_jax.latency.LatencyPredictor``)."""

  def predict(self, widths: Optional[Widths] = None) -> float:
    """Predicted latency (ms) of an architecture (module path -> output channels)."""


@dataclasses.dataclass(frozen=True)
class Resizable:
  """``model`` run at the widths of the variables it is given (``pruning.run_pruned``).

  Exposes ``apply`` with the Flax calling convention, so everything in the library that calls
  ``model.apply(variables, x, train=...)`` works on physically pruned variables of any model.
  """

  model: Any

  def apply(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    return run_pruned(self.model, variables, *args, **kwargs)

  def __call__(self, variables: Mapping[str, Any], x: Any) -> Any:
    """Eval-mode forward, the plain-function form ``discover_groups`` traces."""
    return self.apply(variables, x, train=False)


@dataclasses.dataclass
class Problem:
  """Shared inputs of every method on one shifted test set."""

  model: Resizable
  teacher_variables: Any         # The teacher every method prunes (BN-adapted when configured).
  source_variables: Any          # The model as given (reference rows start from it).
  image_shape: tuple[int, ...]
  dataset: Dataset               # The test samples (labels, if any, are never read here).
  cache: cache_lib.PseudoLabelCache
  data: SearchData
  latency: LatencyModel
  latency_batch: int
  pseudo_labels_s: float
  latency_table_s: float = 0.0

  @property
  def teacher(self) -> tuple[Any, Any]:
    return self.model, self.teacher_variables


def _split(ids: np.ndarray, config: SearchConfig, cache: cache_lib.PseudoLabelCache,
           dataset: Dataset) -> SearchData:
  order = np.random.default_rng(config.seed + 1).permutation(len(ids))
  n_heldout = max(2, int(round(config.heldout_fraction * len(ids))))
  heldout, train_rows = np.sort(order[:n_heldout]), np.sort(order[n_heldout:])
  images = pipeline.normalize(dataset.images[cache.ids], dataset.family)
  bn_batch = min(config.bn_batch_size, len(train_rows))
  stream = np.random.default_rng(config.seed + 2).permutation(
      np.resize(train_rows, max(config.bn_batches, 1) * bn_batch))
  bn_images = images[stream].reshape(max(config.bn_batches, 1), bn_batch, *images.shape[1:])
  return SearchData(images[train_rows], cache.logits[train_rows], images[heldout],
                    cache.logits[heldout], bn_images)


def prepare(model: Any, variables: Any, dataset: Dataset, config: SearchConfig, *,
            latency: LatencyModel, latency_batch: int, latency_table_s: float = 0.0,
            log: Log = print) -> Problem:
  """Selects S, pseudo-labels it once with the teacher, splits it, stacks adaptive-BN batches.

  With ``config.teacher_bn_adapt`` the teacher's BatchNorm statistics are first re-estimated on
  the (unlabeled) test samples: that adapted teacher labels S and is what every method prunes.
  Its cost is counted in ``pseudo_labels_s``.
  """
  model = model if isinstance(model, Resizable) else Resizable(model)
  source_variables = jax.device_get(variables)
  start = time.time()
  if config.teacher_bn_adapt:
    variables = bn_adapt.teacher_bn_adapt(model, variables, dataset, seed=config.seed)
    log(f'teacher BatchNorm statistics adapted to {dataset.name} in {time.time() - start:.1f}s')
  size: Any = config.finetune_fraction
  size = int(size) if size > 1 else float(size)
  ids = cache_lib.select_subset(len(dataset), size, config.seed)
  if len(ids) < 4:
    raise ConfigError('finetune_fraction', f'the fine-tuning subset has {len(ids)} samples; '
                      'need at least 4 (raise it)')
  cache = cache_lib.build_cache(model, variables, dataset, ids, print_fn=log)
  data = _split(ids, config, cache, dataset)
  return Problem(model, jax.device_get(variables), source_variables, tuple(dataset.image_shape),
                 dataset, cache, data, latency, latency_batch, time.time() - start,
                 latency_table_s)


def unlabeled_dataset(images: np.ndarray, name: str = 'unlabeled') -> Dataset:
  """A :class:`Dataset` of already normalised float images (or uint8 scaled to [0, 1])."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ConfigError('unlabeled_images', f'expected [N, H, W, C] images, got shape '
                      f'{images.shape}')
  if images.dtype != np.uint8 and not np.all(np.isfinite(images)):
    raise ConfigError('unlabeled_images', 'contain NaN or Inf values')
  images = images if images.dtype == np.uint8 else images.astype(np.float32)
  return Dataset(name, images, np.zeros(len(images), np.int32), family='identity')
