"""The README example of pruning a user-defined Flax model runs as written."""

from __future__ import annotations

import pathlib
import re

import jax

import ttmpd_jax.pruning

EXAMPLE = pathlib.Path(ttmpd_jax.pruning.__file__).with_name('README_EXAMPLE.md')


def test_readme_example_runs():
  blocks = re.findall(r'```python\n(.*?)```', EXAMPLE.read_text(), re.S)
  assert len(blocks) == 1
  assert len(blocks[0].strip().splitlines()) <= 25
  namespace: dict = {}
  exec(compile(blocks[0], str(EXAMPLE), 'exec'), namespace)  # pylint: disable=exec-used
  # It really pruned: half the channels of the one residual group are gone.
  small, variables = namespace['small'], namespace['variables']
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree['params']))
  assert size(small) < 0.6 * size(variables)
  assert namespace['y'].shape == (8, 10)
