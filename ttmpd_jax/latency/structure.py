"""A model's latency *units* and how a width spec sets each unit's channel counts.

A **unit** is one conv/dense layer *as it runs inside the model*: the layer plus whatever XLA
fuses around it there (BatchNorm, activation, residual join, pooling, the consumer's fusion
region). Units are never measured alone: their costs are fitted on end-to-end measurements of
the model itself (``latency.predictor``), so every fusion XLA performs is in the numbers.

The units come from the project's one data-flow analysis, ``pruning.graph.trace_layers`` (the
trace behind ``discover_groups``): each :class:`~ttmpd_jax.pruning.graph.LayerRecord` names the
channel groups on the layer's input and output feature axes, so concatenations (several input
groups, offset-mapped), depthwise convolutions (input group == output group) and flattens (each
channel repeated per spatial position) are handled exactly as pruning handles them.

A width spec (module path -> output channels, as ``widths_from_variables`` returns) sets how many
channels each group keeps; pruning keeps a group's *first* ``k`` channels for measurement (which
channels are kept does not change latency). :meth:`ModelStructure.features` maps a width spec to
per-unit cost features with a few NumPy operations (no tracing): MACs, output and input
activation sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning.graph import ChannelGroup, LayerRecord, trace_layers

Widths = Mapping[str, int]

FEATURES = ('macs', 'out', 'in')  # Per unit: multiply-adds, output and input activation sizes.
_FEATURE_SCALE = np.array([1e-9, 1e-6, 1e-6])  # G-MACs and M-elements: O(1) numbers.


@dataclasses.dataclass(frozen=True)
class AxisCount:
  """Size of one feature axis after pruning: ``fixed + sum_g counts[g][kept_g]``.

  ``counts[g]`` is an int array of length ``group size + 1``: how many axis positions hold one
  of the group's first ``k`` channels (``k`` positions for a plain axis, ``k * h * w`` after a
  flatten).
  """

  fixed: int
  counts: tuple[tuple[str, np.ndarray], ...]

  @classmethod
  def of(cls, size: int, members: Sequence[tuple[str, Any]], sizes: Mapping[str, int]
         ) -> 'AxisCount':
    taken = np.zeros(size, bool)
    counts = []
    for name, member in members:
      index = member.channel_index(sizes[name])
      taken |= index >= 0
      hist = np.bincount(index[index >= 0], minlength=sizes[name])
      counts.append((name, np.concatenate([[0], np.cumsum(hist)]).astype(np.int64)))
    return cls(int(size - taken.sum()), tuple(counts))

  def __call__(self, kept: Mapping[str, int]) -> int:
    return self.fixed + sum(int(c[kept[g]]) for g, c in self.counts)


@dataclasses.dataclass(frozen=True)
class Unit:
  """One conv/dense layer of the model (see module docstring).

  Attributes:
    record: the layer as ``pruning.graph.trace_layers`` found it (shapes at the traced batch).
    c_in, c_out: input/output feature counts as functions of the kept channels per group.
    out_positions: output spatial positions times batch (rows of a dense layer).
    in_positions: the same for the input.
    kernel_positions: kernel spatial size (1 for dense).
  """

  record: LayerRecord
  c_in: AxisCount
  c_out: AxisCount
  out_positions: int
  in_positions: int
  kernel_positions: int

  @property
  def path(self) -> str:
    return self.record.module

  @property
  def depthwise(self) -> bool:
    return self.record.depthwise


def _positions(shape: Sequence[int], batch_scale: float) -> int:
  return int(round(np.prod(shape[:-1]) * batch_scale))


class ModelStructure:
  """Units and prunable groups of one architecture family at a fixed input shape and dtype.

  Build with :meth:`from_model` (any model with ``.apply(variables, x, train=False)``).

  Attributes:
    units: one per conv/dense layer, in call order.
    groups: every channel group of the model (``pruning.graph`` records).
    prunable: names of the groups pruning may shrink.
    width_keys: group name -> module paths whose output channels are that group's channels.
    full_widths: the unpruned width spec (every unit's module path -> its output channels).
  """

  def __init__(self, groups: Sequence[ChannelGroup], records: Sequence[LayerRecord],
               input_shape: Sequence[int], dtype: str = 'float32'):
    self.input_shape = tuple(int(d) for d in input_shape)
    self.dtype = str(dtype)
    self.groups = tuple(groups)
    self.sizes = {g.name: g.size for g in self.groups}
    self.prunable = tuple(g.name for g in self.groups if g.prunable)
    traced_batch = records[0].input_shape[0] if records else self.input_shape[0]
    scale = self.input_shape[0] / max(1, traced_batch)
    units = []
    for r in records:
      c_in_axis = r.c_out if r.depthwise else (r.c_in // max(1, r.feature_group_count)
                                               if r.kind == 'conv' else r.c_in)
      units.append(Unit(r, AxisCount.of(c_in_axis, r.inputs, self.sizes),
                        AxisCount.of(r.c_out, r.outputs, self.sizes),
                        _positions(r.output_shape, scale), _positions(r.input_shape, scale),
                        int(np.prod(r.kernel_size)) if r.kernel_size else 1))
    self.units = tuple(units)
    self.paths = tuple(u.path for u in self.units)
    keys: dict[str, list[str]] = {g: [] for g in self.sizes}
    for u in self.units:
      for name, _ in u.record.outputs:
        if u.path not in keys[name]:
          keys[name].append(u.path)
    self.width_keys = {g: tuple(k) for g, k in keys.items()}
    self.full_widths = {u.path: u.record.c_out for u in self.units}

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def from_model(cls, model: Any, variables: Mapping[str, Any], input_shape: Sequence[int],
                 dtype: str = 'float32') -> 'ModelStructure':
    """Traces ``model`` once (``pruning.graph.trace_layers``); ``variables`` may be abstract.

    ``input_shape`` includes the batch dimension (the batch latency is predicted for); the trace
    itself runs at batch 1.
    """
    input_shape = tuple(int(d) for d in input_shape)
    x = np.zeros((1, *input_shape[1:]), np.float32)
    fn = model
    if not isinstance(model, nn.Module) and hasattr(model, 'apply'):
      fn = lambda v, x: model.apply(v, x, train=False)  # noqa: E731 (e.g. an NNX adapter)
    groups, records = trace_layers(fn, variables, x, on_unsupported='freeze')
    if not records:
      raise UserError('latency model: the model has no conv/dense layer with a parameter '
                      'kernel, so there is nothing to predict')
    return cls(groups, records, input_shape, dtype)

  # ---- width spec -> channels ---------------------------------------------------------------
  def kept(self, widths: Optional[Widths] = None) -> dict[str, int]:
    """Channels each group keeps under ``widths`` (missing keys: full; unprunable: full)."""
    widths = widths or {}
    kept = dict(self.sizes)
    for name in self.prunable:
      for key in self.width_keys[name]:
        if key in widths:
          value = int(widths[key])
          if not 1 <= value <= self.sizes[name]:
            raise UserError(f'latency model: width {value} for {key!r} is outside [1, '
                            f'{self.sizes[name]}]')
          kept[name] = value
          break
    return kept

  def widths_of(self, kept: Mapping[str, int]) -> dict[str, int]:
    """The complete width spec of the architecture whose groups keep ``kept`` channels."""
    full = dict(self.sizes)
    full.update(kept)
    return {u.path: u.c_out(full) for u in self.units}

  def complete_widths(self, widths: Optional[Widths] = None) -> dict[str, int]:
    """``widths`` with every unit present (defaults from the full model)."""
    return self.widths_of(self.kept(widths))

  def channels(self, widths: Optional[Widths] = None) -> tuple[list[int], list[int]]:
    """Per-unit ``(c_in, c_out)`` lists (kernel input axis; a depthwise unit: its channels)."""
    kept = self.kept(widths)
    return [u.c_in(kept) for u in self.units], [u.c_out(kept) for u in self.units]

  def features(self, widths: Optional[Widths] = None) -> np.ndarray:
    """float64 [units, 3]: per unit (G-MACs, M output elements, M input elements)."""
    kept = self.kept(widths)
    out = np.empty((len(self.units), 3))
    for i, u in enumerate(self.units):
      ci, co = u.c_in(kept), u.c_out(kept)
      macs = u.out_positions * u.kernel_positions * ci * (1 if u.depthwise else co)
      c_in_act = co if u.depthwise else ci * max(1, u.record.feature_group_count)
      if u.record.kind == 'dense':
        c_in_act = ci
      out[i] = (macs, u.out_positions * co, u.in_positions * c_in_act)
    return out * _FEATURE_SCALE

  def key_of(self, widths: Optional[Widths] = None) -> str:
    """Canonical text of an architecture: kept channels of every prunable group."""
    kept = self.kept(widths)
    return ','.join(str(kept[g]) for g in self.prunable)

  # ---- architectures ------------------------------------------------------------------------
  def group_widths(self, group: str, count: int, base: Optional[Widths] = None) -> dict[str, int]:
    """``base`` (default: full) with group ``group`` keeping ``count`` channels."""
    kept = self.kept(base)
    kept[group] = int(count)
    return self.widths_of(kept)

  def uniform_widths(self, keep: float, round_to: int) -> dict[str, int]:
    """Every prunable group keeps the fraction ``keep`` of its channels (rounded)."""
    return self.widths_of({g: round_channels(self.sizes[g] * keep, self.sizes[g], round_to)
                           for g in self.prunable})

  def random_widths(self, rng: np.random.Generator, round_to: int, min_keep: float = 0.25,
                    max_keep: float = 1.0, min_channels: int = 0) -> dict[str, int]:
    """A random architecture: each prunable group keeps a uniform random fraction.

    Kept counts are multiples of ``round_to`` (at least ``max(round_to, min_channels)``, at most
    full).
    """
    kept = {}
    for g in self.prunable:
      full = self.sizes[g]
      count = round_channels(full * rng.uniform(min_keep, max_keep), full, round_to)
      if count < min(min_channels, full):
        count = min(full, -(-min_channels // round_to) * round_to)
      kept[g] = count
    return self.widths_of(kept)

  def describe(self) -> str:
    lines = []
    for u in self.units:
      ins = '+'.join(g for g, _ in u.record.inputs) or 'input'
      outs = '+'.join(g for g, _ in u.record.outputs) or '-'
      lines.append(f'{u.path:32s} {u.record.kind:5s} {u.record.c_in:5d} -> {u.record.c_out:5d}'
                   f'  in: {ins}  out: {outs}{"  [depthwise]" if u.depthwise else ""}')
    return '\n'.join(lines)


def zoo_model(spec: Any, image_shape: Sequence[int]) -> tuple[nn.Module, Any]:
  """The zoo model ``spec`` (a ``ModelSpec``) and its abstract variables for ``image_shape``."""
  from ttmpd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  model = build_model(spec)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, *image_shape), np.float32), train=False))
  return model, variables


def channel_grid(full: int, round_to: int, max_points: Optional[int] = None) -> tuple[int, ...]:
  """Channel counts probed for a group of ``full`` channels: multiples of ``round_to``, and full.

  Design choice: with ``max_points``, wide groups use a coarser step (a multiple of
  ``round_to``) so that no group has more than about ``max_points`` values.

  >>> channel_grid(20, 8)
  (8, 16, 20)
  """
  if full < 1 or round_to < 1:
    raise ValueError(f'need full >= 1 and round_to >= 1, got {full}, {round_to}')
  step = round_to
  if max_points is not None and full // round_to > max_points:
    step = round_to * -(-(full // round_to) // max_points)
  values = set(range(step, full + 1, step))
  values.add(full)
  return tuple(sorted(values))


def round_channels(value: float, full: int, round_to: int) -> int:
  """Rounds to a multiple of ``round_to`` within [round_to, full] (full if that is smaller)."""
  if full <= round_to:
    return full
  rounded = int(round(value / round_to)) * round_to
  return int(min(full, max(round_to, rounded)))


__all__ = ['FEATURES', 'AxisCount', 'ModelStructure', 'Unit', 'channel_grid', 'round_channels']
