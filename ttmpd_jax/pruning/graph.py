"""Channel-group discovery: which parameter slices must be pruned together, found by tracing.

``discover_groups(model, variables, x)`` traces ``model.apply`` to a jaxpr whose inputs are the
flattened variable leaves, then follows every array axis through the primitives. Each position of
each parameter axis is an *atom*; primitives *tie* atoms that must be removed together (a
BatchNorm scale broadcast against a conv output, the contracted axes of a conv or a matmul, the
operands of a residual add, the rows of a Dense kernel fed by a flattened feature map, ...). The
connected components of the tie graph are single channels; channels produced by the same
parameter axis (a conv/dense kernel's output axis) form one :class:`ChannelGroup`, the unit that
masks, importance scores and removal work on.

What is followed (the channel axis may sit anywhere; layouts come from the primitives):

- ``conv_general_dilated``: input features <-> kernel input features; output features are the
  kernel's output features (the *producer*). Depthwise (``feature_group_count`` == input
  channels, one output per input) ties input <-> output channels and produces nothing new.
- ``dot_general``: contracted axes tie; free axes carry over (a Dense kernel's output axis is a
  producer).
- element-wise ops with broadcasting (this is how BatchNorm scale/bias/mean/var and biases
  attach), ``broadcast_in_dim``, ``reshape`` (merging axes, e.g. ``[N,h,w,C] -> [N,h*w*C]``: Dense
  row ``s*C + c`` belongs to channel ``c``), ``transpose``, ``squeeze``, ``rev``,
  ``concatenate`` (offset remapping), pooling (``reduce_window_*``), and slices, splits, pads
  and reductions over non-channel axes, and calls of sub-jaxprs (``jit``, ``custom_jvp_call``
  for ReLU/GELU, ...).

Anything else that touches a channel (an unknown primitive, a reduction or softmax over channels,
a grouped convolution, a slice, split or pad of the channel axis) makes the affected group
unprunable; by default :func:`discover_groups` then raises an error naming the group, the
primitive and the layer (``on_unsupported='freeze'`` keeps such groups as ``prunable=False``
instead). Groups that reach the model output (the classifier's logits) or the model input, or
that meet an array of baked-in size (a constant, ``iota``), are never prunable (no error: their
``reason`` says why).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.extend.core as jex
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from ttmpd_jax.errors import UserError

Path = tuple[str, ...]


class UnsupportedLayerError(UserError):
  """A layer's channels cannot be followed, so the group it touches cannot be pruned safely."""


@dataclasses.dataclass(frozen=True)
class Member:
  """One axis of one variable leaf that belongs (entirely or in part) to a channel group.

  Attributes:
    path: key path into the variables, e.g. ``('params', 'stage1_block0', 'conv1', 'kernel')``.
    axis: the axis of that leaf that indexes the group's channels.
    role: ``'out'`` (a conv/dense kernel axis that produces the channels), ``'in'`` (an axis
      contracted against the channels: a consumer's input rows) or ``'other'`` (element-wise
      per-channel values: BatchNorm scale/bias/mean/var, biases).
    index: channel of the group for each position along ``axis`` (``-1``: position belongs to
      another group, e.g. after a concatenation); several positions may share a channel (a
      flatten into a Dense layer). ``None`` means the identity (position ``i`` is channel ``i``
      and the axis has exactly ``size`` positions).
  """

  path: Path
  axis: int
  role: str
  index: Optional[tuple[int, ...]] = None

  @property
  def name(self) -> str:
    return '/'.join(self.path)

  def channel_index(self, size: int) -> np.ndarray:
    """int32 [axis length]: the group channel of each position (``-1``: not in this group)."""
    if self.index is None:
      return np.arange(size, dtype=np.int32)
    return np.asarray(self.index, np.int32)

  def __repr__(self) -> str:
    mapping = '' if self.index is None else f', mapped[{len(self.index)}]'
    return f'Member({self.name}, axis={self.axis}, {self.role}{mapping})'


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """Channels that are pruned together: one mask vector of ``size`` booleans.

  Attributes:
    name: module path of the first (in call order) parameter that produces the channels, e.g.
      ``'stage1_block0/conv1'``; stable across removals, so masks stay keyed the same way.
    size: number of channels.
    members: every variable axis holding a slice of these channels.
    prunable: False for groups tied to the model output (classifier logits) or input, or that
      pass through a layer that cannot be followed.
    reason: why the group is not prunable ('' when it is).
  """

  name: str
  size: int
  members: tuple[Member, ...]
  prunable: bool = True
  reason: str = ''

  def members_with_role(self, role: str) -> tuple[Member, ...]:
    return tuple(m for m in self.members if m.role == role)

  def __repr__(self) -> str:
    flag = '' if self.prunable else f', not prunable: {self.reason}'
    return f'ChannelGroup({self.name!r}, size={self.size}, {len(self.members)} members{flag})'


