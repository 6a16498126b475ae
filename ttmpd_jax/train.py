"""The one training loop: a train state, one step builder, one loop with hooks; and pretraining.

Every training run of the project (source pretraining, short- and long-term KD fine-tuning with
cached or online teachers, the search's short-term candidate fine-tuning, EPSD's masked and
self-distilled training) is the same three pieces:

* ``TrainState`` (step, params, batch_stats, opt_state), built by ``create_train_state`` without
  any XLA work, so a new architecture costs no compilation before its step;
* ``make_step(loss_fn, optimizer, transform=...)``: one jitted update rule. ``loss_fn`` says what
  is learned (cross-entropy, KD from cached or online teacher logits, PS-KD soft targets);
  ``transform(variables, aux)`` says what is held fixed (masks, a jit *argument*, so another mask
  of the same shapes reuses the compiled step);
* ``train_loop(state, step_fn, batches, steps=..., hooks=...)``: the host loop; hooks print
  progress (``ProgressHook``: step, loss, steps/s, ETA) and save resumable checkpoints
  (``CheckpointHook``, orbax).

Data parallelism: batches are sharded over the 1-D mesh axis ``data`` and the state replicated
(``parallel``); ``jax.jit`` then computes gradients and BN statistics over the global batch.

Pretraining: SGD with Nesterov momentum, cosine learning-rate decay with a short warm-up, weight
decay, cross-entropy on clean labels (test-time code never calls it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.extend import core as jax_core

from ttmpd_jax import interrupt, parallel
from ttmpd_jax.errors import ConfigError
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.errors import UserError

Variables = dict[str, Any]
Metrics = dict[str, Any]
# (variables, aux) -> variables; pure and jit-traceable. ``aux`` is e.g. a pytree of masks.
Transform = Callable[[Variables, Any], Variables]
# (params, batch_stats, inputs, aux) -> (loss, (new batch_stats, metrics)); inputs is a tuple.
LossFn = Callable[[Any, Any, tuple, Any], tuple[jax.Array, tuple[Any, Metrics]]]
# (step, state, metrics) -> None, called after every update (1-based step).
Hook = Callable[[int, Any, Metrics], None]


# ---- state ---------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (a pytree; orbax-saveable).

  Attributes:
    step: int32 scalar, number of updates applied so far.
    params, batch_stats: the network's variables.
    opt_state: the optax state of ``params``.
  """

  step: Any
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> Variables:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def _is_zero(var: Any) -> bool:
  return isinstance(var, jax_core.Literal) and not np.any(np.asarray(var.val))


def _starts_at_zero(jaxpr: Any) -> bool:
  """Whether every output of ``jaxpr`` is a literal zero or a broadcast of one."""
  zeros = {eqn.outvars[0] for eqn in jaxpr.eqns
           if eqn.primitive.name == 'broadcast_in_dim' and _is_zero(eqn.invars[0])}
  return all(_is_zero(v) or (not isinstance(v, jax_core.Literal) and v in zeros)
             for v in jaxpr.outvars)


def create_train_state(variables: Mapping[str, Any],
                       optimizer: optax.GradientTransformation) -> TrainState:
  """A step-0 ``TrainState`` for ``variables`` (``params`` and optional ``batch_stats``).

  Design choice: no eager XLA work. ``optimizer.init`` is traced, not run: when every output of
  the trace is a zero constant (momentum traces, step counts: every optimizer this project
  builds) the state is made of host zeros of the traced shapes, so a new architecture compiles
  nothing here. Any other optimizer falls back to running ``optimizer.init``.
  """
  params = variables['params']
  closed, shapes = jax.make_jaxpr(optimizer.init, return_shape=True)(params)
  if _starts_at_zero(closed.jaxpr):
    # A transfer of host zeros, not a computation: nothing compiles.
    opt_state = jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  else:
    opt_state = optimizer.init(params)
  return TrainState(step=jax.device_put(np.zeros((), np.int32)), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=opt_state)


