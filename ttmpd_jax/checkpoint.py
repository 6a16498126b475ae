"""Model checkpoints: orbax-saved variables plus the architecture needed to rebuild them.

A checkpoint is a directory holding two orbax items: ``variables`` (``{'params',
'batch_stats'}``) and ``meta`` (JSON: the ``ModelSpec``, the input image shape, the dataset
family and free-form info such as training config and metrics). Orbax writes to a temporary
directory and renames it, so an interrupted save never leaves a half-written checkpoint; we
additionally refuse to replace an existing checkpoint unless asked to.

Loading from Python::

    from ttmpd_jax import checkpoint
    model, variables, meta = checkpoint.load_model('/path/to/ckpt')
    logits = model.apply(variables, images, train=False)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ttmpd_jax.errors import UserError
from ttmpd_jax.models import ModelSpec, build_model

FORMAT = 'ttmpd_jax.checkpoint/1'
_FIX = 'delete it to pretrain again, or use another checkpoint'


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, corrupted, or does not match what was asked for."""


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
  spec: ModelSpec
  image_shape: tuple[int, ...]
  family: str
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {'format': FORMAT, 'spec': self.spec.to_json(), 'image_shape': list(self.image_shape),
            'family': self.family, 'info': dict(self.info)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'CheckpointMeta':
    if data.get('format') != FORMAT:
      raise CheckpointError(f'unknown checkpoint format {data.get("format")!r} (expected '
                            f'{FORMAT}): not a ttmpd_jax checkpoint')
    return cls(ModelSpec.from_json(data['spec']), tuple(int(d) for d in data['image_shape']),
               str(data['family']), dict(data.get('info', {})))


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _restore(path: str, **items: Any) -> Any:
  """Restores the named orbax items, closing the checkpointer (and its threads) right away."""
  checkpointer = _checkpointer()
  try:
    return checkpointer.restore(os.path.abspath(path), args=ocp.args.Composite(**items))
  finally:
    checkpointer.close()


def exists(path: str) -> bool:
  return os.path.isdir(path)


def save(path: str, variables: Mapping[str, Any], meta: CheckpointMeta,
         overwrite: bool = False) -> str:
  """Writes ``variables`` and ``meta`` to ``path`` atomically; returns the absolute path."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f'checkpoint {path} already exists; refusing to overwrite it')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  checkpointer = _checkpointer()
  try:
    checkpointer.save(path, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(jax.device_get(variables)),
        meta=ocp.args.JsonSave(meta.to_json())), force=overwrite)
  finally:
    checkpointer.close()  # Joins orbax's background threads now, not at interpreter exit.
  return path


def load_meta(path: str) -> CheckpointMeta:
  """Reads only the metadata (cheap): spec, image shape, family, info."""
  if not exists(path):
    raise CheckpointError(f'no checkpoint at {path}')
  try:
    restored = _restore(path, meta=ocp.args.JsonRestore())
    return CheckpointMeta.from_json(restored['meta'])
  except CheckpointError as e:
    raise CheckpointError(f'checkpoint {path}: {e}; {_FIX}') from e
  except Exception as e:  # Orbax raises many types for unreadable directories.
    raise CheckpointError(f'checkpoint {path} is corrupted or not a ttmpd_jax checkpoint '
                          f'(its metadata cannot be read: {type(e).__name__}: {str(e)[:200]}); '
                          f'{_FIX}') from e


def abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """Shapes/dtypes of ``model``'s variables, without allocating them."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                             train=False))
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


def load(path: str, expected_spec: Optional[ModelSpec] = None) -> tuple[dict[str, Any],
                                                                         CheckpointMeta]:
  """Restores ``(variables, meta)``; checks shapes against the stored (or expected) spec."""
  meta = load_meta(path)
  if expected_spec is not None:
    check_spec(meta, expected_spec, path)
  try:
    target = abstract_variables(build_model(meta.spec), meta.image_shape)
  except Exception as e:  # A metadata file edited by hand, or from another version.
    raise CheckpointError(f'checkpoint {path}: its architecture {meta.spec.to_json()} cannot be '
                          f'built ({type(e).__name__}: {str(e)[:200]})') from e
  try:
    restored = _restore(path, variables=ocp.args.StandardRestore(target))
  except Exception as e:
    raise CheckpointError(f'checkpoint {path} is corrupted or does not match its architecture '
                          f'spec ({type(e).__name__}: {str(e)[:200]}); {_FIX}') from e
  return restored['variables'], meta


def check_spec(meta: CheckpointMeta, expected: ModelSpec, path: str) -> None:
  """Raises ``CheckpointError`` unless the checkpoint holds the ``expected`` architecture."""
  if _comparable(expected) != _comparable(meta.spec):
    raise CheckpointError(
        f'checkpoint {path} holds {meta.spec.to_json()}, which does not match the requested '
        f'model {expected.to_json()}; pass a matching --checkpoint or another --output_dir')


def check_compatible(meta: CheckpointMeta, image_shape: tuple[int, ...], num_classes: int,
                     data_label: str, checkpoint_label: str) -> None:
  """Raises ``CheckpointError`` unless the model takes ``image_shape`` and has ``num_classes``.

  Design choice: checked from the metadata alone, before any weights are read, so a model
  trained on other images fails with a sentence instead of a Flax shape error mid-run.
  """
  held = 'x'.join(map(str, meta.image_shape))
  wanted = 'x'.join(map(str, image_shape))
  if tuple(meta.image_shape) != tuple(image_shape):
    raise CheckpointError(
        f'{checkpoint_label} was trained on {held} images ({meta.family}), but {data_label} '
        f'has {wanted} images; use a checkpoint trained on this data, or matching data')
  if meta.spec.num_classes != num_classes:
    raise CheckpointError(
        f'{checkpoint_label} predicts {meta.spec.num_classes} classes, but {data_label} has '
        f'{num_classes}; use a checkpoint trained on this data, or matching data')


def load_model(path: str) -> tuple[nn.Module, dict[str, Any], CheckpointMeta]:
  """``(model, variables, meta)`` ready for ``model.apply(variables, x, train=False)``."""
  variables, meta = load(path)
  return build_model(meta.spec), variables, meta


def _comparable(spec: ModelSpec) -> dict[str, Any]:
  data = spec.to_json()
  if not data['widths']:
    data.pop('widths')
  return data