Groups = tuple[ChannelGroup, ...]


def prunable_groups(groups: Sequence[ChannelGroup]) -> Groups:
  """The groups that masks may address."""
  return tuple(g for g in groups if g.prunable)


def group_by_name(groups: Sequence[ChannelGroup]) -> dict[str, ChannelGroup]:
  return {g.name: g for g in groups}


def key_path(path: Sequence[Any]) -> Path:
  """A ``jax.tree_util`` key path as a tuple of strings (dict keys, attribute names, indices)."""
  out = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


# ----------------------------------------------------------------------------------------------
# Tracing.

# Element-wise primitives: every operand (of the output's rank, or a scalar) lines up axis by axis.
_ELEMENTWISE = frozenset('''
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow
    real reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh xor
    sharding_constraint mesh_cast pvary
'''.split())

# Primitives whose operands and results pair up one to one (identity per operand).
_PASSTHROUGH_MULTI = frozenset({'device_put', 'optimization_barrier'})

# Call-like primitives whose sub-jaxpr takes exactly the equation's operands.
_CALLS = {
    'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
    'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr',
    'custom_vjp_call_jaxpr': 'fun_jaxpr', 'checkpoint': 'jaxpr', 'remat': 'jaxpr',
}

AxisAtoms = Optional[np.ndarray]  # int64 [axis length] atom ids, or None (untracked axis).


