"""Measuring against the teacher with a faked clock and faked machine load: the host's own
noise is never called a busy machine, other processes' load is, and measuring stops as soon as
the ratio is known to lie inside or outside the band the decision turns on."""

from __future__ import annotations

import numpy as np
import pytest

from ttmpd_jax.latency import protocol
from ttmpd_jax.search import measure


class _Clock:
  """Faked rounds: the teacher takes 100 ms, the network ``100 * ratio`` ms, each call with
  ``noise`` relative Gaussian jitter (seeded)."""

  def __init__(self, ratio, noise, seed=0):
    self.ratio, self.noise, self.rng, self.rounds = ratio, noise, np.random.default_rng(seed), 0

  def __call__(self, calls, warmup=2, settle=1):
    del calls, warmup, settle
    while True:
      self.rounds += 1
      jitter = 1 + self.noise * self.rng.standard_normal(2)
      yield [100.0 * jitter[0], 100.0 * self.ratio * jitter[1]]


def _faked(monkeypatch, clock, loads, host_noise=0.1):
  loads = list(loads)

  class Monitor:
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.foreign_load = loads.pop(0) if loads else 0.0

  teacher = measure._Teacher(exe=None, x=None, noise=host_noise)
  monkeypatch.setattr(measure, '_teacher', lambda *a: teacher)
  monkeypatch.setattr(measure, '_compile', lambda *a: None)
  monkeypatch.setattr(measure.jax, 'device_put', lambda x: x)
  monkeypatch.setattr(protocol, 'interleaved_rounds', clock)
  monkeypatch.setattr(protocol, 'CpuMonitor', Monitor)


def _measure(band=None, **kwargs):
  lines = []
  m = measure.measure_against_teacher((None, {}), (None, {}), 8, (4, 4, 1), band=band,
                                      log=lines.append, **kwargs)
  return m, lines


def test_host_noise_without_foreign_load_is_not_called_busy(monkeypatch):
  # 15% call-to-call jitter on a quiet machine (the fresh 2-core host's own noise).
  clock = _Clock(ratio=0.60, noise=0.15)
  _faked(monkeypatch, clock, loads=[0.0, 0.0, 0.0], host_noise=0.15)
  m, lines = _measure(band=(0.582, 0.618))
  assert m.reliable and m.load == 0.0 and m.spread > 0.1
  assert not lines, lines   # No 'unreliable', no 'busy machine', no re-measurement.
  assert clock.rounds == m.rounds <= measure.MAX_ROUNDS


def test_foreign_load_is_detected_and_measured_again(monkeypatch):
  clock = _Clock(ratio=0.60, noise=0.01)
  _faked(monkeypatch, clock, loads=[0.5, 0.0], host_noise=0.01)
  m, lines = _measure(band=(0.582, 0.618))
  assert m.reliable and m.load == 0.0
  assert len(lines) == 1 and 'other processes took 0.50 of the CPUs' in lines[0]
  assert 'measuring again' in lines[0]
  # Still loaded after every attempt: kept, flagged, and the message gives the load.
  _faked(monkeypatch, _Clock(0.6, 0.01), loads=[0.4, 0.4, 0.4], host_noise=0.01)
  m, lines = _measure(band=(0.582, 0.618))
  assert not m.reliable and m.load == 0.4
  assert 'busy machine (other processes took 0.40 of the CPUs' in lines[-1]


@pytest.mark.parametrize('ratio', [0.45, 0.75])
def test_a_ratio_far_from_the_band_stops_at_the_fewest_rounds(monkeypatch, ratio):
  clock = _Clock(ratio=ratio, noise=0.03)
  _faked(monkeypatch, clock, loads=[0.0], host_noise=0.03)
  m, _ = _measure(band=(0.582, 0.618))
  assert m.rounds == measure.MIN_ROUNDS and abs(m.ratio - ratio) < 0.05


def test_a_ratio_at_the_band_edge_takes_more_rounds_and_without_a_band_all(monkeypatch):
  _faked(monkeypatch, _Clock(ratio=0.617, noise=0.03), loads=[0.0], host_noise=0.03)
  m, _ = _measure(band=(0.582, 0.618))
  assert m.rounds > measure.MIN_ROUNDS
  _faked(monkeypatch, _Clock(ratio=0.60, noise=0.03), loads=[0.0], host_noise=0.03)
  m, _ = _measure(band=None, max_rounds=7)
  assert m.rounds == 7


def test_decided_uses_the_host_noise_as_a_floor():
  # Three identical rounds would give a zero-width interval; the host's noise keeps it honest.
  ratios = np.array([0.61, 0.61, 0.61])
  assert not measure.decided(ratios, noise=0.05, band=(0.582, 0.618))
  assert measure.decided(ratios, noise=0.0, band=(0.582, 0.618))
