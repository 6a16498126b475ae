"""Candidate evaluation with masks (one compilation per architecture) and short KD runs.

Everything here works on a fixed split of the fine-tuning subset S:

* ``SearchData.train_*``: the part of S the student is distilled on (images + cached logits);
* ``SearchData.heldout_*``: the held-out slice used for v1/v2 and short-term accuracies;
* ``SearchData.bn_images``: ``[k, B, H, W, C]`` batches of S for adaptive BN.

Labels are never read here: "accuracy" during the search means top-1 agreement with the
teacher's pseudo labels on the held-out slice (true labels are used only in the final report).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ttmpd_jax import interrupt, parallel, train
from ttmpd_jax.distill import bn_adapt, finetune as finetune_lib
from ttmpd_jax.pruning.graph import ChannelGroup
from ttmpd_jax.pruning.masks import apply_masks
from ttmpd_jax.search.proxy import STATISTICS, candidate_statistics


@dataclasses.dataclass
class SearchData:
  """Fixed arrays of the fine-tuning subset S (normalised images, cached teacher logits)."""

  train_images: np.ndarray     # float32 [n_train, H, W, C]
  train_logits: np.ndarray     # float32 [n_train, K]
  heldout_images: np.ndarray   # float32 [n_heldout, H, W, C]
  heldout_logits: np.ndarray   # float32 [n_heldout, K]
  bn_images: np.ndarray        # float32 [k, B, H, W, C]


def replicate_everywhere(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """``parallel.replicate`` of host values that every process of a job holds alike.

  Design choice: in a multi-process job ``jax.device_put`` onto devices of other processes
  first checks that every process passes the same value (an all-gather compiled per leaf shape,
  so a few compilations per pruned architecture); the search's inputs are the same on every
  process by construction, so they are placed with ``make_array_from_callback``: no XLA work.
  """
  if jax.process_count() == 1:
    return parallel.replicate(tree, mesh)
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: _from_host(np.asarray(x), sharding), tree)


def _from_host(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _gather(tree: Any) -> Any:
  """Inside ``over_candidates``: every device's block, concatenated along the candidate axis."""
  return jax.tree.map(lambda x: jax.lax.all_gather(x, parallel.DATA_AXIS, tiled=True), tree)


def over_candidates(fn: Callable, mesh: jax.sharding.Mesh, batched: Sequence[bool],
                    finish: Callable[[Any], Any], out_specs: Any = P()) -> Callable:
  """``fn`` (vmapped over a candidate axis) run on each device's block of candidates only.

  ``batched[i]``: argument ``i`` is stacked along the candidate axis (sharded over the mesh);
  the others are the same for every candidate. ``finish`` maps each device's result to the
  outputs described by ``out_specs`` (``_gather`` for replicated ones).
  Design choice: an explicit ``shard_map``, not a sharded ``vmap`` left to the partitioner:
  once activations differ per candidate, a vmapped convolution becomes one grouped convolution
  that the SPMD partitioner all-gathers and then computes in full on every device (each device
  would do every candidate's work). Here each device computes its own candidates only.
  """
  in_specs = tuple(P(parallel.DATA_AXIS) if b else P() for b in batched)
  # check_vma=False: the all-gathered outputs are replicated, which the check cannot infer.
  return jax.shard_map(lambda *args: finish(fn(*args)), mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=False)


def mask_transform(groups: Sequence[ChannelGroup]) -> Callable:
  """``(variables, masks) -> masked variables`` for ``groups`` (masks are a jit argument)."""
  groups = tuple(groups)
  return lambda variables, masks: apply_masks(variables, masks, groups, validate=False)