class _Tracer:
  """Follows atoms through a jaxpr, recording ties, producers and flags."""

  def __init__(self, elementwise: frozenset[str]):
    self.elementwise = elementwise
    self.count = 0
    self.leaf_ranges: list[tuple[int, int, int, int]] = []  # (start, n, leaf, axis)
    self.ties: list[tuple[np.ndarray, np.ndarray]] = []
    self.producers: list[np.ndarray] = []
    self.roles: list[tuple[np.ndarray, int]] = []  # 1 = 'in', 2 = 'out'
    self.flags: dict[str, list[np.ndarray]] = {'input': [], 'output': [], 'fixed': []}
    self.blocked: list[tuple[np.ndarray, str]] = []
    self.layers: list[tuple[str, Any, list[AxisAtoms], list[AxisAtoms], str]] = []

  def new(self, n: int, leaf: int = -1, axis: int = -1) -> np.ndarray:
    atoms = np.arange(self.count, self.count + n, dtype=np.int64)
    if leaf >= 0:
      self.leaf_ranges.append((self.count, n, leaf, axis))
    self.count += n
    return atoms

  def fresh(self, shape: Sequence[int], flag: str, reason: str = '') -> list[AxisAtoms]:
    """New atoms for every axis of a value whose channels are not parameters (flagged)."""
    out = []
    for n in shape:
      atoms = self.new(int(n))
      if flag == 'blocked':
        self.blocked.append((atoms, reason))
      else:
        self.flags[flag].append(atoms)
      out.append(atoms)
    return out

  def tie(self, a: AxisAtoms, b: AxisAtoms) -> None:
    if a is not None and b is not None and a is not b:
      self.ties.append((a, b))

  def block(self, atoms: Iterable[AxisAtoms], reason: str) -> None:
    for a in atoms:
      if a is not None:
        self.blocked.append((a, reason))

  # -- jaxpr walking --------------------------------------------------------------------------

  def run(self, jaxpr: jex.Jaxpr, consts: Sequence[list[AxisAtoms]],
          args: Sequence[list[AxisAtoms]], scope: str) -> list[list[AxisAtoms]]:
    env: dict[Any, list[AxisAtoms]] = {}
    for v, a in zip(jaxpr.constvars, consts):
      env[v] = a
    for v, a in zip(jaxpr.invars, args):
      env[v] = a

    def read(v) -> list[AxisAtoms]:
      if isinstance(v, jex.Literal):
        return [None] * len(np.shape(v.val))
      return env[v]

    for eqn in jaxpr.eqns:
      name_stack = str(eqn.source_info.name_stack)
      layer = '/'.join(s for s in (scope, name_stack) if s)
      outs = self.equation(eqn, [read(v) for v in eqn.invars], layer)
      for v, o in zip(eqn.outvars, outs):
        if not isinstance(v, jex.DropVar):
          env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def equation(self, eqn, ins: list[list[AxisAtoms]], layer: str) -> list[list[AxisAtoms]]:
    p = eqn.primitive.name
    in_shapes = [tuple(v.aval.shape) for v in eqn.invars]
    out_shapes = [tuple(getattr(v.aval, 'shape', ())) for v in eqn.outvars]
    where = f"primitive '{p}' in layer '{layer or '<top level>'}'"

    if p in _CALLS and self._sub_jaxpr(eqn, _CALLS[p]) is not None:
      sub, consts = self._sub_jaxpr(eqn, _CALLS[p])
      if len(sub.invars) == len(ins) and len(sub.outvars) == len(eqn.outvars):
        const_atoms = [self._const(c) for c in consts]
        return self.run(sub, const_atoms, ins, layer)
    if p in _PASSTHROUGH_MULTI and len(ins) == len(out_shapes):
      return [list(a) for a in ins]
    if p in self.elementwise:
      return [self._elementwise(ins, in_shapes, out_shapes[0])] * len(out_shapes)
    handler = getattr(self, '_' + p, None)
    if handler is not None:
      return handler(eqn, ins, in_shapes, out_shapes, where)
    return self._unknown(ins, out_shapes, where)

  @staticmethod
  def _sub_jaxpr(eqn, key):
    sub = eqn.params.get(key)
    if sub is None:
      return None
    if isinstance(sub, jex.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jex.Jaxpr):
      return sub, ()
    return None

  def _const(self, value) -> list[AxisAtoms]:
    # A baked-in array keeps its size when the model shrinks: whatever it touches is fixed.
    return self.fresh(np.shape(value), 'fixed')

  def _iota(self, eqn, ins, in_shapes, out_shapes, where):
    # Its size is baked into the jaxpr, exactly like a constant array.
    return [self.fresh(out_shapes[0], 'fixed')]

  def _unknown(self, ins, out_shapes, where):
    tracked = [a for atoms in ins for a in atoms if a is not None]
    if not tracked:
      return [[None] * len(s) for s in out_shapes]
    reason = f'unsupported {where}'
    self.block(tracked, reason)
    return [self.fresh(s, 'blocked', reason) for s in out_shapes]

  def _elementwise(self, ins, in_shapes, out_shape) -> list[AxisAtoms]:
    out: list[AxisAtoms] = []
    for ax, n in enumerate(out_shape):
      cands = [a[ax] for a, s in zip(ins, in_shapes)
               if len(s) == len(out_shape) and s[ax] == n and a[ax] is not None]
      for c in cands[1:]:
        self.tie(cands[0], c)
      out.append(cands[0] if cands else None)
    return out

  # -- structural primitives (named _<primitive>) ---------------------------------------------

  def _broadcast_in_dim(self, eqn, ins, in_shapes, out_shapes, where):
    out: list[AxisAtoms] = [None] * len(out_shapes[0])
    for i, d in enumerate(eqn.params['broadcast_dimensions']):
      if in_shapes[0][i] == out_shapes[0][d]:
        out[d] = ins[0][i]
    return [out]

  def _reshape(self, eqn, ins, in_shapes, out_shapes, where):
    src, dst, atoms = in_shapes[0], out_shapes[0], ins[0]
    out: list[AxisAtoms] = [None] * len(dst)
    # Blocks are formed from the right, so size-1 axes pair up channels-last style: a [C]
    # vector reshaped to [1, 1, 1, C] keeps its channels on the last axis even when C == 1.
    i, j = len(src) - 1, len(dst) - 1
    while i >= 0 or j >= 0:
      # Smallest block of input axes bi and output axes bj with equal element counts.
      bi, bj, pi, pj = [], [], 1, 1
      if i >= 0:
        bi.insert(0, i)
        pi *= src[i]
        i -= 1
      if j >= 0:
        bj.insert(0, j)
        pj *= dst[j]
        j -= 1
      while pi != pj:
        if (pi < pj and i >= 0) or j < 0:
          bi.insert(0, i)
          pi *= src[i]
          i -= 1
        else:
          bj.insert(0, j)
          pj *= dst[j]
          j -= 1
      tracked = [k for k in bi if atoms[k] is not None]
      if not tracked:
        continue
      if len(tracked) > 1:
        reason = f'{where} merges two tracked axes'
        self.block([atoms[k] for k in tracked], reason)
        for k in bj:
          out[k] = self.fresh((dst[k],), 'blocked', reason)[0]
        continue
      k = tracked[0]
      # Flat atoms of the block: the tracked axis broadcast over the others (row-major).
      grid = [src[q] if q == k else 1 for q in bi]
      flat = np.broadcast_to(atoms[k].reshape(grid), [src[q] for q in bi]).reshape(-1)
      big = [q for q in bj if dst[q] != 1] or bj[-1:]
      if len(big) == 1 and dst[big[0]] == flat.size:
        out[big[0]] = np.ascontiguousarray(flat)
      elif not big:
        continue  # A size-1 channel axis squeezed away: nothing left to prune in it.
      else:
        reason = f'{where} splits a channel axis'
        self.block([atoms[k]], reason)
        for q in bj:
          out[q] = self.fresh((dst[q],), 'blocked', reason)[0]
    return [out]

  def _squeeze(self, eqn, ins, in_shapes, out_shapes, where):
    dims = {d % len(in_shapes[0]) for d in eqn.params['dimensions']}
    return [[a for d, a in enumerate(ins[0]) if d not in dims]]

  def _transpose(self, eqn, ins, in_shapes, out_shapes, where):
    return [[ins[0][d] for d in eqn.params['permutation']]]

  def _rev(self, eqn, ins, in_shapes, out_shapes, where):
    dims = set(eqn.params['dimensions'])
    return [[a[::-1].copy() if (d in dims and a is not None) else a
             for d, a in enumerate(ins[0])]]

  def _reduction(self, ins, axes, where):
    axes = set(axes)
    self.block([ins[0][d] for d in axes], f'{where} reduces over a channel axis')
    return [[a for d, a in enumerate(ins[0]) if d not in axes]]

  def _reduce_generic(self, eqn, ins, in_shapes, out_shapes, where):
    return self._reduction(ins, eqn.params['axes'], where)

  _reduce_sum = _reduce_max = _reduce_min = _reduce_prod = _reduce_generic
  _reduce_and = _reduce_or = _reduce_xor = _argmax = _argmin = _reduce_generic

  def _window(self, eqn, ins, in_shapes, out_shapes, where):
    pr = eqn.params
    n_ops = len(out_shapes)
    outs = []
    for o in range(n_ops):
      atoms, shape = ins[o], in_shapes[o]
      out: list[AxisAtoms] = []
      for d, a in enumerate(atoms):
        untouched = (pr['window_dimensions'][d] == 1 and pr['window_strides'][d] == 1 and
                     tuple(pr['padding'][d]) == (0, 0) and
                     pr.get('base_dilation', (1,) * len(shape))[d] == 1 and
                     pr.get('window_dilation', (1,) * len(shape))[d] == 1)
        if a is not None and not untouched:
          self.block([a], f'{where} pools over a channel axis')
          a = None
        out.append(a if out_shapes[o][d] == shape[d] else None)
      outs.append(out)
    return outs

  _reduce_window_max = _reduce_window_min = _reduce_window_sum = _reduce_window = _window

  def _pad(self, eqn, ins, in_shapes, out_shapes, where):
    out = []
    for d, (a, (lo, hi, interior)) in enumerate(zip(ins[0], eqn.params['padding_config'])):
      if a is not None and (lo, hi, interior) != (0, 0, 0):
        self.block([a], f'{where} pads a channel axis')
        a = self.fresh((out_shapes[0][d],), 'blocked', f'{where} pads a channel axis')[0]
      out.append(a)
    return [out]

  def _slice(self, eqn, ins, in_shapes, out_shapes, where):
    pr = eqn.params
    strides = pr['strides'] or (1,) * len(in_shapes[0])
    out = []
    for d, a in enumerate(ins[0]):
      if a is not None and out_shapes[0][d] != in_shapes[0][d]:
        # The model slices with fixed indices, which would select the wrong channels once the
        # axis shrinks.
        self.block([a], f'{where} slices a channel axis')
        a = a[pr['start_indices'][d]:pr['limit_indices'][d]:strides[d]]
      out.append(a)
    return [out]

  def _dynamic_slice(self, eqn, ins, in_shapes, out_shapes, where):
    out = []
    for d, a in enumerate(ins[0]):
      if a is not None and out_shapes[0][d] != in_shapes[0][d]:
        reason = f'{where} slices a channel axis'
        self.block([a], reason)
        a = self.fresh((out_shapes[0][d],), 'blocked', reason)[0]
      out.append(a)
    return [out]

  def _split(self, eqn, ins, in_shapes, out_shapes, where):
    axis = eqn.params['axis'] % len(in_shapes[0])
    a = ins[0][axis]
    if a is not None:
      self.block([a], f'{where} splits a channel axis')
    outs, start = [], 0
    for s in out_shapes:
      o = list(ins[0])
      o[axis] = None if a is None else a[start:start + s[axis]]
      start += s[axis]
      outs.append(o)
    return outs

  def _concatenate(self, eqn, ins, in_shapes, out_shapes, where):
    dim = eqn.params['dimension']
    out = self._elementwise([[None if d == dim else a for d, a in enumerate(atoms)]
                             for atoms in ins],
                            [tuple(-1 if d == dim else n for d, n in enumerate(s))
                             for s in in_shapes],
                            tuple(-1 if d == dim else n for d, n in enumerate(out_shapes[0])))
    parts = [atoms[dim] for atoms in ins]
    if all(p is None for p in parts):
      out[dim] = None
    else:
      # Untracked pieces (constants) keep their size when the model shrinks.
      out[dim] = np.concatenate([
          p if p is not None else self.fresh((s[dim],), 'fixed')[0]
          for p, s in zip(parts, in_shapes)])
    return [out]

  def _conv_general_dilated(self, eqn, ins, in_shapes, out_shapes, where):
    pr = eqn.params
    lhs_spec, rhs_spec, out_spec = pr['dimension_numbers']
    lhs, rhs = ins[0], ins[1]
    c_in = in_shapes[0][lhs_spec[1]]
    fgc, bgc = pr['feature_group_count'], pr['batch_group_count']
    lhs_f, rhs_in, rhs_out = lhs[lhs_spec[1]], rhs[rhs_spec[1]], rhs[rhs_spec[0]]
    c_out = in_shapes[1][rhs_spec[0]]
    self.layers.append(('conv', eqn, list(lhs), list(rhs), where))
    if rhs_out is None:
      rhs_out = self.fresh((c_out,), 'fixed')[0]
    if bgc != 1:
      self.block([lhs_f, rhs_in, rhs_out], f'{where} has batch_group_count={bgc}')
      self.producers.append(rhs_out)
    elif fgc == 1:
      self.tie(lhs_f, rhs_in)
      if rhs_in is not None:
        self.roles.append((rhs_in, 1))
      self.producers.append(rhs_out)
    elif fgc == c_in and c_out == c_in:
      # Depthwise: channel i only ever sees channel i, so it makes no new channels (after a
      # concatenation, each concatenated group stays its own group).
      self.tie(lhs_f, rhs_out)
    else:
      self.block([lhs_f, rhs_in, rhs_out],
                 f'{where} is a grouped convolution (feature_group_count={fgc}, {c_in} -> '
                 f'{c_out} channels); only dense and depthwise convolutions can be pruned')
      self.producers.append(rhs_out)
    self.roles.append((rhs_out, 2))
    out: list[AxisAtoms] = [None] * len(out_shapes[0])
    out[out_spec[0]] = lhs[lhs_spec[0]]
    out[out_spec[1]] = rhs_out
    return [out]

  def _dot_general(self, eqn, ins, in_shapes, out_shapes, where):
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    lhs, rhs = ins[0], ins[1]
    self.layers.append(('dense', eqn, list(lhs), list(rhs), where))
    for a, b in zip(lc, rc):
      self.tie(lhs[a], rhs[b])
      for x in (lhs[a], rhs[b]):
        if x is not None:
          self.roles.append((x, 1))
    for a, b in zip(lb, rb):
      self.tie(lhs[a], rhs[b])
    out = [lhs[a] if lhs[a] is not None else rhs[b] for a, b in zip(lb, rb)]
    for atoms, contracted in ((lhs, set(lc) | set(lb)), (rhs, set(rc) | set(rb))):
      for d, a in enumerate(atoms):
        if d in contracted:
          continue
        if a is not None:
          self.producers.append(a)
          self.roles.append((a, 2))
        out.append(a)
    return [out]


