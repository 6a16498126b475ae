"""Channel importance criteria: pure functions returning per-channel scores for every group.

Each criterion scores each *member* of a group per channel (a filter norm of a producing kernel,
a BatchNorm scale, a Taylor term), then aggregates across the group's members (a residual group
has several producing convs and BatchNorms): ``aggregate='sum'|'mean'|'max'``, optionally
normalised per group (``normalize='mean'|'max'|'sum'``) so scores compare across groups.

All criteria return ``{group name: float32 [group.size]}`` for the prunable groups; higher means
more important. Turn them into masks with ``masks.masks_from_scores`` / ``masks_remove_lowest``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning.graph import ChannelGroup, Member, Path, key_path

Scores = dict[str, jax.Array]

_MEMBER_SETS = ('out', 'in', 'all')


def _leaves_by_path(tree: Any, prefix: Path = ()) -> dict[Path, jax.Array]:
  return {prefix + key_path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def per_channel(values: jax.Array, member: Member, size: int,
                reduce: Callable[[jax.Array, tuple[int, ...]], jax.Array]) -> jax.Array:
  """Reduces ``values`` (shaped like the member's leaf) to float32 [size], one per channel.

  ``reduce(x, axes)`` reduces over all other axes; positions that map to the same channel (a
  flatten into a Dense layer) are then summed, positions of other groups dropped.
  """
  axes = tuple(d for d in range(values.ndim) if d != member.axis)
  # Design choice: the reduction always runs (over no axes for a 1-D leaf), so |.| and (.)^2
  # apply to [C] weights too.
  per_position = reduce(values.astype(jnp.float32), axes)
  if member.index is None:
    return per_position
  index = np.asarray(member.index)
  index = np.where(index < 0, size, index)
  return jax.ops.segment_sum(per_position, jnp.asarray(index), num_segments=size + 1)[:size]


def _aggregate(per_member: list[jax.Array], size: int, aggregate: str,
               normalize: Optional[str]) -> jax.Array:
  if not per_member:
    return jnp.zeros((size,), jnp.float32)
  stack = jnp.stack(per_member)
  if aggregate == 'sum':
    s = stack.sum(0)
  elif aggregate == 'mean':
    s = stack.mean(0)
  elif aggregate == 'max':
    s = stack.max(0)
  else:
    raise UserError(f"aggregate must be 'sum', 'mean' or 'max', got {aggregate!r}")
  if normalize is None:
    return s
  if normalize == 'mean':
    d = s.mean()
  elif normalize == 'max':
    d = s.max()
  elif normalize == 'sum':
    d = s.sum()
  else:
    raise UserError(f"normalize must be None, 'mean', 'max' or 'sum', got {normalize!r}")
  return s / jnp.maximum(d, jnp.finfo(jnp.float32).tiny)


def _select(group: ChannelGroup, members: str, collection: str = 'params') -> list[Member]:
  if members not in _MEMBER_SETS:
    raise UserError(f'members must be one of {_MEMBER_SETS}, got {members!r}')
  roles = ('out', 'in') if members == 'all' else (members,)
  return [m for m in group.members if m.role in roles and m.path[0] == collection]


def _norm_scores(variables, groups, p: int, members: str, aggregate: str,
                 normalize: Optional[str]) -> Scores:
  leaves = _leaves_by_path(variables)
  reduce = ((lambda x, a: jnp.abs(x).sum(a)) if p == 1 else
            (lambda x, a: jnp.square(x).sum(a)))
  scores = {}
  for g in groups:
    if not g.prunable:
      continue
    per_member = [per_channel(leaves[m.path], m, g.size, reduce) for m in _select(g, members)]
    if p == 2:
      per_member = [jnp.sqrt(s) for s in per_member]
    scores[g.name] = _aggregate(per_member, g.size, aggregate, normalize)
  return scores


def l1_norm(variables: Mapping[str, Any], groups: Sequence[ChannelGroup], *,
            members: str = 'out', aggregate: str = 'sum',
            normalize: Optional[str] = None) -> Scores:
  """L1 norm of each channel's filter(s) (Li et al. 2017).

  Args:
    members: which kernel slices: ``'out'`` (the producing filters, default), ``'in'`` (the
      consumers' input slices) or ``'all'``.
  Design choice: flattened Dense rows of one channel are summed before the norm's final step
  (the channel's whole slice is one filter).
  """
  return _norm_scores(variables, groups, 1, members, aggregate, normalize)


def l2_norm(variables: Mapping[str, Any], groups: Sequence[ChannelGroup], *,
            members: str = 'out', aggregate: str = 'sum',
            normalize: Optional[str] = None) -> Scores:
  """L2 norm of each channel's filter(s); the default TT-MPD criterion. See :func:`l1_norm`."""
  return _norm_scores(variables, groups, 2, members, aggregate, normalize)


def _bn_pairs(group: ChannelGroup) -> list[tuple[Member, Optional[Member]]]:
  """(scale, bias) members of the normalisation layers in a group (bias may be missing)."""
  by_module = {}
  for m in group.members:
    if m.role == 'other' and m.path[0] == 'params' and m.path[-1] in ('scale', 'bias'):
      by_module.setdefault(m.path[:-1], {})[m.path[-1]] = m
  return [(d['scale'], d.get('bias')) for d in by_module.values() if 'scale' in d]


def bn_scale(variables: Mapping[str, Any], groups: Sequence[ChannelGroup], *,
             aggregate: str = 'sum', normalize: Optional[str] = None) -> Scores:
  """|gamma| of the BatchNorm (or any norm layer with a ``scale``) after each channel (Network
  Slimming, Liu et al. 2017); summed over the group's norm layers."""
  leaves = _leaves_by_path(variables)
  scores = {}
  for g in groups:
    if g.prunable:
      per_member = [per_channel(jnp.abs(leaves[s.path]), s, g.size, lambda x, a: x.sum(a))
                    for s, _ in _bn_pairs(g)]
      scores[g.name] = _aggregate(per_member, g.size, aggregate, normalize)
  return scores


def taylor(variables: Mapping[str, Any], grads: Mapping[str, Any],
           groups: Sequence[ChannelGroup], *, on: str = 'bn', aggregate: str = 'sum',
           normalize: Optional[str] = None) -> Scores:
  """First-order Taylor importance (Molchanov et al. 2019; HALP, Shen et al. 2022).

  Args:
    variables: the model's variables.
    grads: gradients of the loss w.r.t. ``variables['params']`` (same tree structure), e.g.
      accumulated over a few batches.
    on: ``'bn'``: ``|gamma * dL/dgamma + beta * dL/dbeta|`` per norm layer (HALP's choice);
      ``'weight'``: ``|sum_w w * dL/dw|`` over each producing filter (``role == 'out'``).

  Design choice: with ``on='bn'``, a group without a norm layer (e.g. a hidden Dense layer)
  falls back to the weight form, so its channels are not all scored 0.
  """
  if on not in ('bn', 'weight'):
    raise UserError(f"taylor(on=...) must be 'bn' or 'weight', got {on!r}")
  leaves = _leaves_by_path(variables)
  grad_leaves = _leaves_by_path(grads, ('params',))
  scores = {}
  for g in groups:
    if not g.prunable:
      continue
    per_member = []
    if on == 'bn' and _bn_pairs(g):
      for s, b in _bn_pairs(g):
        term = leaves[s.path] * grad_leaves[s.path]
        if b is not None:
          term = term + leaves[b.path] * grad_leaves[b.path]
        per_member.append(jnp.abs(per_channel(term, s, g.size, lambda x, a: x.sum(a))))
    else:
      for m in _select(g, 'out'):
        term = leaves[m.path] * grad_leaves[m.path]
        per_member.append(jnp.abs(per_channel(term, m, g.size, lambda x, a: x.sum(a))))
    scores[g.name] = _aggregate(per_member, g.size, aggregate, normalize)
  return scores


def random_scores(key: jax.Array, groups: Sequence[ChannelGroup]) -> Scores:
  """Uniform random scores (the random-pruning baseline); one fold of ``key`` per group."""
  return {g.name: jax.random.uniform(jax.random.fold_in(key, i), (g.size,))
          for i, g in enumerate(groups) if g.prunable}


CRITERIA: dict[str, Callable[..., Scores]] = {
    'l1': l1_norm, 'l2': l2_norm, 'bn_scale': bn_scale,
}
