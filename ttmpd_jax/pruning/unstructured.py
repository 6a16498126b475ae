"""Unstructured (per-weight) masks over Flax parameter trees.

Pipeline: score every weight (``magnitude_scores``, ``random_scores``, or ``gradient_saliency``
with any loss, e.g. SNIP's cross-entropy or a self-distillation objective), turn the scores into
a boolean mask at an exact sparsity (``global_mask`` ranks all prunable weights together,
``per_leaf_mask`` prunes every prunable leaf by the same fraction), then ``apply_weight_masks``
(jit-friendly: ``jnp.where``) wherever the parameters are used or updated.

Mask trees have the *same structure as the parameter tree*, with a bool array of the leaf's shape
(``True`` = keep) at every prunable leaf and ``None`` at every other leaf (biases, BatchNorm scales
and offsets). ``None`` is an empty pytree node, so ``jax.tree.leaves(masks)`` are exactly the
prunable masks, mask trees pass through ``jax.jit`` unchanged, and ``sparsity_of(masks)`` is the
sparsity of the prunable weights.

Design choice (which leaves are prunable): every ``kernel`` leaf of rank >= 2, i.e. all
``nn.Conv`` and ``nn.Dense`` kernels *including the classifier head*; biases and BatchNorm
parameters are never pruned. This is the common choice in the pruning-at-initialisation
literature (SNIP, GraSP, SynFlow prune every weight layer). Pass ``prunable=`` to change it,
e.g. ``prunable=kernels_except('head')`` keeps the head dense.

Design choice (exact sparsity): exactly ``round(sparsity * n_prunable)`` weights are zeroed (Python
``round``, half to even), whatever the ties in the scores. Ties are broken deterministically: among
equal scores the weight that comes first in the flattened tree order (``jax.tree`` leaf order, then
row-major within a leaf) is pruned first.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax.errors import UserError

Params = Any  # A (nested dict) parameter tree, e.g. ``variables['params']``.
Masks = Any  # Same structure as Params; bool arrays at prunable leaves, None elsewhere.
PrunableFn = Callable[[str, Any], bool]  # ('/'-joined leaf path, leaf) -> prune it?


class SparsityError(UserError, ValueError):
  """A sparsity outside the open interval (0, 1)."""


def _path_str(path) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'name', getattr(p, 'idx', p)))) for p in path)


def default_prunable(path: str, leaf: Any) -> bool:
  """Conv and Dense kernels (rank >= 2 ``kernel`` leaves), the classifier head included."""
  return path.rsplit('/', 1)[-1] == 'kernel' and np.ndim(leaf) >= 2


def kernels_except(*module_paths: str) -> PrunableFn:
  """Like ``default_prunable`` but leaves the kernels of ``module_paths`` (e.g. 'head') dense."""
  excluded = set(module_paths)

  def prunable(path: str, leaf: Any) -> bool:
    return default_prunable(path, leaf) and path.rsplit('/', 1)[0] not in excluded

  return prunable


def prunable_paths(params: Params, prunable: PrunableFn = default_prunable) -> list[str]:
  """'/'-joined paths of the prunable leaves of ``params``, in tree order."""
  return [_path_str(path) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
          if prunable(_path_str(path), leaf)]


def check_sparsity(sparsity: float, name: str = 'sparsity') -> float:
  """Returns ``sparsity`` as a float if it lies in (0, 1); raises ``SparsityError`` otherwise."""
  try:
    value = float(sparsity)
  except (TypeError, ValueError):
    raise SparsityError(f'{name}={sparsity!r} is not a number; expected a fraction in (0, 1), '
                        f'e.g. 0.9 to zero 90% of the prunable weights') from None
  if not 0.0 < value < 1.0:  # Also rejects NaN.
    raise SparsityError(f'{name}={sparsity!r} is out of range: expected a fraction strictly '
                        f'between 0 and 1 (e.g. 0.9 zeroes 90% of the prunable weights; use the '
                        f'dense method for no pruning)')
  return value


# ------------------------------------------------------------------------------------------------
# Scores (higher = more important = kept first).


def magnitude_scores(params: Params) -> Params:
  """|w| for every leaf (magnitude pruning; at initialisation it mostly ranks by fan-in)."""
  return jax.tree.map(jnp.abs, params)


@jax.jit
def random_scores(params: Params, key: jax.Array) -> Params:
  """Uniform [0, 1) scores, independent per weight (random pruning baseline)."""
  leaves, treedef = jax.tree.flatten(params)
  sizes = [int(np.size(leaf)) for leaf in leaves]
  # One draw for the whole tree: a threefry call per leaf takes far longer to compile on CPU.
  flat = jax.random.uniform(key, (sum(sizes),))
  pieces = jnp.split(flat, np.cumsum(sizes)[:-1].tolist()) if len(sizes) > 1 else [flat]
  return jax.tree.unflatten(treedef, [p.reshape(jnp.shape(leaf))
                                      for p, leaf in zip(pieces, leaves)])


# ``loss_fn`` is a static argument: one compilation per (loss_fn, shapes), reused across calls
# (and across runs of a sweep) whenever the same or an equal hashable loss_fn is passed again.
_grad = jax.jit(lambda loss_fn, params, batch: jax.grad(loss_fn)(params, batch),
                static_argnums=0)


def gradient_saliency(loss_fn: Callable[[Params, Any], jax.Array], params: Params,
                      batches: Iterable[Any]) -> Params:
  """Connection sensitivity |w ⊙ ∂L/∂w| (SNIP, Lee et al. 2019) for any loss.

  Args:
    loss_fn: ``(params, batch) -> scalar`` loss, differentiable in ``params``. SNIP uses the
      cross-entropy of the model at initialisation; EPSD plugs in a self-distillation objective.
      Must be hashable (a function, or e.g. a frozen dataclass with ``__call__``); its gradient
      is jit-compiled once per loss_fn and batch shape (give every batch the same shape).
    params: the parameter tree to score (e.g. at initialisation).
    batches: one or more batches (any pytree ``loss_fn`` accepts).
  Returns:
    A tree like ``params``: ``|w * mean_b grad_b|`` with the gradient averaged over the batches
    first (design choice: the saliency of the loss over the union of the batches, as SNIP with
    one large batch), float32.
  """
  total, count = None, 0
  for batch in batches:
    grads = _grad(loss_fn, params, batch)
    total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    count += 1
  if count == 0:
    raise UserError('gradient_saliency needs at least one batch (got an empty iterable); '
                    'check the saliency batch count flag and the training-set size')
  return jax.tree.map(lambda w, g: jnp.abs(w * (g / count)).astype(jnp.float32), params, total)


# ------------------------------------------------------------------------------------------------
# Masks.


def _flat_prunable(scores: Params, prunable: PrunableFn):
  flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
  is_prunable = [bool(prunable(_path_str(path), leaf)) for path, leaf in flat]
  if not any(is_prunable):
    raise UserError('no prunable leaves in the parameter tree (the default prunes Conv/Dense '
                    '"kernel" leaves); check the prunable= argument')
  arrays = [np.asarray(jax.device_get(leaf), np.float64) if p else None
            for (_, leaf), p in zip(flat, is_prunable)]
  for (path, _), a in zip(flat, arrays):
    if a is not None and not np.all(np.isfinite(a)):
      raise ValueError(f'scores of {_path_str(path)} contain NaN or inf; cannot rank weights')
  return flat, treedef, arrays


def _lowest_k(values: np.ndarray, k: int) -> np.ndarray:
  """Bool keep-mask of a flat array with its ``k`` lowest entries dropped (ties: lower index)."""
  keep = np.ones(values.shape, bool)
  if k > 0:
    # A stable sort keeps equal scores in index order, so ties prune the earlier weight first.
    keep[np.argsort(values, kind='stable')[:k]] = False
  return keep


def _unflatten(treedef, flat, masks: list[Optional[np.ndarray]]) -> Masks:
  leaves = [None if m is None else jnp.asarray(m.reshape(np.shape(leaf)))
            for (_, leaf), m in zip(flat, masks)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def global_mask(scores: Params, sparsity: float,
                prunable: PrunableFn = default_prunable) -> Masks:
  """Keeps the highest-scoring weights over all prunable leaves together.

  Args:
    scores: tree like the parameters (float, any shape per leaf); higher = keep.
    sparsity: fraction in (0, 1) of the prunable weights to zero.
    prunable: which leaves take part (see the module docstring).
  Returns:
    Mask tree (bool at prunable leaves, ``None`` elsewhere) zeroing exactly
    ``round(sparsity * n_prunable)`` weights, ties broken by tree order.
  """
  sparsity = check_sparsity(sparsity)
  flat, treedef, arrays = _flat_prunable(scores, prunable)
  present = [a for a in arrays if a is not None]
  sizes = [a.size for a in present]
  keep = _lowest_k(np.concatenate([a.ravel() for a in present]),
                   int(round(sparsity * sum(sizes))))
  pieces = iter(np.split(keep, np.cumsum(sizes)[:-1]))
  return _unflatten(treedef, flat, [None if a is None else next(pieces) for a in arrays])


def per_leaf_mask(scores: Params, sparsity: float,
                  prunable: PrunableFn = default_prunable) -> Masks:
  """Prunes every prunable leaf by (almost) the same fraction ``sparsity`` (layer-wise ranking).

  Design choice: the total stays exact, ``round(sparsity * n_prunable)`` zeros, by apportioning
  the per-leaf counts with the largest-remainder method: each leaf of size n_i gets
  ``floor(sparsity * n_i)`` zeros plus at most one more (largest fractional parts first, ties in
  tree order), so no leaf is more than one weight away from its exact share.
  """
  sparsity = check_sparsity(sparsity)
  flat, treedef, arrays = _flat_prunable(scores, prunable)
  sizes = np.array([a.size for a in arrays if a is not None])
  target = int(round(sparsity * sizes.sum()))
  exact = sparsity * sizes
  counts = np.floor(exact).astype(np.int64)
  extra = target - int(counts.sum())
  if extra > 0:
    counts[np.argsort(-(exact - counts), kind='stable')[:extra]] += 1
  elif extra < 0:  # Only possible through float rounding; take back from the smallest remainders.
    counts[np.argsort(exact - counts, kind='stable')[:-extra]] -= 1
  counts = np.clip(counts, 0, sizes)
  count_iter = iter(counts)
  return _unflatten(treedef, flat, [None if a is None else
                                    _lowest_k(a.ravel(), int(next(count_iter))) for a in arrays])


def apply_weight_masks(params: Params, masks: Masks) -> Params:
  """Zeroes the masked-out weights: ``where(mask, w, 0)`` at masked leaves, others unchanged.

  Pure and jit-friendly; apply it in the forward pass and after every optimizer update so pruned
  weights stay exactly zero (weight decay and momentum would otherwise revive them).
  """
  def apply(mask, w):
    if mask is None:
      return w
    chex.assert_equal_shape((mask, w))
    return jnp.where(mask, w, jnp.zeros_like(w))

  return jax.tree.map(apply, masks, params, is_leaf=lambda x: x is None)


def mask_counts(masks: Masks) -> tuple[int, int]:
  """``(zeroed, total)`` over the masked (prunable) weights."""
  leaves = [np.asarray(jax.device_get(m)) for m in jax.tree.leaves(masks)]
  total = sum(m.size for m in leaves)
  return total - sum(int(m.sum()) for m in leaves), total


def sparsity_of(masks: Masks) -> float:
  """Fraction of the prunable weights that ``masks`` zeroes, in [0, 1]."""
  zeroed, total = mask_counts(masks)
  return zeroed / total if total else 0.0


def dense_masks(params: Params, prunable: PrunableFn = default_prunable) -> Masks:
  """All-True masks at the prunable leaves (no pruning; handy as a neutral element)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.ones(jnp.shape(leaf), bool) if prunable(_path_str(path), leaf)
      else None, params)


def layer_sparsities(masks: Masks) -> dict[str, float]:
  """'/'-joined leaf path -> fraction of that leaf zeroed (for reports)."""
  out = {}
  for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
    m = np.asarray(jax.device_get(m))
    out[_path_str(path)] = float(1.0 - m.mean())
  return out


__all__ = ['SparsityError', 'default_prunable', 'kernels_except', 'prunable_paths',
           'check_sparsity', 'magnitude_scores', 'random_scores', 'gradient_saliency',
           'global_mask', 'per_leaf_mask', 'apply_weight_masks', 'mask_counts', 'sparsity_of',
           'dense_masks', 'layer_sparsities']
