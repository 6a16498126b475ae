"""Knowledge-distillation fine-tuning of a (masked or pruned) student (DESIGN.md §3 steps 5, 6).

Two jitted steps share one update rule:

* ``make_kd_step``: reads the teacher's logits from the pseudo-label cache (TT-MPD);
* ``make_online_kd_step``: runs the teacher on every batch (the "online KD" baseline, the cost
  TT-MPD removes).

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
orbax ``CheckpointManager`` checkpoint every ``checkpoint_every`` steps (atomic, last few kept):
a killed run restarted with the same arguments resumes from the latest checkpoint and ends with the
same variables as an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Optional

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from ttmpd_jax import parallel
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.distill import cache as cache_lib
from ttmpd_jax.distill.losses import kd_loss
from ttmpd_jax.errors import UserError
from ttmpd_jax.train import format_seconds

Variables = dict[str, Any]
# (variables, aux) -> variables; pure and jit-traceable. ``aux`` is e.g. a pytree of masks.
Transform = Callable[[Variables, Any], Variables]


@flax.struct.dataclass
class KDState:
  """Everything a fine-tuning run carries from step to step (a pytree; orbax-saveable).

  Attributes:
    step: int32 scalar, number of updates applied so far.
    params, batch_stats: the student's variables.
    opt_state: the optax state of ``params``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> Variables:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def init_state(variables: Mapping[str, Any], optimizer: optax.GradientTransformation) -> KDState:
  """A step-0 ``KDState`` for the student ``variables``."""
  params = variables['params']
  return KDState(step=jnp.zeros((), jnp.int32), params=params,
                 batch_stats=variables.get('batch_stats', {}), opt_state=optimizer.init(params))


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


def _apply_transform(transform: Optional[Transform], variables: Variables, aux: Any) -> Variables:
  return variables if transform is None else transform(variables, aux)


