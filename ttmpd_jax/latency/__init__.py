"""Latency model (DESIGN.md section 3, step 2): measure, tabulate, predict, validate.

* ``protocol``: the one measurement protocol (compile, warm up, median of blocking calls).
* ``structure``: a model's latency units and the width spec -> per-unit channels mapping.
* ``table``: per-device lookup table of unit latencies, cached on disk, interpolated.
* ``predictor``: whole-model prediction (sum of units, fitted scale + constant), validation.
* ``compilations``: counting XLA compilations.

Typical use::

  table = LatencyTable.open(cache_dir='~/.cache/ttmpd_jax')
  predictor = LatencyPredictor.build(spec, image_shape=(28, 28, 1), batch=256, table=table)
  predictor.calibrate()
  predictor.predict(widths)  # ms, no compilation
"""

from ttmpd_jax.latency.compilations import CompilationCounter, count_compilations
from ttmpd_jax.latency.predictor import (FITS, Calibration, LatencyPredictor, Validation,
                                         fit_calibration, random_architectures, validate)
from ttmpd_jax.latency.protocol import (Timing, measure, measure_many, measure_model,
                                        measure_models, synthetic_variables)
from ttmpd_jax.latency.structure import ModelStructure, Unit, UnitConfig, channel_grid
from ttmpd_jax.latency.table import (LatencyTable, TableError, default_table_path, device_key,
                                     interpolate, interpolate_diagonal)

__all__ = ['FITS', 'Calibration', 'CompilationCounter', 'LatencyPredictor', 'LatencyTable',
           'ModelStructure', 'TableError', 'Timing', 'Unit', 'UnitConfig', 'Validation',
           'channel_grid', 'count_compilations', 'default_table_path', 'device_key',
           'fit_calibration', 'interpolate', 'interpolate_diagonal', 'measure', 'measure_many',
           'measure_model', 'measure_models', 'random_architectures', 'synthetic_variables',
           'validate']