def stacked_masks(groups: Sequence[ChannelGroup], masks_list: Sequence[Mapping[str, Any]],
                  mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """``{group: bool [len(masks_list), size]}`` sharded over ``mesh`` along the candidate axis
  (missing groups: all kept); built from host values, so every process holds the same masks."""
  sharding = parallel.data_sharded(mesh)
  out = {}
  for g in groups:
    stacked = np.stack([np.asarray(m.get(g.name, np.ones(g.size, bool)), bool)
                        for m in masks_list])
    out[g.name] = _from_host(stacked, sharding)
  return out


class CandidateEvaluator:
  """``(v1, v2)`` of masked candidates, spread over every device of ``mesh``.

  Adaptive BN (exact average over ``data.bn_images``) of each masked candidate, then its
  eval-mode logits on the held-out slice against the cached teacher logits. Design choice:
  candidates are evaluated ``mesh.size`` at a time — masks stacked along a candidate axis,
  ``vmap``ped and sharded over the mesh's one axis (one candidate per device, every process of a
  multi-host job holding the same masks) — so one compiled function per architecture serves any
  number of candidates (the last chunk is padded), and on one device it is the sequential loop.
  """

  def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], data: SearchData,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.mesh = mesh or parallel.make_mesh()
    self.groups = tuple(g for g in groups if g.prunable)
    adapt = bn_adapt.make_bn_adapter(model, mask_transform(groups))

    def one(variables, masks, bn_images, images, teacher_logits):
      adapted = adapt(variables, masks, bn_images)
      logits = model.apply(adapted, images, train=False)
      return candidate_statistics(logits, teacher_logits)

    self._evaluate = jax.jit(over_candidates(
        jax.vmap(one, in_axes=(None, 0, None, None, None)), self.mesh,
        (False, True, False, False, False), lambda out: _gather(out)))
    # device_put, not jnp.asarray: no eager XLA computation, so nothing compiles here.
    self._data = replicate_everywhere(
        (data.bn_images, data.heldout_images, data.heldout_logits), self.mesh)

  def _stacked(self, masks_list: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
    return stacked_masks(self.groups, masks_list, self.mesh)

  def many(self, variables: Any, masks_list: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """float64 ``[len(masks_list), len(proxy.STATISTICS)]``: (v1, v2, diagnostics...) of each
    candidate of ``variables``."""
    n, chunk = len(masks_list), self.mesh.size
    variables = replicate_everywhere(variables, self.mesh)
    out = []
    for lo in range(0, n, chunk):
      interrupt.check()
      part = list(masks_list[lo:lo + chunk])
      part += [part[-1]] * (chunk - len(part))
      out.append(np.asarray(self._evaluate(variables, self._stacked(part), *self._data)))
    return (np.concatenate(out)[:n].astype(np.float64) if out
            else np.zeros((0, len(STATISTICS))))

  def __call__(self, variables: Any, masks: Mapping[str, Any]) -> tuple[float, float]:
    v1, v2 = self.many(variables, [masks])[0, :2]
    return float(v1), float(v2)


def make_candidate_evaluator(model: nn.Module, groups: Sequence[ChannelGroup], data: SearchData,
                             mesh: Optional[jax.sharding.Mesh] = None) -> CandidateEvaluator:
  """``evaluate(variables, masks) -> (v1, v2)``; ``evaluate.many`` for a list of masks."""
  return CandidateEvaluator(model, groups, data, mesh)


class KDRunner:
  """Short KD runs from cached logits (or an online teacher) with one compiled step.

  Build one per architecture; ``run(variables, masks, steps)`` fine-tunes a (masked) student and
  returns its variables. Masks are a jit argument, so every candidate reuses the same step; the
  state is built without XLA work (``train.create_train_state``) and batches are gathered on the
  host (eager device gathers would compile per shape), so a run compiles only the step, once.
  """

  def __init__(self, model: nn.Module, groups: Optional[Sequence[ChannelGroup]], data: SearchData,
               *, learning_rate: float, steps: int, batch_size: int, temperature: float,
               hard_weight: float, seed: int, schedule: str = 'constant',
               online_teacher: Optional[tuple[nn.Module, Any]] = None):
    self.optimizer = finetune_lib.kd_optimizer(learning_rate, steps, schedule=schedule)
    transform = mask_transform(groups) if groups is not None else None
    kd = dict(temperature=temperature, hard_weight=hard_weight)
    if online_teacher is None:
      loss_fn = finetune_lib.kd_loss_fn(model, **kd)
    else:
      loss_fn = finetune_lib.online_kd_loss_fn(model, online_teacher[0], **kd)
    self.step = train.make_step(loss_fn, self.optimizer, transform=transform)
    self.teacher_variables = None if online_teacher is None else online_teacher[1]
    self.data, self.batch_size, self.seed = data, min(batch_size, len(data.train_images)), seed

  def _inputs(self, step: int) -> tuple:
    rows = finetune_lib.batch_positions(step, len(self.data.train_images), self.batch_size,
                                        self.seed)
    images = jax.device_put(self.data.train_images[rows])
    if self.teacher_variables is not None:
      return images, self.teacher_variables
    return images, jax.device_put(self.data.train_logits[rows])

  def run(self, variables: Mapping[str, Any], masks: Any, steps: int) -> dict[str, Any]:
    state = train.create_train_state(variables, self.optimizer)
    batches = map(self._inputs, range(steps))
    state, _ = train.train_loop(state, lambda state, inputs: self.step(state, masks, *inputs),
                                batches, steps=steps)
    return jax.device_get(state.variables)


class CandidateKDRunner:
  """``KDRunner.run`` for many masked candidates of one network, spread over ``mesh``.

  The same runs as ``KDRunner`` (optimizer, loss, batches: every candidate of an iteration sees
  the same batch sequence), ``mesh.size`` candidates at a time: the train state is stacked along
  a candidate axis and ``vmap``ped, the masks and the optimizer state are sharded over the mesh
  (one candidate per device, every process holding the same masks), each batch is replicated.

  Design choice: each device computes its own candidates (``over_candidates``) and the step
  returns the networks replicated (an all-gather of ``mesh.size`` networks per step, small next
  to the forward and backward passes), so finished candidates are read back on every process
  without a second compiled function: one compilation per architecture whatever the number of
  candidates (the last chunk is padded), and on one device it is the sequential loop.
  """

  def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], data: SearchData, *,
               learning_rate: float, steps: int, batch_size: int, temperature: float,
               hard_weight: float, seed: int, schedule: str = 'constant',
               online_teacher: Optional[tuple[nn.Module, Any]] = None,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.mesh = mesh or parallel.make_mesh()
    self.groups = tuple(g for g in groups if g.prunable)
    self.optimizer = finetune_lib.kd_optimizer(learning_rate, steps, schedule=schedule)
    kd = dict(temperature=temperature, hard_weight=hard_weight)
    if online_teacher is None:
      loss_fn = finetune_lib.kd_loss_fn(model, **kd)
    else:
      loss_fn = finetune_lib.online_kd_loss_fn(model, online_teacher[0], **kd)
    transform, optimizer = mask_transform(groups), self.optimizer
    update = lambda state, masks, *inputs: train.apply_update(loss_fn, optimizer, transform,
                                                               state, masks, inputs)
    replicated, sharded = parallel.replicated(self.mesh), parallel.data_sharded(self.mesh)
    self._shardings = train.TrainState(step=replicated, params=replicated,
                                       batch_stats=replicated, opt_state=sharded)
    specs = jax.tree.map(lambda s: s.spec, self._shardings,
                         is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

    def finish(result):
      state, metrics = result   # Networks and metrics gathered; optimizer states stay put.
      return state.replace(step=_gather(state.step), params=_gather(state.params),
                           batch_stats=_gather(state.batch_stats)), _gather(metrics)

    self._step = jax.jit(over_candidates(jax.vmap(update, in_axes=(0, 0, None, None)),
                                         self.mesh, (True, True, False, False), finish,
                                         out_specs=(specs, P())))
    self.teacher_variables = None if online_teacher is None else online_teacher[1]
    self.data, self.batch_size, self.seed = data, min(batch_size, len(data.train_images)), seed

  def _inputs(self, step: int) -> tuple:
    rows = finetune_lib.batch_positions(step, len(self.data.train_images), self.batch_size,
                                        self.seed)
    second = self.teacher_variables
    if second is None:
      second = self.data.train_logits[rows]
    return replicate_everywhere((self.data.train_images[rows], second), self.mesh)

  def _initial_state(self, variables: Mapping[str, Any]) -> train.TrainState:
    """``mesh.size`` copies of the step-0 state, placed as the step returns it (no XLA work)."""
    state = jax.device_get(train.create_train_state(variables, self.optimizer))
    chunk = self.mesh.size
    return jax.tree.map(
        lambda sharding, tree: jax.tree.map(
            lambda x: _from_host(np.broadcast_to(np.asarray(x)[None], (chunk, *np.shape(x))),
                                 sharding), tree),
        self._shardings, state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

  def run_many(self, variables: Mapping[str, Any], masks_list: Sequence[Mapping[str, Any]],
               steps: int) -> list[dict[str, Any]]:
    """Host variables of each candidate of ``variables`` after ``steps`` masked KD steps."""
    out: list[dict[str, Any]] = []
    chunk = self.mesh.size
    for lo in range(0, len(masks_list), chunk):
      part = list(masks_list[lo:lo + chunk])
      masks = stacked_masks(self.groups, part + [part[-1]] * (chunk - len(part)), self.mesh)
      state, _ = train.train_loop(self._initial_state(variables),
                                  lambda state, inputs, m=masks: self._step(state, m, *inputs),
                                  map(self._inputs, range(steps)), steps=steps)
      stacked = jax.device_get(state.variables)
      out += [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(part))]
    return out
