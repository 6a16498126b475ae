"""Are the fusion regimes of validated architectures predicted right? (a diagnosis of the
latency model's errors)

The latency model gives each unit separate costs inside a library fusion region and as native
code, and a rule (``fusion.RegimeRule``) predicts the regime of every unit from channel counts
without compiling. When a validation run (``bench/bench_latency.py``) shows large errors, this
tells whether the rule put units in the wrong regime or the costs within a regime are off: it
builds the model's table afresh (``--round_to`` as the validation), compiles every validation
architecture, reads its regimes from the optimized HLO and prints them beside the rule's and the
validation error::

  python bench/bench_regimes.py \\
      --validation bench/results/latency_validation_cpu_resnet8_min48_run1.json --model resnet8

Measures only the table's probes (about 30 s for ResNet-8 on 2 cores); the architectures are
compiled, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_latency import model_and_variables  # noqa: E402
from ttmpd_jax.latency import fusion  # noqa: E402
from ttmpd_jax.latency.predictor import LatencyPredictor  # noqa: E402
from ttmpd_jax.latency.table import LatencyTable  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--validation', required=True,
                      help='a latency_validation_*.json written by bench/bench_latency.py')
  parser.add_argument('--model', default='resnet8')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--round_to', type=int, default=8)
  args = parser.parse_args()
  with open(args.validation) as f:
    row = json.load(f)['models'][args.model]
  model, variables = model_and_variables(args.model, (28, 28, 1))
  table = LatencyTable.open(cache_dir=tempfile.mkdtemp(), log=lambda s: None)
  p = LatencyPredictor.from_model(model, variables, (args.batch, 28, 28, 1), table,
                                  round_to=args.round_to, log=lambda s: None)
  s = p.structure
  print(f'{args.model}: {p.regimes()}; units {", ".join(s.paths)}')
  rows = []
  for key, predicted, measured in zip(row['archs_kept'], row['predicted_ms'], row['measured_ms']):
    widths = s.widths_of(dict(zip(s.prunable, (int(c) for c in key.split(',')))))
    c_in, c_out = s.channels(widths)
    rule = fusion.encode(frozenset(u for u, lib in zip(s.paths, p.rule.predict(c_in, c_out))
                                   if lib), s.paths)
    rows.append((100 * (predicted / measured - 1), key, p.library_of(widths), rule))
  print('validation error  kept widths             compiled    rule (L: library, N: native)')
  for error, key, compiled, rule in sorted(rows):
    print(f'{error:+15.1f}%  {key:22s}  {compiled}  {rule}'
          + ('' if compiled == rule else '  MISMATCH'))
  same = sum(compiled == rule for _, _, compiled, rule in rows)
  print(f'{same} of {len(rows)} architectures compiled in the regimes the rule predicts')


if __name__ == '__main__':
  main()
