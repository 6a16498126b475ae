"""Data parallelism: the same KD fine-tuning run on 1 and on 8 (forced CPU) devices.

Each run is a fresh subprocess (``XLA_FLAGS`` must be set before jax is imported) executing this
file as a script: it builds the pseudo-label cache, fine-tunes with checkpointing, adapts BN, and
saves the final variables to an npz that the test compares.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

STEPS = 12
BATCH = 64  # Divisible by 8.


def _worker(out_path: str, num_devices: int) -> None:
  import jax

  from ttmpd_jax import parallel, train
  from ttmpd_jax.data import pipeline
  from ttmpd_jax.data.datasets import Dataset
  from ttmpd_jax.distill import bn_adapt, finetune
  from ttmpd_jax.distill import cache as cache_lib
  from ttmpd_jax.models import ModelSpec, build_model

  assert jax.device_count() == num_devices, jax.devices()
  mesh = parallel.make_mesh(num_devices)
  model = build_model(ModelSpec('resnet8', 10, {'base_width': 8}))
  teacher = train.init_variables(model, (28, 28, 1), seed=0)
  student = train.init_variables(model, (28, 28, 1), seed=1)
  rng = np.random.default_rng(0)
  data = Dataset('fake_c/noise_1', rng.integers(0, 256, (320, 28, 28, 1), dtype=np.uint8),
                 np.zeros(320, np.int32), 'fashion_mnist')
  ids = cache_lib.select_subset(len(data), 256, seed=0)
  cache = cache_lib.build_cache(model, teacher, data, ids, batch_size=96, mesh=mesh,
                                print_fn=lambda s: None)
  tuned, _ = finetune.finetune(model, student, data, cache=cache, steps=STEPS, batch_size=BATCH,
                               learning_rate=0.02, seed=0, temperature=2.0, hard_weight=0.1,
                               weight_decay=5e-4, mesh=mesh, checkpoint_dir=os.path.join(
                                   os.path.dirname(out_path), f'ckpt{num_devices}'),
                               checkpoint_every=5, print_fn=lambda s: None)
  batches = pipeline.batches(data.images, data.labels, BATCH, family=data.family)
  adapted = bn_adapt.adapt_batch_stats(model, tuned, batches, mesh=mesh)
  flat = {'cache_logits': cache.logits}
  for prefix, tree in (('tuned', tuned), ('adapted', adapted)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      flat[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  np.savez(out_path, **flat)


def _run(tmp_path, num_devices: int) -> dict[str, np.ndarray]:
  out = tmp_path / f'run{num_devices}' / 'vars.npz'
  out.parent.mkdir()
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), str(num_devices)],
                        env=env, cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(out) as data:
    return dict(data)


def test_one_and_eight_devices_end_equal(tmp_path):
  one = _run(tmp_path, 1)
  eight = _run(tmp_path, 8)
  assert one.keys() == eight.keys() and len(one) > 50
  worst = max(float(np.max(np.abs(one[k] - eight[k]))) for k in one)
  print(f'max |1 device - 8 devices| over all variables: {worst:.2e}')
  for k in one:
    np.testing.assert_allclose(one[k], eight[k], atol=1e-5, rtol=0, err_msg=k)
  # The run actually trained (not a vacuous equality).
  assert float(np.max(np.abs(one["tuned['params']['head']['bias']"]))) > 1e-4


def test_distributed_initialize_disabled_is_single_process():
  from ttmpd_jax.distill import distributed
  info = distributed.initialize(False)
  assert info['process_index'] == 0 and info['process_count'] == 1
  assert info['global_devices'] == info['local_devices'] >= 1


if __name__ == '__main__':
  _worker(sys.argv[1], int(sys.argv[2]))
