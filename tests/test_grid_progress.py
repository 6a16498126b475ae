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
