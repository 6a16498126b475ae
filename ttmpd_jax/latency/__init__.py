"""Latency model (docs/method.md, step 2): measure in context, fit, predict, validate.

* ``protocol``: the one measurement protocol (compile, warm up, median of blocking calls;
  interleaved rounds, ratios to a reference, the CPU share other processes take).
* ``structure``: a model's units (its conv/dense layers, from ``pruning.graph.trace_layers``)
  and the width spec -> per-unit channels and cost features mapping.
* ``fusion``: which units XLA runs inside a library fusion region (read from the compiled HLO)
  and a rule that predicts it from channel counts.
* ``table``: per-device cache of in-context measurements (probe architectures of each model).
* ``predictor``: unit costs fitted on those measurements; prediction, fresh measurement,
  correction, validation.
* ``macs``: the table-free alternative, latency proportional to multiply-accumulates.
* ``compilations``: counting XLA compilations.

Typical use::

  table = LatencyTable.open(cache_dir='~/.cache/ttmpd_jax')
  predictor = LatencyPredictor.from_model(model, variables, (256, 28, 28, 1), table)
  predictor.predict(widths)                      # ms, no compilation
  measured = predictor.measure([widths])[0]      # end to end, against the unpruned model
  predictor.correct(widths, measured.ms, measured.teacher_ms, measured.spread)
"""

from ttmpd_jax.latency.compilations import CompilationCounter, count_compilations
from ttmpd_jax.latency.fusion import RegimeRule, library_units
from ttmpd_jax.latency.macs import MacsLatency
from ttmpd_jax.latency.predictor import (Fit, LatencyPredictor, Measured, Validation,
                                         choose_ridge, fit_costs, random_architectures, validate)
from ttmpd_jax.latency.protocol import (CpuMonitor, Relative, Timing, foreign_load, measure,
                                        measure_many, measure_model, measure_models,
                                        measure_relative, synthetic_variables)
from ttmpd_jax.latency.structure import ModelStructure, Unit, channel_grid, round_channels
from ttmpd_jax.latency.table import LatencyTable, TableError, default_table_path, device_key

__all__ = ['CompilationCounter', 'CpuMonitor', 'Fit', 'LatencyPredictor', 'LatencyTable',
           'MacsLatency', 'Measured', 'ModelStructure', 'RegimeRule', 'Relative', 'TableError',
           'Timing', 'Unit',
           'Validation', 'channel_grid', 'choose_ridge', 'count_compilations',
           'default_table_path', 'device_key', 'fit_costs', 'foreign_load', 'library_units',
           'measure', 'measure_many',
           'measure_model', 'measure_models', 'measure_relative', 'random_architectures',
           'round_channels', 'synthetic_variables', 'validate']
