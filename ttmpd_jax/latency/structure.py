"""The latency *units* of a model and how a width spec determines each unit's channel counts.

A **unit** is one Conv (plus the BatchNorm that directly follows it, if any, plus the residual
add it feeds, if any, plus an elementwise activation, plus the max/average pooling that directly
follows it, if any) or one Dense (plus bias and activation). The unit's cost grows with its input and output channels; everything else
(pooling after a residual join, reshapes, dispatch) is the *non-prunable rest*
that the predictor absorbs in its fitted scale and constant.

The structure is analysed once per architecture family, without compiling anything:

* ``layer_inventory`` gives every Conv/Dense call with its shapes, kernel, strides and groups;
* the model's jaxpr (``jax.make_jaxpr``, tracing only) gives the data flow: walking back from a
  layer's input through non-layer ops (BatchNorm, activations, adds, pooling, reshapes) reaches
  the layers that *produce* its input channels. Several producers means a residual add (their
  widths are coupled); a reshape between producer and consumer (VGG's flatten) multiplies the
  channel count by a fixed factor; no producer means the model input (fixed channels).

After that, :meth:`ModelStructure.channels` maps any width spec (module path -> output channels)
to per-unit ``(c_in, c_out)`` with a few integer operations: the search can call it (through the
predictor) thousands of times.

Design choice: depthwise convolutions (``feature_group_count == c_in == c_out``) take their
width from their input, as in ``models/mobilenetv2.py``; their width-spec key is ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from ttmpd_jax.errors import UserError
from ttmpd_jax.models.inspect import LayerInfo, layer_inventory

Widths = Mapping[str, int]

_LAYER_PRIMITIVES = ('conv_general_dilated', 'dot_general')


@dataclasses.dataclass(frozen=True)
class UnitConfig:
  """Everything that determines a unit's latency except its channel counts.

  Attributes:
    kind: 'conv' or 'dense'.
    batch: leading (batch) size of the unit's input; for dense, the number of rows.
    in_spatial: input spatial size (H, W) of a conv; () for dense.
    kernel: conv kernel size; () for dense.
    strides: conv strides; () for dense.
    padding: explicit conv padding ((lo, hi) per spatial dim); () for dense.
    groups: feature groups of a conv (1 = dense conv); ignored when ``depthwise``.
    depthwise: conv whose groups equal its input and output channels (c_in == c_out == groups).
    batchnorm: a BatchNorm directly follows the conv (folded into the unit).
    bias: the layer adds a bias.
    dtype: compute dtype name, e.g. 'float32'.
    pool: the pooling that follows the conv's elementwise ops in the model, if any:
      ``('max', window, strides, padding)`` (4-D, as ``lax.reduce_window``) or ``('mean',)``
      (global average). Part of the unit because XLA:CPU fuses it with the convolution
      (YNNPACK then never writes the full-resolution output): measured without it, such a unit
      costs up to twice what it costs inside the model.
    residual: the conv's BatchNorm output is added to another activation (a residual join)
      before the activation; the unit then reads that second tensor too, as XLA's fused
      BatchNorm-add-ReLU loop does inside the model.
  """

  kind: str
  batch: int
  in_spatial: tuple[int, ...] = ()
  kernel: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: tuple[tuple[int, int], ...] = ()
  groups: int = 1
  depthwise: bool = False
  batchnorm: bool = False
  bias: bool = False
  dtype: str = 'float32'
  pool: tuple = ()
  residual: bool = False

  @property
  def out_spatial(self) -> tuple[int, ...]:
    """Output spatial size of the conv (before any pooling)."""
    return tuple((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in
                 zip(self.in_spatial, self.padding, self.kernel, self.strides))

  def key(self) -> str:
    """A stable, human-readable string key (used in the table file)."""
    def dims(values):
      return 'x'.join(str(int(v)) for v in values) or '-'
    if self.kind == 'dense':
      return f'dense|b{self.batch}|bias{int(self.bias)}|{self.dtype}'
    pad = ','.join(f'{lo}-{hi}' for lo, hi in self.padding) or '-'
    groups = 'dw' if self.depthwise else f'g{self.groups}'
    key = (f'conv|b{self.batch}|in{dims(self.in_spatial)}|k{dims(self.kernel)}|'
           f's{dims(self.strides)}|p{pad}|{groups}|bn{int(self.batchnorm)}|'
           f'bias{int(self.bias)}|{self.dtype}')
    if self.pool:
      if self.pool[0] == 'max':
        _, window, strides, padding = self.pool
        pool_pad = ','.join(f'{lo}-{hi}' for lo, hi in padding)
        key += f'|maxpool{dims(window)}s{dims(strides)}p{pool_pad}'
      else:
        key += f'|{self.pool[0]}pool'
    if self.residual:
      key += '|residual'
    return key


@dataclasses.dataclass(frozen=True)
class Unit:
  """One prunable-layer unit of a model (see module docstring).

  Attributes:
    path: module path of the Conv/Dense (its width-spec key).
    config: the unit's channel-independent configuration.
    c_in_full, c_out_full: channels in the unpruned model.
    producer: index (into ``ModelStructure.units``) of the unit whose output channels feed this
      unit's input, or None when the input channels are fixed (model input).
    in_factor: ``c_in = in_factor * c_out[producer]`` (> 1 after a flatten).
    producers: every producing unit (more than one behind a residual add; all coupled).
    feeds_output: the unit's output reaches the model output without another layer (its width
      is the number of classes or similar: not prunable).
  """

  path: str
  config: UnitConfig
  c_in_full: int
  c_out_full: int
  producer: Optional[int]
  in_factor: int
  producers: tuple[int, ...]
  feeds_output: bool

  @property
  def depthwise(self) -> bool:
    return self.config.depthwise


def channel_grid(full: int, round_to: int, max_points: Optional[int] = None) -> tuple[int, ...]:
  """Channel counts measured for a layer of ``full`` channels: multiples of ``round_to``, and full.

  Design choice: with ``max_points``, wide layers use a coarser step (a multiple of
  ``round_to``) so that no dimension has more than about ``max_points`` values; interpolation
  covers the counts in between.

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