# ---- the step ------------------------------------------------------------------------------------


def apply_transform(transform: Optional[Transform], variables: Mapping[str, Any],
                    aux: Any) -> Variables:
  """``transform(variables, aux)`` on ``{'params', 'batch_stats'}``; identity without one."""
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return variables if transform is None else transform(variables, aux)


def apply_update(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                 transform: Optional[Transform], state: TrainState, aux: Any,
                 inputs: tuple) -> tuple[TrainState, Metrics]:
  """One update (traced inside jit): gradient of ``loss_fn``, optimizer step, transform again.

  ``transform`` is applied before the forward pass (so held-fixed entries get no gradient) and
  again after the update, so momentum and weight decay can never move them.
  """

  def objective(params):
    variables = apply_transform(transform, {'params': params, 'batch_stats': state.batch_stats},
                                aux)
    return loss_fn(variables['params'], variables['batch_stats'], inputs, aux)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  variables = apply_transform(
      transform, {'params': optax.apply_updates(state.params, updates), 'batch_stats': batch_stats},
      aux)
  new_state = state.replace(step=state.step + 1, params=variables['params'],
                            batch_stats=variables['batch_stats'], opt_state=opt_state)
  return new_state, {'loss': loss, **metrics}


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
              transform: Optional[Transform] = None, donate: bool = False) -> Callable:
  """``step(state, aux, *inputs) -> (state, metrics)``, jitted once per shapes.

  ``inputs`` (e.g. images and labels, or images and teacher logits) are forwarded to ``loss_fn``
  as a tuple; ``aux`` (``None`` without a transform) to ``transform`` and ``loss_fn``.
  ``metrics`` holds ``loss`` and whatever ``loss_fn`` reports. With ``donate=True`` the input
  state's buffers are reused for the output (the caller must not touch the old state again).
  """
  update = lambda state, aux, *inputs: apply_update(loss_fn, optimizer, transform, state, aux,
                                                     inputs)
  return jax.jit(update, donate_argnums=(0,) if donate else ())


def supervised_loss(model: nn.Module) -> LossFn:
  """Cross-entropy on integer labels, BN in train mode; ``inputs = (images, labels)``."""

  def loss_fn(params, batch_stats, inputs, aux):
    images, labels = inputs
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (updates['batch_stats'], {})

  return loss_fn


# ---- the loop and its hooks ----------------------------------------------------------------------


def train_loop(state: Any, step_fn: Callable[[Any, Any], tuple[Any, Metrics]],
               batches: Iterable[Any], *, steps: int, start_step: int = 0,
               hooks: Iterable[Hook] = ()) -> tuple[Any, Metrics]:
  """Runs ``state, metrics = step_fn(state, batch)`` for steps ``start_step + 1 .. steps``.

  One batch is drawn from ``batches`` per step (it may be longer, or endless). After each update
  every hook is called as ``hook(step, state, metrics)`` (1-based step; metrics are device
  arrays, not synchronised); a hook raising aborts the run. Hooks with a ``close()`` method are
  closed when the loop ends, normally or not. Returns the final state (ready) and the last
  step's metrics (``{}`` when no step ran).
  """
  hooks = tuple(hooks)
  metrics: Metrics = {}
  try:
    for step, batch in zip(range(start_step + 1, steps + 1), batches):
      interrupt.check()   # Between steps (the hooks have saved what they save).
      state, metrics = step_fn(state, batch)
      for hook in hooks:
        hook(step, state, metrics)
  finally:
    for hook in hooks:
      if hasattr(hook, 'close'):
        hook.close()
  return jax.block_until_ready(state), metrics


def format_seconds(seconds: float) -> str:
  """``125.3`` -> ``'2m05s'`` (progress lines)."""
  seconds = int(max(seconds, 0))
  return f'{seconds // 60}m{seconds % 60:02d}s'