# ----------------------------------------------------------------------------------------------
# Public entry point.


def _default_apply_kwargs(model: nn.Module) -> dict[str, Any]:
  try:
    params = inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    return {}
  return {'train': False} if 'train' in params else {}


def _components(n: int, ties: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
  if ties:
    a = np.concatenate([t[0] for t in ties])
    b = np.concatenate([t[1] for t in ties])
  else:
    a = b = np.zeros((0,), np.int64)
  graph = scipy.sparse.coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
  return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def discover_groups(model: Union[nn.Module, Callable[..., Any]], variables: Mapping[str, Any],
                    example_input: Any, *, apply_kwargs: Optional[Mapping[str, Any]] = None,
                    on_unsupported: str = 'error',
                    elementwise_primitives: Iterable[str] = (),
                    layer_records: Optional[list] = None) -> Groups:
  """Finds every group of parameter axes that must be pruned together.

  Args:
    model: a Flax linen module (called as ``model.apply(variables, x, **apply_kwargs)``) or any
      function ``f(variables, x)`` built from JAX primitives.
    variables: the model's variables (``{'params': ..., 'batch_stats': ...}``); only shapes and
      dtypes are used (abstract ``jax.ShapeDtypeStruct`` leaves are fine).
    example_input: an input (array or pytree; only its shape/dtype matter), e.g. ``[1, H, W, C]``.
    apply_kwargs: extra keyword arguments for ``model.apply``; default ``{'train': False}`` when
      ``model.__call__`` takes ``train``, else none.
    on_unsupported: ``'error'`` (default) raises :class:`UnsupportedLayerError` when an
      otherwise prunable group passes through a layer that cannot be followed; ``'freeze'``
      keeps such groups with ``prunable=False``.
    elementwise_primitives: names of extra primitives to treat as element-wise (a declaration
      for custom primitives whose channels line up one to one).
    layer_records: a list to which one :class:`LayerRecord` per conv/dense layer (a
      ``conv_general_dilated`` or ``dot_general`` with a parameter kernel) is appended, in call
      order: the same analysis, read by the latency model (see :func:`trace_layers`).

  Returns:
    All channel groups (prunable or not) in call order of their first producer.

  Design choice: the grouping unit is the producing parameter axis (all channels made by the same
  kernel axis form one group, merged across residual adds), so a concatenation of two conv
  outputs leaves two groups whose consumer rows are offset-mapped; BatchNorm running statistics
  are members too (removed with their channels).
  """
  if on_unsupported not in ('error', 'freeze'):
    raise ValueError(f"on_unsupported must be 'error' or 'freeze', got {on_unsupported!r}")
  from ttmpd_jax.pruning import layers as layer_kinds  # pylint: disable=g-import-not-at-top
  kwargs: dict[str, Any] = {}
  if layer_kinds.is_model(model):  # A linen module or an NNX adapter (``pruning.nnx``).
    kwargs = dict(_default_apply_kwargs(model) if apply_kwargs is None else apply_kwargs)
    apply_fn = lambda v, x: model.apply(v, x, **kwargs)
  else:
    apply_fn = model

  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  paths = [key_path(kp) for kp, _ in flat]
  leaves = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, 'dtype', np.float32)) for _, x in flat]
  x_flat, x_def = jax.tree_util.tree_flatten(example_input)
  x_abs = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, 'dtype', np.float32)) for x in x_flat]

  def fn(leaf_list, x_list):
    return apply_fn(jax.tree_util.tree_unflatten(treedef, leaf_list),
                    jax.tree_util.tree_unflatten(x_def, x_list))

  closed = jax.make_jaxpr(fn)(leaves, x_abs)

  tracer = _Tracer(_ELEMENTWISE | frozenset(elementwise_primitives))
  leaf_atoms = [[tracer.new(int(n), leaf=i, axis=d) for d, n in enumerate(leaf.shape)]
                for i, leaf in enumerate(leaves)]
  input_atoms = [tracer.fresh(x.shape, 'input') for x in x_abs]
  const_atoms = [tracer._const(c) for c in closed.consts]
  outs = tracer.run(closed.jaxpr, const_atoms, leaf_atoms + input_atoms, '')
  for atoms in outs:
    tracer.flags['output'].extend(a for a in atoms if a is not None)
  # Parameters of layers that cannot be rebuilt smaller (see ``layers.py``) block their groups;
  # these reasons come first, as they name the layer kind.
  refused = layer_kinds.unsupported_leaves(model, jax.tree_util.tree_unflatten(treedef, leaves),
                                           jax.tree_util.tree_unflatten(x_def, x_abs), kwargs)
  tracer.blocked[:0] = [(a, refused[path]) for i, path in enumerate(paths) if path in refused
                        for a in leaf_atoms[i]]

  groups = _build_groups(tracer, paths, leaves, leaf_atoms, on_unsupported)
  if layer_records is not None:
    layer_records.extend(_layer_records(tracer, paths, groups))
  return groups


