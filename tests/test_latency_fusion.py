"""Fusion-aware latency units: regimes read from compiled HLO, the rule that predicts them without
compiling, and the predictor that splits every unit's costs by regime."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttmpd_jax.latency import (CompilationCounter, LatencyPredictor, LatencyTable, RegimeRule,
                               choose_ridge, fit_costs, fusion, library_units, protocol)

pytestmark = pytest.mark.timing   # Measures latency: run alone, after the parallel tests (.ci/run).

FAKE_KEY = {'device_kind': 'cpu', 'platform': 'cpu', 'jax_version': '0.0-test',
            'jaxlib_version': '0.0-test', 'cpu_model': 'test', 'cpu_cores': 2}
QUIET = lambda s: None  # noqa: E731

# The shape of XLA:CPU's optimized HLO: a library (kCustom) fusion whose computation calls a
# nested one holding the convolution of 'net/b'; 'net/a' convolves in the entry computation, and
# a copy of a's kernel carries a's op_name in a loop fusion (not a convolution: ignored).
HLO = '''HloModule jit_f, entry_computation_layout={(f32[4,8,8,2]{3,2,1,0})->f32[4,3]{1,0}}

%inner (p0: f32[4,8,8,8], p1: f32[3,3,8,16]) -> f32[4,8,8,16] {
  %p0 = f32[4,8,8,8]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,8,16]{3,2,1,0} parameter(1)
  ROOT %conv.2 = f32[4,8,8,16]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(<lambda>)/Net/b/conv_general_dilated" stack_frame_id=3}
}

%ynn_region (q0: f32[4,8,8,8], q1: f32[3,3,8,16]) -> f32[4,3] {
  %q0 = f32[4,8,8,8]{3,2,1,0} parameter(0)
  %q1 = f32[3,3,8,16]{3,2,1,0} parameter(1)
  %call.1 = f32[4,8,8,16]{3,2,1,0} call(%q0, %q1), to_apply=%inner
  ROOT %dot.3 = f32[4,3]{1,0} dot(%call.1, %q1), lhs_contracting_dims={1}, metadata={op_name="jit(<lambda>)/Net/head/dot_general"}
}

%copy_fusion (r0: f32[3,3,2,8]) -> f32[3,3,2,8] {
  %r0 = f32[3,3,2,8]{3,2,1,0} parameter(0)
  ROOT %copy.1 = f32[3,3,2,8]{2,3,1,0} copy(%r0), metadata={op_name="jit(<lambda>)/Net/a/conv_general_dilated"}
}

ENTRY %main.9 (x: f32[4,8,8,2], k: f32[3,3,2,8]) -> f32[4,3] {
  %x = f32[4,8,8,2]{3,2,1,0} parameter(0)
  %k = f32[3,3,2,8]{3,2,1,0} parameter(1)
  %copy_fusion = f32[3,3,2,8]{2,3,1,0} fusion(%k), kind=kLoop, calls=%copy_fusion
  %conv.1 = f32[4,8,8,8]{3,2,1,0} convolution(%x, %copy_fusion), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(<lambda>)/Net/a/conv_general_dilated"}
  ROOT %ynn_fusion = f32[4,3]{1,0} fusion(%conv.1, %k), kind=kCustom, calls=%ynn_region, metadata={op_name="jit(<lambda>)/Net/b/conv_general_dilated"}
}
'''


def test_library_units_are_read_from_the_compiled_hlo():
  paths = ('a', 'b', 'head', 'unused')
  assert library_units(HLO, paths) == {'b', 'head'}
  assert fusion.encode(library_units(HLO, paths), paths) == 'NLLN'
  assert list(fusion.decode('NLLN')) == [False, True, True, False]
  # Longest module path wins ('b' vs 'block/b'); nothing named: no library units.
  assert library_units(HLO.replace('Net/b/', 'Net/block/b/'), ('b', 'block/b')) == {'block/b'}
  assert library_units('HloModule empty', paths) == frozenset()


def test_regime_rule_learns_thresholds_and_generalises_to_steady_units():
  # Units: 0 switches above 16; 1 is only ever seen native at <= 16 (agrees with the shared
  # threshold, so it follows it); 2 is always library even at 16 channels (a matmul head:
  # keeps its one regime); 3 switches above 32.
  c_in = np.array([[1, 16, 16, 16], [1, 8, 24, 16], [1, 16, 32, 48], [1, 8, 8, 64]])
  c_out = np.array([[16, 16, 10, 16], [24, 8, 10, 32], [32, 16, 10, 16], [8, 16, 10, 16]])
  library = np.array([[False, False, True, False], [True, False, True, False],
                      [True, False, True, True], [False, False, True, True]])
  rule = RegimeRule.fit(c_in, c_out, library)
  assert rule.thresholds == (16, 16, None, 32) and rule.constant[2]
  for i in range(4):
    assert list(rule.predict(c_in[i], c_out[i])) == list(library[i])
  assert list(rule.predict([1, 24, 8, 40], [8, 24, 10, 8])) == [False, True, True, True]
  assert not RegimeRule.native(3).predict([64] * 3, [64] * 3).any()
  with pytest.raises(ValueError):
    RegimeRule.fit(c_in, c_out, library[:2])


def test_split_features_give_each_regime_its_own_costs():
  # Truth: unit costs 1 per feature unit natively, 3 inside a library region (a switch at 16).
  rng = np.random.default_rng(0)
  feats, ratios = [], []
  for _ in range(40):
    f = rng.uniform(0.1, 1.0, (3, 3))
    lib = rng.random(3) < 0.5
    feats.append(fusion.split_by_regime(f, lib))
    ratios.append(0.1 + float(np.sum(f * np.where(lib, 3.0, 1.0)[:, None])))
  assert feats[0].shape == (3, 6)
  ridge = choose_ridge(feats, ratios)
  fit = fit_costs(feats, ratios, ridge=ridge)
  assert fit.max_error < 0.05
  one_regime = fit_costs([f[:, :3] + f[:, 3:] for f in feats], ratios, ridge=ridge)
  assert one_regime.max_error > 3 * fit.max_error
  assert choose_ridge(feats[:5], ratios[:5]) == 0.1      # Too few points to cross-validate.


class _Stack(nn.Module):
  """Convolutions whose widths cross 16 channels when pruned (where XLA:CPU switches regime)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(32, (3, 3), name='c1')(x))
    x = nn.relu(nn.Conv(32, (3, 3), name='c2')(x))
    x = nn.relu(nn.Conv(24, (3, 3), strides=2, name='c3')(x))
    return nn.Dense(4, name='head')(x.mean(axis=(1, 2)))


