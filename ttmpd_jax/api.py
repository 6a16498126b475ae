"""``ttmpd_jax.prune``: TT-MPD (or any registered method) on your own Flax model.

    result = ttmpd_jax.prune(model, variables, unlabeled_images, latency_target=0.5)
    result.variables        # physically smaller
    result.apply(x)         # runs the pruned network
    result.widths, result.report

``model`` is a Flax linen module called as ``model.apply(variables, x, train=...)`` or an
``nnx.Module`` (then ``variables`` may be ``None``: they are split from the module). Channel
groups, the latency model and the cost count all come from tracing *this* model; the method runs
as in ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from ttmpd_jax.search.config import ConfigError, SearchConfig
from ttmpd_jax.search.harness import MethodReport, run_method
from ttmpd_jax.search.problem import Resizable, prepare, unlabeled_dataset



def default_latency_cache() -> str:
  """``$TTMPD_JAX_CACHE/latency``, default ``~/.cache/ttmpd_jax/latency``."""
  root = os.environ.get('TTMPD_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                            'ttmpd_jax')
  return os.path.join(root, 'latency')


@dataclasses.dataclass(frozen=True)
class LatencyConfig:
  """How the latency model is built and how networks are measured.

  Attributes:
    batch: batch size latency is predicted and measured at (inference batch of the deployment).
    round_to: channel step of the latency table (None: the search's ``round_to``).
    cache_dir: where latency tables are cached (keyed by device, versions and flags); None:
      :func:`default_latency_cache`.
    calibrate: fit the predictor to end-to-end measurements of a few architectures.
    fusion: cost every layer separately inside and outside the compiler's library fusion
      regions (``latency.fusion``); False: one cost per layer feature.
  """

  batch: int = 256
  round_to: Optional[int] = None
  cache_dir: Optional[str] = None
  calibrate: bool = True
  fusion: bool = True


@dataclasses.dataclass
class PruneResult:
  """A pruned network: ``variables`` are physically smaller than the input model's."""

  model: Any                 # The input model (linen) or its NNX adapter; runs any widths.
  variables: Any
  widths: dict[str, int]
  report: MethodReport
  masks: dict[str, np.ndarray]   # Over the input model's channel groups: True = kept.

  def apply(self, x: Any, train: bool = False) -> Any:
    """The pruned network's outputs (eval mode by default)."""
    return Resizable(self.model).apply(self.variables, x, train=train)

  def to_nnx(self) -> Any:
    """For NNX inputs: a real ``nnx.Module`` of the pruned sizes."""
    if not hasattr(self.model, 'to_module'):
      raise TypeError('to_nnx() is for NNX models; linen results run with apply()')
    return self.model.to_module(self.variables)


def as_traceable(model: Any, variables: Any) -> tuple[Any, Any]:
  """``(model with a linen-style apply, variables dict)`` for linen or NNX inputs."""
  from flax import nnx
  if isinstance(model, nnx.Module):
    from ttmpd_jax.pruning.nnx import from_nnx
    adapter, split = from_nnx(model)
    return adapter, split if variables is None else variables
  if variables is None:
    raise ConfigError('variables', 'a linen model needs its variables ({"params", '
                      '"batch_stats"}); pass variables=model.init(...) or an nnx.Module')
  return model, {k: v for k, v in dict(variables).items()}


def build_latency_model(model: Any, variables: Any, image_shape: tuple[int, ...],
                        latency: LatencyConfig, round_to: int,
                        log: Callable[[str], None] = print) -> Any:
  """A latency predictor for ``model`` on this device (table cached under ``cache_dir``)."""
  from ttmpd_jax.latency.predictor import LatencyPredictor
  from ttmpd_jax.latency.table import LatencyTable
  table = LatencyTable.open(cache_dir=latency.cache_dir or default_latency_cache(), log=log)
  predictor = LatencyPredictor.from_model(
      model, variables, (latency.batch, *image_shape), table,
      round_to=latency.round_to or round_to, fusion_aware=latency.fusion)
  if latency.calibrate:
    predictor.calibrate()
  table.save()
  return predictor


def prune(model: Any, variables: Any, unlabeled_images: np.ndarray, *,
          latency_target: float = 0.5, method: str = 'ttmpd',
          config: Optional[SearchConfig] = None, latency: Any = None,
          latency_config: LatencyConfig = LatencyConfig(), work_dir: Optional[str] = None,
          log: Callable[[str], None] = print) -> PruneResult:
  """Prunes ``model`` at test time to ``latency_target`` of its measured latency.

  Args:
    model, variables: a linen module and its ``{'params', 'batch_stats'}``, or an NNX module
      (``variables=None``).
    unlabeled_images: float [N, H, W, C] test samples, normalised as the model expects (or
      uint8, scaled to [0, 1]). Labels are never needed.
    latency_target: final measured latency as a fraction of the input model's, in (0, 1).
    method: a registered method (``ttmpd_jax.search.methods.METHODS``).
    config: every other budget (``SearchConfig``); its ``latency_target`` is replaced.
    latency: a ready latency model (``predict(widths) -> ms``); built for this device if None.
    latency_config: how to build and measure latency when ``latency`` is None.
    work_dir: optional folder for resumable state (a killed call re-run resumes).
    log: progress lines.
  """
  from ttmpd_jax.search.methods import METHODS
  config = (config or SearchConfig()).replace(latency_target=latency_target)
  METHODS.get(method)
  model, variables = as_traceable(model, variables)
  variables = jax.device_get(variables)
  dataset = unlabeled_dataset(unlabeled_images)
  if latency is None:
    latency = build_latency_model(model, variables, dataset.image_shape, latency_config,
                                  config.round_to, log)
  problem = prepare(model, variables, dataset, config, latency=latency,
                    latency_batch=latency_config.batch, log=log)
  report, pruned, record = run_method(method, problem, config, work_dir=work_dir, log=log)
  return PruneResult(model, pruned, report.widths, report, record.masks)
