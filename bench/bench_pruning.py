"""Benchmark of the pruning primitives: discovery time, mask overhead, pruned speed-up, cost.

One self-contained command (a couple of minutes on 2 CPU cores)::

  python bench/bench_pruning.py
  python bench/bench_pruning.py --model resnet20 --image 32,32,3 --batch 256

Prints:

1. Channel-group discovery time on ResNet-50 at 224x224x3 (goal: < 5 s on CPU; the first call
   includes tracing warm-up, the median is over repeats) and on the benchmark model.
2. Masked vs unmasked jitted forward time of the benchmark model (default: the quickstart
   ResNet-8, base width 16, 28x28x1, batch 256): ``model.apply(apply_masks(v, masks), x)`` vs
   ``model.apply(v, x)``, both compiled once, medians over interleaved rounds (goal: <= 5%
   overhead).
3. Physically pruned vs unpruned forward time when every group keeps 50% of its channels
   (lowest L2-norm filters removed), and the parameter / MAC reduction.

The machine load (``/proc/loadavg``) is printed before and after: CPU timings on a shared
machine are only meaningful when it is low.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ttmpd_jax import pruning
from ttmpd_jax.models import ModelSpec, build_model
from ttmpd_jax.pruning.testing import random_variables


def _load() -> str:
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return 'n/a'


def _time_discovery(spec: ModelSpec, image_shape, repeats: int) -> tuple[float, float, int]:
  model = build_model(spec)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    groups = pruning.discover_groups(model, variables, x)
    times.append(time.perf_counter() - start)
  return times[0], statistics.median(times), len(groups)


def _interleaved(fns: dict, rounds: int, inner: int) -> dict[str, float]:
  """Median seconds per call of each zero-argument function, rounds interleaved."""
  samples = {k: [] for k in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(inner):
        out = fn()
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / inner)
  return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='resnet8')
  parser.add_argument('--base_width', type=int, default=16)
  parser.add_argument('--image', default='28,28,1', help='H,W,C')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--inner', type=int, default=3)
  parser.add_argument('--keep', type=float, default=0.5)
  parser.add_argument('--discovery_repeats', type=int, default=3)
  args = parser.parse_args()
  image_shape = tuple(int(s) for s in args.image.split(','))
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; '
        f'load {_load()}')

  # 1. Discovery.
  first, median, n = _time_discovery(ModelSpec('resnet50', 1000), (224, 224, 3),
                                     args.discovery_repeats)
  print(f'[discovery] resnet50 224x224x3: {n} groups, first call {first:.2f} s, median '
        f'{median:.2f} s (goal < 5 s)')
  kwargs = {'base_width': args.base_width} if args.model.startswith('resnet') else {}
  spec = ModelSpec(args.model, 10, kwargs)
  first, median, n = _time_discovery(spec, image_shape, args.discovery_repeats)
  print(f'[discovery] {args.model} {args.image}: {n} groups, median {median:.3f} s')

  # 2. Mask overhead in a jitted forward.
  model = build_model(spec)
  x = jax.random.normal(jax.random.key(0), (args.batch, *image_shape))
  variables = random_variables(model, x[:1], seed=0)
  groups = pruning.discover_groups(model, variables, x[:1])
  masks = pruning.masks_from_scores(pruning.l2_norm(variables, groups), groups, keep=args.keep)
  masks = {k: jnp.asarray(v) for k, v in masks.items()}
  plain = jax.jit(lambda v, x: model.apply(v, x))
  masked = jax.jit(lambda v, m, x: model.apply(pruning.apply_masks(v, m, groups), x))
  small = pruning.remove_channels(variables, groups, masks)
  small_model = build_model(spec.with_widths_of(small))
  pruned = jax.jit(lambda v, x: small_model.apply(v, x))
  np.testing.assert_allclose(masked(variables, masks, x), pruned(small, x), atol=1e-4)
  jax.block_until_ready((plain(variables, x), masked(variables, masks, x), pruned(small, x)))
  t = _interleaved({'plain': lambda: plain(variables, x),
                    'masked': lambda: masked(variables, masks, x),
                    'pruned': lambda: pruned(small, x)}, args.rounds, args.inner)
  overhead = 100.0 * (t['masked'] / t['plain'] - 1.0)
  print(f'[masks] {args.model} w{args.base_width} {args.image} batch {args.batch}: unmasked '
        f'{1e3 * t["plain"]:.1f} ms, masked {1e3 * t["masked"]:.1f} ms -> overhead '
        f'{overhead:+.1f}% (goal <= 5%)')

  # 3. Physical removal.
  full = pruning.count_cost(model, variables, image_shape)
  cost = pruning.count_cost(small_model, small, image_shape)
  print(f'[removal] keep {args.keep:.0%} of every group: forward {1e3 * t["plain"]:.1f} -> '
        f'{1e3 * t["pruned"]:.1f} ms (speed-up x{t["plain"] / t["pruned"]:.2f}); params '
        f'{full.params:,} -> {cost.params:,} ({cost.params / full.params:.1%}); MACs/example '
        f'{full.macs:,} -> {cost.macs:,} ({cost.macs / full.macs:.1%})')
  print(f'load after: {_load()}')


if __name__ == '__main__':
  main()
