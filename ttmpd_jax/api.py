"""``ttmpd_jax.prune``: TT-MPD (or any registered method) on your own Flax model.

    result = ttmpd_jax.prune(model, variables, unlabeled_images, latency_target=0.5)
    result.variables        # physically smaller
    result.apply(x)         # runs the pruned network
    result.widths, result.report

``model`` is a Flax linen module called as ``model.apply(variables, x, train=...)`` or an
``nnx.Module`` (then ``variables`` may be ``None``: they are split from the module). Channel
groups, the latency model and the cost count all come from tracing *this* model; the method runs
as in ``docs/method.md``.

Fault policy: every argument is checked before any long work (latency table, BN adaptation,
pseudo labels, search) by :func:`check_inputs`: type checks, then abstract traces only
(``jax.eval_shape``, nothing computed; well under a second for small models) — the model on two of
the images, its own ``init`` to compare ``variables`` with, one channel-group discovery. Every
mistake raises a :class:`~ttmpd_jax.errors.UserError` (a ``ConfigError`` whose
``field`` is the argument, or a ``SearchConfig`` field) whose one-line message names the argument
and the fix.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttmpd_jax.errors import UserError, one_line
from ttmpd_jax.pruning.nnx import NNXModel, _mutable_collections
from ttmpd_jax.search.config import ConfigError, SearchConfig
from ttmpd_jax.search.harness import MethodReport, run_method
from ttmpd_jax.search.problem import Resizable, prepare, unlabeled_dataset

Logits = Union[None, int, str, Callable[[Any], Any]]


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
  if isinstance(model, nnx.Module):
    from ttmpd_jax.pruning.nnx import from_nnx
    adapter, split = from_nnx(model)
    return adapter, split if variables is None else _variables_dict(variables)
  if variables is None:
    raise ConfigError('variables', 'a linen model needs its variables ({"params", '
                      '"batch_stats"}); pass variables=model.init(...) or an nnx.Module')
  return model, _variables_dict(variables)


def _variables_dict(variables: Any) -> dict[str, Any]:
  if not isinstance(variables, Mapping):
    raise ConfigError('variables', f'must be a dict of variable collections ({{"params": ..., '
                      f'"batch_stats": ...}}), got {type(variables).__name__}; pass the output '
                      'of model.init(...) or your trained variables')
  if 'params' not in variables:
    keys = ', '.join(map(str, list(variables)[:4]))
    raise ConfigError('variables', f'has no "params" collection (its keys: {keys}); pass the '
                      'whole variables dict ({"params": ..., "batch_stats": ...}, e.g. '
                      'model.init(...)), not variables["params"]')
  return dict(variables)


# ----------------------------------------------------------------------------------------------
# Models whose output is a tuple or dict: ``logits=`` picks the [N, classes] array.


def _logits_picker(logits: Logits) -> Callable[[Any], Any]:
  if callable(logits):
    return logits
  if isinstance(logits, (bool, np.bool_)) or not isinstance(logits, (numbers.Integral, str)):
    raise ConfigError('logits', f'must be an int index, a dict key or a callable '
                      f'output -> logits, got {logits!r}')
  if isinstance(logits, str):
    key = logits
    return lambda out: out[key] if isinstance(out, Mapping) else getattr(out, key)
  index = int(logits)
  return lambda out: out[index]


class LogitsOf(nn.Module):
  """A linen model whose output is ``pick(inner(x, ...))``, with ``inner``'s variables as they are.

  ``nn.share_scope`` puts ``inner`` in this module's scope, so the variable collections keep
  ``inner``'s structure exactly (no extra ``inner`` level): the same variables run both, and
  every layer is still intercepted (``run_pruned``) and traced (``discover_groups``).
  """

  inner: nn.Module
  pick: Callable[[Any], Any]

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, x: Any, train: bool = False, **kwargs: Any) -> Any:
    return self.pick(self.inner(x, train=train, **kwargs))


class NNXLogitsOf(NNXModel):
  """An NNX adapter (``pruning.from_nnx``) whose ``apply`` returns ``pick(output)``.

  ``to_module`` still gives the user's own module (with its original outputs).
  """

  def __init__(self, adapter: NNXModel, pick: Callable[[Any], Any]):
    # pylint: disable-next=super-init-not-called (the adapter's state is copied, not rebuilt)
    self.__dict__.update(adapter.__dict__)
    self._pick = pick

  def apply(self, variables: Mapping[str, Any], *args: Any, mutable: Any = False,
            **kwargs: Any) -> Any:
    out = super().apply(variables, *args, mutable=mutable, **kwargs)
    if _mutable_collections(mutable):   # (output, updated collections)
      return self._pick(out[0]), out[1]
    return self._pick(out)


def with_logits(model: Any, logits: Logits) -> Any:
  """``model`` (linen module or NNX adapter) returning only its logits (``logits=`` of
  :func:`prune`); ``model`` itself when ``logits`` is None."""
  if logits is None:
    return model
  pick = _logits_picker(logits)
  if isinstance(model, nn.Module):
    return LogitsOf(model, pick)
  if isinstance(model, NNXModel):
    return NNXLogitsOf(model, pick)
  raise ConfigError('logits', f'is supported for linen and NNX models, not '
                    f'{type(model).__name__}')


# ----------------------------------------------------------------------------------------------
# Argument checks (before any long work).


def _shape_str(tree: Any) -> str:
  """``(1, 10)`` for an array, ``tuple of [(1, 10), (1, 64)]`` / ``dict {...}`` otherwise."""
  if hasattr(tree, 'shape') and hasattr(tree, 'dtype'):
    return str(tuple(tree.shape))
  if isinstance(tree, Mapping):
    return 'a dict {' + ', '.join(f'{k!r}: {_shape_str(v)}' for k, v in tree.items()) + '}'
  if isinstance(tree, (tuple, list)):
    return (f'a {type(tree).__name__} of ' + '[' + ', '.join(_shape_str(v) for v in tree) + ']')
  return type(tree).__name__


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  from ttmpd_jax.pruning.graph import key_path
  return {'/'.join(key_path(kp)): tuple(np.shape(leaf))
          for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected_variables(model: nn.Module, image_shape: tuple[int, ...]) -> Optional[dict]:
  """Leaf path -> shape of ``model.init`` on [1, *image_shape] (``params``, ``batch_stats``),
  or None if the model cannot be initialised abstractly."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  try:
    tree = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  except Exception:  # pylint: disable=broad-except
    return None
  tree = nn.unbox(tree)   # Partitioned etc. metadata boxes: their values.
  return _leaf_shapes({c: tree[c] for c in ('params', 'batch_stats') if c in tree})


