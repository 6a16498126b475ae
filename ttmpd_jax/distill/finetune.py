"""Knowledge-distillation fine-tuning of a (masked or pruned) student (docs/method.md, steps 6, 8).

KD is two loss functions plugged into the project's one step builder and loop (``train``):

* ``kd_loss_fn`` / ``make_kd_step``: the teacher's logits come from the pseudo-label cache
  (TT-MPD);
* ``online_kd_loss_fn`` / ``make_online_kd_step``: the teacher runs on every batch (the "online
  KD" baseline, the cost TT-MPD removes).

A *masked* student keeps the teacher's shapes; the optional ``transform(variables, aux)`` (e.g.
``lambda v, masks: pruning.apply_masks(v, masks, groups)``) is applied to the variables before
every forward pass and again after every update, so pruned channels stay exactly zero. ``aux`` (the
masks) is a jit *argument*, not a closure constant: evaluating another mask of the same shapes
reuses the compiled step. A *physically pruned* student simply passes ``transform=None``.

BatchNorm runs in train mode (batch statistics, running averages updated). Under ``jax.jit`` with
batches sharded over the mesh axis ``data`` and variables replicated, XLA computes the BN batch
statistics and the gradient over the *global* batch, so 1 and N devices run the same maths.

``finetune`` drives the step from the cache with seeded shuffling (the batch of step t depends only
on ``(seed, t)``, so a resumed run sees the same data), prints progress, and optionally saves an
orbax checkpoint every ``checkpoint_every`` steps (``train.CheckpointHook``: atomic, last few
kept): a killed run restarted with the same arguments resumes from the latest checkpoint and ends
with the same variables as an uninterrupted run.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttmpd_jax import parallel
from ttmpd_jax import train as train_lib
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.distill import cache as cache_lib
from ttmpd_jax.distill.losses import kd_loss
from ttmpd_jax.errors import UserError
from ttmpd_jax.train import Transform, TrainState

Variables = dict[str, Any]
# The fine-tuning state is the project's one train state (kept under its historical name).
KDState = TrainState


def init_state(variables: Mapping[str, Any], optimizer: optax.GradientTransformation) -> KDState:
  """A step-0 state for the student ``variables`` (``train.create_train_state``)."""
  return train_lib.create_train_state(variables, optimizer)


def kd_optimizer(learning_rate: float, total_steps: int, *, momentum: float = 0.9,
                 weight_decay: float = 0.0,
                 schedule: str = 'cosine') -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum for KD fine-tuning.

  Design choice: ``schedule='cosine'`` decays ``learning_rate`` to 0 over ``total_steps`` (no
  warm-up: the student starts from pretrained weights); ``'constant'`` keeps it fixed (short-term
  fine-tuning inside the search, where the number of steps is small).
  """
  if learning_rate <= 0:
    raise UserError(f'KD learning rate must be positive, got {learning_rate}')
  if schedule == 'cosine':
    lr: Any = optax.cosine_decay_schedule(learning_rate, max(int(total_steps), 1))
  elif schedule == 'constant':
    lr = learning_rate
  else:
    raise UserError(f'unknown KD learning-rate schedule {schedule!r}; expected cosine or constant')
  sgd = optax.sgd(lr, momentum=momentum or None, nesterov=bool(momentum))
  return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


def kd_loss_fn(model: nn.Module, *, temperature: float = 1.0, kl_weight: float = 1.0,
               hard_weight: float = 0.0) -> train_lib.LossFn:
  """KD loss from teacher logits, ``inputs = (images, teacher_logits)``; reports ``agreement``
  (top-1 agreement of student and teacher in [0, 1])."""

  def loss_fn(params, batch_stats, inputs, aux):
    images, teacher_logits = inputs
    chex.assert_rank(images, 4)
    chex.assert_rank(teacher_logits, 2)
    chex.assert_equal_shape_prefix((images, teacher_logits), 1)
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    chex.assert_equal_shape((logits, teacher_logits))
    loss = kd_loss(logits, teacher_logits, temperature=temperature, kl_weight=kl_weight,
                   hard_weight=hard_weight)
    agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
    # A model without BatchNorm updates no statistics (and has an empty ``batch_stats``).
    return loss, (updates.get('batch_stats', batch_stats), {'agreement': agreement})

  return loss_fn


