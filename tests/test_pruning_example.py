"""The README example of pruning a user-defined Flax model runs as written."""

from __future__ import annotations

import pathlib
import re

import jax

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def test_readme_example_runs():
  blocks = [b for b in re.findall(r'```python\n(.*?)```', EXAMPLE.read_text(), re.S)
            if 'run_pruned' in b and 'ttmpd_jax.prune(' not in b]
  assert len(blocks) == 1
  assert len(blocks[0].strip().splitlines()) <= 25
  namespace: dict = {}
  exec(compile(blocks[0], str(EXAMPLE), 'exec'), namespace)  # pylint: disable=exec-used
  # It really pruned: half the channels of the one residual group are gone.
  small, variables = namespace['small'], namespace['variables']
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree['params']))
  assert size(small) < 0.6 * size(variables)
  assert namespace['y'].shape == (8, 10)
