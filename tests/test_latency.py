"""Latency model: protocol, structure analysis, interpolation, table file handling, predictor."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ttmpd_jax.latency import (CompilationCounter, LatencyPredictor, LatencyTable, ModelStructure,
                               TableError, UnitConfig, channel_grid, fit_calibration,
                               interpolate, interpolate_diagonal, measure, measure_many,
                               measure_model, random_architectures, synthetic_variables)
from ttmpd_jax.latency import table as table_lib
from ttmpd_jax.models import ModelSpec, build_model
from ttmpd_jax.models.inspect import layer_inventory

FAKE_KEY = {'device_kind': 'cpu', 'platform': 'cpu', 'jax_version': '0.0-test',
            'jaxlib_version': '0.0-test', 'cpu_model': 'test', 'cpu_cores': 2}


# ---- protocol ----------------------------------------------------------------------------------
def test_measure_positive_and_consistent():
  a = jnp.ones((192, 192), jnp.float32)
  small = jax.jit(lambda x: x @ x)
  big = jax.jit(lambda x: (x @ x) @ (x @ x) @ (x @ x) @ (x @ x) @ x @ x @ x @ x)
  t_small, t_small2, t_big = measure_many([(small, (a,)), (small, (a,)), (big, (a,))],
                                          repeats=15, warmup=2)
  for t in (t_small, t_small2, t_big):
    assert t.median_ms > 0 and t.min_ms > 0 and t.iqr_ms >= 0 and t.repeats == 15
    assert t.min_ms <= t.median_ms and len(t.times_ms) == 15
  assert t_small.compile_s > 0
  # The same function measured twice (interleaved) agrees; 9x the work takes clearly longer.
  assert 0.5 < t_small.median_ms / t_small2.median_ms < 2.0
  assert t_big.median_ms > 2.0 * t_small.median_ms


def test_measure_accepts_plain_and_compiled_functions():
  x = jnp.arange(1000.0)
  assert measure(lambda v: jnp.sin(v).sum(), x, repeats=3, warmup=0).median_ms > 0
  compiled = jax.jit(jnp.cos).lower(x).compile()
  timing = measure(compiled, x, repeats=3, warmup=1)
  assert timing.median_ms > 0 and timing.compile_s == 0.0
  with pytest.raises(ValueError):
    measure(jnp.cos, x, repeats=0)


def test_measure_model_positive():
  model = build_model(ModelSpec('resnet8', 10, {'base_width': 4}))
  variables = synthetic_variables(model, (4, 16, 16, 1))
  timing = measure_model(model, variables, (4, 16, 16, 1), repeats=3, warmup=1)
  assert timing.median_ms > 0 and timing.repeats == 3


# ---- compilation counting ----------------------------------------------------------------------
def test_compilation_counter_counts_cache_misses_only():
  f = jax.jit(lambda x: x * 3.0 + 1.0)
  x3, x5, x7 = np.ones(3, np.float32), np.ones(5, np.float32), np.ones(7, np.float32)
  with CompilationCounter() as counter:
    f(x3).block_until_ready()
    f(x3).block_until_ready()      # cached: no compilation
    f(x5).block_until_ready()      # new shape: one more
  assert counter.count == 2, counter.names
  assert counter.seconds > 0 and sum(counter.names.values()) == 2
  f(x7).block_until_ready()        # after exit: not counted
  assert counter.count == 2


# ---- structure ---------------------------------------------------------------------------------
SPECS = [ModelSpec('resnet8', 10, {'base_width': 8}),
         ModelSpec('vgg_small', 10, {'config': (8, 'M', 16, 'M'), 'hidden': 16}),
         ModelSpec('mobilenetv2', 10, {'width_multiplier': 0.25, 'small_input': True,
                                       'config': ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))})]


@pytest.mark.parametrize('spec', SPECS, ids=lambda s: s.name)
def test_structure_channels_match_layer_inventory(spec):
  image_shape = (16, 16, 1)
  structure = ModelStructure.from_spec(spec, image_shape, batch=2)
  archs = [structure.full_widths] + random_architectures(structure, 3, round_to=4, seed=0)
  for widths in archs:
    pruned = spec.with_widths(widths)
    model = build_model(pruned)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                                  train=False))
    inventory = {l.path: l for l in layer_inventory(model, variables, (2, *image_shape))
                 if l.kind in ('conv', 'dense')}
    c_in, c_out = structure.channels(widths)
    assert [u.path for u in structure.units] == list(inventory)
    for u, ci, co in zip(structure.units, c_in, c_out):
      assert (ci, co) == (inventory[u.path].c_in, inventory[u.path].c_out), u.path
      if u.depthwise:
        assert inventory[u.path].groups == ci


def test_structure_resnet8_groups_and_producers():
  s = ModelStructure.from_spec(ModelSpec('resnet8', 10, {'base_width': 8}), (28, 28, 1), 4)
  by_path = {u.path: u for u in s.units}
  assert by_path['stem'].producer is None and by_path['stem'].c_in_full == 1
  assert s.units[by_path['stage3_block0/conv1'].producer].path == 'stage2_block0/conv2'
  assert by_path['head'].feeds_output and by_path['head'].config.kind == 'dense'
  assert by_path['stage2_block0/conv1'].config.strides == (2, 2)
  assert by_path['stage2_block0/conv1'].config.batchnorm
  groups = s.prunable_groups()
  assert ('stem', 'stage1_block0/conv2') in groups
  assert ('stage2_block0/conv2', 'stage2_block0/shortcut') in groups
  assert not any('head' in g for g in groups)
  assert not any(u.config.pool for u in s.units)  # Residual joins end every ResNet unit.
  vgg = ModelStructure.from_spec(SPECS[1], (16, 16, 1), 2)
  by_path = {u.path: u for u in vgg.units}
  assert by_path['fc1'].in_factor == 16 and by_path['fc1'].c_in_full == 16 * 16  # 4x4x16 flat
  assert by_path['conv0'].config.pool[:3] == ('max', (1, 2, 2, 1), (1, 2, 2, 1))
  mobilenet = ModelStructure.from_spec(SPECS[2], (16, 16, 1), 2)
  assert [u.path for u in mobilenet.units if u.config.pool] == ['last']
  assert mobilenet.units[-2].config.pool == ('mean',)


@pytest.mark.parametrize('pool', [('max', (1, 2, 2, 1), (1, 2, 2, 1), ((0, 0),) * 4), ('mean',)])
def test_unit_function_includes_following_pool(pool):
  config = UnitConfig('conv', 2, (8, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), batchnorm=True,
                      pool=pool)
  args = table_lib.unit_arguments(config, 4, 6, np.random.default_rng(0))
  out = table_lib.unit_function(config)(*args)
  assert out.shape == ((2, 4, 4, 6) if pool[0] == 'max' else (2, 6))
  assert config.key() != dataclasses.replace(config, pool=()).key()


def test_channel_grid():
  assert channel_grid(20, 8) == (8, 16, 20)
  assert channel_grid(16, 8) == (8, 16)
  assert channel_grid(3, 8) == (3,)
  assert channel_grid(256, 8, max_points=8) == (32, 64, 96, 128, 160, 192, 224, 256)


# ---- interpolation -----------------------------------------------------------------------------
def test_interpolation_exact_at_grid_points():
  rng = np.random.default_rng(0)
  gi, go = (8, 16, 24, 32), (8, 16, 20)
  values = rng.uniform(0.1, 5.0, (4, 3))
  for a, ci in enumerate(gi):
    for b, co in enumerate(go):
      assert interpolate(gi, go, values, ci, co) == pytest.approx(values[a, b], rel=1e-12)
  diag = rng.uniform(0.1, 5.0, 4)
  for a, c in enumerate(gi):
    assert interpolate_diagonal(gi, diag, c) == pytest.approx(diag[a], rel=1e-12)
  # Halfway between grid points is the mean of the neighbours.
  assert interpolate(gi, go, values, 12, 8) == pytest.approx((values[0, 0] + values[1, 0]) / 2)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), ci=st.floats(1, 48), co=st.floats(1, 48),
       d=st.floats(0, 16), axis=st.sampled_from(['in', 'out', 'both']))
def test_interpolation_monotone_where_entries_are(seed, ci, co, d, axis):
  rng = np.random.default_rng(seed)
  gi, go = (8, 16, 24, 32), (8, 16, 32)
  # Entries increasing in both channel counts.
  values = np.cumsum(np.cumsum(rng.uniform(0.01, 1.0, (4, 3)), axis=0), axis=1)
  di = d if axis in ('in', 'both') else 0.0
  do = d if axis in ('out', 'both') else 0.0
  lo = interpolate(gi, go, values, ci, co)
  hi = interpolate(gi, go, values, ci + di, co + do)
  assert 0 < lo <= hi + 1e-12
  diag = np.cumsum(rng.uniform(0.01, 1.0, 4))
  assert interpolate_diagonal(gi, diag, ci) <= interpolate_diagonal(gi, diag, ci + d) + 1e-12


# ---- table files -------------------------------------------------------------------------------
TINY = UnitConfig('conv', 2, (8, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), batchnorm=True)
TINY_DENSE = UnitConfig('dense', 2, bias=True)


def _requests():
  return ([(TINY, ci, co) for ci in (4, 8) for co in (4, 8)]
          + [(TINY_DENSE, 8, 4), (TINY_DENSE, 16, 4)])


def test_table_incremental_roundtrip_and_lookup(tmp_path):
  path = str(tmp_path / 'table.json')
  table = LatencyTable.open(path, key=FAKE_KEY, log=lambda s: None)
  assert table.ensure(_requests(), repeats=3, warmup=1) == 6
  assert table.ensure(_requests(), repeats=3, warmup=1) == 0  # Nothing new.
  assert not [f for f in os.listdir(tmp_path) if f.startswith('.tmp')]  # Atomic save cleaned up.
  again = LatencyTable.open(path, key=FAKE_KEY, log=lambda s: None)
  assert again.entries == table.entries and again.missing(_requests()) == []
  assert again.ensure(_requests() + [(TINY, 8, 12)], repeats=3, warmup=1) == 1
  for config, ci, co in _requests():
    assert again.lookup(config, ci, co) == pytest.approx(again.get(config, ci, co))
  assert again.lookup(TINY, 6, 6) > 0


def test_table_key_mismatch_is_refused(tmp_path):
  path = str(tmp_path / 'table.json')
  table = LatencyTable(FAKE_KEY, path)
  table.entries[table_lib.entry_key(TINY, 4, 4)] = {'ms': 1.0, 'iqr_ms': 0.0, 'n': 3}
  table.save()
  other = dict(FAKE_KEY, jax_version='9.9')
  with pytest.raises(TableError, match='different device, JAX version or XLA flags'):
    LatencyTable.open(path, key=other)
  with pytest.raises(TableError, match='cpu_model'):
    LatencyTable.open(path, key=dict(FAKE_KEY, cpu_model='other'))
  with pytest.raises(TableError, match='xla_flags'):  # Other compiler flags: other code.
    LatencyTable.open(path, key=dict(FAKE_KEY,
                                     xla_flags='--xla_cpu_experimental_ynn_fusion_type='))
  # The default location is per device key, so another device never even finds this file.
  assert (table_lib.default_table_path(str(tmp_path), FAKE_KEY)
          != table_lib.default_table_path(str(tmp_path), other))


def test_device_key_includes_codegen_flags_only(monkeypatch):
  assert table_lib.codegen_flags('--xla_force_host_platform_device_count=8') == ''
  assert (table_lib.codegen_flags('--xla_cpu_experimental_ynn_fusion_type= '
                                  '--xla_force_host_platform_device_count=8 --xla_a=1')
          == '--xla_a=1 --xla_cpu_experimental_ynn_fusion_type=')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert 'xla_flags' not in table_lib.device_key()
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=')
  assert table_lib.device_key()['xla_flags'] == '--xla_cpu_experimental_ynn_fusion_type='


@pytest.mark.parametrize('content', [
    '{"format": "ttmpd_jax.latency_table", "version": 1, "key": {', 'not json at all',
    '[]', '{"format": "ttmpd_jax.latency_table", "version": 1, "key": {}, "entries": '
    '{"x": {"ms": -1}}}', b'\xff\xfe\x00binary'])
def test_corrupted_table_is_rebuilt_or_refused(tmp_path, content):
  path = tmp_path / 'table.json'
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  with pytest.raises(TableError, match='corrupted'):
    LatencyTable.open(str(path), key=FAKE_KEY, on_corrupt='error')
  messages = []
  table = LatencyTable.open(str(path), key=FAKE_KEY, log=messages.append)
  assert len(table) == 0 and 'corrupted' in messages[0] and 'rebuilding' in messages[0]
  assert os.path.exists(str(path) + '.corrupt') and not path.exists()
  table.ensure(_requests()[:1], repeats=2, warmup=0)
  assert json.loads(path.read_text())['format'] == table_lib.FORMAT


def test_incomplete_table_gives_clear_error():
  structure = ModelStructure.from_spec(SPECS[0], (8, 8, 1), 2)
  with pytest.raises(TableError, match='latency_table'):
    LatencyPredictor(structure, LatencyTable(FAKE_KEY), round_to=4)


# ---- predictor ---------------------------------------------------------------------------------
def test_fit_calibration():
  sums = [10.0, 20.0, 40.0]
  cal = fit_calibration(sums, [1.2 * s + 3.0 for s in sums])
  assert cal.fit == 'affine' and cal.scale == pytest.approx(1.2) and cal.offset_ms == pytest.approx(3)
  assert cal.max_relative_error < 1e-6 and cal.apply(50.0) == pytest.approx(63.0)
  cal = fit_calibration(sums, [s + 5.0 for s in sums], fit='offset')
  assert (cal.scale, cal.offset_ms) == (1.0, pytest.approx(5.0))
  cal = fit_calibration(sums, [0.8 * s - 1.0 for s in sums])  # Offset clipped at 0.
  assert cal.offset_ms == pytest.approx(0.0, abs=1e-6) and 0.7 < cal.scale < 0.8
  messages = []
  cal = fit_calibration(sums, [10 * s for s in sums], log=messages.append)  # Implausible scale.
  assert cal.scale == pytest.approx(5.0) and 'far from 1' in messages[0]
  # Two execution paths with different true scales are separated when the data allow it.
  pairs = [(10.0, 0.0), (0.0, 10.0), (10.0, 20.0), (30.0, 5.0)]
  measured = [1.0 * x + 0.6 * y + 2.0 for x, y in pairs]
  cal = fit_calibration(pairs, measured, fit='per_path')
  assert cal.scale == pytest.approx(1.0, abs=0.05) and cal.scale_ynn == pytest.approx(0.6, abs=0.05)
  assert cal.max_relative_error < 0.03


def test_predictor_build_predict_calibrate_incrementally(tmp_path):
  spec = ModelSpec('resnet8', 10, {'base_width': 4})
  path = str(tmp_path / 'table.json')
  table = LatencyTable.open(path, key=FAKE_KEY, log=lambda s: None)
  predictor = LatencyPredictor.build(spec, (12, 12, 1), 4, table, round_to=4, repeats=3,
                                     warmup=1)
  assert table.measured > 0 and len(table) == table.measured
  full = predictor.structure.full_widths
  # Uncalibrated prediction of the full model = sum of its grid entries.
  c_in, c_out = predictor.structure.channels(full)
  expected = sum(table.get(u.config, a, b) for u, a, b in zip(predictor.structure.units, c_in,
                                                              c_out))
  assert predictor.predict(full) == pytest.approx(expected)
  cal = predictor.calibrate(repeats=3, warmup=1)
  assert len(cal.points) >= 2 and table.measured_end_to_end == len(cal.points)

  # Second run: the same table file, nothing new measured, same calibration.
  table2 = LatencyTable.open(path, key=FAKE_KEY, log=lambda s: None)
  predictor2 = LatencyPredictor.build(spec, (12, 12, 1), 4, table2, round_to=4)
  cal2 = predictor2.calibrate()
  assert table2.measured == 0 and table2.measured_end_to_end == 0
  assert cal2 == cal

  # predict never compiles and is fast; savings are consistent.
  archs = random_architectures(predictor2.structure, 10, round_to=2, seed=3)
  with CompilationCounter() as counter:
    preds = [predictor2.predict(w) for w in archs]
  assert counter.count == 0
  assert all(p > 0 for p in preds)
  assert predictor2.saving(full, archs[0]) == pytest.approx(
      predictor2.predict(full) - predictor2.predict(archs[0]))