def _kd_update(model: nn.Module, optimizer: optax.GradientTransformation,
               transform: Optional[Transform], temperature: float, kl_weight: float,
               hard_weight: float, state: KDState, aux: Any, images: jax.Array,
               teacher_logits: jax.Array) -> tuple[KDState, dict[str, jax.Array]]:
  """One KD update (traced inside jit by both step flavours)."""
  chex.assert_rank(images, 4)
  chex.assert_rank(teacher_logits, 2)
  chex.assert_equal_shape_prefix((images, teacher_logits), 1)

  def loss_fn(params):
    variables = _apply_transform(transform, {'params': params, 'batch_stats': state.batch_stats},
                                 aux)
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    loss = kd_loss(logits, teacher_logits, temperature=temperature, kl_weight=kl_weight,
                   hard_weight=hard_weight)
    chex.assert_equal_shape((logits, teacher_logits))
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Re-apply the transform so masked channels stay exactly zero (momentum and weight decay
  # would otherwise move them) and their BN statistics stay neutral.
  variables = _apply_transform(transform, {'params': params, 'batch_stats': batch_stats}, aux)
  agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
  new_state = state.replace(step=state.step + 1, params=variables['params'],
                            batch_stats=variables['batch_stats'], opt_state=opt_state)
  return new_state, {'loss': loss, 'agreement': agreement}


def make_kd_step(model: nn.Module, optimizer: optax.GradientTransformation, *,
                 transform: Optional[Transform] = None, temperature: float = 1.0,
                 kl_weight: float = 1.0, hard_weight: float = 0.0,
                 donate: bool = False) -> Callable:
  """KD step from cached teacher logits, jitted once.

  Returns ``step(state, aux, images, teacher_logits) -> (state, metrics)`` with
  ``images`` float32 [B, H, W, C] (normalised), ``teacher_logits`` float32 [B, K], ``aux`` the
  pytree forwarded to ``transform`` (``None`` without a transform) and ``metrics`` =
  ``{'loss': scalar, 'agreement': top-1 agreement with the teacher in [0, 1]}``. With
  ``donate=True`` the input state's buffers are reused for the output (the caller must not touch
  the old state again); saves a copy of the variables and optimizer state per step.
  """
  update = lambda state, aux, images, teacher_logits: _kd_update(
      model, optimizer, transform, temperature, kl_weight, hard_weight, state, aux, images,
      teacher_logits)
  return jax.jit(update, donate_argnums=(0,) if donate else ())


def make_online_kd_step(model: nn.Module, optimizer: optax.GradientTransformation,
                        teacher_model: nn.Module, teacher_variables: Mapping[str, Any], *,
                        transform: Optional[Transform] = None, temperature: float = 1.0,
                        kl_weight: float = 1.0, hard_weight: float = 0.0,
                        donate: bool = False) -> Callable:
  """The online-KD baseline: the teacher (eval mode) runs inside every step.

  Returns ``step(state, aux, images) -> (state, metrics)``. The teacher's variables are a jit
  argument (bound here), not constants folded into the compiled program.
  """

  def update(state, aux, images, teacher_vars):
    teacher_logits = jax.lax.stop_gradient(teacher_model.apply(teacher_vars, images, train=False))
    return _kd_update(model, optimizer, transform, temperature, kl_weight, hard_weight, state,
                      aux, images, teacher_logits)

  jitted = jax.jit(update, donate_argnums=(0,) if donate else ())
  return lambda state, aux, images: jitted(state, aux, images, teacher_variables)


# ----------------------------------------------------------------------------------------------
# The fine-tuning loop.


def batch_positions(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Rows (into the subset S of size ``n``) of the global batch for 0-based ``step``.

  Design choice: each epoch is a fresh permutation of S seeded by ``(seed, epoch)``; the last
  partial batch of an epoch is dropped so shapes stay fixed under jit. Depends only on its arguments, so a resumed run sees the same batches.
  """
  per_epoch = n // batch_size
  epoch, within = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[within * batch_size:(within + 1) * batch_size]


def _restore_or_none(manager: ocp.CheckpointManager, abstract_state: KDState,
                     run_config: Mapping[str, Any], directory: str) -> Optional[KDState]:
  latest = manager.latest_step()
  if latest is None:
    return None
  try:
    meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # Orbax raises many types for an unreadable directory.
    raise UserError(f'fine-tuning checkpoint {directory} (step {latest}) is unreadable '
                    f'({type(e).__name__}: {e}); delete it or choose another directory') from e
  if dict(meta) != dict(run_config):
    diff = sorted(k for k in set(meta) | set(run_config) if meta.get(k) != run_config.get(k))
    raise UserError(f'fine-tuning checkpoint {directory} belongs to another run (differs in '
                    f'{", ".join(diff)}); resume with the same arguments or use a fresh directory')
  restored = manager.restore(latest, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored['state']


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
  if ids is None:
    ids = cache.ids if cache is not None else np.arange(len(dataset), dtype=np.int32)
  ids = np.asarray(ids, np.int32)
  if cache is not None:
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
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_divisible(batch_size, mesh, flag='KD batch_size')
  if batch_size > len(ids):
    raise UserError(f'KD batch size {batch_size} is larger than the fine-tuning subset '
                    f'({len(ids)} samples); use a smaller batch or a larger subset')

  custom_optimizer = optimizer is not None
  optimizer = optimizer or kd_optimizer(learning_rate, steps, momentum=momentum,
                                        weight_decay=weight_decay, schedule=schedule)
  # The loop owns its state, so the step may reuse (donate) the previous state's buffers.
  kwargs = dict(transform=transform, temperature=temperature, kl_weight=kl_weight,
                hard_weight=hard_weight, donate=True)
  if online:
    teacher_model, teacher_variables = teacher
    step_fn = make_online_kd_step(model, optimizer, teacher_model,
                                  parallel.replicate(teacher_variables, mesh), **kwargs)
  else:
    step_fn = make_kd_step(model, optimizer, **kwargs)

  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  variables = _apply_transform(transform, variables, aux)
  # Copy: device_put may alias the caller's arrays, which donation would then invalidate.
  state = jax.tree.map(jnp.copy, parallel.replicate(init_state(variables, optimizer), mesh))
  aux = parallel.replicate(aux, mesh) if aux is not None else None

  manager = None
  start_step = 0
  if checkpoint_dir is not None:
    run_config = {
        'teacher': cache.key if cache is not None else cache_lib.fingerprint_variables(teacher[1]),
        'online': online, 'student': cache_lib.fingerprint_variables(variables),
        'aux': cache_lib.fingerprint_variables(aux) if aux is not None else '',
        'ids': cache_lib.fingerprint_variables(ids), 'steps': int(steps),
        'batch_size': int(batch_size), 'seed': int(seed), 'learning_rate': float(learning_rate),
        'temperature': float(temperature), 'kl_weight': float(kl_weight),
        'hard_weight': float(hard_weight), 'momentum': float(momentum),
        'weight_decay': float(weight_decay), 'schedule': str(schedule),
        'optimizer': 'custom' if custom_optimizer else 'kd_optimizer'}
    directory = os.path.abspath(checkpoint_dir)
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep_checkpoints, save_interval_steps=checkpoint_every, create=True),
        item_names=('state', 'meta'))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = _restore_or_none(manager, abstract, run_config, directory)
    if restored is not None:
      state = restored
      start_step = int(state.step)
      print_fn(f'resuming KD fine-tuning from step {start_step} ({directory})')

  per_process = batch_size // jax.process_count()
  lo = jax.process_index() * per_process
  label = 'online KD' if online else 'KD (cached pseudo labels)'
  start = time.time()
  metrics: dict[str, jax.Array] = {}
  try:
    for step in range(start_step, steps):
      rows = batch_positions(step, len(ids), batch_size, seed)[lo:lo + per_process]
      images = pipeline.normalize(dataset.images[ids[rows]], dataset.family)
      if online:
        state, metrics = step_fn(state, aux, parallel.shard_batch(images, mesh))
      else:
        images, logits = parallel.shard_batch((images, cache.logits[rows]), mesh)
        state, metrics = step_fn(state, aux, images, logits)
      done = step + 1
      if on_step is not None:
        on_step(done, metrics)
      if manager is not None:
        manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(run_config)),
                     force=done == steps)
      if done % log_every == 0 or done == steps:
        elapsed = time.time() - start
        rate = (done - start_step) / max(elapsed, 1e-9)
        print_fn(f'{label} step {done}/{steps}  loss {float(metrics["loss"]):.4f}  '
                 f'agreement {float(metrics["agreement"]):.3f}  {rate:.2f} steps/s  '
                 f'elapsed {format_seconds(elapsed)}  ETA {format_seconds((steps - done) / rate)}')
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  jax.block_until_ready(state)
  elapsed = time.time() - start
  ran = steps - start_step
  summary = {'steps': steps, 'resumed_from': start_step, 'time_s': elapsed,
             'steps_per_s': ran / elapsed if ran else float('nan'),
             'final_loss': float(metrics['loss']) if metrics else float('nan'),
             'final_agreement': float(metrics['agreement']) if metrics else float('nan'),
             'online': online}
  return jax.device_get(state.variables), summary