def _variable_differences(expected: Mapping[str, tuple], given: Mapping[str, tuple]) -> list[str]:
  """What differs between the variables a model expects and ``given`` (``params`` first)."""
  collections = {p.split('/')[0] for p in expected}
  given = {p: s for p, s in given.items() if p.split('/')[0] in collections}
  order = lambda p: (not p.startswith('params/'), p)  # noqa: E731
  diffs = [f'{p} has shape {given[p]} where the model expects {expected[p]}'
           for p in sorted(expected, key=order) if p in given and given[p] != expected[p]]
  diffs += [f'the model expects {p} of shape {expected[p]}, which is missing'
            for p in sorted(expected, key=order) if p not in given]
  diffs += [f'{p} is not a variable of the model' for p in sorted(given, key=order)
            if p not in expected]
  return diffs


def _check_variables(model: Any, variables: Mapping[str, Any],
                     image_shape: tuple[int, ...]) -> None:
  """Compares ``variables`` with the linen model's own (abstract) initialisation."""
  if not isinstance(model, nn.Module):
    return   # NNX: the adapter checks the variables against the module (``_to_state``).
  expected = _expected_variables(model, image_shape)
  if expected is None:
    return
  given = _leaf_shapes(variables)
  params_differ = _variable_differences(
      {p: s for p, s in expected.items() if p.startswith('params/')},
      {p: s for p, s in given.items() if p.startswith('params/')})
  if (not params_differ and any(p.startswith('batch_stats/') for p in expected)
      and not any(p.startswith('batch_stats/') for p in given)):
    layers = sorted({p.split('/')[1] for p in expected if p.startswith('batch_stats/')})
    raise ConfigError('variables', f'the model has BatchNorm layers ({", ".join(layers[:3])}'
                      f'{", ..." if len(layers) > 3 else ""}) but variables hold no "batch_stats"'
                      '; pass the complete trained variables ({"params": ..., "batch_stats": '
                      '...}, e.g. what model.init(...) or your training returned), not only the '
                      'parameters')
  diffs = _variable_differences(expected, given)
  if not diffs:
    return
  # Images with another channel count than the variables were made for?
  candidates = {a for p, s in expected.items() if p in given and len(given[p]) == len(s)
                for a, b in zip(given[p], s) if a != b and b == image_shape[-1]}
  for channels in sorted(candidates)[:2]:
    other = _expected_variables(model, (*image_shape[:-1], channels))
    if other is not None and not _variable_differences(other, given):
      raise ConfigError('unlabeled_images', f'have {image_shape[-1]} channel(s) (images [N, '
                        f'{", ".join(map(str, image_shape))}]), but the model\'s variables take '
                        f'[N, {", ".join(map(str, image_shape[:-1]))}, {channels}] (channels '
                        f'last); pass images with {channels} channels')
  more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
  raise ConfigError('variables', f'do not belong to this model on images [N, '
                    f'{", ".join(map(str, image_shape))}]: {"; ".join(diffs[:3])}{more}. '
                    'Pass the variables of this model (model.init(key, unlabeled_images[:1]) '
                    'or its trained checkpoint), or images of the shape it was built for')


