"""A latency model proportional to multiply-accumulates: no table, one measurement.

``predict(widths) = teacher_ms * MACs(widths) / MACs(teacher)``, MACs from the same unit
analysis the fitted predictor uses (``latency.structure``, so any traced model works).

When to use it: it is the FLOPs target of much of the pruning literature, it needs no latency
table (seconds instead of minutes on a new device, nothing cached), and its decisions do not
depend on how busy the host was when a table was built — which makes it the latency model of
choice for reproducible tests and for devices that cannot be timed in the loop. What it cannot
see: fusion, per-layer overheads and memory traffic, so on a real device it ranks architectures
by work, not by time (on XLA:CPU a narrow network can save MACs and no milliseconds). The
search's measure-and-correct stage still judges the target on measured latency.

Design choice: the teacher is timed once (``latency.protocol``) only so that predictions read in
milliseconds; every decision of the search depends on ratios to the teacher's prediction, so the
scale never changes which network is chosen.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ttmpd_jax.latency import protocol
from ttmpd_jax.latency.structure import ModelStructure, zoo_model

Widths = Mapping[str, int]


class MacsLatency:
  """Predicted latency (ms) proportional to the architecture's multiply-accumulates."""

  def __init__(self, structure: ModelStructure, teacher_ms: float):
    if not teacher_ms > 0:
      raise ValueError(f'teacher_ms must be positive, got {teacher_ms}')
    self.structure = structure
    self.teacher_ms = float(teacher_ms)
    self.teacher_macs = self.macs(None)
    if not self.teacher_macs > 0:
      raise ValueError('the model has no multiply-accumulates to scale latency by')

  @classmethod
  def from_model(cls, model: Any, variables: Any, input_shape: Sequence[int],
                 dtype: str = 'float32', teacher_ms: Optional[float] = None,
                 repeats: int = 10) -> 'MacsLatency':
    """Traces ``model`` at ``input_shape`` (batch first); times it unless ``teacher_ms`` is given.

    ``variables`` may be abstract (``jax.eval_shape``): synthetic values are timed then.
    """
    structure = ModelStructure.from_model(model, variables, input_shape, dtype)
    if teacher_ms is None:
      teacher_ms = protocol.measure_model(model, protocol.timeable_variables(variables),
                                          tuple(input_shape), jnp.dtype(dtype),
                                          repeats=repeats).median_ms
    return cls(structure, teacher_ms)

  @classmethod
  def from_spec(cls, spec: Any, image_shape: Sequence[int], batch: int,
                **kwargs: Any) -> 'MacsLatency':
    """:meth:`from_model` for the zoo model ``spec`` (a ``ModelSpec``) on [batch, *image_shape]."""
    model, variables = zoo_model(spec, image_shape)
    return cls.from_model(model, variables, (batch, *image_shape), **kwargs)

  def macs(self, widths: Optional[Widths] = None) -> float:
    """Multiply-accumulates of the whole batch (G-MACs) of the architecture ``widths``."""
    return float(np.sum(self.structure.features(widths)[:, 0]))

  def predict(self, widths: Optional[Widths] = None) -> float:
    """Predicted latency (ms) of ``widths`` (missing keys: full width)."""
    return self.teacher_ms * self.macs(widths) / self.teacher_macs

  def describe(self) -> str:
    return (f'MACs latency model: {self.teacher_macs:.3f} G-MACs per batch = '
            f'{self.teacher_ms:.2f} ms (teacher, measured once)')
