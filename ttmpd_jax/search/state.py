"""The iterative search's whole state, one JSON-serialisable dataclass (plus the variables).

Resuming a killed run = loading the latest saved ``(SearchState, variables)`` pair
(``IterationStore``) and calling the step function again. Nothing else is carried between
iterations.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

import orbax.checkpoint as ocp

from ttmpd_jax.errors import UserError

SEARCHING, REACHED, STUCK, DONE = 'searching', 'reached', 'stuck', 'done'


@dataclasses.dataclass
class SearchState:
  """Status of one iterative search.

  ``target_ms`` is the *predicted*-latency target; measurements can move it (see
  ``measure.corrected_target_ms``). ``status``: ``searching`` → ``reached`` (predicted target met)
  or ``stuck`` (no candidate can make progress) → ``done`` (measured target settled).
  """

  method: str
  l0_ms: float
  target_ms: float
  iteration: int = 0
  status: str = SEARCHING
  message: str = ''
  trajectory: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  compilations: list[int] = dataclasses.field(default_factory=list)
  times: dict[str, float] = dataclasses.field(
      default_factory=lambda: {'search': 0.0, 'short_term_ft': 0.0, 'measure': 0.0})
  judge: dict[str, Any] = dataclasses.field(default_factory=dict)
  measurements: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  kept: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # Original channel ids.
  stepped_back: list[int] = dataclasses.field(default_factory=list)
  corrections: int = 0
  met_target: bool = False
  saves: int = 0

  def keep(self, masks: Mapping[str, Any]) -> None:
    """Records a removal: ``masks`` are over the current network's channels."""
    for name, mask in masks.items():
      ids = self.kept.get(name, list(range(len(mask))))
      self.kept[name] = [i for i, m in zip(ids, mask) if m]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'SearchState':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(data).items() if k in names})


class IterationStore:
  """Saves and restores ``(variables, state JSON)`` after every search step (orbax).

  Orbax writes to a temporary directory and renames it, so a kill never leaves a half-written
  step; a restart restores the latest one.
  """

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=('variables', 'state'))

  def save(self, state: SearchState, variables: Mapping[str, Any]) -> None:
    state.saves += 1
    self._manager.save(state.saves, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(dict(variables)),
        state=ocp.args.JsonSave(state.to_json())))
    self._manager.wait_until_finished()

  def latest(self, abstract_variables_for: Callable[[Mapping[str, Any]], Any]
             ) -> Optional[tuple[SearchState, Any]]:
    """The latest ``(state, variables)`` or ``None``; ``abstract_variables_for(widths)`` gives
    the variables' shapes for the pruned architecture recorded in the state."""
    step = self._manager.latest_step()
    if step is None:
      return None
    try:
      raw = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.JsonRestore()))
      state = SearchState.from_json(raw['state'])
      widths = state.trajectory[-1]['widths'] if state.trajectory else {}
      restored = self._manager.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(abstract_variables_for(widths))))
    except Exception as e:  # Orbax raises many types for damaged directories.
      raise UserError(f'the saved pruning state in {self.directory} (step {step}) cannot be '
                      f'read ({type(e).__name__}: {str(e)[:200]}); delete that folder to start '
                      'over') from e
    return state, restored['variables']

  def close(self) -> None:
    self._manager.close()
