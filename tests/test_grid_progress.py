"""The benchmark grid's progress line: the ETA of a resumed grid counts the time its cells took."""

from __future__ import annotations

import math

import pytest

from launch import mode_prune


def test_eta_sums_the_cells_left_at_their_models_durations(capsys):
  progress = mode_prune.Progress(['resnet20', 'vgg', 'resnet20', 'vgg'])
  assert math.isnan(progress.eta())
  # A cell reused from an earlier process (rows from before elapsed_s: their wall_s counts).
  progress.cell_finished([], [{'wall_s': 500.0}, {'wall_s': 100.0}])
  assert progress.eta() == pytest.approx(3 * 600.0)    # vgg unknown yet: the mean of all cells
  progress.cell_finished([], [{'elapsed_s': 200.0, 'wall_s': 150.0}])
  assert progress.eta() == pytest.approx(600.0 + 200.0)
  assert 'grid: 2/4 cells done, ETA 13m20s' in capsys.readouterr().out


def test_a_method_revision_changes_only_that_methods_run_keys():
  from absl import flags
  from ttmpd_jax.search.config import SearchConfig
  from ttmpd_jax.search.methods import METHODS
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['test'])
  config, uniform = SearchConfig(), METHODS.get('uniform')
  keys = {m: mode_prune.run_key(m, config, 'd', 's') for m in ('uniform', 'ttmpd')}
  revision = uniform.revision
  object.__setattr__(uniform, 'revision', revision + 1)   # A frozen dataclass, revised.
  try:
    # The revised method's key moves; the others' (finished rows of a grid) stay valid.
    assert mode_prune.run_key('uniform', config, 'd', 's') != keys['uniform']
    assert mode_prune.run_key('ttmpd', config, 'd', 's') == keys['ttmpd']
  finally:
    object.__setattr__(uniform, 'revision', revision)
  assert mode_prune.run_key('uniform', config, 'd', 's') == keys['uniform']