def _trace(model: Any, variables: Any, image_shape: tuple[int, ...]) -> Any:
  x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


def _traced_output(model: Any, variables: Mapping[str, Any],
                   image_shape: tuple[int, ...]) -> Any:
  """The model's abstract output on [2, *image_shape]; mistakes become UserErrors."""
  try:
    return _trace(model, variables, image_shape)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if isinstance(error, TypeError) and "unexpected keyword argument 'train'" in str(error):
    raise ConfigError('model', f'must accept train= (called as model.apply(variables, x, '
                      f'train=False)): {one_line(error, 200)}; add a train: bool = False '
                      'argument to its __call__') from error
  if len(image_shape) == 3 and image_shape[0] != image_shape[-1]:
    nhwc = (image_shape[1], image_shape[2], image_shape[0])
    try:
      _trace(model, variables, nhwc)
    except Exception:  # pylint: disable=broad-except
      pass
    else:
      raise ConfigError('unlabeled_images', f'look channels-first: shape [N, '
                        f'{", ".join(map(str, image_shape))}] (NCHW), but the model takes '
                        f'channels-last images [N, {", ".join(map(str, nhwc))}] (NHWC); pass '
                        'np.transpose(unlabeled_images, (0, 2, 3, 1))') from error
  _check_variables(model, variables, image_shape)
  raise ConfigError('variables', f'model.apply(variables, x, train=False) fails on '
                    f'unlabeled_images of shape [N, {", ".join(map(str, image_shape))}]: '
                    f'{one_line(error, 300)}. Check that variables belong to this model and that '
                    'the images are [N, H, W, C] as it expects') from error