def _build_groups(tracer: _Tracer, paths: list[Path], leaves, leaf_atoms,
                  on_unsupported: str) -> Groups:
  n = tracer.count
  comp = _components(n, tracer.ties)
  n_comp = int(comp.max()) + 1 if n else 0

  owner_leaf = np.full(n, -1, np.int64)
  owner_axis = np.full(n, -1, np.int64)
  for start, size, leaf, axis in tracer.leaf_ranges:
    owner_leaf[start:start + size] = leaf
    owner_axis[start:start + size] = axis
  role_code = np.zeros(n, np.int8)
  for atoms, code in tracer.roles:
    role_code[atoms] = np.maximum(role_code[atoms], code)

  comp_flag: dict[str, np.ndarray] = {}
  for flag, arrays in tracer.flags.items():
    mark = np.zeros(n_comp, bool)
    for a in arrays:
      mark[comp[a]] = True
    comp_flag[flag] = mark
  comp_blocked: dict[int, str] = {}
  for atoms, reason in tracer.blocked:
    for c in np.unique(comp[atoms]):
      comp_blocked.setdefault(int(c), reason)

  # Producer axes in call order; channels made by the same axis form one group.
  producer_keys: list[tuple[int, int]] = []
  seen = set()
  for atoms in tracer.producers:
    if atoms is None:
      continue
    pairs = np.unique(np.stack([owner_leaf[atoms], owner_axis[atoms]], axis=1), axis=0)
    for leaf, axis in pairs:
      key = (int(leaf), int(axis))
      if leaf >= 0 and key not in seen:
        seen.add(key)
        producer_keys.append(key)

  # Union the components of each producer axis.
  a_list, b_list = [], []
  for leaf, axis in producer_keys:
    c = comp[leaf_atoms[leaf][axis]]
    a_list.append(c[:-1])
    b_list.append(c[1:])
  group_of_comp = _components(n_comp, list(zip(a_list, b_list)))
  is_produced = np.zeros(n_comp, bool)
  for leaf, axis in producer_keys:
    is_produced[comp[leaf_atoms[leaf][axis]]] = True

  # Groups in call order; channel order follows the producers' positions.
  supergroup_ids: list[int] = []
  channel_of_comp = np.full(n_comp, -1, np.int64)
  group_size: dict[int, int] = {}
  first_producer: dict[int, tuple[int, int]] = {}
  for leaf, axis in producer_keys:
    comps = comp[leaf_atoms[leaf][axis]]
    sg = int(group_of_comp[comps[0]])
    if sg not in group_size:
      supergroup_ids.append(sg)
      group_size[sg] = 0
      first_producer[sg] = (leaf, axis)
    for c in comps:
      if channel_of_comp[c] < 0:
        channel_of_comp[c] = group_size[sg]
        group_size[sg] += 1

  # Members: every leaf axis position whose channel lies in a group.
  members: dict[int, list[Member]] = {sg: [] for sg in supergroup_ids}
  comp_group = np.where(is_produced, group_of_comp, -1)
  for leaf, atoms_per_axis in enumerate(leaf_atoms):
    for axis, atoms in enumerate(atoms_per_axis):
      if atoms.size == 0:
        continue
      comps = comp[atoms]
      groups_here = comp_group[comps]
      for sg in np.unique(groups_here):
        if sg < 0:
          continue
        sg = int(sg)
        index = np.where(groups_here == sg, channel_of_comp[comps], -1)
        role = {0: 'other', 1: 'in', 2: 'out'}[int(role_code[atoms[groups_here == sg]].max())]
        identity = index.size == group_size[sg] and np.array_equal(index, np.arange(index.size))
        members[sg].append(Member(paths[leaf], axis, role,
                                  None if identity else tuple(int(i) for i in index)))

  # Names, flags and the final records.
  comps_of_group: dict[int, np.ndarray] = {}
  order = np.argsort(group_of_comp, kind='stable')
  bounds = np.searchsorted(group_of_comp[order], np.arange(group_of_comp.max() + 2 if n_comp else 1))
  for sg in supergroup_ids:
    comps_of_group[sg] = order[bounds[sg]:bounds[sg + 1]]

  names_used: dict[str, int] = {}
  result = []
  for sg in supergroup_ids:
    leaf, axis = first_producer[sg]
    path = paths[leaf]
    module = path[1:-1] if len(path) > 2 and path[0] == 'params' else path[:-1]
    name = '/'.join(module) or '/'.join(path)
    names_used[name] = names_used.get(name, 0) + 1
    if names_used[name] > 1:
      name = f'{name}:{axis}'
    comps = comps_of_group[sg]
    reason = ''
    if comp_flag['output'][comps].any():
      reason = 'feeds the model output'
    elif comp_flag['input'][comps].any():
      reason = 'tied to the model input'
    elif comp_flag['fixed'][comps].any():
      reason = 'tied to a constant array of fixed size'
    else:
      blocked = [comp_blocked[int(c)] for c in comps if int(c) in comp_blocked]
      if blocked:
        reason = blocked[0]
        if on_unsupported == 'error':
          raise UnsupportedLayerError(
              f"cannot prune channel group '{name}': its channels pass through {reason}. "
              "Per-channel layers (conv, dense, BatchNorm, pooling, element-wise activations), "
              "residual adds, concatenations and flattens can be followed. Pass "
              "on_unsupported='freeze' to keep this group unpruned, or "
              'elementwise_primitives=(...) if the primitive is element-wise.')
    result.append(ChannelGroup(name, group_size[sg], tuple(members[sg]), prunable=not reason,
                               reason=reason))
  return tuple(result)


