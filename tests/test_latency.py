"""Latency model: protocol, unit discovery, fitting/prediction, table files, correction."""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import io_callback

from ttmpd_jax import pruning
from ttmpd_jax.latency import (CompilationCounter, CpuMonitor, LatencyPredictor, LatencyTable,
                               ModelStructure, TableError, channel_grid, fit_costs, measure,
                               measure_many, measure_model, measure_relative,
                               random_architectures, synthetic_variables)
from ttmpd_jax.latency import predictor as predictor_lib
from ttmpd_jax.latency import protocol
from ttmpd_jax.latency import table as table_lib
from ttmpd_jax.models import ModelSpec, build_model

pytestmark = pytest.mark.timing   # Measures latency: run alone, after the parallel tests (.ci/run).

FAKE_KEY = {'device_kind': 'cpu', 'platform': 'cpu', 'jax_version': '0.0-test',
            'jaxlib_version': '0.0-test', 'cpu_model': 'test', 'cpu_cores': 2}
QUIET = lambda s: None  # noqa: E731


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


def test_a_time_budget_stops_slow_rounds_but_not_fast_ones():
  def pause(v):
    time.sleep(0.03)
    return v

  def slow(x):   # 30 ms a call, inside the compiled function.
    return jax.pure_callback(pause, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
  x = jnp.ones(4)
  fast = jax.jit(lambda v: v + 1).lower(x).compile()
  slow_t, fast_t = measure_many([(slow, (x,)), (fast, (x,))], repeats=20, warmup=0,
                                max_seconds=0.1)
  # Rounds of >= 30 ms pass the 0.1 s budget after the third or fourth (never before the third).
  assert len(slow_t.times_ms) == len(fast_t.times_ms)
  assert protocol.MIN_ROUNDS <= len(slow_t.times_ms) <= 4
  assert len(measure_many([(fast, (x,))], repeats=20, warmup=0, max_seconds=5.0)[0].times_ms) == 20
  assert len(measure_many([(slow, (x,))], repeats=2, warmup=0, max_seconds=0.0)[0].times_ms) == 2


def test_each_timed_call_follows_a_settle_call_of_the_same_function(monkeypatch):
  log = []

  def traced(name):
    def record(v):
      log.append(name)
      return v
    return lambda x: io_callback(record, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
  x = jnp.ones(4)
  a, b = measure_many([(traced('a'), (x,)), (traced('b'), (x,))], repeats=3, warmup=1)
  assert a.repeats == b.repeats == 3
  timed = log[2:]   # After one warm-up call each: (settle, timed) pairs of one function.
  assert timed == ['a', 'a', 'b', 'b', 'b', 'b', 'a', 'a', 'a', 'a', 'b', 'b']
  log.clear()
  measure_many([(traced('a'), (x,))], repeats=3, warmup=1)   # One function: no settle calls.
  assert log == ['a'] * 4
  log.clear()
  monkeypatch.setattr(protocol, 'SETTLE_BELOW_MS', 0.0)      # Slow functions: none either.
  measure_many([(traced('a'), (x,)), (traced('b'), (x,))], repeats=2, warmup=1)
  assert log == ['a', 'b', 'a', 'b', 'b', 'a']
  with pytest.raises(ValueError, match='settle'):
    measure_many([(traced('a'), (x,))], settle=-1)


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


def test_measure_relative_ratios_and_load():
  a = jnp.ones((160, 160), jnp.float32)
  small = jax.jit(lambda x: x @ x)
  big = jax.jit(lambda x: (x @ x) @ (x @ x) @ (x @ x) @ (x @ x) @ x @ x @ x @ x)
  same, larger = measure_relative((small, (a,)), [(small, (a,)), (big, (a,))], repeats=12)
  assert 0.6 < same.ratio < 1.6 and larger.ratio > 2.0
  assert same.reference is larger.reference and same.ms > 0 and same.ratio_iqr >= 0
  assert same.foreign_load is None or 0.0 <= same.foreign_load <= 1.0
  with CpuMonitor() as monitor:
    time.sleep(0.05)
  assert monitor.foreign_load is None or 0.0 <= monitor.foreign_load <= 1.0


# ---- unit discovery ----------------------------------------------------------------------------
class ConcatDepthwise(nn.Module):
  """Two branches concatenated on channels, a depthwise conv over the concatenation, a head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = nn.relu(nn.BatchNorm(use_running_average=not train, name='a_bn')(
        nn.Conv(8, (3, 3), use_bias=False, name='a')(x)))
    b = nn.relu(nn.Conv(4, (1, 1), name='b')(x))
    y = jnp.concatenate([a, b], axis=-1)
    y = nn.relu(nn.Conv(12, (3, 3), strides=2, feature_group_count=12, name='dw')(y))
    y = nn.relu(nn.Conv(6, (1, 1), name='project')(y))
    return nn.Dense(3, name='head')(y.reshape((y.shape[0], -1)))


def _abstract(model, image_shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                           train=False))


def _kernel_shapes(variables):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path[:-1]): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]
          if str(getattr(path[-1], 'key', '')) == 'kernel'}


def test_units_of_a_model_with_concatenation_and_depthwise():
  model = ConcatDepthwise()
  structure = ModelStructure.from_model(model, _abstract(model, (8, 8, 2)), (4, 8, 8, 2))
  units = {u.path: u for u in structure.units}
  assert list(units) == ['a', 'b', 'dw', 'project', 'head']
  assert set(structure.prunable) == {'a', 'b', 'project'}  # head feeds the output
  assert [g for g, _ in units['dw'].record.inputs] == ['a', 'b']  # concatenation: two groups
  assert units['dw'].depthwise and structure.width_keys['a'] == ('a', 'dw')
  assert units['head'].record.c_in == 4 * 4 * 6  # flatten of [4, 4, 6]
  assert units['a'].out_positions == 4 * 8 * 8 and units['dw'].out_positions == 4 * 4 * 4
  # Width spec -> channels, checked against the physically pruned kernels.
  variables = synthetic_variables(model, (1, 8, 8, 2))
  for kept in ({'a': 3, 'b': 2, 'project': 5}, {'a': 8, 'b': 1, 'project': 1}, {}):
    widths = structure.widths_of(kept)
    masks = {g: np.arange(structure.sizes[g]) < k for g, k in kept.items()}
    small = pruning.remove_channels(variables, structure.groups, masks)
    shapes = _kernel_shapes(small)
    c_in, c_out = structure.channels(widths)
    for u, ci, co in zip(structure.units, c_in, c_out):
      assert shapes[u.path][-1] == co, u.path
      assert shapes[u.path][-2] == (1 if u.depthwise else ci), u.path
    assert widths == {p: s[-1] for p, s in shapes.items()}
    y = pruning.run_pruned(model, small, jnp.ones((2, 8, 8, 2)), train=False)
    assert y.shape == (2, 3)
  f_full, f_small = structure.features(None), structure.features({'a': 4})
  assert np.all(f_small <= f_full) and f_small[2, 0] < f_full[2, 0]  # dw MACs shrink with 'a'


def test_nnx_model_through_its_adapter():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ttmpd_jax.pruning.nnx import from_nnx  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 8, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      y = nnx.relu(self.dw(nnx.relu(self.bn(self.conv(x)))))
      return self.head(y.mean(axis=(1, 2)))

  adapter, variables = from_nnx(Net(nnx.Rngs(0)))
  table = LatencyTable(FAKE_KEY, log=QUIET)
  p = LatencyPredictor.from_model(adapter, variables, (4, 8, 8, 2), table, round_to=2,
                                  random_probes=1, probes_per_group=1, repeats=2, warmup=1,
                                  log=QUIET)
  assert p.structure.paths == ('conv', 'dw', 'head') and p.structure.units[1].depthwise
  assert p.structure.prunable == ('conv',) and len(table) == len(p.design()) == 4
  assert p.predict() > 0 and p.predict({'conv': 4}) > 0


SPECS = [ModelSpec('resnet8', 10, {'base_width': 8}),
         ModelSpec('vgg_small', 10, {'config': (8, 'M', 16, 'M'), 'hidden': 16}),
         ModelSpec('mobilenetv2', 10, {'width_multiplier': 0.25, 'small_input': True,
                                       'config': ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))})]


@pytest.mark.parametrize('spec', SPECS, ids=lambda s: s.name)
def test_zoo_channels_match_rebuilt_models(spec):
  image_shape = (16, 16, 1)
  model = build_model(spec)
  structure = ModelStructure.from_model(model, _abstract(model, image_shape), (2, *image_shape))
  assert structure.full_widths == {p: s[-1] for p, s in _kernel_shapes(
      _abstract(model, image_shape)).items()}
  for widths in random_architectures(structure, 3, round_to=4, seed=0):
    pruned = build_model(spec.with_widths(widths))
    shapes = _kernel_shapes(_abstract(pruned, image_shape))
    c_in, c_out = structure.channels(widths)
    for u, ci, co in zip(structure.units, c_in, c_out):
      assert shapes[u.path][-1] == co and shapes[u.path][-2] == (1 if u.depthwise else ci)


def test_channel_grid():
  assert channel_grid(20, 8) == (8, 16, 20)
  assert channel_grid(3, 8) == (3,)
  assert channel_grid(256, 8, max_points=8) == (32, 64, 96, 128, 160, 192, 224, 256)


# ---- fitting and prediction (no measurement: synthetic tables) ---------------------------------
def _synthetic_predictor(tmp_path=None, noise=0.0, seed=0):
  """A predictor for a small ResNet whose table holds ratios of a known linear cost model."""
  spec = ModelSpec('resnet8', 10, {'base_width': 8})
  model = build_model(spec)
  path = None if tmp_path is None else str(tmp_path / 'table.json')
  table = LatencyTable(FAKE_KEY, path, log=QUIET)
  p = LatencyPredictor.from_model(model, _abstract(model, (12, 12, 1)), (4, 12, 12, 1), table,
                                  round_to=2, build=False, log=QUIET, fusion_aware=False)
  rng = np.random.default_rng(seed)
  theta = rng.uniform(0.5, 2.0, (len(p.structure.units), 3)) * np.array([1e3, 1e1, 1e1])
  truth = lambda w: 0.5 + float(np.sum(theta * p.structure.features(w)))  # noqa: E731
  full = truth(None)
  for w in p.design():
    ratio = truth(w) / full * (1 + noise * rng.standard_normal())
    table.put(p.entry_key(w), {'ms': 10.0 * ratio, 'ratio': ratio, 'ref_ms': 10.0})
  p.refit()
  return p, lambda w: 10.0 * truth(w) / full


def test_design_is_structured_then_random_fill_and_refit_takes_a_subset(monkeypatch):
  p, truth = _synthetic_predictor()
  base, random = p.design_parts()
  assert base + random == p.design() and base[0] == p.structure.complete_widths()
  keys = [p.structure.key_of(w) for w in base + random]
  assert len(set(keys)) == len(keys) and len(random) > 0
  assert len(keys) <= predictor_lib.MIN_PROBES
  # A smaller fill is a prefix of a larger one: a table built with fewer random probes stays
  # valid, and a larger design only measures what it adds.
  monkeypatch.setattr(predictor_lib, 'MIN_PROBES', len(base) + 10)
  small_base, small_random = p.design_parts()
  assert small_base == base and 0 < len(small_random) <= 10
  assert random[:len(small_random)] == small_random
  # A fit on part of the table sees that part only; a plain refit sees everything again.
  assert p.refit(only=base + random[:5]).n == len(base) + 5
  assert p.refit().n == len(base) + len(random)
  assert p.predict() == pytest.approx(truth(None), rel=0.03)


def test_fit_recovers_a_linear_cost_model_and_interpolates_between_probes():
  p, truth = _synthetic_predictor()
  assert p.fit.max_error < 0.03 and p.predict() == pytest.approx(10.0, rel=0.03)
  # Architectures never probed (odd widths, off the probe counts) are predicted as well.
  for w in random_architectures(p.structure, 10, round_to=1, seed=4):
    assert p.predict(w) == pytest.approx(truth(w), rel=0.03)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000))
def test_prediction_is_monotone_in_every_group_width(seed):
  p = _MONO[0]
  rng = np.random.default_rng(seed)
  small = p.structure.random_widths(rng, 1, min_keep=0.1)
  kept = p.structure.kept(small)
  bigger = {g: rng.integers(k, p.structure.sizes[g] + 1) for g, k in kept.items()}
  assert 0 < p.predict(small) <= p.predict(p.structure.widths_of(bigger)) + 1e-9


_MONO = [_synthetic_predictor(noise=0.05, seed=1)[0]]


def test_fit_costs_shrinks_to_shared_costs():
  rng = np.random.default_rng(0)
  feats = [rng.uniform(0.1, 1.0, (4, 3)) for _ in range(3)]  # Fewer points than unit costs.
  fit = fit_costs(feats, [f.sum() + 0.2 for f in feats])
  assert np.all(fit.theta >= 0) and fit.constant >= 0 and fit.max_error < 0.05
  assert np.ptp(fit.theta[:, 0]) < 0.5 * fit.theta[:, 0].mean()  # Pulled together.
  with pytest.raises(ValueError):
    fit_costs(feats, [1.0, -1.0, 1.0])


def test_predict_is_fast_and_never_compiles():
  p, _ = _synthetic_predictor()
  archs = random_architectures(p.structure, 50, round_to=1, seed=3)
  with CompilationCounter() as counter:
    start = time.perf_counter()
    values = [p.predict(w) for w in archs]
    per_call = (time.perf_counter() - start) / len(archs)
  assert counter.count == 0 and all(v > 0 for v in values)
  assert per_call < 1e-3, per_call
  assert p.saving(None, archs[0]) == pytest.approx(p.predict(None) - p.predict(archs[0]))


def test_correct_refits_only_beyond_noise(tmp_path):
  p, truth = _synthetic_predictor(tmp_path)
  messages = []
  p.log = messages.append
  w = random_architectures(p.structure, 1, round_to=2, seed=9)[0]
  assert not p.correct(w, p.predict(w) * 1.01, 10.0, spread=0.01)  # Within noise.
  assert not messages
  # The machine got faster (stale table built under load): teacher now 7 ms, not 10 ms.
  assert p.correct(w, 0.7 * truth(w), teacher_ms=7.0, spread=0.01)
  assert 'refitted' in messages[-1]
  assert p.predict(w) == pytest.approx(0.7 * truth(w), rel=0.03)
  assert p.predict(None) == pytest.approx(7.0, rel=0.03)
  # Persisted: a predictor opened from the saved table predicts the same.
  again = LatencyTable.open(p.table.path, key=FAKE_KEY, log=QUIET)
  q = LatencyPredictor(p.structure, again, p.model, p.variables, round_to=2, log=QUIET,
                       fusion_aware=False)
  assert q.predict(w) == pytest.approx(p.predict(w), rel=1e-6)
  # Without the teacher's time, only the overall scale moves.
  assert p.correct(w, 2.0 * p.predict(w))
  assert p.predict(w) == pytest.approx(2.0 * 0.7 * truth(w), rel=0.04)


# ---- table files -------------------------------------------------------------------------------
def _entry(ratio=1.0, **extra):
  return {'ms': 10.0 * ratio, 'ratio': ratio, 'ref_ms': 10.0, **extra}


def test_table_key_mismatch_is_refused(tmp_path):
  path = str(tmp_path / 'table.json')
  table = LatencyTable(FAKE_KEY, path)
  table.put('m|x', _entry())
  table.save()
  assert LatencyTable.open(path, key=FAKE_KEY).entries == table.entries
  other = dict(FAKE_KEY, jax_version='9.9')
  with pytest.raises(TableError, match='different device, JAX version or XLA flags'):
    LatencyTable.open(path, key=other)
  with pytest.raises(TableError, match='cpu_cores'):
    LatencyTable.open(path, key=dict(FAKE_KEY, cpu_cores=16))
  with pytest.raises(TableError, match='xla_flags'):  # Other compiler flags: other code.
    LatencyTable.open(path, key=dict(FAKE_KEY,
                                     xla_flags='--xla_cpu_experimental_ynn_fusion_type='))
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
    '{"format": "ttmpd_jax.latency_table", "version": 2, "key": {', 'not json at all', '[]',
    '{"format": "ttmpd_jax.latency_table", "version": 1, "key": {}, "entries": {}}',
    '{"format": "ttmpd_jax.latency_table", "version": 2, "key": {}, "entries": '
    '{"x": {"ms": -1, "ratio": 1}}}', b'\xff\xfe\x00binary'])
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
  table.put('m|x', _entry())
  table.save()
  assert json.loads(path.read_text())['format'] == table_lib.FORMAT


def test_missing_measurements_give_a_clear_error():
  p, _ = _synthetic_predictor()
  empty = LatencyTable(FAKE_KEY, log=QUIET)
  q = LatencyPredictor(p.structure, empty, p.model, p.variables, log=QUIET)
  with pytest.raises(TableError, match='no measurement of this model'):
    q.predict()


# ---- measuring in context ----------------------------------------------------------------------
def test_build_measures_once_then_reuses_and_remeasures_loaded_probes(tmp_path, monkeypatch):
  model = ConcatDepthwise()
  path = str(tmp_path / 'table.json')
  table = LatencyTable.open(path, key=FAKE_KEY, log=QUIET)
  p = LatencyPredictor.from_model(model, _abstract(model, (8, 8, 2)), (4, 8, 8, 2), table,
                                  round_to=2, random_probes=2, probes_per_group=1, repeats=7,
                                  warmup=1, log=QUIET)
  design = p.design()
  assert table.measured == len(design) == len(table) and p.fit.n == len(design)
  entry = table.get(p.entry_key(None))
  # The model timed against itself: a ratio near 1 (calls of tens of microseconds on a shared
  # 2-core VM: within a factor of 2, not of a few percent).
  assert 0.5 < entry['ratio'] < 2.0 and entry['ms'] > 0
  assert all(e['ms'] > 0 and e['ratio'] > 0 for e in table.entries.values())
  assert p.predict() > 0 and p.predict({'a': 2, 'b': 1}) > 0

  # Second build: nothing measured (probes the first build flagged as measured under load wait
  # for a quiet machine: the host is declared busy here so that the check does not depend on it).
  monkeypatch.setattr(protocol, 'foreign_load', lambda seconds=0.5: 0.9)
  again = LatencyTable.open(path, key=FAKE_KEY, log=QUIET)
  q = LatencyPredictor.from_model(model, _abstract(model, (8, 8, 2)), (4, 8, 8, 2), again,
                                  round_to=2, random_probes=2, probes_per_group=1, log=QUIET)
  assert again.measured == 0 and q.predict() == pytest.approx(p.predict())

  # Probes measured on a busy machine are re-measured once it is quiet, not before.
  busy_key = p.entry_key(design[1])
  for key, entry in again.entries.items():
    entry['loaded'] = key == busy_key
  monkeypatch.setattr(protocol, 'foreign_load', lambda seconds=0.5: 0.9)
  q.build()
  assert again.measured == 0
  monkeypatch.setattr(protocol, 'foreign_load', lambda seconds=0.5: 0.0)
  q.build()
  assert again.measured == 1 and again.entries[busy_key]['source'] == 'probe'
  measured = q.measure([{'a': 4}], repeats=3, warmup=1)[0]
  assert measured.ms > 0 and measured.teacher_ms > 0 and measured.widths['a'] == 4


def test_macs_latency_is_the_teacher_time_scaled_by_the_counted_macs():
  from ttmpd_jax.latency import MacsLatency
  from ttmpd_jax.pruning.cost import count_cost
  spec = ModelSpec('resnet8', 10, {'base_width': 8})
  model = build_model(spec)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
  latency = MacsLatency.from_model(model, variables, (4, 16, 16, 1), teacher_ms=10.0)
  assert latency.predict() == pytest.approx(10.0)
  full = dict(latency.structure.full_widths)
  narrow = latency.structure.group_widths(latency.structure.prunable[0], 2)
  pruned = build_model(spec.with_widths(narrow))
  ratio = latency.predict(narrow) / latency.predict(full)
  small = pruned.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
  expected = (count_cost(pruned, small, (16, 16, 1)).macs
              / count_cost(model, variables, (16, 16, 1)).macs)
  assert 0 < ratio < 1 and ratio == pytest.approx(expected, rel=1e-6)
  # Timed once when no teacher time is given; abstract variables are timed on synthetic values.
  timed = MacsLatency.from_model(model, _abstract(model, (16, 16, 1)), (4, 16, 16, 1), repeats=3)
  assert timed.teacher_ms > 0
  assert timed.predict(narrow) / timed.predict() == pytest.approx(ratio)