def _check_output(out: Any, logits: Logits) -> Any:
  """The (picked) abstract output, checked to be [N, classes] float logits."""
  single = hasattr(out, 'shape') and hasattr(out, 'dtype')
  if logits is None:
    if not (single and len(out.shape) == 2):
      raise ConfigError('logits', f'the model returns {_shape_str(out)} on 2 images, not one '
                        '[N, classes] array of logits; pass logits= to say which output is the '
                        'logits: an int index (logits=0 for (logits, features)), a dict key '
                        "(logits='logits') or a callable output -> [N, classes] array")
    picked = out
  else:
    if single and not callable(logits):
      raise ConfigError('logits', f'the model already returns one array {_shape_str(out)}; '
                        'leave logits=None (an index or key would select rows of it)')
    pick = _logits_picker(logits)
    try:
      picked = pick(out)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError('logits', f'logits={logits!r} cannot select from the model output '
                        f'{_shape_str(out)}: {one_line(e, 150)}; pass an index, key or callable '
                        'that picks the [N, classes] logits') from e
    if not (hasattr(picked, 'shape') and len(picked.shape) == 2):
      raise ConfigError('logits', f'logits={logits!r} picks {_shape_str(picked)} from the model '
                        f'output {_shape_str(out)}; it must pick the [N, classes] logits')
  if picked.shape[0] != 2:
    raise ConfigError('logits' if logits is not None else 'model',
                      f'the output {tuple(picked.shape)} on 2 images is not batch-first '
                      '[N, classes]; return logits of shape [N, classes]')
  if picked.shape[1] < 2:
    raise ConfigError('logits' if logits is not None else 'model',
                      f'the output {tuple(picked.shape)} has {picked.shape[1]} class(es); '
                      'knowledge distillation needs [N, classes] logits with classes >= 2')
  if not jnp.issubdtype(picked.dtype, jnp.floating):
    raise ConfigError('logits' if logits is not None else 'model',
                      f'the output has dtype {picked.dtype}; it must be float logits (not '
                      'labels or probabilities cast to int)')
  return picked


def _check_groups(model: Any, variables: Any, image_shape: tuple[int, ...]) -> None:
  """Refuses layers that cannot be pruned (GroupNorm, LayerNorm, ...) and models with nothing
  to prune, by name."""
  from ttmpd_jax.pruning.graph import UnsupportedLayerError, discover_groups
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  try:
    groups = discover_groups(model, variables, x)
  except UnsupportedLayerError as e:
    reason = str(e).split('. Per-channel')[0]
    raise ConfigError('model', f'{reason}. ttmpd_jax.prune follows conv, dense, BatchNorm, '
                      'InstanceNorm, pooling and element-wise layers; normalisations over the '
                      'channel axis (GroupNorm, LayerNorm, RMSNorm) cannot be pruned: replace '
                      'them by BatchNorm or remove them') from e
  if not any(g.prunable for g in groups):
    reasons = '; '.join(sorted({f'{g.name}: {g.reason}' for g in groups}))[:300]
    raise ConfigError('model', f'has no prunable channel group ({reasons}); it needs at least '
                      'one conv/dense layer whose output channels feed another layer')