def online_kd_loss_fn(model: nn.Module, teacher_model: nn.Module, **kd_kwargs) -> train_lib.LossFn:
  """``kd_loss_fn`` with the teacher (eval mode) run on the batch:
  ``inputs = (images, teacher_variables)``."""
  cached = kd_loss_fn(model, **kd_kwargs)

  def loss_fn(params, batch_stats, inputs, aux):
    images, teacher_variables = inputs
    teacher_logits = jax.lax.stop_gradient(
        teacher_model.apply(teacher_variables, images, train=False))
    return cached(params, batch_stats, (images, teacher_logits), aux)

  return loss_fn


def make_kd_step(model: nn.Module, optimizer: optax.GradientTransformation, *,
                 transform: Optional[Transform] = None, temperature: float = 1.0,
                 kl_weight: float = 1.0, hard_weight: float = 0.0,
                 donate: bool = False) -> Callable:
  """KD step from cached teacher logits, jitted once.

  Returns ``step(state, aux, images, teacher_logits) -> (state, metrics)`` with
  ``images`` float32 [B, H, W, C] (normalised), ``teacher_logits`` float32 [B, K], ``aux`` the
  pytree forwarded to ``transform`` (``None`` without a transform) and ``metrics`` =
  ``{'loss': scalar, 'agreement': top-1 agreement with the teacher in [0, 1]}``. With
  ``donate=True`` the input state's buffers are reused for the output (see ``train.make_step``).
  """
  loss_fn = kd_loss_fn(model, temperature=temperature, kl_weight=kl_weight,
                       hard_weight=hard_weight)
  return train_lib.make_step(loss_fn, optimizer, transform=transform, donate=donate)


def make_online_kd_step(model: nn.Module, optimizer: optax.GradientTransformation,
                        teacher_model: nn.Module, teacher_variables: Mapping[str, Any], *,
                        transform: Optional[Transform] = None, temperature: float = 1.0,
                        kl_weight: float = 1.0, hard_weight: float = 0.0,
                        donate: bool = False) -> Callable:
  """The online-KD baseline: the teacher (eval mode) runs inside every step.

  Returns ``step(state, aux, images) -> (state, metrics)``. The teacher's variables are a jit
  argument (bound here), not constants folded into the compiled program.
  """
  loss_fn = online_kd_loss_fn(model, teacher_model, temperature=temperature, kl_weight=kl_weight,
                              hard_weight=hard_weight)
  jitted = train_lib.make_step(loss_fn, optimizer, transform=transform, donate=donate)
  return lambda state, aux, images: jitted(state, aux, images, teacher_variables)


# ----------------------------------------------------------------------------------------------
# The fine-tuning run.


