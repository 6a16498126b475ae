"""Channel masks: one boolean vector per prunable group (True = keep), applied without reshaping.

``apply_masks(variables, masks, groups)`` returns variables of the same shapes in which every
pruned channel contributes exactly nothing downstream, so one compiled function evaluates any
candidate mask. It is pure and differentiable: gradients of pruned positions are exactly zero,
so masked training keeps pruned channels at zero.

Why the result equals physical removal (``surgery.remove_channels``): every ``params`` member of
a masked channel is zeroed, which covers (a) the consumers' input rows (kernel axes contracted
against the channel): whatever the channel holds, it adds nothing to any later layer, and (b) the
producers' output filters plus the per-channel BatchNorm scale and bias: the channel itself is
exactly 0 after BN (``(0 - mean) * 0 * rsqrt(var + eps) + 0``), so residual sums, pooling and
adaptive-BN statistics see zeros too. Channels tied to the model output are never prunable.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.errors import UserError
from ttmpd_jax.pruning.graph import ChannelGroup, Path, key_path

Masks = Mapping[str, Any]  # group name -> bool [group.size]; True keeps the channel.


class MaskError(UserError):
  """Masks that do not fit the channel groups (unknown names, wrong sizes, empty groups)."""


def keep_all(groups: Sequence[ChannelGroup]) -> dict[str, jax.Array]:
  """All-True masks for every prunable group (the unpruned model)."""
  return {g.name: jnp.ones((g.size,), bool) for g in groups if g.prunable}


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def validate_masks(masks: Masks, groups: Sequence[ChannelGroup]) -> None:
  """Raises :class:`MaskError` unless ``masks`` fits ``groups``.

  Checks names (each must be a prunable group), shapes (``[group.size]``), dtype (bool) and, for
  concrete (non-traced) masks, that every group keeps at least one channel. Groups missing from
  ``masks`` keep all their channels.
  """
  by_name = {g.name: g for g in groups}
  for name, mask in masks.items():
    group = by_name.get(name)
    if group is None:
      valid = ', '.join(repr(g.name) for g in groups if g.prunable)
      raise MaskError(f'mask for unknown channel group {name!r}; prunable groups: {valid}')
    if not group.prunable:
      raise MaskError(f'channel group {name!r} is not prunable ({group.reason}); drop its mask')
    shape = tuple(np.shape(mask))
    if shape != (group.size,):
      raise MaskError(f'mask for channel group {name!r} has shape {shape}, expected '
                      f'({group.size},) (one boolean per channel)')
    dtype = mask.dtype if hasattr(mask, 'dtype') else np.asarray(mask).dtype
    if dtype != bool:
      raise MaskError(f'mask for channel group {name!r} has dtype {dtype}, expected bool')
    if _is_concrete(mask) and not bool(np.any(np.asarray(mask))):
      raise MaskError(f'mask for channel group {name!r} keeps no channel; every group must keep '
                      'at least one')


@functools.lru_cache(maxsize=64)
def _plan(groups: tuple[ChannelGroup, ...], collections: tuple[str, ...]
          ) -> dict[Path, tuple[tuple[int, str, Optional[np.ndarray]], ...]]:
  """leaf path -> ((axis, group name, position->channel index or None), ...)."""
  plan: dict[Path, list] = {}
  for g in groups:
    if not g.prunable:
      continue
    for m in g.members:
      if m.path[0] not in collections:
        continue
      # Index -1 (another group's position) reads the appended always-True entry.
      index = None if m.index is None else np.where(np.asarray(m.index) < 0, g.size,
                                                    np.asarray(m.index)).astype(np.int32)
      plan.setdefault(m.path, []).append((m.axis, g.name, index))
  return {k: tuple(v) for k, v in plan.items()}


def position_keep(mask: jax.Array, index: Optional[np.ndarray]) -> jax.Array:
  """Per-position keep vector of a member from its group's per-channel mask."""
  if index is None:
    return mask
  return jnp.concatenate([mask, jnp.ones((1,), bool)])[index]


def apply_masks(variables: Mapping[str, Any], masks: Masks, groups: Sequence[ChannelGroup], *,
                collections: Sequence[str] = ('params',), validate: bool = True) -> Any:
  """Zeroes every member of every masked channel; same tree structure, shapes and dtypes.

  Args:
    variables: the model's variables (``{'params': ..., 'batch_stats': ...}``).
    masks: group name -> bool ``[group.size]`` (True keeps); missing groups keep everything.
    groups: from :func:`discover_groups`.
    collections: which top-level collections to mask.
    validate: check names/shapes (and emptiness, when concrete); cheap, static under ``jit``.

  Returns:
    Variables whose masked channels contribute exactly nothing downstream.

  Design choice: only ``params`` are masked by default; BatchNorm running statistics stay
  untouched because a zero scale and bias already make the BN output exactly 0 whatever they
  hold, and keeping them lets an unmasked candidate reuse them unchanged. Zeroing (``where``, not
  multiplication) keeps results finite even if a pruned weight is inf/nan.
  """
  groups = tuple(groups)
  if validate:
    validate_masks(masks, groups)
  plan = _plan(groups, tuple(collections))
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for kp, leaf in flat:
    entries = plan.get(key_path(kp))
    keep = None
    if entries:
      for axis, name, index in entries:
        if name not in masks:
          continue
        k = position_keep(jnp.asarray(masks[name], bool), index)
        shape = [1] * jnp.ndim(leaf)
        shape[axis] = -1
        k = k.reshape(shape)
        keep = k if keep is None else keep & k
    out.append(leaf if keep is None else jnp.where(keep, leaf, jnp.zeros((), leaf.dtype)))
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# From scores to masks.


