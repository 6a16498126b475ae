"""Benchmark: KD step time with cached pseudo labels vs online KD (teacher on every batch).

Same batch, same teacher, student of the same architecture and width (the worst case for the
cache: a pruned student is cheaper, so the teacher's share of an online step is even larger).
Both steps are jitted once; timings are medians over interleaved rounds (robust to a shared,
noisy machine), each round ``block_until_ready``. Also prints the one-time labelling cost of the
cache and the break-even number of steps.

  python bench/bench_kd_cache.py                       # ResNet-20 w16, batch 128, 28x28x1
  python bench/bench_kd_cache.py --model resnet8 --base_width 8 --steps 10 --rounds 5
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/bench_kd_cache.py --devices 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from ttmpd_jax import parallel, train
from ttmpd_jax.data import pipeline
from ttmpd_jax.data.datasets import Dataset
from ttmpd_jax.distill import cache as cache_lib
from ttmpd_jax.distill import finetune
from ttmpd_jax.models import ModelSpec, build_model


def _time_steps(step, state, args, steps: int) -> tuple[tuple[float, float], object]:
  """Per-step (wall seconds, process CPU seconds) over ``steps`` steps."""
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, metrics = step(state, *args)
  jax.block_until_ready((state, metrics))
  return ((time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps), state


def _bench_student(args, mesh, student_model, student, teacher_model, teacher, images, logits):
  """Median per-step (wall ms, CPU ms) of the cached and the online KD step for one student."""
  optimizer = finetune.kd_optimizer(0.01, 10_000)
  cached_step = finetune.make_kd_step(student_model, optimizer, temperature=2.0,
                                      donate=args.donate)
  online_step = finetune.make_online_kd_step(student_model, optimizer, teacher_model,
                                             parallel.replicate(teacher, mesh), temperature=2.0,
                                             donate=args.donate)
  state_c = parallel.replicate(finetune.init_state(student, optimizer), mesh)
  state_o = jax.tree.map(lambda x: x.copy(), state_c)
  # Compile and warm up both.
  _, state_c = _time_steps(cached_step, state_c, (None, images, logits), 2)
  _, state_o = _time_steps(online_step, state_o, (None, images), 2)
  cached_t, online_t = [], []
  for _ in range(args.rounds):  # Interleaved, so machine load hits both alike.
    t, state_c = _time_steps(cached_step, state_c, (None, images, logits), args.steps)
    cached_t.append(t)
    t, state_o = _time_steps(online_step, state_o, (None, images), args.steps)
    online_t.append(t)
  med = lambda ts, i: 1e3 * statistics.median(t[i] for t in ts)
  return (med(cached_t, 0), med(cached_t, 1)), (med(online_t, 0), med(online_t, 1))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--model', default='resnet20')
  p.add_argument('--base_width', type=int, default=16, help='teacher base width')
  p.add_argument('--student_widths', default='16,8',
                 help='comma-separated student base widths (same architecture)')
  p.add_argument('--image_size', type=int, default=28)
  p.add_argument('--channels', type=int, default=1)
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--subset', type=int, default=2048, help='fine-tuning subset size to label')
  p.add_argument('--steps', type=int, default=20, help='steps per timing round')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--devices', type=int, default=None)
  p.add_argument('--donate', action=argparse.BooleanOptionalAction, default=True,
                 help='donate the state buffers to the step (as finetune does)')
  args = p.parse_args()

  mesh = parallel.make_mesh(args.devices)
  shape = (args.image_size, args.image_size, args.channels)
  teacher_model = build_model(ModelSpec(args.model, 10, {'base_width': args.base_width}))
  teacher = train.init_variables(teacher_model, shape, seed=0)
  rng = np.random.default_rng(0)
  n = max(args.subset, args.batch_size)
  data = Dataset('bench_c/noise_1', rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                 np.zeros(n, np.int32), 'fashion_mnist')
  print(f'device: {jax.devices()[0].device_kind} x{mesh.size}  jax {jax.__version__}  '
        f'teacher {args.model} base_width {args.base_width}  input {shape}  '
        f'batch {args.batch_size}')

  # One-time labelling cost (cold includes compiling the teacher's forward pass).
  ids = np.arange(args.subset, dtype=np.int32)
  label_fn = cache_lib.make_label_fn(teacher_model, mesh)
  t0 = time.perf_counter()
  cache = cache_lib.build_cache(teacher_model, teacher, data, ids, batch_size=500, mesh=mesh,
                                label_fn=label_fn, print_fn=lambda s: None)
  label_cold = time.perf_counter() - t0
  t0 = time.perf_counter()
  cache_lib.build_cache(teacher_model, teacher, data, ids, batch_size=500, mesh=mesh,
                        label_fn=label_fn, print_fn=lambda s: None)
  label_warm = time.perf_counter() - t0
  print(f'one-time labelling of {args.subset} samples: {label_cold:.2f} s cold (incl. compile), '
        f'{label_warm:.2f} s warm ({1e3 * label_warm / args.subset:.3f} ms/sample, incl. '
        f'hashing teacher and images)')

  images = parallel.shard_batch(pipeline.normalize(data.images[:args.batch_size], data.family),
                                mesh)
  logits = parallel.shard_batch(cache.logits[:args.batch_size], mesh)
  for width in (int(w) for w in args.student_widths.split(',')):
    student_model = build_model(ModelSpec(args.model, 10, {'base_width': width}))
    student = train.init_variables(student_model, shape, seed=1)
    (c_wall, c_cpu), (o_wall, o_cpu) = _bench_student(args, mesh, student_model, student,
                                                      teacher_model, teacher, images, logits)
    saved = (o_wall - c_wall) / 1e3
    break_even = label_warm / saved if saved > 0 else float('inf')
    print(f'student base_width {width:3d}{" (= teacher)" if width == args.base_width else ""}: '
          f'cached {c_wall:8.2f} ms wall {c_cpu:8.2f} ms CPU | online {o_wall:8.2f} ms wall '
          f'{o_cpu:8.2f} ms CPU | ratio {o_wall / c_wall:.2f}x wall, {o_cpu / c_cpu:.2f}x CPU '
          f'| labelling repaid after {break_even:.1f} steps')
  print(f'(medians of {args.rounds} interleaved rounds x {args.steps} steps; goal: ratio >= 1.5x; '
        'on a shared machine trust the CPU-time ratio)')


if __name__ == '__main__':
  main()