# ----------------------------------------------------------------------------------------------
# Layer records: the same trace, read per conv/dense layer (used by the latency model).


@dataclasses.dataclass(frozen=True)
class LayerRecord:
  """One conv/dense layer of a traced model, with the channel groups on its feature axes.

  Attributes:
    module: module path of the kernel (its width-spec key), e.g. ``'stage1_block0/conv1'``.
    kernel: variable path of the kernel leaf.
    kind: ``'conv'`` (``conv_general_dilated``) or ``'dense'`` (``dot_general``).
    layer: the name stack it was traced under.
    input_shape, output_shape: shapes of the activation operand and of the result.
    c_in, c_out: input features (the contracted size; after a flatten, spatial x channels) and
      output features of the unpruned layer.
    kernel_size, strides, padding: spatial kernel size, window strides and explicit padding of a
      conv (empty for dense).
    feature_group_count: of a conv (1 for dense).
    depthwise: a conv with ``feature_group_count == c_in == c_out`` (it makes no new channels).
    inputs: ``(group name, member)`` for every group with positions on the axis that indexes the
      layer's input features (the kernel's input axis; a depthwise kernel's output axis). Several
      groups after a concatenation; ``member.index`` maps positions to channels (a flatten
      repeats each channel once per spatial position). Positions of no group are fixed
      (model-input channels).
    outputs: the same for the kernel's output axis.
  """

  module: str
  kernel: Path
  kind: str
  layer: str
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  c_in: int
  c_out: int
  kernel_size: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: tuple[tuple[int, int], ...] = ()
  feature_group_count: int = 1
  depthwise: bool = False
  inputs: tuple[tuple[str, Member], ...] = ()
  outputs: tuple[tuple[str, Member], ...] = ()


