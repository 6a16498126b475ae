"""Structured removal: physically smaller variables (and optimizer state) from channel masks.

``remove_channels(variables, groups, masks)`` drops every masked channel from every member of its
group (params and batch_stats alike); the classifier's outputs are never in a prunable group, so
they stay. Running the result:

- zoo models: ``build_model(spec.with_widths_of(new_variables))``;
- any Flax model built from ``nn.Conv``/``nn.Dense``/norm layers whose code does not hard-code
  channel counts: :func:`ttmpd_jax.pruning.run_pruned`.

``shrink_groups(groups, masks)`` gives the groups of the smaller model without re-tracing (equal
to ``discover_groups`` on it), so an iterative search discovers once per architecture family.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.pruning.graph import ChannelGroup, Member, Path, key_path
from ttmpd_jax.pruning.masks import Masks, MaskError, validate_masks


def _axis_keeps(groups: Sequence[ChannelGroup], masks: Masks) -> dict[tuple[Path, int], np.ndarray]:
  """(leaf path, axis) -> bool [axis length] positions that survive."""
  keeps: dict[tuple[Path, int], np.ndarray] = {}
  for g in groups:
    if not g.prunable or g.name not in masks:
      continue
    mask = np.asarray(masks[g.name], bool)
    for m in g.members:
      index = m.channel_index(g.size)
      keep = np.where(index >= 0, mask[np.maximum(index, 0)], True)
      key = (m.path, m.axis)
      keeps[key] = keep if key not in keeps else keeps[key] & keep
  return keeps


def _concrete(masks: Masks, groups: Sequence[ChannelGroup]) -> dict[str, np.ndarray]:
  for name, m in masks.items():
    if isinstance(m, jax.core.Tracer):
      raise MaskError(f'remove_channels needs concrete masks (group {name!r} is traced): the '
                      'result shapes depend on them, so call it outside jax.jit')
  validate_masks(masks, groups)
  return {k: np.asarray(v, bool) for k, v in masks.items()}


def _remove(tree: Any, keeps: Mapping[tuple[Path, int], np.ndarray], prefix: Path = ()) -> Any:
  """Slices every leaf with a pruned axis.

  Design choice: slicing runs in NumPy on the host: removal happens once per search iteration,
  and an eager ``jnp.take`` would compile a gather for every new leaf shape (seconds for a
  ResNet-50 on CPU). NumPy leaves stay NumPy; other leaves come back as ``jax.Array``; untouched
  leaves are returned as they are.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for kp, leaf in flat:
    path = prefix + key_path(kp)
    axes = [(axis, keeps[(path, axis)]) for axis in range(np.ndim(leaf))
            if (path, axis) in keeps and not keeps[(path, axis)].all()]
    if axes:
      value = np.asarray(leaf)
      for axis, keep in axes:
        value = np.take(value, np.flatnonzero(keep), axis=axis)
      leaf = value if isinstance(leaf, np.ndarray) else jnp.asarray(value)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def remove_channels(variables: Mapping[str, Any], groups: Sequence[ChannelGroup],
                    masks: Masks) -> Any:
  """Variables with every masked channel physically removed (same tree structure, smaller leaves).

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of the model ``groups`` describe.
    groups: from :func:`discover_groups` (or :func:`shrink_groups`).
    masks: group name -> concrete bool ``[group.size]``; missing groups keep everything.
  """
  return _remove(variables, _axis_keeps(groups, _concrete(masks, groups)))


def remove_channels_from_state(state: Any, params: Any, groups: Sequence[ChannelGroup],
                               masks: Masks, *, collection: str = 'params') -> Any:
  """Prunes an optimizer state (e.g. optax momentum) alongside the parameters.

  Every subtree of ``state`` with the same tree structure as ``params`` (the ``collection`` part
  of the variables) is pruned like the parameters; everything else (step counts, schedules) is
  kept as is.
  """
  keeps = _axis_keeps(groups, _concrete(masks, groups))
  params_def = jax.tree_util.tree_structure(params)

  def is_params_like(x):
    return jax.tree_util.tree_structure(x) == params_def

  return jax.tree_util.tree_map(
      lambda sub: _remove(sub, keeps, (collection,)) if is_params_like(sub) else sub,
      state, is_leaf=is_params_like)


def shrink_groups(groups: Sequence[ChannelGroup], masks: Masks) -> tuple[ChannelGroup, ...]:
  """The channel groups of the model ``remove_channels(variables, groups, masks)`` returns.

  Names, members and call order are unchanged; sizes and index mappings shrink. Equal to calling
  :func:`discover_groups` on the smaller model, without tracing it.
  """
  masks = _concrete(masks, groups)
  keeps = _axis_keeps(groups, masks)
  out = []
  for g in groups:
    mask = masks.get(g.name, np.ones((g.size,), bool)) if g.prunable else np.ones((g.size,), bool)
    new_id = np.where(mask, np.cumsum(mask) - 1, -1)
    size = int(mask.sum())
    members = []
    for m in g.members:
      index = m.channel_index(g.size)
      keep = keeps.get((m.path, m.axis))
      if keep is not None:
        index = index[keep]
      index = np.where(index >= 0, new_id[np.maximum(index, 0)], -1)
      identity = index.size == size and np.array_equal(index, np.arange(size))
      members.append(Member(m.path, m.axis, m.role,
                            None if identity else tuple(int(i) for i in index)))
    out.append(ChannelGroup(g.name, size, tuple(members), g.prunable, g.reason))
  return tuple(out)


def embed_channels(small: Mapping[str, Any], full: Mapping[str, Any],
                   groups: Sequence[ChannelGroup], masks: Masks) -> Any:
  """The inverse of :func:`remove_channels`: ``small``'s values at the kept positions of a copy
  of ``full`` (removed positions keep ``full``'s values, which ``apply_masks`` then zeroes).

  So ``apply_masks(embed_channels(small, full, groups, masks), masks, groups)`` run by the
  unpruned model equals ``small`` run by :func:`run_pruned` — the masking law, for a network that
  was trained (fine-tuned) after its channels were removed. Host NumPy, like removal.
  """
  keeps = _axis_keeps(groups, _concrete(masks, groups))
  flat_full, treedef = jax.tree_util.tree_flatten_with_path(full)
  flat_small = jax.tree_util.tree_leaves(small)
  out = []
  for (kp, leaf), value in zip(flat_full, flat_small):
    path = key_path(kp)
    index = [np.flatnonzero(keeps[(path, a)]) if (path, a) in keeps else np.arange(n)
             for a, n in enumerate(np.shape(leaf))]
    merged = np.array(leaf, copy=True)
    merged[np.ix_(*index)] = np.asarray(value)
    out.append(merged)
  return jax.tree_util.tree_unflatten(treedef, out)