def _predictor(table, **kwargs):
  model = _Stack()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3))))
  return LatencyPredictor.from_model(model, variables, (8, 12, 12, 3), table, round_to=8,
                                     random_probes=3, probes_per_group=2, repeats=3, warmup=1,
                                     log=QUIET, **kwargs)


def test_predictor_records_regimes_and_predicts_those_of_unseen_architectures(tmp_path,
                                                                            monkeypatch):
  path = str(tmp_path / 'table.json')
  p = _predictor(LatencyTable.open(path, key=FAKE_KEY, log=QUIET))
  units = len(p.structure.units)
  assert all(len(e['library']) == units for e in p.table.entries.values())
  assert p.predict() > 0 and 'unit' in p.regimes()
  # The learned rule agrees with what the compiler does on architectures never measured.
  x = p._input()  # pylint: disable=protected-access
  for kept in ({'c1': 8, 'c2': 24, 'c3': 16}, {'c1': 24, 'c2': 8, 'c3': 8},
               {'c1': 16, 'c2': 16, 'c3': 24}):
    widths = p.structure.widths_of(kept)
    p._call(widths, x)  # pylint: disable=protected-access
    compiled = fusion.decode(p._library[p.structure.key_of(widths)])  # pylint: disable=W0212
    assert list(p.rule.predict(*p.structure.channels(widths))) == list(compiled), kept
  # An entry measured before regimes were recorded is compiled once, then never again.
  key = p.entry_key(p.design()[2])
  entry = dict(p.table.entries[key])
  del entry['library']
  p.table.put(key, entry)
  p.table.save()
  # Probes flagged as measured under load would be re-measured on a quiet host: declare it busy.
  monkeypatch.setattr(protocol, 'foreign_load', lambda seconds=0.5: 0.9)
  again = LatencyTable.open(path, key=FAKE_KEY, log=QUIET)
  with CompilationCounter() as counter:
    q = _predictor(again)
  assert again.measured == 0 and counter.count >= 1
  assert 'library' in LatencyTable.open(path, key=FAKE_KEY, log=QUIET).entries[key]
  with CompilationCounter() as counter:
    r = _predictor(LatencyTable.open(path, key=FAKE_KEY, log=QUIET))
  assert counter.count == 0 and r.predict() == pytest.approx(q.predict())
  assert q.predict() == pytest.approx(p.predict())
