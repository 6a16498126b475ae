"""The README's ``ttmpd_jax.prune`` examples (a linen and an NNX model defined there, not from the
zoo) run as written: TT-MPD to a latency target on unlabeled images, masked == removed, and the
measured latency fell."""

from __future__ import annotations

import pathlib
import re

import pytest

pytestmark = pytest.mark.timing   # Measures latency: run alone, after the parallel tests (.ci/run).

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def _blocks():
  return [b for b in re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
          if 'ttmpd_jax.prune(' in b]


def test_two_examples_of_at_most_20_lines():
  blocks = _blocks()
  assert len(blocks) == 2 and 'flax.linen' in blocks[0] and 'nnx' in blocks[1]
  assert all(len(b.strip().splitlines()) <= 20 for b in blocks)


@pytest.mark.parametrize('index', [0, 1], ids=['linen', 'nnx'])
def test_readme_prune_example_runs(index, tmp_path, monkeypatch):
  monkeypatch.setenv('TTMPD_JAX_CACHE', str(tmp_path))   # A fresh latency table.
  namespace: dict = {}
  exec(compile(_blocks()[index], str(README), 'exec'), namespace)  # pylint: disable=exec-used
  result = namespace['result']
  report = result.report
  assert report.method == 'ttmpd' and report.prune_finetune_s > 0 and report.trajectory
  assert report.measurements   # The search measured its network against the original.
  assert any(m.sum() < m.size for m in result.masks.values())