class ModelStructure:
  """Units of one architecture family (any widths) at a fixed input shape and dtype.

  Build with :meth:`from_model` (any Flax model built from ``nn.Conv``/``nn.Dense``/
  ``nn.BatchNorm``) or :meth:`from_spec` (zoo models).
  """

  def __init__(self, units: Sequence[Unit], input_shape: tuple[int, ...], dtype: str):
    self.units = tuple(units)
    self.input_shape = tuple(int(d) for d in input_shape)
    self.dtype = str(dtype)
    self.paths = tuple(u.path for u in self.units)
    self._index = {u.path: i for i, u in enumerate(self.units)}
    self.full_widths = {u.path: u.c_out_full for u in self.units if not u.depthwise}
    self.groups = self._coupled_groups()

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def from_spec(cls, spec: Any, image_shape: Sequence[int], batch: int,
                dtype: str = 'float32') -> 'ModelStructure':
    """Structure of the zoo model ``spec`` (a ``ModelSpec``) for inputs [batch, *image_shape]."""
    from ttmpd_jax.models import build_model  # Local import: keeps this module model-agnostic.
    model = build_model(spec)
    input_shape = (int(batch), *(int(d) for d in image_shape))
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape[1:])), train=False))
    return cls.from_model(model, variables, input_shape, dtype)

  @classmethod
  def from_model(cls, model: nn.Module, variables: Mapping[str, Any],
                 input_shape: tuple[int, ...], dtype: str = 'float32') -> 'ModelStructure':
    """Analyses ``model`` (see module docstring). ``variables`` may be abstract (eval_shape)."""
    input_shape = tuple(int(d) for d in input_shape)
    inventory = layer_inventory(model, variables, input_shape)
    layers = {info.path: info for info in inventory if info.kind in ('conv', 'dense')}
    bn_after = {inventory[i].path for i in range(len(inventory) - 1)
                if inventory[i].kind == 'conv' and inventory[i + 1].kind == 'batchnorm'
                and tuple(inventory[i + 1].input_shape) == tuple(inventory[i].output_shape)}

    abstract_vars = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
        abstract_vars, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    jaxpr = closed.jaxpr
    leaf_paths = [tuple(str(getattr(p, 'key', getattr(p, 'name', p))) for p in path)
                  for path, _ in jax.tree_util.tree_flatten_with_path((abstract_vars, 0))[0]]
    invar_path = {id(v): leaf_paths[i] for i, v in enumerate(jaxpr.invars) if i < len(leaf_paths)}
    defining = {}
    for eqn in jaxpr.eqns:
      for out in eqn.outvars:
        defining[id(out)] = eqn

    def kernel_module(var) -> Optional[str]:
      # The kernel operand leads (possibly through casts) to a params leaf named 'kernel'.
      for _ in range(8):
        if id(var) in invar_path:
          path = invar_path[id(var)]
          if len(path) >= 3 and path[1] == 'params' and path[-1] == 'kernel':
            return '/'.join(path[2:-1])
          return None
        eqn = defining.get(id(var))
        live = [v for v in (eqn.invars if eqn else ()) if not isinstance(v, jex_core.Literal)]
        if eqn is None or len(live) != 1:
          return None
        var = live[0]
      return None

    layer_eqns: list[tuple[str, Any]] = []
    eqn_to_layer: dict[int, int] = {}
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _LAYER_PRIMITIVES:
        module = kernel_module(eqn.invars[1])
        if module is not None and module in layers:
          eqn_to_layer[id(eqn)] = len(layer_eqns)
          layer_eqns.append((module, eqn))
    found = {m for m, _ in layer_eqns}
    missing = [p for p in layers if p not in found]
    if missing or len(found) != len(layer_eqns):
      raise UserError(
          f'latency model: cannot follow the data flow of layer(s) {", ".join(missing) or "?"} '
          f'(a layer called twice, or inside a nested jit/scan/remat): not supported')

    def producers_of(var) -> list[int]:
      result, stack, seen = [], [var], set()
      while stack:
        v = stack.pop()
        if isinstance(v, jex_core.Literal) or id(v) in seen:
          continue
        seen.add(id(v))
        eqn = defining.get(id(v))
        if eqn is None:
          continue  # A model input or a variable: no layer behind it.
        if id(eqn) in eqn_to_layer:
          if eqn_to_layer[id(eqn)] not in result:
            result.append(eqn_to_layer[id(eqn)])
          continue
        if eqn.primitive.name == 'concatenate':
          raise UserError('latency model: channel concatenation is not supported yet')
        stack.extend(reversed(eqn.invars))
      return sorted(result)

    consumers: dict[int, list[Any]] = {}
    for eqn in jaxpr.eqns:
      for v in eqn.invars:
        if not isinstance(v, jex_core.Literal):
          consumers.setdefault(id(v), []).append(eqn)

    def following_pool(var) -> tuple:
      """Pooling reached from ``var`` through elementwise ops only (no layer, no join)."""
      shape = tuple(var.aval.shape)
      frontier, seen, steps = [var], set(), 0
      while frontier and steps < 64:
        v = frontier.pop()
        for eqn in consumers.get(id(v), ()):
          steps += 1
          if id(eqn) in seen or id(eqn) in eqn_to_layer:
            continue
          seen.add(id(eqn))
          name = eqn.primitive.name
          if name == 'reduce_window_max':
            p = eqn.params
            return ('max', tuple(p['window_dimensions']), tuple(p['window_strides']),
                    tuple(tuple(int(x) for x in pair) for pair in p['padding']))
          if name == 'reduce_sum' and len(shape) == 4 and tuple(eqn.params['axes']) == (1, 2):
            return ('mean',)
          others = [x for x in eqn.invars if not isinstance(x, jex_core.Literal) and x is not v
                    and tuple(getattr(x.aval, 'shape', ())) == shape]
          if others or len(eqn.outvars) != 1 or tuple(eqn.outvars[0].aval.shape) != shape:
            continue  # A join with another activation, or a shape change: the unit ends here.
          frontier.append(eqn.outvars[0])
      return ()

    # Residual joins (adds of two activations): XLA fuses each into the elementwise loop of the
    # producer that runs last, so that unit reads the second tensor.
    joined: set[int] = set()
    for eqn in jaxpr.eqns:
      live = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
      if (eqn.primitive.name in ('add', 'add_any') and len(live) == 2
          and len(live[0].aval.shape) >= 3 and live[0].aval.shape == live[1].aval.shape):
        producers = producers_of(live[0]) + producers_of(live[1])
        if producers:
          joined.add(max(producers))

    output_producers = set()
    for out in jaxpr.outvars:
      output_producers.update(producers_of(out))

    units: list[Unit] = []
    for index, (path, eqn) in enumerate(layer_eqns):
      info: LayerInfo = layers[path]
      producers = producers_of(eqn.invars[0])
      if any(p >= index for p in producers):
        raise UserError(f'latency model: layer {path} is fed by a later layer (unsupported)')
      c_in, c_out = info.c_in, info.c_out
      if producers:
        fulls = {units[p].c_out_full for p in producers}
        if len(fulls) != 1 or c_in % next(iter(fulls)):
          raise UserError(
              f'latency model: input channels of {path} ({c_in}) are not a multiple of the '
              f'output channels of its producers {[units[p].path for p in producers]}')
        factor = c_in // next(iter(fulls))
      else:
        factor = 1
      if info.kind == 'conv':
        depthwise = info.groups > 1 and info.groups == c_in == c_out
        padding = tuple(tuple(int(p) for p in pair) for pair in eqn.params['padding'])
        config = UnitConfig('conv', int(info.input_shape[0]), tuple(info.input_shape[1:-1]),
                            tuple(info.kernel_size), tuple(info.strides), padding,
                            1 if depthwise else int(info.groups), depthwise,
                            path in bn_after, bool(info.use_bias), str(dtype),
                            following_pool(eqn.outvars[0]), index in joined)
      else:
        rows = int(np.prod(info.input_shape[:-1]))
        config = UnitConfig('dense', rows, bias=bool(info.use_bias), dtype=str(dtype))
      units.append(Unit(path, config, c_in, c_out, producers[0] if producers else None, factor,
                        tuple(producers), index in output_producers))
    return cls(units, input_shape, dtype)

  # ---- width spec -> channels ---------------------------------------------------------------
  def channels(self, widths: Optional[Widths] = None) -> tuple[list[int], list[int]]:
    """Per-unit ``(c_in, c_out)`` lists for the architecture ``widths`` (missing keys: full).

    Pure Python, no tracing: microseconds per call.
    """
    widths = widths or {}
    c_in = [0] * len(self.units)
    c_out = [0] * len(self.units)
    for i, u in enumerate(self.units):
      c_in[i] = u.c_in_full if u.producer is None else u.in_factor * c_out[u.producer]
      c_out[i] = c_in[i] if u.depthwise else int(widths.get(u.path, u.c_out_full))
    return c_in, c_out

  def complete_widths(self, widths: Optional[Widths] = None) -> dict[str, int]:
    """``widths`` with every (non-depthwise) layer present, defaults filled in from the full model."""
    _, c_out = self.channels(widths)
    return {u.path: c_out[i] for i, u in enumerate(self.units) if not u.depthwise}

  # ---- coupling -----------------------------------------------------------------------------
  def _roots(self, index: int) -> set[int]:
    """Non-depthwise units whose width sets unit ``index``'s output channels."""
    u = self.units[index]
    if not u.depthwise:
      return {index}
    roots: set[int] = set()
    for p in u.producers:
      roots |= self._roots(p)
    return roots

  def _coupled_groups(self) -> list[tuple[str, ...]]:
    parent = {i: i for i, u in enumerate(self.units) if not u.depthwise}

    def find(i):
      while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
      return i

    for u in self.units:
      roots: set[int] = set()
      for p in u.producers:
        roots |= self._roots(p)
      roots_list = sorted(roots)
      for r in roots_list[1:]:
        parent[find(r)] = find(roots_list[0])
    groups: dict[int, list[int]] = {}
    for i in parent:
      groups.setdefault(find(i), []).append(i)
    return [tuple(self.units[i].path for i in sorted(members))
            for _, members in sorted(groups.items(), key=lambda kv: min(kv[1]))]

  def prunable_groups(self) -> list[tuple[str, ...]]:
    """Coupled width groups that pruning may shrink (not those that set the model output)."""
    out = []
    for group in self.groups:
      if not any(self.units[self._index[p]].feeds_output for p in group):
        out.append(group)
    return out

  def random_widths(self, rng: np.random.Generator, round_to: int, min_keep: float = 0.25,
                    max_keep: float = 1.0, min_channels: int = 0) -> dict[str, int]:
    """A random valid architecture: each prunable group keeps a uniform random fraction.

    Kept channel counts are multiples of ``round_to`` (at least ``max(round_to,
    min_channels)``, at most full).
    """
    widths = dict(self.full_widths)
    for group in self.prunable_groups():
      full = self.full_widths[group[0]]
      keep = rng.uniform(min_keep, max_keep)
      count = round_channels(full * keep, full, round_to)
      if count < min(min_channels, full):
        count = min(full, -(-min_channels // round_to) * round_to)
      widths.update({p: count for p in group})
    return widths

  def uniform_widths(self, keep: float, round_to: int) -> dict[str, int]:
    """Every prunable group keeps the fraction ``keep`` of its channels (rounded)."""
    widths = dict(self.full_widths)
    for group in self.prunable_groups():
      full = self.full_widths[group[0]]
      widths.update({p: round_channels(full * keep, full, round_to) for p in group})
    return widths

  # ---- table grid ---------------------------------------------------------------------------
  def unit_grids(self, round_to: int, max_points: Optional[int] = None
                 ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per unit, the (c_in values, c_out values) a latency table measures.

    Prunable widths get :func:`channel_grid` values; fixed ones (model input, outputs) only their
    full value. For a depthwise unit both lists are the same (it is measured on the diagonal).
    """
    prunable = {p for group in self.prunable_groups() for p in group}
    out_grid: list[tuple[int, ...]] = []
    grids = []
    for u in self.units:
      if u.producer is None:
        c_in_values = (u.c_in_full,)
      else:
        c_in_values = tuple(u.in_factor * c for c in out_grid[u.producer])
      if u.depthwise:
        c_out_values = c_in_values
      elif u.path in prunable:
        c_out_values = channel_grid(u.c_out_full, round_to, max_points)
      else:
        c_out_values = (u.c_out_full,)
      out_grid.append(c_out_values)
      grids.append((c_in_values, c_out_values))
    return grids

  def describe(self) -> str:
    lines = []
    for u in self.units:
      src = 'input' if u.producer is None else self.units[u.producer].path
      if u.in_factor != 1:
        src += f' x{u.in_factor}'
      lines.append(f'{u.path:32s} {u.config.kind:5s} {u.c_in_full:5d} -> {u.c_out_full:5d}  '
                   f'c_in from {src}{"  [depthwise]" if u.depthwise else ""}'
                   f'{"  [output]" if u.feeds_output else ""}')
    return '\n'.join(lines)


def round_channels(value: float, full: int, round_to: int) -> int:
  """Rounds a channel count to a multiple of ``round_to`` within [round_to, full] (full if smaller)."""
  if full <= round_to:
    return full
  rounded = int(round(value / round_to)) * round_to
  return int(min(full, max(round_to, rounded)))


__all__ = ['UnitConfig', 'Unit', 'ModelStructure', 'channel_grid', 'round_channels']