def _kernel_leaf(atoms: Sequence[AxisAtoms], owner_leaf: np.ndarray,
                 owner_axis: np.ndarray) -> Optional[tuple[int, list[int]]]:
  """(leaf, leaf axis of each operand axis) when the operand is a parameter leaf, else None."""
  if not atoms or any(a is None or a.size == 0 for a in atoms):
    return None
  leaves = {int(owner_leaf[a[0]]) for a in atoms}
  if len(leaves) != 1 or -1 in leaves:
    return None
  return leaves.pop(), [int(owner_axis[a[0]]) for a in atoms]


def _layer_records(tracer: _Tracer, paths: list[Path], groups: Groups) -> list[LayerRecord]:
  owner_leaf = np.full(tracer.count, -1, np.int64)
  owner_axis = np.full(tracer.count, -1, np.int64)
  for start, size, leaf, axis in tracer.leaf_ranges:
    owner_leaf[start:start + size] = leaf
    owner_axis[start:start + size] = axis
  on_axis: dict[tuple[Path, int], list[tuple[str, Member]]] = {}
  for g in groups:
    for m in g.members:
      on_axis.setdefault((m.path, m.axis), []).append((g.name, m))
  records = []
  for kind, eqn, lhs, rhs, where in tracer.layers:
    in_shapes = [tuple(v.aval.shape) for v in eqn.invars]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if kind == 'conv':
      lhs_spec, rhs_spec, out_spec = eqn.params['dimension_numbers']
      found = _kernel_leaf(rhs, owner_leaf, owner_axis)
      if found is None:
        continue
      leaf, axes = found
      x_shape = in_shapes[0]
      c_in, c_out = x_shape[lhs_spec[1]], in_shapes[1][rhs_spec[0]]
      fgc = int(eqn.params['feature_group_count'])
      depthwise = fgc > 1 and fgc == c_in == c_out
      in_axis = axes[rhs_spec[0]] if depthwise else axes[rhs_spec[1]]
      out_axis = axes[rhs_spec[0]]
      extra = dict(kernel_size=tuple(in_shapes[1][d] for d in rhs_spec[2:]),
                   strides=tuple(int(s) for s in eqn.params['window_strides']),
                   padding=tuple((int(lo), int(hi)) for lo, hi in eqn.params['padding']),
                   feature_group_count=fgc, depthwise=depthwise)
    else:
      (lc, rc), _ = eqn.params['dimension_numbers']
      # The kernel is the rank-2 parameter operand with one contracted axis (usually rhs).
      found = None
      for kernel, contracted, x_shape, k_shape in ((rhs, rc, in_shapes[0], in_shapes[1]),
                                                   (lhs, lc, in_shapes[1], in_shapes[0])):
        if len(kernel) == 2 and len(contracted) == 1:
          found = _kernel_leaf(kernel, owner_leaf, owner_axis)
          if found is not None:
            break
      if found is None:
        continue
      leaf, axes = found
      in_axis, out_axis = axes[contracted[0]], axes[1 - contracted[0]]
      c_in, c_out = k_shape[contracted[0]], k_shape[1 - contracted[0]]
      extra = {}
    path = paths[leaf]
    module = path[1:-1] if len(path) > 2 and path[0] == 'params' else path[:-1]
    records.append(LayerRecord(
        '/'.join(module) or '/'.join(path), path, kind, where, tuple(x_shape), out_shape,
        int(c_in), int(c_out), inputs=tuple(on_axis.get((path, in_axis), ())),
        outputs=tuple(on_axis.get((path, out_axis), ())), **extra))
  return records


def trace_layers(model: Union[nn.Module, Callable[..., Any]], variables: Mapping[str, Any],
                 example_input: Any, **kwargs: Any) -> tuple[Groups, tuple[LayerRecord, ...]]:
  """:func:`discover_groups` plus one :class:`LayerRecord` per conv/dense layer (one trace).

  ``kwargs`` are those of :func:`discover_groups`. Layers whose kernel is not a parameter leaf
  (a product of two activations) are not recorded.
  """
  records: list[LayerRecord] = []
  groups = discover_groups(model, variables, example_input, layer_records=records, **kwargs)
  return groups, tuple(records)
