"""Source pretraining beats chance; checkpoints round-trip and refuse bad or mismatched input."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from tests.conftest import requires_fashion_mnist
from ttmpd_jax import checkpoint, train
from ttmpd_jax.models import ModelSpec, build_model


@requires_fashion_mnist
def test_tiny_pretraining_beats_chance_clearly(tiny_teacher):
  assert tiny_teacher.test_accuracy > 0.6  # Chance is 0.1.


def _save_tiny(tmp_path, name='ckpt'):
  spec = ModelSpec('resnet8', 10, {'base_width': 4})
  variables = train.init_variables(build_model(spec), (8, 8, 1), seed=0)
  path = str(tmp_path / name)
  checkpoint.save(path, variables, checkpoint.CheckpointMeta(spec, (8, 8, 1), 'fashion_mnist'))
  return spec, variables, path


def test_checkpoint_roundtrip_including_pruned_widths(tmp_path):
  spec, variables, path = _save_tiny(tmp_path)
  restored, meta = checkpoint.load(path, expected_spec=spec)
  assert meta.spec == spec and meta.image_shape == (8, 8, 1)
  jax.tree.map(np.testing.assert_array_equal, variables, restored)
  pruned_spec = spec.with_widths({'stage1_block0/conv1': 2, 'stage3_block0/conv1': 5})
  pruned = train.init_variables(build_model(pruned_spec), (8, 8, 1), seed=1)
  pruned_path = str(tmp_path / 'pruned')
  checkpoint.save(pruned_path, pruned, checkpoint.CheckpointMeta(pruned_spec, (8, 8, 1), 'x'))
  model, restored, meta = checkpoint.load_model(pruned_path)
  assert restored['params']['stage1_block0']['conv1']['kernel'].shape[-1] == 2
  assert model.apply(restored, np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 10)


def test_checkpoint_refuses_overwrite_mismatch_and_corruption(tmp_path):
  spec, variables, path = _save_tiny(tmp_path)
  before = sorted(os.listdir(path))
  with pytest.raises(checkpoint.CheckpointError, match='refusing to overwrite'):
    checkpoint.save(path, variables, checkpoint.CheckpointMeta(spec, (8, 8, 1), 'x'))
  with pytest.raises(checkpoint.CheckpointError, match='does not match'):
    checkpoint.load(path, expected_spec=ModelSpec('resnet20', 10))
  assert sorted(os.listdir(path)) == before
  # Corrupt the stored arrays: loading must fail with a clear error, not garbage.
  for root, _, files in os.walk(os.path.join(path, 'variables')):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  with pytest.raises(checkpoint.CheckpointError, match='corrupted'):
    checkpoint.load(path)
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint'):
    checkpoint.load(str(tmp_path / 'missing'))
