"""Per-iteration pruning state on disk (orbax ``CheckpointManager``), for resuming killed runs.

Each finished iteration saves two items under ``<dir>/<iteration>``: the current (physically
pruned) ``variables`` and a JSON ``state`` (widths, trajectory, timings, proxy model, ...).
Orbax writes to a temporary directory and renames it, so a kill never leaves a half-written
iteration; a restart with the same flags restores the latest one and continues from there.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import orbax.checkpoint as ocp

from ttmpd_jax.errors import UserError


class IterationStore:
  """Saves and restores ``(variables, state_json)`` per finished iteration."""

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=('variables', 'state'))

  def save(self, iteration: int, variables: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    self._manager.save(iteration, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(dict(variables)), state=ocp.args.JsonSave(dict(state))))
    self._manager.wait_until_finished()

  def latest(self, abstract_variables_for: Callable[[Mapping[str, Any]], Any]
             ) -> Optional[tuple[int, Any, dict[str, Any]]]:
    """``(iteration, variables, state)`` of the latest saved iteration, or ``None``.

    ``abstract_variables_for(state)`` gives the variables' shapes for that state (the pruned
    architecture is recorded in the state).
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.JsonRestore()))
      state = dict(state['state'])
      restored = self._manager.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(abstract_variables_for(state))))
    except Exception as e:  # Orbax raises many types for damaged directories.
      raise UserError(f'the saved pruning state in {self.directory} (iteration {step}) cannot be '
                      f'read ({type(e).__name__}: {str(e)[:200]}); delete that folder to start '
                      'over') from e
    return step, restored['variables'], state

  def close(self) -> None:
    self._manager.close()
