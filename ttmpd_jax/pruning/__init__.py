"""Functional structured pruning for Flax: discover channel groups, mask, score, remove.

Typical flow (the library example in ``README.md``)::

  groups = discover_groups(model, variables, x)            # once per architecture
  scores = l2_norm(variables, groups)                      # {group name: [size]}
  masks = masks_from_scores(scores, groups, keep=0.5, round_to=8)
  masked = apply_masks(variables, masks, groups)           # same shapes, jit-friendly
  small = remove_channels(variables, groups, masks)        # physically smaller
  y = run_pruned(model, small, x)                          # == model.apply(masked, x)

``model`` is a linen module or, for Flax NNX, the adapter of ``from_nnx(module)`` (same
``apply(variables, x, train=..., mutable=...)`` convention; ``adapter.to_module(small)`` is an
``nnx.Module`` of the new sizes). The layer kinds that discovery, removal, ``run_pruned`` and
``count_cost`` support are listed in :mod:`ttmpd_jax.pruning.layers`; any other layer touching
a channel is refused at discovery.

The law the tests enforce: for any masks keeping >= 1 channel per group, the masked model and
the physically pruned model give the same outputs.
"""
from ttmpd_jax.pruning.cost import Cost, CostModel, cost_model, count_cost
from ttmpd_jax.pruning.graph import (ChannelGroup, Member, UnsupportedLayerError, discover_groups,
                                     group_by_name, prunable_groups)
from ttmpd_jax.pruning.importance import (CRITERIA, bn_scale, l1_norm, l2_norm, per_channel,
                                          random_scores, taylor)
from ttmpd_jax.pruning.masks import (MaskError, apply_masks, keep_all, kept_counts,
                                     masks_from_scores, masks_remove_lowest, random_masks,
                                     round_keep, validate_masks)
from ttmpd_jax.pruning import layers, unstructured
from ttmpd_jax.pruning.layers import LINEN_SUPPORTED, NNX_SUPPORTED
from ttmpd_jax.pruning.nnx import NNXModel, from_nnx
from ttmpd_jax.pruning.run import run_pruned
from ttmpd_jax.pruning.surgery import (embed_channels, remove_channels, remove_channels_from_state,
                                       shrink_groups)

__all__ = [
    'ChannelGroup', 'Member', 'UnsupportedLayerError', 'discover_groups', 'group_by_name',
    'prunable_groups', 'MaskError', 'apply_masks', 'keep_all', 'kept_counts', 'masks_from_scores',
    'masks_remove_lowest', 'random_masks', 'round_keep', 'validate_masks', 'remove_channels',
    'remove_channels_from_state', 'shrink_groups', 'embed_channels', 'run_pruned', 'l1_norm',
    'l2_norm', 'bn_scale',
    'taylor', 'random_scores', 'per_channel', 'CRITERIA', 'Cost', 'CostModel', 'cost_model',
    'count_cost', 'unstructured', 'layers', 'LINEN_SUPPORTED', 'NNX_SUPPORTED', 'NNXModel',
    'from_nnx',
]