def loss_field(step: int, metrics: Metrics) -> str:
  return f'loss {float(metrics["loss"]):.4f}'


@dataclasses.dataclass
class ProgressHook:
  """Prints ``<label> step s/T  <fields>  r steps/s  elapsed E  ETA R`` every ``every`` steps
  and at the last one (never when ``every`` is 0). ``fields(step, metrics)`` formats the
  run-specific part (default: the loss); the rate counts the steps since ``start_step``."""

  label: str
  total_steps: int
  every: int
  print_fn: Callable[[str], None] = print
  fields: Callable[[int, Metrics], str] = loss_field
  start_step: int = 0

  def __post_init__(self):
    self.start_time = time.time()

  def __call__(self, step: int, state: Any, metrics: Metrics) -> None:
    if not self.every or (step % self.every and step != self.total_steps):
      return
    elapsed = time.time() - self.start_time
    rate = (step - self.start_step) / max(elapsed, 1e-9)
    self.print_fn(f'{self.label} step {step}/{self.total_steps}  {self.fields(step, metrics)}  '
                  f'{rate:.2f} steps/s  elapsed {format_seconds(elapsed)}  '
                  f'ETA {format_seconds((self.total_steps - step) / rate)}')


class CheckpointHook:
  """Saves the train state every ``every`` steps and at step ``total_steps`` (orbax, atomic, the
  last ``keep`` kept), with ``run_config`` (a JSON dict) beside it.

  ``restore(state)`` returns the latest saved state of the *same* run (same ``run_config``) or
  ``None``; a checkpoint of another run is refused with a ``UserError`` naming the differing
  settings, so runs are never silently mixed.
  """

  def __init__(self, directory: str, run_config: Mapping[str, Any], *, every: int, keep: int,
               total_steps: int, name: str = 'training'):
    self.directory, self.run_config = os.path.abspath(directory), dict(run_config)
    self.total_steps, self.name = total_steps, name
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True),
        item_names=('state', 'meta'))

  def restore(self, state: Any) -> Optional[Any]:
    try:
      return self._restore(state)
    except UserError:
      self.manager.close()
      raise

  def _restore(self, state: Any) -> Optional[Any]:
    latest = self.manager.latest_step()
    if latest is None:
      return None
    where = f'{self.name} checkpoint {self.directory}'
    try:
      meta = self.manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for an unreadable directory.
      raise UserError(f'{where} (step {latest}) is unreadable ({type(e).__name__}: {e}); delete '
                      f'it or choose another directory') from e
    meta = dict(meta['meta'])
    if meta != self.run_config:
      diff = sorted(k for k in set(meta) | set(self.run_config)
                    if meta.get(k) != self.run_config.get(k))
      raise UserError(f'{where} belongs to another run (differs in {", ".join(diff)}); resume '
                      f'with the same arguments or use a fresh directory')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return self.manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']

  def __call__(self, step: int, state: Any, metrics: Metrics) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(self.run_config)),
                      force=step == self.total_steps)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---- pretraining ---------------------------------------------------------------------------------


def init_variables(model: nn.Module, image_shape: tuple[int, ...], seed: int) -> Variables:
  """``{'params', 'batch_stats'}`` for inputs of shape [N, *image_shape]."""
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape)), train=False))(
      jax.random.key(seed))
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def sgd_cosine(learning_rate: float, total_steps: int, weight_decay: float = 5e-4,
               momentum: float = 0.9, warmup_steps: int = 0) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(warmup_steps, 1), max(total_steps, warmup_steps + 1))
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum, nesterov=True))