def round_keep(keep: float, size: int, round_to: int = 1) -> int:
  """A keep count rounded to the nearest multiple of ``round_to``, within ``[1, size]``.

  Rounding never empties a group (at least ``min(round_to, size)`` channels stay) and never
  exceeds ``size`` (a group smaller than a multiple keeps all its channels).
  """
  if round_to < 1:
    raise UserError(f'round_to must be >= 1, got {round_to}')
  k = int(round(keep / round_to)) * round_to
  return int(min(size, max(k, min(round_to, size), 1)))


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
  """bool mask keeping the ``k`` highest scores (ties: lower index wins)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind='stable')
  mask = np.zeros(scores.shape[0], bool)
  mask[order[:k]] = True
  return mask


def masks_from_scores(scores: Mapping[str, Any], groups: Sequence[ChannelGroup],
                      keep: Union[float, int, Mapping[str, Union[float, int]]], *,
                      round_to: int = 1) -> dict[str, np.ndarray]:
  """Keeps the highest-scoring channels of each prunable group.

  Args:
    scores: group name -> float ``[group.size]`` (higher = more important); groups without
      scores keep everything.
    groups: from :func:`discover_groups`.
    keep: a ratio in (0, 1] (float) or a channel count (int), the same for every group, or a
      mapping group name -> ratio or count.
    round_to: keep counts are rounded to a multiple of this (hardware-friendly widths).

  Returns:
    group name -> numpy bool ``[group.size]``.
  """
  out = {}
  by_name = {g.name: g for g in groups}
  for name in scores:
    if name not in by_name or not by_name[name].prunable:
      raise MaskError(f'scores for unknown or unprunable channel group {name!r}')
  for g in groups:
    if not g.prunable or g.name not in scores:
      continue
    k = keep.get(g.name, 1.0) if isinstance(keep, Mapping) else keep
    count = k * g.size if isinstance(k, float) else k
    if isinstance(k, float) and not 0.0 < k <= 1.0:
      raise MaskError(f'keep ratio for group {g.name!r} must lie in (0, 1], got {k}')
    s = np.asarray(scores[g.name])
    if s.shape != (g.size,):
      raise MaskError(f'scores for channel group {g.name!r} have shape {s.shape}, expected '
                      f'({g.size},)')
    out[g.name] = _top_k_mask(s, round_keep(count, g.size, round_to))
  return out


def masks_remove_lowest(scores: Mapping[str, Any], groups: Sequence[ChannelGroup],
                        remove: Mapping[str, int],
                        base: Optional[Masks] = None) -> dict[str, np.ndarray]:
  """Removes the ``remove[name]`` lowest-scoring still-kept channels of each named group.

  This is one pruning candidate of an iterative search: ``base`` (default: keep all) with a few
  more channels of some groups switched off. Raises if a group would be left empty.
  """
  by_name = {g.name: g for g in groups}
  out = {g.name: np.ones((g.size,), bool) for g in groups if g.prunable}
  if base is not None:
    validate_masks(base, groups)
    out.update({k: np.asarray(v, bool).copy() for k, v in base.items()})
  for name, n in remove.items():
    group = by_name.get(name)
    if group is None or not group.prunable:
      raise MaskError(f'cannot remove channels of unknown or unprunable channel group {name!r}')
    mask = out[name]
    kept = int(mask.sum())
    if not 0 <= n < kept:
      raise MaskError(f'cannot remove {n} channels of group {name!r}: it keeps {kept}, and at '
                      'least one must stay')
    s = np.where(mask, np.asarray(scores[name], np.float64), np.inf)
    drop = np.argsort(s, kind='stable')[:n]
    mask[drop] = False
  return out


def random_masks(seed: int, groups: Sequence[ChannelGroup], *,
                 keep_prob: Optional[float] = None) -> dict[str, np.ndarray]:
  """Random masks keeping at least one channel per prunable group (property tests, baselines).

  Each group keeps each channel with probability ``keep_prob`` (default: a per-group probability
  drawn uniformly, so nearly-empty and nearly-full groups both occur); one random channel is
  always kept.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for g in groups:
    if g.prunable:
      p = rng.uniform(0.05, 1.0) if keep_prob is None else keep_prob
      mask = rng.random(g.size) < p
      mask[rng.integers(g.size)] = True
      out[g.name] = mask
  return out


def kept_counts(masks: Masks) -> dict[str, int]:
  """group name -> number of kept channels (concrete masks)."""
  return {k: int(np.sum(np.asarray(v))) for k, v in masks.items()}
