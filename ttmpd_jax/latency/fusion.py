"""Which units XLA runs inside a library fusion region, read from the compiled model, and a rule
that predicts it from channel counts without compiling.

XLA hands regions of a model to a kernel library: on CPU a YNNPACK fusion (an HLO fusion of kind
``kCustom``) can cover a chain of convolutions, normalisations and activations; the other
convolutions run as XLA's own Eigen calls between loop fusions. The two paths cost very different
amounts per multiply-add, and which one a convolution takes depends on its channel counts. Measured
on ResNet-8 (2-core Xeon, jaxlib 0.10): narrowing a stage-2 convolution from 24 to 16 channels
takes it out of the library region and saves 11% of the whole model's latency, where its own
multiply-adds are 2% of the model's; a cost model blind to the switch ranks such candidates wrongly.
On that host a convolution joined the region exactly when more than 16 channels entered or left it
(every unit of ResNet-8 and VGG-small, over 100 compiled architectures); the rule below is learned
from the compiled probes, not assumed, so another device or XLA version brings its own.

Design choices:

* **Read, not guessed.** The regime of a unit comes from the optimized HLO of each probe, which is
  compiled anyway to be timed: an instruction computing the unit's convolution or matmul (its
  ``op_name`` metadata names the module) inside a computation that a ``kind=kCustom`` fusion calls
  puts the unit in the *library* regime; otherwise it is *native*.
* **Compile-free prediction.** :class:`RegimeRule` predicts the regime of any architecture from the
  per-unit channel counts: per unit a threshold on ``max(c_in, c_out)`` fitted on that unit's
  observations; a unit seen in one regime only follows the threshold shared by the units that
  switched, when its observations agree with it, and otherwise keeps its one regime.
* A device without library regions (or a model whose HLO names no unit) gives every unit the
  native regime, and the cost model reduces to one regime.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$')
_CALLS = re.compile(r'(?:calls|to_apply)=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPCODE = re.compile(r'=\s*[^=]*?\s(convolution|dot|custom-call)\(')
_UNIT_OPS = ('conv_general_dilated', 'dot_general')


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """HLO module text -> computation name -> its instruction lines."""
  out: dict[str, list[str]] = {}
  lines: Optional[list[str]] = None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      lines = out.setdefault(match.group(1), [])
    elif line.strip() == '}':
      lines = None
    elif lines is not None:
      lines.append(line)
  return out


def _library_computations(computations: dict[str, list[str]]) -> set[str]:
  """Computations run by library fusions (``kind=kCustom``) and everything they call."""
  todo = [name for body in computations.values() for line in body if 'kind=kCustom' in line
          for name in _CALLS.findall(line)]
  seen: set[str] = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    todo += [c for line in computations[name] for c in _CALLS.findall(line)]
  return seen


def _unit_of(op_name: str, paths: Sequence[str]) -> Optional[str]:
  """The unit whose module path names ``op_name``'s module (the longest match), if any."""
  text = '/' + op_name + '/'
  best = None
  for path in paths:
    if f'/{path}/' in text and (best is None or len(path) > len(best)):
      best = path
  return best


def library_units(hlo_text: str, paths: Sequence[str]) -> frozenset[str]:
  """Units (module paths) whose convolution/matmul runs inside a library fusion region."""
  computations = _computations(hlo_text)
  library = _library_computations(computations)
  out = set()
  for name in library:
    for line in computations[name]:
      op = _OP_NAME.search(line)
      if op is None or not _OPCODE.search(line.split(', metadata=')[0]):
        continue
      if not any(suffix in op.group(1) for suffix in _UNIT_OPS):
        continue
      unit = _unit_of(op.group(1), paths)
      if unit is not None:
        out.add(unit)
  return frozenset(out)


def encode(library: frozenset[str], paths: Sequence[str]) -> str:
  """Compact text of a regime assignment: one letter per unit, 'L' library, 'N' native."""
  return ''.join('L' if p in library else 'N' for p in paths)


def decode(text: str) -> np.ndarray:
  return np.array([c == 'L' for c in text], bool)


def _best_threshold(m: np.ndarray, lib: np.ndarray) -> tuple[int, int]:
  """(threshold t, errors) of the rule ``library iff m > t`` with fewest errors (smallest t)."""
  best = (0, int(np.sum(~lib)))   # t = 0: everything library.
  for t in np.unique(m):
    errors = int(np.sum(lib & (m <= t)) + np.sum(~lib & (m > t)))
    if errors < best[1]:
      best = (int(t), errors)
  return best


@dataclasses.dataclass(frozen=True)
class RegimeRule:
  """Predicts every unit's regime from its channel counts (see module docstring).

  Attributes:
    thresholds: per unit, ``t`` of ``library iff max(c_in, c_out) > t``, or None for a unit that
      keeps one regime.
    constant: per unit, that one regime (True: library); used where ``thresholds`` is None.
  """

  thresholds: tuple[Optional[int], ...]
  constant: tuple[bool, ...]

  @classmethod
  def fit(cls, c_in: np.ndarray, c_out: np.ndarray, library: np.ndarray) -> 'RegimeRule':
    """From observations: int/bool arrays [architectures, units]."""
    m = np.maximum(np.asarray(c_in), np.asarray(c_out))
    library = np.asarray(library, bool)
    if m.ndim != 2 or m.shape != library.shape or m.shape[0] == 0:
      raise ValueError(f'need matching [architectures, units] arrays, got {m.shape}, '
                       f'{library.shape}')
    switched = [u for u in range(m.shape[1]) if 0 < library[:, u].sum() < m.shape[0]]
    shared = (_best_threshold(m[:, switched].ravel(), library[:, switched].ravel())[0]
              if switched else None)
    thresholds: list[Optional[int]] = []
    constant: list[bool] = []
    for u in range(m.shape[1]):
      lib = library[:, u]
      constant.append(bool(lib.mean() >= 0.5))
      if u in switched:
        thresholds.append(_best_threshold(m[:, u], lib)[0])
      elif shared is not None and np.array_equal(lib, m[:, u] > shared):
        thresholds.append(shared)
      else:
        thresholds.append(None)
    return cls(tuple(thresholds), tuple(constant))

  @classmethod
  def native(cls, units: int) -> 'RegimeRule':
    """Every unit native: the one-regime cost model."""
    return cls((None,) * units, (False,) * units)

  def predict(self, c_in: Sequence[int], c_out: Sequence[int]) -> np.ndarray:
    """bool [units]: True where the unit runs inside a library region."""
    m = np.maximum(np.asarray(c_in), np.asarray(c_out))
    return np.array([c if t is None else bool(x > t)
                     for x, t, c in zip(m, self.thresholds, self.constant)], bool)


def split_by_regime(features: np.ndarray, library: np.ndarray) -> np.ndarray:
  """[units, k] features -> [units, 2k]: the native copy, then the library copy (zeros
  elsewhere), so every unit has separate costs in each regime."""
  lib = np.asarray(library, bool)[:, None]
  return np.concatenate([features * ~lib, features * lib], axis=1)


__all__ = ['RegimeRule', 'decode', 'encode', 'library_units', 'split_by_regime']