def check_inputs(model: Any, variables: Any, unlabeled_images: Any, *, latency_target: Any,
                 method: Any, config: Any, latency: Any, latency_config: Any, work_dir: Any,
                 log: Any, logits: Logits) -> tuple[Any, Any, Any, SearchConfig]:
  """Every check of :func:`prune`, in order, before any long work.

  Returns:
    ``(model, variables, dataset, config)``: the traceable model (wrapped by ``logits``), its
    host variables, the images as a ``Dataset`` and the config with ``latency_target`` set.
  Raises:
    UserError (mostly ``ConfigError``, whose ``field`` is the argument at fault).
  """
  from ttmpd_jax.distill import cache as cache_lib
  from ttmpd_jax.search.methods import METHODS
  if not callable(log):
    raise ConfigError('log', f'must be a callable taking one line, got {log!r}')
  if isinstance(config, Mapping):
    raise ConfigError('config', 'must be a ttmpd_jax.SearchConfig, got a dict; pass '
                      'config=ttmpd_jax.SearchConfig(**your_dict)')
  if config is not None and not isinstance(config, SearchConfig):
    raise ConfigError('config', f'must be a ttmpd_jax.SearchConfig, got '
                      f'{type(config).__name__}; pass config=ttmpd_jax.SearchConfig(...)')
  if isinstance(latency_target, (bool, np.bool_)) or not isinstance(latency_target, numbers.Real):
    raise ConfigError('latency_target', f'must be a number in (0, 1) (a fraction of the '
                      f'model\'s measured latency), got {latency_target!r}')
  config = (config or SearchConfig()).replace(latency_target=float(latency_target))
  if not isinstance(method, str):
    raise ConfigError('method', f'must be a method name (a str), got {method!r}; valid: '
                      f'{", ".join(METHODS.names())}')
  METHODS.get(method)
  if latency is not None and not callable(getattr(latency, 'predict', None)):
    raise ConfigError('latency', f'must be None (build this device\'s latency model) or an '
                      f'object with a predict(widths) -> ms method, got {type(latency).__name__}'
                      '; e.g. ttmpd_jax.latency.MacsLatency.from_model(...)')
  if isinstance(latency_config, Mapping):
    raise ConfigError('latency_config', 'must be a ttmpd_jax.LatencyConfig, got a dict; pass '
                      'latency_config=ttmpd_jax.LatencyConfig(**your_dict)')
  if not isinstance(latency_config, LatencyConfig):
    raise ConfigError('latency_config', f'must be a ttmpd_jax.LatencyConfig, got '
                      f'{type(latency_config).__name__}')
  if not (isinstance(latency_config.batch, numbers.Integral) and latency_config.batch > 0):
    raise ConfigError('latency_config', f'batch must be a positive int, got '
                      f'{latency_config.batch!r}')
  if work_dir is not None:
    if not isinstance(work_dir, (str, os.PathLike)):
      raise ConfigError('work_dir', f'must be a folder path or None, got {work_dir!r}')
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
      raise ConfigError('work_dir', f'{os.fspath(work_dir)!r} exists and is not a folder; pass '
                        'a folder path (it is created if missing)')
  if logits is not None:
    _logits_picker(logits)   # Type check only.
  if isinstance(model, type):
    raise ConfigError('model', f'got the class {model.__name__}, not a model; pass an instance '
                      f'({model.__name__}(...))')
  from ttmpd_jax.pruning.layers import is_model
  if not (isinstance(model, nnx.Module) or is_model(model)):
    raise ConfigError('model', f'must be a flax.linen Module (with its variables) or an '
                      f'nnx.Module, got {type(model).__name__}')
  if unlabeled_images is None:
    raise ConfigError('unlabeled_images', 'are required: pass float [N, H, W, C] test samples')
  try:
    images = np.asarray(unlabeled_images)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError('unlabeled_images', f'must be an array [N, H, W, C], got '
                      f'{type(unlabeled_images).__name__}') from e
  if images.ndim == 3:
    raise ConfigError('unlabeled_images', f'have shape {images.shape}, 3 axes; pass [N, H, W, C] '
                      'images (add the channel axis: unlabeled_images[..., None])')
  if images.dtype == bool or not (np.issubdtype(images.dtype, np.floating)
                                  or np.issubdtype(images.dtype, np.integer)):
    raise ConfigError('unlabeled_images', f'have dtype {images.dtype}; pass float32 images '
                      'normalised as the model expects (or uint8 pixels)')
  if images.ndim == 4 and len(images) == 0:
    raise ConfigError('unlabeled_images', f'are empty (shape {images.shape}); pass the test '
                      'samples to adapt to')
  dataset = unlabeled_dataset(images)   # [N, H, W, C], finite.
  size: Any = config.finetune_fraction
  try:
    cache_lib.select_subset(len(dataset), int(size) if size > 1 else float(size), config.seed)
  except UserError as e:
    raise ConfigError('finetune_fraction', f'{e} (unlabeled_images hold {len(dataset)} '
                      'samples)') from e
  model, variables = as_traceable(model, variables)
  variables = jax.device_get(variables)
  image_shape = tuple(int(d) for d in dataset.image_shape)
  out = _traced_output(model, variables, image_shape)
  _check_variables(model, variables, image_shape)
  _check_output(out, logits)
  model = with_logits(model, logits)
  _check_groups(model, variables, image_shape)
  if latency is not None:
    from ttmpd_jax.models.common import widths_from_variables
    try:
      ms = float(latency.predict(widths_from_variables(variables)))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError('latency', f'latency.predict(widths) failed on the unpruned widths: '
                        f'{one_line(e, 200)}') from e
    if not (np.isfinite(ms) and ms > 0):
      raise ConfigError('latency', f'latency.predict(widths) returned {ms} ms for the unpruned '
                        'model; it must return a positive, finite latency')
  return model, variables, dataset, config


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
          log: Callable[[str], None] = print, logits: Logits = None) -> PruneResult:
  """Prunes ``model`` at test time to ``latency_target`` of its measured latency.

  Args:
    model, variables: a linen module and its ``{'params', 'batch_stats'}``, or an NNX module
      (``variables=None``). ``model.apply(variables, x, train=False)`` must accept ``train``.
      BatchNorm is optional (see "BatchNorm" below); other normalisations over the channel
      axis (GroupNorm, LayerNorm, RMSNorm) cannot be pruned and are refused.
    unlabeled_images: float [N, H, W, C] test samples (channels last), normalised as the model
      expects (or uint8, scaled to [0, 1]). Labels are never needed.
    latency_target: final measured latency as a fraction of the input model's, in (0, 1).
    method: a registered method (``ttmpd_jax.search.methods.METHODS``).
    config: every other budget (a ``SearchConfig``, not a dict); its ``latency_target`` is
      replaced.
    latency: a ready latency model (any object with ``predict(widths) -> ms``); built for this
      device if None.
    latency_config: how to build and measure latency when ``latency`` is None.
    work_dir: optional folder for resumable state (a killed call re-run resumes).
    log: progress lines.
    logits: which part of the model's output is the ``[N, classes]`` logits, when the model
      returns more than one array (e.g. ``(logits, features)``): an int index, a dict key (or
      attribute name), or a callable ``output -> logits``. None (default): the output must be
      one ``[N, classes]`` array. With ``logits``, everything (search, distillation,
      ``result.apply``) sees the logits only; ``result.model`` is the wrapped model and
      ``result.to_nnx()`` the NNX module with its original outputs.

  BatchNorm: a model without BatchNorm (no ``batch_stats``) is pruned as is; the teacher's and
  the candidates' BN adaptation are skipped, which is logged once. A BatchNorm model whose
  ``variables`` lack ``batch_stats`` is refused (``UserError`` naming ``variables``): the
  statistics are part of the trained model, and the unadapted teacher (``method='teacher'``, and
  ``config.teacher_bn_adapt=False``) needs them, so none are invented.

  Raises:
    UserError: any argument at fault, before any long work (no latency table, BN adaptation or
      pseudo labels): ``config`` not a ``SearchConfig``; ``latency`` without a callable
      ``predict`` (or one that fails on the unpruned widths); ``latency_target``, ``method``,
      ``latency_config``, ``work_dir``, ``log`` of the wrong type or value; ``unlabeled_images``
      not [N, H, W, C] (3-D, NCHW, empty, non-numeric, NaN/Inf, too few for
      ``finetune_fraction``); ``variables`` missing, not a dict of collections, of another model
      or without the ``batch_stats`` of its BatchNorms; ``model`` not a module (or a class), not
      accepting ``train``, with a GroupNorm/LayerNorm in a prunable group, or with nothing to
      prune; an output that is not one ``[N, classes]`` float array without (or despite)
      ``logits``. Each message names the argument (``ConfigError.field``) and the fix.
  """
  from ttmpd_jax.distill.bn_adapt import has_batch_stats
  model, variables, dataset, config = check_inputs(
      model, variables, unlabeled_images, latency_target=latency_target, method=method,
      config=config, latency=latency, latency_config=latency_config, work_dir=work_dir,
      log=log, logits=logits)
  if not has_batch_stats(variables):
    log('the model has no BatchNorm statistics (batch_stats): BN adaptation of the teacher '
        'and of the candidates is skipped')
    config = config.replace(teacher_bn_adapt=False)
  if latency is None:
    latency = build_latency_model(model, variables, dataset.image_shape, latency_config,
                                  config.round_to, log)
  problem = prepare(model, variables, dataset, config, latency=latency,
                    latency_batch=latency_config.batch, log=log)
  report, pruned, record = run_method(method, problem, config, work_dir=work_dir, log=log)
  return PruneResult(model, pruned, report.widths, report, record.masks)