def step_budget(num_examples: int, batch_size: int, epochs: float,
                mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """``(steps per epoch, total steps)`` of a drop-remainder schedule; checks the batch size."""
  parallel.check_batch_divisible(batch_size, mesh)
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ConfigError('batch_size', f'{batch_size} is larger than the training set '
                      f'({num_examples} examples)')
  return steps_per_epoch, max(1, int(round(epochs * steps_per_epoch)))


def epoch_batches(train_set: Dataset, batch_size: int,
                  seed: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Endless ``(epoch, batch)`` pairs: epoch e is a drop-remainder pass shuffled with
  ``seed * 1000 + e``; each process gets its slice of every global batch."""
  epoch = 0
  while True:
    for batch in pipeline.batches(train_set.images, train_set.labels, batch_size,
                                  family=train_set.family, seed=seed * 1000 + epoch,
                                  drop_remainder=True, process_index=jax.process_index(),
                                  process_count=jax.process_count()):
      yield epoch, batch
    epoch += 1


def pretrain(model: nn.Module, train_set: Dataset, *, epochs: float, batch_size: int,
             learning_rate: float, weight_decay: float, seed: int,
             validation_set: Optional[Dataset] = None, log_every: int = 50,
             mesh: Optional[jax.sharding.Mesh] = None,
             print_fn: Callable[[str], None] = print) -> tuple[Variables, dict[str, Any]]:
  """Trains ``model`` from scratch on ``train_set``; returns host variables and a summary dict."""
  mesh = mesh or parallel.make_mesh()
  steps_per_epoch, total_steps = step_budget(len(train_set), batch_size, epochs, mesh)
  optimizer = sgd_cosine(learning_rate, total_steps, weight_decay,
                         warmup_steps=min(100, total_steps // 10))
  state = parallel.replicate(
      create_train_state(init_variables(model, train_set.image_shape, seed), optimizer), mesh)
  step = make_step(supervised_loss(model), optimizer)
  batches = (parallel.shard_batch((batch['image'], batch['label']), mesh)
             for _, batch in epoch_batches(train_set, batch_size, seed))
  progress = ProgressHook('pretrain', total_steps, log_every, print_fn, lambda s, m: (
      f'epoch {s / steps_per_epoch:.2f}  {loss_field(s, m)}'))
  start = time.time()
  state, metrics = train_loop(state, lambda state, inputs: step(state, None, *inputs), batches,
                              steps=total_steps, hooks=[progress])
  summary: dict[str, Any] = {'steps': total_steps, 'train_time_s': time.time() - start,
                             'final_loss': float(metrics['loss'])}
  if validation_set is not None and len(validation_set):
    summary['validation_accuracy'] = accuracy(model, state.variables, validation_set)
    print_fn(f'validation accuracy {summary["validation_accuracy"]:.4f}')
  return jax.device_get(state.variables), summary


# ---- evaluation ----------------------------------------------------------------------------------


def make_predict(model: nn.Module) -> Callable:
  """``(variables, images) -> logits`` in eval mode, jitted once per input shape."""
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def predict_dataset(model: nn.Module, variables: Variables, dataset: Dataset, batch_size: int = 500,
                    predict: Optional[Callable] = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> np.ndarray:
  """Logits float32 [N, classes] for every example of ``dataset`` (eval mode, fixed batch shape)."""
  predict = predict or make_predict(model)
  batch_size = min(batch_size, len(dataset))
  if mesh is not None:
    batch_size -= batch_size % mesh.size
  outputs = []
  for batch in pipeline.batches(dataset.images, dataset.labels, batch_size, family=dataset.family):
    padded, n = pipeline.pad_batch(batch, batch_size)
    images = padded['image'] if mesh is None else parallel.shard_batch(padded['image'], mesh)
    outputs.append(np.asarray(predict(variables, images))[:n])
  return np.concatenate(outputs)


def accuracy(model: nn.Module, variables: Variables, dataset: Dataset, batch_size: int = 500,
             predict: Optional[Callable] = None) -> float:
  """Top-1 accuracy in [0, 1] of ``variables`` on all of ``dataset``."""
  logits = predict_dataset(model, variables, dataset, batch_size, predict)
  return float(np.mean(logits.argmax(-1) == dataset.labels))
