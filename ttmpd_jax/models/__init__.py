"""The model zoo: width-parameterised Flax linen classifiers and a serialisable model spec.

``ModelSpec`` (name + constructor arguments + widths) is what checkpoints store next to the
variables, so any pruned model can be rebuilt: ``build_model(spec)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from ttmpd_jax.models.common import freeze_widths, widths_from_variables
from ttmpd_jax.models.mobilenetv2 import MobileNetV2
from ttmpd_jax.models.resnet_cifar import CifarResNet
from ttmpd_jax.models.resnet_imagenet import ImageNetResNet
from ttmpd_jax.models.vgg import VGG, VGG_MEDIUM


def _cifar_resnet(depth):
  return lambda num_classes, **kw: CifarResNet(depth=depth, num_classes=num_classes, **kw)


_REGISTRY = {
    'resnet8': _cifar_resnet(8),
    'resnet20': _cifar_resnet(20),
    'resnet56': _cifar_resnet(56),
    'resnet18': lambda num_classes, **kw: ImageNetResNet(
        stage_sizes=(2, 2, 2, 2), bottleneck=False, num_classes=num_classes, **kw),
    'resnet50': lambda num_classes, **kw: ImageNetResNet(
        stage_sizes=(3, 4, 6, 3), bottleneck=True, num_classes=num_classes, **kw),
    'vgg_small': lambda num_classes, **kw: VGG(num_classes=num_classes, **kw),
    'vgg_medium': lambda num_classes, **kw: VGG(num_classes=num_classes, config=VGG_MEDIUM, **kw),
    'mobilenetv2': lambda num_classes, **kw: MobileNetV2(num_classes=num_classes, **kw),
}

MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything needed to rebuild a (possibly pruned) zoo model; JSON-serialisable.

  Attributes:
    name: one of ``MODEL_NAMES``.
    num_classes: classifier outputs (never pruned).
    kwargs: extra constructor arguments (e.g. ``base_width``, ``small_input``).
    widths: module path -> output channels; empty means the model's defaults.
  """

  name: str
  num_classes: int
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  widths: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {'name': self.name, 'num_classes': self.num_classes, 'kwargs': dict(self.kwargs),
            'widths': dict(self.widths)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'ModelSpec':
    try:
      return cls(name=str(data['name']), num_classes=int(data['num_classes']),
                 kwargs=dict(data.get('kwargs', {})),
                 widths={str(k): int(v) for k, v in dict(data.get('widths', {})).items()})
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'malformed model spec {data!r}: {e}') from e

  def with_widths(self, widths: Mapping[str, int]) -> 'ModelSpec':
    return dataclasses.replace(self, widths=dict(widths))

  def with_widths_of(self, variables: Mapping[str, Any]) -> 'ModelSpec':
    """The spec of the architecture whose parameters are ``variables`` (e.g. after removal)."""
    return self.with_widths(widths_from_variables(variables))


def build_model(spec: ModelSpec) -> nn.Module:
  """Instantiates the Flax module described by ``spec``."""
  if spec.name not in _REGISTRY:
    raise ValueError(f'unknown model {spec.name!r}; valid models: {", ".join(MODEL_NAMES)}')
  kwargs = dict(spec.kwargs)
  if 'stage_sizes' in kwargs:
    kwargs['stage_sizes'] = tuple(kwargs['stage_sizes'])
  return _REGISTRY[spec.name](spec.num_classes, widths=freeze_widths(spec.widths), **kwargs)


__all__ = ['ModelSpec', 'MODEL_NAMES', 'build_model', 'widths_from_variables', 'CifarResNet',
           'ImageNetResNet', 'VGG', 'MobileNetV2']