def batch_positions(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Rows (into the subset S of size ``n``) of the global batch for 0-based ``step``.

  Design choice: each epoch is a fresh permutation of S seeded by ``(seed, epoch)``; the last
  partial batch of an epoch is dropped so shapes stay fixed under jit. Depends only on its
  arguments, so a resumed run sees the same batches.
  """
  per_epoch = n // batch_size
  epoch, within = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[within * batch_size:(within + 1) * batch_size]


def _subset_ids(dataset: Dataset, cache: Optional[cache_lib.PseudoLabelCache], online: bool,
                ids: Optional[np.ndarray], verify_data: bool) -> np.ndarray:
  """The fine-tuning subset S, checked against the cache (same ids, same images)."""
  if ids is None:
    ids = cache.ids if cache is not None else np.arange(len(dataset), dtype=np.int32)
  ids = np.asarray(ids, np.int32)
  if cache is None:
    return ids
  if not online and not np.array_equal(ids, cache.ids):
    raise UserError('finetune from a cache must use the cache\'s sample ids')
  if cache.ids.max() >= len(dataset):
    raise cache_lib.CacheError(f'pseudo-label cache refers to sample {cache.ids.max()} but '
                               f'{dataset.name} has only {len(dataset)} samples')
  expected_images = cache.info.get('images_sha256')
  if verify_data and expected_images and expected_images != cache_lib.images_fingerprint(
      dataset, cache.ids):
    raise cache_lib.CacheError(f'pseudo-label cache was built on other images than '
                               f'{dataset.name} holds now; rebuild the cache')
  return ids


def _kd_batches(dataset: Dataset, ids: np.ndarray, logits: Optional[np.ndarray], start_step: int,
                batch_size: int, seed: int, mesh: jax.sharding.Mesh):
  """Endless sharded step inputs from ``start_step`` on: ``(images,)`` for online KD, else
  ``(images, cached teacher logits)``; each process reads its slice of every global batch."""
  per_process = batch_size // jax.process_count()
  lo = jax.process_index() * per_process
  for step in itertools.count(start_step):
    rows = batch_positions(step, len(ids), batch_size, seed)[lo:lo + per_process]
    images = pipeline.normalize(dataset.images[ids[rows]], dataset.family)
    yield parallel.shard_batch((images,) if logits is None else (images, logits[rows]), mesh)


def _check_batch_size(batch_size: int, subset_size: int, mesh: jax.sharding.Mesh) -> None:
  parallel.check_batch_divisible(batch_size, mesh, field='batch_size')
  if batch_size > subset_size:
    raise UserError(f'KD batch size {batch_size} is larger than the fine-tuning subset '
                    f'({subset_size} samples); use a smaller batch or a larger subset')


def _resume(checkpoints: train_lib.CheckpointHook, state: KDState,
            print_fn: Callable[[str], None]) -> tuple[KDState, int]:
  """The latest checkpointed state of this run and its step, else ``(state, 0)``."""
  restored = checkpoints.restore(state)
  if restored is None:
    return state, 0
  start_step = int(restored.step)
  print_fn(f'resuming KD fine-tuning from step {start_step} ({checkpoints.directory})')
  return restored, start_step


def finetune(model: nn.Module, variables: Mapping[str, Any], dataset: Dataset, *,
             steps: int, batch_size: int, learning_rate: float, seed: int = 0,
             cache: Optional[cache_lib.PseudoLabelCache] = None,
             teacher: Optional[tuple[nn.Module, Mapping[str, Any]]] = None,
             ids: Optional[np.ndarray] = None,
             transform: Optional[Transform] = None, aux: Any = None,
             temperature: float = 1.0, kl_weight: float = 1.0, hard_weight: float = 0.0,
             momentum: float = 0.9, weight_decay: float = 0.0, schedule: str = 'cosine',
             optimizer: Optional[optax.GradientTransformation] = None,
             mesh: Optional[jax.sharding.Mesh] = None,
             checkpoint_dir: Optional[str] = None, checkpoint_every: int = 100,
             keep_checkpoints: int = 3, log_every: int = 50, verify_data: bool = True,
             print_fn: Callable[[str], None] = print,
             on_step: Optional[Callable[[int, dict[str, jax.Array]], None]] = None,
             ) -> tuple[Variables, dict[str, Any]]:
  """KD fine-tuning of a student on the fine-tuning subset S of ``dataset``.

  Teacher source: ``cache`` (TT-MPD: cached logits, the teacher never runs) or
  ``teacher=(teacher_model, teacher_variables)`` (online-KD baseline: the teacher runs on every
  batch; S is ``ids``, else ``cache.ids`` when a cache is passed too, so both runs see the same
  batches, else all of ``dataset``).

  Args:
    model, variables: the student (masked: same shapes as the teacher plus ``transform``/``aux``;
      or physically pruned: its own smaller model, ``transform=None``).
    dataset: the unlabeled test set the cache was built on (labels are never read).
    steps: total number of updates (the schedule's length; also when resuming).
    batch_size: global batch size, divisible by the mesh size, at most |S|.
    learning_rate, momentum, weight_decay, schedule: see ``kd_optimizer`` (ignored when an
      ``optimizer`` is passed).
    seed: data order (epoch permutations of S).
    temperature, kl_weight, hard_weight: see ``losses.kd_loss``.
    mesh: 1-D data mesh (all local devices when ``None``).
    checkpoint_dir: orbax ``CheckpointManager`` directory; when it holds a checkpoint of the same
      run (same cache key, student, hyper-parameters) training resumes from its latest step.
    checkpoint_every, keep_checkpoints: save interval in steps, and how many to keep.
    log_every: progress line every this many steps (step, loss, agreement, steps/s, ETA).
    verify_data: check that ``dataset``'s images of S are those the cache was built on (a hash
      of S's images; cheap for small images, switch off in tight loops over large ones).
    on_step: called as ``on_step(step, metrics)`` after each update (1-based step; metrics are
      device arrays, not synchronised). Raising from it aborts the run (tests simulate a kill).
  Returns:
    ``(variables, summary)``: host numpy variables (transform applied) and a dict with
    ``steps``, ``resumed_from``, ``time_s``, ``steps_per_s``, ``final_loss``,
    ``final_agreement``.
  """
  if cache is None and teacher is None:
    raise UserError('finetune needs a teacher source: a pseudo-label cache or an online teacher')
  if steps <= 0:
    raise UserError(f'number of KD fine-tuning steps must be positive, got {steps}')
  online = teacher is not None
  ids = _subset_ids(dataset, cache, online, ids, verify_data)
  mesh = mesh or parallel.make_mesh()
  _check_batch_size(batch_size, len(ids), mesh)
  settings = dict(steps=int(steps), batch_size=int(batch_size), seed=int(seed),
                  learning_rate=float(learning_rate), temperature=float(temperature),
                  kl_weight=float(kl_weight), hard_weight=float(hard_weight),
                  momentum=float(momentum), weight_decay=float(weight_decay),
                  schedule=str(schedule),
                  optimizer='custom' if optimizer is not None else 'kd_optimizer')
  optimizer = optimizer or kd_optimizer(learning_rate, steps, momentum=momentum,
                                        weight_decay=weight_decay, schedule=schedule)
  # The loop owns its state, so the step may reuse (donate) the previous state's buffers.
  kd = dict(transform=transform, temperature=temperature, kl_weight=kl_weight,
            hard_weight=hard_weight, donate=True)
  step = (make_online_kd_step(model, optimizer, teacher[0], parallel.replicate(teacher[1], mesh),
                              **kd) if online else make_kd_step(model, optimizer, **kd))
  variables = train_lib.apply_transform(transform, variables, aux)
  # Copy: device_put may alias the caller's arrays, which donation would then invalidate.
  state = parallel.replicate(init_state(variables, optimizer), mesh, copy=True)
  aux = parallel.replicate(aux, mesh) if aux is not None else None

  hooks: list[train_lib.Hook] = []
  if on_step is not None:
    hooks.append(lambda done, state, metrics: on_step(done, metrics))
  start_step = 0
  if checkpoint_dir is not None:
    run_config = {
        'teacher': cache.key if cache is not None else cache_lib.fingerprint_variables(teacher[1]),
        'online': online, 'student': cache_lib.fingerprint_variables(variables),
        'aux': cache_lib.fingerprint_variables(aux) if aux is not None else '',
        'ids': cache_lib.fingerprint_variables(ids), **settings}
    checkpoints = train_lib.CheckpointHook(checkpoint_dir, run_config, every=checkpoint_every,
                                           keep=keep_checkpoints, total_steps=steps,
                                           name='fine-tuning')
    hooks.append(checkpoints)
    state, start_step = _resume(checkpoints, state, print_fn)
  hooks.append(train_lib.ProgressHook(
      'online KD' if online else 'KD (cached pseudo labels)', steps, log_every, print_fn,
      lambda s, m: f'{train_lib.loss_field(s, m)}  agreement {float(m["agreement"]):.3f}',
      start_step))

  start = time.time()
  batches = _kd_batches(dataset, ids, None if online else cache.logits, start_step, batch_size,
                        seed, mesh)
  state, metrics = train_lib.train_loop(state, lambda state, inputs: step(state, aux, *inputs),
                                        batches, steps=steps, start_step=start_step, hooks=hooks)
  elapsed = time.time() - start
  ran = steps - start_step
  summary = {'steps': steps, 'resumed_from': start_step, 'time_s': elapsed,
             'steps_per_s': ran / elapsed if ran else float('nan'),
             'final_loss': float(metrics['loss']) if metrics else float('nan'),
             'final_agreement': float(metrics['agreement']) if metrics else float('nan'),
             'online': online}
  return jax.device_get(state.variables), summary
